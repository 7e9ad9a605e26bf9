// The spec's properties of global-batch balancing on R ranks (global-lbl.md, "Properties that
// tests must prove"): each rank takes its slice of one batch that every rank can rebuild, so
// the single-process reference on the concatenated batch runs on every rank.
#include <gtest/gtest.h>

#include "moe/balancer.h"
#include "parallel/balance_sync.h"
#include "tests/parallel/mpi_test_util.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

constexpr int64_t kD = 8, kE = 6, kK = 2, kT = 12;

MoELayer make_layer(BalanceScope scope, torch::Dtype dtype, int64_t group_size = 0) {
  torch::manual_seed(42);  // identical weights on every rank and in the reference
  MoELayer layer(MoELayerOptions(kD, kE, 5)
                     .router(RouterOptions().top_k(kK).z_loss_coef(0))
                     .balance(BalanceOptions().scope(scope).alpha(0.05).group_size(group_size)));
  layer->to(dtype);
  return layer;
}

// The whole batch of micro-batch m, (R * kT, D), and its mask: rank r has kT - 3r valid tokens
// when padded (the rest is padding).
std::pair<torch::Tensor, torch::Tensor> full_batch(int R, int64_t m, torch::Dtype dtype,
                                                   bool padded) {
  auto gen = at::detail::createCPUGenerator(1000 + m);
  auto x = at::randn({R * kT, kD}, gen, torch::kDouble).to(dtype);
  auto mask = torch::ones({R * kT}, torch::kBool);
  if (padded) {
    for (int r = 0; r < R; ++r) mask.narrow(0, r * kT + kT - 3 * r, 3 * r).fill_(false);
  }
  return {x, mask};
}

torch::Tensor rank_slice(const torch::Tensor& t, int rank) { return t.narrow(0, rank * kT, kT); }

double average(Communicator& comm, double v) { return all_reduce_sum(comm, v) / comm.size(); }

torch::Tensor average(Communicator& comm, torch::Tensor t) {
  t = t.detach().clone();
  comm.all_reduce(t, ReduceOp::Avg);
  return t;
}

// Runs one optimizer step of M micro-batches on this rank and returns the loss averaged over
// micro-batches and ranks and the router gradient averaged the same way.
std::pair<double, torch::Tensor> distributed_step(MoELayer& layer, Balancer& balancer,
                                                  Communicator& group, Communicator& world,
                                                  int64_t M, torch::Dtype dtype, bool padded,
                                                  bool local_step_tokens = false) {
  const int R = world.size(), rank = world.rank();
  double tokens = 0;
  for (int64_t m = 0; m < M; ++m) {
    tokens += rank_slice(full_batch(R, m, dtype, padded).second, rank).sum().item<double>();
  }
  if (local_step_tokens) {  // the group's total rides with the first count reduction
    balancer.begin_step(M);
    balancer.set_local_step_tokens(tokens);
  } else {
    balancer.begin_step(M, all_reduce_sum(group, tokens));
  }
  layer->zero_grad();
  double loss_sum = 0;
  for (int64_t m = 0; m < M; ++m) {
    auto [x, mask] = full_batch(R, m, dtype, padded);
    layer->forward(rank_slice(x, rank), rank_slice(mask, rank));
    auto loss = balancer.micro_batch_loss() / static_cast<double>(M);
    loss.backward();
    loss_sum += loss.item<double>();
  }
  balancer.end_step();
  return {average(world, loss_sum), average(world, layer->router->weight.grad())};
}

// One process: the layer's micro-batch LBL on the concatenated batch is LBL(f(G), P(G)).
std::pair<double, torch::Tensor> reference_on_concatenation(torch::Dtype dtype, int R,
                                                            bool padded) {
  auto ref = make_layer(BalanceScope::Micro, dtype);
  auto [x, mask] = full_batch(R, 0, dtype, padded);
  ref->forward(x, mask);
  auto loss = ref->stats().balance_loss;
  auto grad = torch::autograd::grad({loss}, {ref->router->weight})[0];
  return {loss.item<double>(), grad};
}

