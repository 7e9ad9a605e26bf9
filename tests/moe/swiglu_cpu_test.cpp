// The fused fp32 SwiGLU passes against LibTorch computed in fp64, over shapes, row strides and
// extreme inputs; and the grouped experts with them against the reference kernel mode.
#include "moe/swiglu_cpu.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

#include "moe/experts.h"
#include "moe/kernels.h"
#include "tests/moe/threads_guard.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

constexpr float kPad = -12345.f;  // written into the gaps between rows; must survive

// Rows of [gate | up] with stride ld_h >= 2F, gates spread over [-100, 100] so that exp's
// clamped range and both tails of the sigmoid are exercised, plus exact zeros.
torch::Tensor make_h(int64_t rows, int64_t F, int64_t ld_h) {
  auto h = torch::full({rows, ld_h}, kPad);
  auto gate = torch::randn({rows, F}) * 3;
  gate.view(-1).index_put_({torch::arange(0, rows * F, 5)},
                           torch::linspace(-100, 100, (rows * F + 4) / 5));
  gate.view(-1)[0] = 0;
  h.narrow(1, 0, F).copy_(gate);
  h.narrow(1, F, F).copy_(torch::randn({rows, F}));
  return h;
}

// act, dgate, dup of silu(gate) * up by fp64 autograd.
std::vector<torch::Tensor> reference(const torch::Tensor& h, const torch::Tensor& dact, int64_t F) {
  auto gate = h.narrow(1, 0, F).to(torch::kDouble).requires_grad_();
  auto up = h.narrow(1, F, F).to(torch::kDouble).requires_grad_();
  auto act = torch::silu(gate) * up;
  auto grads = torch::autograd::grad({act}, {gate, up}, {dact.to(torch::kDouble)});
  return {act.detach(), grads[0], grads[1]};
}

// |a - b| <= 2e-6 |b| + 1e-6 scale + 1e-36 elementwise: scale is the size of the factors where a
// sum cancels (dgate has 1 + g (1 - s), zero near g = -1.28); 1e-36 covers gates below -88.7,
// where the fp32 sigmoid is 0 and the true |silu| is under 4e-37.
void expect_close(const torch::Tensor& a, const torch::Tensor& b, const std::string& what,
                  const torch::Tensor& scale = {}) {
  auto diff = (a.to(torch::kDouble) - b).abs();
  auto bound = b.abs() * 2e-6 + 1e-36;
  if (scale.defined()) bound = bound + scale.to(torch::kDouble).abs() * 1e-6;
  auto worst = (diff - bound).max().item<double>();
  EXPECT_LE(worst, 0.0) << what << ": max |a - b| " << diff.max().item<double>();
}

// Runs check once per instruction-set variant this CPU supports, then restores the default.
template <typename Check>
void for_each_variant(const Check& check) {
  const std::string saved = detail::swiglu_cpu_variant();
  int ran = 0;
  for (const char* name : {"avx512", "avx2", "baseline"}) {
    if (!detail::set_swiglu_cpu_variant(name)) continue;
    SCOPED_TRACE(name);
    check();
    ++ran;
  }
  ASSERT_TRUE(detail::set_swiglu_cpu_variant(saved));
  EXPECT_GE(ran, 1);
}

struct Outputs {
  torch::Tensor act, act_bwd, dh;  // forward act; backward act and [dgate | dup]
};

// Both passes over h (rows of stride >= 2F) and dact (stride >= F) into fresh outputs with
// `extra` padding entries per row, filled with kPad: each variant must write its own.
Outputs run_passes(const torch::Tensor& h, const torch::Tensor& dact, int64_t F, int64_t extra) {
  const int64_t rows = h.size(0);
  Outputs out{torch::full({rows, F + extra}, kPad), torch::full({rows, F + extra}, kPad),
              torch::full({rows, 2 * F + extra}, kPad)};
  detail::swiglu_forward_rows(h.data_ptr<float>(), h.stride(0), out.act.data_ptr<float>(),
                              out.act.stride(0), rows, F);
  detail::swiglu_backward_rows(h.data_ptr<float>(), h.stride(0), dact.data_ptr<float>(),
                               dact.stride(0), out.dh.data_ptr<float>(), out.dh.stride(0),
                               out.act_bwd.data_ptr<float>(), out.act_bwd.stride(0), rows, F);
  return out;
}

