// Local dispatcher: grouping by expert, combine(dispatch(x)) == x, capacity dropping policies.
#include "moe/dispatcher.h"

#include <gtest/gtest.h>

#include "tests/moe/threads_guard.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

// A fixed routing: expert ids and weights given, every token valid unless a mask is given.
RoutingResult fixed_routing(torch::Tensor ids, torch::Tensor weights, int64_t E,
                            torch::Tensor valid = {}) {
  RoutingResult r;
  r.expert_ids = ids;
  r.weights = weights;
  r.top_k = ids.size(1);
  r.valid = valid.defined() ? valid : torch::ones({ids.size(0)}, torch::kBool);
  r.num_valid = r.valid.sum().item<int64_t>();
  r.counts = count_selections(ids, r.valid, E);
  return r;
}

TEST(LocalDispatcher, GroupsRowsByExpertInTokenOrder) {
  auto ids = torch::tensor({2, 0, 2, 1, 0}, torch::kLong).unsqueeze(1);
  auto w = torch::ones({5, 1});
  auto x = torch::arange(5, torch::kFloat).unsqueeze(1).repeat({1, 3});
  LocalDispatcher d(3, DispatcherOptions());
  auto out = d.dispatch(x, fixed_routing(ids, w, 3));
  EXPECT_TRUE(torch::equal(out.group_sizes, torch::tensor({2, 1, 2}, torch::kLong)));
  EXPECT_TRUE(torch::equal(out.token_index, torch::tensor({1, 4, 3, 0, 2}, torch::kLong)));
  EXPECT_TRUE(torch::equal(out.tokens.select(1, 0), torch::tensor({1.f, 4.f, 3.f, 0.f, 2.f})));
  EXPECT_EQ(out.num_dropped, 0);
}

TEST(LocalDispatcher, CombineOfDispatchWithIdentityExpertsIsInput) {
  torch::manual_seed(0);
  const int64_t T = 37, E = 5, K = 3;
  auto x = torch::randn({T, 8});
  auto scores = torch::softmax(torch::randn({T, E}), -1);
  auto top = scores.topk(K, -1);
  auto w = std::get<0>(top) / std::get<0>(top).sum(-1, true);
  LocalDispatcher d(E, DispatcherOptions());
  auto routing = fixed_routing(std::get<1>(top), w, E);
  auto dispatched = d.dispatch(x, routing);
  EXPECT_EQ(dispatched.tokens.size(0), T * K);
  auto y = d.combine(dispatched.tokens, dispatched);
  EXPECT_TRUE(torch::allclose(y, x, 1e-5, 1e-6));
}

TEST(LocalDispatcher, MaskedTokensAreNotDispatchedAndCombineToZero) {
  auto ids = torch::tensor({0, 1, 0, 1}, torch::kLong).unsqueeze(1);
  auto valid = torch::tensor({true, false, true, true});
  auto x = torch::ones({4, 2});
  LocalDispatcher d(2, DispatcherOptions());
  auto dispatched = d.dispatch(x, fixed_routing(ids, torch::ones({4, 1}), 2, valid));
  EXPECT_EQ(dispatched.tokens.size(0), 3);
  auto y = d.combine(dispatched.tokens, dispatched);
  EXPECT_TRUE(torch::equal(y.select(1, 0), torch::tensor({1.f, 0.f, 1.f, 1.f})));
}

TEST(LocalDispatcher, CapacityByPositionKeepsEarliestTokens) {
  // 6 tokens, K = 1, E = 2, capacity_factor 1.0 -> capacity ceil(6 / 2) = 3.
  auto ids = torch::tensor({0, 0, 0, 0, 1, 0}, torch::kLong).unsqueeze(1);
  auto w = torch::tensor({0.1f, 0.9f, 0.2f, 0.8f, 0.5f, 0.7f}).unsqueeze(1);
  LocalDispatcher d(2, DispatcherOptions().capacity_factor(1.0));
  auto x = torch::arange(6, torch::kFloat).unsqueeze(1);
  auto out = d.dispatch(x, fixed_routing(ids, w, 2));
  EXPECT_EQ(out.num_dropped, 2);
  EXPECT_TRUE(torch::equal(out.group_sizes, torch::tensor({3, 1}, torch::kLong)));
  EXPECT_TRUE(torch::equal(out.token_index, torch::tensor({0, 1, 2, 4}, torch::kLong)));
  auto y = d.combine(out.tokens, out);
  // dropped tokens 3 and 5 get no routed output
  EXPECT_EQ(y[3].item<float>(), 0.f);
  EXPECT_EQ(y[5].item<float>(), 0.f);
  EXPECT_FLOAT_EQ(y[1].item<float>(), 0.9f);
}

