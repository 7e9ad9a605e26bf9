// The Shuffle ablation on one process: the seeded subset draw, its size, and the objective's
// balancing term, which is LBL(f(S), P(S)) of the drawn subset S (loss and router gradient against
// an fp64 re-derivation; the running buffer holds S's counts), and the options it needs.
#include "moe/balance_subset.h"

#include <gtest/gtest.h>

#include "moe/objective.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

constexpr int64_t kD = 8, kE = 5, kK = 2;
constexpr double kAlpha = 0.1;
constexpr uint64_t kSeed = 77;

// weighted_score_sum_backward is autograd's gradient of weighted_score_sum, bit for bit.
TEST(BalanceSubset, ScoreSumBackwardIsAutogradsGradientBitForBit) {
  torch::manual_seed(4);
  BalanceSubset subset(kSeed);
  const int64_t T = 12;
  auto valid = torch::ones({T}, torch::kBool);
  valid[3] = false;
  subset.begin_step(0, 1, valid.sum().item<double>(), nullptr);
  auto rows = subset.next_micro_batch(valid);
  ASSERT_GT(rows.sum().item<int64_t>(), 0);
  for (auto dtype : {torch::kFloat, torch::kDouble}) {
    auto scores = torch::rand({T, kE}, dtype).requires_grad_();
    auto grad_E = torch::randn({kE}, dtype);
    auto expected =
        torch::autograd::grad({subset.weighted_score_sum(scores, rows)}, {scores}, {grad_E})[0];
    auto got = subset.weighted_score_sum_backward(grad_E, rows);
    EXPECT_TRUE(torch::equal(got, expected)) << dtype;
    EXPECT_GT(got.abs().sum().item<double>(), 0.0);
  }
}

TEST(BalanceSubset, SizeIsAMicroBatchOnAverage) {
  EXPECT_EQ(shuffle_subset_size(8, 2, 2), 2);
  EXPECT_EQ(shuffle_subset_size(10, 2, 2), 3);  // 2.5 rounds up
  EXPECT_EQ(shuffle_subset_size(9, 2, 2), 2);
  EXPECT_EQ(shuffle_subset_size(1, 4, 4), 1);
  EXPECT_EQ(shuffle_subset_size(0, 4, 4), 0);
}

TEST(BalanceSubset, DrawIsASeededUniformSubset) {
  const int64_t N = 40, n = 10;
  auto S = draw_balance_subset(kSeed, 3, N, n);
  EXPECT_EQ(S.numel(), n);
  EXPECT_TRUE(torch::equal(S, std::get<0>(torch::unique_dim(S, 0))));  // sorted and distinct
  EXPECT_GE(S.min().item<int64_t>(), 0);
  EXPECT_LT(S.max().item<int64_t>(), N);
  EXPECT_TRUE(torch::equal(S, draw_balance_subset(kSeed, 3, N, n)));
  EXPECT_FALSE(torch::equal(S, draw_balance_subset(kSeed, 4, N, n)));
  EXPECT_FALSE(torch::equal(S, draw_balance_subset(kSeed + 1, 3, N, n)));
  // every token is drawn with probability n / N: 500 of 2000 steps (binomial sd 19)
  auto hits = torch::zeros({N}, torch::kLong);
  for (int64_t step = 0; step < 2000; ++step) {
    hits.index_add_(0, draw_balance_subset(kSeed, step, N, n), torch::ones({n}, torch::kLong));
  }
  EXPECT_GT(hits.min().item<int64_t>(), 400);
  EXPECT_LT(hits.max().item<int64_t>(), 600);
}

MoELayer make_layer() {
  torch::manual_seed(5);
  MoELayer layer(MoELayerOptions(kD, kE, 4).router(RouterOptions().top_k(kK)));
  layer->to(torch::kDouble);
  return layer;
}

BalanceOptions shuffle_options() {
  return BalanceOptions().alpha(kAlpha).z_loss(0).shuffle(true).shuffle_seed(kSeed);
}

// Micro-batch m: (B, S, D) and a mask with m + 2 padded positions in sequence 1.
std::pair<torch::Tensor, torch::Tensor> input(int64_t m) {
  auto gen = at::detail::createCPUGenerator(300 + m);
  auto x = at::randn({3, 6, kD}, gen, torch::kDouble);
  auto mask = torch::ones({3, 6}, torch::kBool);
  mask[1].narrow(0, 4 - m, m + 2).fill_(false);
  return {x, mask};
}

