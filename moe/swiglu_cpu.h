// The SwiGLU element-wise work of the grouped experts for fp32 rows on the CPU, each direction in
// one vectorized pass (LibTorch's ops take two passes forward and five backward); beside it, for
// the same exp and instruction-set variants, the softmax rows of the model's attention and
// cross-entropy (train/attention_cpu.h, train/model_kernels_cpu.h, tested there). Raw pointers,
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

/// The causal softmax of attention scores, in place: rows first_row .. first_row + rows - 1 of a
/// (S, S) block with row stride ld, where row i holds raw scores in columns 0 .. i. Afterwards
/// row i holds exp(scale (x_j - max)) / sum for j <= i and 0 for i < j < S (scale > 0). A NaN
/// score makes its row NaN. The attention of train/attention_cpu.h uses it: it shares this
/// file's exp and instruction-set variants.
void causal_softmax_rows(float* P, int64_t ld, int64_t first_row, int64_t rows, int64_t S,
                         float scale);

/// Its backward, in place: dS holds dP = dL/dP (rows as above, columns 0 .. i), P the softmax's
/// output; afterwards row i of dS holds scale P_j (dP_j - sum_k P_k dP_k) for j <= i (the gradient
/// of the raw scores) and 0 for i < j < S.
void causal_softmax_backward_rows(const float* P, float* dS, int64_t ld, int64_t first_row,
                                  int64_t rows, int64_t S, float scale);

/// The exponentials of a softmax, row by row: for each of rows rows of V entries (row stride ld_x),
/// e = exp(x - max) into e (row stride ld_e), and the row's max and sum of e into max_out[i],
/// sum_out[i]. A NaN entry makes e and the sum NaN. The fused cross-entropy of
/// train/model_kernels_cpu.h uses it.
void softmax_exp_rows(const float* x, int64_t ld_x, float* e, int64_t ld_e, int64_t rows, int64_t V,
                      float* max_out, float* sum_out);

/// The instruction-set variant these run: "avx512", "avx2" or "baseline", at first the best one
/// this CPU supports.
const char* swiglu_cpu_variant();

/// Switches to the named variant (tests and benchmarks compare them); false, and no change, when
/// the name is unknown or this CPU lacks its instructions.
bool set_swiglu_cpu_variant(const std::string& name);

}  // namespace detail
}  // namespace gbmoe
