// Token permutation (rows grouped by expert) and its weighted inverse. The inverse gathers each
// token's rows through rows_TK, so neither direction needs atomics and sums are deterministic.
// Rows move in 16-byte packs when D allows it. Letters: T, D, K, N as in kernels.h.
#include <cuda_bf16.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "csrc_cuda/kernels.h"

namespace gbmoe::cuda::launch {
namespace {

constexpr int kThreads = 128;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

template <typename T, int V>
__global__ void permute_kernel(const T* __restrict__ x, const int64_t* __restrict__ token_index,
                               int64_t D, T* __restrict__ out) {
  const int64_t n = blockIdx.x;
  const auto* src = reinterpret_cast<const Pack<T, V>*>(x + token_index[n] * D);
  auto* dst = reinterpret_cast<Pack<T, V>*>(out + n * D);
  for (int64_t c = threadIdx.x; c < D / V; c += blockDim.x) dst[c] = src[c];
}

template <typename T, int V>
__global__ void combine_rows_kernel(const T* __restrict__ src, const float* __restrict__ weights,
                                    const int64_t* __restrict__ rows, int K, int64_t D,
                                    T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  auto* dst = reinterpret_cast<Pack<T, V>*>(out + t * D);
  for (int64_t c = threadIdx.x; c < D / V; c += blockDim.x) {
    float acc[V] = {};
    for (int k = 0; k < K; ++k) {
      const int64_t r = rows[t * K + k];
      if (r < 0) continue;
      const float w = weights ? weights[r] : 1.f;
      const auto p = reinterpret_cast<const Pack<T, V>*>(src + r * D)[c];
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += w * to_float(p.v[i]);
    }
    Pack<T, V> o;
#pragma unroll
    for (int i = 0; i < V; ++i) o.v[i] = from_float<T>(acc[i]);
    dst[c] = o;
  }
}

template <typename T, int V>
__global__ void combine_rows_backward_kernel(const T* __restrict__ grad_out,
                                             const T* __restrict__ src,
                                             const float* __restrict__ weights,
                                             const int64_t* __restrict__ token_index, int64_t D,
                                             T* __restrict__ grad_src,
                                             float* __restrict__ grad_weights) {
  __shared__ float partial[kThreads / 32];
  const int64_t n = blockIdx.x;
  const float w = weights[n];
  const auto* gy = reinterpret_cast<const Pack<T, V>*>(grad_out + token_index[n] * D);
  const auto* x = reinterpret_cast<const Pack<T, V>*>(src + n * D);
  auto* gx = reinterpret_cast<Pack<T, V>*>(grad_src + n * D);
  float dot = 0.f;
  for (int64_t c = threadIdx.x; c < D / V; c += blockDim.x) {
    const auto g = gy[c];
    const auto v = x[c];
    Pack<T, V> o;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float gf = to_float(g.v[i]);
      dot += gf * to_float(v.v[i]);
      o.v[i] = from_float<T>(w * gf);
    }
    gx[c] = o;
  }
  for (int o = 16; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = dot;
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.f;
    for (int i = 0; i < kThreads / 32; ++i) sum += partial[i];
    grad_weights[n] = sum;
  }
}

bool aligned16(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// Elements per 16-byte pack when every row start stays 16-byte aligned, else 1.
template <typename T>
int pack_width(int64_t D, bool aligned) {
  constexpr int kWide = 16 / sizeof(T);
  return aligned && D % kWide == 0 ? kWide : 1;
}

// Calls f(T{}, std::integral_constant<int, V>{}) for the dtype and the pack width V.
template <typename F>
void with_type(DType dtype, int64_t D, bool aligned, F&& f) {
  if (dtype == DType::Float32) {
    if (pack_width<float>(D, aligned) > 1) {
      f(float{}, std::integral_constant<int, 4>{});
    } else {
      f(float{}, std::integral_constant<int, 1>{});
    }
  } else {
    if (pack_width<__nv_bfloat16>(D, aligned) > 1) {
      f(__nv_bfloat16{}, std::integral_constant<int, 8>{});
    } else {
      f(__nv_bfloat16{}, std::integral_constant<int, 1>{});
    }
  }
}

}  // namespace

cudaError_t permute(const void* x_TD, const int64_t* token_index_N, int64_t N, int64_t D,
                    DType dtype, void* out_ND, cudaStream_t stream) {
  if (N == 0 || D == 0) return cudaSuccess;
  with_type(dtype, D, aligned16({x_TD, out_ND}), [&](auto zero, auto width) {
    using T = decltype(zero);
    permute_kernel<T, decltype(width)::value>
        <<<static_cast<unsigned int>(N), kThreads, 0, stream>>>(
            static_cast<const T*>(x_TD), token_index_N, D, static_cast<T*>(out_ND));
  });
  return cudaGetLastError();
}

cudaError_t combine_rows(const void* src_ND, const float* weights_N, const int64_t* rows_TK,
                         int64_t T, int K, int64_t D, DType dtype, void* out_TD,
                         cudaStream_t stream) {
  if (T == 0 || D == 0) return cudaSuccess;
  with_type(dtype, D, aligned16({src_ND, out_TD}), [&](auto zero, auto width) {
    using T_ = decltype(zero);
    combine_rows_kernel<T_, decltype(width)::value>
        <<<static_cast<unsigned int>(T), kThreads, 0, stream>>>(
            static_cast<const T_*>(src_ND), weights_N, rows_TK, K, D, static_cast<T_*>(out_TD));
  });
  return cudaGetLastError();
}

cudaError_t combine_rows_backward(const void* grad_out_TD, const void* src_ND,
                                  const float* weights_N, const int64_t* token_index_N, int64_t N,
                                  int64_t D, DType dtype, void* grad_src_ND, float* grad_weights_N,
                                  cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  with_type(dtype, D, aligned16({grad_out_TD, src_ND, grad_src_ND}), [&](auto zero, auto width) {
    using T = decltype(zero);
    combine_rows_backward_kernel<T, decltype(width)::value>
        <<<static_cast<unsigned int>(N), kThreads, 0, stream>>>(
            static_cast<const T*>(grad_out_TD), static_cast<const T*>(src_ND), weights_N,
            token_index_N, D, static_cast<T*>(grad_src_ND), grad_weights_N);
  });
  return cudaGetLastError();
}

}  // namespace gbmoe::cuda::launch
