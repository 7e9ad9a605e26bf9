// TrainingObjective in one process: the running buffer, reset, eval forwards, the token-weighted
// objective of every scope against fp64 formulas from the spec, the sequence scope's input
// check, loss-free bias votes, and misuse. Other ranks are simulated by a reducer that adds
// their known counts.
#include "moe/objective.h"

#include <gtest/gtest.h>

#include "moe/checkpoint.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

constexpr int64_t kD = 8;

// Pretends to be a group of `ranks` ranks whose other members contribute `others` to count
// buffers (packed like the objective's: E counts then the token count, per layer) and
// `other_tokens` to the step's token count (the one-element buffer). Each wait is logged.
struct FakeReducer : CountReducer {
  FakeReducer(torch::Tensor others, int64_t ranks, double other_tokens = 0,
              std::vector<std::string>* log = nullptr)
      : others(std::move(others)), ranks(ranks), other_tokens(other_tokens), log(log) {}
  int64_t size() const override { return ranks; }
  int64_t rank() const override { return 0; }
  std::function<void()> sum_async(torch::Tensor& buffer) override {
    ++calls;
    return [&buffer, this] {
      const bool tokens = buffer.numel() == 1;
      if (log) log->push_back(tokens ? "wait for N" : "wait for counts");
      if (tokens) {
        buffer += other_tokens;
      } else {
        buffer.narrow(0, 0, others.numel()) += others;
      }
    };
  }
  torch::Tensor others;
  int64_t ranks;
  double other_tokens;
  std::vector<std::string>* log;
  int calls = 0;
};

MoELayer make_layer(int64_t E = 4, int64_t K = 2) {
  MoELayer layer(MoELayerOptions(kD, E, 6).router(RouterOptions().top_k(K)));
  layer->to(torch::kDouble);
  return layer;
}

BalanceOptions options(BalanceScope scope) {
  return BalanceOptions().scope(scope).alpha(0.1).z_loss(0);
}

// Runs one micro-batch through the objective and returns its loss.
torch::Tensor micro_batch(TrainingObjective& objective, MoELayer& layer, const torch::Tensor& x,
                          const torch::Tensor& mask = {}, double task = 0.0) {
  auto routing = objective.context();
  layer->forward(x, mask, &routing);
  return objective.micro_batch_loss(routing, torch::full({}, task, torch::kDouble));
}

TEST(TrainingObjective, RunningBufferFollowsTheCumulativeFormulaAndResets) {
  torch::manual_seed(0);
  auto layer = make_layer();
  // another rank: 4 tokens, K = 2, and 12 step tokens
  auto others = torch::tensor({3.0, 1.0, 0.0, 4.0, 4.0});
  auto reducer = std::make_shared<FakeReducer>(others, 2, 12.0);
  TrainingObjective objective({layer}, options(BalanceScope::Global), {reducer, reducer});
  const int64_t M = 3;
  objective.begin_step(M, 15);
  auto expected = torch::zeros({4}, torch::kDouble);
  double tokens = 0;
  for (int64_t m = 1; m <= M; ++m) {
    auto x = torch::randn({5, kD}, torch::kDouble);
    RoutingContext plain;
    layer->forward(x, {}, &plain);
    expected += plain.layers()[0].routing.counts.to(torch::kDouble) + others.narrow(0, 0, 4);
    tokens += 5 + 4;
    micro_batch(objective, layer, x);
    EXPECT_TRUE(torch::equal(objective.running_counts(0), expected)) << "micro-batch " << m;
    EXPECT_EQ(objective.running_tokens(0), tokens);
    // the step tokens are reduced once: 15 here + 12 from the other rank
    EXPECT_EQ(objective.step_tokens(), 27.0);
  }
  EXPECT_EQ(reducer->calls, M + 1);  // one collective per micro-batch for the whole model + N
  auto stats = objective.end_step();
  EXPECT_EQ(stats[0].micro_batches, M);
  EXPECT_TRUE(torch::equal(stats[0].counts, expected));
  EXPECT_EQ(objective.running_tokens(0), 0.0);
  EXPECT_EQ(objective.running_counts(0).abs().sum().item<double>(), 0.0);
}

