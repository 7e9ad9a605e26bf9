// Fused fp32 CPU passes of the model's element-wise work outside the experts: RMSNorm, the
// rotary embedding and the cross-entropy, each direction one pass over its rows (LibTorch's ops
// take about six passes forward and ten backward for a norm, and a dozen for the rotary embedding
// of q and k). The plain LibTorch code in model.cpp stays the reference these are tested against
// (tests/train/model_kernels_cpu_test.cpp); GBMOE_KERNELS=reference (moe/kernels.h) runs it.
// Letters: T rows, D features, B batch, S positions, H heads, Dh head size, P = Dh / 2 pairs.
#pragma once

#include <torch/torch.h>

#include <vector>

namespace gbmoe {

/// True when the fused RMSNorm takes (x, weight): fp32 CPU tensors, weight (D,) contiguous,
/// x (..., D) with unit stride in D, and the kernel mode (moe/kernels.h) is Fused.
bool rms_norm_cpu_applies(const torch::Tensor& x, const torch::Tensor& weight);

/// x * rsqrt(mean(x^2 over D) + eps) * weight, differentiable in x and weight (once).
///
/// Example:
///   if (rms_norm_cpu_applies(x, w)) y = rms_norm_cpu(x, w, 1e-5);
torch::Tensor rms_norm_cpu(const torch::Tensor& x, const torch::Tensor& weight, double eps);

/// True when the fused head split takes qkv: fp32 CPU (B, S, 3, H, Dh) with unit stride in Dh,
/// and the kernel mode is Fused.
bool qkv_heads_cpu_applies(const torch::Tensor& qkv_BS3HD);

/// Splits a fused projection's output into q, k, v heads (B, H, S, Dh), contiguous (the layout
/// attention reads), with the rotary embedding on q and k: pairs (x[2i], x[2i+1]) of each head at
/// position s turn by the angle whose cosine and sine are cos_SP[s, i], sin_SP[s, i] (fp32 (S, P)
/// contiguous): (x0 c - x1 s, x0 s + x1 c). What model.cpp's reference computes with
/// select/transpose and apply_rope. Differentiable in qkv (once); the backward writes the
/// gradient of qkv in one pass.
///
/// Example:
///   auto qkv = qkv_heads_rope_cpu(proj(x).view({B, S, 3, H, Dh}), cos_SP, sin_SP);  // q, k, v
std::vector<torch::Tensor> qkv_heads_rope_cpu(const torch::Tensor& qkv_BS3HD,
                                              const torch::Tensor& cos_SP,
                                              const torch::Tensor& sin_SP);

/// True when the fused cross-entropy takes (logits, targets): logits fp32 CPU (N, V) contiguous,
/// targets int64 CPU (N,), and the kernel mode is Fused.
bool cross_entropy_sum_cpu_applies(const torch::Tensor& logits_NV, const torch::Tensor& targets_N);

/// sum over the rows with targets[n] != -100 of logsumexp(logits[n]) - logits[n, targets[n]]:
/// torch::nn::functional::cross_entropy with reduction sum and the default ignore_index -100, as
/// an fp32 0-dim tensor (summed in fp64). The forward keeps exp(logits - max) per row, which the
/// backward turns in place into the gradient (softmax - one-hot, times the incoming gradient);
/// so it may be backpropagated once. A target outside [0, V) other than -100 is an error.
///
/// Example:
///   auto task = cross_entropy_sum_cpu(logits.flatten(0, 1), targets.flatten());
torch::Tensor cross_entropy_sum_cpu(const torch::Tensor& logits_NV, const torch::Tensor& targets_N);

}  // namespace gbmoe
