// Expert parallelism: the all-to-all token dispatcher and apply_expert_parallel, which turns a
// model built as on one device into this rank's expert shard. Letters: T tokens, D dim, E
// experts, P expert-parallel size, L = E / P local experts, N rows sent, R rows received.
#pragma once

#include <torch/torch.h>

#include <memory>
#include <vector>

#include "moe/dispatcher.h"
#include "parallel/communicator.h"
#include "parallel/data_parallel.h"
#include "parallel/process_groups.h"

namespace gbmoe {

/// The contiguous block of experts rank `rank` of an expert-parallel group of `size` ranks
/// holds: experts [first, first + count). Checks that size divides num_experts, naming both.
struct ExpertShard {
  int64_t first = 0;
  int64_t count = 0;
};
ExpertShard expert_shard(int64_t num_experts, int64_t size, int64_t rank);

/// Dispatcher for experts spread over an expert-parallel group: rank r holds experts
/// [r * L, (r + 1) * L). dispatch sorts the assignments of the full routing (capacity decided
/// exactly as by LocalDispatcher), exchanges the per-expert row counts, sends each row to the
/// rank holding its expert with one all-to-all, and regroups the arrivals by local expert.
/// combine undoes this: the outputs go home by the reverse all-to-all and are summed per token
/// with the routing weights. Gradients flow back through both exchanges, so every rank of the
/// group must run forward and backward together. Tensors go through the Communicator: MPI for
/// CPU tensors, NCCL for CUDA ones.
///
/// Example:
///   AllToAllDispatcher dispatcher(groups.expert_parallel, 8, DispatcherOptions());
///   auto d = dispatcher.dispatch(x_TD, routing);      // rows of this rank's experts
///   auto y_TD = dispatcher.combine(experts->forward(d.tokens, d.group_sizes), d);
class AllToAllDispatcher : public TokenDispatcher {
 public:
  AllToAllDispatcher(std::shared_ptr<Communicator> expert_parallel, int64_t num_experts,
                     DispatcherOptions options);
  /// Returns the received rows grouped by local expert; token_index and weights describe the
  /// rows this rank sent (what combine needs to sum the returned outputs).
  Dispatched dispatch(const torch::Tensor& x, const RoutingResult& routing) override;
  torch::Tensor combine(const torch::Tensor& expert_out, const Dispatched& dispatched) override;
  int64_t num_local_experts() const override { return shard_.count; }

  const DispatcherOptions& options() const { return options_; }

 private:
  std::shared_ptr<Communicator> comm_;
  int64_t num_experts_;
  ExpertShard shard_;
  DispatcherOptions options_;
};

/// Shards every MoE layer of `model` over groups.expert_parallel: each keeps only its local
/// experts' weights (GroupedExperts::keep_experts) and gets an AllToAllDispatcher. The model
/// must be built identically on every rank, as on one device; the routers stay whole, so
/// routing and the balance statistics do not change. Returns the number of layers sharded.
/// Pair it with DataParallel(model, groups.data_parallel, groups.expert_data_parallel) so that
/// expert gradients are averaged over the ranks holding the same shard.
///
/// Example:
///   LanguageModel model(options);              // all experts, as on one device
///   apply_expert_parallel(*model, groups);     // now E / P experts per layer
///   DataParallel dp(model.ptr(), groups.data_parallel, groups.expert_data_parallel);
int64_t apply_expert_parallel(torch::nn::Module& model, const ProcessGroups& groups);

/// torch::nn::utils::clip_grad_norm_ for a model whose expert shards are spread over the
/// expert-parallel group: the norm is that of the whole model's gradient (each shard counted
/// once), so every rank scales by the same factor. Collective over expert_parallel. Returns the
/// norm before clipping.
///
/// Example:
///   dp.average_gradients();
///   const double norm = clip_grad_norm(*model, 1.0, *groups.expert_parallel);
/// rule: which parameters are shards; unset = expert_parameter_rule(model).
double clip_grad_norm(torch::nn::Module& model, double max_norm, Communicator& expert_parallel,
                      const ExpertParameterRule& rule = nullptr);

}  // namespace gbmoe