TEST(TrainingObjective, ForwardsWithoutItsContextLeaveTheBufferAlone) {
  torch::manual_seed(1);
  auto layer = make_layer();
  TrainingObjective objective({layer}, options(BalanceScope::Global));
  objective.begin_step(2, 12);
  micro_batch(objective, layer, torch::randn({6, kD}, torch::kDouble));
  auto before = objective.running_counts(0);
  layer->forward(torch::randn({50, kD}, torch::kDouble));  // evaluation: no context
  RoutingContext analysis;                                 // analysis: a context of its own
  layer->forward(torch::randn({50, kD}, torch::kDouble), {}, &analysis);
  EXPECT_TRUE(torch::equal(objective.running_counts(0), before));
  EXPECT_EQ(objective.running_tokens(0), 6.0);
  micro_batch(objective, layer, torch::randn({6, kD}, torch::kDouble));
  EXPECT_EQ(objective.running_tokens(0), 12.0);
  objective.end_step();
}

// Every scope on one process: the loss is (task + sum_t z_t + sum_units n_u LBL_u) / N over the
// step's valid tokens N, computed here from the spec's formulas in fp64.
TEST(TrainingObjective, EveryScopeIsTheTokenWeightedSpecFormula) {
  const int64_t E = 4, K = 2, B = 3, S = 5;
  for (auto scope : {BalanceScope::Micro, BalanceScope::Sequence, BalanceScope::Global}) {
    torch::manual_seed(2);
    auto layer = make_layer(E, K);
    auto o = options(scope).z_loss(0.01).micro_alpha(scope == BalanceScope::Global ? 0.003 : 0);
    TrainingObjective objective({layer}, o);
    auto x = torch::randn({B, S, kD}, torch::kDouble);
    auto mask = torch::ones({B, S}, torch::kBool);
    mask[0].narrow(0, 2, 3).fill_(false);  // sequences of 2, 5, 5 valid tokens
    const double N = 12, task = 7.5;
    objective.begin_step(1, N);
    auto loss = micro_batch(objective, layer, x, mask, task);

    RoutingContext plain;
    layer->forward(x, mask, &plain);
    const auto& r = plain.layers()[0].routing;
    auto valid = r.valid.to(torch::kDouble);
    auto lbl = [&](const torch::Tensor& rows, double alpha) {  // rows: (T,) bool of one unit
      auto w = valid * rows.to(torch::kDouble);
      const double n = w.sum().item<double>();
      auto onehot =
          torch::zeros({r.scores.size(0), E}, torch::kDouble).scatter_(1, r.expert_ids, 1.0) *
          w.unsqueeze(1);
      auto f = onehot.sum(0) / (K * n);
      auto P = (r.scores * w.unsqueeze(1)).sum(0) / n;
      return alpha * E * (f * P).sum() * n;
    };
    auto all = torch::ones({B * S}, torch::kBool);
    auto expected = torch::full({}, task, torch::kDouble) +
                    0.01 * (torch::logsumexp(r.logits, -1).square() * valid).sum();
    if (scope == BalanceScope::Sequence) {
      for (int64_t b = 0; b < B; ++b) {
        auto rows = torch::zeros({B * S}, torch::kBool);
        rows.narrow(0, b * S, S).fill_(true);
        expected = expected + lbl(rows, 0.1);
      }
    } else {
      expected = expected + lbl(all, 0.1);
      if (scope == BalanceScope::Global) expected = expected + lbl(all, 0.003);
    }
    expected = expected / N;
    EXPECT_NEAR(loss.item<double>(), expected.item<double>(), 1e-14) << to_string(scope);
    auto grad = torch::autograd::grad({loss}, {layer->router->weight})[0];
    auto ref_grad = torch::autograd::grad({expected}, {layer->router->weight})[0];
    EXPECT_LT(max_rel_diff(grad, ref_grad), 1e-12) << to_string(scope);
    const auto v = objective.step_values();
    EXPECT_NEAR(v.task, task / N, 1e-15);
    EXPECT_NEAR(v.task + v.balance + v.z_loss, expected.item<double>(), 1e-14);
    objective.end_step();
  }
}

