// The per-expert loop of GroupedExperts with its CPU fast paths: the thread scheduler over
// experts and the fused SwiGLU passes, beside LibTorch's ops as the reference mode.
#include "moe/experts_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

#include "moe/kernels.h"
#include "moe/swiglu_cpu.h"

namespace gbmoe {
namespace {

// Runs fn(e) once for every expert that has rows. With parallel set and more than one intra-op
// thread, experts holding at least a thread's share of the rows run one after another (their
// matrix multiplies use every thread), and the smaller ones run concurrently, each multiply
// single-threaded: small per-expert multiplies gain more from this than from threading inside
// each of them. Threads take the next expert as they finish, largest first, so uneven experts
// or a busy core do not leave one thread waiting on the other.
template <typename Fn>
void for_each_expert(const std::vector<int64_t>& offsets, bool parallel, const Fn& fn) {
  const int64_t E = static_cast<int64_t>(offsets.size()) - 1, N = offsets[E];
  const int64_t threads = parallel && !at::in_parallel_region() ? at::get_num_threads() : 1;
  auto rows = [&](int64_t e) { return offsets[e + 1] - offsets[e]; };
  std::vector<int64_t> small;
  for (int64_t e = 0; e < E; ++e) {
    if (rows(e) == 0) continue;
    if (threads == 1 || rows(e) * threads >= N) {
      fn(e);
    } else {
      small.push_back(e);
    }
  }
  std::stable_sort(small.begin(), small.end(),
                   [&](int64_t a, int64_t b) { return rows(a) > rows(b); });
  std::atomic<size_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    torch::NoGradGuard no_grad;  // grad mode is thread-local: the workers start with it on
    for (size_t i = next++; i < small.size(); i = next++) fn(small[i]);
  });
}

// The SwiGLU element-wise steps run as the fused fp32 passes of moe/swiglu_cpu.h on the CPU in
// the fused kernel mode, else as LibTorch's ops, which stay the reference. Rows are split over
// the intra-op threads unless the caller already runs in a parallel region (then inline).
bool use_fused_swiglu(const torch::Tensor& h_nH) {
  return h_nH.is_cpu() && h_nH.scalar_type() == torch::kFloat && kernel_mode() == KernelMode::Fused;
}

int64_t rows_per_task(int64_t F) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)); }

// act_nF = silu(gate) * up for the rows of h_nH = [gate | up].
void swiglu_forward(const torch::Tensor& h_nH, torch::Tensor& act_nF) {
  const int64_t F = act_nF.size(1);
  if (!use_fused_swiglu(h_nH)) {
    torch::silu_out(act_nF, h_nH.narrow(1, 0, F)).mul_(h_nH.narrow(1, F, F));
    return;
  }
  const float* h = h_nH.data_ptr<float>();
  float* act = act_nF.data_ptr<float>();
  const int64_t ld_h = h_nH.stride(0), ld_act = act_nF.stride(0);
  at::parallel_for(0, h_nH.size(0), rows_per_task(F), [&](int64_t begin, int64_t end) {
    detail::swiglu_forward_rows(h + begin * ld_h, ld_h, act + begin * ld_act, ld_act, end - begin,
                                F);
  });
}

// dh_nH = [dgate | dup] = [dact * up * silu'(gate) | dact * silu(gate)] and act_nF = silu(gate) *
// up, as in forward: four separate buffers. dact_nF may be overwritten.
void swiglu_backward(const torch::Tensor& h_nH, torch::Tensor& dact_nF, torch::Tensor& dh_nH,
                     torch::Tensor& act_nF) {
  const int64_t F = act_nF.size(1);
  if (!use_fused_swiglu(h_nH)) {
    auto gate = h_nH.narrow(1, 0, F), up = h_nH.narrow(1, F, F);
    auto dgate = dh_nH.narrow(1, 0, F), dup = dh_nH.narrow(1, F, F);
    torch::silu_out(act_nF, gate);
    torch::mul_out(dup, dact_nF, act_nF);
    act_nF.mul_(up);
    torch::silu_backward_out(dgate, dact_nF.mul_(up), gate);
    return;
  }
  TORCH_CHECK(dh_nH.data_ptr() != h_nH.data_ptr() && act_nF.data_ptr() != dact_nF.data_ptr(),
              "swiglu_backward needs outputs apart from its inputs");
  const float* h = h_nH.data_ptr<float>();
  const float* dact = dact_nF.data_ptr<float>();
  float* dh = dh_nH.data_ptr<float>();
  float* act = act_nF.data_ptr<float>();
  const int64_t ld_h = h_nH.stride(0), ld_dact = dact_nF.stride(0), ld_dh = dh_nH.stride(0),
                ld_act = act_nF.stride(0);
  at::parallel_for(0, h_nH.size(0), rows_per_task(F), [&](int64_t begin, int64_t end) {
    detail::swiglu_backward_rows(h + begin * ld_h, ld_h, dact + begin * ld_dact, ld_dact,
                                 dh + begin * ld_dh, ld_dh, act + begin * ld_act, ld_act,
                                 end - begin, F);
  });
}

