// RoutingContext: what the MoE layers of one forward pass hand to whoever forms the training
// objective (gbmoe::TrainingObjective) or analyses routing. Statistics travel as values: a layer
// appends one record per forward to the context it is given and keeps nothing for others.
// Letters: T tokens, E experts, K top-k.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <vector>

#include "moe/router.h"

namespace gbmoe {

/// One MoE layer's routing in one forward pass.
struct RoutingRecord {
  RoutingResult routing;  // logits, scores (differentiable), ids, weights, valid, counts
  std::vector<int64_t>
      lead_shape;           // the input's leading shape: (B, S) for (B, S, D), (T) for (T, D)
  int64_t num_experts = 0;  // E
  int64_t num_dropped = 0;  // assignments dropped by capacity
};

/// The routing records of one forward pass, in the order the MoE layers ran. Pass a pointer to
/// the model's or layer's forward; without one the layers record nothing (inference, and eval
/// forwards that need no statistics).
///
/// Example:
///   RoutingContext routing;
///   auto y = moe->forward(x_BSD, mask_BS, &routing);
///   routing.layers()[0].routing.counts;   // (E,) selections of the valid tokens
class RoutingContext {
 public:
  /// Called after each record with the context; TrainingObjective uses it to start the count
  /// reduction once every MoE layer of the micro-batch has routed.
  using OnRecord = std::function<void(RoutingContext&)>;
  /// Called with a MoE layer's combine weights (the routing weight of each row it dispatched,
  /// differentiable), its record and the record's index (its MoE layer's place in the forward);
  /// the layer combines its experts' outputs with what it returns. TrainingObjective ties the
  /// layer's global-batch balance gradient to them, so that the backward pass waits for the
  /// count reduction only once it has run the layer's experts backward and reaches its router.
  using OnWeights =
      std::function<torch::Tensor(const RoutingRecord&, int64_t index, const torch::Tensor&)>;

  RoutingContext() = default;
  explicit RoutingContext(OnRecord on_record, OnWeights on_weights = {})
      : on_record_(std::move(on_record)), on_weights_(std::move(on_weights)) {}

  /// Appends a layer's routing (called by MoELayer::forward right after dispatch).
  void record(RoutingRecord layer) {
    layers_.push_back(std::move(layer));
    if (on_record_) on_record_(*this);
  }

  /// The combine weights (N,) the layer combines with (called by MoELayer::forward after its
  /// record, before its experts run): weights_N itself unless the context has an OnWeights.
  torch::Tensor combine_weights(const torch::Tensor& weights_N) {
    TORCH_CHECK(!layers_.empty(), "RoutingContext::combine_weights() before any record");
    return on_weights_ ? on_weights_(layers_.back(), size() - 1, weights_N) : weights_N;
  }
  const OnWeights& on_weights() const { return on_weights_; }

  const std::vector<RoutingRecord>& layers() const { return layers_; }
  std::vector<RoutingRecord>& layers() { return layers_; }
  int64_t size() const { return static_cast<int64_t>(layers_.size()); }

 private:
  std::vector<RoutingRecord> layers_;
  OnRecord on_record_;
  OnWeights on_weights_;
};

/// The routing results of a context's records, in order.
inline std::vector<RoutingResult> routings_of(const RoutingContext& routing) {
  std::vector<RoutingResult> out;
  for (const auto& r : routing.layers()) out.push_back(r.routing);
  return out;
}

}  // namespace gbmoe
