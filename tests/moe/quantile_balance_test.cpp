// Quantile balancing through TrainingObjective on one process: after each step every router's
// bias is -(beta - mean beta) of its scope's thresholds, re-derived here in fp64 from the
// definition (losses/quantile.h) with kthvalue, for the global, micro and sequence scopes, softmax
// and sigmoid routers; with the thresholds of its batch every expert admits its quantile's share.
#include <gtest/gtest.h>

#include "losses/quantile.h"
#include "moe/objective.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

constexpr int64_t kD = 8, kE = 6, kK = 2;

MoELayer make_layer(ScoreFunction score = ScoreFunction::Softmax, int64_t K = kK) {
  torch::manual_seed(11);
  MoELayer layer(MoELayerOptions(kD, kE, 5).router(RouterOptions().top_k(K).score_function(score)));
  layer->to(torch::kDouble);
  torch::NoGradGuard no_grad;
  layer->router->expert_bias.copy_(0.02 * torch::randn({kE}, torch::kDouble));
  return layer;
}

TrainingObjective quantile_objective(MoELayer& layer, BalanceScope scope) {
  return TrainingObjective({layer},
                           BalanceOptions().scope(scope).method(BalanceMethod::Quantile).z_loss(0));
}

// (B, S, D) input of micro-batch m and its mask: sequence 0 has m + 1 padded positions at its end.
std::pair<torch::Tensor, torch::Tensor> micro_batch_input(int64_t m, int64_t B = 3, int64_t S = 7) {
  auto gen = at::detail::createCPUGenerator(100 + m);
  auto x = at::randn({B, S, kD}, gen, torch::kDouble);
  auto mask = torch::ones({B, S}, torch::kBool);
  mask[0].narrow(0, S - 1 - m, m + 1).fill_(false);
  return {x, mask};
}

// r_{t,i} = g_{t,i} - a_t of the valid tokens, from the definition: (n, E).
torch::Tensor reference_residuals(MoELayer& layer, const torch::Tensor& x,
                                  const torch::Tensor& mask) {
  torch::NoGradGuard no_grad;
  const auto& router = layer->router;
  auto logits = x.reshape({-1, kD}).matmul(router->weight.t());
  auto g = router->options.score_function() == ScoreFunction::Softmax ? torch::softmax(logits, -1)
                                                                      : torch::sigmoid(logits);
  auto sorted = std::get<0>((g + router->expert_bias).sort(-1, /*descending=*/true));
  auto r = g - sorted.select(1, router->options.top_k()).unsqueeze(1);
  return r.index({mask.reshape({-1})});
}

// beta_i = the (q+1)-th largest of column i = its (n - q)-th smallest, q = floor(n K / E).
torch::Tensor reference_thresholds(const torch::Tensor& rows, int64_t K = kK) {
  const int64_t n = rows.size(0), q = n * K / kE;
  return std::get<0>(rows.kthvalue(n - q, 0));
}

torch::Tensor recentred(const torch::Tensor& beta) { return -(beta - beta.mean()); }

double run_step(TrainingObjective& objective, MoELayer& layer, int64_t M, int64_t first = 0) {
  double tokens = 0;
  for (int64_t m = first; m < first + M; ++m)
    tokens += micro_batch_input(m).second.sum().item<double>();
  objective.begin_step(M, tokens);
  double loss = 0;
  for (int64_t m = first; m < first + M; ++m) {
    auto [x, mask] = micro_batch_input(m);
    auto routing = objective.context();
    layer->forward(x, mask, &routing);
    layer->forward(x);  // an evaluation forward in between changes nothing
    loss += objective.micro_batch_loss(routing, torch::zeros({}, torch::kDouble)).item<double>();
  }
  objective.end_step();
  return loss;
}

