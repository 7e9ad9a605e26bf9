// MoELayer: router + dispatcher + grouped experts (+ shared experts), the drop-in MoE
// feed-forward block. Letters: T tokens, D dim, F expert hidden, E experts, K top-k.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <vector>

#include "losses/balance.h"
#include "moe/dispatcher.h"
#include "moe/experts.h"
#include "moe/router.h"

namespace gbmoe {

/// Options of a MoE layer. The router's dim and num_experts are taken from the layer's.
///
/// Example:
///   MoELayerOptions(512, 64, 256)
///       .router(RouterOptions().top_k(4))
///       .shared_experts(2)
///       .dispatcher(DispatcherOptions().capacity_factor(1.25))
///       .balance(BalanceOptions().alpha(0.01));
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
  TORCH_ARG(BalanceOptions, balance) = BalanceOptions();
  /// Standard deviation of the experts' normal initialization.
  TORCH_ARG(double, init_std) = 0.02;

 public:
  /// The router options with dim and num_experts filled in from the layer.
  RouterOptions resolved_router() const;
  void validate() const;
};

/// What one forward of a MoE layer measured. Counts describe routing decisions (before any
/// capacity dropping) of the valid tokens.
struct MoEStats {
  torch::Tensor counts;        // (E,) int64 selections c_i, no gradient
  int64_t num_tokens = 0;      // n: valid tokens
  torch::Tensor prob_mean;     // (E,) P_i over valid tokens, differentiable
  torch::Tensor balance_loss;  // scalar: LBL of the micro-batch (micro, global, group scopes)
                               // or of the sequences (sequence scope); global and group
                               // objectives are formed by gbmoe::Balancer from counts
  torch::Tensor z_loss;        // scalar: router z-loss (0 when disabled)
  int64_t num_dropped = 0;     // assignments dropped by capacity
  double max_violation = 0.0;  // MaxVio of counts

  /// balance_loss + z_loss: what to add to the training objective.
  torch::Tensor aux_loss() const { return balance_loss + z_loss; }
};

/// A mixture-of-experts feed-forward block.
/// forward takes (..., D) and an optional boolean mask of the leading shape (false = padding,
/// excluded from routing statistics and losses, output contribution of routed experts zero).
/// The balancing and z-loss terms of the forward are in stats(); add stats().aux_loss() to the
/// objective. The sequence scope reads the input as (..., S, D).
///
/// Example:
///   MoELayer moe(MoELayerOptions(256, 8, 512).router(RouterOptions().top_k(2)));
///   auto y = moe->forward(x_BSD);
///   auto loss = task_loss(y) + moe->stats().aux_loss();
class MoELayerImpl : public torch::nn::Cloneable<MoELayerImpl> {
 public:
  explicit MoELayerImpl(MoELayerOptions options);

  void reset() override;
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask = {});

  /// Statistics of the most recent forward.
  const MoEStats& stats() const { return stats_; }
  /// Routing of the most recent forward (for analysis and for model-level balancing).
  const RoutingResult& last_routing() const { return routing_; }

  /// The differentiable statistics of the most recent forward: {prob_mean, balance_loss,
  /// z_loss}. Activation checkpointing (moe/checkpoint.h) replaces them with its own outputs.
  std::vector<torch::Tensor> differentiable_stats() const;
  void set_differentiable_stats(const std::vector<torch::Tensor>& stats);

  /// Called right after routing in training forwards that are not recomputations, so that
  /// model-level balancing (gbmoe::Balancer) can start reducing counts while experts compute.
  using RoutingHook = std::function<void(const RoutingResult&)>;
  void set_routing_hook(RoutingHook hook) { routing_hook_ = std::move(hook); }

  /// Replaces the token dispatcher (expert parallelism swaps in an all-to-all one).
  void set_dispatcher(std::shared_ptr<TokenDispatcher> dispatcher);
  TokenDispatcher& dispatcher() { return *dispatcher_; }

  MoELayerOptions options;
  Router router{nullptr};
  GroupedExperts experts{nullptr};
  SwiGLU shared{nullptr};  // null when options.shared_experts() == 0

 private:
  std::shared_ptr<TokenDispatcher> dispatcher_;
  RoutingHook routing_hook_;
  MoEStats stats_;
  RoutingResult routing_;
};
TORCH_MODULE(MoELayer);

}  // namespace gbmoe
