// MoELayer: equals a hand-built forward, shared experts, masks, stats, scopes, option checks.
#include "moe/moe_layer.h"

#include <gtest/gtest.h>

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
  MoELayer layer(MoELayerOptions(8, 4, 6).router(RouterOptions().top_k(2).z_loss_coef(0)));
  layer->to(torch::kDouble);
  auto x = torch::randn({9, 8}, torch::kDouble);
  auto params = layer->parameters();
  auto y = layer->forward(x);
  auto g = torch::autograd::grad({y.square().sum()}, params);
  auto ref = reference_forward(*layer, x);
  auto g_ref = torch::autograd::grad({ref.square().sum()}, params);
  for (size_t i = 0; i < params.size(); ++i) EXPECT_LT(max_rel_diff(g[i], g_ref[i]), 1e-11) << i;
}

TEST(MoELayer, StatsDescribeTheForward) {
  torch::manual_seed(2);
  MoELayer layer(MoELayerOptions(8, 4, 6).router(RouterOptions().top_k(2)));
  auto x = torch::randn({3, 7, 8});
  auto mask = torch::ones({3, 7}, torch::kBool);
  mask[2].slice(0, 4).fill_(false);
  layer->forward(x, mask);
  const auto& s = layer->stats();
  EXPECT_EQ(s.num_tokens, 18);
  EXPECT_EQ(s.counts.sum().item<int64_t>(), 36);
  auto r = layer->last_routing();
  auto ref = micro_load_balancing_loss(r.scores, r.expert_ids, r.valid, 0.01);
  EXPECT_NEAR(s.balance_loss.item<float>(), ref.item<float>(), 1e-7);
  auto z = router_z_loss(r.logits, r.valid, 1e-3);
  EXPECT_NEAR(s.z_loss.item<float>(), z.item<float>(), 1e-8);
  EXPECT_NEAR(s.aux_loss().item<float>(), ref.item<float>() + z.item<float>(), 1e-7);
  EXPECT_NEAR(s.max_violation, max_violation(s.counts), 1e-12);
  EXPECT_TRUE(s.prob_mean.requires_grad());
}

TEST(MoELayer, MaskedTokensDoNotChangeValidOutputsOrStats) {
  torch::manual_seed(3);
  MoELayer layer(MoELayerOptions(8, 4, 6).router(RouterOptions().top_k(2)));
  auto x = torch::randn({10, 8});
  auto mask = torch::ones({10}, torch::kBool);
  mask.slice(0, 7).fill_(false);
  auto y = layer->forward(x, mask);
  auto loss_masked = layer->stats().balance_loss.item<float>();
  auto y7 = layer->forward(x.slice(0, 0, 7));
  EXPECT_TRUE(torch::allclose(y.slice(0, 0, 7), y7, 1e-6, 1e-7));
  EXPECT_NEAR(layer->stats().balance_loss.item<float>(), loss_masked, 1e-8);
  EXPECT_TRUE((y.slice(0, 7) == 0).all().item<bool>());
}

TEST(MoELayer, SequenceScopeUsesSequences) {
  torch::manual_seed(4);
  MoELayer layer(MoELayerOptions(8, 4, 6)
                     .router(RouterOptions().top_k(1))
                     .balance(BalanceOptions().scope(BalanceScope::Sequence)));
  auto x = torch::randn({3, 5, 8});
  layer->forward(x);
  const auto& r = layer->last_routing();
  auto ref = sequence_load_balancing_loss(r.scores.view({3, 5, 4}), r.expert_ids.view({3, 5, 1}),
                                          r.valid.view({3, 5}), 0.01);
  EXPECT_NEAR(layer->stats().balance_loss.item<float>(), ref.item<float>(), 1e-8);
  auto micro = micro_load_balancing_loss(r.scores, r.expert_ids, r.valid, 0.01);
  EXPECT_GT(std::abs(micro.item<float>() - ref.item<float>()), 1e-6);
}

TEST(MoELayer, CapacityDroppingIsReported) {
  torch::manual_seed(5);
  MoELayer layer(MoELayerOptions(8, 4, 6)
                     .router(RouterOptions().top_k(1))
                     .dispatcher(DispatcherOptions().capacity_factor(0.5)));
  layer->forward(torch::randn({40, 8}));
  // capacity = ceil(0.5 * 40 / 4) = 5 per expert: at most 20 of 40 assignments kept.
  EXPECT_GE(layer->stats().num_dropped, 20);
  EXPECT_EQ(layer->stats().counts.sum().item<int64_t>(), 40);
}

TEST(MoELayer, BFloat16ActivationsKeepFp32Routing) {
  torch::manual_seed(6);
  MoELayer layer(MoELayerOptions(8, 4, 6).router(RouterOptions().top_k(2)));
  auto y = layer->forward(torch::randn({6, 8}).to(torch::kBFloat16));
  EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(layer->last_routing().scores.scalar_type(), torch::kFloat);
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
  EXPECT_EQ(copy->forward(x).sizes(), x.sizes());
}

}  // namespace
}  // namespace gbmoe
