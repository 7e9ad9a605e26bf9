// MoELayer: router + dispatcher + grouped experts (+ shared experts), the drop-in MoE
// feed-forward block. Letters: T tokens, D dim, F expert hidden, E experts, K top-k.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <vector>

#include "moe/dispatcher.h"
#include "moe/experts.h"
#include "moe/router.h"
#include "moe/routing_context.h"

namespace gbmoe {

/// Options of a MoE layer. The router's dim and num_experts are taken from the layer's.
///
/// Example:
///   MoELayerOptions(512, 64, 256)
///       .router(RouterOptions().top_k(4))
///       .shared_experts(2)
///       .dispatcher(DispatcherOptions().capacity_factor(1.25));
struct MoELayerOptions {
  MoELayerOptions(int64_t dim, int64_t num_experts, int64_t expert_hidden)
      : dim_(dim), num_experts_(num_experts), expert_hidden_(expert_hidden) {}
  TORCH_ARG(int64_t, dim);
  TORCH_ARG(int64_t, num_experts);
  /// Hidden size F of each routed expert.
  TORCH_ARG(int64_t, expert_hidden);
  /// Always-on shared experts: one SwiGLU of hidden shared_experts * expert_hidden. 0 = none.
  TORCH_ARG(int64_t, shared_experts) = 0;
  TORCH_ARG(RouterOptions, router) = RouterOptions();
  TORCH_ARG(DispatcherOptions, dispatcher) = DispatcherOptions();
  /// Standard deviation of the experts' normal initialization.
  TORCH_ARG(double, init_std) = 0.02;

 public:
  /// The router options with dim and num_experts filled in from the layer.
  RouterOptions resolved_router() const;
  void validate() const;
};

/// A mixture-of-experts feed-forward block.
/// forward takes (..., D) and an optional boolean mask of the leading shape (false = padding,
/// excluded from routing statistics and losses, output contribution of routed experts zero).
/// Given a RoutingContext, the layer appends its routing to it (scores with their gradient,
/// selections, counts); the balancing and z-loss terms are formed from those records by
/// gbmoe::TrainingObjective (moe/objective.h). The layer keeps no statistics of its own.
///
/// Example:
///   MoELayer moe(MoELayerOptions(256, 8, 512).router(RouterOptions().top_k(2)));
///   TrainingObjective objective({moe}, BalanceOptions().scope(BalanceScope::Micro));
///   objective.begin_step(1, valid_tokens);
///   auto routing = objective.context();
///   auto y = moe->forward(x_BSD, mask_BS, &routing);
///   objective.micro_batch_backward(routing, task_loss_sum(y));
class MoELayerImpl : public torch::nn::Cloneable<MoELayerImpl> {
 public:
  explicit MoELayerImpl(MoELayerOptions options);

  void reset() override;
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  /// routing: where to append this forward's routing; null records nothing.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask = {},
                        RoutingContext* routing = nullptr);

  /// Replaces the token dispatcher (expert parallelism swaps in an all-to-all one).
  void set_dispatcher(std::shared_ptr<TokenDispatcher> dispatcher);
  TokenDispatcher& dispatcher() { return *dispatcher_; }

  MoELayerOptions options;
  Router router{nullptr};
  GroupedExperts experts{nullptr};
  SwiGLU shared{nullptr};  // null when options.shared_experts() == 0

 private:
  std::shared_ptr<TokenDispatcher> dispatcher_;
};
TORCH_MODULE(MoELayer);

}  // namespace gbmoe
