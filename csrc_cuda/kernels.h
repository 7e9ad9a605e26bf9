// Host entry points of gbmoe's CUDA kernels (compiled by nvcc, no LibTorch inside): the fused
// router and the token permutation with its weighted inverse. Raw device pointers, row-major,
// contiguous; every launch runs on the given stream and returns cudaGetLastError().
// Letters: T tokens, D dim, E experts, K top-k, N routed rows.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace gbmoe::cuda::launch {

enum class DType { Float32, BFloat16 };

/// Largest E and K the router kernels handle (one warp per token keeps a row in shared memory).
constexpr int kRouterMaxExperts = 1024;
constexpr int kRouterMaxTopK = 16;

/// Per token: gates (softmax, or sigmoid with scores = gates / sum), top-k of gates + bias,
/// weights (renormalized when renormalize and K > 1) and, for valid tokens, counts += 1 per
/// selection. counts_E must be zeroed by the caller.
cudaError_t router_forward(const float* logits_TE, const float* bias_E, const bool* valid_T,
                           int64_t T, int E, int K, bool sigmoid, bool renormalize,
                           float* scores_TE, int64_t* ids_TK, float* weights_TK, int64_t* counts_E,
                           cudaStream_t stream);

/// Gradient of the logits from the gradients of scores and weights (either may be null = 0).
cudaError_t router_backward(const float* logits_TE, const float* scores_TE, const int64_t* ids_TK,
                            const float* weights_TK, const float* grad_scores_TE,
                            const float* grad_weights_TK, int64_t T, int E, int K, bool sigmoid,
                            bool renormalize, float* grad_logits_TE, cudaStream_t stream);

/// out[n] = x[token_index[n]] for n < N.
cudaError_t permute(const void* x_TD, const int64_t* token_index_N, int64_t N, int64_t D,
                    DType dtype, void* out_ND, cudaStream_t stream);

/// out[t] = sum over k with r = rows_TK[t, k] >= 0 of (weights_N ? weights_N[r] : 1) * src[r],
/// accumulated in fp32: the weighted combine (unpermute) and the permute backward.
cudaError_t combine_rows(const void* src_ND, const float* weights_N, const int64_t* rows_TK,
                         int64_t T, int K, int64_t D, DType dtype, void* out_TD,
                         cudaStream_t stream);

/// Backward of the weighted combine: grad_src[n] = weights[n] * grad_out[token_index[n]] and
/// grad_weights[n] = <src[n], grad_out[token_index[n]]>.
cudaError_t combine_rows_backward(const void* grad_out_TD, const void* src_ND,
                                  const float* weights_N, const int64_t* token_index_N, int64_t N,
                                  int64_t D, DType dtype, void* grad_src_ND, float* grad_weights_N,
                                  cudaStream_t stream);

}  // namespace gbmoe::cuda::launch
