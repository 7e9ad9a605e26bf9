// The fused RMSNorm and q/k/v head split with rotary embedding: autograd functions over raw row
// loops (written so that the compiler vectorizes them at -O3: restrict-qualified rows, sums in
// eight independent lanes).
#include "train/model_kernels_cpu.h"

#include <ATen/Parallel.h>

#include <cmath>

#include "moe/kernels.h"
#include "moe/profile_region.h"
#include "moe/swiglu_cpu.h"

namespace gbmoe {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

constexpr int64_t kLanes = 8;

// sum over j < n of a[j] * b[j], in kLanes partial sums.
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += a[j + l] * b[j + l];
  }
  float s = 0;
  for (int64_t l = 0; l < kLanes; ++l) s += lane[l];
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// Rows of x with unit stride in the last dim, as (T, D) with unit stride (a view when possible).
torch::Tensor rows_of(const torch::Tensor& x) {
  auto x_TD = x.reshape({-1, x.size(-1)});
  return x_TD.stride(1) == 1 && x_TD.stride(0) == x_TD.size(1) ? x_TD : x_TD.contiguous();
}

class RMSNormFunction : public torch::autograd::Function<RMSNormFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight, double eps) {
    auto x_TD = rows_of(x);
    const int64_t T = x_TD.size(0), D = x_TD.size(1);
    auto y_TD = torch::empty({T, D}, x_TD.options());
    auto rstd_T = torch::empty({T}, x_TD.options());
    const float* xp = x_TD.data_ptr<float>();
    const float* w = weight.data_ptr<float>();
    float* yp = y_TD.data_ptr<float>();
    float* rp = rstd_T.data_ptr<float>();
    const float feps = static_cast<float>(eps), inv_d = 1.f / static_cast<float>(D);
    for (int64_t t = 0; t < T; ++t) {
      const float* __restrict xr = xp + t * D;
      float* __restrict yr = yp + t * D;
      const float r = 1.f / std::sqrt(dot(xr, xr, D) * inv_d + feps);
      rp[t] = r;
      for (int64_t j = 0; j < D; ++j) yr[j] = xr[j] * r * w[j];
    }
    ctx->save_for_backward({x_TD, weight, rstd_T});
    ctx->saved_data["shape"] = x.sizes().vec();
    return y_TD.view(x.sizes());
  }

  // x^ = x r, gw = g w: dx = r (gw - x^ mean(gw x^)), dweight = sum over rows of g x^.
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    GBMOE_PROFILE_REGION("norm (backward)");  // a custom node: no forward op names its region
    const auto saved = ctx->get_saved_variables();
    const auto &x_TD = saved[0], &weight = saved[1], &rstd_T = saved[2];
    const int64_t T = x_TD.size(0), D = x_TD.size(1);
    auto g_TD = rows_of(grads[0]);
    auto dx_TD = torch::empty({T, D}, x_TD.options());
    auto dw_D = torch::zeros({D}, x_TD.options());
    const float* xp = x_TD.data_ptr<float>();
    const float* gp = g_TD.data_ptr<float>();
    const float* w = weight.data_ptr<float>();
    const float* rp = rstd_T.data_ptr<float>();
    float* dxp = dx_TD.data_ptr<float>();
    float* __restrict dw = dw_D.data_ptr<float>();
    const float inv_d = 1.f / static_cast<float>(D);
    std::vector<float> gw(D), xhat(D);
    for (int64_t t = 0; t < T; ++t) {
      const float* __restrict xr = xp + t * D;
      const float* __restrict gr = gp + t * D;
      float* __restrict dxr = dxp + t * D;
      float* __restrict gwr = gw.data();
      float* __restrict xh = xhat.data();
      const float r = rp[t];
      for (int64_t j = 0; j < D; ++j) {
        xh[j] = xr[j] * r;
        gwr[j] = gr[j] * w[j];
        dw[j] += gr[j] * xh[j];
      }
      const float m = dot(gwr, xh, D) * inv_d;
      for (int64_t j = 0; j < D; ++j) dxr[j] = r * (gwr[j] - xh[j] * m);
    }
    const auto& x_shape = ctx->saved_data["shape"].toIntVector();
    return {dx_TD.view(x_shape), ctx->needs_input_grad(1) ? dw_D : torch::Tensor(),
            torch::Tensor()};
  }
};

