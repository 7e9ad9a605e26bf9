// Grouped experts: the fast grouped path equals a naive per-expert loop in output and gradients.
#include "moe/experts.h"

#include <gtest/gtest.h>

#include "tests/moe/threads_guard.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

struct Case {
  std::vector<int64_t> sizes;
};

class GroupedExpertsCase : public ::testing::TestWithParam<Case> {};

TEST_P(GroupedExpertsCase, MatchesNaiveLoopInOutputAndEveryGradient) {
  torch::manual_seed(0);
  const auto& sizes = GetParam().sizes;
  const int64_t E = sizes.size(), D = 12, F = 7;
  int64_t N = 0;
  for (auto s : sizes) N += s;
  GroupedExperts experts(GroupedExpertsOptions(E, D, F).init_std(0.3));
  experts->to(torch::kDouble);
  auto group_sizes = torch::tensor(sizes, torch::kLong);
  auto x = torch::randn({N, D}, torch::kDouble).requires_grad_();
  auto dy = torch::randn({N, D}, torch::kDouble);

  auto y = experts->forward(x, group_sizes);
  y.backward(dy);
  auto dx = x.grad().clone();
  auto dgu = experts->gate_up.grad().clone();
  auto ddown = experts->down.grad().clone();

  // Naive reference: row by row, each row through its own expert.
  auto gu = experts->gate_up.detach().clone().requires_grad_();
  auto dn = experts->down.detach().clone().requires_grad_();
  auto xr = x.detach().clone().requires_grad_();
  std::vector<torch::Tensor> rows;
  int64_t row = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t i = 0; i < sizes[e]; ++i, ++row) {
      auto h = xr[row].matmul(gu[e]);
      auto act = torch::silu(h.narrow(0, 0, F)) * h.narrow(0, F, F);
      rows.push_back(act.matmul(dn[e]));
    }
  }
  auto y_ref = N > 0 ? torch::stack(rows) : torch::zeros({0, D}, torch::kDouble);
  if (N > 0) y_ref.backward(dy);

  ASSERT_EQ(y.sizes(), y_ref.sizes());
  if (N > 0) {
    EXPECT_LT(max_rel_diff(y, y_ref), 1e-12);
    EXPECT_LT(max_rel_diff(dx, xr.grad()), 1e-12);
    EXPECT_LT(max_rel_diff(dgu, gu.grad()), 1e-12);
    EXPECT_LT(max_rel_diff(ddown, dn.grad()), 1e-12);
  }
  // Experts that received no rows get an exactly zero gradient.
  for (int64_t e = 0; e < E; ++e) {
    if (sizes[e] == 0) {
      EXPECT_EQ(dgu[e].abs().max().item<double>(), 0.0);
      EXPECT_EQ(ddown[e].abs().max().item<double>(), 0.0);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, GroupedExpertsCase,
                         ::testing::Values(Case{{3, 1, 4}}, Case{{0, 5, 0, 2}}, Case{{1}},
                                           Case{{0, 0, 0}}, Case{{9, 0, 0, 0, 0, 1, 6, 2}}));

TEST(GroupedExperts, MatchesPlainAutogradReferenceInFp32) {
  torch::manual_seed(1);
  GroupedExperts experts(GroupedExpertsOptions(4, 16, 24).init_std(0.1));
  auto sizes = torch::tensor({5, 0, 11, 3}, torch::kLong);
  auto x = torch::randn({19, 16}, torch::requires_grad());
  auto y = experts->forward(x, sizes);
  auto x2 = x.detach().clone().requires_grad_();
  auto y2 = grouped_swiglu_reference(x2, sizes, experts->gate_up, experts->down);
  EXPECT_LT(max_rel_diff(y, y2), 1e-5);
  auto dy = torch::randn_like(y);
  auto g1 = torch::autograd::grad({y}, {x, experts->gate_up, experts->down}, {dy});
  auto g2 = torch::autograd::grad({y2}, {x2, experts->gate_up, experts->down}, {dy});
  for (size_t i = 0; i < g1.size(); ++i) EXPECT_LT(max_rel_diff(g1[i], g2[i]), 1e-5) << i;
}

TEST(GroupedExperts, GroupedGemmMatchesPerExpertLoop) {
  if (!grouped_gemm_available()) GTEST_SKIP() << "LibTorch without at::_grouped_mm";
  for (auto sizes : std::vector<std::vector<int64_t>>{{5, 0, 11, 3}, {0, 0, 1, 0}, {0, 0, 0, 0}}) {
    torch::manual_seed(3);
    GroupedExperts loop(GroupedExpertsOptions(4, 16, 24).init_std(0.1).gemm(ExpertGemm::Loop));
    auto grouped = std::dynamic_pointer_cast<GroupedExpertsImpl>(loop->clone());
    grouped->options.gemm(ExpertGemm::Grouped);
    auto group_sizes = torch::tensor(sizes, torch::kLong);
    auto x = torch::randn({group_sizes.sum().item<int64_t>(), 16}, torch::requires_grad());
    auto dy = torch::randn({x.size(0), 16});
    auto close = [](const torch::Tensor& a, const torch::Tensor& b) {
      return a.sizes() == b.sizes() && (a.numel() == 0 || max_rel_diff(a, b, 1e-6) < 1e-5);
    };
    auto y1 = loop->forward(x, group_sizes);
    auto y2 = grouped->forward(x, group_sizes);
    EXPECT_TRUE(close(y2, y1));
    auto g1 = torch::autograd::grad({y1}, {x, loop->gate_up, loop->down}, {dy});
    auto g2 = torch::autograd::grad({y2}, {x, grouped->gate_up, grouped->down}, {dy});
    for (size_t i = 0; i < g1.size(); ++i) EXPECT_TRUE(close(g2[i], g1[i])) << i;
    for (int64_t e = 0; e < 4; ++e) {
      if (sizes[e] == 0) EXPECT_EQ(g2[1][e].abs().max().item<float>(), 0.f) << "expert " << e;
    }
  }
}

// With two threads, small experts run concurrently and one holding half the rows runs alone
// with threaded multiplies: both must equal the serial loop, empty experts included.
TEST(GroupedExperts, ParallelOverExpertsEqualsSerial) {
  ThreadsGuard threads(2);
  ASSERT_EQ(torch::get_num_threads(), 2);
  torch::manual_seed(4);
  const int64_t D = 10, F = 6;
  auto sizes = torch::tensor({3, 0, 40, 7, 0, 1, 9, 12, 0, 2, 5}, torch::kLong);
  const int64_t E = sizes.size(0), N = sizes.sum().item<int64_t>();
  GroupedExperts parallel(GroupedExpertsOptions(E, D, F).init_std(0.3));
  parallel->to(torch::kDouble);
  GroupedExperts serial(GroupedExpertsOptions(E, D, F).init_std(0.3).parallel_experts(false));
  serial->to(torch::kDouble);
  {
    torch::NoGradGuard no_grad;
    serial->gate_up.copy_(parallel->gate_up);
    serial->down.copy_(parallel->down);
  }
  auto x = torch::randn({N, D}, torch::kDouble).requires_grad_();
  auto dy = torch::randn({N, D}, torch::kDouble);
  auto y_p = parallel->forward(x, sizes);
  auto g_p = torch::autograd::grad({y_p}, {x, parallel->gate_up, parallel->down}, {dy});
  auto y_s = serial->forward(x, sizes);
  auto g_s = torch::autograd::grad({y_s}, {x, serial->gate_up, serial->down}, {dy});

  EXPECT_LT(max_rel_diff(y_p, y_s), 1e-12);
  for (size_t i = 0; i < g_p.size(); ++i) EXPECT_LT(max_rel_diff(g_p[i], g_s[i]), 1e-12) << i;
  for (int64_t e : {1, 4, 8}) {
    EXPECT_EQ(g_p[1][e].abs().max().item<double>(), 0.0) << e;
    EXPECT_EQ(g_p[2][e].abs().max().item<double>(), 0.0) << e;
  }
}

TEST(GroupedExperts, RejectsGroupSizesThatDoNotMatch) {
  GroupedExperts experts(GroupedExpertsOptions(2, 4, 4));
  expect_throw_with(
      [&] {
        experts->forward(torch::randn({5, 4}), torch::tensor({2, 2}, torch::kLong));
      },
      "group_sizes sum to 4 but tokens has 5 rows");
  expect_throw_with([] { GroupedExperts(GroupedExpertsOptions(0, 4, 4)); }, "num_experts (0)");
  expect_throw_with([] { GroupedExperts(GroupedExpertsOptions(2, 4, 0)); }, "expert_hidden (0)");
}

TEST(GroupedExperts, KeepExpertsSlicesTheStackedWeights) {
  torch::manual_seed(2);
  GroupedExperts experts(GroupedExpertsOptions(4, 4, 3));
  auto full_gu = experts->gate_up.detach().clone();
  experts->keep_experts(2, 2);
  EXPECT_EQ(experts->options.num_experts(), 2);
  EXPECT_TRUE(torch::equal(experts->gate_up, full_gu.narrow(0, 2, 2)));
  EXPECT_EQ(experts->parameters().size(), 2u);
}

}  // namespace
}  // namespace gbmoe