// A micro-batch that is mostly padding weighs by its tokens: two micro-batches of 2 and 10
// valid tokens with token-summed task losses 2 and 30 give the token mean 32 / 12.
TEST(TrainingObjective, TaskLossIsTheMeanOverTheStepsValidTokens) {
  torch::manual_seed(3);
  auto layer = make_layer();
  TrainingObjective objective({layer}, options(BalanceScope::Micro).alpha(0));
  objective.begin_step(2, 12);
  auto mask = torch::zeros({10}, torch::kBool);
  mask.narrow(0, 0, 2).fill_(true);
  auto first = micro_batch(objective, layer, torch::randn({10, kD}, torch::kDouble), mask, 2.0);
  auto second = micro_batch(objective, layer, torch::randn({10, kD}, torch::kDouble), {}, 30.0);
  EXPECT_NEAR(first.item<double>() + second.item<double>(), 32.0 / 12.0, 1e-15);
  EXPECT_NEAR(objective.step_values().task, 32.0 / 12.0, 1e-15);
  objective.end_step();
}

TEST(TrainingObjective, GloballyBalancedBatchGivesTheRouterNoGradient) {
  // This rank's tokens favour experts 0 and 1; the other rank's favour 2 and 3, so that the
  // global batch is balanced. The global loss then has zero gradient; the micro loss pushes
  // this rank's tokens away from its favourite experts.
  torch::manual_seed(6);
  const int64_t E = 4, T = 16;
  for (auto scope : {BalanceScope::Global, BalanceScope::Micro}) {
    auto layer = make_layer(E, 2);
    {
      torch::NoGradGuard g;
      layer->router->weight.zero_();
      layer->router->weight.select(1, 0).copy_(torch::tensor({2.0, 2.0, -2.0, -2.0}));
    }
    auto x = torch::zeros({T, kD}, torch::kDouble);
    x.select(1, 0).fill_(1.0);
    x.select(1, 1).copy_(torch::randn({T}, torch::kDouble));
    RoutingContext probe;
    layer->forward(x, {}, &probe);  // learn this rank's counts, then run the step for real
    auto local = probe.layers()[0].routing.counts.to(torch::kDouble);
    ASSERT_EQ(local[0].item<double>() + local[1].item<double>(), 2.0 * T);
    // the other rank mirrors this one onto experts 2, 3 and has T step tokens
    auto others = torch::cat({torch::stack({local[2], local[3], local[0], local[1]}),
                              torch::full({1}, double(T), torch::kDouble)});
    auto counts = std::make_shared<FakeReducer>(others, 2, double(T));
    // micro: only the step tokens are summed (the other rank's T)
    auto tokens = std::make_shared<FakeReducer>(torch::zeros({0}), 2, double(T));
    const bool global = scope == BalanceScope::Global;
    TrainingObjective objective({layer}, options(scope),
                                {global ? counts : tokens, global ? counts : nullptr});
    objective.begin_step(1, T);
    auto loss = micro_batch(objective, layer, x);
    auto grad = torch::autograd::grad({loss}, {layer->router->weight})[0];
    if (scope == BalanceScope::Global) {
      EXPECT_LT(grad.abs().max().item<double>(), 1e-12);
    } else {
      EXPECT_GT(grad.abs().max().item<double>(), 1e-4);
      // gradient descent lowers the logits of the over-used experts 0 and 1 for these tokens
      auto new_w = layer->router->weight.detach() - 10.0 * grad;
      auto before = torch::softmax(x.matmul(layer->router->weight.detach().t()), -1);
      auto after = torch::softmax(x.matmul(new_w.t()), -1);
      EXPECT_LT((after.select(1, 0) + after.select(1, 1)).mean().item<double>(),
                (before.select(1, 0) + before.select(1, 1)).mean().item<double>());
    }
    objective.end_step();
  }
}

TEST(TrainingObjective, SequenceScopeRefusesInputWithoutSequences) {
  auto layer = make_layer();
  TrainingObjective objective({layer}, options(BalanceScope::Sequence));
  objective.begin_step(1, 6);
  expect_throw_with(
      [&] {
        micro_batch(objective, layer, torch::randn({6, kD}, torch::kDouble));
      },
      "balance scope sequence needs the MoE input as (B, S, D); MoE layer 0 got "
      "(6, D): pass sequences, or use balance scope micro");
}

