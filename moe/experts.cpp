// Grouped SwiGLU experts: per-expert matrix multiplies over contiguous row blocks, with a
// custom autograd function so the graph holds one node for all experts.
#include "moe/experts.h"

#include <torch/version.h>

#include <vector>

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

// The row blocks of the experts: host offsets for the per-expert loop, and the block ends on
// the device when the grouped GEMM runs.
struct ExpertBlocks {
  std::vector<int64_t> offsets;  // (E + 1): block e is rows [offsets[e], offsets[e + 1])
  torch::Tensor ends;            // (E,) int32 on the rows' device; undefined = per-expert loop
};

// out_e = a_e b[e] for each block e of rows: (N, K) x (E, K, M) -> (N, M).
torch::Tensor blocks_mm(const torch::Tensor& a_NK, const torch::Tensor& b_EKM,
                        const ExpertBlocks& blocks) {
#ifdef GBMOE_HAS_GROUPED_MM
  if (blocks.ends.defined()) return at::_grouped_mm(a_NK, b_EKM, blocks.ends);
#endif
  const auto& o = blocks.offsets;
  auto out = torch::empty({a_NK.size(0), b_EKM.size(2)}, a_NK.options());
  for (int64_t e = 0; e < b_EKM.size(0); ++e) {
    const int64_t n = o[e + 1] - o[e];
    if (n == 0) continue;
    auto rows = out.narrow(0, o[e], n);
    torch::mm_out(rows, a_NK.narrow(0, o[e], n), b_EKM[e]);
  }
  return out;
}

// Per-expert weight gradients out[e] = a_e^T c_e: (N, K), (N, M) -> (E, K, M); an expert
// without rows gets an exact zero.
torch::Tensor blocks_weight_grad(const torch::Tensor& a_NK, const torch::Tensor& c_NM,
                                 const ExpertBlocks& blocks) {
#ifdef GBMOE_HAS_GROUPED_MM
  if (blocks.ends.defined()) return at::_grouped_mm(a_NK.t(), c_NM, blocks.ends);
#endif
  const auto& o = blocks.offsets;
  const int64_t E = static_cast<int64_t>(o.size()) - 1;
  auto out = torch::empty({E, a_NK.size(1), c_NM.size(1)}, a_NK.options());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = o[e + 1] - o[e];
    auto out_e = out[e];
    if (n == 0) {
      out_e.zero_();
      continue;
    }
    torch::mm_out(out_e, a_NK.narrow(0, o[e], n).t(), c_NM.narrow(0, o[e], n));
  }
  return out;
}

// y_e = silu(x_e Wg_e) * (x_e Wu_e) Wd_e for each contiguous block e of rows.
class GroupedSwiGLUFunction : public torch::autograd::Function<GroupedSwiGLUFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x_ND,
                               const torch::Tensor& gate_up_EDH, const torch::Tensor& down_EFD,
                               ExpertBlocks blocks) {
    const int64_t F = down_EFD.size(1);
    auto h_NH = blocks_mm(x_ND, gate_up_EDH, blocks);
    auto act_NF = torch::silu(h_NH.narrow(1, 0, F)).mul_(h_NH.narrow(1, F, F));
    auto y_ND = blocks_mm(act_NF, down_EFD, blocks);
    ctx->save_for_backward({x_ND, gate_up_EDH, down_EFD, h_NH});
    ctx->saved_data["offsets"] = c10::List<int64_t>(blocks.offsets);
    if (blocks.ends.defined()) ctx->saved_data["ends"] = blocks.ends;
    return y_ND;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto x_ND = saved[0], gate_up_EDH = saved[1], down_EFD = saved[2], h_NH = saved[3];
    ExpertBlocks blocks;
    blocks.offsets = ctx->saved_data["offsets"].toIntVector();
    if (ctx->saved_data.count("ends")) blocks.ends = ctx->saved_data["ends"].toTensor();
    auto dy_ND = grads[0].contiguous();
    const int64_t F = down_EFD.size(1);

    auto gate_NF = h_NH.narrow(1, 0, F);
    auto up_NF = h_NH.narrow(1, F, F);
    // Large fresh buffers cost page faults on the CPU: reuse them in place where the order allows.
    auto silu_NF = torch::silu(gate_NF);
    auto dact_NF = blocks_mm(dy_ND, down_EFD.transpose(1, 2), blocks);
    auto dh_NH = torch::empty({dy_ND.size(0), 2 * F}, dy_ND.options());
    auto dgate_NF = dh_NH.narrow(1, 0, F);
    auto dup_NF = dh_NH.narrow(1, F, F);
    torch::mul_out(dup_NF, dact_NF, silu_NF);  // dup = dact * silu(gate)
    auto act_NF = silu_NF.mul_(up_NF);         // act = silu(gate) * up, as in forward
    auto ddown = blocks_weight_grad(act_NF, dy_ND, blocks);
    torch::silu_backward_out(dgate_NF, dact_NF.mul_(up_NF), gate_NF);  // dgate = silu'(g) dact up

    auto dx_ND = blocks_mm(dh_NH, gate_up_EDH.transpose(1, 2), blocks);
    auto dgate_up = blocks_weight_grad(x_ND, dh_NH, blocks);
    return {dx_ND, dgate_up, ddown, torch::Tensor()};
  }
};

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
  ExpertBlocks blocks;
  blocks.offsets = group_offsets(group_sizes, options.num_experts(), tokens.size(0));
  if (use_grouped_gemm(tokens)) {
    blocks.ends =
        torch::tensor(std::vector<int64_t>(blocks.offsets.begin() + 1, blocks.offsets.end()))
            .to(tokens.device(), torch::kInt);
  }
  auto w1 = gate_up.to(tokens.scalar_type());
  auto w2 = down.to(tokens.scalar_type());
  return GroupedSwiGLUFunction::apply(tokens.contiguous(), w1, w2, std::move(blocks));
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
