// MoELayer: equals a hand-built forward, shared experts, masks, the routing it records, the layer
// trained on its own for each scope, option checks.
#include "moe/moe_layer.h"

#include <gtest/gtest.h>

#include "moe/objective.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

// The layer's forward written out token by token from its own parameters.
torch::Tensor reference_forward(MoELayerImpl& layer, const torch::Tensor& x_TD) {
  auto r = layer.router->forward(x_TD);
  const int64_t F = layer.options.expert_hidden();
  std::vector<torch::Tensor> rows;
  for (int64_t t = 0; t < x_TD.size(0); ++t) {
    auto y = torch::zeros({x_TD.size(1)}, x_TD.options());
    for (int64_t k = 0; k < r.top_k; ++k) {
      const int64_t e = r.expert_ids[t][k].item<int64_t>();
      auto h = x_TD[t].matmul(layer.experts->gate_up[e]);
      auto out =
          (torch::silu(h.narrow(0, 0, F)) * h.narrow(0, F, F)).matmul(layer.experts->down[e]);
      y = y + r.weights[t][k].to(x_TD.scalar_type()) * out;
    }
    if (layer.shared) y = y + layer.shared->forward(x_TD[t]);
    rows.push_back(y);
  }
  return torch::stack(rows);
}

TEST(MoELayer, ForwardEqualsTokenByTokenReferenceWithSharedExperts) {
  torch::manual_seed(0);
  MoELayer layer(MoELayerOptions(16, 6, 8).router(RouterOptions().top_k(2)).shared_experts(2));
  layer->to(torch::kDouble);
  auto x = torch::randn({2, 5, 16}, torch::kDouble);
  auto y = layer->forward(x);
  EXPECT_EQ(y.sizes(), x.sizes());
  auto ref = reference_forward(*layer, x.view({-1, 16})).view(x.sizes());
  EXPECT_LT(max_rel_diff(y, ref), 1e-12);
}

TEST(MoELayer, GradientsMatchTokenByTokenReference) {
  torch::manual_seed(1);
  MoELayer layer(MoELayerOptions(8, 4, 6).router(RouterOptions().top_k(2)));
  layer->to(torch::kDouble);
  auto x = torch::randn({9, 8}, torch::kDouble);
  auto params = layer->parameters();
  auto y = layer->forward(x);
  auto g = torch::autograd::grad({y.square().sum()}, params);
  auto ref = reference_forward(*layer, x);
  auto g_ref = torch::autograd::grad({ref.square().sum()}, params);
  for (size_t i = 0; i < params.size(); ++i) EXPECT_LT(max_rel_diff(g[i], g_ref[i]), 1e-11) << i;
}

TEST(MoELayer, RoutingRecordDescribesTheForward) {
  torch::manual_seed(2);
  MoELayer layer(MoELayerOptions(8, 4, 6).router(RouterOptions().top_k(2)));
  auto x = torch::randn({3, 7, 8});
  auto mask = torch::ones({3, 7}, torch::kBool);
  mask[2].slice(0, 4).fill_(false);
  RoutingContext routing;
  layer->forward(x, mask, &routing);
  ASSERT_EQ(routing.size(), 1);
  const auto& rec = routing.layers()[0];
  const auto& r = rec.routing;
  EXPECT_EQ(rec.lead_shape, (std::vector<int64_t>{3, 7}));
  EXPECT_EQ(rec.num_experts, 4);
  EXPECT_EQ(rec.num_dropped, 0);
  EXPECT_EQ(r.num_valid, 18);
  EXPECT_EQ(r.top_k, 2);
  EXPECT_EQ(r.counts.sum().item<int64_t>(), 36);
  EXPECT_TRUE(torch::equal(r.counts, count_selections(r.expert_ids, r.valid, 4)));
  EXPECT_TRUE(torch::equal(r.valid, mask.view({-1})));
  EXPECT_TRUE(r.scores.requires_grad());
  EXPECT_TRUE(r.logits.requires_grad());
  EXPECT_TRUE(mean_scores(r.scores, r.valid).requires_grad());
  // Without a context nothing is recorded anywhere.
  layer->forward(x, mask);
  EXPECT_EQ(routing.size(), 1);
}

