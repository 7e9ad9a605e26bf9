// The fused CPU router pass against route_logits_reference: every shape, score function and
// renormalization, forward (scores, ids, weights, counts of valid tokens) and backward (the
// logits' gradient from both outputs, and from each alone); and the router module in both modes.
#include "moe/router_cpu.h"

#include <gtest/gtest.h>

#include "moe/kernels.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

// |a - b| <= tol (|b| + scale) elementwise, scale = max |b| / 10.
void expect_close(const torch::Tensor& a, const torch::Tensor& b, double tol,
                  const std::string& what) {
  ASSERT_EQ(a.sizes(), b.sizes()) << what;
  if (b.numel() == 0) return;
  const double scale = b.abs().max().item<double>() / 10 + 1e-30;
  EXPECT_LE(((a - b).abs() - tol * (b.abs() + scale)).max().item<double>(), 0.0)
      << what << ": max |a - b| " << (a - b).abs().max().item<double>();
}

TEST(RouterCpu, MatchesTheReferenceForwardAndBackward) {
  for (auto [T, E, K] : std::vector<std::array<int64_t, 3>>{
           {512, 8, 2}, {300, 64, 8}, {17, 4, 1}, {64, 16, 16}, {1, 3, 2}, {0, 8, 2}}) {
    for (auto score : {ScoreFunction::Softmax, ScoreFunction::Sigmoid}) {
      for (bool renormalize : {true, false}) {
        for (int grads = 0; grads < 3; ++grads) {  // both outputs, scores only, weights only
          const std::string what = "T=" + std::to_string(T) + " E=" + std::to_string(E) +
                                   " K=" + std::to_string(K) + " " + to_string(score) +
                                   (renormalize ? " renorm" : "") + " grads " +
                                   std::to_string(grads);
          torch::manual_seed(T * 131 + E * 7 + K);
          auto logits0 = torch::randn({T, E}) * 2;
          auto bias = torch::randn({E}) * 0.05;
          auto valid = torch::rand({T}) > 0.2;
          auto g_scores = torch::randn({T, E});
          auto g_weights = torch::randn({T, K});
          auto run = [&](auto route) {
            auto logits = logits0.clone().requires_grad_(true);
            RoutedScores r = route(logits, bias, valid, K, score, renormalize);
            auto loss = grads == 2 ? (r.weights * g_weights).sum() : (r.scores * g_scores).sum();
            if (grads == 0) loss = loss + (r.weights * g_weights).sum();
            if (T > 0) loss.backward();
            return std::make_pair(r, T > 0 ? logits.grad() : torch::zeros_like(logits));
          };
          auto [fused, fused_dz] = run(route_logits_cpu);
          auto [ref, ref_dz] = run(route_logits_reference);
          EXPECT_TRUE(torch::equal(fused.expert_ids, ref.expert_ids)) << what;
          EXPECT_TRUE(torch::equal(fused.counts, ref.counts)) << what;
          expect_close(fused.scores, ref.scores, 1e-6, what + " scores");
          expect_close(fused.weights, ref.weights, 1e-6, what + " weights");
          expect_close(fused_dz, ref_dz, 1e-5, what + " d logits");
        }
      }
    }
  }
}

TEST(RouterCpu, TheRouterModuleRoutesAsTheReferenceMode) {
  torch::manual_seed(5);
  Router router(RouterOptions(32, 8).top_k(2));
  auto x = torch::randn({40, 32});
  auto mask = torch::rand({40}) > 0.3;
  auto route = [&](KernelMode mode) {
    KernelModeGuard guard(mode);
    router->zero_grad();
    auto r = router->forward(x, mask);
    ((r.weights * torch::arange(80).view({40, 2})).sum() + r.scores.square().sum()).backward();
    return std::make_pair(r, router->weight.grad().clone());
  };
  auto [fused, fused_dw] = route(KernelMode::Fused);
  auto [ref, ref_dw] = route(KernelMode::Reference);
  EXPECT_TRUE(torch::equal(fused.expert_ids, ref.expert_ids));
  EXPECT_TRUE(torch::equal(fused.counts, ref.counts));
  EXPECT_EQ(fused.num_valid, ref.num_valid);
  expect_close(fused.weights, ref.weights, 1e-6, "weights");
  expect_close(fused_dw, ref_dw, 1e-4, "router weight gradient");  // sums of 40 tokens
}

TEST(RouterCpu, RefusesWhatItCannotTake) {
  auto logits = torch::randn({4, 3});
  EXPECT_FALSE(route_logits_cpu_applies(logits.to(torch::kDouble)));
  expect_throw_with(
      [&] {
        route_logits_cpu(logits, torch::zeros({3}), torch::ones({4}, torch::kBool), 4,
                         ScoreFunction::Softmax, true);
      },
      "top_k (4) must be in [1, num_experts (3)]");
}

}  // namespace
}  // namespace gbmoe
