// Grouped SwiGLU experts: the module, the plain LibTorch reference and the grouped-GEMM path;
// the per-expert loop with its fused CPU passes and thread scheduler is in moe/experts_cpu.cpp.
#include "moe/experts.h"

#include <torch/version.h>

#include <algorithm>
#include <vector>

#include "moe/experts_cpu.h"
#include "moe/kernels.h"

// at::_grouped_mm (one launch for all experts' GEMMs) is in LibTorch from 2.9 on, on CUDA and CPU.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
#define GBMOE_HAS_GROUPED_MM
#endif

namespace gbmoe {
namespace {

std::vector<int64_t> group_offsets(const torch::Tensor& group_sizes, int64_t num_experts,
                                   int64_t num_rows) {
  TORCH_CHECK(group_sizes.dim() == 1 && group_sizes.size(0) == num_experts, "group_sizes must be (",
              num_experts, "), got ", group_sizes.sizes());
  auto sizes = group_sizes.to(torch::kCPU, torch::kLong).contiguous();
  const int64_t* s = sizes.data_ptr<int64_t>();
  std::vector<int64_t> offsets(num_experts + 1, 0);
  for (int64_t e = 0; e < num_experts; ++e) {
    TORCH_CHECK(s[e] >= 0, "group_sizes[", e, "] (", s[e], ") must be >= 0");
    offsets[e + 1] = offsets[e] + s[e];
  }
  TORCH_CHECK(offsets[num_experts] == num_rows, "group_sizes sum to ", offsets[num_experts],
              " but tokens has ", num_rows, " rows");
  return offsets;
}

#ifdef GBMOE_HAS_GROUPED_MM
// The same SwiGLU experts with at::_grouped_mm: one launch per GEMM for all experts; ends_E
// (int32, on the rows' device) are the row blocks' ends. Experts without rows get exact zero
// weight gradients from the grouped kernel.
class GroupedMmSwiGLUFunction : public torch::autograd::Function<GroupedMmSwiGLUFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x_ND,
                               const torch::Tensor& gate_up_EDH, const torch::Tensor& down_EFD,
                               const torch::Tensor& ends_E) {
    const int64_t F = down_EFD.size(1);
    auto h_NH = at::_grouped_mm(x_ND, gate_up_EDH, ends_E);
    auto act_NF = torch::silu(h_NH.narrow(1, 0, F)).mul_(h_NH.narrow(1, F, F));
    auto y_ND = at::_grouped_mm(act_NF, down_EFD, ends_E);
    ctx->save_for_backward({x_ND, gate_up_EDH, down_EFD, h_NH, ends_E});
    return y_ND;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto x_ND = saved[0], gate_up_EDH = saved[1], down_EFD = saved[2], h_NH = saved[3];
    auto ends_E = saved[4];
    auto dy_ND = grads[0].contiguous();
    const int64_t F = down_EFD.size(1);
    auto gate_NF = h_NH.narrow(1, 0, F);
    auto up_NF = h_NH.narrow(1, F, F);
    auto silu_NF = torch::silu(gate_NF);
    auto dact_NF = at::_grouped_mm(dy_ND, down_EFD.transpose(1, 2), ends_E);
    auto dh_NH = torch::empty({dy_ND.size(0), 2 * F}, dy_ND.options());
    auto dgate_NF = dh_NH.narrow(1, 0, F);
    auto dup_NF = dh_NH.narrow(1, F, F);
    torch::mul_out(dup_NF, dact_NF, silu_NF);  // dup = dact * silu(gate)
    auto act_NF = silu_NF.mul_(up_NF);         // act = silu(gate) * up, as in forward
    auto ddown = at::_grouped_mm(act_NF.t(), dy_ND, ends_E);
    torch::silu_backward_out(dgate_NF, dact_NF.mul_(up_NF), gate_NF);  // dgate = silu'(g) dact up
    auto dx_ND = at::_grouped_mm(dh_NH, gate_up_EDH.transpose(1, 2), ends_E);
    auto dgate_up = at::_grouped_mm(x_ND.t(), dh_NH, ends_E);
    return {dx_ND, dgate_up, ddown, torch::Tensor()};
  }
};
#endif

}  // namespace

void GroupedExpertsOptions::validate() const {
  TORCH_CHECK(num_experts() > 0, "num_experts (", num_experts(), ") must be > 0");
  TORCH_CHECK(dim() > 0, "expert dim (", dim(), ") must be > 0");
  TORCH_CHECK(hidden() > 0, "expert_hidden (", hidden(), ") must be > 0");
  TORCH_CHECK(init_std() > 0, "expert init_std (", init_std(), ") must be > 0");
}

GroupedExpertsImpl::GroupedExpertsImpl(GroupedExpertsOptions options_)
    : options(std::move(options_)) {
  reset();
}

void GroupedExpertsImpl::reset() {
  options.validate();
  const int64_t E = options.num_experts(), D = options.dim(), F = options.hidden();
  gate_up = register_parameter("gate_up", torch::empty({E, D, 2 * F}));
  down = register_parameter("down", torch::empty({E, F, D}));
  reset_parameters();
}

void GroupedExpertsImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  gate_up.normal_(0.0, options.init_std());
  down.normal_(0.0, options.init_std());
}

