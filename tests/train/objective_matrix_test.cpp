// The training objective where the pieces meet, on R ranks through the trainer's own code
// (model_options_from_config, balance_options_from_config, objective_reducers, forward_backward,
// DataParallel): for every scope x method x expert_parallel x activation checkpointing x
// grad_accum, with unequal padding across ranks, the averaged gradients of one step equal the
// gradient of what one process trains on the concatenated global batch, re-derived here in fp64
// from the spec (cross-entropy, LBL and z-loss together; for scope shuffle the LBL of the step's
// subset). Then a few optimizer steps keep every replicated parameter and buffer (expert_bias of
// loss-free and quantile balancing included) bit-equal across ranks.
#include <gtest/gtest.h>

#include <sstream>

#include "moe/objective.h"
#include "parallel/balance_sync.h"
#include "parallel/data_parallel.h"
#include "parallel/expert_parallel.h"
#include "tests/test_util.h"
#include "train/trainer.h"

namespace gbmoe {
namespace {

constexpr int64_t kVocab = 23, kSeq = 5, kRows = 2, kE = 4, kK = 2;

struct Case {
  std::string scope, method;
  int64_t expert_parallel, grad_accum;
  bool checkpointing;
  std::string name() const {
    std::ostringstream s;
    s << scope << "/" << method << " ep " << expert_parallel << " M " << grad_accum
      << (checkpointing ? " checkpointing" : "");
    return s.str();
  }
};

Config tiny_config(const Case& c) {
  Config config;
  config.model.dim = 12;
  config.model.num_layers = 2;
  config.model.num_heads = 2;
  config.model.num_experts = kE;
  config.model.top_k = kK;
  config.model.expert_hidden = 10;
  config.model.shared_experts = 1;
  config.model.dense_hidden = 16;
  config.model.init_std = 0.3;  // routers far from uniform, so the balancing gradient is large
  config.balance.scope = c.scope;
  config.balance.method = c.method;
  config.balance.alpha = 0.1;
  config.balance.z_loss = 0.01;
  config.balance.micro_alpha = c.scope == "global" || c.scope == "group" ? 0.02 : 0.0;
  config.balance.group_size = c.scope == "group" ? 1 : 0;
  config.balance.bias_update_rate = 0.05;
  config.data.grad_accum = c.grad_accum;
  config.parallel.expert_parallel = c.expert_parallel;
  config.train.activation_checkpointing = c.checkpointing;
  return config;
}

// Rank r's micro-batch: token ids every rank can rebuild; the last rows lose r + 1 positions
// (and rank 1's second row is empty but one token), so ranks hold unequal valid tokens. Its M
// micro-batches are copies, so that the running f of the first is already the step's.
Batch rank_batch(int rank) {
  auto gen = at::detail::createCPUGenerator(77 + rank);
  Batch b;
  b.inputs = at::randint(kVocab, {kRows, kSeq}, gen, torch::kLong);
  b.targets = at::randint(kVocab, {kRows, kSeq}, gen, torch::kLong);
  b.mask = torch::ones({kRows, kSeq}, torch::kBool);
  b.mask[kRows - 1].narrow(0, kSeq - 1 - rank % 3, 1 + rank % 3).fill_(false);
  if (rank % 2 == 1) b.mask[0].narrow(0, 1, kSeq - 1).fill_(false);
  b.targets.masked_fill_(b.mask.logical_not(), -100);
  b.domain = torch::zeros({kRows}, torch::kLong);
  return b;
}

LanguageModel make_model(const Config& config) {
  torch::manual_seed(5);
  LanguageModel model(model_options_from_config(config, kVocab));
  model->to(torch::kDouble);
  return model;
}

// One process, fp64, from the spec: the objective of the concatenated global batch (rank r's
// M copies in order), each balance unit weighted by its valid tokens.
torch::Tensor reference_objective(LanguageModel& model, const Config& config, int R) {
  const int64_t M = config.data.grad_accum;
  std::vector<torch::Tensor> inputs, targets, masks;
  for (int r = 0; r < R; ++r) {
    for (int64_t m = 0; m < M; ++m) {
      auto b = rank_batch(r);
      inputs.push_back(b.inputs), targets.push_back(b.targets), masks.push_back(b.mask);
    }
  }
  auto mask = torch::cat(masks);  // (R M kRows, S): unit (r, m) = rows [(r M + m) kRows, +kRows)
  RoutingContext routing;
  auto logits = model->forward(torch::cat(inputs), mask, &routing);
  auto valid = mask.flatten().to(torch::kDouble);
  const double N = valid.sum().item<double>();
  auto loss = torch::nn::functional::cross_entropy(
                  logits.flatten(0, 1), torch::cat(targets).flatten(),
                  torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum)) /
              N;
  const auto& b = config.balance;
  const int64_t unit_rows = kRows * kSeq;  // tokens of one (rank, micro-batch)
  for (const auto& record : routing.layers()) {
    const auto& rt = record.routing;
    loss = loss + b.z_loss * (torch::logsumexp(rt.logits, -1).square() * valid).sum() / N;
    if (b.method == "loss_free" || b.method == "quantile") continue;
    auto onehot =
        torch::zeros({rt.scores.size(0), kE}, torch::kDouble).scatter_(1, rt.expert_ids, 1.0);
    // sum over units u of (n_u / N) alpha E f_u . P_u, units given as token ranges
    auto lbl = [&](int64_t rows_per_unit, double alpha) {
      auto total = torch::zeros({}, torch::kDouble);
      for (int64_t first = 0; first < rt.scores.size(0); first += rows_per_unit) {
        auto w = valid.narrow(0, first, rows_per_unit);
        const double n = w.sum().item<double>();
        if (n == 0) continue;
        auto f = (onehot.narrow(0, first, rows_per_unit) * w.unsqueeze(1)).sum(0) / (kK * n);
        auto P = (rt.scores.narrow(0, first, rows_per_unit) * w.unsqueeze(1)).sum(0) / n;
        total = total + (n / N) * alpha * kE * (f * P).sum();
      }
      return total;
    };
    if (b.scope == "global") loss = loss + lbl(rt.scores.size(0), b.alpha);
    if (b.scope == "shuffle") {  // valid tokens numbered rank by rank, micro-batch by micro-batch
      auto S = valid.nonzero().select(1, 0).index(
          {draw_balance_subset(config.train.seed, 0, static_cast<int64_t>(N),
                               shuffle_subset_size(static_cast<int64_t>(N), R, M))});
      auto f = onehot.index({S}).sum(0) / (kK * S.numel());
      loss = loss + b.alpha * kE * (f * rt.scores.index({S}).mean(0)).sum();
    }
    if (b.scope == "group") loss = loss + lbl(M * unit_rows, b.alpha);  // group_size 1: a rank
    if (b.scope == "micro") loss = loss + lbl(unit_rows, b.alpha);
    if (b.scope == "sequence") loss = loss + lbl(kSeq, b.alpha);
    if (b.micro_alpha > 0) loss = loss + lbl(unit_rows, b.micro_alpha);
  }
  return loss;
}

// Whether every rank of comm holds bit-identical t.
bool replicated(Communicator& comm, const torch::Tensor& t) {
  auto mine = t.detach().to(torch::kDouble).flatten();
  auto hi = mine.clone(), neg_lo = -mine;
  comm.all_reduce(hi, ReduceOp::Max);
  comm.all_reduce(neg_lo, ReduceOp::Max);
  return torch::equal(hi, mine) && torch::equal(-neg_lo, mine);
}

class ObjectiveMatrix : public ::testing::Test {
 protected:
  void run(const Case& c) {
    int R = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &R);
    if (R % c.expert_parallel != 0) return;
    SCOPED_TRACE(c.name());
    const auto config = tiny_config(c);
    auto groups = build_process_groups(
        ParallelSizes{R, c.expert_parallel, c.scope == "group" ? config.balance.group_size : 0});
    const int rank = groups.world->rank();
    auto model = make_model(config);
    if (c.expert_parallel > 1) apply_expert_parallel(*model, groups);
    const auto balance = balance_options_from_config(config);
    TrainingObjective objective(model->moe_layers(), balance, objective_reducers(balance, groups));
    DataParallel dp(model.ptr(), groups.data_parallel,
                    c.expert_parallel > 1 ? groups.expert_data_parallel : nullptr);
    std::vector<Batch> micro(config.data.grad_accum, rank_batch(rank));
    // The trainer's default train.forward_ahead: ahead for global and group with M > 1.
    auto losses = forward_backward(model, objective, micro, torch::kCPU, false, {},
                                   config.train.forward_ahead);
    ASSERT_TRUE(losses.finite) << losses.bad_term;
    dp.average_gradients();