struct ExactCase {
  torch::Dtype dtype;
  bool padded;
  double tolerance;
  bool local_step_tokens = false;
};

class GlobalEqualsConcatenation : public ::testing::TestWithParam<ExactCase> {};

// Properties 1 and 2: loss and every router gradient equal one process on the concatenation,
// with equal and with unequal valid-token counts.
TEST_P(GlobalEqualsConcatenation, LossAndRouterGradient) {
  const auto c = GetParam();
  auto world = test_world();
  auto layer = make_layer(BalanceScope::Global, c.dtype);
  Balancer balancer({layer}, std::make_shared<CommunicatorCountReducer>(world));
  auto [loss, grad] =
      distributed_step(layer, balancer, *world, *world, 1, c.dtype, c.padded, c.local_step_tokens);
  auto [ref_loss, ref_grad] = reference_on_concatenation(c.dtype, world->size(), c.padded);
  EXPECT_LT(std::abs(loss - ref_loss) / std::abs(ref_loss), c.tolerance);
  EXPECT_LT(max_rel_diff(grad, ref_grad), c.tolerance);
  EXPECT_GT(ref_grad.abs().max().item<double>(), 0.0);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, GlobalEqualsConcatenation,
                         ::testing::Values(ExactCase{torch::kDouble, false, 1e-9},
                                           ExactCase{torch::kDouble, true, 1e-9},
                                           ExactCase{torch::kDouble, true, 1e-9, true},
                                           ExactCase{torch::kFloat, false, 1e-5},
                                           ExactCase{torch::kFloat, true, 1e-5}));

// Property 3: the running buffer on R ranks: f at micro-batch m is the cumulative formula over
// all ranks' micro-batches 1..m, and f(G) at m = M; reset after the step.
TEST(GlobalBalance, RunningBufferAcrossRanksAndMicroBatches) {
  auto world = test_world();
  const int R = world->size();
  const int64_t M = 3;
  auto layer = make_layer(BalanceScope::Global, torch::kDouble);
  auto ref = make_layer(BalanceScope::Micro, torch::kDouble);
  Balancer balancer({layer}, std::make_shared<CommunicatorCountReducer>(world));
  balancer.begin_step(M);
  auto cumulative = torch::zeros({kE}, torch::kDouble);
  double tokens = 0;
  for (int64_t m = 0; m < M; ++m) {
    auto [x, mask] = full_batch(R, m, torch::kDouble, true);
    layer->forward(rank_slice(x, world->rank()), rank_slice(mask, world->rank()));
    balancer.micro_batch_loss();
    ref->forward(x, mask);  // all ranks' tokens of micro-batch m at once
    cumulative += ref->stats().counts.to(torch::kDouble);
    tokens += ref->stats().num_tokens;
    EXPECT_TRUE(torch::equal(balancer.running_counts(0), cumulative)) << "micro-batch " << m;
    EXPECT_EQ(balancer.running_tokens(0), tokens);
    EXPECT_LT(max_rel_diff(balancer.stats()[0].frequency, cumulative / (kK * tokens)), 1e-15);
  }
  // f(G) from all micro-batches of all ranks concatenated
  std::vector<torch::Tensor> xs, masks;
  for (int64_t m = 0; m < M; ++m) {
    auto [x, mask] = full_batch(R, m, torch::kDouble, true);
    xs.push_back(x);
    masks.push_back(mask);
  }
  ref->forward(torch::cat(xs), torch::cat(masks));
  auto f_G = selection_frequency(ref->stats().counts, ref->stats().num_tokens, kK);
  EXPECT_LT(max_rel_diff(balancer.stats()[0].frequency, f_G), 1e-15);
  balancer.end_step();
  EXPECT_EQ(balancer.running_tokens(0), 0.0);
}

