// The CPU router pass: an autograd function over per-token loops (E is small: scalar code).
#include "moe/router_cpu.h"

#include <cmath>
#include <limits>
#include <vector>

#include "moe/kernels.h"

namespace gbmoe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The gates of one row into g; returns their sum (1 for softmax, whose gates are the scores).
float row_gates(const float* z, int64_t E, bool sigmoid, float* g) {
  if (sigmoid) {
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) {
      g[e] = 1.f / (1.f + std::exp(-z[e]));
      sum += g[e];
    }
    return sum;
  }
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t e = 0; e < E; ++e) m = std::max(m, z[e]);
  float sum = 0.f;
  for (int64_t e = 0; e < E; ++e) {
    g[e] = std::exp(z[e] - m);
    sum += g[e];
  }
  const float inv = 1.f / sum;
  for (int64_t e = 0; e < E; ++e) g[e] *= inv;
  return 1.f;
}

class RouterCpuFunction : public torch::autograd::Function<RouterCpuFunction> {
 public:
  // Returns scores (T, E), weights (T, K), ids (T, K), counts (E); the last two carry no
  // gradient.
  static variable_list forward(AutogradContext* ctx, const torch::Tensor& logits_TE,
                               const torch::Tensor& bias_E, const torch::Tensor& valid_T, int64_t K,
                               bool sigmoid, bool renormalize) {
    const int64_t T = logits_TE.size(0), E = logits_TE.size(1);
    auto logits = logits_TE.contiguous();
    auto bias = bias_E.to(torch::kFloat).contiguous();
    auto valid = valid_T.to(torch::kBool).contiguous();
    auto scores = torch::empty_like(logits);
    auto ids = torch::empty({T, K}, logits.options().dtype(torch::kLong));
    auto weights = torch::empty({T, K}, logits.options());
    auto counts = torch::zeros({E}, logits.options().dtype(torch::kLong));
    const float* z = logits.data_ptr<float>();
    const float* b = bias.data_ptr<float>();
    const bool* v = valid.data_ptr<bool>();
    float* s = scores.data_ptr<float>();
    int64_t* id = ids.data_ptr<int64_t>();
    float* w = weights.data_ptr<float>();
    int64_t* c = counts.data_ptr<int64_t>();
    std::vector<float> g(E);
    std::vector<char> taken(E);
    for (int64_t t = 0; t < T; ++t) {
      const float inv_sum = 1.f / row_gates(z + t * E, E, sigmoid, g.data());
      for (int64_t e = 0; e < E; ++e) s[t * E + e] = g[e] * inv_sum;
      std::fill(taken.begin(), taken.end(), 0);
      float selected_sum = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e) {
          if (!taken[e] && (best < 0 || g[e] + b[e] > g[best] + b[best])) best = e;
        }
        taken[best] = 1;
        id[t * K + k] = best;
        w[t * K + k] = g[best];
        selected_sum += g[best];
        if (v[t]) ++c[best];
      }
      if (renormalize && K > 1) {
        const float scale = 1.f / selected_sum;
        for (int64_t k = 0; k < K; ++k) w[t * K + k] *= scale;
      }
    }
    ctx->save_for_backward({logits, scores, ids, weights});
    ctx->saved_data["sigmoid"] = sigmoid;
    ctx->saved_data["renormalize"] = renormalize;
    ctx->mark_non_differentiable({ids, counts});
    return {scores, weights, ids, counts};
  }

  // Scores: softmax scores are the gates; sigmoid scores are gates / their sum. Weights:
  // w_k = g[i_k] / S with S = sum_j g[i_j] when renormalized, else g[i_k]. Then through the
  // gates to the logits: softmax g (dg - <g, dg>), sigmoid dg g (1 - g).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &logits = saved[0], &scores = saved[1], &ids = saved[2], &weights = saved[3];
    const bool sigmoid = ctx->saved_data["sigmoid"].toBool();
    const bool renormalize = ctx->saved_data["renormalize"].toBool();
    const int64_t T = logits.size(0), E = logits.size(1), K = ids.size(1);
    auto grad_logits = torch::zeros_like(logits);
    if (!grads[0].defined() && !grads[1].defined()) {
      return {grad_logits, {}, {}, {}, {}, {}};
    }
    auto gs_TE = grads[0].defined() ? grads[0].to(torch::kFloat).contiguous() : torch::Tensor();
    auto gw_TK = grads[1].defined() ? grads[1].to(torch::kFloat).contiguous() : torch::Tensor();
    const float* z = logits.data_ptr<float>();
    const float* s = scores.data_ptr<float>();
    const int64_t* id = ids.data_ptr<int64_t>();
    const float* w = weights.data_ptr<float>();
    const float* gs = gs_TE.defined() ? gs_TE.data_ptr<float>() : nullptr;
    const float* gw = gw_TK.defined() ? gw_TK.data_ptr<float>() : nullptr;
    float* dz = grad_logits.data_ptr<float>();
    const bool renorm = renormalize && K > 1;
    std::vector<float> g(E), dg(E);
    for (int64_t t = 0; t < T; ++t) {
      float gate_sum = 1.f;
      if (sigmoid) {
        gate_sum = row_gates(z + t * E, E, true, g.data());
      } else {
        for (int64_t e = 0; e < E; ++e) g[e] = s[t * E + e];
      }
      float score_dot = 0.f;
      if (gs && sigmoid) {
        for (int64_t e = 0; e < E; ++e) score_dot += gs[t * E + e] * s[t * E + e];
      }
      for (int64_t e = 0; e < E; ++e) {
        const float d = gs ? gs[t * E + e] : 0.f;
        dg[e] = sigmoid ? (d - score_dot) / gate_sum : d;
      }
      if (gw) {
        float selected_sum = 0.f, weight_dot = 0.f;
        for (int64_t k = 0; k < K; ++k) {
          selected_sum += g[id[t * K + k]];
          weight_dot += gw[t * K + k] * w[t * K + k];
        }
        for (int64_t k = 0; k < K; ++k) {
          dg[id[t * K + k]] += renorm ? (gw[t * K + k] - weight_dot) / selected_sum : gw[t * K + k];
        }
      }
      float* dzr = dz + t * E;
      if (sigmoid) {
        for (int64_t e = 0; e < E; ++e) dzr[e] = dg[e] * g[e] * (1.f - g[e]);
        continue;
      }
      float dot = 0.f;
      for (int64_t e = 0; e < E; ++e) dot += g[e] * dg[e];
      for (int64_t e = 0; e < E; ++e) dzr[e] = g[e] * (dg[e] - dot);
    }
    return {grad_logits, {}, {}, {}, {}, {}};
  }
};

}  // namespace

