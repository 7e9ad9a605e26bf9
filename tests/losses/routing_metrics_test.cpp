// Per-layer routing metrics against values computed by hand on a fixed routing with a dead
// expert.
#include <gtest/gtest.h>

#include <cmath>

#include "losses/routing_metrics.h"

namespace gbmoe {
namespace {

// 4 experts, top-2, 3 valid tokens and one padding token; expert 3 gets no token.
struct FixedRouting {
  torch::Tensor scores = torch::tensor(
      {{0.5, 0.3, 0.2, 0.0}, {0.1, 0.6, 0.3, 0.0}, {0.4, 0.4, 0.2, 0.0}, {0.0, 0.0, 0.0, 1.0}},
      torch::kDouble);
  torch::Tensor ids = torch::tensor({{0, 1}, {1, 2}, {0, 1}, {3, 2}}, torch::kLong);
  torch::Tensor valid = torch::tensor({true, true, true, false});
  torch::Tensor counts = torch::tensor({2.0, 3.0, 1.0, 0.0}, torch::kDouble);
};

double h(std::initializer_list<double> p) {
  double s = 0;
  for (double x : p) s -= x > 0 ? x * std::log(x) : 0.0;
  return s;
}

TEST(RoutingMetrics, LayerMetricsMatchHandComputedValues) {
  FixedRouting r;
  const double entropy =
      (h({0.5, 0.3, 0.2}) + h({0.1, 0.6, 0.3}) + h({0.4, 0.4, 0.2})) / 3.0;  // padding excluded
  EXPECT_NEAR(routing_entropy_sum(r.scores, r.valid) / 3.0, entropy, 1e-12);
  EXPECT_NEAR(routing_entropy_sum(r.scores, r.valid) / 3.0, 0.99418, 1e-5);
  EXPECT_NEAR(routing_topk_score_sum(r.scores, r.ids, r.valid), 0.8 + 0.9 + 0.8, 1e-12);

  auto m = layer_routing_metrics({r.counts, 0.75, entropy, 2.5 / 3.0});
  // Counts 2, 3, 1, 0: mean 1.5, max 3 -> MaxVio 1; population std sqrt(1.25) -> CV 0.745356.
  EXPECT_DOUBLE_EQ(m.max_violation_global, 1.0);
  EXPECT_DOUBLE_EQ(m.max_violation_micro, 0.75);
  EXPECT_NEAR(m.load_cv, std::sqrt(1.25) / 1.5, 1e-12);
  EXPECT_DOUBLE_EQ(m.dead_experts, 1.0);
  EXPECT_DOUBLE_EQ(m.entropy, entropy);
  EXPECT_DOUBLE_EQ(m.topk_score_sum, 2.5 / 3.0);
}

TEST(RoutingMetrics, BalancedAndEmptyLayers) {
  auto balanced = layer_routing_metrics({torch::full({8}, 5.0, torch::kDouble), 0, 0, 0});
  EXPECT_DOUBLE_EQ(balanced.max_violation_global, 0.0);
  EXPECT_DOUBLE_EQ(balanced.load_cv, 0.0);
  EXPECT_DOUBLE_EQ(balanced.dead_experts, 0.0);
  auto empty = layer_routing_metrics({torch::zeros({4}, torch::kDouble), 0, 0, 0});
  EXPECT_DOUBLE_EQ(empty.load_cv, 0.0);
  EXPECT_DOUBLE_EQ(empty.dead_experts, 4.0);
  EXPECT_THROW(layer_routing_metrics({torch::zeros({2, 2}), 0, 0, 0}), c10::Error);
}

TEST(RoutingMetrics, SpreadAcrossLayers) {
  auto s = spread({3.0, 1.0, 2.0});
  EXPECT_DOUBLE_EQ(s.min, 1.0);
  EXPECT_DOUBLE_EQ(s.median, 2.0);
  EXPECT_DOUBLE_EQ(s.max, 3.0);
  EXPECT_DOUBLE_EQ(spread({4.0, 1.0, 2.0, 10.0}).median, 3.0);

  std::vector<LayerRoutingMetrics> layers{
      layer_routing_metrics({torch::tensor({2.0, 3.0, 1.0, 0.0}, torch::kDouble), 0.5, 1.0, 0.8}),
      layer_routing_metrics({torch::tensor({1.0, 1.0, 1.0, 1.0}, torch::kDouble), 0.1, 1.3, 0.6}),
      layer_routing_metrics({torch::tensor({4.0, 0.0, 0.0, 0.0}, torch::kDouble), 0.9, 0.2, 0.9})};
  const auto a = across_layers(layers);
  ASSERT_EQ(a.size(), routing_metric_names().size());
  EXPECT_DOUBLE_EQ(a[0].min, 0.0);  // maxvio_global: 1, 0, 3
  EXPECT_DOUBLE_EQ(a[0].median, 1.0);
  EXPECT_DOUBLE_EQ(a[0].max, 3.0);
  EXPECT_DOUBLE_EQ(a[3].median, 1.0);  // dead experts: 1, 0, 3
  EXPECT_DOUBLE_EQ(a[4].max, 1.3);     // entropy
  EXPECT_DOUBLE_EQ(a[5].min, 0.6);     // top-k score sum

  // A fixed number of series whatever E: 4 lists of L values + 6 x 3 spreads.
  const auto json = routing_metrics_json(layers);
  EXPECT_NE(json.find("\"dead_experts\":[1,0,3]"), std::string::npos) << json;
  EXPECT_NE(json.find("\"maxvio_global\":{\"min\":0,\"median\":1,\"max\":3}"), std::string::npos)
      << json;
  EXPECT_EQ(json.find("\"maxvio_micro\":["), std::string::npos) << json;
}

}  // namespace
}  // namespace gbmoe