// The rotation of one head's row: out = (x0 c - x1 s, x0 s + x1 c) per pair; sign -1 turns back
// (the backward: (g0 c + g1 s, g1 c - g0 s)).
inline void rotate(const float* __restrict x, const float* __restrict c, const float* __restrict s,
                   float* __restrict out, int64_t P) {
  for (int64_t i = 0; i < P; ++i) {
    const float x0 = x[2 * i], x1 = x[2 * i + 1];
    out[2 * i] = x0 * c[i] - x1 * s[i];
    out[2 * i + 1] = x0 * s[i] + x1 * c[i];
  }
}

inline void rotate_back(const float* __restrict g, const float* __restrict c,
                        const float* __restrict s, float* __restrict out, int64_t P) {
  for (int64_t i = 0; i < P; ++i) {
    const float g0 = g[2 * i], g1 = g[2 * i + 1];
    out[2 * i] = g0 * c[i] + g1 * s[i];
    out[2 * i + 1] = g1 * c[i] - g0 * s[i];
  }
}

class QkvHeadsRopeFunction : public torch::autograd::Function<QkvHeadsRopeFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const torch::Tensor& qkv_BS3HD,
                             const torch::Tensor& cos_SP, const torch::Tensor& sin_SP) {
    const int64_t B = qkv_BS3HD.size(0), S = qkv_BS3HD.size(1), H = qkv_BS3HD.size(3);
    const int64_t Dh = qkv_BS3HD.size(4), P = Dh / 2;
    const auto st = qkv_BS3HD.strides();
    const float* src = qkv_BS3HD.data_ptr<float>();
    const float* c = cos_SP.data_ptr<float>();
    const float* sn = sin_SP.data_ptr<float>();
    tensor_list out;
    for (int64_t part = 0; part < 3; ++part) {
      out.push_back(torch::empty({B, H, S, Dh}, qkv_BS3HD.options()));
      float* dst = out.back().data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t h = 0; h < H; ++h) {
          for (int64_t s = 0; s < S; ++s) {
            const float* x = src + b * st[0] + s * st[1] + part * st[2] + h * st[3];
            float* y = dst + ((b * H + h) * S + s) * Dh;
            if (part < 2) {
              rotate(x, c + s * P, sn + s * P, y, P);
            } else {
              for (int64_t j = 0; j < Dh; ++j) y[j] = x[j];
            }
          }
        }
      }
    }
    ctx->save_for_backward({cos_SP, sin_SP});
    ctx->saved_data["B"] = B;
    ctx->saved_data["H"] = H;
    return out;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    GBMOE_PROFILE_REGION("attention.rope (backward)");
    const auto saved = ctx->get_saved_variables();
    const auto &cos_SP = saved[0], &sin_SP = saved[1];
    const int64_t B = ctx->saved_data["B"].toInt(), H = ctx->saved_data["H"].toInt();
    const int64_t S = cos_SP.size(0), P = cos_SP.size(1), Dh = 2 * P;
    const float* c = cos_SP.data_ptr<float>();
    const float* sn = sin_SP.data_ptr<float>();
    auto dqkv = torch::empty({B, S, 3, H, Dh}, cos_SP.options());
    float* dst = dqkv.data_ptr<float>();
    for (int64_t part = 0; part < 3; ++part) {
      if (!grads[part].defined()) {  // e.g. v unused: its rows of the gradient are zero
        dqkv.select(2, part).zero_();
        continue;
      }
      const auto g = grads[part].contiguous();
      const float* gp = g.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t h = 0; h < H; ++h) {
          for (int64_t s = 0; s < S; ++s) {
            const float* gr = gp + ((b * H + h) * S + s) * Dh;
            float* d = dst + (((b * S + s) * 3 + part) * H + h) * Dh;
            if (part < 2) {
              rotate_back(gr, c + s * P, sn + s * P, d, P);
            } else {
              for (int64_t j = 0; j < Dh; ++j) d[j] = gr[j];
            }
          }
        }
      }
    }
    return {dqkv, torch::Tensor(), torch::Tensor()};
  }
};

