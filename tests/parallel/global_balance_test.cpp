// The spec's properties of global-batch balancing on R ranks (global-lbl.md, "Properties that
// tests must prove"), through TrainingObjective: each rank takes its slice of one batch that
// every rank can rebuild, so the single-process fp64 reference, computed from the spec's
// formulas on the concatenated batch, runs on every rank. The same for quantile balancing (its
// thresholds over ranks equal one process's on the concatenation) and the Shuffle subset.
#include <gtest/gtest.h>

#include "losses/quantile.h"
#include "moe/objective.h"
#include "parallel/balance_sync.h"
#include "tests/parallel/mpi_test_util.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

constexpr int64_t kD = 8, kE = 6, kK = 2, kT = 12;
constexpr double kAlpha = 0.05;

MoELayer make_layer(torch::Dtype dtype) {
  torch::manual_seed(42);  // identical weights on every rank and in the reference
  MoELayer layer(MoELayerOptions(kD, kE, 5).router(RouterOptions().top_k(kK)));
  layer->to(dtype);
  return layer;
}

BalanceOptions options(BalanceScope scope, int64_t group_size = 0) {
  return BalanceOptions().scope(scope).alpha(kAlpha).z_loss(0).group_size(group_size);
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

// Runs one optimizer step of M micro-batches on this rank (no task loss) and returns the
// balancing objective and the router gradient, both averaged over ranks as data parallelism does.
std::pair<double, torch::Tensor> distributed_step(MoELayer& layer, TrainingObjective& objective,
                                                  Communicator& world, int64_t M,
                                                  torch::Dtype dtype, bool padded) {
  const int R = world.size(), rank = world.rank();
  double tokens = 0;
  for (int64_t m = 0; m < M; ++m) {
    tokens += rank_slice(full_batch(R, m, dtype, padded).second, rank).sum().item<double>();
  }
  objective.begin_step(M, tokens);
  layer->zero_grad();
  for (int64_t m = 0; m < M; ++m) {
    auto [x, mask] = full_batch(R, m, dtype, padded);
    auto routing = objective.context();
    layer->forward(rank_slice(x, rank), rank_slice(mask, rank), &routing);
    objective.micro_batch_loss(routing, torch::zeros({}, x.options())).backward();
  }
  const double loss = objective.step_values().balance;
  objective.end_step();
  return {average(world, loss), average(world, layer->router->weight.grad())};
}

// The spec's LBL(f(B), P(B)) in fp64 on tokens x of one process, from the layer's routing.
torch::Tensor reference_lbl(MoELayer& ref, const torch::Tensor& x, const torch::Tensor& mask) {
  RoutingContext routing;
  ref->forward(x, mask, &routing);
  const auto& r = routing.layers()[0].routing;
  auto valid = r.valid.to(torch::kDouble);
  const double n = valid.sum().item<double>();
  auto counts = torch::zeros({kE}, torch::kDouble)
                    .index_add_(0, r.expert_ids.index({r.valid}).flatten(),
                                torch::ones({r.num_valid * kK}, torch::kDouble));
  auto f = counts / (kK * n);
  auto P = (r.scores.to(torch::kDouble) * valid.unsqueeze(1)).sum(0) / n;
  return kAlpha * kE * (f * P).sum();
}

// One process on the concatenation: LBL(f(G), P(G)) and its router gradient.
std::pair<double, torch::Tensor> reference_on_concatenation(torch::Dtype dtype, int R,
                                                            bool padded) {
  auto ref = make_layer(dtype);
  auto [x, mask] = full_batch(R, 0, dtype, padded);
  auto loss = reference_lbl(ref, x, mask);
  auto grad = torch::autograd::grad({loss}, {ref->router->weight})[0];
  return {loss.item<double>(), grad};
}

struct ExactCase {
  torch::Dtype dtype;
  bool padded;
  double tolerance;
};

class GlobalEqualsConcatenation : public ::testing::TestWithParam<ExactCase> {};

// Properties 1 and 2: loss and every router gradient equal one process on the concatenation,
// with equal and with unequal valid-token counts.
TEST_P(GlobalEqualsConcatenation, LossAndRouterGradient) {
  const auto c = GetParam();
  auto world = test_world();
  auto groups = build_process_groups(ParallelSizes{world->size(), 1});
  auto layer = make_layer(c.dtype);
  const auto o = options(BalanceScope::Global);
  TrainingObjective objective({layer}, o, objective_reducers(o, groups));
  auto [loss, grad] = distributed_step(layer, objective, *world, 1, c.dtype, c.padded);
  auto [ref_loss, ref_grad] = reference_on_concatenation(c.dtype, world->size(), c.padded);
  EXPECT_LT(std::abs(loss - ref_loss) / std::abs(ref_loss), c.tolerance);
  EXPECT_LT(max_rel_diff(grad, ref_grad), c.tolerance);
  EXPECT_GT(ref_grad.abs().max().item<double>(), 0.0);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, GlobalEqualsConcatenation,
                         ::testing::Values(ExactCase{torch::kDouble, false, 1e-9},
                                           ExactCase{torch::kDouble, true, 1e-9},
                                           ExactCase{torch::kFloat, false, 1e-5},
                                           ExactCase{torch::kFloat, true, 1e-5}));

// Property 3: the running buffer on R ranks: f at micro-batch m is the cumulative formula over
// all ranks' micro-batches 1..m, and f(G) at m = M; reset after the step.
TEST(GlobalBalance, RunningBufferAcrossRanksAndMicroBatches) {
  auto world = test_world();
  auto groups = build_process_groups(ParallelSizes{world->size(), 1});
  const int R = world->size();
  const int64_t M = 3;
  auto layer = make_layer(torch::kDouble);
  auto ref = make_layer(torch::kDouble);
  const auto o = options(BalanceScope::Global);
  TrainingObjective objective({layer}, o, objective_reducers(o, groups));
  objective.begin_step(M, 1.0);
  auto cumulative = torch::zeros({kE}, torch::kDouble);
  double tokens = 0;
  std::vector<torch::Tensor> xs, masks;
  for (int64_t m = 0; m < M; ++m) {
    auto [x, mask] = full_batch(R, m, torch::kDouble, true);
    auto routing = objective.context();
    layer->forward(rank_slice(x, world->rank()), rank_slice(mask, world->rank()), &routing);
    objective.micro_batch_loss(routing, torch::zeros({}, torch::kDouble));
    RoutingContext all;  // all ranks' tokens of micro-batch m at once
    ref->forward(x, mask, &all);
    cumulative += all.layers()[0].routing.counts.to(torch::kDouble);
    tokens += static_cast<double>(all.layers()[0].routing.num_valid);
    EXPECT_TRUE(torch::equal(objective.running_counts(0), cumulative)) << "micro-batch " << m;
    EXPECT_EQ(objective.running_tokens(0), tokens);
    xs.push_back(x);
    masks.push_back(mask);
  }
  // f(G) from all micro-batches of all ranks concatenated
  RoutingContext whole;
  ref->forward(torch::cat(xs), torch::cat(masks), &whole);
  const auto& g = whole.layers()[0].routing;
  auto f_G = selection_frequency(g.counts, static_cast<double>(g.num_valid), kK);
  auto stats = objective.end_step();
  EXPECT_LT(max_rel_diff(stats[0].counts / (kK * stats[0].tokens), f_G), 1e-15);
  EXPECT_EQ(objective.running_tokens(0), 0.0);
}

// Property 4: scope micro on R ranks is the average of the per-rank micro losses (equal valid
// tokens); with unequal valid tokens each rank's loss weighs by its tokens, like every term.
TEST(GlobalBalance, MicroScopeIsTheTokenWeightedAverageOfPerRankLosses) {
  auto world = test_world();
  const int R = world->size();
  auto groups = build_process_groups(ParallelSizes{R, 1});
  for (bool padded : {false, true}) {
    auto layer = make_layer(torch::kDouble);
    const auto o = options(BalanceScope::Micro);
    TrainingObjective objective({layer}, o, objective_reducers(o, groups));
    auto [loss, grad] = distributed_step(layer, objective, *world, 1, torch::kDouble, padded);
    auto ref = make_layer(torch::kDouble);
    auto [x, mask] = full_batch(R, 0, torch::kDouble, padded);
    torch::Tensor expected = torch::zeros({}, torch::kDouble);
    const double N = mask.sum().item<double>();
    for (int r = 0; r < R; ++r) {
      const double n = rank_slice(mask, r).sum().item<double>();
      expected = expected + reference_lbl(ref, rank_slice(x, r), rank_slice(mask, r)) * (n / N);
    }
    if (!padded) {  // the spec's plain average
      double plain = 0;
      for (int r = 0; r < R; ++r) {
        plain += reference_lbl(ref, rank_slice(x, r), rank_slice(mask, r)).item<double>() / R;
      }
      EXPECT_NEAR(loss, plain, 1e-14);
    }
    auto ref_grad = torch::autograd::grad({expected}, {ref->router->weight})[0];
    EXPECT_NEAR(loss, expected.item<double>(), 1e-14) << "padded " << padded;
    EXPECT_LT(max_rel_diff(grad, ref_grad), 1e-10) << "padded " << padded;
  }
}

// Property 5: group with g = R equals global; with g = 1 and one micro-batch equals micro,
// with unequal valid tokens too. group_size 0 means every data-parallel rank.
TEST(GlobalBalance, GroupScopeMatchesGlobalAndMicroAtItsEnds) {
  auto world = test_world();
  const int R = world->size();
  for (int64_t g : {static_cast<int64_t>(R), int64_t{1}, int64_t{0}}) {
    auto groups = build_process_groups(ParallelSizes{R, 1, g});
    auto layer = make_layer(torch::kDouble);
    const auto o = options(BalanceScope::Group, g);
    TrainingObjective objective({layer}, o, objective_reducers(o, groups));
    auto [loss, grad] = distributed_step(layer, objective, *world, 1, torch::kDouble, true);

    auto other = make_layer(torch::kDouble);
    const auto other_options = options(g == 1 ? BalanceScope::Micro : BalanceScope::Global);
    TrainingObjective other_objective({other}, other_options,
                                      objective_reducers(other_options, groups));
    auto [other_loss, other_grad] =
        distributed_step(other, other_objective, *world, 1, torch::kDouble, true);
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
  auto layer = make_layer(torch::kDouble);
  const auto o = options(BalanceScope::Group, 2);
  TrainingObjective objective({layer}, o, objective_reducers(o, groups));
  auto [x, mask] = full_batch(R, 0, torch::kDouble, true);
  objective.begin_step(1, 1.0);
  auto routing = objective.context();
  layer->forward(rank_slice(x, world->rank()), rank_slice(mask, world->rank()), &routing);
  objective.micro_batch_loss(routing, torch::zeros({}, torch::kDouble));
  auto ref = make_layer(torch::kDouble);
  const int first = world->rank() / 2 * 2;
  RoutingContext pair;
  ref->forward(x.narrow(0, first * kT, 2 * kT), mask.narrow(0, first * kT, 2 * kT), &pair);
  EXPECT_TRUE(torch::equal(objective.running_counts(0),
                           pair.layers()[0].routing.counts.to(torch::kDouble)));
  objective.end_step();
}

TEST(GlobalBalance, GroupSizeMustMatchTheProcessGroups) {
  auto world = test_world();
  auto groups = build_process_groups(ParallelSizes{world->size(), 1, 1});
  const int64_t g = world->size() + 1;
  if (world->size() == 1) GTEST_SKIP() << "one process has no reducers";
  expect_throw_with(
      [&] { objective_reducers(options(BalanceScope::Group, g), groups); },
      "balance group_size (" + std::to_string(g) + ", " + std::to_string(g) + " ranks) differs");
}

// True when t holds the same bits on every rank.
bool same_on_every_rank(Communicator& world, const torch::Tensor& t) {
  auto hi = t.detach().to(torch::kDouble).clone(), lo = -hi;
  world.all_reduce(hi, ReduceOp::Max);
  world.all_reduce(lo, ReduceOp::Max);
  return torch::equal(hi, t.to(torch::kDouble)) && torch::equal(-lo, t.to(torch::kDouble));
}

// The bisection over ranks finds bit for bit what sorting all ranks' rows on one process finds,
// with a different number of rows on every rank (none on the last).
TEST(QuantileOverRanks, LargestOverRanksEqualsSortingTheConcatenation) {
  auto world = test_world();
  auto groups = build_process_groups(ParallelSizes{world->size(), 1});
  const int R = world->size();
  auto rows_of = [R](int r) {
    const int64_t n = (R > 1 && r == R - 1) ? 0 : 5 + 4 * r;
    return at::randn({n, 3}, at::detail::createCPUGenerator(70 + r), torch::kDouble);
  };
  std::vector<torch::Tensor> all;
  for (int r = 0; r < R; ++r) all.push_back(rows_of(r));
  auto concatenation = torch::cat(all);
  const int64_t q = concatenation.size(0) / 3;
  CommunicatorCountReducer reducer(groups.data_parallel);
  auto beta = largest_over_ranks({rows_of(world->rank())}, {torch::tensor(double(q))},
                                 [&](torch::Tensor& t) { reducer.sum_async(t)(); })[0];
  auto sorted = std::get<0>(concatenation.sort(0, /*descending=*/true));
  EXPECT_TRUE(torch::equal(beta, sorted[q]));
}

BalanceOptions quantile_options(BalanceScope scope, int64_t group_size = 0) {
  return options(scope, group_size).method(BalanceMethod::Quantile);
}

// The bias quantile balancing sets after one step of M micro-batches on this rank.
torch::Tensor quantile_step(const BalanceOptions& o, const ProcessGroups& groups, int64_t M) {
  auto world = test_world();
  auto layer = make_layer(torch::kDouble);
  TrainingObjective objective({layer}, o, objective_reducers(o, groups));
  objective.begin_step(M, 0.0);  // quantile balancing has no loss to weigh
  for (int64_t m = 0; m < M; ++m) {
    auto [x, mask] = full_batch(world->size(), m, torch::kDouble, true);
    auto routing = objective.context();
    layer->forward(rank_slice(x, world->rank()), rank_slice(mask, world->rank()), &routing);
    objective.micro_batch_loss(routing, torch::zeros({}, torch::kDouble));
  }
  objective.end_step();
  return layer->router->expert_bias.clone();
}

// r = g - a of the valid tokens of x, from the definition (gates + bias at zero bias).
torch::Tensor reference_residuals(const torch::Tensor& x, const torch::Tensor& mask) {
  auto ref = make_layer(torch::kDouble);
  auto g = torch::softmax(x.matmul(ref->router->weight.detach().t()), -1);
  auto a = std::get<0>(g.sort(-1, /*descending=*/true)).select(1, kK).unsqueeze(1);
  return (g - a).index({mask});
}

// beta_i = the (q+1)-th largest of column i = its (n - q)-th smallest, q = floor(n K / E).
torch::Tensor reference_thresholds(const torch::Tensor& rows) {
  const int64_t n = rows.size(0);
  return std::get<0>(rows.kthvalue(n - n * kK / kE, 0));
}

// Global scope: the thresholds of the global batch over R ranks and M micro-batches equal one
// process's on the concatenation; every rank sets the same bias.
TEST(QuantileOverRanks, GlobalBiasEqualsOneProcessOnTheConcatenation) {
  auto world = test_world();
  const int R = world->size();
  auto groups = build_process_groups(ParallelSizes{R, 1});
  const int64_t M = 2;
  auto bias = quantile_step(quantile_options(BalanceScope::Global), groups, M);
  std::vector<torch::Tensor> rows;
  for (int64_t m = 0; m < M; ++m) {
    auto [x, mask] = full_batch(R, m, torch::kDouble, true);
    rows.push_back(reference_residuals(x, mask));
  }
  auto expected = quantile_bias(reference_thresholds(torch::cat(rows)));
  EXPECT_LT((bias - expected).abs().max().item<double>(), 1e-15);
  EXPECT_TRUE(same_on_every_rank(*world, bias));
}

// Micro scope: the mean over every rank's micro-batches of their thresholds; group g = R equals
// global, group g = 1 with one micro-batch equals micro.
TEST(QuantileOverRanks, MicroAndGroupScopesAverageOverAllRanks) {
  auto world = test_world();
  const int R = world->size();
  auto groups = build_process_groups(ParallelSizes{R, 1});
  const int64_t M = 2;
  auto micro = quantile_step(quantile_options(BalanceScope::Micro), groups, M);
  auto sum = torch::zeros({kE}, torch::kDouble);
  for (int64_t m = 0; m < M; ++m) {
    auto [x, mask] = full_batch(R, m, torch::kDouble, true);
    for (int r = 0; r < R; ++r) {
      sum += reference_thresholds(reference_residuals(rank_slice(x, r), rank_slice(mask, r)));
    }
  }
  EXPECT_LT((micro - quantile_bias(sum / (R * M))).abs().max().item<double>(), 1e-15);
  EXPECT_TRUE(same_on_every_rank(*world, micro));

  auto whole = build_process_groups(ParallelSizes{R, 1, R});
  auto global = quantile_step(quantile_options(BalanceScope::Global), groups, M);
  auto group_R = quantile_step(quantile_options(BalanceScope::Group, R), whole, M);
  EXPECT_LT((group_R - global).abs().max().item<double>(), 1e-15);
  auto singles = build_process_groups(ParallelSizes{R, 1, 1});
  auto group_1 = quantile_step(quantile_options(BalanceScope::Group, 1), singles, 1);
  auto micro_1 = quantile_step(quantile_options(BalanceScope::Micro), groups, 1);
  EXPECT_LT((group_1 - micro_1).abs().max().item<double>(), 1e-15);
  EXPECT_TRUE(same_on_every_rank(*world, group_1));
}

// Shuffle on R ranks, one micro-batch: loss and router gradient equal one process's
// LBL(f(S), P(S)) on the subset S of the concatenation's valid tokens (numbered rank by rank).
TEST(ShuffleOverRanks, LossAndGradientAreThoseOfTheSubsetOfTheConcatenation) {
  auto world = test_world();
  const int R = world->size();
  auto groups = build_process_groups(ParallelSizes{R, 1});
  const uint64_t seed = 9;
  auto layer = make_layer(torch::kDouble);
  const auto o = options(BalanceScope::Global).shuffle(true).shuffle_seed(seed);
  TrainingObjective objective({layer}, o, objective_reducers(o, groups));
  objective.set_step(3);
  auto [loss, grad] = distributed_step(layer, objective, *world, 1, torch::kDouble, true);

  auto ref = make_layer(torch::kDouble);
  auto [x, mask] = full_batch(R, 0, torch::kDouble, true);
  RoutingContext routing;
  ref->forward(x, mask, &routing);
  const auto& r = routing.layers()[0].routing;
  auto s = r.scores.index({r.valid});
  auto ids = r.expert_ids.index({r.valid});
  const int64_t N = s.size(0), n = shuffle_subset_size(N, R, 1);
  auto S = draw_balance_subset(seed, 3, N, n);
  auto counts = torch::zeros({kE}, torch::kDouble)
                    .index_add_(0, ids.index({S}).flatten(), torch::ones({n * kK}, torch::kDouble));
  auto ref_loss = kAlpha * kE * (counts / (kK * n) * s.index({S}).mean(0)).sum();
  auto ref_grad = torch::autograd::grad({ref_loss}, {ref->router->weight})[0];
  EXPECT_LT(std::abs(loss - ref_loss.item<double>()) / ref_loss.item<double>(), 1e-12);
  EXPECT_LT(max_rel_diff(grad, ref_grad), 1e-10);
}

}  // namespace
}  // namespace gbmoe
