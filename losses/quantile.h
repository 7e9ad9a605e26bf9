// Quantile balancing as pure functions: per-token and per-expert selection thresholds taken from
// quantiles of the routing gates, and the expert bias they set. Loss-free and free of
// hyper-parameters (J. Su, "MoE World Tour 6: balance by optimal allocation", kexue.fm/archives/
// 11619, 2026; Megatron-Core's quantile_balancing router). Letters: T tokens, E experts, K top-k,
// U balance units (a micro-batch, a sequence, the global batch, a group's batch).
//
// A router picks for token t the K experts of largest g_{t,i} + b_i (g: the gates it selects by,
// softmax scores or sigmoid gates; b: the selection bias expert_bias). Balance is the assignment
// problem max sum_{t,i} x_{t,i} g_{t,i} over x in {0, 1} with K experts per token and n K / E
// tokens per expert. Its dual has a threshold a_t per token and beta_i per expert; one step of
// coordinate descent on it, started from the bias in use (beta = -b), is:
//   a_t     = the (K+1)-th largest of g_{t,j} + b_j over the experts j: the value an expert must
//             beat to be among token t's top K (any value between the K-th and the (K+1)-th
//             minimizes the dual; Megatron-Core and Kimi K3 take the (K+1)-th, so do we);
//   r_{t,i} = g_{t,i} - a_t: how far expert i's gate lies above token t's threshold (> -b_i
//             exactly when i is selected, ties aside);
//   beta_i  = the (q+1)-th largest of r_{t,i} over the unit's n valid tokens, q = floor(n K / E):
//             the (1 - K/E) quantile of expert i's residuals;
//   b_i    <- -(beta_i - mean_j beta_j): re-centred, since a shift common to all experts changes
//             no top-k.
// Defining property: with the unit's thresholds, every expert admits its quantile's share of the
// unit's tokens: #{t : r_{t,i} > beta_i} <= q < #{t : r_{t,i} >= beta_i} for every i, so exactly
// q tokens lie above beta_i unless residuals tie at it (ties are common: every token whose
// (K+1)-th choice is i has r_{t,i} = -b_i). Computed in fp64.
// The bias is set from one unit's thresholds, not moved by a step size; Megatron-Core's optional
// EMA over steps is left out (it would be a hyper-parameter).
#pragma once

#include <torch/torch.h>

#include <functional>
#include <utility>
#include <vector>

namespace gbmoe {

/// q = floor(n K / E): the tokens each expert admits out of a unit of num_tokens.
int64_t quantile_share(int64_t num_tokens, int64_t top_k, int64_t num_experts);

/// The per-token thresholds a_t (T,) fp64: the (K+1)-th largest of gates_TE + bias_E over the
/// experts. gates_TE: (T, E) the gates the router selects by; needs top_k < E.
///
/// Example:
///   auto a_T = token_thresholds(torch::softmax(logits_TE, -1), router->expert_bias, 2);
torch::Tensor token_thresholds(const torch::Tensor& gates_TE, const torch::Tensor& bias_E,
                               int64_t top_k);

/// The residuals r_{t,i} = g_{t,i} - a_t (T, E) fp64, a_t from token_thresholds().
torch::Tensor threshold_residuals(const torch::Tensor& gates_TE, const torch::Tensor& bias_E,
                                  int64_t top_k);

/// The expert thresholds beta of each unit, by sorting: for unit u with n_u valid tokens,
/// beta_{u,i} is the (q_u+1)-th largest of residuals_UTE[u, t, i] over its valid t, q_u = floor(n_u
/// K / E). residuals_UTE: (U, T, E) fp64; valid_UT: (U, T) bool. Returns {beta (U, E) fp64,
/// has_tokens (U,) bool}; rows of units without valid tokens are -inf.
///
/// Example:
///   auto [beta_UE, has_U] = unit_thresholds(r_TE.unsqueeze(0), valid_T.unsqueeze(0), 2);
std::pair<torch::Tensor, torch::Tensor> unit_thresholds(const torch::Tensor& residuals_UTE,
                                                        const torch::Tensor& valid_UT,
                                                        int64_t top_k);

/// In-place sum of a buffer over the ranks that share a unit; the identity on one process.
using SumOverRanks = std::function<void(torch::Tensor&)>;

/// The exact (q_l+1)-th largest value of every column of a set of rows spread over ranks: for
/// each layer l, rows_l (n_l, E_l) fp64 are this rank's rows (n_l may differ by rank, 0
/// included) and shares[l] is q_l (0-dim, the same on every rank). Bisection over the 2^64
/// order-preserving integer keys of fp64 values, on counts #{rows > mid} summed over the ranks:
/// 64 sums of one (sum_l E_l + L,) buffer for all layers together, each exact (integer counts),
/// so every rank ends with the same bits, equal to sorting all ranks' rows on one process.
/// Returns per layer (E_l,) fp64; NaN for a layer with a NaN row on any rank or with at most q_l
/// rows in all.
///
/// Example:
///   auto beta = largest_over_ranks({r_nE}, {torch::tensor(q)}, [&](torch::Tensor& t) {
///     reducer.sum_async(t)();
///   });
std::vector<torch::Tensor> largest_over_ranks(const std::vector<torch::Tensor>& rows,
                                              const std::vector<torch::Tensor>& shares,
                                              const SumOverRanks& sum);

/// The selection bias b = -(beta - mean(beta)) of expert thresholds beta (E,).
torch::Tensor quantile_bias(const torch::Tensor& thresholds_E);

}  // namespace gbmoe
