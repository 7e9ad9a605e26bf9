// CUDA kernels against their LibTorch references, forward and backward, over shapes (experts
// without tokens, one token, K = 1 and 8, T and D not multiples of anything) and dtypes (fp32,
// bf16). Every test ends in _CUDA and is skipped where no GPU is present.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "csrc_cuda/moe_kernels.h"
#include "moe/dispatcher.h"
#include "moe/experts.h"
#include "moe/kernels.h"
#include "moe/moe_layer.h"
#include "moe/objective.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

#define SKIP_WITHOUT_GPU()                                                   \
  do {                                                                       \
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device here"; \
    cuda::register_kernels();                                                \
  } while (0)

// Largest difference relative to the reference's largest magnitude, allowed per dtype.
double tolerance(torch::ScalarType dtype) { return dtype == torch::kBFloat16 ? 2e-2 : 2e-5; }

void expect_close(const torch::Tensor& fused, const torch::Tensor& reference,
                  torch::ScalarType dtype, const std::string& what) {
  ASSERT_EQ(fused.sizes(), reference.sizes()) << what;
  if (reference.numel() == 0) return;
  EXPECT_LE(max_rel_diff(fused, reference, 1e-6), tolerance(dtype)) << what;
}

// Runs f with the given kernel mode and restores the previous one.
template <typename F>
auto in_mode(KernelMode mode, F&& f) {
  const auto previous = kernel_mode();
  set_kernel_mode(mode);
  auto result = f();
  set_kernel_mode(previous);
  return result;
}

std::string dtype_name(torch::ScalarType t) { return t == torch::kBFloat16 ? "bf16" : "fp32"; }

// (T, E, K) of the router and dispatcher cases.
const std::vector<std::tuple<int64_t, int64_t, int64_t>> kShapes = {
    {1, 8, 1}, {1, 64, 8}, {37, 8, 2}, {300, 16, 1}, {1031, 64, 8}, {517, 60, 8}, {3, 48, 2}};

// The router kernel reads fp32 logits whatever the activations' dtype (the gate runs in fp32);
// bf16 activations go through it in MoELayer.FusedPathMatchesReference_CUDA. Two correct
// top-k implementations may order near-ties differently, so tokens whose selections differ
// must be rare and have selected equal values; they are left out of the per-token checks.
TEST(RouterKernel, MatchesReferenceForwardAndBackward_CUDA) {
  SKIP_WITHOUT_GPU();
  for (const auto& shape : kShapes) {
    const int64_t T = std::get<0>(shape), E = std::get<1>(shape), K = std::get<2>(shape);
    for (auto score : {ScoreFunction::Softmax, ScoreFunction::Sigmoid}) {
      for (bool renormalize : {true, false}) {
        const std::string what = "T=" + std::to_string(T) + " E=" + std::to_string(E) +
                                 " K=" + std::to_string(K) + " " + to_string(score) +
                                 (renormalize ? " renorm" : "");
        torch::manual_seed(T * 131 + E * 7 + K);
        auto logits0 = torch::randn({T, E}, torch::kCUDA);
        auto bias = torch::randn({E}, torch::kCUDA) * 0.01;
        auto valid = torch::rand({T}, torch::kCUDA) > 0.2;
        auto g_scores = torch::randn({T, E}, torch::kCUDA);
        auto g_weights = torch::randn({T, K}, torch::kCUDA);
        auto run = [&](auto route) {
          auto logits = logits0.clone().requires_grad_(true);
          RoutedScores r = route(logits, bias, valid, K, score, renormalize);
          ((r.scores * g_scores).sum() + (r.weights * g_weights).sum()).backward();
          return std::make_pair(r, logits.grad());
        };
        auto [fused, fused_dz] = run(cuda::kernels().route);
        auto [ref, ref_dz] = run(route_logits_reference);

        auto same_T = (fused.expert_ids == ref.expert_ids).all(1);
        const int64_t differ = T - same_T.sum().item<int64_t>();
        EXPECT_LE(differ, std::max<int64_t>(1, T / 100)) << what;
        auto gates = score == ScoreFunction::Softmax ? ref.scores : torch::sigmoid(logits0);
        auto selection = (gates + bias).detach();
        EXPECT_LE(max_rel_diff(selection.gather(1, fused.expert_ids),
                               selection.gather(1, ref.expert_ids), 1e-6),
                  1e-6)
            << what << " selected values";
        EXPECT_LE((fused.counts - ref.counts).abs().sum().item<int64_t>(), 2 * K * differ)
            << what << " counts";
        expect_close(fused.scores, ref.scores, torch::kFloat, what + " scores");
        expect_close(fused.weights.index({same_T}), ref.weights.index({same_T}), torch::kFloat,
                     what + " weights");
        expect_close(fused_dz.index({same_T}), ref_dz.index({same_T}), torch::kFloat,
                     what + " d logits");
      }
    }
  }
}

// A routing of T tokens to K of E experts with weights that require gradients; about a fifth
// of the tokens masked. With E much larger than T * K most experts get no token.
RoutingResult random_routing(int64_t T, int64_t E, int64_t K) {
  RoutingResult r;
  auto scores = torch::rand({T, E}, torch::kCUDA);
  r.expert_ids = std::get<1>(scores.topk(K, -1));
  r.weights = torch::rand({T, K}, torch::kCUDA).requires_grad_(true);
  r.valid = torch::rand({T}, torch::kCUDA) > 0.2;
  r.valid[0] = true;
  r.num_valid = r.valid.sum().item<int64_t>();
  r.counts = count_selections(r.expert_ids, r.valid, E);
  r.top_k = K;
  return r;
}

TEST(PermuteKernels, DispatchAndCombineMatchReference_CUDA) {
  SKIP_WITHOUT_GPU();
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    for (const auto& shape : kShapes) {
      const int64_t T = std::get<0>(shape), E = std::get<1>(shape), K = std::get<2>(shape);
      for (int64_t D : {13, 64, 72, 1000}) {
        for (double capacity : {0.0, 1.0}) {
          const std::string what = dtype_name(dtype) + " T=" + std::to_string(T) +
                                   " E=" + std::to_string(E) + " K=" + std::to_string(K) +
                                   " D=" + std::to_string(D) + " cf=" + std::to_string(capacity);
          torch::manual_seed(T + E + K + D);
          auto routing = random_routing(T, E, K);
          auto x0 = torch::randn({T, D}, torch::kCUDA).to(dtype);
          auto dy = torch::randn({T, D}, torch::kCUDA).to(dtype);
          LocalDispatcher dispatcher(E, DispatcherOptions().capacity_factor(capacity));
          auto run = [&] {
            auto x = x0.clone().requires_grad_(true);
            routing.weights.mutable_grad() = torch::Tensor();
            auto d = dispatcher.dispatch(x, routing);
            auto y = dispatcher.combine(torch::sin(d.tokens) * 2, d);  // a stand-in expert
            y.backward(dy);
            return std::make_tuple(d.tokens.detach(), y.detach(), x.grad(),
                                   routing.weights.grad().clone());
          };
          auto [f_rows, f_y, f_dx, f_dw] = in_mode(KernelMode::Fused, run);
          auto [r_rows, r_y, r_dx, r_dw] = in_mode(KernelMode::Reference, run);
          EXPECT_TRUE(torch::equal(f_rows, r_rows)) << what << " permuted rows";
          expect_close(f_y, r_y, dtype, what + " combine");
          expect_close(f_dx, r_dx, dtype, what + " dx");
          expect_close(f_dw, r_dw, dtype, what + " d weights");
        }
      }
    }
  }
}

