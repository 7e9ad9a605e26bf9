// The per-expert loop of GroupedExperts: one matrix multiply per expert and block, with the
// SwiGLU element-wise steps as fused fp32 CPU passes (moe/swiglu_cpu.h) right after each
// multiply and small experts run concurrently on the CPU. Checked against
// grouped_swiglu_reference (moe/experts.h) in tests/moe/experts_test.cpp.
// Letters: N rows, D dim, F expert hidden, H = 2F, E experts.
#pragma once

#include <torch/torch.h>

#include <vector>

namespace gbmoe {

/// y_e = silu(x_e Wg_e) * (x_e Wu_e) Wd_e for each contiguous block e of rows [offsets[e],
/// offsets[e + 1]), as one autograd node with a hand-written backward. parallel: run small
/// experts concurrently, one thread each (CPU).
///
/// Example:
///   auto y_ND = grouped_swiglu_loop(x_ND, gate_up_EDH, down_EFD, {0, 3, 3, 7}, true);
torch::Tensor grouped_swiglu_loop(const torch::Tensor& x_ND, const torch::Tensor& gate_up_EDH,
                                  const torch::Tensor& down_EFD, std::vector<int64_t> offsets,
                                  bool parallel);

}  // namespace gbmoe
