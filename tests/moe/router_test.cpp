// Router: scores, top-k, renormalization, masks, selection bias, option checks.
#include "moe/router.h"

#include <gtest/gtest.h>

#include "tests/test_util.h"

namespace gbmoe {
namespace {

TEST(Router, SoftmaxScoresAndTopKMatchExplicitReference) {
  torch::manual_seed(0);
  Router router(RouterOptions(16, 6).top_k(2).renormalize(false));
  auto x = torch::randn({10, 16});
  auto r = router->forward(x);
  auto logits = x.matmul(router->weight.t());
  auto scores = torch::softmax(logits, -1);
  EXPECT_TRUE(torch::allclose(r.logits, logits, 1e-5, 1e-6));
  EXPECT_TRUE(torch::allclose(r.scores, scores, 1e-5, 1e-6));
  for (int64_t t = 0; t < 10; ++t) {
    // the two largest scores, computed by hand
    auto row = scores[t];
    int64_t best = row.argmax().item<int64_t>();
    auto rest = row.clone();
    rest[best] = -1;
    int64_t second = rest.argmax().item<int64_t>();
    EXPECT_EQ(r.expert_ids[t][0].item<int64_t>(), best);
    EXPECT_EQ(r.expert_ids[t][1].item<int64_t>(), second);
    EXPECT_NEAR(r.weights[t][0].item<float>(), row[best].item<float>(), 1e-6);
    EXPECT_NEAR(r.weights[t][1].item<float>(), row[second].item<float>(), 1e-6);
  }
  EXPECT_EQ(r.num_valid, 10);
  EXPECT_EQ(r.counts.sum().item<int64_t>(), 20);
}

TEST(Router, RenormalizedWeightsSumToOne) {
  torch::manual_seed(1);
  Router router(RouterOptions(8, 8).top_k(3));
  auto r = router->forward(torch::randn({32, 8}));
  EXPECT_TRUE(torch::allclose(r.weights.sum(-1), torch::ones({32}), 1e-6, 1e-6));
  auto raw = r.scores.gather(-1, r.expert_ids);
  EXPECT_TRUE(torch::allclose(r.weights, raw / raw.sum(-1, true), 1e-6, 1e-7));
}

TEST(Router, TopOneIsNotRenormalized) {
  torch::manual_seed(2);
  Router router(RouterOptions(8, 4).top_k(1));
  auto r = router->forward(torch::randn({16, 8}));
  EXPECT_TRUE(torch::allclose(r.weights.squeeze(-1), std::get<0>(r.scores.max(-1)), 1e-6, 1e-7));
}

TEST(Router, SigmoidSelectsBySigmoidAndNormalizesScores) {
  torch::manual_seed(3);
  Router router(RouterOptions(8, 6).top_k(2).score_function(ScoreFunction::Sigmoid));
  auto x = torch::randn({20, 8});
  auto r = router->forward(x);
  auto g = torch::sigmoid(x.matmul(router->weight.t()));
  EXPECT_TRUE(torch::allclose(r.scores, g / g.sum(-1, true), 1e-5, 1e-6));
  auto ref_ids = std::get<1>(g.topk(2, -1));
  EXPECT_TRUE(torch::equal(r.expert_ids, ref_ids));
  auto raw = g.gather(-1, ref_ids);
  EXPECT_TRUE(torch::allclose(r.weights, raw / raw.sum(-1, true), 1e-5, 1e-6));
}

TEST(Router, MaskedTokensAreNotCounted) {
  torch::manual_seed(4);
  Router router(RouterOptions(8, 4).top_k(2));
  auto x = torch::randn({12, 8});
  auto mask = torch::ones({12}, torch::kBool);
  mask.slice(0, 8).fill_(false);
  auto r = router->forward(x, mask);
  EXPECT_EQ(r.num_valid, 8);
  auto first8 = router->forward(x.slice(0, 0, 8));
  EXPECT_TRUE(torch::equal(r.counts, first8.counts));
  EXPECT_EQ(r.counts.sum().item<int64_t>(), 16);
}

TEST(Router, ExpertBiasChangesSelectionNotWeights) {
  torch::manual_seed(5);
  Router router(RouterOptions(8, 4).top_k(1));
  auto x = torch::randn({64, 8});
  {
    torch::NoGradGuard g;
    router->expert_bias.copy_(torch::tensor({0.f, 0.f, 0.f, 10.f}));
  }
  auto r = router->forward(x);
  EXPECT_TRUE((r.expert_ids == 3).all().item<bool>());
  EXPECT_EQ(r.counts[3].item<int64_t>(), 64);
  // weights are the unbiased scores of the chosen expert
  EXPECT_TRUE(torch::allclose(r.weights.squeeze(-1), r.scores.select(1, 3), 1e-6, 1e-7));
}

TEST(Router, GateRunsInFp32ForLowPrecisionInput) {
  torch::manual_seed(6);
  Router router(RouterOptions(8, 4).top_k(2));
  auto r = router->forward(torch::randn({4, 8}).to(torch::kBFloat16));
  EXPECT_EQ(r.logits.scalar_type(), torch::kFloat);
  EXPECT_EQ(r.weights.scalar_type(), torch::kFloat);
}

TEST(Router, InvalidOptionsNameTheOptionAndValue) {
  expect_throw_with([] { Router(RouterOptions(8, 4).top_k(5)); }, "top_k (5)");
  expect_throw_with([] { Router(RouterOptions(8, 0)); }, "num_experts (0)");
  expect_throw_with([] { Router(RouterOptions(8, 4).top_k(0)); }, "top_k (0)");
  expect_throw_with([] { Router(RouterOptions(8, 4).init_std(0)); }, "router init_std (0)");
  expect_throw_with([] { score_function_from_string("relu"); }, "score_function (relu)");
}

}  // namespace
}  // namespace gbmoe
