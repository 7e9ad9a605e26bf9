// Mutual information and per-domain frequencies from (domain x expert) selection counts.
#include "losses/specialization.h"

namespace gbmoe {

torch::Tensor domain_selection_frequency(const torch::Tensor& counts, const torch::Tensor& tokens) {
  TORCH_CHECK(counts.dim() == 2 && tokens.dim() == 1 && tokens.size(0) == counts.size(0),
              "counts must be (M, E) and tokens (M,), got ", counts.sizes(), " and ",
              tokens.sizes());
  auto c = counts.to(torch::kDouble);
  return c / tokens.to(torch::kDouble).clamp_min(1).unsqueeze(1);
}

double domain_expert_mutual_information(const torch::Tensor& counts) {
  TORCH_CHECK(counts.dim() == 2, "counts must be (M, E), got ", counts.sizes());
  auto c = counts.to(torch::kDouble).cpu();
  const double total = c.sum().item<double>();
  if (total <= 0) return 0.0;
  auto p = c / total;
  auto p_d = p.sum(1, true), p_e = p.sum(0, true);
  auto ratio = p / (p_d * p_e);
  auto terms = torch::where(p > 0, p * torch::log2(ratio), torch::zeros_like(p));
  return std::max(0.0, terms.sum().item<double>());
}

double domain_entropy(const torch::Tensor& counts) {
  auto c = counts.to(torch::kDouble).cpu().sum(1);
  const double total = c.sum().item<double>();
  if (total <= 0) return 0.0;
  auto p = c / total;
  return -torch::where(p > 0, p * torch::log2(p), torch::zeros_like(p)).sum().item<double>();
}

}  // namespace gbmoe