// Property 4: scope micro on R ranks is the average of the per-rank micro losses.
TEST(GlobalBalance, MicroScopeIsTheAverageOfPerRankLosses) {
  auto world = test_world();
  const int R = world->size();
  auto layer = make_layer(BalanceScope::Micro, torch::kDouble);
  Balancer balancer({layer});
  auto [loss, grad] = distributed_step(layer, balancer, *world, *world, 1, torch::kDouble, true);
  auto ref = make_layer(BalanceScope::Micro, torch::kDouble);
  auto [x, mask] = full_batch(R, 0, torch::kDouble, true);
  double sum = 0;
  for (int r = 0; r < R; ++r) {
    ref->forward(rank_slice(x, r), rank_slice(mask, r));
    sum += ref->stats().balance_loss.item<double>();
  }
  EXPECT_NEAR(loss, sum / R, 1e-15);
}

// Property 5: group with g = R equals global; with g = 1 and one micro-batch equals micro.
TEST(GlobalBalance, GroupScopeMatchesGlobalAndMicroAtItsEnds) {
  auto world = test_world();
  const int R = world->size();
  for (int64_t g : {static_cast<int64_t>(R), int64_t{1}}) {
    auto groups = build_process_groups(ParallelSizes{R, 1, g});
    auto layer = make_layer(BalanceScope::Group, torch::kDouble, g);
    BalanceOptions group_options = layer->options.balance();
    Balancer balancer({layer}, balance_reducer(group_options, groups));
    auto [loss, grad] =
        distributed_step(layer, balancer, *groups.balance, *world, 1, torch::kDouble, true);

    auto other = make_layer(g == R ? BalanceScope::Global : BalanceScope::Micro, torch::kDouble);
    Balancer other_balancer({other}, balance_reducer(other->options.balance(), groups));
    auto [other_loss, other_grad] =
        distributed_step(other, other_balancer, *world, *world, 1, torch::kDouble, true);
    EXPECT_NEAR(loss, other_loss, 1e-15 * std::abs(other_loss)) << "g = " << g;
    EXPECT_LT(max_rel_diff(grad, other_grad), 1e-12) << "g = " << g;
  }
}

// Group of 2 ranks inside a larger world: counts are summed inside the group only.
TEST(GlobalBalance, GroupScopeSumsCountsWithinTheGroup) {
  auto world = test_world();
  const int R = world->size();
  if (R % 2 != 0) GTEST_SKIP() << "needs an even world";
  auto groups = build_process_groups(ParallelSizes{R, 1, 2});
  auto layer = make_layer(BalanceScope::Group, torch::kDouble, 2);
  Balancer balancer({layer}, balance_reducer(layer->options.balance(), groups));
  auto [x, mask] = full_batch(R, 0, torch::kDouble, true);
  layer->forward(rank_slice(x, world->rank()), rank_slice(mask, world->rank()));
  balancer.micro_batch_loss();
  auto ref = make_layer(BalanceScope::Micro, torch::kDouble);
  const int first = world->rank() / 2 * 2;
  ref->forward(x.narrow(0, first * kT, 2 * kT), mask.narrow(0, first * kT, 2 * kT));
  EXPECT_TRUE(torch::equal(balancer.running_counts(0), ref->stats().counts.to(torch::kDouble)));
  balancer.end_step();
}

TEST(GlobalBalance, GroupSizeMustMatchTheProcessGroups) {
  auto world = test_world();
  auto groups = build_process_groups(ParallelSizes{world->size(), 1, 1});
  const int64_t g = world->size() + 1;
  expect_throw_with(
      [&] { balance_reducer(BalanceOptions().scope(BalanceScope::Group).group_size(g), groups); },
      "balance group_size (" + std::to_string(g) + ") differs");
}

}  // namespace
}  // namespace gbmoe
