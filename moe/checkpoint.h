// Activation checkpointing that keeps MoE balancing exact: a block's forward runs without
// keeping activations and is recomputed in the backward pass. The routing the block's MoE layers
// record becomes outputs of the checkpoint (scores and logits with their gradient), so the
// objective formed after the forward still backpropagates into the routers, and the
// recomputation records into a context of its own: the step's counts see each micro-batch once.
#pragma once

#include <torch/torch.h>

#include <functional>

#include "moe/routing_context.h"

namespace gbmoe {

/// A block's forward: input and the context its MoE layers record into (may be null).
using CheckpointedFn = std::function<torch::Tensor(const torch::Tensor&, RoutingContext*)>;

/// Returns fn(x, routing) without keeping fn's intermediate activations; the backward pass reruns
/// fn on the saved input (with the forward's autocast state, recording into a scratch context)
/// and backpropagates through the rerun. The records fn makes are appended to `routing` with
/// scores and logits that are outputs of the checkpoint. fn must be deterministic (same input,
/// same output: no dropout). Gradients of parameters fn uses accumulate into their .grad as
/// usual; x must be a floating tensor. The graph keeps fn until the backward: capture modules by
/// raw pointer (they outlive it), other inputs by value.
///
/// Example (one transformer block; mask is captured by value for the recomputation):
///   auto* b = block.get();
///   x = checkpoint([b, mask](const torch::Tensor& in, RoutingContext* r) {
///         return b->forward(in, mask, r); }, x, routing);
torch::Tensor checkpoint(CheckpointedFn fn, const torch::Tensor& x,
                         RoutingContext* routing = nullptr);

}  // namespace gbmoe