// y_e = silu(x_e Wg_e) * (x_e Wu_e) Wd_e for each contiguous block e of rows. Each expert's
// element-wise work runs right after its multiply, on rows still in cache.
class GroupedSwiGLUFunction : public torch::autograd::Function<GroupedSwiGLUFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x_ND,
                               const torch::Tensor& gate_up_EDH, const torch::Tensor& down_EFD,
                               std::vector<int64_t> offsets, bool parallel) {
    const int64_t N = x_ND.size(0), D = x_ND.size(1), F = down_EFD.size(1);
    auto h_NH = torch::empty({N, 2 * F}, x_ND.options());
    auto act_NF = torch::empty({N, F}, x_ND.options());
    auto y_ND = torch::empty({N, D}, x_ND.options());
    for_each_expert(offsets, parallel, [&](int64_t e) {
      const int64_t o = offsets[e], n = offsets[e + 1] - o;
      auto h = h_NH.narrow(0, o, n);
      auto act = act_NF.narrow(0, o, n);
      auto y = y_ND.narrow(0, o, n);
      torch::mm_out(h, x_ND.narrow(0, o, n), gate_up_EDH[e]);
      swiglu_forward(h, act);
      torch::mm_out(y, act, down_EFD[e]);
    });
    ctx->save_for_backward({x_ND, gate_up_EDH, down_EFD, h_NH});
    ctx->saved_data["offsets"] = c10::List<int64_t>(offsets);
    ctx->saved_data["parallel"] = parallel;
    return y_ND;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto x_ND = saved[0], gate_up_EDH = saved[1], down_EFD = saved[2], h_NH = saved[3];
    auto offsets = ctx->saved_data["offsets"].toIntVector();
    const bool parallel = ctx->saved_data["parallel"].toBool();
    auto dy_ND = grads[0].contiguous();
    const int64_t E = gate_up_EDH.size(0), F = down_EFD.size(1);
    const int64_t N = x_ND.size(0);

    // Large fresh buffers cost page faults on the CPU: one of each, sliced per expert.
    auto act_NF = torch::empty({N, F}, dy_ND.options());
    auto dact_NF = torch::empty({N, F}, dy_ND.options());
    auto dh_NH = torch::empty({N, 2 * F}, dy_ND.options());
    auto dx_ND = torch::empty_like(x_ND);
    auto dgate_up = torch::empty_like(gate_up_EDH);
    auto ddown = torch::empty_like(down_EFD);
    for (int64_t e = 0; e < E; ++e) {
      if (offsets[e + 1] > offsets[e]) continue;
      dgate_up[e].zero_();  // an expert without rows gets an exact zero gradient
      ddown[e].zero_();
    }
    for_each_expert(offsets, parallel, [&](int64_t e) {
      const int64_t o = offsets[e], n = offsets[e + 1] - o;
      auto x = x_ND.narrow(0, o, n), dy = dy_ND.narrow(0, o, n);
      auto dh = dh_NH.narrow(0, o, n);
      auto dact = dact_NF.narrow(0, o, n), act = act_NF.narrow(0, o, n);
      auto dx = dx_ND.narrow(0, o, n);
      torch::mm_out(dact, dy, down_EFD[e].t());
      swiglu_backward(h_NH.narrow(0, o, n), dact, dh, act);
      auto ddown_e = ddown[e];
      torch::mm_out(ddown_e, act.t(), dy);
      auto dgate_up_e = dgate_up[e];
      torch::mm_out(dx, dh, gate_up_EDH[e].t());
      torch::mm_out(dgate_up_e, x.t(), dh);
    });
    return {dx_ND, dgate_up, ddown, torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor grouped_swiglu_loop(const torch::Tensor& x_ND, const torch::Tensor& gate_up_EDH,
                                  const torch::Tensor& down_EFD, std::vector<int64_t> offsets,
                                  bool parallel) {
  return GroupedSwiGLUFunction::apply(x_ND, gate_up_EDH, down_EFD, std::move(offsets), parallel);
}

}  // namespace gbmoe
