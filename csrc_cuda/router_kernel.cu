// Fused router: one warp per token computes the scores, the top-k selection, the combine
// weights and the per-expert counts in one pass over the logits row held in shared memory;
// the backward recomputes the gates from the saved row. Letters: T, E, K as in kernels.h.
#include <cfloat>
#include <climits>

#include "csrc_cuda/kernels.h"

namespace gbmoe::cuda::launch {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Arg-max over the warp; ties go to the lower expert id; index INT_MAX = no candidate.
__device__ __forceinline__ void warp_argmax(float& best, int& index) {
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const float other = __shfl_xor_sync(0xffffffffu, best, o);
    const int other_index = __shfl_xor_sync(0xffffffffu, index, o);
    const bool better = other > best || (other == best && other_index < index);
    if (other_index != INT_MAX && (index == INT_MAX || better)) {
      best = other;
      index = other_index;
    }
  }
}

// Writes the gates of one token's logits row into g (E, shared) and returns their sum
// (1 for softmax).
__device__ float row_gates(const float* z, int E, bool sigmoid, float* g, int lane) {
  if (sigmoid) {
    float sum = 0.f;
    for (int e = lane; e < E; e += kWarp) {
      g[e] = 1.f / (1.f + expf(-z[e]));
      sum += g[e];
    }
    return warp_sum(sum);
  }
  float m = -FLT_MAX;
  for (int e = lane; e < E; e += kWarp) m = fmaxf(m, z[e]);
  m = warp_max(m);
  float sum = 0.f;
  for (int e = lane; e < E; e += kWarp) {
    g[e] = expf(z[e] - m);
    sum += g[e];
  }
  const float inv = 1.f / warp_sum(sum);
  for (int e = lane; e < E; e += kWarp) g[e] *= inv;
  return 1.f;
}

__global__ void router_forward_kernel(const float* __restrict__ logits,
                                      const float* __restrict__ bias,
                                      const bool* __restrict__ valid, int64_t T, int E, int K,
                                      bool sigmoid, bool renormalize, float* __restrict__ scores,
                                      int64_t* __restrict__ ids, float* __restrict__ weights,
                                      int64_t* __restrict__ counts) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= T) return;
  float* g = smem + warp * E;
  const float sum = row_gates(logits + t * E, E, sigmoid, g, lane);
  const float inv_sum = 1.f / sum;
  for (int e = lane; e < E; e += kWarp) scores[t * E + e] = g[e] * inv_sum;
  __syncwarp();

  int chosen[kRouterMaxTopK];
  float chosen_gate[kRouterMaxTopK];
  float selected_sum = 0.f;
  for (int k = 0; k < K; ++k) {
    float best = -FLT_MAX;
    int index = INT_MAX;
    for (int e = lane; e < E; e += kWarp) {
      bool taken = false;
      for (int j = 0; j < k; ++j) taken |= chosen[j] == e;
      const float v = g[e] + bias[e];
      if (!taken && (index == INT_MAX || v > best)) {
        best = v;
        index = e;
      }
    }
    warp_argmax(best, index);
    chosen[k] = index;
    chosen_gate[k] = g[index];
    selected_sum += chosen_gate[k];
  }
  const float scale = renormalize && K > 1 ? 1.f / selected_sum : 1.f;
  const bool counted = valid[t];
  for (int k = lane; k < K; k += kWarp) {
    // chosen[] is identical in every lane; indexing it by lane keeps the writes parallel.
    int id = 0;
    float gate = 0.f;
    for (int j = 0; j < K; ++j) {
      if (j == k) {
        id = chosen[j];
        gate = chosen_gate[j];
      }
    }
    ids[t * K + k] = id;
    weights[t * K + k] = gate * scale;
    if (counted) atomicAdd(reinterpret_cast<unsigned long long*>(counts + id), 1ull);
  }
}

