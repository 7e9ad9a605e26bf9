// DataParallel: R ranks training on shards equal one process on the whole batch (with and without
// gradient accumulation), bucket fusion, missing gradients, and the expert-shard rule (by module
// marks, not by names).
#include <gtest/gtest.h>

#include "moe/moe_layer.h"
#include "parallel/data_parallel.h"
#include "parallel/process_groups.h"
#include "tests/parallel/mpi_test_util.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

torch::nn::Sequential make_mlp(int64_t seed) {
  torch::manual_seed(seed);
  return torch::nn::Sequential(torch::nn::Linear(6, 16), torch::nn::Tanh(),
                               torch::nn::Linear(16, 16), torch::nn::Tanh(),
                               torch::nn::Linear(16, 3));
}

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const std::string& kind,
                                                        torch::nn::Sequential& model) {
  if (kind == "adam") {
    return std::make_unique<torch::optim::Adam>(model->parameters(),
                                                torch::optim::AdamOptions(1e-2));
  }
  return std::make_unique<torch::optim::SGD>(model->parameters(),
                                             torch::optim::SGDOptions(0.1).momentum(0.9));
}

// The global batch of a step: the same on every rank, rows [r B, (r + 1) B) belong to rank r.
std::pair<torch::Tensor, torch::Tensor> global_batch(int step, int64_t rows) {
  torch::manual_seed(1000 + step);
  auto x = torch::randn({rows, 6});
  auto y = torch::randn({rows, 3});
  return {x, y};
}

struct TrainCase {
  std::string optimizer;
  int micro_batches;
  bool overlap;  // start/finish_gradient_averaging instead of average_gradients
};

class DataParallelTraining : public testing::TestWithParam<TrainCase> {};

