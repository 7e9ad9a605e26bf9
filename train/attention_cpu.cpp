// The fused causal attention: per head, raw scores tile by tile below the diagonal (kTile query
// rows against the keys up to the tile's last row), the causal softmax in place (moe/swiglu_cpu.h:
// its polynomial exp and instruction-set variants, zeros above the diagonal), then the output; the
// backward forms dP, dS = P (dP - rowsum(P dP)) and the three gradients with the same tiles. The
// products go to the BLAS LibTorch links (MKL's sgemm_, Fortran interface); where it
// is absent the model keeps LibTorch's attention. libtorch_cpu exports the LP64
// interface (32-bit integers) as sgemm_ and the ILP64 one as sgemm_64_; the weak reference is
// bound when the program loads, to whichever library on the link line defines it. The products
// of a tile run over all its keys with zero probabilities above the diagonal, so an infinite or
// NaN value row (forward) or key row (dq in the backward) reaches the earlier rows of its tile
// as 0 x inf; finite values never do, and LibTorch's kernel spreads such NaNs further.
#include "train/attention_cpu.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <memory>

#include "moe/kernels.h"
#include "moe/profile_region.h"
#include "moe/swiglu_cpu.h"

// MKL's (and any reference BLAS's) single-precision product, column-major, 32-bit integers (the
// LP64 interface libtorch_cpu exports). Weak: null when no library the program loaded defines it.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c, const int* ldc)
    __attribute__((weak));

namespace gbmoe {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

// Query rows per tile: the scores of a tile reach to its last row, so the products cover
// (1 + 1/tiles) / 2 of the S x S square (0.625 at S = 128) instead of all of it.
constexpr int64_t kTile = 32;

// Row-major C (m x n, row stride ldc) = op(A) op(B), op(X) = X^T when t_x, for row-major A and
// B. The column-major BLAS computes C^T = op(B)^T op(A)^T from the same memory.
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda,
          const float* B, int64_t ldb, float* C, int64_t ldc) {
  const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const float one = 1.f, zero = 0.f;
  sgemm_(&opb, &opa, &M, &N, &K, &one, B, &la, A, &lb, &zero, C, &lc);
}

// One head's forward. q, k, v: (S, Dh) contiguous; y: S rows of Dh, row stride ld_y; P: (S, S)
// contiguous, written with the probabilities (zero above the diagonal).
void head_forward(const float* q, const float* k, const float* v, float* y, int64_t ld_y, float* P,
                  int64_t S, int64_t Dh, float scale) {
  // Raw scores q k^T; the softmax applies the 1 / sqrt(Dh).
  for (int64_t r0 = 0; r0 < S; r0 += kTile) {
    const int64_t r1 = std::min(S, r0 + kTile);
    gemm(false, true, r1 - r0, r1, Dh, q + r0 * Dh, Dh, k, Dh, P + r0 * S, S);
  }
  detail::causal_softmax_rows(P, S, 0, S, S, scale);
  for (int64_t r0 = 0; r0 < S; r0 += kTile) {
    const int64_t r1 = std::min(S, r0 + kTile);
    gemm(false, false, r1 - r0, Dh, r1, P + r0 * S, S, v, Dh, y + r0 * ld_y, ld_y);
  }
}

// One head's backward. dy: S rows of Dh, row stride ld_dy; P from the forward; dS: (S, S)
// scratch; dq, dk, dv: (S, Dh) contiguous outputs.
void head_backward(const float* q, const float* k, const float* v, const float* P, const float* dy,
                   int64_t ld_dy, float* dS, float* dq, float* dk, float* dv, int64_t S, int64_t Dh,
                   float scale) {
  for (int64_t r0 = 0; r0 < S; r0 += kTile) {  // dP = dy v^T, the tiles of the forward
    const int64_t r1 = std::min(S, r0 + kTile);
    gemm(false, true, r1 - r0, r1, Dh, dy + r0 * ld_dy, ld_dy, v, Dh, dS + r0 * S, S);
  }
  // dS = scale P (dP - sum_j P dP), the gradient of the raw scores q k^T; zero above the diagonal.
  detail::causal_softmax_backward_rows(P, dS, S, 0, S, S, scale);
  // Key tile [c0, c1) gets its gradients from the query rows c0 .. S - 1 (P and dS are zero
  // above the diagonal inside the tile).
  for (int64_t c0 = 0; c0 < S; c0 += kTile) {
    const int64_t c1 = std::min(S, c0 + kTile), rows = S - c0;
    gemm(true, false, c1 - c0, Dh, rows, P + c0 * S + c0, S, dy + c0 * ld_dy, ld_dy, dv + c0 * Dh,
         Dh);
    gemm(true, false, c1 - c0, Dh, rows, dS + c0 * S + c0, S, q + c0 * Dh, Dh, dk + c0 * Dh, Dh);
  }
  for (int64_t r0 = 0; r0 < S; r0 += kTile) {
    const int64_t r1 = std::min(S, r0 + kTile);
    gemm(false, false, r1 - r0, Dh, r1, dS + r0 * S, S, k, Dh, dq + r0 * Dh, Dh);
  }
}