TEST(TrainingObjective, LossFreeMovesBiasAgainstTheGlobalLoad) {
  torch::manual_seed(7);
  auto layer = make_layer(4, 1);
  auto others = torch::tensor({0.0, 0.0, 0.0, 20.0, 20.0});  // the other rank: all to 3
  auto reducer = std::make_shared<FakeReducer>(others, 2, 20.0);
  TrainingObjective objective(
      {layer}, options(BalanceScope::Global).method(BalanceMethod::LossFree).bias_update_rate(0.01),
      {reducer, reducer});
  objective.begin_step(1, 8);
  auto loss = micro_batch(objective, layer, torch::randn({8, kD}, torch::kDouble));
  EXPECT_EQ(loss.item<double>(), 0.0);  // no balancing loss with loss-free balancing
  objective.end_step();
  auto bias = layer->router->expert_bias;
  EXPECT_DOUBLE_EQ(bias[3].item<double>(), -0.01);  // expert 3 is over the mean
  EXPECT_GE(bias.sum().item<double>(), -0.01);
}

// Micro scope: the bias moves by the mean over micro-batches of each one's vote.
TEST(TrainingObjective, LossFreeMicroScopeAveragesTheVotesOfItsUnits) {
  torch::manual_seed(8);
  auto layer = make_layer(4, 1);
  TrainingObjective objective(
      {layer}, options(BalanceScope::Micro).method(BalanceMethod::LossFree).bias_update_rate(0.5));
  objective.begin_step(2, 16);
  auto expected = torch::zeros({4}, torch::kDouble);
  for (int m = 0; m < 2; ++m) {
    auto x = torch::randn({8, kD}, torch::kDouble);
    RoutingContext probe;
    layer->forward(x, {}, &probe);
    auto c = probe.layers()[0].routing.counts.to(torch::kDouble);
    expected += torch::sign(c.mean() - c);
    micro_batch(objective, layer, x);
  }
  objective.end_step();
  EXPECT_TRUE(
      torch::allclose(layer->router->expert_bias.to(torch::kDouble), 0.5 * expected / 2, 0, 1e-7));
}

// micro_batch_backward() waits for no other rank in the forward: N is waited for when the
// backward starts, a micro-batch's counts when the backward reaches its MoE layer, after the
// output head's gradient.
TEST(TrainingObjective, BackwardWaitsForOtherRanksOnlyWhereItNeedsTheirCounts) {
  torch::manual_seed(8);
  auto layer = make_layer();
  auto head = torch::randn({kD, 3}, torch::kDouble).requires_grad_();
  std::vector<std::string> log;
  auto others = torch::tensor({2.0, 1.0, 3.0, 0.0, 3.0});
  auto reducer = std::make_shared<FakeReducer>(others, 2, 6.0, &log);
  TrainingObjective objective({layer}, options(BalanceScope::Global), {reducer, reducer});
  layer->experts->gate_up.register_hook(
      [&log](const torch::Tensor&) { log.push_back("expert gradient"); });
  layer->router->weight.register_hook(
      [&log](const torch::Tensor&) { log.push_back("router gradient"); });
  objective.begin_step(2, 10);
  for (int m = 0; m < 2; ++m) {
    auto routing = objective.context();
    auto logits = layer->forward(torch::randn({5, kD}, torch::kDouble), {}, &routing).matmul(head);
    logits.register_hook([&log](const torch::Tensor&) { log.push_back("head gradient"); });
    log.push_back("forward " + std::to_string(m + 1) + " done");
    objective.micro_batch_backward(routing, logits.square().sum());
  }
  // The counts are awaited after the experts' backward, right before the router's.
  const std::vector<std::string> expected{"forward 1 done",  "wait for N",      "head gradient",
                                          "expert gradient", "wait for counts", "router gradient",
                                          "forward 2 done",  "head gradient",   "expert gradient",
                                          "wait for counts", "router gradient"};
  EXPECT_EQ(log, expected);
  EXPECT_EQ(objective.step_tokens(), 16.0);
  objective.end_step();
}

