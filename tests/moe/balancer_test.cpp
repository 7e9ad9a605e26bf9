// Balancer in one process: running buffer, reset, eval and recompute, weighting, scopes,
// loss-free bias, and the zero-gradient property of a globally balanced batch. Other ranks are
// simulated by a reducer that adds their known counts.
#include "moe/balancer.h"

#include <gtest/gtest.h>

#include "moe/recompute.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

// Pretends to be a group of `ranks` ranks whose other members contribute `others`
// (packed like the balancer's buffer: E counts then the token count, per layer, then
// optionally their step tokens).
struct FakeReducer : CountReducer {
  FakeReducer(torch::Tensor others, int64_t ranks) : others(std::move(others)), ranks(ranks) {}
  int64_t size() const override { return ranks; }
  std::function<void()> sum_async(torch::Tensor& buffer) override {
    ++calls;
    return [&buffer, this] { buffer.narrow(0, 0, others.numel()) += others; };
  }
  torch::Tensor others;
  int64_t ranks;
  int calls = 0;
};

MoELayer make_layer(BalanceScope scope, int64_t E = 4, int64_t K = 2, double micro_alpha = 0) {
  MoELayer layer(MoELayerOptions(8, E, 6)
                     .router(RouterOptions().top_k(K).z_loss_coef(0))
                     .balance(BalanceOptions().scope(scope).alpha(0.1).micro_alpha(micro_alpha)));
  layer->to(torch::kDouble);
  return layer;
}

TEST(Balancer, RunningBufferFollowsTheCumulativeFormulaAndResets) {
  torch::manual_seed(0);
  auto layer = make_layer(BalanceScope::Global);
  auto others = torch::tensor({3.0, 1.0, 0.0, 4.0, 4.0});  // another rank: 4 tokens, K = 2
  auto reducer = std::make_shared<FakeReducer>(others, 2);
  Balancer balancer({layer}, reducer);
  const int64_t M = 3;
  balancer.begin_step(M);
  auto expected = torch::zeros({4}, torch::kDouble);
  double tokens = 0;
  for (int64_t m = 1; m <= M; ++m) {
    layer->forward(torch::randn({5, 8}, torch::kDouble));
    expected += layer->stats().counts.to(torch::kDouble) + others.narrow(0, 0, 4);
    tokens += 5 + 4;
    balancer.micro_batch_loss();
    EXPECT_TRUE(torch::equal(balancer.running_counts(0), expected)) << "micro-batch " << m;
    EXPECT_EQ(balancer.running_tokens(0), tokens);
    auto f = balancer.stats()[0].frequency;
    EXPECT_LT(max_rel_diff(f, expected / (2 * tokens)), 1e-15);
    EXPECT_NEAR(f.sum().item<double>(), 1.0, 1e-15);
  }
  EXPECT_EQ(reducer->calls, M);  // one collective per micro-batch for the whole model
  auto step_stats = balancer.end_step();
  EXPECT_EQ(step_stats[0].micro_batches, M);
  EXPECT_EQ(balancer.running_tokens(0), 0.0);
  EXPECT_EQ(balancer.running_counts(0).abs().sum().item<double>(), 0.0);
}

TEST(Balancer, EvaluationAndRecomputedForwardsLeaveTheBufferAlone) {
  torch::manual_seed(1);
  auto layer = make_layer(BalanceScope::Global);
  auto reducer = std::make_shared<FakeReducer>(torch::zeros({5}, torch::kDouble), 1);
  Balancer balancer({layer}, reducer);
  balancer.begin_step(2);
  auto x1 = torch::randn({6, 8}, torch::kDouble);
  layer->forward(x1);
  auto c1 = layer->stats().counts.to(torch::kDouble);
  balancer.micro_batch_loss();
  // An evaluation forward on other data.
  layer->eval();
  layer->forward(torch::randn({50, 8}, torch::kDouble));
  layer->train();
  // A recomputed forward of the first micro-batch (activation checkpointing).
  {
    RecomputeGuard recompute;
    layer->forward(x1);
  }
  EXPECT_TRUE(torch::equal(balancer.running_counts(0), c1));
  EXPECT_EQ(balancer.running_tokens(0), 6.0);
  auto x2 = torch::randn({7, 8}, torch::kDouble);
  layer->forward(x2);
  auto c2 = layer->stats().counts.to(torch::kDouble);
  balancer.micro_batch_loss();
  EXPECT_TRUE(torch::equal(balancer.running_counts(0), c1 + c2));
  EXPECT_EQ(balancer.running_tokens(0), 13.0);
  EXPECT_EQ(reducer->calls, 2);
}

