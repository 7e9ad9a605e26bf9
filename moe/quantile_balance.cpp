// QuantileBalance: residuals per training micro-batch, the scope's thresholds, the routers' bias.
#include "moe/quantile_balance.h"

#include "losses/quantile.h"
#include "moe/objective.h"

namespace gbmoe {
namespace {

// The gates a router selects by (before its bias): softmax scores or sigmoid gates.
torch::Tensor selection_gates(const RouterImpl& router, const torch::Tensor& logits_TE) {
  return router.options.score_function() == ScoreFunction::Softmax ? torch::softmax(logits_TE, -1)
                                                                   : torch::sigmoid(logits_TE);
}

}  // namespace

QuantileBalance::QuantileBalance(std::vector<MoELayer> layers, BalanceScope scope)
    : layers_(std::move(layers)), scope_(scope) {
  offsets_.push_back(0);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const auto& o = layers_[l]->router->options;
    TORCH_CHECK(o.top_k() < o.num_experts(), "balance method quantile needs top_k (", o.top_k(),
                ") < num_experts (", o.num_experts(), ") in MoE layer ", l,
                ": with K = E every token takes every expert; lower model.top_k or use another ",
                "balance.method");
    offsets_.push_back(offsets_.back() + o.num_experts() + 1);
  }
  rows_.resize(layers_.size());
  threshold_sum_.resize(layers_.size());
  units_.resize(layers_.size());
}

void QuantileBalance::add(int64_t l, const RoutingRecord& record) {
  torch::NoGradGuard no_grad;
  const auto& rt = record.routing;
  const auto& router = *layers_[l]->router;
  auto r_TE = threshold_residuals(selection_gates(router, rt.logits), router.expert_bias, rt.top_k);
  const int64_t E = r_TE.size(1);
  if (is_synchronized(scope_)) {
    rows_[l].push_back(r_TE.index({rt.valid}));
    return;
  }
  torch::Tensor r_UTE = r_TE.unsqueeze(0), valid_UT = rt.valid.unsqueeze(0);
  if (scope_ == BalanceScope::Sequence) {
    TORCH_CHECK(record.lead_shape.size() >= 2, "balance scope sequence needs the MoE input as ",
                "(B, S, D); MoE layer ", l, " got a (T, D) input");
    const int64_t S = record.lead_shape.back(), B = r_TE.size(0) / S;
    r_UTE = r_TE.view({B, S, E});
    valid_UT = rt.valid.view({B, S});
  }
  auto [beta_UE, has_U] = unit_thresholds(r_UTE, valid_UT, rt.top_k);
  if (!threshold_sum_[l].defined()) {
    threshold_sum_[l] = torch::zeros({E}, r_TE.options());
    units_[l] = torch::zeros({}, r_TE.options());
  }
  threshold_sum_[l] +=
      torch::where(has_U.unsqueeze(-1), beta_UE, torch::zeros_like(beta_UE)).sum(0);
  units_[l] += has_U.sum();
}

torch::Tensor QuantileBalance::unit_sums(const std::vector<torch::Tensor>& unit_tokens,
                                         CountReducer* unit_ranks) {
  const auto options =
      torch::TensorOptions().dtype(torch::kDouble).device(layers_.front()->router->weight.device());
  auto out = torch::zeros({offsets_.back()}, options);
  const int64_t L = static_cast<int64_t>(layers_.size());
  if (!is_synchronized(scope_)) {
    for (int64_t l = 0; l < L; ++l) {
      if (!threshold_sum_[l].defined()) continue;
      const int64_t E = offsets_[l + 1] - offsets_[l] - 1;
      out.narrow(0, offsets_[l], E).copy_(threshold_sum_[l]);
      out.narrow(0, offsets_[l] + E, 1).copy_(units_[l].view({1}));
    }
    return out;
  }
  TORCH_CHECK(static_cast<int64_t>(unit_tokens.size()) == L, "quantile balancing needs the ",
              "unit's tokens of each of the ", L, " layers, got ", unit_tokens.size());
  std::vector<torch::Tensor> rows, shares;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t E = offsets_[l + 1] - offsets_[l] - 1;
    const int64_t K = layers_[l]->router->options.top_k();
    rows.push_back(rows_[l].empty() ? torch::zeros({0, E}, options) : torch::cat(rows_[l]));
    shares.push_back(torch::floor(unit_tokens[l].to(options) * static_cast<double>(K) / E));
  }
  auto beta = largest_over_ranks(rows, shares, [unit_ranks](torch::Tensor& t) {
    if (unit_ranks) unit_ranks->sum_async(t)();
  });
  for (int64_t l = 0; l < L; ++l) {
    const int64_t E = offsets_[l + 1] - offsets_[l] - 1;
    out.narrow(0, offsets_[l], E).copy_(beta[l]);
    out[offsets_[l] + E].fill_(1.0);
  }
  return out;
}

void QuantileBalance::update_biases(const std::vector<torch::Tensor>& unit_tokens,
                                    CountReducer* unit_ranks, CountReducer* data_parallel) {
  torch::NoGradGuard no_grad;
  auto sums = unit_sums(unit_tokens, unit_ranks);
  // Global thresholds are the same on every rank already; any other scope's are averaged over
  // the data-parallel ranks' units, summed in rank order from an exact gather.
  if (scope_ != BalanceScope::Global && data_parallel) {
    auto rows = gather_rows(*data_parallel, sums);
    sums = rows[0].clone();
    for (int64_t r = 1; r < rows.size(0); ++r) sums += rows[r];
  }
  for (size_t l = 0; l < layers_.size(); ++l) {
    const int64_t E = offsets_[l + 1] - offsets_[l] - 1;
    auto units = sums[offsets_[l] + E];
    auto mean = sums.narrow(0, offsets_[l], E) / units.clamp_min(1.0);
    auto& bias = layers_[l]->router->expert_bias;
    auto keep = (units > 0).logical_and(torch::isfinite(mean).all());
    auto updated = torch::where(keep, quantile_bias(mean), bias.to(torch::kDouble));
    bias.copy_(updated.to(bias.device(), bias.scalar_type()));
  }
}

void QuantileBalance::reset() {
  for (auto& r : rows_) r.clear();
  for (auto& t : threshold_sum_) {
    if (t.defined()) t.zero_();
  }
  for (auto& t : units_) {
    if (t.defined()) t.zero_();
  }
}

}  // namespace gbmoe