struct Shape {
  int64_t rows, F, extra;  // extra: row padding beyond 2F (h, dh) or F (act, dact)
};

class SwiGLUCpuShapes : public ::testing::TestWithParam<Shape> {};

TEST_P(SwiGLUCpuShapes, ForwardAndBackwardMatchFp64Reference) {
  const auto [rows, F, extra] = GetParam();
  torch::manual_seed(F + rows);
  auto h = make_h(rows, F, 2 * F + extra);
  auto dact = torch::full({rows, F + extra}, kPad);
  dact.narrow(1, 0, F).copy_(torch::randn({rows, F}));
  for_each_variant([&] {
    const auto [act, act_bwd, dh] = run_passes(h, dact, F, extra);
    auto ref = reference(h, dact.narrow(1, 0, F), F);
    expect_close(act.narrow(1, 0, F), ref[0], "forward act");
    expect_close(act_bwd.narrow(1, 0, F), ref[0], "backward act");
    expect_close(dh.narrow(1, 0, F), ref[1], "dgate", dact.narrow(1, 0, F) * h.narrow(1, F, F));
    expect_close(dh.narrow(1, F, F), ref[2], "dup");
    if (extra > 0) {
      EXPECT_TRUE((act.narrow(1, F, extra) == kPad).all().item<bool>());
      EXPECT_TRUE((act_bwd.narrow(1, F, extra) == kPad).all().item<bool>());
      EXPECT_TRUE((dh.narrow(1, 2 * F, extra) == kPad).all().item<bool>());
    }
  });
}

INSTANTIATE_TEST_SUITE_P(Shapes, SwiGLUCpuShapes,
                         ::testing::Values(Shape{1, 1, 0}, Shape{3, 7, 0}, Shape{2, 16, 3},
                                           Shape{5, 33, 1}, Shape{4, 128, 0}, Shape{2, 1000, 24}));

// A NaN anywhere in a row's inputs must reach the outputs, so that the trainer's non-finite
// check sees it.
TEST(SwiGLUCpu, NaNPropagates) {
  const int64_t F = 20;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  auto h = torch::randn({2, 2 * F});
  h[0][3] = nan;      // a gate
  h[1][F + 5] = nan;  // an up
  auto dact = torch::randn({2, F});
  for_each_variant([&] {
    const auto [act, act_bwd, dh] = run_passes(h, dact, F, 0);
    EXPECT_TRUE(std::isnan(act[0][3].item<float>()));
    EXPECT_TRUE(std::isnan(act_bwd[0][3].item<float>()));
    EXPECT_TRUE(std::isnan(dh[0][3].item<float>()));      // dgate
    EXPECT_TRUE(std::isnan(dh[0][F + 3].item<float>()));  // dup
    EXPECT_TRUE(std::isnan(act[1][5].item<float>()));
    EXPECT_TRUE(std::isnan(dh[1][5].item<float>()));  // dgate needs up
    EXPECT_EQ(torch::isnan(act).sum().item<int64_t>(), 2);
  });
}

