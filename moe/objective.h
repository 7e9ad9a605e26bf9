// TrainingObjective: what a MoE model trains, in one place: the task loss and the balancing
// and z-loss terms of every scope and method, all weighted by the same
// valid tokens, plus the running count buffer of the global-batch LBL, its one collective per
// micro-batch and the loss-free bias updates. See shared spec global-lbl.md.
// Letters: E experts, K top-k, L MoE layers, M micro-batches, R data-parallel ranks.
#pragma once

#include <torch/torch.h>

#include <deque>
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
/// No rank waits for another in the forward pass. The step's token count N is reduced from
/// begin_step() on, each micro-batch's counts from the moment its last MoE layer has routed; the
/// gradient of a global or group LBL term is tied to its MoE layer's combine weights, so the
/// backward pass waits for the counts only when it reaches the router of the last MoE layer
/// (after the output head, the cross-entropy and that layer's experts), and for N only when it
/// starts. micro_batch_backward() is that path; micro_batch_loss() returns the same term with its
/// value, which needs the counts at once. The forwards of later micro-batches may run before a
/// micro-batch's backward (forward_ahead), so that its reduction has a whole forward to arrive in:
/// the terms are taken, and backpropagated, in the order of the forwards, and each micro-batch's
/// f still counts micro-batches 1..m only.
///
/// Example:
///   TrainingObjective objective(model->moe_layers(), options, reducers);  // {} on one process
///   for (step...) {
///     objective.begin_step(M, local_valid_tokens_of_the_step);
///     for (m...) {
///       auto routing = objective.context();
///       auto logits = model->forward(x, mask, &routing);
///       objective.micro_batch_backward(routing, token_loss_sum(logits));
///     }
///     // or: the forward of micro-batch m + 1 before micro_batch_backward() of m
///     average_gradients(); optimizer.step();
///     auto values = objective.step_values();
///     objective.end_step();
///   }
class TrainingObjective {
 public:
  TrainingObjective(std::vector<MoELayer> layers, BalanceOptions options,
                    ObjectiveReducers reducers = {});
  ~TrainingObjective();
  TrainingObjective(const TrainingObjective&) = delete;
  TrainingObjective& operator=(const TrainingObjective&) = delete;

  /// Opens an optimizer step of num_micro_batches; local_tokens: this rank's valid tokens over
  /// the whole step (the trainer knows them once it has drawn the step's micro-batches). Their
  /// data-parallel sum N is reduced while the first micro-batch runs.
  void begin_step(int64_t num_micro_batches, double local_tokens);

  /// A context for the next training forward: once every MoE layer has recorded its routing, the
  /// count reduction starts (scopes global and group) while the rest of the forward runs.
  /// The context, and the graph of a forward made with it, must not outlive the objective.
  RoutingContext context();

  /// Backpropagates the term of the micro-batch whose forward recorded `routing`:
  /// R/N * (task_loss_sum + z-loss and balancing terms summed over its tokens), with no wait for
  /// other ranks before the backward pass needs their counts. Its value goes to step_values().
  /// task_loss_sum: the task loss summed over this rank's valid tokens of the micro-batch.
  void micro_batch_backward(RoutingContext& routing, const torch::Tensor& task_loss_sum);

  /// The same term as a tensor to backpropagate, with its value: waits for the micro-batch's
  /// count reduction (a synchronization point of the forward that micro_batch_backward avoids).
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
  /// Whether a micro-batch's backward waits for other ranks' counts (a global or group LBL over
  /// more than one rank): then running the next micro-batch's forward first hides the wait.
  bool waits_for_counts() const {
    return ties_balance() && reducers_.counts && reducers_.counts->size() > 1;
  }
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  /// Running buffer of layer l: the scope's counts (E,) fp64 and tokens since the last end_step().
  torch::Tensor running_counts(int64_t layer) const;
  double running_tokens(int64_t layer) const;
  /// Valid tokens N of the whole step over the data-parallel ranks (known once the first
  /// micro-batch's backward has begun).
  double step_tokens() const;

  /// One micro-batch's share of the objective while its reductions are in flight (objective.cpp).
  struct MicroBatch;

 private:
  void on_record(RoutingContext& routing, const c10::intrusive_ptr<MicroBatch>& micro);
  torch::Tensor on_weights(const RoutingRecord& r, int64_t layer, const torch::Tensor& w,
                           const c10::intrusive_ptr<MicroBatch>& micro);
  c10::intrusive_ptr<MicroBatch> staged_micro_batch(RoutingContext& routing, const char* caller);
  torch::Tensor local_terms(const RoutingContext& routing, const torch::Tensor& task_loss_sum,
                            MicroBatch& micro);
  torch::Tensor local_layer_terms(int64_t l, const RoutingRecord& r, MicroBatch& micro);
  void stage_subset(const RoutingContext& routing, MicroBatch& micro);
  bool ties_balance() const;
  friend struct ObjectiveAccess;  // the backward functions in objective.cpp
  const torch::Tensor& weight();
  void resolve(MicroBatch& micro);
  torch::Tensor tied_balance_gradient(MicroBatch& micro, int64_t l, const torch::Tensor& scores,
                                      const torch::Tensor& grad_scale);
  void accumulate_bias_votes(int64_t l, const RoutingRecord& r);
  void update_expert_bias();
  void update_quantile_bias();
  int64_t experts(int64_t l) const { return offsets_[l + 1] - offsets_[l] - 1; }

  std::vector<MoELayer> layers_;
  BalanceOptions options_;
  ObjectiveReducers reducers_;
  int64_t data_parallel_size_ = 1;
  std::vector<int64_t> offsets_;  // layer l's counts at [offsets_[l], offsets_[l] + E_l), tokens
  torch::Tensor running_;         // the scope's counts of the step so far
  torch::Tensor local_running_;   // this rank's counts of the step so far
  torch::Tensor token_buffer_;    // (1,) fp64 this rank's step tokens, then their sum N
  torch::Tensor weight_;          // () fp64 R / N, once N is known
  std::function<void()> tokens_wait_;
  // Micro-batches whose forward has recorded and whose counts are not in the running buffer yet,
  // oldest first: each holds its staged counts and their reduction in flight.
  std::deque<c10::intrusive_ptr<MicroBatch>> staged_;
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