constexpr int64_t kIgnoreIndex = -100;  // LibTorch's default ignore_index

class CrossEntropySumFunction : public torch::autograd::Function<CrossEntropySumFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& logits_NV,
                               const torch::Tensor& targets_N) {
    const int64_t N = logits_NV.size(0), V = logits_NV.size(1);
    auto e_NV = torch::empty({N, V}, logits_NV.options());
    auto sum_N = torch::empty({N}, logits_NV.options());
    auto max_N = torch::empty({N}, logits_NV.options());
    const float* x = logits_NV.data_ptr<float>();
    const int64_t* t = targets_N.data_ptr<int64_t>();
    for (int64_t n = 0; n < N; ++n) {
      TORCH_CHECK(t[n] == kIgnoreIndex || (t[n] >= 0 && t[n] < V), "cross_entropy_sum_cpu: target ",
                  t[n], " at row ", n, " is outside [0, ", V, ") and not the ignore index -100");
    }
    float* sp = sum_N.data_ptr<float>();
    float* mp = max_N.data_ptr<float>();
    float* e = e_NV.data_ptr<float>();
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      detail::softmax_exp_rows(x + begin * V, V, e + begin * V, V, end - begin, V, mp + begin,
                               sp + begin);
    });
    double loss = 0;  // in row order, whatever the threads: the same bits at any thread count
    for (int64_t n = 0; n < N; ++n) {
      if (t[n] == kIgnoreIndex) continue;
      loss += static_cast<double>(mp[n]) + std::log(static_cast<double>(sp[n])) -
              static_cast<double>(x[n * V + t[n]]);
    }
    ctx->saved_data["e"] = e_NV;
    ctx->saved_data["sum"] = sum_N;
    ctx->saved_data["targets"] = targets_N.clone();  // not a view of a batch that may change
    return torch::tensor(static_cast<float>(loss), logits_NV.options());
  }

  // d/dx_j = g (e_j / sum - [j = target]) on the rows with a target, 0 on the others, written over
  // e.
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    GBMOE_PROFILE_REGION("cross_entropy (backward)");
    TORCH_CHECK(!torch::GradMode::is_enabled(),
                "cross_entropy_sum_cpu is differentiable once: its backward builds no graph "
                "(create_graph is not supported)");
    // The first backward takes the buffer: a second finds none.
    TORCH_CHECK(ctx->saved_data.count("e") == 1,
                "cross_entropy_sum_cpu was backpropagated twice; its backward reuses the forward's "
                "buffer (retain_graph is not supported)");
    auto e_NV = ctx->saved_data["e"].toTensor();
    ctx->saved_data.erase("e");
    const auto sum_N = ctx->saved_data["sum"].toTensor();
    const auto targets_N = ctx->saved_data["targets"].toTensor();
    const int64_t N = e_NV.size(0), V = e_NV.size(1);
    const float g = grads[0].item<float>();
    float* e = e_NV.data_ptr<float>();
    const float* sp = sum_N.data_ptr<float>();
    const int64_t* t = targets_N.data_ptr<int64_t>();
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        float* __restrict row = e + n * V;
        if (t[n] == kIgnoreIndex) {
          for (int64_t j = 0; j < V; ++j) row[j] = 0.f;
          continue;
        }
        const float scale = g / sp[n];
        for (int64_t j = 0; j < V; ++j) row[j] *= scale;
        row[t[n]] -= g;
      }
    });
    return {e_NV, torch::Tensor()};
  }
};

