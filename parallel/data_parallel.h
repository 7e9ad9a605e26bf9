// Data parallelism: parameters broadcast at start, gradients averaged in fused buckets, expert
// shards averaged over their own group.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "parallel/communicator.h"

namespace gbmoe {

/// True for the names of parameters that belong to an expert-parallel shard.
using ExpertParameterRule = std::function<bool(const std::string& name)>;

/// The rule of a model: true for the parameters (and their names as named_parameters() gives
/// them) of the GroupedExperts modules that apply_expert_parallel sharded (shards > 1), by
/// module, not by name: a module of the user's called "experts" stays dense.
ExpertParameterRule expert_parameter_rule(const torch::nn::Module& model);

/// Example:
///   DataParallelOptions().bucket_bytes(32 << 20)
struct DataParallelOptions {
  /// Bytes per gradient bucket: each bucket is one all-reduce. A parameter larger than this
  /// gets a bucket of its own.
  TORCH_ARG(int64_t, bucket_bytes) = int64_t{16} << 20;
  /// Which parameters are expert-parallel shards (used only with an expert-data-parallel group);
  /// unset = expert_parameter_rule(module).
  TORCH_ARG(ExpertParameterRule, expert_rule) = nullptr;

 public:
  void validate() const;
};

/// One fused all-reduce: parameters of one group, dtype and device, flattened in a buffer.
struct GradientBucket {
  bool expert = false;                // averaged over the expert-data-parallel group
  std::vector<torch::Tensor> params;  // in bucket order
  std::vector<std::string> names;
  // (sum of numels,) the gradients' staging: broadcast_parameters and the start/finish pair
  // flatten into it, and so does Communicator::sum_divided's default; unused where
  // average_gradients goes straight through node shared memory.
  torch::Tensor flat;
};

/// Keeps the replicas of a module identical across the data-parallel ranks.
///
/// The loss of a step is the mean over ranks of each rank's loss, so the gradient is the mean
/// of the ranks' gradients: average_gradients() computes it with a few large all-reduces,
/// parameters grouped into buckets (of their group, dtype and device) in reverse registration
/// order, roughly the order backward produces them. A parameter without a gradient contributes
/// zeros, so every rank makes the same calls; afterwards every trainable parameter has the
/// averaged gradient.
///
/// Expert-parallel shards: the expert all-to-all already sums, into each shard, the gradient
/// contributions of every rank of its expert-parallel group. Their gradient is therefore
/// summed over the expert-data-parallel group (the ranks holding the same shard) and divided
/// by the data-parallel size, which gives the same mean-over-ranks gradient as for dense
/// parameters. Without an expert-data-parallel group every parameter is dense.
///
/// Gradient accumulation: run forward and backward on every micro-batch (scaling each loss by
/// 1 / micro-batches), then call average_gradients() once, after the last micro-batch and
/// before optimizer.step(). Synchronizing once per optimizer step gives the same parameters as
/// one process on the concatenated batch.
///
/// Example:
///   DataParallel dp(model.ptr(), groups.data_parallel, groups.expert_data_parallel);
///   dp.broadcast_parameters();
///   for (auto& batch : loader) {
///     optimizer.zero_grad();
///     for (auto& micro : split(batch, M)) (loss(model, micro) / M).backward();
///     dp.average_gradients();
///     optimizer.step();
///   }
class DataParallel {
 public:
  DataParallel(std::shared_ptr<torch::nn::Module> module,
               std::shared_ptr<Communicator> data_parallel,
               std::shared_ptr<Communicator> expert_data_parallel = nullptr,
               DataParallelOptions options = DataParallelOptions());

  /// Copies rank 0's parameters and buffers to every rank: dense ones from rank 0 of the
  /// data-parallel group, expert shards from rank 0 of their expert-data-parallel group.
  void broadcast_parameters();

  /// Averages every trainable parameter's gradient over the ranks, bucket by bucket, with
  /// blocking collectives (the fastest path when there is nothing to overlap).
  void average_gradients();
  /// Flattens the gradients into the buckets and launches their all-reduces without waiting,
  /// so other work can overlap the communication.
  void start_gradient_averaging();
  /// Waits for the bucket all-reduces and writes the averaged gradients back.
  void finish_gradient_averaging();

  const std::vector<GradientBucket>& buckets() const { return buckets_; }
  const DataParallelOptions& options() const { return options_; }
  /// Bytes all-reduced by one average_gradients().
  int64_t gradient_bytes() const;

 private:
  Communicator& comm_of(const GradientBucket& bucket) const;

  std::shared_ptr<torch::nn::Module> module_;
  std::shared_ptr<Communicator> data_parallel_;
  std::shared_ptr<Communicator> expert_data_parallel_;
  DataParallelOptions options_;
  std::vector<GradientBucket> buckets_;
  std::vector<std::shared_ptr<Work>> pending_;  // one per bucket between start and finish
};

}  // namespace gbmoe
