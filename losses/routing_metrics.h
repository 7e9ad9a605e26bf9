// Bounded per-layer routing metrics: a fixed number of series per MoE layer (and min / median /
// max across layers) however many experts there are. Pure functions of values the step already
// has. Letters: T tokens, E experts, K top-k, L MoE layers.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

namespace gbmoe {

/// What one MoE layer contributes to the step's routing metrics.
struct LayerRoutingInput {
  torch::Tensor counts;            // (E,) fp64 selections of the global batch (all ranks and
                                   // micro-batches of the step)
  double micro_max_violation = 0;  // MaxVio of each micro-batch's counts, mean over the step
  double mean_entropy = 0;         // mean over valid tokens of -sum_i s_ti ln s_ti (nats)
  double mean_topk_score_sum = 0;  // mean over valid tokens of sum_k s_t,S_tk
};

/// The balance metrics of one layer at one step.
struct LayerRoutingMetrics {
  double max_violation_global = 0;  // (max_i c_i - mean c) / mean c of the global counts
  double max_violation_micro = 0;   // the input's micro-batch mean
  double load_cv = 0;               // std(c) / mean(c), population std; 0 when no token
  double dead_experts = 0;          // experts with c_i == 0
  double entropy = 0;               // mean routing entropy (nats)
  double topk_score_sum = 0;        // mean top-k score sum
};

/// The names of the metrics, in the order of LayerRoutingMetrics and of metric_values():
/// maxvio_global, maxvio_micro, load_cv, dead_experts, routing_entropy, topk_score_sum.
const std::vector<std::string>& routing_metric_names();
/// A layer's metrics in the order of routing_metric_names().
std::vector<double> metric_values(const LayerRoutingMetrics& m);

/// The metrics of one layer from its inputs. Throws when counts is not a 1-D tensor.
///
/// Example:
///   auto m = layer_routing_metrics({counts_E, micro_mv, entropy, topk_sum});
LayerRoutingMetrics layer_routing_metrics(const LayerRoutingInput& input);

/// Min, median (mean of the two middle values for an even count) and max of values; zeros when
/// empty.
struct Spread {
  double min = 0, median = 0, max = 0;
};
Spread spread(std::vector<double> values);

/// Per metric (routing_metric_names() order), its spread across layers.
std::vector<Spread> across_layers(const std::vector<LayerRoutingMetrics>& layers);

/// Per-token routing entropy summed over valid tokens: sum_t -sum_i s_ti ln s_ti (0 ln 0 = 0).
/// scores: (T, E); valid: (T,) bool or undefined (all valid). Divide by the valid tokens for
/// LayerRoutingInput::mean_entropy.
double routing_entropy_sum(const torch::Tensor& scores_TE, const torch::Tensor& valid_T = {});

/// sum over valid tokens of sum_k s_t,S_tk. expert_ids: (T, K).
double routing_topk_score_sum(const torch::Tensor& scores_TE, const torch::Tensor& expert_ids_TK,
                              const torch::Tensor& valid_T = {});

/// The metrics as JSON members (no braces): "load_cv":[..per layer..],"dead_experts":[..],
/// "routing_entropy":[..],"topk_score_sum":[..],"across_layers":{"maxvio_global":{"min":..,
/// "median":..,"max":..},...}. maxvio_global and maxvio_micro per layer are not repeated
/// (metrics.jsonl has them already).
std::string routing_metrics_json(const std::vector<LayerRoutingMetrics>& layers);

}  // namespace gbmoe
