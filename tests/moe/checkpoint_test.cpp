// Activation checkpointing (moe/checkpoint.h): the loss and every gradient equal those of the
// plain forward for each balance scope, the balancer counts each micro-batch once, and the
// forward keeps no graph of the block's inside.
#include "moe/checkpoint.h"

#include <gtest/gtest.h>

#include "moe/balancer.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

// A block with parameters outside the MoE layer too: y = x + moe(tanh(lin(x)), mask).
struct TestBlock : torch::nn::Module {
  TestBlock(BalanceOptions balance) {
    lin = register_module("lin", torch::nn::Linear(8, 8));
    moe = register_module("moe", MoELayer(MoELayerOptions(8, 6, 5)
                                              .router(RouterOptions().top_k(2).z_loss_coef(1e-2))
                                              .balance(balance)));
    to(torch::kDouble);
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask) {
    return x + moe->forward(torch::tanh(lin->forward(x)), mask);
  }
  torch::nn::Linear lin{nullptr};
  MoELayer moe{nullptr};
};

struct StepResult {
  std::vector<double> losses;
  std::vector<torch::Tensor> grads;  // parameters, then the inputs
  torch::Tensor counts;
};

// Two micro-batches of (B=3, S=4) with padding in the second, through two blocks and a Balancer.
StepResult run_step(BalanceOptions balance, bool recompute) {
  torch::manual_seed(7);
  auto b1 = std::make_shared<TestBlock>(balance), b2 = std::make_shared<TestBlock>(balance);
  Balancer balancer({b1->moe, b2->moe}, nullptr);
  const int64_t M = 2;
  balancer.begin_step(M);
  StepResult r;
  std::vector<torch::Tensor> inputs;
  for (int64_t m = 0; m < M; ++m) {
    auto x = torch::randn({3, 4, 8}, torch::kDouble).requires_grad_();
    auto mask = torch::ones({3, 4}, torch::kBool);
    if (m == 1) mask[2].narrow(0, 1, 3).fill_(false);
    inputs.push_back(x);
    torch::Tensor h = x;
    for (auto* b : {b1.get(), b2.get()}) {
      h = recompute
              ? checkpoint([b, mask](const torch::Tensor& in) { return b->forward(in, mask); }, h,
                           {b->moe})
              : b->forward(h, mask);
    }
    auto loss = (h * h).mean() + balancer.micro_batch_loss();
    r.losses.push_back(loss.item<double>());
    (loss / M).backward();
  }
  r.counts = balancer.running_counts(0).clone();
  for (auto* b : {b1.get(), b2.get()}) {
    for (const auto& p : b->parameters()) r.grads.push_back(p.grad().clone());
  }
  for (const auto& x : inputs) r.grads.push_back(x.grad().clone());
  balancer.end_step();
  return r;
}

void expect_same_step(BalanceOptions balance) {
  auto plain = run_step(balance, false), ckpt = run_step(balance, true);
  ASSERT_EQ(plain.losses.size(), ckpt.losses.size());
  for (size_t i = 0; i < plain.losses.size(); ++i) {
    EXPECT_NEAR(ckpt.losses[i], plain.losses[i], 1e-14) << "micro-batch " << i;
  }
  EXPECT_TRUE(torch::equal(ckpt.counts, plain.counts));  // counted once, not twice
  ASSERT_EQ(plain.grads.size(), ckpt.grads.size());
  for (size_t i = 0; i < plain.grads.size(); ++i) {
    EXPECT_LT(max_rel_diff(ckpt.grads[i], plain.grads[i]), 1e-12) << "gradient " << i;
  }
}

TEST(Checkpoint, GlobalScopeGradientsEqualThePlainForward) {
  expect_same_step(BalanceOptions().scope(BalanceScope::Global).alpha(0.1).micro_alpha(0.01));
}

TEST(Checkpoint, MicroAndSequenceScopesGradientsEqualThePlainForward) {
  expect_same_step(BalanceOptions().scope(BalanceScope::Micro).alpha(0.1));
  expect_same_step(BalanceOptions().scope(BalanceScope::Sequence).alpha(0.1));
}

TEST(Checkpoint, RouterGradientComesOnlyFromTheBalancingTermsWhenTheOutputIsIgnored) {
  // With the output unused, the router's gradient is that of the balancer's loss alone: it
  // reaches the router only through the checkpoint's statistics outputs.
  torch::manual_seed(3);
  TestBlock block(BalanceOptions().scope(BalanceScope::Global).alpha(0.1));
  Balancer balancer({block.moe}, nullptr);
  balancer.begin_step(1);
  auto x = torch::randn({5, 8}, torch::kDouble);
  auto mask = torch::ones({5}, torch::kBool);
  auto* b = &block;
  checkpoint([b, mask](const torch::Tensor& in) { return b->forward(in, mask); },
             x.requires_grad_(), {block.moe});
  balancer.micro_batch_loss().backward();
  auto gate = block.moe->router->weight.grad();
  ASSERT_TRUE(gate.defined());
  EXPECT_GT(gate.abs().max().item<double>(), 0.0);
}

TEST(Checkpoint, ForwardKeepsOnlyTheInput) {
  torch::manual_seed(4);
  TestBlock block{BalanceOptions()};
  auto x = torch::randn({4, 8}, torch::dtype(torch::kDouble).requires_grad(true));
  auto mask = torch::ones({4}, torch::kBool);
  auto* b = &block;
  auto y = checkpoint([b, mask](const torch::Tensor& in) { return b->forward(in, mask); }, x,
                      {block.moe});
  // One node between y and x: the checkpoint itself, whose only next edge is x.
  ASSERT_NE(y.grad_fn(), nullptr);
  ASSERT_EQ(y.grad_fn()->num_inputs(), 1 + 3u);     // y and the layer's three statistics
  EXPECT_EQ(y.grad_fn()->next_edges().size(), 1u);  // x: the state argument is no tensor
  EXPECT_EQ(y.grad_fn()->next_edges()[0].function.get(),
            torch::autograd::impl::gradient_edge(x).function.get());
  expect_throw_with(
      [&] {
        checkpoint([](const torch::Tensor& in) { return in; }, torch::ones({2}, torch::kLong));
      },
      "floating");
}

}  // namespace
}  // namespace gbmoe