void GroupedExpertsImpl::pretty_print(std::ostream& stream) const {
  stream << "gbmoe::GroupedExperts(num_experts=" << options.num_experts()
         << ", dim=" << options.dim() << ", hidden=" << options.hidden() << ")";
}

torch::Tensor GroupedExpertsImpl::forward(const torch::Tensor& tokens,
                                          const torch::Tensor& group_sizes) {
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(1) == options.dim(), "expert input must be (N, ",
              options.dim(), "), got ", tokens.sizes());
  auto offsets = group_offsets(group_sizes, options.num_experts(), tokens.size(0));
  auto w1 = gate_up.to(tokens.scalar_type());
  auto w2 = down.to(tokens.scalar_type());
#ifdef GBMOE_HAS_GROUPED_MM
  if (use_grouped_gemm(tokens)) {
    auto ends = torch::tensor(std::vector<int64_t>(offsets.begin() + 1, offsets.end()))
                    .to(tokens.device(), torch::kInt);
    return GroupedMmSwiGLUFunction::apply(tokens.contiguous(), w1, w2, ends);
  }
#endif
  return grouped_swiglu_loop(tokens.contiguous(), w1, w2, std::move(offsets),
                             options.parallel_experts() && tokens.is_cpu());
}

bool grouped_gemm_available() {
#ifdef GBMOE_HAS_GROUPED_MM
  return true;
#else
  return false;
#endif
}

std::string to_string(ExpertGemm g) {
  switch (g) {
    case ExpertGemm::Auto:
      return "auto";
    case ExpertGemm::Loop:
      return "loop";
    case ExpertGemm::Grouped:
      return "grouped";
  }
  return "?";
}

bool GroupedExpertsImpl::use_grouped_gemm(const torch::Tensor& tokens) const {
  switch (options.gemm()) {
    case ExpertGemm::Loop:
      return false;
    case ExpertGemm::Grouped:
      TORCH_CHECK(grouped_gemm_available(),
                  "experts gemm (grouped) needs LibTorch >= 2.9, this is ", TORCH_VERSION,
                  "; use gemm auto or loop");
      return true;
    case ExpertGemm::Auto:
      break;
  }
  // The grouped kernels want 16-byte aligned rows: D and F multiples of 8 in bf16.
  return grouped_gemm_available() && tokens.is_cuda() && kernel_mode() == KernelMode::Fused &&
         tokens.scalar_type() == torch::kBFloat16 && options.dim() % 8 == 0 &&
         options.hidden() % 8 == 0;
}

void GroupedExpertsImpl::keep_experts(int64_t first, int64_t count) {
  TORCH_CHECK(first >= 0 && count > 0 && first + count <= options.num_experts(), "keep_experts(",
              first, ", ", count, ") out of range for ", options.num_experts(), " experts");
  torch::NoGradGuard no_grad;
  auto gu = gate_up.narrow(0, first, count).clone();
  auto dn = down.narrow(0, first, count).clone();
  options.num_experts(count);
  gate_up = parameters_["gate_up"] = gu.requires_grad_(true);
  down = parameters_["down"] = dn.requires_grad_(true);
}

torch::Tensor grouped_swiglu_reference(const torch::Tensor& tokens,
                                       const torch::Tensor& group_sizes,
                                       const torch::Tensor& gate_up, const torch::Tensor& down) {
  const int64_t E = gate_up.size(0), F = down.size(1);
  auto offsets = group_offsets(group_sizes, E, tokens.size(0));
  std::vector<torch::Tensor> outs;
  for (int64_t e = 0; e < E; ++e) {
    auto x = tokens.narrow(0, offsets[e], offsets[e + 1] - offsets[e]);
    auto h = x.mm(gate_up[e]);
    auto act = torch::silu(h.narrow(1, 0, F)) * h.narrow(1, F, F);
    outs.push_back(act.mm(down[e]));
  }
  return torch::cat(outs, 0);
}

SwiGLUImpl::SwiGLUImpl(SwiGLUOptions options_) : options(std::move(options_)) { reset(); }

void SwiGLUImpl::reset() {
  TORCH_CHECK(options.dim() > 0 && options.hidden() > 0, "SwiGLU dim (", options.dim(),
              ") and hidden (", options.hidden(), ") must be > 0");
  gate_up = register_parameter("gate_up", torch::empty({options.dim(), 2 * options.hidden()}));
  down = register_parameter("down", torch::empty({options.hidden(), options.dim()}));
  reset_parameters();
}

void SwiGLUImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  gate_up.normal_(0.0, options.init_std());
  down.normal_(0.0, options.init_std());
}

void SwiGLUImpl::pretty_print(std::ostream& stream) const {
  stream << "gbmoe::SwiGLU(dim=" << options.dim() << ", hidden=" << options.hidden() << ")";
}

torch::Tensor SwiGLUImpl::forward(const torch::Tensor& x) {
  const int64_t F = options.hidden();
  auto h = torch::matmul(x, gate_up.to(x.scalar_type()));
  auto act = torch::silu(h.narrow(-1, 0, F)) * h.narrow(-1, F, F);
  return torch::matmul(act, down.to(x.scalar_type()));
}

}  // namespace gbmoe
