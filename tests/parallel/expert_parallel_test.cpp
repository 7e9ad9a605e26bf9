// Expert parallelism on R ranks, parametrized over the expert-parallel sizes that divide R:
// outputs, gradients, training steps and the balance statistics equal those of the same ranks
// holding every expert. Each rank takes its slice of one batch that every rank can rebuild.
#include <gtest/gtest.h>

#include "moe/objective.h"
#include "parallel/balance_sync.h"
#include "parallel/data_parallel.h"
#include "parallel/expert_parallel.h"
#include "tests/parallel/mpi_test_util.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

constexpr int64_t kD = 8, kE = 8, kF = 6, kK = 2, kT = 10;

struct LayerCase {
  const char* name;
  double capacity_factor = 0.0;   // 0 = dropless
  bool unused_experts = false;    // experts 2 and 5 are never selected
  bool silent_last_rank = false;  // the last rank's tokens are all padding: it sends nothing
};

MoELayer make_layer(const LayerCase& c) {
  torch::manual_seed(7);  // identical weights on every rank and in the reference
  MoELayer layer(MoELayerOptions(kD, kE, kF)
                     .router(RouterOptions().top_k(kK))
                     .shared_experts(1)
                     .dispatcher(DispatcherOptions().capacity_factor(c.capacity_factor)));
  if (c.unused_experts) {
    layer->router->expert_bias[2] = -1e9;
    layer->router->expert_bias[5] = -1e9;
  }
  return layer;
}

// Rank r's tokens (kT, D), mask and output weighting of micro-batch m.
struct Slice {
  torch::Tensor x, mask, g;
};
Slice rank_slice(const LayerCase& c, int R, int rank, int64_t m = 0) {
  auto gen = at::detail::createCPUGenerator(500 + m);
  auto x = at::randn({R, kT, kD}, gen, torch::kFloat);
  auto g = at::randn({R, kT, kD}, gen, torch::kFloat);
  auto mask = torch::ones({R, kT}, torch::kBool);
  if (c.silent_last_rank && R > 1) mask[R - 1].fill_(false);
  mask[0][kT - 1] = false;  // some padding everywhere
  return {x[rank].clone(), mask[rank].clone(), g[rank].clone()};
}

// This rank's expert block of a full (E, ...) tensor.
torch::Tensor shard_of(const torch::Tensor& full, const Communicator& ep) {
  const auto s = expert_shard(full.size(0), ep.size(), ep.rank());
  return full.narrow(0, s.first, s.count);
}

// The expert-parallel sizes that divide the world, after 0: no expert parallelism at all.
std::vector<int> ep_sizes() {
  std::vector<int> sizes{0};
  const int R = test_world()->size();
  for (int p = 1; p <= R; ++p) {
    if (R % p == 0) sizes.push_back(p);
  }
  return sizes;
}

class ExpertParallelLayer : public ::testing::TestWithParam<LayerCase> {};