// The fp64 LBL(f(S), P(S)) of the subset S of the valid tokens (row-major, micro-batches in
// order) of `micro_batches`, through a copy of the layer, and its router gradient.
std::pair<double, torch::Tensor> reference(int64_t micro_batches, int64_t step) {
  auto ref = make_layer();
  std::vector<torch::Tensor> scores, ids;
  for (int64_t m = 0; m < micro_batches; ++m) {
    auto [x, mask] = input(m);
    RoutingContext plain;
    ref->forward(x, mask, &plain);
    const auto& r = plain.layers()[0].routing;
    scores.push_back(r.scores.index({r.valid}));
    ids.push_back(r.expert_ids.index({r.valid}));
  }
  auto s = torch::cat(scores), e = torch::cat(ids);
  const int64_t N = s.size(0), n = shuffle_subset_size(N, 1, micro_batches);
  auto S = draw_balance_subset(kSeed, step, N, n);
  auto counts = torch::zeros({kE}, torch::kDouble)
                    .index_add_(0, e.index({S}).flatten(), torch::ones({n * kK}, torch::kDouble));
  auto lbl = kAlpha * kE * (counts / (kK * n) * s.index({S}).mean(0)).sum();
  return {lbl.item<double>(), torch::autograd::grad({lbl}, {ref->router->weight})[0]};
}

double step_with(TrainingObjective& objective, MoELayer& layer, int64_t M) {
  double tokens = 0;
  for (int64_t m = 0; m < M; ++m) tokens += input(m).second.sum().item<double>();
  objective.begin_step(M, tokens);
  layer->zero_grad();
  double loss = 0;
  for (int64_t m = 0; m < M; ++m) {
    auto [x, mask] = input(m);
    auto routing = objective.context();
    layer->forward(x, mask, &routing);
    auto term = objective.micro_batch_loss(routing, torch::zeros({}, torch::kDouble));
    term.backward();
    loss += term.item<double>();
  }
  return loss;
}

// The defining property: with one micro-batch the step's balancing term and its gradient are
// those of LBL(f(S), P(S)) on the drawn subset; the step index picks the draw.
TEST(BalanceSubset, TheObjectivesTermIsTheLBLOfTheSubset) {
  for (int64_t step : {0, 5}) {
    auto layer = make_layer();
    TrainingObjective objective({layer}, shuffle_options());
    objective.set_step(step);
    const double loss = step_with(objective, layer, 1);
    auto [ref_loss, ref_grad] = reference(1, step);
    EXPECT_NEAR(loss, ref_loss, 1e-14 * ref_loss) << "step " << step;
    EXPECT_LT(max_rel_diff(layer->router->weight.grad(), ref_grad), 1e-12) << "step " << step;
    objective.end_step();
    EXPECT_EQ(objective.step(), step + 1);
  }
}

// Over M micro-batches the running buffer ends with the counts of S, and its n_S tokens.
TEST(BalanceSubset, TheRunningBufferCountsTheSubsetOfTheWholeStep) {
  const int64_t M = 3;
  auto layer = make_layer();
  TrainingObjective objective({layer}, shuffle_options());
  step_with(objective, layer, M);
  auto ref = make_layer();
  std::vector<torch::Tensor> ids;
  for (int64_t m = 0; m < M; ++m) {
    auto [x, mask] = input(m);
    RoutingContext plain;
    ref->forward(x, mask, &plain);
    ids.push_back(plain.layers()[0].routing.expert_ids.index({plain.layers()[0].routing.valid}));
  }
  auto e = torch::cat(ids);
  const int64_t N = e.size(0), n = shuffle_subset_size(N, 1, M);
  auto S = draw_balance_subset(kSeed, 0, N, n);
  auto counts = torch::zeros({kE}, torch::kDouble)
                    .index_add_(0, e.index({S}).flatten(), torch::ones({n * kK}, torch::kDouble));
  EXPECT_TRUE(torch::equal(objective.running_counts(0), counts));
  EXPECT_EQ(objective.running_tokens(0), static_cast<double>(n));
  auto stats = objective.end_step();
  // the step's figures of this rank still count every valid token
  EXPECT_EQ(stats[0].local_tokens, static_cast<double>(N));
}

TEST(BalanceSubset, NeedsScopeGlobalAndTheBalancingLoss) {
  expect_throw_with([] { shuffle_options().scope(BalanceScope::Micro).validate(); },
                    "balance shuffle needs scope global and method aux_loss, got scope micro and "
                    "method aux_loss");
  expect_throw_with([] { shuffle_options().method(BalanceMethod::Quantile).validate(); },
                    "got scope global and method quantile");
}

}  // namespace
}  // namespace gbmoe
