// Tests of the routing analytics: figures of a small fixed routing computed by hand, and the
// per-domain sums of analyze_routing over batches of a tiny model with padding.
#include "train/analysis.h"

#include <gtest/gtest.h>

#include <cmath>

#include "test_util.h"

namespace gbmoe {
namespace {

// E = 4, K = 2: domain 0 has 2 tokens, both on experts 0 and 1; domain 1 has 1 token on 2 and 3.
LayerRouting separated_layer() {
  return LayerRouting{3, torch::tensor({{2.0, 2.0, 0.0, 0.0}, {0.0, 0.0, 1.0, 1.0}}),
                      torch::tensor({1.6, 0.9}, torch::kDouble)};
}

TEST(Analysis, FiguresOfASeparatedRoutingEqualHandComputedValues) {
  const auto tokens = torch::tensor({2.0, 1.0}, torch::kDouble);
  const auto f = layer_figures(separated_layer(), tokens);
  EXPECT_TRUE(torch::allclose(
      f.frequency, torch::tensor({{1.0, 1.0, 0.0, 0.0}, {0.0, 0.0, 1.0, 1.0}}, torch::kDouble)));
  // Perfectly separated: I = H(domain) with p(domain) = (4/6, 2/6).
  const double h = -(2.0 / 3 * std::log2(2.0 / 3) + 1.0 / 3 * std::log2(1.0 / 3));
  EXPECT_NEAR(f.mutual_information, h, 1e-12);
  EXPECT_NEAR(f.normalized_mi, 1.0, 1e-12);
  EXPECT_NEAR(f.mean_topk_score_sum, 2.5 / 3, 1e-12);
  EXPECT_TRUE(torch::allclose(f.domain_topk_score_sum, torch::tensor({0.8, 0.9}, torch::kDouble)));
  // Load (2, 2, 1, 1): mean 1.5, MaxVio 1/3; each domain alone uses half the experts: 1.
  EXPECT_NEAR(f.max_violation, 1.0 / 3, 1e-12);
  EXPECT_TRUE(torch::allclose(f.domain_max_violation, torch::tensor({1.0, 1.0}, torch::kDouble)));
}

TEST(Analysis, DomainIndependentRoutingHasNoMutualInformation) {
  LayerRouting layer{0, torch::tensor({{4.0, 2.0, 2.0}, {2.0, 1.0, 1.0}}),
                     torch::tensor({2.0, 1.0}, torch::kDouble)};
  const auto f = layer_figures(layer, torch::tensor({4.0, 2.0}, torch::kDouble));
  EXPECT_NEAR(f.mutual_information, 0.0, 1e-12);
  EXPECT_NEAR(f.normalized_mi, 0.0, 1e-12);
  EXPECT_TRUE(torch::allclose(f.domain_max_violation, torch::full({2}, 0.5, torch::kDouble)));
}

TEST(Analysis, FilesHoldOneRowPerLayerDomainAndExpert) {
  RoutingAnalysis a;
  a.domains = {"code", "prose"};
  a.num_experts = 4;
  a.top_k = 2;
  a.tokens = torch::tensor({2.0, 1.0}, torch::kDouble);
  a.loss_sum = torch::tensor({3.0, 4.0}, torch::kDouble);
  a.layers = {separated_layer(), separated_layer()};
  const auto json = analysis_json(a, "\"step\":7");
  EXPECT_EQ(json.rfind("{\"step\":7,\"domains\":[\"code\",\"prose\"]", 0), 0u) << json;
  EXPECT_NE(json.find("\"domain_val_loss\":{\"code\":1.5,\"prose\":4}"), std::string::npos);
  EXPECT_NE(json.find("\"selection_frequency\":[[1,1,0,0],[0,0,1,1]]"), std::string::npos);
  EXPECT_NE(json.find("\"mean\":{\"mutual_information\":0.9182958"), std::string::npos) << json;
  const auto selection = selection_csv(a);
  EXPECT_EQ(std::count(selection.begin(), selection.end(), '\n'), 1 + 2 * 2 * 4);
  EXPECT_NE(selection.find("\n1,3,prose,2,1,1\n"), std::string::npos) << selection;
  const auto layers = layers_csv(a);
  EXPECT_EQ(std::count(layers.begin(), layers.end(), '\n'), 1 + 2 * 3);
  EXPECT_NE(layers.find("\n0,3,all,3,2.333333,0.9182958,1,0.8333333,0.3333333\n"),
            std::string::npos)
      << layers;
}

class AnalyzeRoutingTest : public ::testing::Test {
 protected:
  AnalyzeRoutingTest()
      : model(LanguageModelOptions(50, 16, 2, 2)
                  .moe_layers({1})
                  .moe(MoELayerOptions(16, 4, 8).router(RouterOptions().top_k(2)))
                  .dense_hidden(16)) {
    torch::manual_seed(3);
    model->reset_parameters();
    for (int64_t d : {0, 1, 1}) batches.push_back(batch(d));
  }

  // Two sequences of domain d, the second padded after 5 of 8 positions.
  static Batch batch(int64_t d) {
    Batch b;
    b.inputs = torch::randint(50, {2, 8});
    b.mask = torch::ones({2, 8}, torch::kBool);
    b.mask[1].slice(0, 5) = false;
    b.targets = torch::where(b.mask, torch::randint(50, {2, 8}), torch::full({2, 8}, -100L));
    b.domain = torch::full({2}, d);
    return b;
  }

  LanguageModel model;
  std::vector<Batch> batches;
};

TEST_F(AnalyzeRoutingTest, SumsPerDomainOverValidTokens) {
  const auto a = analyze_routing(model, batches, {"code", "prose"});
  ASSERT_EQ(a.layers.size(), 1u);
  EXPECT_EQ(a.layers[0].block, 1);
  EXPECT_EQ(a.top_k, 2);
  EXPECT_TRUE(torch::equal(a.tokens, torch::tensor({13.0, 26.0}, torch::kDouble)));
  // Every valid token selects K experts; the counts are the layer's own, domain by domain.
  EXPECT_TRUE(torch::equal(a.layers[0].counts.sum(1), 2 * a.tokens));
  auto expected = torch::zeros({2, 4}, torch::kDouble);
  torch::NoGradGuard no_grad;
  model->eval();
  for (const auto& b : batches) {
    RoutingContext routing;
    model->forward(b.inputs, b.mask, &routing);
    ASSERT_EQ(routing.size(), 1);
    expected[b.domain[0].item<int64_t>()] += routing.layers()[0].routing.counts.to(torch::kDouble);
  }
  EXPECT_TRUE(torch::equal(a.layers[0].counts, expected));
  // A token's top-2 of 4 softmax scores holds between 2/4 and all of its probability.
  const auto mean_score = a.layers[0].score_sum / a.tokens;
  EXPECT_TRUE((mean_score >= 0.5).all().item<bool>() && (mean_score <= 1.0).all().item<bool>());
  EXPECT_GT(a.loss_sum.min().item<double>(), 0.0);
}

TEST_F(AnalyzeRoutingTest, RejectsBatchesMixingDomains) {
  batches[0].domain[1] = 1;
  expect_throw_with([&] { analyze_routing(model, batches, {"code", "prose"}); }, "one domain each");
}

}  // namespace
}  // namespace gbmoe
