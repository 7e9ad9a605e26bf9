// Mutual information, per-domain frequencies and MaxVio from (domain x expert) selection counts;
// top-k score sums from routing scores.
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

torch::Tensor domain_max_violation(const torch::Tensor& counts) {
  TORCH_CHECK(counts.dim() == 2, "counts must be (M, E), got ", counts.sizes());
  auto c = counts.to(torch::kDouble).cpu();
  auto mean = c.mean(1);
  auto mv = (std::get<0>(c.max(1)) - mean) / mean.clamp_min(1e-300);
  return torch::where(mean > 0, mv, torch::zeros_like(mv));
}

torch::Tensor topk_score_sum(const torch::Tensor& scores_TE, const torch::Tensor& expert_ids_TK) {
  TORCH_CHECK(scores_TE.dim() == 2 && expert_ids_TK.dim() == 2 &&
                  scores_TE.size(0) == expert_ids_TK.size(0),
              "scores must be (T, E) and expert_ids (T, K), got ", scores_TE.sizes(), " and ",
              expert_ids_TK.sizes());
  return scores_TE.detach().to(torch::kDouble).gather(1, expert_ids_TK).sum(1).cpu();
}

}  // namespace gbmoe
