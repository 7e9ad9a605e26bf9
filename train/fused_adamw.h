// AdamW whose step runs LibTorch's fused kernel: one pass over each parameter, its gradient and
// both moments, where torch::optim::AdamW's step takes about nine tensor ops (and as many passes
// over memory). Same options and state (AdamWParamState), so a checkpoint of either optimizer
// loads into the other; torch::optim::AdamW stays the reference (optim.fused=false) that
// tests/train/fused_adamw_test.cpp holds this one to.
#pragma once

#include <torch/torch.h>

namespace gbmoe {

/// Example:
///   FusedAdamW opt(model->parameters(), torch::optim::AdamWOptions(1e-3).weight_decay(0.1));
///   loss.backward(); opt.step(); opt.zero_grad();
class FusedAdamW : public torch::optim::AdamW {
 public:
  using torch::optim::AdamW::AdamW;
  /// As AdamW::step (decoupled decay p -= lr wd p, then the bias-corrected Adam update) for
  /// dense fp32/fp64/bf16/fp16 parameters on any device at::_fused_adamw_ supports.
  torch::Tensor step(LossClosure closure = nullptr) override;
};

}  // namespace gbmoe