// The README's way to train the layer alone: an objective over the one layer, no reducers.
// Scope micro trains the micro-batch LBL plus the z-loss, token-weighted with the task loss.
TEST(MoELayer, TrainedAloneTheMicroScopeObjectiveIsTheMicroBatchLossAndZLoss) {
  torch::manual_seed(2);
  MoELayer layer(MoELayerOptions(8, 4, 6).router(RouterOptions().top_k(2)));
  layer->to(torch::kDouble);
  auto x = torch::randn({3, 7, 8}, torch::kDouble);
  auto mask = torch::ones({3, 7}, torch::kBool);
  mask[2].slice(0, 4).fill_(false);
  TrainingObjective objective({layer}, BalanceOptions().scope(BalanceScope::Micro).z_loss(1e-2));
  objective.begin_step(1, 18);
  auto routing = objective.context();
  auto y = layer->forward(x, mask, &routing);
  auto task_sum = (y.square().sum(-1) * mask).sum();
  auto loss = objective.micro_batch_loss(routing, task_sum);
  const auto& r = routing.layers()[0].routing;
  auto expected = task_sum / 18 + micro_load_balancing_loss(r.scores, r.expert_ids, r.valid, 0.01) +
                  router_z_loss(r.logits, r.valid, 1e-2);
  EXPECT_LT(max_rel_diff(loss, expected), 1e-12);
  auto params = layer->parameters();
  auto g = torch::autograd::grad({loss}, params, {}, /*retain_graph=*/true);
  auto g_ref = torch::autograd::grad({expected}, params);
  for (size_t i = 0; i < params.size(); ++i) EXPECT_LT(max_rel_diff(g[i], g_ref[i]), 1e-11) << i;
  const auto values = objective.step_values();
  EXPECT_NEAR(values.task + values.balance + values.z_loss, loss.item<double>(), 1e-12);
  objective.end_step();
}

TEST(MoELayer, MaskedTokensDoNotChangeValidOutputsOrRouting) {
  torch::manual_seed(3);
  MoELayer layer(MoELayerOptions(8, 4, 6).router(RouterOptions().top_k(2)));
  auto x = torch::randn({10, 8});
  auto mask = torch::ones({10}, torch::kBool);
  mask.slice(0, 7).fill_(false);
  RoutingContext masked, cut;
  auto y = layer->forward(x, mask, &masked);
  auto y7 = layer->forward(x.slice(0, 0, 7), {}, &cut);
  EXPECT_TRUE(torch::allclose(y.slice(0, 0, 7), y7, 1e-6, 1e-7));
  EXPECT_TRUE((y.slice(0, 7) == 0).all().item<bool>());
  const auto& m = masked.layers()[0].routing;
  const auto& c = cut.layers()[0].routing;
  EXPECT_EQ(m.num_valid, 7);
  EXPECT_TRUE(torch::equal(m.counts, c.counts));
  auto loss_masked = micro_load_balancing_loss(m.scores, m.expert_ids, m.valid, 0.01);
  auto loss_cut = micro_load_balancing_loss(c.scores, c.expert_ids, c.valid, 0.01);
  EXPECT_NEAR(loss_masked.item<float>(), loss_cut.item<float>(), 1e-8);
  EXPECT_NEAR(router_z_loss(m.logits, m.valid, 1e-3).item<float>(),
              router_z_loss(c.logits, c.valid, 1e-3).item<float>(), 1e-8);
}

