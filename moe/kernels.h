// The dispatch point for fused MoE kernels: a backend (gbmoe::cuda, csrc_cuda/) registers its
// kernels for a device type; the router and the local dispatcher call them for tensors on that
// device and otherwise run their plain LibTorch code, which stays the reference and fallback.
// Letters: T tokens, D dim, E experts, K top-k, N routed rows.
#pragma once

#include <torch/torch.h>

#include <string>

#include "moe/router.h"

namespace gbmoe {

/// Which implementation the MoE layer uses where a fused kernel is registered.
/// Fused: the registered kernels (and the grouped GEMM on CUDA, the fused fp32 SwiGLU passes of
/// moe/swiglu_cpu.h on the CPU); Reference: plain LibTorch.
/// The environment variable GBMOE_KERNELS=reference|fused sets the initial mode.
enum class KernelMode { Fused, Reference };

std::string to_string(KernelMode m);
KernelMode kernel_mode_from_string(const std::string& name);

/// The process-wide mode (initially from GBMOE_KERNELS, default fused).
KernelMode kernel_mode();
void set_kernel_mode(KernelMode mode);

/// Kernels a backend provides. Every entry computes exactly what the plain LibTorch code
/// beside its call site computes, with autograd support.
struct MoEKernels {
  /// Scores, top-k of scores + bias, (renormalized) weights and counts from logits (T, E) fp32,
  /// bias (E,) fp32, valid (T,) bool.
  /// Same contract as route_logits_reference (router.h).
  RoutedScores (*route)(const torch::Tensor& logits_TE, const torch::Tensor& bias_E,
                        const torch::Tensor& valid_T, int64_t top_k, ScoreFunction score_function,
                        bool renormalize) = nullptr;
  /// out[n] = x[token_index[n]]. rows_TK (T, K) int64 lists the rows of each token (-1 = none)
  /// so that the backward sums each token's rows without atomics.
  torch::Tensor (*permute)(const torch::Tensor& x_TD, const torch::Tensor& token_index_N,
                           const torch::Tensor& rows_TK) = nullptr;
  /// y[t] = sum over rows r of t of weights[r] * expert_out[r] (zero for tokens without rows).
  torch::Tensor (*unpermute)(const torch::Tensor& expert_out_ND, const torch::Tensor& weights_N,
                             const torch::Tensor& token_index_N,
                             const torch::Tensor& rows_TK) = nullptr;
};

/// Registers kernels for a device type, replacing any earlier registration; an empty
/// MoEKernels{} removes it.
///
/// Example:
///   gbmoe::cuda::register_kernels();           // csrc_cuda: fills in the CUDA entries
///   auto* k = gbmoe::fused_kernels(x_TD);      // non-null for CUDA tensors in Fused mode
void register_kernels(c10::DeviceType device_type, const MoEKernels& kernels);

/// The kernels for t's device when registered and the mode is Fused; nullptr otherwise.
const MoEKernels* fused_kernels(const torch::Tensor& t);

/// The dtype the experts compute in for activations x: the autocast dtype of x's device while
/// autocast is on there (bf16 training on CUDA), else x's own dtype.
torch::ScalarType compute_dtype(const torch::Tensor& x);

/// rows_TK for permute/unpermute: rows_TK[t, k] = n where assignment[n] = t * K + k, else -1.
torch::Tensor token_rows(const torch::Tensor& assignment_N, int64_t num_tokens, int64_t top_k);

}  // namespace gbmoe