TEST(GroupedExperts, GroupedGemmMatchesLoop_CUDA) {
  SKIP_WITHOUT_GPU();
  if (!grouped_gemm_available()) GTEST_SKIP() << "LibTorch without at::_grouped_mm";
  for (auto sizes :
       std::vector<std::vector<int64_t>>{{0, 1, 0, 37}, {128, 0, 5, 300}, {1, 1, 1, 1}}) {
    torch::manual_seed(sizes[3]);
    const int64_t N = sizes[0] + sizes[1] + sizes[2] + sizes[3];
    auto make = [&](ExpertGemm gemm) {
      GroupedExperts experts(GroupedExpertsOptions(4, 64, 96).gemm(gemm));
      experts->to(torch::kCUDA);
      return experts;
    };
    auto grouped = make(ExpertGemm::Grouped), loop = make(ExpertGemm::Loop);
    {
      torch::NoGradGuard no_grad;
      loop->gate_up.copy_(grouped->gate_up);
      loop->down.copy_(grouped->down);
    }
    auto x0 = torch::randn({N, 64}, torch::kCUDA).to(torch::kBFloat16);
    auto dy = torch::randn({N, 64}, torch::kCUDA).to(torch::kBFloat16);
    auto group_sizes = torch::tensor(sizes, torch::kLong);
    auto run = [&](GroupedExperts& e) {
      auto x = x0.clone().requires_grad_(true);
      auto y = e->forward(x, group_sizes);
      y.backward(dy);
      return std::make_tuple(y.detach(), x.grad(), e->gate_up.grad(), e->down.grad());
    };
    auto [gy, gdx, gdgu, gdd] = run(grouped);
    auto [ly, ldx, ldgu, ldd] = run(loop);
    expect_close(gy, ly, torch::kBFloat16, "y");
    expect_close(gdx, ldx, torch::kBFloat16, "dx");
    expect_close(gdgu, ldgu, torch::kBFloat16, "d gate_up");
    expect_close(gdd, ldd, torch::kBFloat16, "d down");
    for (size_t e = 0; e < sizes.size(); ++e) {
      if (sizes[e] == 0) EXPECT_EQ(gdgu[e].abs().max().item<float>(), 0.f) << "expert " << e;
    }
  }
}

