// Drops gbmoe::MoELayer into a small LibTorch model and trains it for a few steps.
#include <moe/moe_layer.h>
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
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = embed->forward(x);
    h = h + moe->forward(h);
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
  double first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    opt.zero_grad();
    auto task = torch::mse_loss(model->forward(x), y);
    auto loss = task + model->moe->stats().aux_loss();
    loss.backward();
    opt.step();
    (step == 0 ? first : last) = task.item<double>();
  }
  std::printf("consumer: task loss %.4f -> %.4f, MaxVio %.3f\n", first, last,
              model->moe->stats().max_violation);
  return last < first ? 0 : 1;
}