TEST(QuantileBalance, GlobalScopeSetsTheBiasFromTheStepsThresholds) {
  auto layer = make_layer();
  auto objective = quantile_objective(layer, BalanceScope::Global);
  const int64_t M = 3;
  for (int64_t step = 0; step < 2; ++step) {  // the second step starts from the first's bias
    std::vector<torch::Tensor> rows;
    for (int64_t m = step * M; m < (step + 1) * M; ++m) {
      auto [x, mask] = micro_batch_input(m);
      rows.push_back(reference_residuals(layer, x, mask));
    }
    auto all = torch::cat(rows);
    auto beta = reference_thresholds(all);
    EXPECT_EQ(run_step(objective, layer, M, step * M), 0.0);  // no balancing loss
    const auto& bias = layer->router->expert_bias;
    EXPECT_LT((bias - recentred(beta)).abs().max().item<double>(), 1e-15) << "step " << step;
    // the defining property on the step's batch: each expert admits floor(n K / E) tokens, the
    // tokens tied at its threshold aside (at most q above beta, more than q at or above it)
    const int64_t q = all.size(0) * kK / kE;
    EXPECT_TRUE(((all > beta).sum(0) <= q).all().item<bool>());
    EXPECT_TRUE(((all >= beta).sum(0) > q).all().item<bool>());
  }
}

TEST(QuantileBalance, MicroAndSequenceScopesAverageTheThresholdsOfTheirUnits) {
  for (auto scope : {BalanceScope::Micro, BalanceScope::Sequence}) {
    auto layer = make_layer();
    auto objective = quantile_objective(layer, scope);
    const int64_t M = 2;
    auto sum = torch::zeros({kE}, torch::kDouble);
    double units = 0;
    for (int64_t m = 0; m < M; ++m) {
      auto [x, mask] = micro_batch_input(m);
      if (scope == BalanceScope::Micro) {
        sum += reference_thresholds(reference_residuals(layer, x, mask));
        units += 1;
        continue;
      }
      for (int64_t b = 0; b < x.size(0); ++b) {
        sum += reference_thresholds(reference_residuals(layer, x[b], mask[b]));
        units += 1;
      }
    }
    run_step(objective, layer, M);
    EXPECT_LT((layer->router->expert_bias - recentred(sum / units)).abs().max().item<double>(),
              1e-15)
        << to_string(scope);
  }
}

TEST(QuantileBalance, SigmoidRoutersThresholdTheirSigmoidGates) {
  auto layer = make_layer(ScoreFunction::Sigmoid);
  auto objective = quantile_objective(layer, BalanceScope::Global);
  auto [x, mask] = micro_batch_input(0);
  auto beta = reference_thresholds(reference_residuals(layer, x, mask));
  run_step(objective, layer, 1);
  EXPECT_LT((layer->router->expert_bias - recentred(beta)).abs().max().item<double>(), 1e-15);
}

// One update from a skewed router's batch balances that batch's actual top-k loads (MaxVio
// 2.0 -> 0.13 here; it is not exact, since the token thresholds move with the bias).
TEST(QuantileBalance, BalancesASkewedRoutersLoads) {
  auto layer = make_layer();
  {
    torch::NoGradGuard no_grad;
    layer->router->weight.select(1, 0).narrow(0, 0, 2).add_(torch::tensor({1.0, 0.6}));
    layer->router->expert_bias.zero_();
  }
  auto objective = quantile_objective(layer, BalanceScope::Global);
  auto [x, mask] = micro_batch_input(0, 16, 16);
  x.select(-1, 0).fill_(3.0);  // experts 0 and 1 win for most tokens
  auto load = [&] {
    RoutingContext probe;
    layer->forward(x, mask, &probe);
    return max_violation(probe.layers()[0].routing.counts);
  };
  const double before = load();
  objective.begin_step(1, mask.sum().item<double>());
  auto routing = objective.context();
  layer->forward(x, mask, &routing);
  objective.micro_batch_loss(routing, torch::zeros({}, torch::kDouble));
  objective.end_step();
  const double after = load();
  EXPECT_GT(before, 1.0);
  EXPECT_LT(after, 0.2);
}

TEST(QuantileBalance, RefusesTopKOfEveryExpert) {
  auto layer = make_layer(ScoreFunction::Softmax, kE);
  expect_throw_with([&] { quantile_objective(layer, BalanceScope::Global); },
                    "balance method quantile needs top_k (6) < num_experts (6) in MoE layer 0");
}

}  // namespace
}  // namespace gbmoe