    auto plain = config;  // the reference takes gradients with autograd::grad: no checkpointing
    plain.train.activation_checkpointing = false;
    auto ref = make_model(plain);
    auto ref_loss = reference_objective(ref, plain, R);
    auto ref_named = ref->named_parameters();
    std::vector<torch::Tensor> ref_params;
    for (const auto& item : ref_named) ref_params.push_back(item.value());
    auto ref_grads = torch::autograd::grad({ref_loss}, ref_params, {}, false, false, true);
    const auto is_shard = expert_parameter_rule(*model);
    size_t i = 0;
    for (const auto& item : ref_named) {
      auto expected = ref_grads[i++];
      const auto& grad = model->named_parameters()[item.key()].grad();
      if (!expected.defined()) expected = torch::zeros_like(item.value());
      if (is_shard(item.key())) {
        const auto shard = expert_shard(kE, c.expert_parallel, groups.expert_parallel->rank());
        expected = expected.narrow(0, shard.first, shard.count);
      }
      ASSERT_TRUE(grad.defined()) << item.key();
      EXPECT_LT(max_rel_diff(grad, expected, 1e-10), 1e-9)
          << item.key() << " |grad| " << grad.norm().item<double>() << " expected "
          << expected.norm().item<double>();
    }
    // The objective's value is that of the global batch, once averaged over ranks.
    const auto& v = losses.values;
    const double value = all_reduce_sum(*groups.world, v.task + v.balance + v.z_loss) / R;
    EXPECT_NEAR(value, ref_loss.item<double>(), 1e-12 * std::abs(ref_loss.item<double>()));
    objective.end_step();
    check_replicas_after_steps(c, config, model, objective, dp, groups);
  }