// Both ways of taking a micro-batch's term give the same values and gradients, over two
// micro-batches of the global and group scopes with padding, micro_alpha and the z-loss.
TEST(TrainingObjective, MicroBatchBackwardEqualsTheLossBackward) {
  const int64_t E = 4;
  for (auto scope : {BalanceScope::Global, BalanceScope::Group}) {
    std::vector<torch::Tensor> grads[2];
    StepValues values[2];
    for (int deferred = 0; deferred < 2; ++deferred) {
      torch::manual_seed(9);
      auto layer = make_layer(E, 2);
      auto head = torch::randn({kD, 3}, torch::kDouble).requires_grad_();
      auto others = torch::tensor({2.0, 5.0, 1.0, 0.0, 4.0});
      auto reducer = std::make_shared<FakeReducer>(others, 2, 8.0);
      TrainingObjective objective({layer}, options(scope).micro_alpha(0.02).z_loss(0.01),
                                  {reducer, reducer});
      objective.begin_step(2, 11);
      for (int m = 0; m < 2; ++m) {
        auto x = torch::randn({2, 3, kD}, torch::kDouble);
        auto mask = torch::ones({2, 3}, torch::kBool);
        if (m == 1) mask[1][2] = false;
        auto routing = objective.context();
        auto task = layer->forward(x, mask, &routing).matmul(head).square().sum();
        if (deferred) {
          objective.micro_batch_backward(routing, task);
        } else {
          objective.micro_batch_loss(routing, task).backward();
        }
      }
      values[deferred] = objective.step_values();
      objective.end_step();
      for (const auto& p : layer->parameters()) grads[deferred].push_back(p.grad().clone());
      grads[deferred].push_back(head.grad().clone());
    }
    const auto name = to_string(scope);
    EXPECT_DOUBLE_EQ(values[1].task, values[0].task) << name;
    EXPECT_DOUBLE_EQ(values[1].balance, values[0].balance) << name;
    EXPECT_DOUBLE_EQ(values[1].z_loss, values[0].z_loss) << name;
    ASSERT_EQ(grads[0].size(), grads[1].size());
    for (size_t i = 0; i < grads[0].size(); ++i) {
      EXPECT_GT(grads[0][i].abs().max().item<double>(), 0.0) << name << " gradient " << i;
      EXPECT_LT(max_rel_diff(grads[1][i], grads[0][i]), 1e-13) << name << " gradient " << i;
    }
  }
}

// The forwards of later micro-batches may run first (the trainer's train.forward_ahead): each
// backward waits for its own micro-batch's counts only, the reductions of the later forwards
// stay in flight, and the gradients and values are those of forwards and backwards in turn, bit
// for bit. Terms taken out of the forwards' order are refused.
TEST(TrainingObjective, LaterForwardsBeforeABackwardGiveTheSameStep) {
  const int64_t E = 4, M = 3;
  std::vector<torch::Tensor> grads[2];
  StepValues values[2];
  std::vector<std::string> log;
  for (int ahead = 0; ahead < 2; ++ahead) {
    torch::manual_seed(10);
    auto layer = make_layer(E, 2);
    auto head = torch::randn({kD, 3}, torch::kDouble).requires_grad_();
    auto reducer = std::make_shared<FakeReducer>(torch::tensor({3.0, 1.0, 2.0, 4.0, 5.0}), 2, 5.0,
                                                 ahead ? &log : nullptr);
    TrainingObjective objective({layer}, options(BalanceScope::Global).micro_alpha(0.02),
                                {reducer, reducer});
    objective.begin_step(M, 12);
    std::vector<RoutingContext> routing(M);
    std::vector<torch::Tensor> task(M);
    auto forward = [&](int64_t m) {
      routing[m] = objective.context();
      auto x = torch::randn({4, kD}, torch::kDouble) * (1.0 + static_cast<double>(m));
      task[m] = layer->forward(x, {}, &routing[m]).matmul(head).square().sum();
      if (ahead) log.push_back("forward " + std::to_string(m + 1));
    };
    auto backward = [&](int64_t m) {
      if (ahead) log.push_back("backward " + std::to_string(m + 1));
      objective.micro_batch_backward(routing[m], task[m]);
    };
    if (ahead) {
      forward(0);
      for (int64_t m = 0; m < M; ++m) {
        if (m + 1 < M) forward(m + 1);
        backward(m);
      }
    } else {
      for (int64_t m = 0; m < M; ++m) forward(m), backward(m);
    }
    values[ahead] = objective.step_values();
    EXPECT_EQ(reducer->calls, 1 + M);
    objective.end_step();
    for (const auto& p : layer->parameters()) grads[ahead].push_back(p.grad().clone());
    grads[ahead].push_back(head.grad().clone());
  }
  const std::vector<std::string> expected{
      "forward 1", "forward 2",  "backward 1",      "wait for N", "wait for counts",
      "forward 3", "backward 2", "wait for counts", "backward 3", "wait for counts"};
  EXPECT_EQ(log, expected);
  EXPECT_EQ(values[1].task, values[0].task);
  EXPECT_EQ(values[1].balance, values[0].balance);
  for (size_t i = 0; i < grads[0].size(); ++i) {
    EXPECT_TRUE(torch::equal(grads[1][i], grads[0][i])) << "gradient " << i;
  }

  auto layer = make_layer(E, 2);
  auto reducer = std::make_shared<FakeReducer>(torch::tensor({3.0, 1.0, 2.0, 4.0, 5.0}), 2, 5.0);
  TrainingObjective objective({layer}, options(BalanceScope::Global), {reducer, reducer});
  objective.begin_step(2, 8);
  RoutingContext first = objective.context(), second = objective.context();
  auto y1 = layer->forward(torch::randn({4, kD}, torch::kDouble), {}, &first).sum();
  auto y2 = layer->forward(torch::randn({4, kD}, torch::kDouble), {}, &second).sum();
  expect_throw_with([&] { objective.micro_batch_backward(second, y2); },
                    "micro-batch 2's term was taken before micro-batch 1's");
  objective.micro_batch_backward(first, y1);
  objective.micro_batch_backward(second, y2);
  expect_throw_with([&] { objective.micro_batch_backward(second, y2); },
                    "the context's routing was not staged");
  objective.end_step();
}

