// Causal self-attention for fp32 on the CPU at the short sequences and small heads of the models
// trained here (S up to a few hundred, Dh 32-128): the scores of each head as one S x S block,
// computed tile by tile below the diagonal with the BLAS, the softmax in place, and the
// probabilities kept for the backward, which then needs four BLAS products and no recomputation.
// LibTorch's flash kernel recomputes the probabilities in the backward and runs at about 25
// GFLOP/s at S 128, Dh 32 on one core here. at::scaled_dot_product_attention stays the reference
// this is tested against (tests/train/model_kernels_test.cpp); GBMOE_KERNELS=reference runs it.
// Letters: B batch, H heads, S positions, Dh head size.
#pragma once

#include <torch/torch.h>

namespace gbmoe {

/// The longest sequence the fused attention takes (its per-head blocks are S x S); longer ones go
/// to LibTorch's flash kernel.
constexpr int64_t kCausalAttentionCpuMaxPositions = 512;

/// The most a call keeps for its backward (B H S S fp32 probabilities); calls that would keep
/// more go to LibTorch's attention. A call without a backward (no grad mode, or no input that
/// requires grad) keeps nothing: it works in one S x S block per thread.
constexpr int64_t kCausalAttentionCpuMaxKeptBytes = int64_t{256} << 20;

/// Whether the BLAS product the kernel calls was found (libtorch_cpu's MKL exports it on x86-64
/// Linux wheels); false elsewhere, and then causal_attention_cpu_applies is always false.
bool causal_attention_cpu_available();

/// True when causal_attention_cpu takes (q, k, v): fp32 CPU tensors, each (B, H, S, Dh)
/// contiguous with the same sizes, 1 <= S <= kCausalAttentionCpuMaxPositions, what a backward
/// would keep within kCausalAttentionCpuMaxKeptBytes, the BLAS product available, and the kernel
/// mode (moe/kernels.h) is Fused.
bool causal_attention_cpu_applies(const torch::Tensor& q_BHSD, const torch::Tensor& k_BHSD,
                                  const torch::Tensor& v_BHSD);

/// softmax(q k^T / sqrt(Dh), causal) v, what at::scaled_dot_product_attention(q, k, v, {}, 0,
/// true) computes, returned as (B, S, H, Dh) contiguous: the layout the output projection reads,
/// so that no transpose copy follows. Differentiable in q, k and v (once).
///
/// Example:
///   auto y_BSHD = causal_attention_cpu(q, k, v);     // q, k, v (B, H, S, Dh)
///   auto out = proj(y_BSHD.view({B, S, H * Dh}));
torch::Tensor causal_attention_cpu(const torch::Tensor& q_BHSD, const torch::Tensor& k_BHSD,
                                   const torch::Tensor& v_BHSD);

}  // namespace gbmoe