TEST(MoELayer, FusedPathMatchesReference_CUDA) {
  SKIP_WITHOUT_GPU();
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    torch::manual_seed(3);
    MoELayer moe(MoELayerOptions(64, 16, 96).router(RouterOptions().top_k(4)).shared_experts(1));
    moe->to(torch::kCUDA);
    auto x0 = torch::randn({2, 129, 64}, torch::kCUDA).to(dtype);
    auto mask = torch::rand({2, 129}, torch::kCUDA) > 0.1;
    auto run = [&] {
      moe->zero_grad();
      TrainingObjective objective({moe}, BalanceOptions().scope(BalanceScope::Micro));
      objective.begin_step(1, mask.sum().item<double>());
      auto x = x0.clone().requires_grad_(true);
      auto routing = objective.context();
      auto y = moe->forward(x, mask, &routing);
      auto aux = objective.micro_batch_loss(routing, torch::zeros({}, torch::kCUDA));
      (y.to(torch::kFloat).square().mean() + aux).backward();
      objective.end_step();
      return std::make_tuple(y.detach(), x.grad(), moe->router->weight.grad().clone(),
                             moe->experts->gate_up.grad().clone());
    };
    auto [fy, fdx, fdr, fdgu] = in_mode(KernelMode::Fused, run);
    auto [ry, rdx, rdr, rdgu] = in_mode(KernelMode::Reference, run);
    const std::string what = dtype_name(dtype);
    expect_close(fy, ry, dtype, what + " y");
    expect_close(fdx, rdx, dtype, what + " dx");
    expect_close(fdr, rdr, dtype, what + " d router");
    expect_close(fdgu, rdgu, dtype, what + " d gate_up");
  }
}

}  // namespace
}  // namespace gbmoe