  // Three more optimizer steps on differing data: everything replicated stays bit-equal.
  void check_replicas_after_steps(const Case& c, const Config& config, LanguageModel& model,
                                  TrainingObjective& objective, DataParallel& dp,
                                  const ProcessGroups& groups) {
    torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(0.05));
    for (int step = 0; step < 3; ++step) {
      optimizer.zero_grad();
      std::vector<Batch> micro;
      for (int64_t m = 0; m < config.data.grad_accum; ++m) {
        micro.push_back(rank_batch(groups.world->rank() + 3 * step + static_cast<int>(m)));
      }
      forward_backward(model, objective, micro, torch::kCPU, false, {}, config.train.forward_ahead);
      dp.average_gradients();
      optimizer.step();
      objective.end_step();
    }
    const auto is_shard = expert_parameter_rule(*model);
    for (const auto& item : model->named_parameters()) {
      auto& comm = is_shard(item.key()) ? *groups.expert_data_parallel : *groups.data_parallel;
      EXPECT_TRUE(replicated(comm, item.value())) << item.key();
    }
    for (const auto& item : model->named_buffers()) {
      EXPECT_TRUE(replicated(*groups.data_parallel, item.value())) << item.key();
    }
    if (c.method == "loss_free" || c.method == "quantile") {
      EXPECT_GT(model->moe_layers()[0]->router->expert_bias.abs().max().item<double>(), 0.0);
    }
  }
};

