// Fused SwiGLU passes for fp32 on the CPU. The loops are written so that the compiler vectorizes
// them (this file is built with -O3): a polynomial exp instead of a libm call, restrict-qualified
// row pointers, and on x86-64 one variant each for AVX-512, AVX2+FMA and the baseline, chosen at
// first use. The helpers are always_inline: GCC inlines nothing else into a function built for
// another target.
#include "moe/swiglu_cpu.h"

// The round-to-integer step of exp_approx relies on IEEE evaluation order; -ffast-math folds it
// away (CMakeLists.txt builds this file with -fno-fast-math).
#ifdef __FAST_MATH__
#error "moe/swiglu_cpu.cpp must be compiled without -ffast-math"
#endif

#include <atomic>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GBMOE_X86_VARIANTS
#endif

namespace gbmoe {
namespace detail {
namespace {

// e^x within 2 ulp for x in [-87, 88.7]: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for
// an exact n ln2), e^r by the Cephes single-precision polynomial, 2^n written into the exponent
// bits. Below -87 it gives e^-87; above 88.7 (clamped at 89, n = 128) the exponent bits make
// +inf, as the true value overflows fp32 there. A NaN becomes e^-87; the callers multiply by the
// NaN gate, so their results stay NaN.
inline __attribute__((always_inline)) float exp_approx(float x) {
  x = x > -87.f ? x : -87.f;
  x = x < 89.f ? x : 89.f;
  constexpr float kRoundShift = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + kRoundShift) - kRoundShift;
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// sigmoid(g) = 1 / (1 + e^-g): 0 below about -88.7 (the true value is a denormal there), so that
// silu(-inf) is NaN as in LibTorch.
inline __attribute__((always_inline)) float sigmoid(float g) {
  return 1.f / (1.f + exp_approx(-g));
}

inline __attribute__((always_inline)) void forward_row(const float* __restrict gate,
                                                       const float* __restrict up,
                                                       float* __restrict act, int64_t F) {
  for (int64_t j = 0; j < F; ++j) {
    const float s = sigmoid(gate[j]);
    act[j] = gate[j] * s * up[j];
  }
}

inline __attribute__((always_inline)) void backward_row(
    const float* __restrict gate, const float* __restrict up, const float* __restrict dact,
    float* __restrict dgate, float* __restrict dup, float* __restrict act, int64_t F) {
  for (int64_t j = 0; j < F; ++j) {
    const float g = gate[j], s = sigmoid(g), silu = g * s;
    act[j] = silu * up[j];
    dup[j] = dact[j] * silu;
    dgate[j] = dact[j] * up[j] * s * (1.f + g * (1.f - s));
  }
}

constexpr int64_t kLanes = 8;

// Maximum and sum of a[0 .. n - 1] (n >= 1), in kLanes partial results so that they vectorize.
inline __attribute__((always_inline)) float lane_max(const float* __restrict a, int64_t n) {
  float lane[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = a[0];
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lane[l] = a[j + l] > lane[l] ? a[j + l] : lane[l];
  }
  float m = lane[0];
  for (int64_t l = 1; l < kLanes; ++l) m = lane[l] > m ? lane[l] : m;
  for (; j < n; ++j) m = a[j] > m ? a[j] : m;
  return m;
}

inline __attribute__((always_inline)) float lane_sum(const float* __restrict a, int64_t n) {
  float lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += a[j + l];
  }
  float s = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) s += lane[l];
  for (; j < n; ++j) s += a[j];
  return s;
}

// Row i of the causal softmax: n = i + 1 scores, S - n zeros after them. The max skips NaNs
// (comparisons are false), the exp keeps them (exp_approx would turn NaN into e^-87).
inline __attribute__((always_inline)) void causal_softmax_row(float* __restrict row, int64_t n,
                                                              int64_t S, float scale) {
  const float m = lane_max(row, n);
  for (int64_t j = 0; j < n; ++j) {
    const float x = (row[j] - m) * scale;
    row[j] = x == x ? exp_approx(x) : x;
  }
  const float inv = 1.f / lane_sum(row, n);
  for (int64_t j = 0; j < n; ++j) row[j] *= inv;
  for (int64_t j = n; j < S; ++j) row[j] = 0.f;
}

inline __attribute__((always_inline)) float lane_dot(const float* __restrict a,
                                                     const float* __restrict b, int64_t n) {
  float lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += a[j + l] * b[j + l];
  }
  float s = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) s += lane[l];
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

inline __attribute__((always_inline)) void causal_softmax_backward_row(const float* __restrict p,
                                                                       float* __restrict d,
                                                                       int64_t n, int64_t S,
                                                                       float scale) {
  const float delta = lane_dot(p, d, n);
  for (int64_t j = 0; j < n; ++j) d[j] = scale * p[j] * (d[j] - delta);
  for (int64_t j = n; j < S; ++j) d[j] = 0.f;
}

inline __attribute__((always_inline)) void softmax_exp_row(const float* __restrict x,
                                                           float* __restrict e, int64_t V,
                                                           float* max_out, float* sum_out) {
  const float m = lane_max(x, V);
  for (int64_t j = 0; j < V; ++j) {
    const float d = x[j] - m;
    e[j] = d == d ? exp_approx(d) : d;
  }
  *max_out = m;
  *sum_out = lane_sum(e, V);
}