// Gates at and past the ends of fp32's exp: the same values, infinities and NaNs as LibTorch in
// fp64 (silu(-inf) and silu'(+-inf) are NaN there too).
TEST(SwiGLUCpu, ExtremeGatesMatchLibTorch) {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> gates = {-inf, -1e30f, -100.f, -88.6f, -88.f, -87.f, -20.f,
                                    20.f, 87.f,   88.6f,  100.f,  1e30f, inf};
  const int64_t F = static_cast<int64_t>(gates.size());
  auto h = torch::cat({torch::tensor(gates), torch::full({F}, 1.5f)}).view({1, 2 * F});
  auto dact = torch::full({1, F}, 0.75f);
  auto ref = reference(h, dact, F);
  auto same = [](const torch::Tensor& a, const torch::Tensor& b, const char* what) {
    auto ad = a.to(torch::kDouble).view(-1), bd = b.view(-1);
    for (int64_t i = 0; i < ad.numel(); ++i) {
      const double x = ad[i].item<double>(), y = bd[i].item<double>();
      if (std::isnan(y) || std::isinf(y)) {
        EXPECT_TRUE((std::isnan(x) && std::isnan(y)) || x == y)
            << what << "[" << i << "] " << x << " vs " << y;
      } else {
        EXPECT_LE(std::abs(x - y), 2e-6 * std::abs(y) + 1e-36) << what << "[" << i << "]";
      }
    }
  };
  for_each_variant([&] {
    const auto [act, act_bwd, dh] = run_passes(h, dact, F, 0);
    same(act, ref[0], "act");
    same(act_bwd, ref[0], "backward act");
    same(dh.narrow(1, 0, F), ref[1], "dgate");
    same(dh.narrow(1, F, F), ref[2], "dup");
  });
}

TEST(SwiGLUCpu, SwitchesOnlyToVariantsThisCpuRuns) {
  const std::string best = detail::swiglu_cpu_variant();
  EXPECT_TRUE(best == "avx512" || best == "avx2" || best == "baseline") << best;
  EXPECT_FALSE(detail::set_swiglu_cpu_variant("sse9"));
  EXPECT_EQ(detail::swiglu_cpu_variant(), best);
  EXPECT_TRUE(detail::set_swiglu_cpu_variant("baseline"));
  EXPECT_EQ(std::string(detail::swiglu_cpu_variant()), "baseline");
  EXPECT_TRUE(detail::set_swiglu_cpu_variant(best));
}

// The grouped experts in fp32 with the fused passes equal the reference kernel mode (LibTorch's
// element-wise ops) in output and every gradient: on one thread, and on two where small experts
// run concurrently and the large one splits its rows over the threads.
TEST(SwiGLUCpu, GroupedExpertsFusedEqualsReferenceMode) {
  for (int threads : {1, 2}) {
    ThreadsGuard guard(threads);
    torch::manual_seed(7);
    const int64_t D = 24, F = 64;  // 700 rows split into several tasks of 256 rows
    auto sizes = torch::tensor({5, 0, 700, 17, 1}, torch::kLong);
    GroupedExperts experts(GroupedExpertsOptions(5, D, F).init_std(0.4));
    auto x = torch::randn({sizes.sum().item<int64_t>(), D}) * 2;
    auto dy = torch::randn({x.size(0), D});
    auto run = [&](KernelMode mode) {
      set_kernel_mode(mode);
      auto xg = x.clone().requires_grad_();
      auto y = experts->forward(xg, sizes);
      auto g = torch::autograd::grad({y}, {xg, experts->gate_up, experts->down}, {dy});
      g.insert(g.begin(), y);
      return g;
    };
    const auto saved = kernel_mode();
    auto fused = run(KernelMode::Fused);
    auto ref = run(KernelMode::Reference);
    set_kernel_mode(saved);
    const char* names[] = {"y", "dx", "dgate_up", "ddown"};
    for (size_t i = 0; i < fused.size(); ++i) {
      EXPECT_LT(max_rel_diff(fused[i], ref[i]), 1e-5) << names[i] << " threads " << threads;
    }
    // Their exp differs from LibTorch's in the last bits: equal outputs would mean the fused
    // passes never ran.
    EXPECT_FALSE(torch::equal(fused[0], ref[0])) << "threads " << threads;
  }
}

}  // namespace
}  // namespace gbmoe