TEST(Balancer, GlobalLossIsLblOfBufferTimesRankWeight) {
  torch::manual_seed(2);
  auto layer = make_layer(BalanceScope::Global);
  auto others = torch::tensor({2.0, 6.0, 4.0, 0.0, 6.0});  // 6 tokens on the other rank
  Balancer balancer({layer}, std::make_shared<FakeReducer>(others, 2));
  balancer.begin_step(1, /*step_tokens=*/10 + 6);
  layer->forward(torch::randn({10, 8}, torch::kDouble));
  auto loss = balancer.micro_batch_loss();
  auto counts = layer->stats().counts.to(torch::kDouble) + others.narrow(0, 0, 4);
  auto f = counts / (2 * 16.0);
  auto P = layer->stats().prob_mean;
  const double weight = 10.0 * 2 * 1 / 16.0;  // n_r R M / N
  const double expected = 0.1 * 4 * (f * P).sum().item<double>() * weight;
  EXPECT_NEAR(loss.item<double>(), expected, 1e-15);
}

TEST(Balancer, LocalStepTokensRideWithTheFirstReductionAndGiveTheSameLoss) {
  // Two micro-batches of 10 and 7 tokens here; the other rank has 6 + 5 tokens in the step.
  auto others_m1 = torch::tensor({2.0, 6.0, 4.0, 0.0, 6.0, 11.0});  // + its step tokens
  auto others_m2 = torch::tensor({4.0, 2.0, 2.0, 2.0, 5.0, 0.0});
  auto x1 = torch::randn({10, 8}, torch::kDouble), x2 = torch::randn({7, 8}, torch::kDouble);
  enum Given { Explicit, Local, Estimated };
  std::vector<double> losses[3];
  int calls[3] = {0, 0, 0};
  for (Given given : {Explicit, Local, Estimated}) {
    torch::manual_seed(5);
    auto layer = make_layer(BalanceScope::Global);
    auto reducer = std::make_shared<FakeReducer>(others_m1, 2);
    Balancer balancer({layer}, reducer);
    balancer.begin_step(2, given == Explicit ? 10 + 7 + 11 : 0.0);
    if (given == Local) balancer.set_local_step_tokens(10 + 7);
    layer->forward(x1);
    losses[given].push_back(balancer.micro_batch_loss().item<double>());
    reducer->others = others_m2;
    layer->forward(x2);
    losses[given].push_back(balancer.micro_batch_loss().item<double>());
    calls[given] = reducer->calls;
    balancer.end_step();
  }
  EXPECT_EQ(calls[Local], 2);  // no collective of its own
  for (int m = 0; m < 2; ++m) {
    EXPECT_NEAR(losses[Local][m], losses[Explicit][m], 1e-15) << "micro-batch " << m;
  }
  // Without the step tokens, the first micro-batch's weight is an estimate (16 * 2 tokens).
  EXPECT_GT(std::abs(losses[Estimated][0] - losses[Explicit][0]), 1e-6);
}

TEST(Balancer, EstimatesStepTokensWhenNotGiven) {
  torch::manual_seed(3);
  auto layer = make_layer(BalanceScope::Global);
  Balancer balancer({layer}, nullptr);
  balancer.begin_step(2);
  layer->forward(torch::randn({8, 8}, torch::kDouble));
  auto loss = balancer.micro_batch_loss();
  // One rank, m = 1 of M = 2: N is estimated as 8 * 2, weight n R M / N = 8 * 2 / 16 = 1.
  auto f = layer->stats().counts.to(torch::kDouble) / 16.0;
  EXPECT_NEAR(loss.item<double>(), 0.4 * (f * layer->stats().prob_mean).sum().item<double>(),
              1e-15);
}

TEST(Balancer, MicroScopeIsTheLayersMicroLossPlusZLoss) {
  torch::manual_seed(4);
  MoELayer layer(MoELayerOptions(8, 4, 6).router(RouterOptions().top_k(2).z_loss_coef(1e-2)));
  Balancer balancer({layer});
  layer->forward(torch::randn({9, 8}));
  auto loss = balancer.micro_batch_loss();
  const auto& r = layer->last_routing();
  auto ref = micro_load_balancing_loss(r.scores, r.expert_ids, r.valid, 0.01) +
             router_z_loss(r.logits, r.valid, 1e-2);
  EXPECT_NEAR(loss.item<float>(), ref.item<float>(), 1e-7);
}

TEST(Balancer, MicroAlphaAddsAMicroBatchLoss) {
  torch::manual_seed(5);
  auto layer = make_layer(BalanceScope::Global, 4, 2, /*micro_alpha=*/0.001);
  Balancer balancer({layer}, nullptr);
  layer->forward(torch::randn({9, 8}, torch::kDouble));
  auto loss = balancer.micro_batch_loss();
  const auto& r = layer->last_routing();
  // One rank, one micro-batch: global f equals micro f, so the total is (alpha + micro_alpha) LBL.
  auto micro = micro_load_balancing_loss(r.scores, r.expert_ids, r.valid, 1.0);
  EXPECT_NEAR(loss.item<double>(), (0.1 + 0.001) * micro.item<double>(), 1e-15);
}