// The layer's output and every gradient (input, router, routed and shared experts, averaged by
// DataParallel) equal those of the same ranks each holding all experts.
TEST_P(ExpertParallelLayer, OutputAndGradientsMatchAllExpertsLocal) {
  const auto c = GetParam();
  auto world = test_world();
  const int R = world->size(), rank = world->rank();
  auto s = rank_slice(c, R, rank);

  // Reference: every expert here, R ranks' slices one after the other.
  auto ref = make_layer(c);
  torch::Tensor ref_y, ref_dx;
  int64_t ref_dropped = 0;
  for (int r = 0; r < R; ++r) {
    auto sr = rank_slice(c, R, r);
    auto x = sr.x.clone().requires_grad_(true);
    RoutingContext routing;
    auto y = ref->forward(x, sr.mask, &routing);
    (y * sr.g).sum().backward();
    if (r == rank) {
      ref_y = y.detach(), ref_dx = x.grad(), ref_dropped = routing.layers()[0].num_dropped;
    }
  }

  for (int P : ep_sizes()) {
    if (P == 0) continue;  // the reference above
    auto groups = build_process_groups(ParallelSizes{R, P});
    auto layer = make_layer(c);
    EXPECT_EQ(apply_expert_parallel(*layer, groups), 1);
    EXPECT_EQ(layer->experts->gate_up.size(0), kE / P);
    EXPECT_EQ(layer->experts->shards, P);
    // The sharded experts' parameters, by module: the routed experts' only when P > 1.
    const auto is_expert = expert_parameter_rule(*layer);
    for (const auto& item : layer->named_parameters()) {
      const bool routed = item.key() == "experts.gate_up" || item.key() == "experts.down";
      EXPECT_EQ(is_expert(item.key()), routed && P > 1) << item.key() << " P = " << P;
    }
    DataParallel dp(layer.ptr(), groups.data_parallel, groups.expert_data_parallel);
    auto x = s.x.clone().requires_grad_(true);
    RoutingContext routing;
    auto y = layer->forward(x, s.mask, &routing);
    (y * s.g).sum().backward();
    dp.average_gradients();

    EXPECT_LT(max_rel_diff(y, ref_y), 1e-5) << c.name << " P = " << P;
    EXPECT_LT(max_rel_diff(x.grad(), ref_dx), 1e-5) << c.name << " P = " << P;
    const auto& ep = *groups.expert_parallel;
    for (const auto& item : ref->named_parameters()) {
      auto expected = item.value().grad() / R;
      if (is_expert(item.key())) expected = shard_of(expected, ep);
      const auto& got = layer->named_parameters()[item.key()].grad();
      EXPECT_LT(max_rel_diff(got, expected), 1e-5) << c.name << " P = " << P << " " << item.key();
    }
    EXPECT_EQ(routing.layers()[0].num_dropped, ref_dropped) << c.name << " P = " << P;
  }
  EXPECT_GT(ref->experts->gate_up.grad().abs().max().item<double>(), 0.0);
  if (c.capacity_factor > 0) {
    EXPECT_GT(all_reduce_sum(*world, static_cast<double>(ref_dropped)), 0.0);
  }
  if (c.unused_experts) {
    EXPECT_EQ(ref->experts->gate_up.grad()[2].abs().max().item<double>(), 0.0);
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, ExpertParallelLayer,
                         ::testing::Values(LayerCase{"dropless"},
                                           LayerCase{"unused experts", 0.0, true},
                                           LayerCase{"silent last rank", 0.0, false, true},
                                           LayerCase{"capacity", 1.0, false, false}),
                         [](const auto& info) {
                           std::string name = info.param.name;
                           for (auto& ch : name) ch = ch == ' ' ? '_' : ch;
                           return name;
                         });

// The layer's full expert weights: the shards gathered over the expert-parallel group.
torch::Tensor gathered(const torch::Tensor& shard, Communicator& ep) {
  return ep.all_gather(shard.detach().contiguous());
}

// Rank r's token-summed task loss of micro-batch s: squared error to s.g over valid tokens.
torch::Tensor task_loss_sum(const torch::Tensor& y, const Slice& s) {
  return ((y - s.g).pow(2).mean(-1) * s.mask).sum();
}

// Three AdamW steps of two micro-batches with global balancing (and z-loss) give the same
// parameters with and without expert parallelism.
TEST(ExpertParallel, TrainingStepsMatchWithoutExpertParallelism) {
  auto world = test_world();
  const int R = world->size(), rank = world->rank();
  const LayerCase c{"train"};
  const auto balance = BalanceOptions().scope(BalanceScope::Global).alpha(0.05);
  std::map<int, std::vector<torch::Tensor>> params;  // full parameters after training, per P
  for (int P : ep_sizes()) {
    auto groups = build_process_groups(ParallelSizes{R, std::max(P, 1)});
    auto layer = make_layer(c);
    if (P > 0) apply_expert_parallel(*layer, groups);
    TrainingObjective objective({layer}, balance, objective_reducers(balance, groups));
    DataParallel dp(layer.ptr(), groups.data_parallel,
                    P > 0 ? groups.expert_data_parallel : nullptr);
    const auto is_expert = expert_parameter_rule(*layer);
    torch::optim::AdamW optimizer(layer->parameters(), torch::optim::AdamWOptions(1e-2));
    for (int64_t step = 0; step < 3; ++step) {
      double tokens = 0;
      for (int64_t m = 0; m < 2; ++m)
        tokens += rank_slice(c, R, rank, 2 * step + m).mask.sum().item<double>();
      objective.begin_step(2, tokens);
      optimizer.zero_grad();
      for (int64_t m = 0; m < 2; ++m) {
        auto s = rank_slice(c, R, rank, 2 * step + m);
        auto routing = objective.context();
        auto y = layer->forward(s.x, s.mask, &routing);
        objective.micro_batch_loss(routing, task_loss_sum(y, s)).backward();
      }
      dp.average_gradients();
      optimizer.step();
      objective.end_step();
    }
    for (const auto& item : layer->named_parameters()) {
      params[P].push_back(is_expert(item.key()) ? gathered(item.value(), *groups.expert_parallel)
                                                : item.value().detach().clone());
    }
  }
  auto initial = make_layer(c)->parameters();
  for (const auto& [P, ps] : params) {
    for (size_t i = 0; i < ps.size(); ++i) {
      EXPECT_LT(max_rel_diff(ps[i], params[0][i]), 1e-5) << "P = " << P << " parameter " << i;
      EXPECT_GT(max_rel_diff(ps[i], initial[i]), 1e-4) << "parameter " << i << " did not train";
    }
  }
}

// Spec property 6: the global-batch counts and the load-balancing loss do not depend on the
// expert-parallel size (counts describe routing decisions wherever the experts live).
TEST(ExpertParallel, GlobalCountsAndLossIndependentOfExpertParallelSize) {
  auto world = test_world();
  const int R = world->size(), rank = world->rank();
  const LayerCase c{"balance", 1.0};  // capacity dropping on: counts are taken before it
  const auto balance = BalanceOptions().scope(BalanceScope::Global).alpha(0.05).z_loss(0);
  torch::Tensor counts_0;
  double loss_0 = 0;
  for (int P : ep_sizes()) {
    auto groups = build_process_groups(ParallelSizes{R, std::max(P, 1)});
    auto layer = make_layer(c);
    if (P > 0) apply_expert_parallel(*layer, groups);
    TrainingObjective objective({layer}, balance, objective_reducers(balance, groups));
    auto s = rank_slice(c, R, rank);
    objective.begin_step(1, s.mask.sum().item<double>());
    auto routing = objective.context();
    layer->forward(s.x, s.mask, &routing);
    const double loss = objective.micro_batch_loss(routing, torch::zeros({})).item<double>();
    auto counts = objective.running_counts(0);
    EXPECT_EQ(objective.step_tokens(), all_reduce_sum(*world, s.mask.sum().item<double>()));
    objective.end_step();
    if (P == 0) {
      counts_0 = counts, loss_0 = loss;
      EXPECT_EQ(counts.sum().item<double>(),
                all_reduce_sum(*world, s.mask.sum().item<double>()) * kK);
    }
    EXPECT_TRUE(torch::equal(counts, counts_0)) << "P = " << P;
    EXPECT_EQ(loss, loss_0) << "P = " << P;
  }
}

TEST(ExpertParallel, InvalidSizesNameEveryValue) {
  auto world = test_world();
  const int R = world->size();
  expect_throw_with(
      [&] {
        ParallelSizes{R, R + 1}.validate();
      },
      "expert_parallel (" + std::to_string(R + 1) + ") must divide world size (" +
          std::to_string(R) + ")");
  if (R == 1) return;
  auto groups = build_process_groups(ParallelSizes{R, R});
  MoELayer layer(MoELayerOptions(kD, R + 1, kF));
  expect_throw_with([&] { apply_expert_parallel(*layer, groups); },
                    "expert_parallel (" + std::to_string(R) + ") must divide num_experts (" +
                        std::to_string(R + 1) + ")");
  expect_throw_with([&] { expert_shard(6, 4, 0); },
                    "expert_parallel (4) must divide num_experts (6)");
}

}  // namespace
}  // namespace gbmoe