// Each instruction-set variant is the same loop compiled for that target.
#define GBMOE_SWIGLU_VARIANT(suffix, target_attr)                                                  \
  target_attr void forward_##suffix(const float* h, int64_t ld_h, float* act, int64_t ld_act,      \
                                    int64_t rows, int64_t F) {                                     \
    for (int64_t i = 0; i < rows; ++i) {                                                           \
      forward_row(h + i * ld_h, h + i * ld_h + F, act + i * ld_act, F);                            \
    }                                                                                              \
  }                                                                                                \
  target_attr void backward_##suffix(const float* h, int64_t ld_h, const float* dact,              \
                                     int64_t ld_dact, float* dh, int64_t ld_dh, float* act,        \
                                     int64_t ld_act, int64_t rows, int64_t F) {                    \
    for (int64_t i = 0; i < rows; ++i) {                                                           \
      backward_row(h + i * ld_h, h + i * ld_h + F, dact + i * ld_dact, dh + i * ld_dh,             \
                   dh + i * ld_dh + F, act + i * ld_act, F);                                       \
    }                                                                                              \
  }                                                                                                \
  target_attr void softmax_##suffix(float* P, int64_t ld, int64_t first_row, int64_t rows,         \
                                    int64_t S, float scale) {                                      \
    for (int64_t i = first_row; i < first_row + rows; ++i) {                                       \
      causal_softmax_row(P + i * ld, i + 1, S, scale);                                             \
    }                                                                                              \
  }                                                                                                \
  target_attr void softmax_backward_##suffix(const float* P, float* dS, int64_t ld,                \
                                             int64_t first_row, int64_t rows, int64_t S,           \
                                             float scale) {                                        \
    for (int64_t i = first_row; i < first_row + rows; ++i) {                                       \
      causal_softmax_backward_row(P + i * ld, dS + i * ld, i + 1, S, scale);                       \
    }                                                                                              \
  }                                                                                                \
  target_attr void softmax_exp_##suffix(const float* x, int64_t ld_x, float* e, int64_t ld_e,      \
                                        int64_t rows, int64_t V, float* max_out, float* sum_out) { \
    for (int64_t i = 0; i < rows; ++i) {                                                           \
      softmax_exp_row(x + i * ld_x, e + i * ld_e, V, max_out + i, sum_out + i);                    \
    }                                                                                              \
  }

GBMOE_SWIGLU_VARIANT(baseline, )
#ifdef GBMOE_X86_VARIANTS
GBMOE_SWIGLU_VARIANT(avx2, __attribute__((target("avx2,fma"))))
GBMOE_SWIGLU_VARIANT(avx512, __attribute__((target("avx512f,avx2,fma"))))
#endif

using ForwardFn = decltype(&forward_baseline);
using BackwardFn = decltype(&backward_baseline);
using SoftmaxFn = decltype(&softmax_baseline);
using SoftmaxBackwardFn = decltype(&softmax_backward_baseline);
using SoftmaxExpFn = decltype(&softmax_exp_baseline);

struct Variant {
  const char* name;
  ForwardFn forward;
  BackwardFn backward;
  SoftmaxFn softmax;
  SoftmaxBackwardFn softmax_backward;
  SoftmaxExpFn softmax_exp;
  bool (*supported)();
};

// Best first. The choice is made at run time from what this CPU supports (GCC's target_clones
// resolvers run while the loader relocates, before the CPU model is read in some set-ups, and
// then always pick the baseline).
const Variant kVariants[] = {
#ifdef GBMOE_X86_VARIANTS
    {"avx512", forward_avx512, backward_avx512, softmax_avx512, softmax_backward_avx512,
     softmax_exp_avx512,
     [] {
       __builtin_cpu_init();
       return __builtin_cpu_supports("avx512f") != 0;
     }},
    {"avx2", forward_avx2, backward_avx2, softmax_avx2, softmax_backward_avx2, softmax_exp_avx2,
     [] {
       __builtin_cpu_init();
       return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
     }},
#endif
    {"baseline", forward_baseline, backward_baseline, softmax_baseline, softmax_backward_baseline,
     softmax_exp_baseline, [] { return true; }},
};

const Variant* best_variant() {
  for (const auto& v : kVariants) {
    if (v.supported()) return &v;
  }
  return nullptr;  // unreachable: the baseline is always supported
}

std::atomic<const Variant*>& current() {
  static std::atomic<const Variant*> v{best_variant()};
  return v;
}

}  // namespace

const char* swiglu_cpu_variant() { return current().load()->name; }

bool set_swiglu_cpu_variant(const std::string& name) {
  for (const auto& v : kVariants) {
    if (name == v.name && v.supported()) {
      current().store(&v);
      return true;
    }
  }
  return false;
}

void swiglu_forward_rows(const float* h, int64_t ld_h, float* act, int64_t ld_act, int64_t rows,
                         int64_t F) {
  current().load()->forward(h, ld_h, act, ld_act, rows, F);
}

void swiglu_backward_rows(const float* h, int64_t ld_h, const float* dact, int64_t ld_dact,
                          float* dh, int64_t ld_dh, float* act, int64_t ld_act, int64_t rows,
                          int64_t F) {
  current().load()->backward(h, ld_h, dact, ld_dact, dh, ld_dh, act, ld_act, rows, F);
}

void causal_softmax_rows(float* P, int64_t ld, int64_t first_row, int64_t rows, int64_t S,
                         float scale) {
  current().load()->softmax(P, ld, first_row, rows, S, scale);
}

void causal_softmax_backward_rows(const float* P, float* dS, int64_t ld, int64_t first_row,
                                  int64_t rows, int64_t S, float scale) {
  current().load()->softmax_backward(P, dS, ld, first_row, rows, S, scale);
}

void softmax_exp_rows(const float* x, int64_t ld_x, float* e, int64_t ld_e, int64_t rows, int64_t V,
                      float* max_out, float* sum_out) {
  current().load()->softmax_exp(x, ld_x, e, ld_e, rows, V, max_out, sum_out);
}

}  // namespace detail
}  // namespace gbmoe
