// Autograd functions over the CUDA kernels: fused router, permute, weighted unpermute.
// Letters: T tokens, D dim, E experts, K top-k, N routed rows.
#include "csrc_cuda/moe_kernels.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "csrc_cuda/kernels.h"
#include "moe/dispatcher.h"

namespace gbmoe::cuda {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
namespace k = launch;

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

bool has_kernel_dtype(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16;
}

k::DType kernel_dtype(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat ? k::DType::Float32 : k::DType::BFloat16;
}

// A tensor or nullptr for an undefined gradient.
const float* optional_float_ptr(const torch::Tensor& t) {
  return t.defined() ? t.data_ptr<float>() : nullptr;
}

class RouterFunction : public torch::autograd::Function<RouterFunction> {
 public:
  // Returns scores (T, E), weights (T, K), ids (T, K), counts (E); the last two carry no
  // gradient.
  static variable_list forward(AutogradContext* ctx, const torch::Tensor& logits_TE,
                               const torch::Tensor& bias_E, const torch::Tensor& valid_T,
                               int64_t top_k, bool sigmoid, bool renormalize) {
    c10::cuda::CUDAGuard guard(logits_TE.device());
    const int64_t T = logits_TE.size(0), E = logits_TE.size(1);
    auto logits = logits_TE.contiguous();
    auto bias = bias_E.to(logits.device(), torch::kFloat).contiguous();
    auto valid = valid_T.to(logits.device(), torch::kBool).contiguous();
    auto scores = torch::empty_like(logits);
    auto ids = torch::empty({T, top_k}, logits.options().dtype(torch::kLong));
    auto weights = torch::empty({T, top_k}, logits.options());
    auto counts = torch::zeros({E}, logits.options().dtype(torch::kLong));
    C10_CUDA_CHECK(
        k::router_forward(logits.data_ptr<float>(), bias.data_ptr<float>(), valid.data_ptr<bool>(),
                          T, static_cast<int>(E), static_cast<int>(top_k), sigmoid, renormalize,
                          scores.data_ptr<float>(), ids.data_ptr<int64_t>(),
                          weights.data_ptr<float>(), counts.data_ptr<int64_t>(), current_stream()));
    ctx->save_for_backward({logits, scores, ids, weights});
    ctx->saved_data["sigmoid"] = sigmoid;
    ctx->saved_data["renormalize"] = renormalize;
    ctx->mark_non_differentiable({ids, counts});
    return {scores, weights, ids, counts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto logits = saved[0], scores = saved[1], ids = saved[2], weights = saved[3];
    c10::cuda::CUDAGuard guard(logits.device());
    auto grad_scores = grads[0].defined() ? grads[0].to(torch::kFloat).contiguous() : grads[0];
    auto grad_weights = grads[1].defined() ? grads[1].to(torch::kFloat).contiguous() : grads[1];
    auto grad_logits = torch::empty_like(logits);
    if (!grad_scores.defined() && !grad_weights.defined()) {
      grad_logits.zero_();
    } else {
      C10_CUDA_CHECK(k::router_backward(
          logits.data_ptr<float>(), scores.data_ptr<float>(), ids.data_ptr<int64_t>(),
          weights.data_ptr<float>(), optional_float_ptr(grad_scores),
          optional_float_ptr(grad_weights), logits.size(0), static_cast<int>(logits.size(1)),
          static_cast<int>(ids.size(1)), ctx->saved_data["sigmoid"].toBool(),
          ctx->saved_data["renormalize"].toBool(), grad_logits.data_ptr<float>(),
          current_stream()));
    }
    return {grad_logits,     torch::Tensor(), torch::Tensor(),
            torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// out[t] = sum_k w[rows[t, k]] * src[rows[t, k]] (w = 1 when undefined).
torch::Tensor combine(const torch::Tensor& src_ND, const torch::Tensor& weights_N,
                      const torch::Tensor& rows_TK) {
  const int64_t T = rows_TK.size(0), D = src_ND.size(1);
  auto out = torch::empty({T, D}, src_ND.options());
  C10_CUDA_CHECK(k::combine_rows(src_ND.data_ptr(), optional_float_ptr(weights_N),
                                 rows_TK.data_ptr<int64_t>(), T, static_cast<int>(rows_TK.size(1)),
                                 D, kernel_dtype(src_ND), out.data_ptr(), current_stream()));
  return out;
}

class PermuteFunction : public torch::autograd::Function<PermuteFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x_TD,
                               const torch::Tensor& token_index_N, const torch::Tensor& rows_TK) {
    c10::cuda::CUDAGuard guard(x_TD.device());
    const int64_t N = token_index_N.size(0), D = x_TD.size(1);
    auto out = torch::empty({N, D}, x_TD.options());
    C10_CUDA_CHECK(k::permute(x_TD.data_ptr(), token_index_N.data_ptr<int64_t>(), N, D,
                              kernel_dtype(x_TD), out.data_ptr(), current_stream()));
    ctx->save_for_backward({rows_TK});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto rows_TK = ctx->get_saved_variables()[0];
    c10::cuda::CUDAGuard guard(rows_TK.device());
    return {combine(grads[0].contiguous(), torch::Tensor(), rows_TK), torch::Tensor(),
            torch::Tensor()};
  }
};

class UnpermuteFunction : public torch::autograd::Function<UnpermuteFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& expert_out_ND,
                               const torch::Tensor& weights_N, const torch::Tensor& token_index_N,
                               const torch::Tensor& rows_TK) {
    c10::cuda::CUDAGuard guard(expert_out_ND.device());
    ctx->save_for_backward({expert_out_ND, weights_N, token_index_N});
    return combine(expert_out_ND, weights_N, rows_TK);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto expert_out = saved[0], weights = saved[1], token_index = saved[2];
    c10::cuda::CUDAGuard guard(expert_out.device());
    auto grad_y = grads[0].contiguous();
    auto grad_out = torch::empty_like(expert_out);
    auto grad_weights = torch::empty_like(weights);
    C10_CUDA_CHECK(k::combine_rows_backward(
        grad_y.data_ptr(), expert_out.data_ptr(), weights.data_ptr<float>(),
        token_index.data_ptr<int64_t>(), expert_out.size(0), expert_out.size(1),
        kernel_dtype(expert_out), grad_out.data_ptr(), grad_weights.data_ptr<float>(),
        current_stream()));
    return {grad_out, grad_weights, torch::Tensor(), torch::Tensor()};
  }
};

RoutedScores route(const torch::Tensor& logits_TE, const torch::Tensor& bias_E,
                   const torch::Tensor& valid_T, int64_t top_k, ScoreFunction score_function,
                   bool renormalize) {
  const int64_t E = logits_TE.size(1);
  if (logits_TE.scalar_type() != torch::kFloat || E > k::kRouterMaxExperts ||
      top_k > k::kRouterMaxTopK) {
    return route_logits_reference(logits_TE, bias_E, valid_T, top_k, score_function, renormalize);
  }
  auto out = RouterFunction::apply(logits_TE, bias_E, valid_T, top_k,
                                   score_function == ScoreFunction::Sigmoid, renormalize);
  return RoutedScores{out[0], out[2], out[1], out[3]};
}

torch::Tensor permute(const torch::Tensor& x_TD, const torch::Tensor& token_index_N,
                      const torch::Tensor& rows_TK) {
  if (!has_kernel_dtype(x_TD)) return permute_reference(x_TD, token_index_N);
  return PermuteFunction::apply(x_TD.contiguous(), token_index_N.contiguous(),
                                rows_TK.contiguous());
}

torch::Tensor unpermute(const torch::Tensor& expert_out_ND, const torch::Tensor& weights_N,
                        const torch::Tensor& token_index_N, const torch::Tensor& rows_TK) {
  if (!has_kernel_dtype(expert_out_ND)) {
    return unpermute_reference(expert_out_ND, weights_N, token_index_N, rows_TK.size(0));
  }
  return UnpermuteFunction::apply(expert_out_ND.contiguous(),
                                  weights_N.to(torch::kFloat).contiguous(),
                                  token_index_N.contiguous(), rows_TK.contiguous());
}

}  // namespace

const MoEKernels& kernels() {
  static const MoEKernels k = [] {
    MoEKernels m;
    m.route = route;
    m.permute = permute;
    m.unpermute = unpermute;
    return m;
  }();
  return k;
}

void register_kernels() { gbmoe::register_kernels(c10::DeviceType::CUDA, kernels()); }

}  // namespace gbmoe::cuda
