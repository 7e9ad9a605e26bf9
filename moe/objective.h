// TrainingObjective: what a MoE model trains, in one place: the task loss and the balancing
// and z-loss terms of every scope and method, all weighted by the same
// valid tokens, plus the running count buffer of the global-batch LBL, its one collective per
// micro-batch and the loss-free bias updates. See shared spec global-lbl.md.
// Letters: E experts, K top-k, L MoE layers, M micro-batches, R data-parallel ranks.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <vector>

#include "losses/balance.h"
#include "moe/balance_subset.h"
#include "moe/moe_layer.h"
#include "moe/quantile_balance.h"
#include "moe/routing_context.h"

namespace gbmoe {

/// Sums a buffer over a group of ranks (the data-parallel world, or one balance group).
/// parallel/ implements it over a Communicator; the core library only needs this interface.
class CountReducer {
 public:
  virtual ~CountReducer() = default;
  /// Number of ranks in the group.
  virtual int64_t size() const = 0;
  /// This rank's index in the group, in [0, size()).
  virtual int64_t rank() const = 0;
  /// Starts an in-place sum of buffer over the group; the returned function waits for it.
  virtual std::function<void()> sum_async(torch::Tensor& buffer) = 0;
};

/// Every rank's `local` (the same shape on every rank) as rows (R, ...), the same on every rank:
/// a sum over the group of buffers in which each rank fills only its own row, which is exact.
///
/// Example:
///   auto per_rank = gather_rows(*reducers.data_parallel, torch::tensor({my_value}));  // (R, 1)
torch::Tensor gather_rows(CountReducer& reducer, const torch::Tensor& local);

/// The reducers an objective needs. data_parallel: every rank holding distinct data, over which
/// gradients are averaged (the valid-token count of the step and loss-free updates are summed
/// there). counts: the ranks that share balance counts (data_parallel for scope global, the
/// balance group for group, none for micro and sequence). Both null on one process.
struct ObjectiveReducers {
  std::shared_ptr<CountReducer> data_parallel;
  std::shared_ptr<CountReducer> counts;
};

/// Balance figures of one MoE layer for one optimizer step (this rank's view).
struct LayerStepStats {
  torch::Tensor counts;            // (E,) fp64 selections of the balance scope's tokens (group,
                                   // or global batch; this rank's own for micro and sequence)
  torch::Tensor local_counts;      // (E,) fp64 this rank's selections
  double tokens = 0;               // tokens counted in counts
  double local_tokens = 0;         // this rank's valid tokens in local_counts
  double max_violation = 0;        // MaxVio of counts
  double micro_max_violation = 0;  // MaxVio of this rank's micro-batches, averaged
  double routing_entropy = 0;      // mean over this rank's valid tokens of -sum_i s_i log s_i
  double topk_score_sum = 0;       // mean over this rank's valid tokens of the selected scores
  int64_t micro_batches = 0;
};

/// This rank's share of the step's objective (values, no gradient): averaged over the
/// data-parallel ranks they give the objective of the global batch.
struct StepValues {
  double task = 0;     // task loss: mean over the global batch's valid tokens
  double balance = 0;  // balancing terms (all layers)
  double z_loss = 0;   // router z-loss (all layers)
};

/// Forms the objective of a step of M micro-batches on R data-parallel ranks so that averaging
/// gradients over ranks gives exactly the gradient of what one process would train on the
/// concatenated global batch G of N valid tokens:
///   task:     (1/N) sum_{t in G} loss_t
///   z-loss:   beta (1/N) sum_{t in G} logsumexp(z_t)^2
///   balance:  sum over the scope's balance units u of (n_u / N) * LBL_u, where the units are
///             the global batch (global: one unit, LBL(f(G), P(G))), each group of group_size
///             ranks (group), each micro-batch of each rank (micro), each sequence (sequence);
///             micro_alpha adds the micro units' LBL to a global or group loss.
/// Rank r's micro-batch m (n_rm tokens) backpropagates R/N times its token-summed terms; for
/// global and group, alpha E sum_i f_i P_i(B_rm) n_rm R / N, with f from the running buffer
/// (counts of the group's ranks and of micro-batches 1..m, exact at m = M).
/// With loss-free balancing there is no LBL; end_step() moves every layer's selection bias by
/// bias_update_rate times the mean over the step's balance units of sign(mean_j c_j - c_i),
/// summed exactly over the data-parallel ranks, so every replica keeps the same bias.
/// With quantile balancing there is no LBL either; end_step() sets every layer's selection bias
/// from the thresholds of the step's balance units (QuantileBalance, losses/quantile.h).
/// With shuffle (scope global), f and P are those of the step's random subset S of the global
/// batch (BalanceSubset): LBL(f(S), P(S)).
///
/// Example:
///   TrainingObjective objective(model->moe_layers(), options, reducers);  // {} on one process
///   for (step...) {
///     objective.begin_step(M, local_valid_tokens_of_the_step);
///     for (m...) {
///       auto routing = objective.context();
///       auto logits = model->forward(x, mask, &routing);
///       objective.micro_batch_loss(routing, token_loss_sum(logits)).backward();
///     }
///     average_gradients(); optimizer.step();
///     objective.end_step();
///   }
class TrainingObjective {
 public:
  TrainingObjective(std::vector<MoELayer> layers, BalanceOptions options,
                    ObjectiveReducers reducers = {});
  TrainingObjective(const TrainingObjective&) = delete;
  TrainingObjective& operator=(const TrainingObjective&) = delete;