__global__ void router_backward_kernel(
    const float* __restrict__ logits, const float* __restrict__ scores,
    const int64_t* __restrict__ ids, const float* __restrict__ weights,
    const float* __restrict__ grad_scores, const float* __restrict__ grad_weights, int64_t T, int E,
    int K, bool sigmoid, bool renormalize, float* __restrict__ grad_logits) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= T) return;
  float* g = smem + 2 * warp * E;  // gates
  float* dg = g + E;               // gradient of the loss with respect to the gates
  const float* s = scores + t * E;
  float gate_sum = 1.f;
  if (sigmoid) {
    gate_sum = row_gates(logits + t * E, E, true, g, lane);
  } else {
    for (int e = lane; e < E; e += kWarp) g[e] = s[e];
  }
  // Scores part: softmax scores are the gates; sigmoid scores are gates / gate_sum.
  float score_dot = 0.f;
  if (grad_scores && sigmoid) {
    for (int e = lane; e < E; e += kWarp) score_dot += grad_scores[t * E + e] * s[e];
    score_dot = warp_sum(score_dot);
  }
  for (int e = lane; e < E; e += kWarp) {
    const float gs = grad_scores ? grad_scores[t * E + e] : 0.f;
    dg[e] = sigmoid ? (gs - score_dot) / gate_sum : gs;
  }
  __syncwarp();
  // Weights part: w_k = g[i_k] / S with S = sum_j g[i_j] (or w_k = g[i_k]).
  if (grad_weights && lane == 0) {
    const bool renorm = renormalize && K > 1;
    float selected_sum = 0.f, weight_dot = 0.f;
    for (int k = 0; k < K; ++k) {
      selected_sum += g[ids[t * K + k]];
      weight_dot += grad_weights[t * K + k] * weights[t * K + k];
    }
    for (int k = 0; k < K; ++k) {
      const float gw = grad_weights[t * K + k];
      dg[ids[t * K + k]] += renorm ? (gw - weight_dot) / selected_sum : gw;
    }
  }
  __syncwarp();
  if (sigmoid) {
    for (int e = lane; e < E; e += kWarp) grad_logits[t * E + e] = dg[e] * g[e] * (1.f - g[e]);
    return;
  }
  float dot = 0.f;
  for (int e = lane; e < E; e += kWarp) dot += g[e] * dg[e];
  dot = warp_sum(dot);
  for (int e = lane; e < E; e += kWarp) grad_logits[t * E + e] = g[e] * (dg[e] - dot);
}

unsigned int blocks_for(int64_t T) {
  return static_cast<unsigned int>((T + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

}  // namespace

cudaError_t router_forward(const float* logits_TE, const float* bias_E, const bool* valid_T,
                           int64_t T, int E, int K, bool sigmoid, bool renormalize,
                           float* scores_TE, int64_t* ids_TK, float* weights_TK, int64_t* counts_E,
                           cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  const size_t smem = sizeof(float) * kWarpsPerBlock * E;
  router_forward_kernel<<<blocks_for(T), kWarp * kWarpsPerBlock, smem, stream>>>(
      logits_TE, bias_E, valid_T, T, E, K, sigmoid, renormalize, scores_TE, ids_TK, weights_TK,
      counts_E);
  return cudaGetLastError();
}

cudaError_t router_backward(const float* logits_TE, const float* scores_TE, const int64_t* ids_TK,
                            const float* weights_TK, const float* grad_scores_TE,
                            const float* grad_weights_TK, int64_t T, int E, int K, bool sigmoid,
                            bool renormalize, float* grad_logits_TE, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  const size_t smem = sizeof(float) * kWarpsPerBlock * 2 * E;
  router_backward_kernel<<<blocks_for(T), kWarp * kWarpsPerBlock, smem, stream>>>(
      logits_TE, scores_TE, ids_TK, weights_TK, grad_scores_TE, grad_weights_TK, T, E, K, sigmoid,
      renormalize, grad_logits_TE);
  return cudaGetLastError();
}

}  // namespace gbmoe::cuda::launch