bool route_logits_cpu_applies(const torch::Tensor& logits_TE) {
  return kernel_mode() == KernelMode::Fused && logits_TE.is_cpu() &&
         logits_TE.scalar_type() == torch::kFloat && logits_TE.dim() == 2;
}

RoutedScores route_logits_cpu(const torch::Tensor& logits_TE, const torch::Tensor& bias_E,
                              const torch::Tensor& valid_T, int64_t top_k,
                              ScoreFunction score_function, bool renormalize) {
  TORCH_CHECK(route_logits_cpu_applies(logits_TE), "route_logits_cpu: logits ", logits_TE.sizes(),
              " ", logits_TE.scalar_type(), " must be fp32 CPU (T, E)");
  const int64_t T = logits_TE.size(0), E = logits_TE.size(1);
  TORCH_CHECK(top_k >= 1 && top_k <= E, "route_logits_cpu: top_k (", top_k,
              ") must be in [1, num_experts (", E, ")]");
  TORCH_CHECK(bias_E.numel() == E && valid_T.numel() == T, "route_logits_cpu: bias (",
              bias_E.sizes(), ") must be (", E, ") and valid (", valid_T.sizes(), ") (", T, ")");
  auto out = RouterCpuFunction::apply(logits_TE, bias_E, valid_T, top_k,
                                      score_function == ScoreFunction::Sigmoid, renormalize);
  RoutedScores r;
  r.scores = out[0];
  r.weights = out[1];
  r.expert_ids = out[2];
  r.counts = out[3];
  return r;
}

}  // namespace gbmoe
