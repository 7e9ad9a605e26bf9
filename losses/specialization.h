// Expert specialization statistics over domains: selection frequency per domain, the mutual
// information between domain and selected expert, and its normalization by the domain entropy;
// MaxVio per domain and the top-k score sum of each token.
// Letters: M domains, E experts, K top-k, T tokens.
#pragma once

#include <torch/torch.h>

namespace gbmoe {

/// freq[d][i] = share of domain d's tokens whose top-k contains expert i (rows sum to K).
/// counts: (M, E) selections per domain and expert; tokens: (M,) tokens per domain.
torch::Tensor domain_selection_frequency(const torch::Tensor& counts, const torch::Tensor& tokens);

/// Mutual information I(domain; expert) in bits between the domain of a token and one of its
/// selected experts, from the joint p(d, i) = counts[d][i] / sum(counts). 0 when routing does
/// not depend on the domain; H(domain) when every expert serves one domain only.
double domain_expert_mutual_information(const torch::Tensor& counts);

/// Entropy in bits of the domain marginal of counts (M, E).
double domain_entropy(const torch::Tensor& counts);

/// MaxVio of each domain's own load: out[d] = (max_i c[d][i] - mean_i c[d][i]) / mean_i c[d][i]
/// (0 for a domain without selections). counts: (M, E). Returns (M,) fp64.
/// Example: domain_max_violation(torch::tensor({{3, 1}, {2, 2}}))  // [0.5, 0]
torch::Tensor domain_max_violation(const torch::Tensor& counts);

/// The routing score mass each token gives its selected experts: out[t] = sum_k s[t][S_t,k].
/// 1 when top-k holds all the probability (confident routing), k/E for uniform scores.
/// scores_TE: (T, E); expert_ids_TK: (T, K) int64. Returns (T,) fp64.
/// Example: topk_score_sum(routing.scores, routing.expert_ids).masked_select(routing.valid)
torch::Tensor topk_score_sum(const torch::Tensor& scores_TE, const torch::Tensor& expert_ids_TK);

}  // namespace gbmoe