TEST(LocalDispatcher, CapacityByScoreKeepsHighestWeights) {
  auto ids = torch::tensor({0, 0, 0, 0, 1, 0}, torch::kLong).unsqueeze(1);
  auto w = torch::tensor({0.1f, 0.9f, 0.2f, 0.8f, 0.5f, 0.7f}).unsqueeze(1);
  LocalDispatcher d(2, DispatcherOptions().capacity_factor(1.0).drop_policy(DropPolicy::Score));
  auto out = d.dispatch(torch::zeros({6, 1}), fixed_routing(ids, w, 2));
  EXPECT_EQ(out.num_dropped, 2);
  auto kept = std::get<0>(out.token_index.narrow(0, 0, 3).sort());
  EXPECT_TRUE(torch::equal(kept, torch::tensor({1, 3, 5}, torch::kLong)));
}

TEST(LocalDispatcher, CapacityCountsValidTokensOnly) {
  DispatcherOptions o = DispatcherOptions().capacity_factor(1.5);
  EXPECT_EQ(expert_capacity(o, 10, 2, 4), 8);  // ceil(1.5 * 10 * 2 / 4) = 7.5 -> 8
  EXPECT_EQ(expert_capacity(DispatcherOptions(), 10, 2, 4), -1);
}

TEST(LocalDispatcher, GradientsReachInputsAndWeights) {
  torch::manual_seed(1);
  auto x = torch::randn({6, 4}, torch::requires_grad());
  auto w = torch::rand({6, 2}, torch::requires_grad());
  auto ids = torch::tensor({0, 1, 1, 2, 2, 0, 0, 2, 1, 0, 2, 1}, torch::kLong).view({6, 2});
  LocalDispatcher d(3, DispatcherOptions());
  auto out = d.dispatch(x, fixed_routing(ids, w, 3));
  auto y = d.combine(out.tokens * 2, out);
  y.sum().backward();
  // y_t = 2 x_t (w_t0 + w_t1): dy/dx_t = 2 (w_t0 + w_t1), dy/dw_tk = 2 sum(x_t)
  auto ref_dx = 2 * w.detach().sum(1, true).expand({6, 4});
  EXPECT_TRUE(torch::allclose(x.grad(), ref_dx, 1e-6, 1e-6));
  EXPECT_TRUE(torch::allclose(w.grad(), 2 * x.detach().sum(1, true).expand({6, 2}), 1e-5, 1e-6));
}

// The fused CPU path of combine_rows, run with one and two threads: 400 rows
// sent to 150 tokens in no particular order; tokens 3 and 7 receive none.
class FusedRowsCase : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    torch::manual_seed(2);
    auto idx = torch::randint(T, {N}, torch::kLong);
    tokens = idx.masked_fill(idx.eq(3).logical_or(idx.eq(7)), 0);
  }
  static constexpr int64_t T = 150, N = 400, D = 9;
  ThreadsGuard threads{GetParam()};
  torch::Tensor tokens;
};

TEST_P(FusedRowsCase, CombineMatchesReferenceInOutputAndGradients) {
  auto rows = torch::randn({N, D}, torch::kDouble).requires_grad_();
  auto w = torch::rand({N}, torch::kDouble).requires_grad_();
  auto dy = torch::randn({T, D}, torch::kDouble);
  auto y = combine_rows(rows, tokens, w, T);
  auto g = torch::autograd::grad({y}, {rows, w}, {dy});
  auto y_ref = unpermute_reference(rows, w, tokens, T);
  auto g_ref = torch::autograd::grad({y_ref}, {rows, w}, {dy});
  EXPECT_LT(max_rel_diff(y, y_ref), 1e-12);
  EXPECT_LT(max_rel_diff(g[0], g_ref[0]), 1e-12);
  EXPECT_LT(max_rel_diff(g[1], g_ref[1]), 1e-12);
  EXPECT_EQ(y[3].abs().max().item<double>(), 0.0);
  EXPECT_EQ(y[7].abs().max().item<double>(), 0.0);
}

INSTANTIATE_TEST_SUITE_P(Threads, FusedRowsCase, ::testing::Values(1, 2));

TEST(CombineRows, TokenIndexOutOfRangeNamesTheValue) {
  auto rows = torch::ones({3, 2});
  auto tokens = torch::tensor({0, 4, 9}, torch::kLong);
  expect_throw_with([&] { combine_rows(rows, tokens, torch::ones({3}), 5); },
                    "token_index[2] (9) must be in [0, 5)");
}

TEST(LocalDispatcher, InvalidCapacityNamesTheValue) {
  expect_throw_with([] { LocalDispatcher(4, DispatcherOptions().capacity_factor(-0.5)); },
                    "capacity_factor (-0.5)");
  expect_throw_with([] { drop_policy_from_string("random"); }, "drop_policy (random)");
}

}  // namespace
}  // namespace gbmoe
