// QuantileBalance: quantile balancing (balance method quantile) inside a TrainingObjective: what
// each training micro-batch leaves for the step's thresholds, and the selection bias every router
// gets after the optimizer step. The thresholds and their definition: losses/quantile.h.
// Letters: T tokens, E experts, K top-k, L MoE layers, R data-parallel ranks.
#pragma once

#include <torch/torch.h>

#include <vector>

#include "losses/balance.h"
#include "moe/moe_layer.h"
#include "moe/routing_context.h"

namespace gbmoe {

class CountReducer;

/// Quantile balancing over the balance units of a scope, the units of loss-free balancing:
///   global:   the global batch G (all ranks, all micro-batches of the step); its thresholds
///   beta(G)
///             are exact over the ranks (largest_over_ranks with the data-parallel sums), equal to
///             sorting G on one process;
///   group:    each group's batch, exact over the group's ranks, then averaged over the groups;
///   micro:    each micro-batch of each rank; sequence: each sequence with valid tokens; averaged
///             over all units of all ranks.
/// After the step each router's bias becomes b = -(beta - mean_j beta_j) of the (averaged)
/// thresholds, the same on every rank: averages are taken over an exact gather of every rank's
/// sums, in rank order. Residuals use the bias the step was routed with, so a resumed run
/// continues from the checkpointed expert_bias. A layer whose thresholds are not finite (a
/// non-finite forward on some rank) keeps its bias.
///
/// Example:
///   QuantileBalance quantile(model->moe_layers(), BalanceScope::Global);
///   quantile.add(l, routing.layers()[l]);   // each layer of each training micro-batch
///   quantile.update_biases(unit_tokens, counts_reducer, data_parallel_reducer);  // after step
///   quantile.reset();
class QuantileBalance {
 public:
  /// Throws unless every layer has top_k < num_experts.
  QuantileBalance(std::vector<MoELayer> layers, BalanceScope scope);

  /// Records layer l's routing in one training micro-batch: its residuals against the router's
  /// current bias, kept for the step (global, group) or reduced to its units' thresholds now
  /// (micro, sequence; sequence needs the input as (B, S, D)).
  void add(int64_t l, const RoutingRecord& record);

  /// Sets every router's expert_bias from the step's thresholds. unit_tokens: per layer, the valid
  /// tokens of this rank's unit (global batch or group, 0-dim; unused for micro and sequence).
  /// unit_ranks: sums over the ranks of the unit (the count reducer of global and group);
  /// data_parallel: sums over all data-parallel ranks. Both null on one process.
  void update_biases(const std::vector<torch::Tensor>& unit_tokens, CountReducer* unit_ranks,
                     CountReducer* data_parallel);

  /// Forgets the step's records.
  void reset();

 private:
  // Per layer, this rank's sums over its units of beta (E,) and the unit count, packed like the
  // objective's buffers: (sum_l (E_l + 1),) fp64.
  torch::Tensor unit_sums(const std::vector<torch::Tensor>& unit_tokens, CountReducer* unit_ranks);

  std::vector<MoELayer> layers_;
  BalanceScope scope_;
  std::vector<int64_t> offsets_;                  // layer l at [offsets_[l], offsets_[l] + E_l]
  std::vector<std::vector<torch::Tensor>> rows_;  // global, group: per layer, (n_m, E) residuals
  std::vector<torch::Tensor> threshold_sum_;      // micro, sequence: per layer (E,) sum of beta_u
  std::vector<torch::Tensor> units_;              // micro, sequence: per layer () units counted
};

}  // namespace gbmoe
