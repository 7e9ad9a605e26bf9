// The router's work after the gate matmul, for fp32 logits on the CPU, in one pass over each
// token's row each way: scores, top-k of scores + bias, (renormalized) weights and counts; the
// backward from the scores' and weights' gradients to the logits'. LibTorch's ops take about a
// dozen small ops each way (softmax over a row of E = 8 is slow there). route_logits_reference
// (router.h) stays the reference these are tested against (tests/moe/router_cpu_test.cpp); the
// CUDA kernels (csrc_cuda/router_kernel.cu) compute the same, in the same order.
// Letters: T tokens, E experts, K top-k.
#pragma once

#include <torch/torch.h>

#include "moe/router.h"

namespace gbmoe {

/// True when route_logits_cpu takes these logits: fp32 CPU (T, E), and the kernel mode
/// (moe/kernels.h) is Fused.
bool route_logits_cpu_applies(const torch::Tensor& logits_TE);

/// Same contract as route_logits_reference: scores (T, E) and weights (T, K) differentiable in
/// the logits (once), expert ids (T, K) in order of decreasing gate + bias (ties to the lower id),
/// counts (E,) of the valid tokens' selections.
///
/// Example:
///   auto r = route_logits_cpu(logits_TE, bias_E, valid_T, 2, ScoreFunction::Softmax, true);
RoutedScores route_logits_cpu(const torch::Tensor& logits_TE, const torch::Tensor& bias_E,
                              const torch::Tensor& valid_T, int64_t top_k,
                              ScoreFunction score_function, bool renormalize);

}  // namespace gbmoe
