// Load-balancing losses: f from counts (no gradient), P from scores (gradient), z-loss, MaxVio.
#include "losses/balance.h"

#include <cmath>

namespace gbmoe {

std::string to_string(BalanceScope s) {
  switch (s) {
    case BalanceScope::Micro:
      return "micro";
    case BalanceScope::Sequence:
      return "sequence";
    case BalanceScope::Global:
      return "global";
    case BalanceScope::Group:
      return "group";
  }
  return "?";
}

std::string to_string(BalanceMethod m) {
  switch (m) {
    case BalanceMethod::AuxLoss:
      return "aux_loss";
    case BalanceMethod::LossFree:
      return "loss_free";
    case BalanceMethod::Quantile:
      return "quantile";
  }
  return "?";
}

BalanceMethod balance_method_from_string(const std::string& name) {
  if (name == "aux_loss") return BalanceMethod::AuxLoss;
  if (name == "loss_free") return BalanceMethod::LossFree;
  if (name == "quantile") return BalanceMethod::Quantile;
  TORCH_CHECK(false, "balance method (", name, ") must be one of aux_loss, loss_free, quantile");
}

BalanceScope balance_scope_from_string(const std::string& name) {
  if (name == "micro") return BalanceScope::Micro;
  if (name == "sequence") return BalanceScope::Sequence;
  if (name == "global") return BalanceScope::Global;
  if (name == "group") return BalanceScope::Group;
  TORCH_CHECK(false, "balance scope (", name, ") must be one of micro, sequence, global, group");
}

void BalanceOptions::validate() const {
  TORCH_CHECK(std::isfinite(alpha()) && alpha() >= 0, "balance alpha (", alpha(), ") must be >= 0");
  TORCH_CHECK(std::isfinite(micro_alpha()) && micro_alpha() >= 0, "balance micro_alpha (",
              micro_alpha(), ") must be >= 0");
  TORCH_CHECK(std::isfinite(z_loss()) && z_loss() >= 0, "balance z_loss (", z_loss(),
              ") must be >= 0");
  TORCH_CHECK(group_size() >= 0, "balance group_size (", group_size(), ") must be >= 0");
  TORCH_CHECK(std::isfinite(bias_update_rate()) && bias_update_rate() >= 0,
              "balance bias_update_rate (", bias_update_rate(), ") must be >= 0");
  TORCH_CHECK(!shuffle() || (scope() == BalanceScope::Global && method() == BalanceMethod::AuxLoss),
              "balance shuffle needs scope global and method aux_loss, got scope ",
              to_string(scope()), " and method ", to_string(method()));
}

torch::Tensor selection_frequency(const torch::Tensor& counts, double num_tokens, int64_t top_k) {
  // Counts are exact integers: divide in fp64 so f is exact before any cast.
  auto c = counts.detach().to(torch::kDouble);
  if (num_tokens <= 0) return torch::zeros_like(c);
  return c / (static_cast<double>(top_k) * num_tokens);
}

torch::Tensor mean_scores(const torch::Tensor& scores, const torch::Tensor& valid) {
  if (!valid.defined()) return scores.mean(0);
  auto w = valid.to(scores.scalar_type()).unsqueeze(-1);
  auto n = valid.sum().clamp_min(1).to(scores.scalar_type());
  return (scores * w).sum(0) / n;
}

torch::Tensor mean_scores_backward(const torch::Tensor& grad_P, const torch::Tensor& valid,
                                   int64_t num_rows) {
  const int64_t E = grad_P.size(-1);
  if (!valid.defined()) return grad_P.unsqueeze(0).expand({num_rows, E}) / num_rows;
  auto w = valid.to(grad_P.scalar_type()).unsqueeze(-1);
  auto n = valid.sum().clamp_min(1).to(grad_P.scalar_type());
  return (grad_P / n).unsqueeze(0).expand({num_rows, E}) * w;
}

torch::Tensor load_balancing_loss(const torch::Tensor& counts, double num_tokens,
                                  const torch::Tensor& prob_mean, int64_t top_k, double alpha) {
  const int64_t E = prob_mean.size(-1);
  TORCH_CHECK(counts.size(-1) == E, "counts have ", counts.size(-1), " experts, prob_mean has ", E);
  auto f = selection_frequency(counts, num_tokens, top_k).to(prob_mean.scalar_type());
  return alpha * static_cast<double>(E) * (f * prob_mean).sum();
}

torch::Tensor micro_load_balancing_loss(const torch::Tensor& scores,
                                        const torch::Tensor& expert_ids, const torch::Tensor& valid,
                                        double alpha) {
  const int64_t E = scores.size(-1), K = expert_ids.size(-1);
  auto ids = valid.defined() ? expert_ids.index({valid}) : expert_ids;
  ids = ids.reshape({-1});
  auto counts = torch::zeros({E}, ids.options()).index_add_(0, ids, torch::ones_like(ids));
  const double n = static_cast<double>(ids.numel() / K);
  return load_balancing_loss(counts, n, mean_scores(scores, valid), K, alpha);
}

std::pair<torch::Tensor, torch::Tensor> sequence_balance_terms(const torch::Tensor& scores,
                                                               const torch::Tensor& expert_ids,
                                                               const torch::Tensor& valid,
                                                               double alpha) {
  TORCH_CHECK(scores.dim() == 3 && expert_ids.dim() == 3,
              "sequence LBL needs scores (B, S, E) and ", "expert_ids (B, S, K), got ",
              scores.sizes(), " and ", expert_ids.sizes());
  const int64_t B = scores.size(0), S = scores.size(1), E = scores.size(2);
  const int64_t K = expert_ids.size(2);
  auto valid_BS = valid.defined() ? valid.to(torch::kBool)
                                  : torch::ones({B, S}, scores.options().dtype(torch::kBool));
  auto w_BS = valid_BS.to(scores.scalar_type());
  auto n_B = w_BS.sum(1);  // valid tokens per sequence
  // counts c_{b,i}: one-hot of the selections of valid tokens, summed over positions.
  auto sel_BSK = w_BS.unsqueeze(-1).expand({B, S, K});
  auto counts_BE = torch::zeros({B, E}, scores.options())
                       .scatter_add_(1, expert_ids.reshape({B, S * K}), sel_BSK.reshape({B, S * K}))
                       .detach();
  auto n_safe_B = n_B.clamp_min(1).unsqueeze(-1);
  auto f_BE = counts_BE / (static_cast<double>(K) * n_safe_B);
  auto P_BE = (scores * w_BS.unsqueeze(-1)).sum(1) / n_safe_B;
  return {alpha * static_cast<double>(E) * (f_BE * P_BE).sum(-1), n_B.detach()};
}

torch::Tensor sequence_load_balancing_loss(const torch::Tensor& scores,
                                           const torch::Tensor& expert_ids,
                                           const torch::Tensor& valid, double alpha) {
  auto [per_seq_B, n_B] = sequence_balance_terms(scores, expert_ids, valid, alpha);
  auto has_tokens_B = (n_B > 0).to(scores.scalar_type());
  return (per_seq_B * has_tokens_B).sum() / has_tokens_B.sum().clamp_min(1);
}

torch::Tensor router_z_loss(const torch::Tensor& logits, const torch::Tensor& valid, double beta) {
  auto lse_T = torch::logsumexp(logits, -1);
  return beta * mean_scores(lse_T.square().unsqueeze(-1), valid).squeeze(-1);
}

double max_violation(const torch::Tensor& counts) {
  auto c = counts.detach().to(torch::kDouble).cpu();
  const double mean = c.mean().item<double>();
  if (mean <= 0) return 0.0;
  return (c.max().item<double>() - mean) / mean;
}

}  // namespace gbmoe
