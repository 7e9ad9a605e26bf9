// BalanceSubset: the Shuffle ablation of global-batch balancing (Qiu et al. 2025, Table 2): the
// balancing loss of a step over a random subset of the global batch's tokens as large as a
// micro-batch, so that the balance set has the global batch's diversity and a micro-batch's size.
// Letters: T token positions of a micro-batch, E experts, R data-parallel ranks, M micro-batches.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>

namespace gbmoe {

class CountReducer;

/// n_S = max(1, round(N / (R M))) for N > 0 (0 for N = 0): the valid tokens of a micro-batch on
/// average over the step, exactly one micro-batch's when there is no padding. Halves round up.
int64_t shuffle_subset_size(int64_t num_tokens, int64_t ranks, int64_t micro_batches);

/// The subset S of step `step`: n of the indices 0..N-1, sorted, drawn uniformly without
/// replacement (the first n of a random permutation from a CPU generator seeded by seed and step).
/// The same for the same arguments on every rank and in every run, a resumed one included.
///
/// Example:
///   auto S = draw_balance_subset(1234, step, N, shuffle_subset_size(N, R, M));  // (n,) int64
torch::Tensor draw_balance_subset(uint64_t seed, int64_t step, int64_t num_tokens,
                                  int64_t subset_tokens);

/// The Shuffle subset of each optimizer step (balance.shuffle; scope global, method aux_loss).
/// The global batch's N valid tokens are numbered rank by rank, within a rank micro-batch by
/// micro-batch in order, within a micro-batch in row-major order of its valid positions; S is
/// draw_balance_subset(seed, step, N, n_S) with n_S = shuffle_subset_size(N, R, M). The step's
/// balancing term is LBL(f(S), P(S)) = alpha E sum_i f_i(S) P_i(S), f and P both over S. In the
/// objective the counts reduced per micro-batch are those of S's tokens (f from the running
/// buffer, exact at m = M), and rank r's micro-batch m backpropagates R / N times
/// alpha E sum_i f_i * sum_{t in S and B_rm} s_{t,i} * N / n_S, so that averaging gradients over
/// the ranks gives the gradient of LBL(f(S), P(S)). Each rank learns every rank's token count
/// from one gather per step, started by begin_step().
///
/// Example:
///   BalanceSubset subset(seed);
///   subset.begin_step(step, M, local_tokens, data_parallel_reducer);  // null on one process
///   auto rows_T = subset.next_micro_batch(valid_T);   // per micro-batch: its tokens in S
///   auto mass_E = subset.weighted_score_sum(scores_TE);
class BalanceSubset {
 public:
  explicit BalanceSubset(uint64_t seed) : seed_(seed) {}

  /// Opens step `step` of micro_batches micro-batches; local_tokens: this rank's valid tokens of
  /// the step. data_parallel: the ranks of the global batch (null on one process).
  void begin_step(int64_t step, int64_t micro_batches, double local_tokens,
                  CountReducer* data_parallel);

  /// The rows (T,) bool of the next micro-batch that hold tokens of S; valid_T: its valid rows.
  /// Call once per micro-batch, in order; the first call waits for the step's gather.
  torch::Tensor next_micro_batch(const torch::Tensor& valid_T);

  /// sum_{t in S and this micro-batch} s_t * N / n_S: (E,) from scores_TE (T, E) of the rows of
  /// the last next_micro_batch() call; differentiable in the scores.
  torch::Tensor weighted_score_sum(const torch::Tensor& scores_TE) const {
    return weighted_score_sum(scores_TE, rows_);
  }
  /// The same over rows_T (T,) bool, rows an earlier next_micro_batch() call of this step gave.
  torch::Tensor weighted_score_sum(const torch::Tensor& scores_TE,
                                   const torch::Tensor& rows_T) const;
  /// The gradient (T, E) of weighted_score_sum(scores_TE, rows_T) with respect to scores_TE for
  /// the gradient grad_E of its result: autograd's ops in its order (the same bits), no graph.
  torch::Tensor weighted_score_sum_backward(const torch::Tensor& grad_E,
                                            const torch::Tensor& rows_T) const;

  double step_tokens() const { return step_tokens_; }       // N
  int64_t subset_tokens() const { return subset_tokens_; }  // n_S

 private:
  void draw();

  uint64_t seed_;
  int64_t step_ = 0;
  int64_t micro_batches_ = 1;
  int64_t ranks_ = 1;
  int64_t rank_ = 0;
  double step_tokens_ = 0;
  int64_t subset_tokens_ = 0;
  torch::Tensor gathered_;  // (R, 1) fp64 every rank's step tokens, once reduced
  std::function<void()> gather_wait_;
  torch::Tensor in_subset_;  // (n_r,) bool this rank's valid tokens of the step in S
  int64_t cursor_ = 0;       // this rank's valid tokens of earlier micro-batches
  torch::Tensor rows_;       // (T,) bool of the current micro-batch
};

}  // namespace gbmoe
