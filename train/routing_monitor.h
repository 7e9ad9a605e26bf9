// What gbmoe-train shows of routing while it trains: per-layer balance metrics of each step
// (losses/routing_metrics.h) for metrics.jsonl, the TensorBoard event file (train/tensorboard.h),
// routing traces (train/routing_trace.h), the opt-in per-expert loads and the replay of a
// trace's routing. The trainer calls it at four points of a step; everything else lives here.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "losses/routing_metrics.h"
#include "moe/moe_layer.h"
#include "moe/objective.h"
#include "parallel/communicator.h"
#include "train/config.h"
#include "train/routing_trace.h"
#include "train/sampler.h"
#include "train/tensorboard.h"

namespace gbmoe {

/// Example (the trainer's step):
///   RoutingMonitor monitor(config, moe_layers, train_data->domain_names(), world.rank(), resumed);
///   for (m in micro-batches) {
///     monitor.before_forward(step, m, batch);
///     model->forward(..., &routing);
///     monitor.after_forward(step, m, batch, routings_of(routing));
///     ...
///   }
///   std::string extra = monitor.end_step(world, step, global_counts, micro_maxvio);
///   line += extra;  ...  monitor.log_line(line);  // metrics.jsonl line -> TensorBoard
class RoutingMonitor {
 public:
  /// Opens RUN/tb/ (train.tensorboard, rank 0), RUN/traces/rank<r>.gbrt
  /// (train.routing_trace_every > 0; appended to when resumed) and RUN/expert_loads.jsonl
  /// (train.expert_loads, rank 0; truncated unless resumed), and reads this rank's records of
  /// train.routing_replay when set (throws naming the setting when its experts, top-k or
  /// layers differ from the model's).
  RoutingMonitor(const Config& config, std::vector<MoELayer> layers,
                 std::vector<std::string> domains, int rank, bool resumed);

  /// Before the forward of training micro-batch `micro_batch` of 1-based step `step`: with
  /// train.routing_replay, makes every router replay the trace's choices for this forward
  /// (padding tokens, which no expert sees, get experts 0..K-1). Throws naming the setting when
  /// the trace lacks the forward or its tokens or domains differ from the batch's.
  void before_forward(int64_t step, int64_t micro_batch, const Batch& batch);

  /// After the forward of training micro-batch `micro_batch` of 1-based step `step`, with the
  /// forward's routing of each MoE layer, (L) in layer order (from its RoutingContext): traces
  /// the routing on trace steps.
  void after_forward(int64_t step, int64_t micro_batch, const Batch& batch,
                     const std::vector<RoutingResult>& routings);

  /// After the step: global_counts (L) x (E,) selections of all ranks and micro-batches,
  /// micro_max_violation (L) the micro-batch MaxVio means, layer_stats (L) this rank's figures
  /// from TrainingObjective::end_step(). Sums the routing entropy and top-k score sums over
  /// ranks (one all-reduce of 3 L doubles, collective), writes the per-expert loads and
  /// returns the metrics as JSON members to append to the step's metrics line (starting with
  /// ','; see routing_metrics_json). Ends the step's routing replay, so that evaluation
  /// forwards route by themselves.
  std::string end_step(Communicator& world, int64_t step,
                       const std::vector<torch::Tensor>& global_counts,
                       const std::vector<double>& micro_max_violation,
                       const std::vector<LayerStepStats>& layer_stats);

  /// The last end_step()'s per-layer metrics.
  const std::vector<LayerRoutingMetrics>& metrics() const { return metrics_; }

  /// Writes the numbers of a metrics.jsonl line to TensorBoard (rank 0, when enabled).
  void log_line(const std::string& json_line);

  /// The TensorBoard event file, "" when not written by this rank.
  std::string tensorboard_path() const { return tb_ ? tb_->path() : ""; }

 private:
  std::vector<MoELayer> layers_;
  int rank_ = 0;
  int64_t trace_every_ = 0;
  std::unique_ptr<TensorBoardWriter> tb_;
  std::unique_ptr<RoutingTraceWriter> trace_;
  std::string loads_path_;
  std::string replay_path_;
  // train.routing_replay: this rank's records by (step, micro-batch, layer).
  std::map<std::tuple<int64_t, int64_t, int64_t>, RoutingTraceRecord> replay_;
  std::vector<LayerRoutingMetrics> metrics_;
};

}  // namespace gbmoe
