// The SwiGLU element-wise work of the grouped experts for fp32 rows on the CPU, each direction in
// one vectorized pass (LibTorch's ops take two passes forward and five backward). Raw pointers,
// no LibTorch: experts.cpp slices the tensors, splits the rows over threads and keeps the
// LibTorch ops as the reference these are tested against (tests/moe/swiglu_cpu_test.cpp).
// Letters: F expert hidden dim. A row of h holds [gate | up], 2F entries; ld_* are row strides.
// Outputs must not overlap inputs (the loops read through restrict pointers).
#pragma once

#include <cstdint>
#include <string>

namespace gbmoe {
namespace detail {

/// act = silu(gate) * up, row by row.
///
/// Example (rows of a (n, 2F) tensor h into a (n, F) tensor act, both contiguous):
///   swiglu_forward_rows(h.data_ptr<float>(), 2 * F, act.data_ptr<float>(), F, n, F);
void swiglu_forward_rows(const float* h, int64_t ld_h, float* act, int64_t ld_act, int64_t rows,
                         int64_t F);

/// From dact = dL/d(act): dgate = dact * up * silu'(gate) and dup = dact * silu(gate) into the
/// rows of dh ([dgate | dup]), and act = silu(gate) * up again (the down weight's gradient
/// needs it), all in one pass. silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g).
void swiglu_backward_rows(const float* h, int64_t ld_h, const float* dact, int64_t ld_dact,
                          float* dh, int64_t ld_dh, float* act, int64_t ld_act, int64_t rows,
                          int64_t F);

/// The instruction-set variant these run: "avx512", "avx2" or "baseline", at first the best one
/// this CPU supports.
const char* swiglu_cpu_variant();

/// Switches to the named variant (tests and benchmarks compare them); false, and no change, when
/// the name is unknown or this CPU lacks its instructions.
bool set_swiglu_cpu_variant(const std::string& name);

}  // namespace detail
}  // namespace gbmoe
