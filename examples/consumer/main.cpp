// Drops gbmoe::MoELayer into a small LibTorch model and trains it for a few steps, with the
// balancing and z-loss terms formed by gbmoe::TrainingObjective (one process, no reducers).
#include <moe/moe_layer.h>
#include <moe/objective.h>
#include <torch/torch.h>
#ifdef GBMOE_WITH_CUDA_KERNELS  // defined by gbmoe::cuda
#include <csrc_cuda/moe_kernels.h>
#endif

#include <cstdio>

struct TinyModelImpl : torch::nn::Module {
  TinyModelImpl() {
    embed = register_module("embed", torch::nn::Linear(16, 32));
    moe = register_module("moe", gbmoe::MoELayer(gbmoe::MoELayerOptions(32, 4, 64)
                                                     .router(gbmoe::RouterOptions().top_k(2))
                                                     .shared_experts(1)));
    head = register_module("head", torch::nn::Linear(32, 1));
  }
  torch::Tensor forward(const torch::Tensor& x, gbmoe::RoutingContext* routing) {
    auto h = embed->forward(x);
    h = h + moe->forward(h, {}, routing);
    return head->forward(h);
  }
  torch::nn::Linear embed{nullptr}, head{nullptr};
  gbmoe::MoELayer moe{nullptr};
};
TORCH_MODULE(TinyModel);

int main() {
#ifdef GBMOE_WITH_CUDA_KERNELS
  gbmoe::cuda::register_kernels();  // CUDA tensors get the fused kernels; CPU ones are unchanged
#endif
  torch::manual_seed(0);
  TinyModel model;
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-2));
  auto x = torch::randn({64, 16});
  auto y = x.sum(1, true).sin();
  // One process, one micro-batch per step: scope global is the batch's own LBL.
  gbmoe::TrainingObjective objective({model->moe}, gbmoe::BalanceOptions());
  double first = 0, last = 0, max_violation = 0;
  for (int step = 0; step < 30; ++step) {
    opt.zero_grad();
    objective.begin_step(1, static_cast<double>(x.size(0)));
    auto routing = objective.context();
    auto task_sum = (model->forward(x, &routing) - y).square().sum();  // summed over tokens
    objective.micro_batch_backward(routing, task_sum);
    opt.step();
    max_violation = objective.end_step()[0].max_violation;
    (step == 0 ? first : last) = task_sum.item<double>() / x.size(0);
  }
  std::printf("consumer: task loss %.4f -> %.4f, MaxVio %.3f\n", first, last, max_violation);
  return last < first ? 0 : 1;
}
