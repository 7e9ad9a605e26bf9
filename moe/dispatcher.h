// Token dispatchers: group routed tokens by expert for the grouped experts, and combine the
// weighted expert outputs back into token order. Letters: T tokens, D dim, E experts, K top-k,
// N routed (token, expert) rows kept after capacity dropping.
#pragma once

#include <torch/torch.h>

#include <string>

#include "moe/router.h"

namespace gbmoe {

/// Which (token, expert) assignments an over-full expert keeps when capacity_factor > 0.
/// Position: the earliest tokens in the batch (GShard/Switch). Score: the assignments with the
/// highest routing weight, ties broken by position. Dropped assignments contribute nothing to
/// the output (the residual stream carries the token); they still count in the balancing
/// statistics, which describe routing decisions.
enum class DropPolicy { Position, Score };

std::string to_string(DropPolicy p);
DropPolicy drop_policy_from_string(const std::string& name);

/// Example:
///   DispatcherOptions().capacity_factor(1.25).drop_policy(DropPolicy::Score)
struct DispatcherOptions {
  /// 0 = dropless. Otherwise each expert keeps at most
  /// ceil(capacity_factor * num_valid_tokens * K / E) assignments.
  TORCH_ARG(double, capacity_factor) = 0.0;
  TORCH_ARG(DropPolicy, drop_policy) = DropPolicy::Position;

 public:
  void validate() const;
};

/// Expert capacity for n valid tokens, or -1 when dropless.
int64_t expert_capacity(const DispatcherOptions& options, int64_t num_valid, int64_t top_k,
                        int64_t num_experts);

/// Tokens grouped by expert, and what combine needs to put them back.
struct Dispatched {
  torch::Tensor tokens;       // (N, D) rows grouped by (local) expert, expert-major
  torch::Tensor group_sizes;  // (E_local,) int64 on CPU: rows of each local expert
  torch::Tensor token_index;  // (N_sent,) int64 source token of each row this process sent
  torch::Tensor weights;      // (N_sent,) combine weight of each sent row (differentiable);
                              // the sent rows are `tokens` for the local dispatcher. MoELayer
                              // may replace it between dispatch and combine (the objective's
                              // balance tie): combine must weight with this field.
  int64_t num_tokens = 0;     // T of the input
  int64_t num_dropped = 0;    // assignments dropped by capacity
  /// Backend state that combine needs (e.g. the all-to-all split sizes); opaque to callers.
  std::shared_ptr<void> state;
};

/// Interface shared by the local dispatcher and the expert-parallel all-to-all one.
/// A dispatcher holds no parameters, so it is a plain class.
class TokenDispatcher {
 public:
  virtual ~TokenDispatcher() = default;
  /// x: (T, D). Returns the rows for the experts this process holds, grouped by expert.
  virtual Dispatched dispatch(const torch::Tensor& x, const RoutingResult& routing) = 0;
  /// expert_out: (N, D) outputs in the order of dispatch. Returns (T, D): for each token the
  /// weighted sum of its kept experts' outputs (zero for masked or fully dropped tokens).
  virtual torch::Tensor combine(const torch::Tensor& expert_out, const Dispatched& dispatched) = 0;
  /// Number of experts whose rows this dispatcher delivers (E on one process).
  virtual int64_t num_local_experts() const = 0;
};

/// The (token, expert) assignments kept, sorted by expert: what every dispatcher starts from.
struct SortedAssignments {
  torch::Tensor token_index;  // (N,) int64
  torch::Tensor expert_id;    // (N,) int64, non-decreasing
  torch::Tensor weights;      // (N,) combine weights, differentiable
  torch::Tensor counts;       // (E,) int64 kept rows per expert (same device as the ids)
  torch::Tensor assignment;   // (N,) int64 t * K + k: the routing slot each row comes from
  int64_t num_dropped = 0;
};

/// Sorts the valid tokens' assignments by expert (stable: token order inside an expert) and
/// applies the capacity policy.
SortedAssignments sort_assignments(const RoutingResult& routing, int64_t num_experts,
                                   const DispatcherOptions& options);

/// out[n] = x[token_index[n]]: the plain LibTorch permutation (reference of the fused kernel).
torch::Tensor permute_reference(const torch::Tensor& x_TD, const torch::Tensor& token_index_N);

/// y[t] = sum of weights[n] * expert_out[n] over the rows n of token t, (num_tokens, D), with
/// plain autograd ops (multiply, index_add): the reference of the fused CPU path and of the
/// CUDA kernel.
torch::Tensor unpermute_reference(const torch::Tensor& expert_out_ND,
                                  const torch::Tensor& weights_N,
                                  const torch::Tensor& token_index_N, int64_t num_tokens);

/// The same weighted sum, as every dispatcher's combine ends with it: fp32 and fp64 CPU
/// tensors take a fused path (one pass forward, one backward); others compute
/// unpermute_reference.
torch::Tensor combine_rows(const torch::Tensor& rows_ND, const torch::Tensor& token_index,
                           const torch::Tensor& weights, int64_t num_tokens);

/// Dispatcher for experts that all live in this process.
///
/// Example:
///   LocalDispatcher dispatcher(8, DispatcherOptions());
///   auto d = dispatcher.dispatch(x_TD, routing);
///   auto y_TD = dispatcher.combine(experts->forward(d.tokens, d.group_sizes), d);
class LocalDispatcher : public TokenDispatcher {
 public:
  LocalDispatcher(int64_t num_experts, DispatcherOptions options);
  Dispatched dispatch(const torch::Tensor& x, const RoutingResult& routing) override;
  torch::Tensor combine(const torch::Tensor& expert_out, const Dispatched& dispatched) override;
  int64_t num_local_experts() const override { return num_experts_; }

  const DispatcherOptions& options() const { return options_; }

 private:
  int64_t num_experts_;
  DispatcherOptions options_;
};

}  // namespace gbmoe