// Scope sequence reads the layer's (B, S, D) input as B sequences: with equal sequence lengths
// the token-weighted objective is the mean of the sequences' LBL, not the micro-batch LBL.
TEST(MoELayer, SequenceScopeUsesSequencesAndRefusesTokensWithoutThem) {
  torch::manual_seed(4);
  MoELayer layer(MoELayerOptions(8, 4, 6).router(RouterOptions().top_k(1)));
  TrainingObjective objective({layer}, BalanceOptions().scope(BalanceScope::Sequence).z_loss(0));
  auto x = torch::randn({3, 5, 8});
  objective.begin_step(1, 15);
  auto routing = objective.context();
  layer->forward(x, {}, &routing);
  auto loss = objective.micro_batch_loss(routing, torch::zeros({}));
  objective.end_step();
  const auto& r = routing.layers()[0].routing;
  auto ref = sequence_load_balancing_loss(r.scores.view({3, 5, 4}), r.expert_ids.view({3, 5, 1}),
                                          r.valid.view({3, 5}), 0.01);
  EXPECT_NEAR(loss.item<float>(), ref.item<float>(), 1e-8);
  auto micro = micro_load_balancing_loss(r.scores, r.expert_ids, r.valid, 0.01);
  EXPECT_GT(std::abs(micro.item<float>() - ref.item<float>()), 1e-6);

  // A (T, D) input has no sequences: the objective refuses as the layer records, naming the fix.
  objective.begin_step(1, 15);
  auto tokens = objective.context();
  expect_throw_with(
      [&] {
        layer->forward(x.view({15, 8}), {}, &tokens);
      },
      "balance scope sequence needs the MoE input as (B, S, D)");
}

TEST(MoELayer, CapacityDroppingIsReported) {
  torch::manual_seed(5);
  MoELayer layer(MoELayerOptions(8, 4, 6)
                     .router(RouterOptions().top_k(1))
                     .dispatcher(DispatcherOptions().capacity_factor(0.5)));
  RoutingContext routing;
  layer->forward(torch::randn({40, 8}), {}, &routing);
  // capacity = ceil(0.5 * 40 / 4) = 5 per expert: at most 20 of 40 assignments kept.
  EXPECT_GE(routing.layers()[0].num_dropped, 20);
  EXPECT_EQ(routing.layers()[0].routing.counts.sum().item<int64_t>(), 40);
}

TEST(MoELayer, BFloat16ActivationsKeepFp32Routing) {
  torch::manual_seed(6);
  MoELayer layer(MoELayerOptions(8, 4, 6).router(RouterOptions().top_k(2)));
  RoutingContext routing;
  auto y = layer->forward(torch::randn({6, 8}).to(torch::kBFloat16), {}, &routing);
  EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(routing.layers()[0].routing.scores.scalar_type(), torch::kFloat);
}

TEST(MoELayer, InvalidOptionsNameTheOptionAndValue) {
  expect_throw_with([] { MoELayer(MoELayerOptions(8, 4, 6).router(RouterOptions().top_k(5))); },
                    "top_k (5) must be in [1, num_experts (4)]");
  expect_throw_with([] { MoELayer(MoELayerOptions(8, 0, 6)); }, "num_experts (0)");
  expect_throw_with(
      [] {
        MoELayer(MoELayerOptions(8, 4, 6).dispatcher(DispatcherOptions().capacity_factor(-1)));
      },
      "capacity_factor (-1)");
  expect_throw_with([] { MoELayer(MoELayerOptions(8, 4, 6).shared_experts(-2)); },
                    "shared_experts (-2)");
  MoELayer layer(MoELayerOptions(8, 4, 6));
  expect_throw_with(
      [&] {
        layer->forward(torch::randn({3, 7}));
      },
      "MoELayer input must be (..., 8)");
}

TEST(MoELayer, CloneCopiesParametersIndependently) {
  MoELayer layer(MoELayerOptions(8, 4, 6).shared_experts(1));
  auto copy = std::dynamic_pointer_cast<MoELayerImpl>(layer->clone());
  ASSERT_TRUE(copy);
  EXPECT_TRUE(torch::equal(copy->experts->gate_up, layer->experts->gate_up));
  {
    torch::NoGradGuard g;
    copy->experts->gate_up.add_(1);
  }
  EXPECT_FALSE(torch::equal(copy->experts->gate_up, layer->experts->gate_up));
  auto x = torch::randn({4, 8});
  // The copy records only into the context it is given.
  RoutingContext original, copied;
  layer->forward(x, {}, &original);
  EXPECT_EQ(copy->forward(x, {}, &copied).sizes(), x.sizes());
  EXPECT_EQ(original.size(), 1);
  EXPECT_EQ(copied.size(), 1);
}

}  // namespace
}  // namespace gbmoe