  /// Opens an optimizer step of num_micro_batches; local_tokens: this rank's valid tokens over
  /// the whole step (the trainer knows them once it has drawn the step's micro-batches). Their
  /// data-parallel sum N rides along with the first count reduction for scope global.
  void begin_step(int64_t num_micro_batches, double local_tokens);

  /// A context for the next training forward: once every MoE layer has recorded its routing, the
  /// count reduction starts (scopes global and group) while the rest of the forward runs.
  /// The context must not outlive the objective.
  RoutingContext context();

  /// The term to backpropagate for the micro-batch whose forward recorded `routing`:
  /// R/N * (task_loss_sum + z-loss and balancing terms summed over its tokens).
  /// task_loss_sum: the task loss summed over this rank's valid tokens of the micro-batch.
  torch::Tensor micro_batch_loss(RoutingContext& routing, const torch::Tensor& task_loss_sum);

  /// Index of the next optimizer step (0 at construction; end_step() advances it): the Shuffle
  /// subset of a step depends on it, so a resumed run sets it to the step it resumes at.
  void set_step(int64_t step) { step_ = step; }
  int64_t step() const { return step_; }

  /// This rank's share of the step's objective so far (one device-to-host copy).
  StepValues step_values() const;

  /// Closes the step after the optimizer step: applies loss-free bias updates, resets the running
  /// buffer, and returns the step's per-layer figures.
  std::vector<LayerStepStats> end_step();

  const BalanceOptions& options() const { return options_; }
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  /// Running buffer of layer l: the scope's counts (E,) fp64 and tokens since the last end_step().
  torch::Tensor running_counts(int64_t layer) const;
  double running_tokens(int64_t layer) const;
  /// Valid tokens N of the whole step over the data-parallel ranks (known after the first
  /// micro-batch_loss() of the step).
  double step_tokens() const;

 private:
  void on_record(RoutingContext& routing);
  void wait_for_reductions();
  void stage_subset(const RoutingContext& routing);
  torch::Tensor layer_terms(int64_t l, const RoutingRecord& r, const torch::Tensor& weight);
  void accumulate_bias_votes(int64_t l, const RoutingRecord& r);
  void update_expert_bias();
  void update_quantile_bias();
  int64_t experts(int64_t l) const { return offsets_[l + 1] - offsets_[l] - 1; }

  std::vector<MoELayer> layers_;
  BalanceOptions options_;
  ObjectiveReducers reducers_;
  int64_t data_parallel_size_ = 1;
  std::vector<int64_t> offsets_;  // layer l's counts at [offsets_[l], offsets_[l] + E_l), tokens
  torch::Tensor staged_;          // (sum_l (E_l + 1) + 1,) fp64: this micro-batch, reduced in
                                  // place; the last slot carries the step tokens (global)
  torch::Tensor local_staged_;    // the same, before reduction (this rank only)
  torch::Tensor running_;         // the scope's counts of the step so far
  torch::Tensor local_running_;   // this rank's counts of the step so far
  torch::Tensor step_tokens_;     // () fp64 N, once known
  torch::Tensor token_buffer_;    // (1,) fp64 the step tokens, reduced on their own
  std::function<void()> counts_wait_, tokens_wait_;
  bool staged_pending_ = false;
  double local_step_tokens_ = 0;
  int64_t micro_batches_ = 0;
  int64_t step_micro_batches_ = 0;
  // Per layer, summed over the step: bias votes sum_units sign(mean - c) (E,) and unit counts,
  // this rank's entropy / top-k score sums and micro-batch MaxVio, as device tensors.
  torch::Tensor votes_;  // (sum_l (E_l + 1),) fp64
  std::vector<torch::Tensor> entropy_sum_, topk_sum_, micro_max_violation_sum_;
  torch::Tensor task_sum_, balance_sum_, z_sum_;  // () fp64 weighted values of the step
  std::unique_ptr<QuantileBalance> quantile_;     // method quantile only
  std::unique_ptr<BalanceSubset> subset_;         // shuffle only
  int64_t step_ = 0;
};

}  // namespace gbmoe
