// Router replay in a whole model, with and without activation checkpointing: replaying the
// recorded routing gives the recorded logits and router gradients bit for bit, and the
// recomputed forwards of the backward pass use the replayed ids without consuming more.
#include <gtest/gtest.h>

#include "train/model.h"

namespace gbmoe {
namespace {

struct Pass {
  torch::Tensor logits;
  std::vector<torch::Tensor> router_grads;
};

Pass forward_backward(LanguageModel& model, const torch::Tensor& tokens,
                      const torch::Tensor& targets, RoutingContext* routing = nullptr) {
  model->zero_grad();
  Pass p;
  p.logits = model->forward(tokens, {}, routing);
  torch::nn::functional::cross_entropy(p.logits.flatten(0, 1), targets.flatten()).backward();
  for (auto& layer : model->moe_layers()) p.router_grads.push_back(layer->router->weight.grad());
  p.logits = p.logits.detach();
  return p;
}

TEST(RouterReplayModel, ReplayEqualsRecordWithAndWithoutActivationCheckpointing) {
  for (bool checkpointing : {false, true}) {
    torch::manual_seed(21);
    LanguageModel model(LanguageModelOptions(40, 16, 2, 2)
                            .moe_layers({0, 1})
                            .moe(MoELayerOptions(16, 4, 16).router(RouterOptions().top_k(2)))
                            .activation_checkpointing(checkpointing));
    model->train();
    auto tokens = torch::randint(0, 40, {2, 6}, torch::kLong);
    auto targets = torch::randint(0, 40, {2, 6}, torch::kLong);
    auto layers = model->moe_layers();
    for (auto& l : layers) l->router->record_routing();
    const auto recorded = forward_backward(model, tokens, targets);
    std::vector<std::vector<torch::Tensor>> ids;
    for (auto& l : layers) {
      ASSERT_EQ(l->router->recorded_routing().size(), 1u) << "recomputation must not record";
      ids.push_back(l->router->recorded_routing());
    }
    for (size_t i = 0; i < layers.size(); ++i) layers[i]->router->replay_routing(ids[i]);
    const auto replayed = forward_backward(model, tokens, targets);
    EXPECT_TRUE(torch::equal(replayed.logits, recorded.logits))
        << "checkpointing " << checkpointing;
    for (size_t i = 0; i < layers.size(); ++i) {
      EXPECT_EQ(layers[i]->router->replayed_forwards(), 1u) << "recomputation must not advance";
      ASSERT_TRUE(recorded.router_grads[i].defined());
      EXPECT_TRUE(torch::equal(replayed.router_grads[i], recorded.router_grads[i]))
          << "layer " << i << ", checkpointing " << checkpointing;
      EXPECT_GT(recorded.router_grads[i].abs().sum().item<double>(), 0.0);
    }

    // With the routers changed, the replay still routes as recorded, in the forward and in the
    // backward's recomputation alike (the recomputation would otherwise exhaust the one-forward
    // replay list and throw).
    {
      torch::NoGradGuard no_grad;
      for (auto& l : layers) l->router->weight.mul_(-3.0);
    }
    for (size_t i = 0; i < layers.size(); ++i) layers[i]->router->replay_routing(ids[i]);
    RoutingContext routing;
    forward_backward(model, tokens, targets, &routing);
    for (size_t i = 0; i < layers.size(); ++i) {
      EXPECT_TRUE(torch::equal(routing.layers()[i].routing.expert_ids, ids[i][0]))
          << "layer " << i << ", checkpointing " << checkpointing;
      EXPECT_EQ(layers[i]->router->replayed_forwards(), 1u) << "layer " << i;
    }
  }
}

}  // namespace
}  // namespace gbmoe
