// Load-balancing losses and balance statistics, as pure functions (see shared spec
// global-lbl.md). Letters: T tokens, B sequences, S positions, E experts, K top-k.
#pragma once

#include <torch/torch.h>

#include <string>
#include <utility>

namespace gbmoe {

/// The set of tokens over which the selection frequencies f are computed.
/// Micro: the rank's own micro-batch. Sequence: each sequence, losses averaged over sequences.
/// Global: every rank and every accumulation micro-batch of the optimizer step (counts are
/// all-reduced; P stays local). Group: like Global within consecutive groups of group_size ranks.
enum class BalanceScope { Micro, Sequence, Global, Group };

/// How balance is enforced. AuxLoss: the load-balancing loss. LossFree: no balancing loss; a
/// per-expert selection bias is moved after each optimizer step against the load (DeepSeek-V3).
/// Quantile: no balancing loss and no step size; after each optimizer step the selection bias is
/// set from per-expert thresholds, quantiles of the scope's gates (losses/quantile.h).
enum class BalanceMethod { AuxLoss, LossFree, Quantile };

std::string to_string(BalanceMethod m);
BalanceMethod balance_method_from_string(const std::string& name);

std::string to_string(BalanceScope s);
BalanceScope balance_scope_from_string(const std::string& name);

/// What a model trains besides its task loss: the balancing scope and method, their weights and
/// the router z-loss. Defaults are the spec's: scope global, alpha 0.01, z-loss 0.001.
///
/// Example:
///   BalanceOptions().scope(BalanceScope::Micro).alpha(0.01)
struct BalanceOptions {
  TORCH_ARG(BalanceScope, scope) = BalanceScope::Global;
  /// Weight alpha of the load-balancing loss; the loss equals alpha at perfect balance.
  TORCH_ARG(double, alpha) = 0.01;
  /// Weight of an extra micro-batch LBL added to a global or group loss (the paper used 1% of
  /// alpha to keep each rank's experts locally busy). 0 = none.
  TORCH_ARG(double, micro_alpha) = 0.0;
  /// Ranks per balance group for scope Group (consecutive ranks); 0 = all data-parallel ranks.
  TORCH_ARG(int64_t, group_size) = 0;
  TORCH_ARG(BalanceMethod, method) = BalanceMethod::AuxLoss;
  /// Loss-free balancing: bias step u in b_i += u * mean_units sign(mean_j c_j - c_i) per
  /// optimizer step, the mean over the scope's balance units of the step (the global batch; each
  /// group; each micro-batch of each rank; each sequence), the same on every rank.
  TORCH_ARG(double, bias_update_rate) = 1e-3;
  /// Router z-loss weight beta (ST-MoE): beta * mean_t logsumexp(z_t)^2. 0 disables it.
  TORCH_ARG(double, z_loss) = 1e-3;
  /// The Shuffle ablation (scope global, method aux_loss only): the step's LBL takes f and P over
  /// a random subset of the global batch's valid tokens as large as a micro-batch, drawn from
  /// shuffle_seed and the step index, the same on every rank (moe/balance_subset.h).
  TORCH_ARG(bool, shuffle) = false;
  TORCH_ARG(uint64_t, shuffle_seed) = 0;

 public:
  void validate() const;
};

/// Selection frequencies f_i = c_i / (K n): counts (E,) of n tokens' top-K selections.
/// Returned in fp64, without gradient.
torch::Tensor selection_frequency(const torch::Tensor& counts, double num_tokens, int64_t top_k);

/// Mean score P_i = (1/n) sum_{t valid} s_{t,i}. scores: (T, E); valid: (T,) bool or undefined.
/// Differentiable in scores.
torch::Tensor mean_scores(const torch::Tensor& scores, const torch::Tensor& valid = {});

/// The gradient (T, E) of mean_scores(scores, valid) with respect to scores (T rows) for the
/// gradient grad_P (E,) of its result: the ops autograd runs for it, in its order, so the same
/// bits, without building or running a graph.
torch::Tensor mean_scores_backward(const torch::Tensor& grad_P, const torch::Tensor& valid,
                                   int64_t num_rows);

/// LBL(f, P) = alpha * E * sum_i f_i * P_i, with f = counts / (K * num_tokens).
/// counts and num_tokens may be counted over a larger set than P (the global batch): only P
/// carries gradient. Equals alpha at perfect balance and alpha * E when every token picks
/// the same expert with K = 1.
torch::Tensor load_balancing_loss(const torch::Tensor& counts, double num_tokens,
                                  const torch::Tensor& prob_mean, int64_t top_k, double alpha);

/// True for the scopes whose counts are reduced over ranks and micro-batches.
inline bool is_synchronized(BalanceScope s) {
  return s == BalanceScope::Global || s == BalanceScope::Group;
}

/// Micro-batch LBL: f and P both over the valid tokens of this micro-batch.
/// scores: (T, E); expert_ids: (T, K); valid: (T,) bool or undefined.
torch::Tensor micro_load_balancing_loss(const torch::Tensor& scores,
                                        const torch::Tensor& expert_ids, const torch::Tensor& valid,
                                        double alpha);

/// Sequence LBL (DeepSeek seq-aux): for each sequence b with n_b > 0 valid tokens,
/// LBL(f(b), P(b)); averaged over those sequences.
/// scores: (B, S, E); expert_ids: (B, S, K); valid: (B, S) bool or undefined.
torch::Tensor sequence_load_balancing_loss(const torch::Tensor& scores,
                                           const torch::Tensor& expert_ids,
                                           const torch::Tensor& valid, double alpha);

/// Per-sequence LBL terms: for each sequence b, LBL(f(b), P(b)) (0 for a sequence without valid
/// tokens) and its valid-token count n_b. scores: (B, S, E); expert_ids: (B, S, K); valid: (B, S)
/// bool or undefined. Returns {losses (B,), tokens (B,)}; losses differentiable in scores.
std::pair<torch::Tensor, torch::Tensor> sequence_balance_terms(const torch::Tensor& scores,
                                                               const torch::Tensor& expert_ids,
                                                               const torch::Tensor& valid,
                                                               double alpha);

/// Router z-loss (ST-MoE): beta * mean_{t valid} (logsumexp_i z_{t,i})^2. logits: (T, E).
torch::Tensor router_z_loss(const torch::Tensor& logits, const torch::Tensor& valid, double beta);

/// MaxVio = (max_i c_i - mean_i c_i) / mean_i c_i of selection counts (E,); 0 when empty.
double max_violation(const torch::Tensor& counts);

}  // namespace gbmoe
