// Activation checkpointing (moe/checkpoint.h): through the training objective, the loss and every
// gradient equal those of the plain forward for each balance scope, with the objective's
// micro_batch_loss() and with micro_batch_backward() (whose global-batch LBL gradient is tied to
// each layer's output, in the recomputation too), each micro-batch is counted once (the
// recomputation leaves the running counts alone), and the forward keeps no graph of the block's
// inside.
#include "moe/checkpoint.h"

#include <gtest/gtest.h>

#include "moe/objective.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

// A block with parameters outside the MoE layer too: y = x + moe(tanh(lin(x)), mask).
struct TestBlock : torch::nn::Module {
  TestBlock() {
    lin = register_module("lin", torch::nn::Linear(8, 8));
    moe =
        register_module("moe", MoELayer(MoELayerOptions(8, 6, 5).router(RouterOptions().top_k(2))));
    to(torch::kDouble);
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask,
                        RoutingContext* routing) {
    return x + moe->forward(torch::tanh(lin->forward(x)), mask, routing);
  }
  torch::nn::Linear lin{nullptr};
  MoELayer moe{nullptr};
};

struct StepResult {
  std::vector<double> losses;         // micro_batch_loss() of each micro-batch
  double total = 0;                   // the step's objective (step_values)
  std::vector<torch::Tensor> grads;   // parameters, then the inputs
  std::vector<torch::Tensor> counts;  // running counts of each layer at the end of the step
  std::vector<LayerStepStats> stats;
};

// Two micro-batches of (B=3, S=4) with padding in the second, through two blocks and the
// objective; the task loss is the token-summed squared output. deferred: backpropagate with
// micro_batch_backward() instead of micro_batch_loss().backward().
StepResult run_step(BalanceOptions balance, bool recompute, bool deferred = false) {
  torch::manual_seed(7);
  auto b1 = std::make_shared<TestBlock>(), b2 = std::make_shared<TestBlock>();
  TrainingObjective objective({b1->moe, b2->moe}, balance);
  const int64_t M = 2;
  std::vector<torch::Tensor> inputs, masks;
  double tokens = 0;
  for (int64_t m = 0; m < M; ++m) {
    inputs.push_back(torch::randn({3, 4, 8}, torch::kDouble).requires_grad_());
    auto mask = torch::ones({3, 4}, torch::kBool);
    if (m == 1) mask[2].narrow(0, 1, 3).fill_(false);
    tokens += mask.sum().item<double>();
    masks.push_back(mask);
  }
  objective.begin_step(M, tokens);
  StepResult r;
  std::vector<torch::Tensor> recorded(2);  // each layer's counts summed over the micro-batches
  for (int64_t m = 0; m < M; ++m) {
    const auto mask = masks[m];
    auto routing = objective.context();
    torch::Tensor h = inputs[m];
    for (auto* b : {b1.get(), b2.get()}) {
      auto block = [b, mask](const torch::Tensor& in, RoutingContext* rc) {
        return b->forward(in, mask, rc);
      };
      h = recompute ? checkpoint(block, h, &routing) : block(h, &routing);
    }
    auto task = ((h * h).sum(-1) * mask).sum();
    for (int64_t l = 0; l < 2; ++l) {
      auto c = routing.layers()[l].routing.counts.to(torch::kDouble);
      recorded[l] = recorded[l].defined() ? recorded[l] + c : c;
    }
    if (deferred) {
      objective.micro_batch_backward(routing, task);
      continue;
    }
    auto loss = objective.micro_batch_loss(routing, task);
    r.losses.push_back(loss.item<double>());
    std::vector<torch::Tensor> before;
    for (int64_t l = 0; l < 2; ++l) before.push_back(objective.running_counts(l));
    loss.backward();
    for (int64_t l = 0; l < 2; ++l) {
      EXPECT_TRUE(torch::equal(objective.running_counts(l), before[l]))
          << "the backward changed layer " << l << "'s running counts, micro-batch " << m;
    }
  }
  const auto values = objective.step_values();
  r.total = values.task + values.balance + values.z_loss;
  for (int64_t l = 0; l < 2; ++l) {
    r.counts.push_back(objective.running_counts(l));
    EXPECT_TRUE(torch::equal(r.counts[l], recorded[l])) << "layer " << l << " counted twice";
    EXPECT_EQ(objective.running_tokens(l), tokens) << "layer " << l;
  }
  for (auto* b : {b1.get(), b2.get()}) {
    for (const auto& p : b->parameters()) r.grads.push_back(p.grad().clone());
  }
  for (const auto& x : inputs) r.grads.push_back(x.grad().clone());
  r.stats = objective.end_step();
  return r;
}