TEST_P(DataParallelTraining, EqualsOneProcessOnTheConcatenatedBatch) {
  auto world = test_world();
  const int R = world->size(), me = world->rank();
  const auto param = GetParam();
  const int64_t B = 8, steps = 5, M = param.micro_batches;

  // Reference: one process, the whole batch, no accumulation. Rank 0's initial parameters.
  auto reference = make_mlp(/*seed=*/100);
  auto reference_opt = make_optimizer(param.optimizer, reference);
  for (int step = 0; step < steps; ++step) {
    auto [x, y] = global_batch(step, R * B);
    reference_opt->zero_grad();
    torch::mse_loss(reference->forward(x), y).backward();
    reference_opt->step();
  }

  // Data parallel: each rank starts from its own initialization until the broadcast.
  auto model = make_mlp(/*seed=*/100 + me);
  DataParallel dp(model.ptr(), world, nullptr, DataParallelOptions().bucket_bytes(1024));
  dp.broadcast_parameters();
  auto opt = make_optimizer(param.optimizer, model);
  for (int step = 0; step < steps; ++step) {
    auto [x, y] = global_batch(step, R * B);
    auto x_shard = x.narrow(0, me * B, B), y_shard = y.narrow(0, me * B, B);
    opt->zero_grad();
    for (int64_t m = 0; m < M; ++m) {
      auto xm = x_shard.narrow(0, m * B / M, B / M), ym = y_shard.narrow(0, m * B / M, B / M);
      (torch::mse_loss(model->forward(xm), ym) / M).backward();
    }
    if (param.overlap) {  // once per optimizer step
      dp.start_gradient_averaging();
      dp.finish_gradient_averaging();
    } else {
      dp.average_gradients();
    }
    opt->step();
  }

  auto params = model->parameters(), ref_params = reference->parameters();
  ASSERT_EQ(params.size(), ref_params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_LT((params[i] - ref_params[i]).abs().max().item<double>(), 1e-5) << "parameter " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(OptimizersAndAccumulation, DataParallelTraining,
                         testing::Values(TrainCase{"sgd", 1, false}, TrainCase{"sgd", 2, true},
                                         TrainCase{"adam", 1, true}, TrainCase{"adam", 4, false}),
                         [](const testing::TestParamInfo<TrainCase>& info) {
                           return c10::str(info.param.optimizer, "_micro", info.param.micro_batches,
                                           info.param.overlap ? "_overlap" : "");
                         });

TEST(DataParallel, BucketsFuseParametersAndMissingGradientsCountAsZero) {
  auto world = test_world();
  const int R = world->size(), me = world->rank();
  torch::manual_seed(0);
  torch::nn::Sequential model(torch::nn::Linear(32, 32), torch::nn::Linear(32, 32),
                              torch::nn::Linear(32, 32), torch::nn::Linear(32, 32));
  model[0]->as<torch::nn::Linear>()->bias.set_requires_grad(false);  // frozen: not bucketed
  const int64_t bucket_bytes = 8192;
  DataParallel dp(model.ptr(), world, nullptr, DataParallelOptions().bucket_bytes(bucket_bytes));
  size_t bucketed = 0;
  for (const auto& bucket : dp.buckets()) {
    bucketed += bucket.params.size();
    EXPECT_TRUE(bucket.flat.nbytes() <= static_cast<size_t>(bucket_bytes) ||
                bucket.params.size() == 1);
  }
  EXPECT_EQ(bucketed, 7u);
  EXPECT_GT(dp.buckets().size(), 1u);
  EXPECT_LT(dp.buckets().size(), 7u);
  EXPECT_EQ(dp.gradient_bytes(), (4 * 32 * 32 + 3 * 32) * 4);

  // Rank 0 has no gradients at all; rank r > 0 has gradient r everywhere.
  if (me > 0) {
    for (auto& p : model->parameters()) {
      if (p.requires_grad()) p.mutable_grad() = torch::full_like(p, static_cast<float>(me));
    }
  }
  dp.average_gradients();
  const float expected = static_cast<float>(R * (R - 1) / 2) / R;
  for (auto& p : model->parameters()) {
    if (!p.requires_grad()) {
      EXPECT_FALSE(p.grad().defined());
      continue;
    }
    ASSERT_TRUE(p.grad().defined());
    EXPECT_TRUE(torch::allclose(p.grad(), torch::full_like(p, expected)));
  }
}

// A dense layer, a MoE layer whose routed experts are marked as shards over `shards` ranks (as
// apply_expert_parallel marks them), and two of the user's modules whose names merely mention
// experts: an unsharded GroupedExperts called shared_experts and a Linear called experts.
struct ShardedNet : torch::nn::Module {
  explicit ShardedNet(int64_t shards, int64_t dim = 4, int64_t hidden = 3) {
    dense = register_module("dense", torch::nn::Linear(dim, dim));
    moe = register_module("moe", MoELayer(MoELayerOptions(dim, 2, hidden)));
    moe->experts->shards = shards;
    shared_experts =
        register_module("shared_experts", GroupedExperts(GroupedExpertsOptions(2, dim, hidden)));
    experts = register_module("experts", torch::nn::Linear(dim, dim));
  }
  // Every parameter but the routed experts'.
  std::vector<torch::Tensor> dense_parameters() const {
    std::vector<torch::Tensor> out;
    for (const auto& p : named_parameters()) {
      if (p.key().rfind("moe.experts.", 0) != 0) out.push_back(p.value());
    }
    return out;
  }
  torch::nn::Linear dense{nullptr}, experts{nullptr};
  MoELayer moe{nullptr};
  GroupedExperts shared_experts{nullptr};
};

TEST(DataParallel, ExpertRuleFollowsModuleMarksNotNames) {
  auto net = std::make_shared<ShardedNet>(/*shards=*/2);
  const auto rule = expert_parameter_rule(*net);
  int64_t experts = 0;
  for (const auto& p : net->named_parameters()) {
    const bool routed = p.key() == "moe.experts.gate_up" || p.key() == "moe.experts.down";
    EXPECT_EQ(rule(p.key()), routed) << p.key();
    experts += rule(p.key());
  }
  EXPECT_EQ(experts, 2);
  // Unsharded (no expert parallelism, or a size of 1): nothing is an expert shard.
  auto dense_net = std::make_shared<ShardedNet>(/*shards=*/1);
  const auto dense_rule = expert_parameter_rule(*dense_net);
  for (const auto& p : dense_net->named_parameters()) EXPECT_FALSE(dense_rule(p.key())) << p.key();
  // The rule of a submodule names the parameters relative to it.
  EXPECT_TRUE(expert_parameter_rule(*net->moe)("experts.gate_up"));
  EXPECT_FALSE(expert_parameter_rule(*net->moe)("moe.experts.gate_up"));
}

TEST(DataParallel, ExpertShardsUseTheirOwnGroup) {
  auto world = test_world();
  const int R = world->size(), me = world->rank();
  const int ep = R % 2 == 0 ? 2 : 1;
  auto groups = build_process_groups(ParallelSizes{R, ep}, MPI_COMM_WORLD);
  auto net = std::make_shared<ShardedNet>(ep);
  DataParallel dp(net, groups.data_parallel, groups.expert_data_parallel);
  size_t expert_params = 0;
  for (const auto& bucket : dp.buckets()) {
    for (const auto& name : bucket.names) {
      const bool routed = name.rfind("moe.experts.", 0) == 0;
      EXPECT_EQ(bucket.expert, routed && ep > 1) << name;
      expert_params += bucket.expert ? 1 : 0;
    }
  }
  EXPECT_EQ(expert_params, ep > 1 ? 2u : 0u);

  // Broadcast: dense from world rank 0, expert shards from rank 0 of the expert-data-parallel
  // group, which is world rank me % ep.
  {
    torch::NoGradGuard no_grad;
    for (auto& p : net->parameters()) p.fill_(me);
  }
  dp.broadcast_parameters();
  for (auto& p : net->dense_parameters()) EXPECT_TRUE(torch::equal(p, torch::zeros_like(p)));
  for (auto& p : net->moe->experts->parameters()) {
    EXPECT_TRUE(torch::equal(p, torch::full_like(p, me % ep)));
  }

  // Gradients: dense ones averaged over the world; expert ones summed over the ranks holding
  // the same shard and divided by the world size.
  for (auto& p : net->parameters()) p.mutable_grad() = torch::full_like(p, me + 1.0);
  dp.average_gradients();
  double expert_sum = 0;
  for (int r = me % ep; r < R; r += ep) expert_sum += r + 1;
  for (auto& p : net->dense_parameters()) {
    EXPECT_TRUE(torch::allclose(p.grad(), torch::full_like(p, (R + 1) / 2.0)));
  }
  for (auto& p : net->moe->experts->parameters()) {
    EXPECT_TRUE(torch::allclose(p.grad(), torch::full_like(p, expert_sum / R)));
  }
}

// Buckets of 64 KiB and more go through node shared memory straight from the gradients: each
// average is the ranks' gradients added by hand in rank order and divided by the data-parallel
// size, bit for bit, with a gradient missing on rank 0 (zeros there) and the expert shards summed
// over their own group.
TEST(DataParallel, LargeBucketsAverageInRankOrderAsByHand) {
  auto world = test_world();
  const int R = world->size(), me = world->rank();
  const int ep = R % 2 == 0 ? 2 : 1;
  auto groups = build_process_groups(ParallelSizes{R, ep}, MPI_COMM_WORLD);
  auto net = std::make_shared<ShardedNet>(ep, /*dim=*/128, /*hidden=*/256);  // 64 KiB-512 KiB
  DataParallel dp(net, groups.data_parallel, groups.expert_data_parallel);
  auto named = net->named_parameters();
  // Rank r's gradient of parameter i: values whose fp32 sum depends on the order of addition.
  auto grad_of = [&](int r, size_t i) {
    const auto& p = named[i].value();
    torch::manual_seed(100 * static_cast<int64_t>(i) + r);
    return (torch::randn(p.sizes(), torch::kDouble) * std::pow(10.0, r % 3 * 3)).to(p.dtype());
  };
  const bool missing_here = me == 0;  // "experts.bias" has no gradient on rank 0
  for (size_t i = 0; i < named.size(); ++i) {
    if (missing_here && named[i].key() == "experts.bias") continue;
    named[i].value().mutable_grad() = grad_of(me, i);
  }
  dp.average_gradients();
  for (size_t i = 0; i < named.size(); ++i) {
    const bool routed = named[i].key().rfind("moe.experts.", 0) == 0 && ep > 1;
    torch::Tensor sum;
    for (int r = routed ? me % ep : 0; r < R; r += routed ? ep : 1) {
      auto g = r == 0 && named[i].key() == "experts.bias" ? torch::zeros_like(named[i].value())
                                                          : grad_of(r, i);
      sum = sum.defined() ? sum + g : g;
    }
    auto expected = R == 1 ? sum : sum / torch::scalar_tensor(R, sum.options());
    ASSERT_TRUE(named[i].value().grad().defined()) << named[i].key();
    EXPECT_TRUE(torch::equal(named[i].value().grad(), expected)) << named[i].key();
  }
}

TEST(DataParallel, ChecksItsArgumentsAndCallOrder) {
  auto model = make_mlp(0);
  expect_throw_with([&] { DataParallel(model.ptr(), nullptr); },
                    "needs a data-parallel communicator");
  expect_throw_with(
      [&] {
        DataParallel(model.ptr(), test_world(), nullptr, DataParallelOptions().bucket_bytes(0));
      },
      "bucket_bytes (0) must be > 0");
  DataParallel dp(model.ptr(), test_world());
  expect_throw_with([&] { dp.finish_gradient_averaging(); },
                    "finish_gradient_averaging called without start_gradient_averaging");
}

}  // namespace
}  // namespace gbmoe
