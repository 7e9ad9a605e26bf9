// Balancing losses: values at balance and collapse, no gradient through f, masks, scopes, z-loss.
#include "losses/balance.h"

#include <gtest/gtest.h>

#include "tests/test_util.h"

namespace gbmoe {
namespace {

// mean_scores_backward is autograd's gradient of mean_scores, bit for bit, with and without a
// mask (one with no valid row), in fp32 and fp64.
TEST(MeanScores, BackwardIsAutogradsGradientBitForBit) {
  torch::manual_seed(3);
  for (auto dtype : {torch::kFloat, torch::kDouble}) {
    auto scores = torch::rand({7, 5}, dtype).requires_grad_();
    auto grad_P = torch::randn({5}, dtype);
    auto some = torch::tensor({true, false, true, true, false, true, false});
    for (const auto& valid : {torch::Tensor(), some, torch::zeros({7}, torch::kBool)}) {
      auto expected = torch::autograd::grad({mean_scores(scores, valid)}, {scores}, {grad_P})[0];
      auto got = mean_scores_backward(grad_P, valid, 7);
      EXPECT_TRUE(torch::equal(got, expected)) << dtype << " mask " << valid.defined();
      EXPECT_GT(got.abs().sum().item<double>() + (valid.defined() && !valid.any().item<bool>()),
                0.0);
    }
  }
}

TEST(LoadBalancingLoss, EqualsAlphaAtPerfectBalance) {
  const int64_t E = 4, K = 2;
  auto counts = torch::full({E}, 5, torch::kLong);  // 10 tokens x 2 selections spread evenly
  auto P = torch::full({E}, 1.0 / E, torch::kDouble);
  auto loss = load_balancing_loss(counts, 10, P, K, 0.01);
  EXPECT_NEAR(loss.item<double>(), 0.01, 1e-15);
}

TEST(LoadBalancingLoss, EqualsAlphaTimesEWhenAllPickOneExpert) {
  const int64_t E = 8;
  auto scores = torch::zeros({6, E}, torch::kDouble);
  scores.select(1, 3).fill_(1.0);
  auto ids = torch::full({6, 1}, 3, torch::kLong);
  auto loss = micro_load_balancing_loss(scores, ids, {}, 0.01);
  EXPECT_NEAR(loss.item<double>(), 0.01 * E, 1e-15);
}

TEST(LoadBalancingLoss, GradientFlowsThroughPOnly) {
  torch::manual_seed(0);
  const int64_t E = 5, K = 2;
  auto logits = torch::randn({7, E}, torch::kDouble).requires_grad_();
  auto scores = torch::softmax(logits, -1);
  auto ids = std::get<1>(scores.topk(K, -1));
  auto loss = micro_load_balancing_loss(scores, ids, {}, 0.1);
  auto g = torch::autograd::grad({loss}, {logits})[0];
  // By hand: loss = alpha E sum_i f_i mean_t s_ti with f constant.
  auto counts = torch::zeros({E}, torch::kDouble)
                    .index_add_(0, ids.reshape({-1}), torch::ones({7 * K}, torch::kDouble));
  auto f = counts / (K * 7.0);
  auto logits2 = logits.detach().clone().requires_grad_();
  auto ref = 0.1 * E * (f * torch::softmax(logits2, -1).mean(0)).sum();
  auto g_ref = torch::autograd::grad({ref}, {logits2})[0];
  EXPECT_NEAR(loss.item<double>(), ref.item<double>(), 1e-14);
  EXPECT_LT(max_rel_diff(g, g_ref), 1e-12);
  // f is detached: a loss built from f alone has no gradient path.
  EXPECT_FALSE(selection_frequency(counts.requires_grad_(), 7, K).requires_grad());
}

TEST(LoadBalancingLoss, MaskedTokensChangeNothing) {
  torch::manual_seed(1);
  const int64_t E = 4, K = 2;
  auto scores = torch::softmax(torch::randn({10, E}, torch::kDouble), -1);
  auto ids = std::get<1>(scores.topk(K, -1));
  auto valid = torch::ones({10}, torch::kBool);
  valid.slice(0, 6).fill_(false);
  auto masked = micro_load_balancing_loss(scores, ids, valid, 0.01);
  // Changing what the masked tokens hold changes nothing.
  auto scores2 = scores.clone();
  scores2.slice(0, 6).copy_(torch::softmax(torch::randn({4, E}, torch::kDouble), -1));
  auto ids2 = ids.clone();
  ids2.slice(0, 6).fill_(0);
  EXPECT_DOUBLE_EQ(masked.item<double>(),
                   micro_load_balancing_loss(scores2, ids2, valid, 0.01).item<double>());
  auto first6 = micro_load_balancing_loss(scores.slice(0, 0, 6), ids.slice(0, 0, 6), {}, 0.01);
  EXPECT_NEAR(masked.item<double>(), first6.item<double>(), 1e-15);
}

TEST(LoadBalancingLoss, SequenceScopeIsMeanOfPerSequenceLosses) {
  torch::manual_seed(2);
  const int64_t B = 3, S = 5, E = 6, K = 2;
  auto scores = torch::softmax(torch::randn({B, S, E}, torch::kDouble), -1);
  auto ids = std::get<1>(scores.topk(K, -1));
  auto valid = torch::ones({B, S}, torch::kBool);
  valid[1].slice(0, 3).fill_(false);  // sequence 1 has padding
  auto loss = sequence_load_balancing_loss(scores, ids, valid, 0.01);
  double sum = 0;
  for (int64_t b = 0; b < B; ++b) {
    sum += micro_load_balancing_loss(scores[b], ids[b], valid[b], 0.01).item<double>();
  }
  EXPECT_NEAR(loss.item<double>(), sum / B, 1e-15);
}

TEST(LoadBalancingLoss, SequenceScopeSkipsEmptySequences) {
  const int64_t B = 2, S = 4, E = 4, K = 1;
  auto scores = torch::softmax(torch::randn({B, S, E}, torch::kDouble), -1);
  auto ids = std::get<1>(scores.topk(K, -1));
  auto valid = torch::ones({B, S}, torch::kBool);
  valid[1].fill_(false);
  auto loss = sequence_load_balancing_loss(scores, ids, valid, 0.01);
  auto only = micro_load_balancing_loss(scores[0], ids[0], {}, 0.01);
  EXPECT_NEAR(loss.item<double>(), only.item<double>(), 1e-15);
}

TEST(RouterZLoss, IsBetaTimesMeanSquaredLogSumExpOfValidTokens) {
  auto logits = torch::tensor({{0.0, 0.0}, {1.0, 2.0}, {5.0, 5.0}}, torch::kDouble);
  auto valid = torch::tensor({true, true, false});
  auto z = router_z_loss(logits, valid, 0.5);
  const double l0 = std::log(2.0), l1 = std::log(std::exp(1.0) + std::exp(2.0));
  EXPECT_NEAR(z.item<double>(), 0.5 * (l0 * l0 + l1 * l1) / 2, 1e-14);
}

TEST(MaxViolation, IsRelativeExcessOfTheBusiestExpert) {
  EXPECT_DOUBLE_EQ(max_violation(torch::tensor({2, 2, 2, 2}, torch::kLong)), 0.0);
  EXPECT_DOUBLE_EQ(max_violation(torch::tensor({6, 2, 0, 0}, torch::kLong)), 2.0);
  EXPECT_DOUBLE_EQ(max_violation(torch::zeros({4}, torch::kLong)), 0.0);
}

TEST(BalanceOptions, RejectBadValuesByName) {
  expect_throw_with([] { BalanceOptions().alpha(-1).validate(); }, "balance alpha (-1)");
  expect_throw_with([] { balance_scope_from_string("batch"); }, "balance scope (batch)");
}

}  // namespace
}  // namespace gbmoe