void expect_same_step(BalanceOptions balance, bool recompute, bool deferred) {
  const auto name = to_string(balance.scope()) + (recompute ? " checkpointed" : " plain") +
                    (deferred ? " micro_batch_backward" : " micro_batch_loss");
  auto plain = run_step(balance, false), ckpt = run_step(balance, recompute, deferred);
  EXPECT_NEAR(ckpt.total, plain.total, 1e-14) << name;
  if (!deferred) {
    ASSERT_EQ(plain.losses.size(), ckpt.losses.size());
    for (size_t i = 0; i < plain.losses.size(); ++i) {
      EXPECT_NEAR(ckpt.losses[i], plain.losses[i], 1e-14) << name << " micro-batch " << i;
    }
    EXPECT_NEAR(plain.losses[0] + plain.losses[1], plain.total, 1e-14) << name;
  }
  for (size_t l = 0; l < plain.counts.size(); ++l) {
    EXPECT_TRUE(torch::equal(ckpt.counts[l], plain.counts[l])) << name << " layer " << l;
    EXPECT_TRUE(torch::equal(ckpt.stats[l].counts, plain.stats[l].counts)) << name;
    EXPECT_EQ(ckpt.stats[l].tokens, plain.stats[l].tokens) << name;
    EXPECT_EQ(ckpt.stats[l].micro_max_violation, plain.stats[l].micro_max_violation) << name;
    EXPECT_NEAR(ckpt.stats[l].routing_entropy, plain.stats[l].routing_entropy, 1e-14) << name;
  }
  ASSERT_EQ(plain.grads.size(), ckpt.grads.size());
  for (size_t i = 0; i < plain.grads.size(); ++i) {
    EXPECT_GT(plain.grads[i].abs().max().item<double>(), 0.0) << name << " gradient " << i;
    EXPECT_LT(max_rel_diff(ckpt.grads[i], plain.grads[i]), 1e-12) << name << " gradient " << i;
  }
}

// Each variant against the plain forward with micro_batch_loss().backward().
void expect_same_steps(BalanceOptions balance) {
  expect_same_step(balance, true, false);
  expect_same_step(balance, false, true);
  expect_same_step(balance, true, true);
}

TEST(Checkpoint, GlobalScopeGradientsEqualThePlainForward) {
  expect_same_steps(
      BalanceOptions().scope(BalanceScope::Global).alpha(0.1).micro_alpha(0.01).z_loss(1e-2));
  expect_same_steps(BalanceOptions().scope(BalanceScope::Global).alpha(0.1).z_loss(0));
}

TEST(Checkpoint, MicroAndSequenceScopesGradientsEqualThePlainForward) {
  expect_same_steps(BalanceOptions().scope(BalanceScope::Micro).alpha(0.1).z_loss(1e-2));
  expect_same_steps(BalanceOptions().scope(BalanceScope::Sequence).alpha(0.1).z_loss(1e-2));
}

TEST(Checkpoint, RouterGradientComesOnlyFromTheBalancingTermsWhenTheOutputIsIgnored) {
  // With the output unused, the router's gradient is that of the balancing terms alone: it
  // reaches the router only through the checkpoint's routing outputs.
  torch::manual_seed(3);
  TestBlock block;
  TrainingObjective objective({block.moe},
                              BalanceOptions().scope(BalanceScope::Global).alpha(0.1).z_loss(0));
  objective.begin_step(1, 5);
  auto x = torch::randn({5, 8}, torch::kDouble);
  auto mask = torch::ones({5}, torch::kBool);
  auto* b = &block;
  auto routing = objective.context();
  checkpoint(
      [b, mask](const torch::Tensor& in, RoutingContext* rc) { return b->forward(in, mask, rc); },
      x.requires_grad_(), &routing);
  objective.micro_batch_loss(routing, torch::zeros({}, torch::kDouble)).backward();
  objective.end_step();
  auto gate = block.moe->router->weight.grad();
  ASSERT_TRUE(gate.defined());
  EXPECT_GT(gate.abs().max().item<double>(), 0.0);
}

TEST(Checkpoint, ForwardKeepsOnlyTheInput) {
  torch::manual_seed(4);
  TestBlock block;
  auto x = torch::randn({4, 8}, torch::dtype(torch::kDouble).requires_grad(true));
  auto mask = torch::ones({4}, torch::kBool);
  auto* b = &block;
  auto fn = [b, mask](const torch::Tensor& in, RoutingContext* rc) {
    return b->forward(in, mask, rc);
  };
  RoutingContext routing;
  auto y = checkpoint(fn, x, &routing);
  ASSERT_EQ(routing.size(), 1);
  // One node between y and x: the checkpoint itself, whose only next edge is x.
  ASSERT_NE(y.grad_fn(), nullptr);
  ASSERT_EQ(y.grad_fn()->num_inputs(), 1 + 2u);     // y and the layer's scores and logits
  EXPECT_EQ(y.grad_fn()->next_edges().size(), 1u);  // x: the state argument is no tensor
  EXPECT_EQ(y.grad_fn()->next_edges()[0].function.get(),
            torch::autograd::impl::gradient_edge(x).function.get());
  const auto& r = routing.layers()[0].routing;
  EXPECT_EQ(r.scores.grad_fn().get(), y.grad_fn().get());
  EXPECT_EQ(r.logits.grad_fn().get(), y.grad_fn().get());
  // Without a context the checkpoint has y alone as output.
  auto y_plain = checkpoint(fn, x);
  EXPECT_EQ(y_plain.grad_fn()->num_inputs(), 1u);
  EXPECT_TRUE(torch::equal(y_plain, y));
  expect_throw_with(
      [&] {
        checkpoint([](const torch::Tensor& in, RoutingContext*) { return in; },
                   torch::ones({2}, torch::kLong));
      },
      "floating");
}

}  // namespace
}  // namespace gbmoe