TEST(Balancer, GloballyBalancedBatchGivesTheRouterNoGradient) {
  // This rank's tokens favour experts 0 and 1; the other rank's favour 2 and 3, so that the
  // global batch is balanced. The global loss then has zero gradient; the micro loss pushes
  // this rank's tokens away from its favourite experts.
  torch::manual_seed(6);
  const int64_t E = 4, T = 16;
  for (auto scope : {BalanceScope::Global, BalanceScope::Micro}) {
    MoELayer layer(MoELayerOptions(8, E, 6)
                       .router(RouterOptions().top_k(2).z_loss_coef(0))
                       .balance(BalanceOptions().scope(scope).alpha(0.1)));
    layer->to(torch::kDouble);
    {
      torch::NoGradGuard g;
      layer->router->weight.zero_();
      layer->router->weight.select(1, 0).copy_(torch::tensor({2.0, 2.0, -2.0, -2.0}));
    }
    auto x = torch::zeros({T, 8}, torch::kDouble);
    x.select(1, 0).fill_(1.0);
    x.select(1, 1).copy_(torch::randn({T}, torch::kDouble));
    layer->forward(x);  // learn this rank's counts, then run the step for real
    auto local = layer->stats().counts.to(torch::kDouble);
    ASSERT_EQ(local[0].item<double>() + local[1].item<double>(), 2.0 * T);
    // the other rank mirrors this one onto experts 2, 3
    auto others = torch::cat({torch::stack({local[2], local[3], local[0], local[1]}),
                              torch::full({1}, double(T), torch::kDouble)});
    Balancer balancer({layer}, std::make_shared<FakeReducer>(others, 2));
    balancer.begin_step(1, 2.0 * T);
    layer->forward(x);
    auto loss = balancer.micro_batch_loss();
    auto grad = torch::autograd::grad({loss}, {layer->router->weight})[0];
    if (scope == BalanceScope::Global) {
      EXPECT_LT(grad.abs().max().item<double>(), 1e-12);
    } else {
      EXPECT_GT(grad.abs().max().item<double>(), 1e-4);
      // gradient descent lowers the logits of the over-used experts 0 and 1 for these tokens
      auto new_w = layer->router->weight.detach() - 10.0 * grad;
      auto before = torch::softmax(x.matmul(layer->router->weight.detach().t()), -1);
      auto after = torch::softmax(x.matmul(new_w.t()), -1);
      EXPECT_LT((after.select(1, 0) + after.select(1, 1)).mean().item<double>(),
                (before.select(1, 0) + before.select(1, 1)).mean().item<double>());
    }
  }
}

TEST(Balancer, LossFreeMovesBiasAgainstTheLoad) {
  torch::manual_seed(7);
  MoELayer layer(MoELayerOptions(8, 4, 6)
                     .router(RouterOptions().top_k(1).z_loss_coef(0))
                     .balance(BalanceOptions()
                                  .scope(BalanceScope::Global)
                                  .method(BalanceMethod::LossFree)
                                  .bias_update_rate(0.01)));
  auto others = torch::tensor({0.0, 0.0, 0.0, 20.0, 20.0});  // the other rank sends all to 3
  Balancer balancer({layer}, std::make_shared<FakeReducer>(others, 2));
  layer->forward(torch::randn({8, 8}));
  auto loss = balancer.micro_batch_loss();
  EXPECT_EQ(loss.item<float>(), 0.f);  // no balancing loss with loss-free balancing
  balancer.end_step();
  auto bias = layer->router->expert_bias;
  EXPECT_FLOAT_EQ(bias[3].item<float>(), -0.01f);  // expert 3 is over the mean
  EXPECT_GE(bias.sum().item<float>(), -0.01f);
}

TEST(Balancer, MisuseIsReportedClearly) {
  auto layer = make_layer(BalanceScope::Global);
  Balancer balancer({layer});
  expect_throw_with([&] { balancer.micro_batch_loss(); }, "0 of 1 layers ran");
  layer->forward(torch::randn({4, 8}, torch::kDouble));
  expect_throw_with(
      [&] {
        layer->forward(torch::randn({4, 8}, torch::kDouble));
      },
      "ran twice in one micro-batch");
  balancer.micro_batch_loss();
  layer->forward(torch::randn({4, 8}, torch::kDouble));
  expect_throw_with([&] { balancer.micro_batch_loss(); }, "micro-batch 2 in a step opened for 1");
  expect_throw_with([&] { balancer.begin_step(0); }, "num_micro_batches (0)");
}

}  // namespace
}  // namespace gbmoe
