// Quantile balancing thresholds: token thresholds, the defining property of the expert thresholds
// (each expert admits its quantile's share of the unit), an fp64 re-derivation by kthvalue, the
// exact bisection against sorting, and the re-centred bias.
#include "losses/quantile.h"

#include <gtest/gtest.h>

#include <limits>

#include "tests/test_util.h"

namespace gbmoe {
namespace {

const SumOverRanks kOneProcess = [](torch::Tensor&) {};

// Random softmax gates (T, E) and a bias (E,), fp64.
std::pair<torch::Tensor, torch::Tensor> gates_and_bias(int64_t T, int64_t E, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  auto gates = torch::softmax(2.0 * at::randn({T, E}, gen, torch::kDouble), -1);
  auto bias = 0.05 * at::randn({E}, gen, torch::kDouble);
  return {gates, bias};
}

TEST(QuantileShare, IsTheFloorOfTheExpertsShare) {
  EXPECT_EQ(quantile_share(10, 2, 8), 2);  // 2.5 tokens per expert
  EXPECT_EQ(quantile_share(12, 2, 8), 3);
  EXPECT_EQ(quantile_share(0, 1, 4), 0);
  expect_throw_with([] { quantile_share(4, 4, 4); }, "top_k (4) < num_experts (4)");
}

TEST(TokenThresholds, AreTheKPlusFirstSelectionScore) {
  const int64_t T = 9, E = 6, K = 2;
  auto [g, b] = gates_and_bias(T, E, 1);
  auto a_T = token_thresholds(g, b, K);
  auto sorted = std::get<0>((g + b).sort(-1, /*descending=*/true));
  EXPECT_TRUE(torch::equal(a_T, sorted.select(1, K)));
  // exactly the K selected experts lie above the token's threshold: r > 0 marks the top-K
  auto above = (g + b) > a_T.unsqueeze(1);
  auto topk =
      torch::zeros({T, E}, torch::kBool).scatter_(1, std::get<1>((g + b).topk(K, -1)), true);
  EXPECT_TRUE(torch::equal(above, topk));
  EXPECT_TRUE(torch::equal(threshold_residuals(g, b, K), g - a_T.unsqueeze(1)));
  expect_throw_with([&] { token_thresholds(g, b, E); }, "top_k (6) < num_experts (6)");
}

// The defining property: with a unit's thresholds, every expert admits exactly
// q = floor(n K / E) of its valid tokens when its residuals are distinct; beta equals an fp64
// re-derivation by kthvalue.
TEST(UnitThresholds, EveryExpertAdmitsItsQuantileShareOfTheUnit) {
  const int64_t U = 3, T = 11, E = 5, K = 2;
  auto r_UTE = at::randn({U, T, E}, at::detail::createCPUGenerator(2), torch::kDouble);
  auto valid = torch::ones({U, T}, torch::kBool);
  valid[1].narrow(0, 4, 7).fill_(false);  // units of 11, 4 and 0 valid tokens
  valid[2].fill_(false);
  auto [beta_UE, has_U] = unit_thresholds(r_UTE, valid, K);
  EXPECT_TRUE(torch::equal(has_U, torch::tensor({true, true, false})));
  for (int64_t u = 0; u < 2; ++u) {
    const int64_t n = valid[u].sum().item<int64_t>(), q = quantile_share(n, K, E);
    auto rows = r_UTE[u].index({valid[u]});  // (n, E)
    for (int64_t i = 0; i < E; ++i) {
      const double beta = beta_UE[u][i].item<double>();
      EXPECT_EQ((rows.select(1, i) > beta).sum().item<int64_t>(), q) << "unit " << u << " e" << i;
      // (q+1)-th largest = (n - q)-th smallest
      EXPECT_EQ(beta, std::get<0>(rows.select(1, i).kthvalue(n - q)).item<double>());
    }
  }
  EXPECT_TRUE(torch::isinf(beta_UE[2]).all().item<bool>());
}

// Bisection over the order keys finds, bit for bit, what sorting finds: negative, tiny, huge
// and tied values, +0 and -0, several layers with their own shares, a layer with no rows.
// Residuals of real routing tie: every token whose (K+1)-th choice is expert i has r = -b_i (up to
// rounding). The (q+1)-th largest then means: at most q tokens above beta_i, more than q at or
// above it.
TEST(UnitThresholds, TiedResidualsStraddleTheShare) {
  const int64_t T = 60, E = 4, K = 1;
  auto [g, b] = gates_and_bias(T, E, 4);
  auto r_TE = threshold_residuals(g, torch::zeros({E}, torch::kDouble), K);  // ties at exactly 0
  auto beta = unit_thresholds(r_TE.unsqueeze(0), torch::ones({1, T}, torch::kBool), K).first[0];
  const int64_t q = quantile_share(T, K, E);
  EXPECT_TRUE(((r_TE > beta).sum(0) <= q).all().item<bool>());
  EXPECT_TRUE(((r_TE >= beta).sum(0) > q).all().item<bool>());
  EXPECT_TRUE((r_TE == 0).sum(0).gt(1).any().item<bool>());  // the ties are there
}

TEST(LargestOverRanks, EqualsSortingForAnyValues) {
  auto gen = at::detail::createCPUGenerator(3);
  auto a = at::randn({40, 4}, gen, torch::kDouble);
  a[0][0] = 1e300, a[1][0] = -1e-300, a[2][0] = 0.0, a[3][0] = -0.0;
  a.select(1, 1).narrow(0, 0, 30).fill_(0.25);  // ties straddling the share
  a.select(1, 2).mul_(1e-200);
  auto b = -at::rand({7, 3}, gen, torch::kDouble);
  const std::vector<int64_t> q{13, 6};
  auto out = largest_over_ranks({a, b, torch::zeros({0, 2}, torch::kDouble)},
                                {torch::tensor(13.0), torch::tensor(6.0), torch::tensor(0.0)},
                                kOneProcess);
  for (int l = 0; l < 2; ++l) {
    const auto& rows = l == 0 ? a : b;
    auto sorted = std::get<0>(rows.sort(0, /*descending=*/true));
    for (int64_t i = 0; i < rows.size(1); ++i) {
      EXPECT_EQ(out[l][i].item<double>(), sorted[q[l]][i].item<double>()) << l << " e" << i;
    }
  }
  EXPECT_TRUE(torch::isnan(out[2]).all().item<bool>());  // no rows: no threshold
}

TEST(LargestOverRanks, ANaNRowMakesTheLayerNaN) {
  auto rows = torch::rand({6, 3}, torch::kDouble);
  rows[2][1] = std::numeric_limits<double>::quiet_NaN();
  auto ok = torch::rand({6, 3}, torch::kDouble);
  auto out = largest_over_ranks({rows, ok}, {torch::tensor(1.0), torch::tensor(1.0)}, kOneProcess);
  EXPECT_TRUE(torch::isnan(out[0]).all().item<bool>());
  EXPECT_FALSE(torch::isnan(out[1]).any().item<bool>());
}

TEST(QuantileBias, IsTheNegativeRecentredThreshold) {
  auto beta = torch::tensor({0.5, -0.25, 0.0, 1.75}, torch::kDouble);
  auto b = quantile_bias(beta);
  EXPECT_TRUE(torch::allclose(b, torch::tensor({0.0, 0.75, 0.5, -1.25}, torch::kDouble)));
  EXPECT_NEAR(b.sum().item<double>(), 0.0, 1e-15);
}

}  // namespace
}  // namespace gbmoe
