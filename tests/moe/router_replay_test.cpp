// Router replay: a replayed forward equals the recorded one bit for bit (output and router
// gradient), a given routing is followed, recomputation reuses the ids, bad lists fail clearly.
#include <gtest/gtest.h>

#include "moe/moe_layer.h"
#include "moe/recompute.h"
#include "moe/router.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

MoELayer make_layer() {
  torch::manual_seed(11);
  return MoELayer(MoELayerOptions(16, 6, 24).router(RouterOptions().top_k(2)));
}

TEST(RouterReplay, ReplayedForwardEqualsRecordedBitForBit) {
  auto layer = make_layer();
  torch::manual_seed(12);
  auto x1 = torch::randn({20, 16}), x2 = torch::randn({12, 16});

  layer->router->record_routing();
  auto y1 = layer->forward(x1);
  RoutingContext second;
  auto y2 = layer->forward(x2, {}, &second);
  (y1.square().sum() + y2.sum()).backward();
  auto grad = layer->router->weight.grad().clone();
  auto recorded = layer->router->recorded_routing();
  ASSERT_EQ(recorded.size(), 2u);
  EXPECT_TRUE(torch::equal(recorded[1], second.layers()[0].routing.expert_ids));

  layer->zero_grad();
  layer->router->replay_routing(recorded);
  RoutingContext first;
  auto r1 = layer->forward(x1, {}, &first);
  EXPECT_TRUE(torch::equal(first.layers()[0].routing.expert_ids, recorded[0]));
  auto r2 = layer->forward(x2);
  (r1.square().sum() + r2.sum()).backward();
  EXPECT_EQ(layer->router->replayed_forwards(), 2u);
  EXPECT_TRUE(torch::equal(r1, y1));
  EXPECT_TRUE(torch::equal(r2, y2));
  ASSERT_TRUE(layer->router->weight.grad().defined());
  EXPECT_TRUE(torch::equal(layer->router->weight.grad(), grad));
  EXPECT_GT(grad.abs().sum().item<double>(), 0.0);

  // Off again: the router's own top-k, same as recorded (same weights); recording ran the
  // reference ops, off runs the fused CPU pass (moe/router_cpu.h), equal to fp32 rounding.
  layer->router->stop_routing_replay();
  RoutingContext off;
  auto y_off = layer->forward(x1, {}, &off);
  EXPECT_TRUE(torch::equal(off.layers()[0].routing.expert_ids, recorded[0]));
  EXPECT_TRUE(torch::allclose(y_off, y1, 1e-5, 1e-6));
}

TEST(RouterReplay, ReplayKeepsChoicesAfterTheRouterChanges) {
  auto layer = make_layer();
  torch::manual_seed(13);
  auto x = torch::randn({30, 16});
  layer->router->record_routing();
  layer->forward(x);
  const auto ids = layer->router->recorded_routing()[0];
  {
    torch::NoGradGuard no_grad;
    layer->router->weight.add_(torch::randn_like(layer->router->weight));
  }
  layer->router->stop_routing_replay();
  auto own = layer->router->forward(x);
  EXPECT_FALSE(torch::equal(own.expert_ids, ids)) << "the perturbation should change routing";
  layer->router->replay_routing({ids});
  auto replayed = layer->router->forward(x);
  EXPECT_TRUE(torch::equal(replayed.expert_ids, ids));
  // Weights: the new router's scores at the replayed ids, renormalized.
  auto picked = replayed.scores.gather(1, ids);
  EXPECT_TRUE(torch::allclose(replayed.weights, picked / picked.sum(-1, true), 1e-6, 1e-7));
  EXPECT_TRUE(torch::equal(replayed.counts, count_selections(ids, replayed.valid, 6)));
}

TEST(RouterReplay, OutputsFollowAGivenRouting) {
  auto layer = make_layer();
  torch::manual_seed(14);
  auto x = torch::randn({25, 16});
  // Every token on experts 4 then 1: what the router itself picks when its selection bias
  // dominates (the bias selects only; weights come from the scores).
  auto given = torch::tensor({4, 1}, torch::kLong).repeat({25, 1});
  layer->router->replay_routing({given});
  auto y_given = layer->forward(x);
  layer->router->stop_routing_replay();
  auto y_own = layer->forward(x);
  EXPECT_FALSE(torch::allclose(y_given, y_own, 1e-4, 1e-5));
  {
    torch::NoGradGuard no_grad;
    layer->router->expert_bias[4] = 100.0;
    layer->router->expert_bias[1] = 50.0;
  }
  RoutingContext forced;
  auto y_forced = layer->forward(x, {}, &forced);
  ASSERT_TRUE(torch::equal(forced.layers()[0].routing.expert_ids, given));
  EXPECT_TRUE(torch::allclose(y_given, y_forced, 1e-6, 1e-7));

  // Per-token choices: the combine weights are the scores at the given ids.
  auto varied = torch::stack({torch::arange(25) % 6, (torch::arange(25) + 3) % 6}, 1);
  layer->router->replay_routing({varied});
  auto r = layer->router->forward(x);
  EXPECT_TRUE(torch::equal(r.expert_ids, varied));
  auto picked = r.scores.gather(1, varied);
  EXPECT_TRUE(torch::allclose(r.weights, picked / picked.sum(-1, true), 1e-6, 1e-7));
}

TEST(RouterReplay, RecomputedForwardsReuseTheIdsWithoutAdvancing) {
  Router router(RouterOptions(8, 4).top_k(2));
  torch::manual_seed(15);
  auto x = torch::randn({5, 8});
  auto given = torch::tensor({{0, 1}, {1, 2}, {2, 3}, {3, 0}, {0, 2}}, torch::kLong);
  router->replay_routing({given});
  router->forward(x);
  {
    RecomputeGuard recompute;
    EXPECT_TRUE(torch::equal(router->forward(x).expert_ids, given));
  }
  EXPECT_EQ(router->replayed_forwards(), 1u);

  router->record_routing();
  auto recorded = router->forward(x).expert_ids;
  {
    RecomputeGuard recompute;
    EXPECT_TRUE(torch::equal(router->forward(x).expert_ids, recorded));
  }
  EXPECT_EQ(router->recorded_routing().size(), 1u);
}

TEST(RouterReplay, BadReplayListsNameTheShapes) {
  Router router(RouterOptions(8, 4).top_k(2));
  auto x = torch::randn({5, 8});
  router->replay_routing({torch::zeros({4, 2}, torch::kLong)});
  expect_throw_with([&] { router->forward(x); }, "routes (5, 2) token choices");
  router->replay_routing({torch::zeros({5, 2}, torch::kLong)});
  router->forward(x);
  expect_throw_with([&] { router->forward(x); }, "only 1 routings were given");
  router->replay_routing({torch::full({5, 2}, 7, torch::kLong)});
  expect_throw_with([&] { router->forward(x); }, "must be in [0, num_experts (4))");
  router->stop_routing_replay();
  {
    RecomputeGuard recompute;
    router->record_routing();
    expect_throw_with([&] { router->forward(x); }, "before any recorded forward");
  }
}

}  // namespace
}  // namespace gbmoe
