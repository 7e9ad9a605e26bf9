// Expert specialization statistics over domains: selection frequency per domain, the mutual
// information between domain and selected expert, and its normalization by the domain entropy.
// Letters: M domains, E experts, K top-k.
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

}  // namespace gbmoe
