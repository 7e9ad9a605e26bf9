// Grouped SwiGLU experts: per-expert matrix multiplies over contiguous row blocks, with a
// custom autograd function so the graph holds one node for all experts.
#include "moe/experts.h"

#include <vector>

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

// y_e = silu(x_e Wg_e) * (x_e Wu_e) Wd_e for each contiguous block e of rows.
class GroupedSwiGLUFunction : public torch::autograd::Function<GroupedSwiGLUFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x_ND,
                               const torch::Tensor& gate_up_EDH, const torch::Tensor& down_EFD,
                               std::vector<int64_t> offsets) {
    const int64_t N = x_ND.size(0), D = x_ND.size(1), F = down_EFD.size(1);
    const int64_t E = gate_up_EDH.size(0);
    auto h_NH = torch::empty({N, 2 * F}, x_ND.options());
    for (int64_t e = 0; e < E; ++e) {
      if (offsets[e + 1] == offsets[e]) continue;
      auto rows = h_NH.narrow(0, offsets[e], offsets[e + 1] - offsets[e]);
      torch::mm_out(rows, x_ND.narrow(0, offsets[e], offsets[e + 1] - offsets[e]), gate_up_EDH[e]);
    }
    auto act_NF = torch::silu(h_NH.narrow(1, 0, F)).mul_(h_NH.narrow(1, F, F));
    auto y_ND = torch::empty({N, D}, x_ND.options());
    for (int64_t e = 0; e < E; ++e) {
      if (offsets[e + 1] == offsets[e]) continue;
      auto rows = y_ND.narrow(0, offsets[e], offsets[e + 1] - offsets[e]);
      torch::mm_out(rows, act_NF.narrow(0, offsets[e], offsets[e + 1] - offsets[e]), down_EFD[e]);
    }
    ctx->save_for_backward({x_ND, gate_up_EDH, down_EFD, h_NH});
    ctx->saved_data["offsets"] = c10::List<int64_t>(offsets);
    return y_ND;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto x_ND = saved[0], gate_up_EDH = saved[1], down_EFD = saved[2], h_NH = saved[3];
    auto offsets = ctx->saved_data["offsets"].toIntVector();
    auto dy_ND = grads[0].contiguous();
    const int64_t E = gate_up_EDH.size(0), F = down_EFD.size(1);
    const int64_t N = x_ND.size(0);

    auto gate_NF = h_NH.narrow(1, 0, F);
    auto up_NF = h_NH.narrow(1, F, F);
    // Large fresh buffers cost page faults on the CPU: reuse them in place where the order allows.
    auto silu_NF = torch::silu(gate_NF);
    auto dact_NF = torch::empty({N, F}, dy_ND.options());
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = offsets[e + 1] - offsets[e];
      if (n == 0) continue;
      auto dact = dact_NF.narrow(0, offsets[e], n);
      torch::mm_out(dact, dy_ND.narrow(0, offsets[e], n), down_EFD[e].t());
    }
    auto dh_NH = torch::empty({N, 2 * F}, dy_ND.options());
    auto dgate_NF = dh_NH.narrow(1, 0, F);
    auto dup_NF = dh_NH.narrow(1, F, F);
    torch::mul_out(dup_NF, dact_NF, silu_NF);  // dup = dact * silu(gate)
    auto act_NF = silu_NF.mul_(up_NF);         // act = silu(gate) * up, as in forward
    auto ddown = torch::empty_like(down_EFD);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = offsets[e + 1] - offsets[e];
      auto ddown_e = ddown[e];
      if (n == 0) {
        ddown_e.zero_();  // an expert without rows gets an exact zero gradient
        continue;
      }
      torch::mm_out(ddown_e, act_NF.narrow(0, offsets[e], n).t(), dy_ND.narrow(0, offsets[e], n));
    }
    torch::silu_backward_out(dgate_NF, dact_NF.mul_(up_NF), gate_NF);  // dgate = silu'(g) dact up

    auto dx_ND = torch::empty_like(x_ND);
    auto dgate_up = torch::empty_like(gate_up_EDH);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = offsets[e + 1] - offsets[e];
      if (n == 0) {
        dgate_up[e].zero_();
        continue;
      }
      auto dh = dh_NH.narrow(0, offsets[e], n);
      auto dx = dx_ND.narrow(0, offsets[e], n);
      auto dgate_up_e = dgate_up[e];
      torch::mm_out(dx, dh, gate_up_EDH[e].t());
      torch::mm_out(dgate_up_e, x_ND.narrow(0, offsets[e], n).t(), dh);
    }
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
  auto offsets = group_offsets(group_sizes, options.num_experts(), tokens.size(0));
  auto w1 = gate_up.to(tokens.scalar_type());
  auto w2 = down.to(tokens.scalar_type());
  return GroupedSwiGLUFunction::apply(tokens.contiguous(), w1, w2, std::move(offsets));
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
