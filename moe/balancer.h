// Model-level load balancing: the running count buffer of the global-batch LBL, its one
// collective per micro-batch, the exact distributed weighting, and loss-free bias updates.
// See shared spec global-lbl.md. Letters: E experts, L MoE layers, M micro-batches, R ranks.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <vector>

#include "losses/balance.h"
#include "moe/moe_layer.h"

namespace gbmoe {

/// Sums a buffer over the ranks that share balance statistics (the data-parallel world for
/// scope global, one balance group for scope group). parallel/ implements it over a
/// Communicator; the core library only needs this interface.
class CountReducer {
 public:
  virtual ~CountReducer() = default;
  /// Number of ranks R in the group.
  virtual int64_t size() const = 0;
  /// Starts an in-place sum of buffer over the group; the returned function waits for it.
  virtual std::function<void()> sum_async(torch::Tensor& buffer) = 0;
};

/// Balance figures of one MoE layer for the optimizer step so far.
struct LayerBalanceStats {
  torch::Tensor frequency;         // (E,) fp64 f over the scope's tokens of the step so far
  torch::Tensor local_counts;      // (E,) fp64 this rank's selections of the step so far
  double tokens = 0;               // tokens counted in frequency
  double max_violation = 0;        // MaxVio of those counts
  double micro_max_violation = 0;  // MaxVio of this rank's micro-batches, averaged
  double balance_loss = 0;         // LBL(f, P) of the last micro-batch, unweighted
  double z_loss = 0;               // z-loss of the last micro-batch
  int64_t micro_batches = 0;       // micro-batches counted this step
};

/// Forms the balancing objective of a whole model, for every scope.
///
/// Per micro-batch m of M on rank r (n_rm valid tokens), for each MoE layer:
///   micro / sequence:  the layer's own LBL (stats().balance_loss);
///   global / group:    alpha * E * sum_i f_i * P_i(B_rm) * n_rm * R * M / N
/// where f comes from the running buffer (counts of the group's ranks and of micro-batches
/// 1..m of this step, f exact at m = M), R is the group's size and N the group's valid tokens of
/// the whole step. With micro-batch losses averaged over M and gradients averaged over ranks,
/// this gives exactly the gradient of LBL(f(G), P(G)) (spec: "exact objective"). Plus
/// micro_alpha times the micro-batch LBL, plus the router z-loss.
/// The buffer is reset by end_step(); evaluation forwards (module in eval mode) and recomputed
/// forwards (RecomputeGuard) never touch it.
///
/// Example:
///   Balancer balancer(moe_layers, reducer);  // reducer: nullptr on one process
///   for (step...) {
///     balancer.begin_step(M, step_tokens);
///     for (m...) {
///       auto logits = model->forward(x);                   // layers report routing
///       auto loss = (task_loss(logits) + balancer.micro_batch_loss()) / M;
///       loss.backward();
///     }
///     average_gradients(); optimizer.step();
///     balancer.end_step();
///   }
class Balancer {
 public:
  Balancer(std::vector<MoELayer> layers, std::shared_ptr<CountReducer> reducer = nullptr);
  ~Balancer();
  Balancer(const Balancer&) = delete;
  Balancer& operator=(const Balancer&) = delete;

  /// Opens an optimizer step of num_micro_batches. step_tokens: valid tokens of all the
  /// group's ranks over the whole step (the trainer knows them once it has drawn the step's
  /// micro-batches); 0 = estimate it from the tokens seen so far.
  void begin_step(int64_t num_micro_batches, double step_tokens = 0);

  /// Instead of begin_step's step_tokens: this rank's valid tokens of the whole step. The
  /// group's total rides along with the first micro-batch's count reduction, so it costs no
  /// collective of its own. Call after begin_step(), before the step's first forward.
  void set_local_step_tokens(double tokens);

  /// The balancing objective of the micro-batch whose forward just ran. Waits for the count
  /// reduction started during the forward. Call once per training micro-batch.
  torch::Tensor micro_batch_loss();

  /// Closes the step after the optimizer step: applies loss-free bias updates, resets the
  /// running buffer, and returns the step's per-layer figures.
  std::vector<LayerBalanceStats> end_step();

  const BalanceOptions& options() const { return options_; }
  /// Per-layer figures of the step so far (valid until end_step()).
  const std::vector<LayerBalanceStats>& stats() const { return stats_; }
  /// Running buffer of layer l: reduced counts (E,) fp64 and tokens since the last end_step().
  torch::Tensor running_counts(int64_t layer) const;
  double running_tokens(int64_t layer) const;
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  void on_routing(int64_t layer, const RoutingResult& routing);
  void update_expert_bias();

  std::vector<MoELayer> layers_;
  std::shared_ptr<CountReducer> reducer_;
  BalanceOptions options_;
  std::vector<int64_t>
      offsets_;           // layer l's counts at [offsets_[l], offsets_[l] + E_l), tokens after
  torch::Tensor staged_;  // (sum_l (E_l + 1) + 1,) fp64: this micro-batch, reduced in place;
                          // the last slot carries local step tokens at the first micro-batch
  torch::Tensor local_staged_;   // the same, before reduction (this rank only)
  torch::Tensor running_;        // accumulated reduced counts of the step
  torch::Tensor local_running_;  // accumulated local counts of the step (loss-free, micro)
  std::vector<bool> reported_;
  int64_t num_reported_ = 0;
  std::function<void()> wait_;
  int64_t micro_batches_ = 0;
  int64_t step_micro_batches_ = 1;
  double step_tokens_ = 0;
  double local_step_tokens_ = -1;  // < 0: not given
  std::vector<LayerBalanceStats> stats_;
};

}  // namespace gbmoe
