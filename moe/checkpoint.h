// Activation checkpointing that keeps MoE balancing exact: a block's forward runs without
// keeping activations and is recomputed in the backward pass, and the differentiable statistics
// of the MoE layers inside it (P, the micro/sequence balancing loss, the z-loss) become outputs
// of the checkpoint, so model-level losses formed from stats() after the forward (the global
// balancing loss of gbmoe::Balancer) still backpropagate into the router.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <vector>

#include "moe/moe_layer.h"

namespace gbmoe {

/// Returns fn(x) without keeping fn's intermediate activations; the backward pass reruns fn on
/// the saved input (under a RecomputeGuard, so routing is reported to the balancer once, and
/// with the forward's autocast state) and backpropagates through the rerun. `layers` are the MoE
/// layers fn runs: after the call their stats() hold differentiable outputs of the checkpoint.
/// fn must be deterministic (same input, same output: no dropout). Gradients of parameters fn
/// uses accumulate into their .grad as usual; x must be a floating tensor. The graph keeps fn
/// until the backward: capture modules by raw pointer (they outlive it), other inputs by value.
///
/// Example (one transformer block; mask is captured by value for the recomputation):
///   auto* b = block.get();
///   x = checkpoint([b, mask](const torch::Tensor& in) { return b->forward(in, mask); }, x,
///                  {b->moe});
torch::Tensor checkpoint(std::function<torch::Tensor(const torch::Tensor&)> fn,
                         const torch::Tensor& x, const std::vector<MoELayer>& layers = {});

}  // namespace gbmoe