TEST_F(ObjectiveMatrix, GradientsEqualOneProcessOnTheGlobalBatch) {
  for (const char* scope : {"micro", "sequence", "global", "group"}) {
    for (const char* method : {"aux_loss", "loss_free"}) {
      for (int64_t ep : {1, 2}) {
        for (bool checkpointing : {false, true}) {
          for (int64_t M : {1, 3}) run({scope, method, ep, M, checkpointing});
        }
      }
    }
  }
}

// Quantile balancing (its gradients are loss-free's; the point is a bias bit-equal on every
// rank, recomputed forwards not counted twice) and the Shuffle ablation (one micro-batch: with
// more, f runs over the subset's micro-batches so far, as the global scope's does).
TEST_F(ObjectiveMatrix, QuantileAndShuffleEqualOneProcessOnTheGlobalBatch) {
  for (const char* scope : {"micro", "sequence", "global", "group"}) {
    run({scope, "quantile", 1, 3, true});
  }
  run({"global", "quantile", 2, 1, false});
  for (int64_t ep : {1, 2}) {
    for (bool checkpointing : {false, true}) run({"shuffle", "aux_loss", ep, 1, checkpointing});
  }
}

// train.forward_ahead: micro-batch m + 1's forward before m's backward gives the gradients and
// values of forwards and backwards in turn, bit for bit. The micro-batches differ, so a
// micro-batch whose f counted a later micro-batch's selections would change the gradient. It runs
// ahead exactly where the backward waits for other ranks' counts: the running buffer, read after
// micro-batch 2's forward, is still empty only then.
TEST_F(ObjectiveMatrix, ForwardAheadTrainsBitForBitAsInTurn) {
  int R = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &R);
  for (const char* scope : {"global", "group", "micro"}) {
    for (int64_t ep : {1, 2}) {
      for (bool checkpointing : {false, true}) {
        if (R % ep != 0) continue;
        const Case c{scope, "aux_loss", ep, 3, checkpointing};
        SCOPED_TRACE(c.name());
        auto config = tiny_config(c);
        if (c.scope == "group") config.balance.group_size = R >= 4 ? 2 : R;
        auto groups = build_process_groups(
            ParallelSizes{R, ep, c.scope == "group" ? config.balance.group_size : 0});
        const int rank = groups.world->rank();
        std::vector<Batch> micro;
        for (int m = 0; m < 3; ++m) micro.push_back(rank_batch(rank + 5 * m));
        std::vector<torch::Tensor> grads[2];
        StepValues values[2];
        std::vector<double> running_after_forward[2];
        bool waits = false;
        for (int ahead = 0; ahead < 2; ++ahead) {
          auto model = make_model(config);
          if (ep > 1) apply_expert_parallel(*model, groups);
          const auto balance = balance_options_from_config(config);
          TrainingObjective objective(model->moe_layers(), balance,
                                      objective_reducers(balance, groups));
          waits = objective.waits_for_counts();
          MicroBatchHooks hooks;
          hooks.after_forward = [&](int64_t, const Batch&, const RoutingContext&) {
            running_after_forward[ahead].push_back(objective.running_tokens(0));
          };
          values[ahead] =
              forward_backward(model, objective, micro, torch::kCPU, false, hooks, ahead == 1)
                  .values;
          objective.end_step();
          for (const auto& p : model->parameters()) {
            grads[ahead].push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
          }
        }
        EXPECT_EQ(waits, c.scope != "micro" && R > 1);
        ASSERT_EQ(running_after_forward[1].size(), 3u);
        EXPECT_GT(running_after_forward[0][1], 0.0);
        EXPECT_EQ(running_after_forward[1][1] == 0.0, waits);
        EXPECT_EQ(values[1].task, values[0].task);
        EXPECT_EQ(values[1].balance, values[0].balance);
        EXPECT_EQ(values[1].z_loss, values[0].z_loss);
        ASSERT_EQ(grads[1].size(), grads[0].size());
        for (size_t i = 0; i < grads[0].size(); ++i) {
          ASSERT_EQ(grads[1][i].defined(), grads[0][i].defined()) << "gradient " << i;
          if (grads[0][i].defined()) {
            EXPECT_TRUE(torch::equal(grads[1][i], grads[0][i])) << "gradient " << i;
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace gbmoe