// A step's micro-batches are freed with it, under activation checkpointing too (whose saved
// state holds the objective's tie, and so the micro-batch): the counts tensor of the context's
// record, which the micro-batch keeps, has no other owner once the step and the context are gone.
TEST(TrainingObjective, AStepsMicroBatchesAreFreedWithIt) {
  auto layer = make_layer();
  auto reducer = std::make_shared<FakeReducer>(torch::tensor({1.0, 2.0, 0.0, 1.0, 4.0}), 2, 4.0);
  for (bool direct : {false, true}) {
    TrainingObjective objective({layer}, options(BalanceScope::Global).micro_alpha(0.02),
                                {reducer, reducer});
    objective.begin_step(1, 4);
    torch::Tensor counts;
    {
      auto routing = objective.context();
      auto x = torch::randn({4, kD}, torch::kDouble).requires_grad_();
      auto y = checkpoint(
          [&](const torch::Tensor& in, RoutingContext* r) { return layer->forward(in, {}, r); }, x,
          &routing);
      counts = routing.layers()[0].routing.counts;
      auto task = y.square().sum();
      if (direct) {
        objective.micro_batch_loss(routing, task).backward();
      } else {
        objective.micro_batch_backward(routing, task);
      }
    }
    objective.end_step();
    EXPECT_EQ(counts.use_count(), 1) << (direct ? "micro_batch_loss" : "micro_batch_backward");
  }
}

TEST(TrainingObjective, MisuseIsReportedClearly) {
  auto layer = make_layer();
  TrainingObjective objective({layer}, options(BalanceScope::Global));
  RoutingContext plain;
  layer->forward(torch::randn({4, kD}, torch::kDouble), {}, &plain);
  expect_throw_with([&] { objective.micro_batch_loss(plain, torch::zeros({})); },
                    "use a context from this objective's context()");
  RoutingContext empty;
  expect_throw_with([&] { objective.micro_batch_loss(empty, torch::zeros({})); },
                    "the context holds 0 records");
  expect_throw_with(
      [&] {
        micro_batch(objective, layer, torch::randn({4, kD}, torch::kDouble));
      },
      "call begin_step() before the micro-batches");
  objective.begin_step(1, 4);
  micro_batch(objective, layer, torch::randn({4, kD}, torch::kDouble));
  expect_throw_with(
      [&] {
        micro_batch(objective, layer, torch::randn({4, kD}, torch::kDouble));
      },
      "micro-batch 2 in a step opened for 1");
  expect_throw_with([&] { objective.begin_step(1, 4); }, "begin_step() inside a step");
  objective.end_step();
  // The balance gradient is tied to the layer's combine weights: a term without them is refused.
  TrainingObjective with_z({layer}, options(BalanceScope::Global).z_loss(0.01));
  with_z.begin_step(1, 4);
  auto routing = with_z.context();
  layer->forward(torch::randn({4, kD}, torch::kDouble), {}, &routing);
  expect_throw_with([&] { with_z.micro_batch_backward(routing, torch::zeros({})); },
                    "must be part of task_loss_sum's graph");
  expect_throw_with([&] { objective.begin_step(0, 4); }, "num_micro_batches (0)");
  expect_throw_with([] { TrainingObjective({}, BalanceOptions()); }, "at least one MoE layer");
}

}  // namespace
}  // namespace gbmoe