bool fused_mode() { return kernel_mode() == KernelMode::Fused; }

}  // namespace

bool rms_norm_cpu_applies(const torch::Tensor& x, const torch::Tensor& weight) {
  return fused_mode() && x.is_cpu() && x.scalar_type() == torch::kFloat && x.dim() >= 1 &&
         x.stride(-1) == 1 && weight.is_cpu() && weight.scalar_type() == torch::kFloat &&
         weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(-1);
}

torch::Tensor rms_norm_cpu(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(rms_norm_cpu_applies(x, weight), "rms_norm_cpu: x ", x.sizes(), " ", x.scalar_type(),
              " and weight ", weight.sizes(), " ", weight.scalar_type(),
              " must be fp32 CPU tensors with x's last dim (unit stride) the weight's size");
  return RMSNormFunction::apply(x, weight, eps);
}

bool qkv_heads_cpu_applies(const torch::Tensor& qkv_BS3HD) {
  return fused_mode() && qkv_BS3HD.is_cpu() && qkv_BS3HD.scalar_type() == torch::kFloat &&
         qkv_BS3HD.dim() == 5 && qkv_BS3HD.size(2) == 3 && qkv_BS3HD.size(4) % 2 == 0 &&
         qkv_BS3HD.stride(4) == 1;
}

std::vector<torch::Tensor> qkv_heads_rope_cpu(const torch::Tensor& qkv_BS3HD,
                                              const torch::Tensor& cos_SP,
                                              const torch::Tensor& sin_SP) {
  TORCH_CHECK(qkv_heads_cpu_applies(qkv_BS3HD), "qkv_heads_rope_cpu: qkv ", qkv_BS3HD.sizes(), " ",
              qkv_BS3HD.scalar_type(),
              " must be an fp32 CPU (B, S, 3, H, Dh) tensor, Dh even, unit stride in Dh");
  const int64_t S = qkv_BS3HD.size(1), P = qkv_BS3HD.size(4) / 2;
  for (const auto* t : {&cos_SP, &sin_SP}) {
    TORCH_CHECK(t->is_cpu() && t->scalar_type() == torch::kFloat && t->is_contiguous() &&
                    t->sizes() == torch::IntArrayRef({S, P}),
                "qkv_heads_rope_cpu: cos and sin must be contiguous fp32 CPU (", S, ", ", P,
                "), got ", t->sizes(), " ", t->scalar_type());
  }
  return QkvHeadsRopeFunction::apply(qkv_BS3HD, cos_SP, sin_SP);
}

bool cross_entropy_sum_cpu_applies(const torch::Tensor& logits_NV, const torch::Tensor& targets_N) {
  return fused_mode() && logits_NV.is_cpu() && logits_NV.scalar_type() == torch::kFloat &&
         logits_NV.dim() == 2 && logits_NV.is_contiguous() && logits_NV.size(1) >= 1 &&
         targets_N.is_cpu() && targets_N.scalar_type() == torch::kLong && targets_N.dim() == 1 &&
         targets_N.size(0) == logits_NV.size(0);
}

torch::Tensor cross_entropy_sum_cpu(const torch::Tensor& logits_NV,
                                    const torch::Tensor& targets_N) {
  TORCH_CHECK(cross_entropy_sum_cpu_applies(logits_NV, targets_N), "cross_entropy_sum_cpu: logits ",
              logits_NV.sizes(), " ", logits_NV.scalar_type(), " and targets ", targets_N.sizes(),
              " ", targets_N.scalar_type(),
              " must be contiguous fp32 CPU (N, V) logits and int64 CPU (N,) targets, in kernel "
              "mode fused");
  return CrossEntropySumFunction::apply(logits_NV, targets_N.contiguous());
}

}  // namespace gbmoe