// y (B, S, H, Dh) of every head; the probabilities go to P_BHSS when it is defined (kept for the
// backward), else to one S x S scratch block per thread.
torch::Tensor attend(const torch::Tensor& q_BHSD, const torch::Tensor& k_BHSD,
                     const torch::Tensor& v_BHSD, const torch::Tensor& P_BHSS) {
  const int64_t B = q_BHSD.size(0), H = q_BHSD.size(1), S = q_BHSD.size(2);
  const int64_t Dh = q_BHSD.size(3);
  const float scale = 1.f / std::sqrt(static_cast<float>(Dh));
  auto y_BSHD = torch::empty({B, S, H, Dh}, q_BHSD.options());
  const float* q = q_BHSD.data_ptr<float>();
  const float* k = k_BHSD.data_ptr<float>();
  const float* v = v_BHSD.data_ptr<float>();
  float* y = y_BSHD.data_ptr<float>();
  float* P = P_BHSS.defined() ? P_BHSS.data_ptr<float>() : nullptr;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> scratch(P ? nullptr : new float[S * S]);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, in = bh * S * Dh;
      head_forward(q + in, k + in, v + in, y + (b * S * H + h) * Dh, H * Dh,
                   P ? P + bh * S * S : scratch.get(), S, Dh, scale);
    }
  });
  return y_BSHD;
}

class CausalAttentionFunction : public torch::autograd::Function<CausalAttentionFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& q_BHSD,
                               const torch::Tensor& k_BHSD, const torch::Tensor& v_BHSD) {
    const int64_t B = q_BHSD.size(0), H = q_BHSD.size(1), S = q_BHSD.size(2);
    auto P_BHSS = torch::empty({B, H, S, S}, q_BHSD.options());
    auto y_BSHD = attend(q_BHSD, k_BHSD, v_BHSD, P_BHSS);
    ctx->save_for_backward({q_BHSD, k_BHSD, v_BHSD, P_BHSS});
    return y_BSHD;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    GBMOE_PROFILE_REGION("attention.sdpa (backward)");  // a custom node: no op names its region
    TORCH_CHECK(!torch::GradMode::is_enabled(),
                "causal_attention_cpu is differentiable once: its backward builds no graph "
                "(create_graph is not supported)");
    const auto saved = ctx->get_saved_variables();
    const auto &q_BHSD = saved[0], &k_BHSD = saved[1], &v_BHSD = saved[2], &P_BHSS = saved[3];
    const int64_t B = q_BHSD.size(0), H = q_BHSD.size(1), S = q_BHSD.size(2);
    const int64_t Dh = q_BHSD.size(3);
    const float scale = 1.f / std::sqrt(static_cast<float>(Dh));
    const auto dy_BSHD = grads[0].contiguous();
    auto dq_BHSD = torch::empty_like(q_BHSD), dk_BHSD = torch::empty_like(k_BHSD);
    auto dv_BHSD = torch::empty_like(v_BHSD);
    const float* q = q_BHSD.data_ptr<float>();
    const float* k = k_BHSD.data_ptr<float>();
    const float* v = v_BHSD.data_ptr<float>();
    const float* P = P_BHSS.data_ptr<float>();
    const float* dy = dy_BSHD.data_ptr<float>();
    float* dq = dq_BHSD.data_ptr<float>();
    float* dk = dk_BHSD.data_ptr<float>();
    float* dv = dv_BHSD.data_ptr<float>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::unique_ptr<float[]> dS(new float[S * S]);  // every entry read is written first
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H, in = bh * S * Dh;
        head_backward(q + in, k + in, v + in, P + bh * S * S, dy + (b * S * H + h) * Dh, H * Dh,
                      dS.get(), dq + in, dk + in, dv + in, S, Dh, scale);
      }
    });
    return {dq_BHSD, dk_BHSD, dv_BHSD};
  }
};

// Whether a backward will need the probabilities: grad mode on and an input that requires grad.
bool keeps_probabilities(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  return torch::GradMode::is_enabled() &&
         (q.requires_grad() || k.requires_grad() || v.requires_grad());
}

bool same_layout(const torch::Tensor& t, const torch::Tensor& q) {
  return t.is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous() &&
         t.sizes() == q.sizes();
}

}  // namespace

bool causal_attention_cpu_available() { return sgemm_ != nullptr; }

bool causal_attention_cpu_applies(const torch::Tensor& q_BHSD, const torch::Tensor& k_BHSD,
                                  const torch::Tensor& v_BHSD) {
  if (kernel_mode() != KernelMode::Fused || !causal_attention_cpu_available() ||
      q_BHSD.dim() != 4 || !same_layout(q_BHSD, q_BHSD) || !same_layout(k_BHSD, q_BHSD) ||
      !same_layout(v_BHSD, q_BHSD)) {
    return false;
  }
  const int64_t B = q_BHSD.size(0), H = q_BHSD.size(1), S = q_BHSD.size(2);
  if (S < 1 || S > kCausalAttentionCpuMaxPositions || q_BHSD.size(3) < 1) return false;
  return !keeps_probabilities(q_BHSD, k_BHSD, v_BHSD) ||
         B * H * S * S * static_cast<int64_t>(sizeof(float)) <= kCausalAttentionCpuMaxKeptBytes;
}

torch::Tensor causal_attention_cpu(const torch::Tensor& q_BHSD, const torch::Tensor& k_BHSD,
                                   const torch::Tensor& v_BHSD) {
  TORCH_CHECK(
      causal_attention_cpu_applies(q_BHSD, k_BHSD, v_BHSD), "causal_attention_cpu: q ",
      q_BHSD.sizes(), ", k ", k_BHSD.sizes(), " and v ", v_BHSD.sizes(), " (", q_BHSD.scalar_type(),
      ") must be contiguous fp32 CPU (B, H, S, Dh) tensors of one shape with S <= ",
      kCausalAttentionCpuMaxPositions, " and, for a backward, B H S S fp32 within ",
      kCausalAttentionCpuMaxKeptBytes >> 20, " MiB, in kernel mode fused, with a BLAS loaded");
  if (!keeps_probabilities(q_BHSD, k_BHSD, v_BHSD)) return attend(q_BHSD, k_BHSD, v_BHSD, {});
  return CausalAttentionFunction::apply(q_BHSD, k_BHSD, v_BHSD);
}

}  // namespace gbmoe
