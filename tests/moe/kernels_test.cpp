// Kernel registry: the runtime switch between registered kernels and the LibTorch reference,
// and the row map (token_rows) the permutation kernels rely on, exercised on the CPU with
// stand-in kernels that use the row map the way the CUDA kernels do.
#include "moe/kernels.h"

#include <gtest/gtest.h>

#include "moe/moe_layer.h"
#include "moe/objective.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

int g_calls = 0;

RoutedScores counting_route(const torch::Tensor& logits_TE, const torch::Tensor& bias_E,
                            const torch::Tensor& valid_T, int64_t top_k, ScoreFunction f,
                            bool renormalize) {
  ++g_calls;
  return route_logits_reference(logits_TE, bias_E, valid_T, top_k, f, renormalize);
}

torch::Tensor rows_permute(const torch::Tensor& x_TD, const torch::Tensor& token_index_N,
                           const torch::Tensor& rows_TK) {
  ++g_calls;
  // Every row n is listed under its token: rows_TK[token_index[n], k] == n for one k.
  auto listed =
      (rows_TK.index_select(0, token_index_N) == torch::arange(token_index_N.size(0)).unsqueeze(1))
          .sum(1);
  EXPECT_TRUE(torch::equal(listed, torch::ones_like(listed)));
  return x_TD.index_select(0, token_index_N);
}

// y[t] = sum_k w[rows[t, k]] * out[rows[t, k]] over rows >= 0: a gather, as the CUDA kernel.
torch::Tensor rows_unpermute(const torch::Tensor& out_ND, const torch::Tensor& weights_N,
                             const torch::Tensor& token_index_N, const torch::Tensor& rows_TK) {
  ++g_calls;
  const int64_t T = rows_TK.size(0), K = rows_TK.size(1), D = out_ND.size(1);
  if (out_ND.size(0) == 0) return torch::zeros({T, D}, out_ND.options());
  auto rows = rows_TK.clamp_min(0).reshape({-1});
  auto present = (rows_TK >= 0).to(out_ND.scalar_type()).unsqueeze(-1);
  auto w = weights_N.index_select(0, rows).view({T, K, 1}).to(out_ND.scalar_type());
  return (out_ND.index_select(0, rows).view({T, K, D}) * w * present).sum(1);
}

// Registers the stand-in kernels for CPU tensors for the scope of a test.
struct CpuKernelsScope {
  CpuKernelsScope() {
    MoEKernels k;
    k.route = counting_route;
    k.permute = rows_permute;
    k.unpermute = rows_unpermute;
    register_kernels(c10::DeviceType::CPU, k);
    g_calls = 0;
  }
  ~CpuKernelsScope() {
    register_kernels(c10::DeviceType::CPU, MoEKernels{});
    set_kernel_mode(KernelMode::Fused);
  }
};

struct LayerRun {
  torch::Tensor y, dx, dgate;
  int64_t num_dropped = 0;
};

// One step of the layer trained alone: the mean squared output plus the micro-batch balancing
// and z-loss terms, so the router's gradient goes through the routing kernel's scores too.
LayerRun run_layer(MoELayer& moe, const torch::Tensor& x0, const torch::Tensor& mask) {
  moe->zero_grad();
  TrainingObjective objective({moe}, BalanceOptions().scope(BalanceScope::Micro));
  objective.begin_step(1, mask.sum().item<double>());
  auto x = x0.clone().requires_grad_(true);
  auto routing = objective.context();
  auto y = moe->forward(x, mask, &routing);
  (y.square().mean() + objective.micro_batch_loss(routing, torch::zeros({}))).backward();
  objective.end_step();
  return {y.detach(), x.grad(), moe->router->weight.grad().clone(),
          routing.layers()[0].num_dropped};
}

TEST(KernelRegistry, FusedModeRunsRegisteredKernelsWithTheSameResults) {
  torch::manual_seed(0);
  MoELayer moe(MoELayerOptions(16, 6, 24)
                   .router(RouterOptions().top_k(3))
                   .dispatcher(DispatcherOptions().capacity_factor(0.8)));
  auto x = torch::randn({3, 11, 16});
  auto mask = torch::rand({3, 11}) > 0.25;
  auto reference = run_layer(moe, x, mask);
  EXPECT_GT(reference.num_dropped, 0);  // rows without a slot exercise rows_TK = -1

  CpuKernelsScope scope;
  auto fused = run_layer(moe, x, mask);
  EXPECT_EQ(g_calls, 3);  // route, permute, unpermute
  EXPECT_LE(max_rel_diff(fused.y, reference.y), 1e-6);
  EXPECT_LE(max_rel_diff(fused.dx, reference.dx), 1e-6);
  EXPECT_LE(max_rel_diff(fused.dgate, reference.dgate), 1e-6);
}

TEST(KernelRegistry, ReferenceModeAndRemovedRegistrationUseLibTorch) {
  torch::manual_seed(1);
  MoELayer moe(MoELayerOptions(8, 4, 8).router(RouterOptions().top_k(2)));
  auto x = torch::randn({5, 8});
  {
    CpuKernelsScope scope;
    set_kernel_mode(KernelMode::Reference);
    EXPECT_EQ(fused_kernels(x), nullptr);
    moe->forward(x);
    EXPECT_EQ(g_calls, 0);
    set_kernel_mode(KernelMode::Fused);
    EXPECT_NE(fused_kernels(x), nullptr);
  }
  EXPECT_EQ(fused_kernels(x), nullptr);
  moe->forward(x);
  EXPECT_EQ(g_calls, 0);
}

TEST(KernelRegistry, BadModeAndPartialRegistrationAreRejected) {
  expect_throw_with([] { kernel_mode_from_string("fast"); }, "GBMOE_KERNELS (fast)");
  MoEKernels partial;
  partial.route = counting_route;
  expect_throw_with([&] { register_kernels(c10::DeviceType::CPU, partial); },
                    "needs route, permute and unpermute");
}

TEST(KernelRegistry, TokenRowsInvertsTheAssignment) {
  // Rows 0..3 came from slots (t, k) = (2, 0), (0, 1), (2, 1), (1, 0) with K = 2.
  auto rows = token_rows(torch::tensor({4, 1, 5, 2}, torch::kLong), 3, 2);
  EXPECT_TRUE(torch::equal(rows, torch::tensor({-1, 1, 3, -1, 0, 2}, torch::kLong).view({3, 2})));
}

}  // namespace
}  // namespace gbmoe
