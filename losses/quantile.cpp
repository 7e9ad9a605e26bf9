// Quantile balancing: token and expert thresholds, exact order statistics over ranks, the bias.
#include "losses/quantile.h"

#include <limits>

namespace gbmoe {
namespace {

constexpr int64_t kLowest = std::numeric_limits<int64_t>::min();
constexpr int64_t kHighest = std::numeric_limits<int64_t>::max();

// Integer keys that order like the fp64 values: the bits of x >= +0, all bits but the sign flipped
// below. -0 becomes +0 first, so equal values have equal keys.
torch::Tensor order_keys(const torch::Tensor& x) {
  auto bits = (x.to(torch::kDouble) + 0.0).contiguous().view(torch::kLong);
  return torch::where(bits >= 0, bits, torch::bitwise_xor(bits, kHighest));
}

torch::Tensor from_order_keys(const torch::Tensor& keys) {
  auto bits = torch::where(keys >= 0, keys, torch::bitwise_xor(keys, kHighest));
  return bits.contiguous().view(torch::kDouble);
}

// floor((lo + hi) / 2) without overflow.
torch::Tensor midpoint(const torch::Tensor& lo, const torch::Tensor& hi) {
  return torch::bitwise_right_shift(lo, 1) + torch::bitwise_right_shift(hi, 1) +
         torch::bitwise_and(torch::bitwise_and(lo, hi), 1);
}

}  // namespace

int64_t quantile_share(int64_t num_tokens, int64_t top_k, int64_t num_experts) {
  TORCH_CHECK(num_tokens >= 0 && top_k >= 1 && top_k < num_experts, "quantile share needs tokens (",
              num_tokens, ") >= 0 and 1 <= top_k (", top_k, ") < num_experts (", num_experts, ")");
  return num_tokens * top_k / num_experts;
}

torch::Tensor token_thresholds(const torch::Tensor& gates_TE, const torch::Tensor& bias_E,
                               int64_t top_k) {
  const int64_t E = gates_TE.size(-1);
  TORCH_CHECK(top_k >= 1 && top_k < E, "quantile balancing needs 1 <= top_k (", top_k,
              ") < num_experts (", E, "): with K = E every token takes every expert");
  TORCH_CHECK(bias_E.numel() == E, "bias has ", bias_E.numel(), " experts, the gates ", E);
  torch::NoGradGuard no_grad;
  auto selection_TE =
      gates_TE.detach().to(torch::kDouble) + bias_E.detach().to(gates_TE.device(), torch::kDouble);
  return std::get<0>(selection_TE.topk(top_k + 1, -1)).select(-1, top_k);
}

torch::Tensor threshold_residuals(const torch::Tensor& gates_TE, const torch::Tensor& bias_E,
                                  int64_t top_k) {
  auto a_T = token_thresholds(gates_TE, bias_E, top_k);
  return gates_TE.detach().to(torch::kDouble) - a_T.unsqueeze(-1);
}

std::pair<torch::Tensor, torch::Tensor> unit_thresholds(const torch::Tensor& residuals_UTE,
                                                        const torch::Tensor& valid_UT,
                                                        int64_t top_k) {
  TORCH_CHECK(residuals_UTE.dim() == 3 && valid_UT.dim() == 2 &&
                  valid_UT.size(0) == residuals_UTE.size(0) &&
                  valid_UT.size(1) == residuals_UTE.size(1),
              "unit thresholds need residuals (U, T, E) and valid (U, T), got ",
              residuals_UTE.sizes(), " and ", valid_UT.sizes());
  const int64_t U = residuals_UTE.size(0), T = residuals_UTE.size(1), E = residuals_UTE.size(2);
  quantile_share(0, top_k, E);  // checks K < E
  auto valid = valid_UT.to(torch::kBool);
  auto n_U = valid.sum(1);
  if (T == 0) {
    return {torch::full({U, E}, -std::numeric_limits<double>::infinity(),
                        residuals_UTE.options().dtype(torch::kDouble)),
            n_U > 0};
  }
  auto r = residuals_UTE.to(torch::kDouble)
               .masked_fill(~valid.unsqueeze(-1), -std::numeric_limits<double>::infinity());
  auto sorted_UTE = std::get<0>(r.sort(/*dim=*/1, /*descending=*/true));
  auto q_U = torch::div(n_U * top_k, E, "floor").clamp_max(T - 1);
  auto beta_UE = sorted_UTE.gather(1, q_U.view({U, 1, 1}).expand({U, 1, E})).squeeze(1);
  return {beta_UE, n_U > 0};
}

std::vector<torch::Tensor> largest_over_ranks(const std::vector<torch::Tensor>& rows,
                                              const std::vector<torch::Tensor>& shares,
                                              const SumOverRanks& sum) {
  TORCH_CHECK(!rows.empty() && rows.size() == shares.size(), "largest_over_ranks needs one share ",
              "per layer, got ", rows.size(), " row sets and ", shares.size(), " shares");
  const int64_t L = static_cast<int64_t>(rows.size());
  const auto device = rows.front().device();
  std::vector<int64_t> offset{0};
  std::vector<torch::Tensor> keys, bad, q;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(rows[l].dim() == 2, "rows of layer ", l, " must be (n, E), got ", rows[l].sizes());
    const int64_t E = rows[l].size(1);
    auto nan = torch::isnan(rows[l]);
    keys.push_back(order_keys(rows[l].masked_fill(nan, 0.0)));
    bad.push_back(nan.sum().to(torch::kDouble).view({1}));
    q.push_back(shares[l].to(device, torch::kDouble).reshape({1}).expand({E}));
    offset.push_back(offset.back() + E);
  }
  const int64_t C = offset.back();
  auto q_C = torch::cat(q);
  auto lo = torch::full({C}, kLowest, torch::TensorOptions().dtype(torch::kLong).device(device));
  auto hi = torch::full_like(lo, kHighest);
  auto buffer = torch::zeros({C + L}, torch::TensorOptions().dtype(torch::kDouble).device(device));
  // Invariant: #{rows > lo} > q and #{rows > hi} <= q; after 64 halvings hi is the smallest key
  // with at most q rows above it, the (q+1)-th largest row.
  for (int iteration = 0; iteration < 64; ++iteration) {
    auto mid = midpoint(lo, hi);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t E = offset[l + 1] - offset[l];
      auto above = (keys[l] > mid.narrow(0, offset[l], E).unsqueeze(0)).sum(0);
      buffer.narrow(0, offset[l], E).copy_(above);
      buffer.narrow(0, C + l, 1).copy_(bad[l]);
    }
    sum(buffer);
    auto few = buffer.narrow(0, 0, C) <= q_C;
    hi = torch::where(few, mid, hi);
    lo = torch::where(few, lo, mid);
  }
  auto values = from_order_keys(hi);
  std::vector<torch::Tensor> out;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t E = offset[l + 1] - offset[l];
    auto v = values.narrow(0, offset[l], E).clone();
    out.push_back(torch::where(buffer.narrow(0, C + l, 1) > 0,
                               torch::full_like(v, std::numeric_limits<double>::quiet_NaN()), v));
  }
  return out;
}

torch::Tensor quantile_bias(const torch::Tensor& thresholds_E) {
  auto beta = thresholds_E.to(torch::kDouble);
  return -(beta - beta.mean());
}

}  // namespace gbmoe
