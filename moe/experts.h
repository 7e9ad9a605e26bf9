// Grouped SwiGLU experts with stacked weights, evaluated over expert-sorted tokens, and the
// dense SwiGLU FFN used for shared experts. Letters: N rows, D dim, F expert hidden, E experts.
#pragma once

#include <torch/torch.h>

#include <string>

namespace gbmoe {

/// How the experts' matrix multiplies run. Loop: one GEMM per expert and block. Grouped: one
/// at::_grouped_mm per block for all experts (LibTorch >= 2.9). Auto: grouped for bf16 CUDA
/// tensors in KernelMode::Fused where LibTorch has it, the loop otherwise.
enum class ExpertGemm { Auto, Loop, Grouped };

std::string to_string(ExpertGemm g);

/// True when this LibTorch offers at::_grouped_mm.
bool grouped_gemm_available();

/// Example:
///   GroupedExperts experts(GroupedExpertsOptions(8, 512, 1024));
///   auto y_ND = experts->forward(tokens_ND, group_sizes_E);
struct GroupedExpertsOptions {
  GroupedExpertsOptions(int64_t num_experts, int64_t dim, int64_t hidden)
      : num_experts_(num_experts), dim_(dim), hidden_(hidden) {}
  TORCH_ARG(int64_t, num_experts);
  TORCH_ARG(int64_t, dim);
  /// Hidden size F of each expert.
  TORCH_ARG(int64_t, hidden);
  TORCH_ARG(double, init_std) = 0.02;
  TORCH_ARG(ExpertGemm, gemm) = ExpertGemm::Auto;
  /// On the CPU with several intra-op threads, run small experts' matrix multiplies
  /// concurrently (one thread each) instead of threading inside each multiply.
  TORCH_ARG(bool, parallel_experts) = true;

 public:
  void validate() const;
};

/// E SwiGLU experts y = (silu(x W_g) * (x W_u)) W_d with weights stacked along E.
/// forward takes the rows grouped by expert (expert-major) and the row count of each expert;
/// it runs one matrix multiply per expert and block, with a hand-written backward that keeps
/// the element-wise work vectorized over all rows.
class GroupedExpertsImpl : public torch::nn::Cloneable<GroupedExpertsImpl> {
 public:
  explicit GroupedExpertsImpl(GroupedExpertsOptions options);

  void reset() override;
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  /// tokens: (N, D); group_sizes: (E,) int64 (any device) summing to N. Returns (N, D).
  torch::Tensor forward(const torch::Tensor& tokens, const torch::Tensor& group_sizes);

  /// Whether forward runs the grouped GEMM for these tokens (see ExpertGemm).
  bool use_grouped_gemm(const torch::Tensor& tokens) const;

  /// Keeps only experts [first, first + count): used by expert parallelism.
  void keep_experts(int64_t first, int64_t count);

  GroupedExpertsOptions options;
  torch::Tensor gate_up;  // (E, D, 2F): gate columns [0, F), up columns [F, 2F)
  torch::Tensor down;     // (E, F, D)
  /// Ranks over which this module's experts are sharded; apply_expert_parallel sets it, and
  /// data parallelism, gradient clipping and checkpoints treat the parameters of modules with
  /// shards > 1 as expert shards.
  int64_t shards = 1;
};
TORCH_MODULE(GroupedExperts);

/// The same computation as GroupedExperts::forward written with plain autograd ops, one
/// expert at a time: the reference the fast path is tested against.
torch::Tensor grouped_swiglu_reference(const torch::Tensor& tokens,
                                       const torch::Tensor& group_sizes,
                                       const torch::Tensor& gate_up, const torch::Tensor& down);

/// Dense SwiGLU feed-forward network: the always-on shared experts of a MoE layer (their
/// hidden sizes concatenated) and the dense blocks of a model.
struct SwiGLUOptions {
  SwiGLUOptions(int64_t dim, int64_t hidden) : dim_(dim), hidden_(hidden) {}
  TORCH_ARG(int64_t, dim);
  TORCH_ARG(int64_t, hidden);
  TORCH_ARG(double, init_std) = 0.02;
};

/// Example:
///   SwiGLU ffn(SwiGLUOptions(512, 2048));
///   auto y = ffn->forward(x);  // (..., 512)
class SwiGLUImpl : public torch::nn::Cloneable<SwiGLUImpl> {
 public:
  explicit SwiGLUImpl(SwiGLUOptions options);
  void reset() override;
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const torch::Tensor& x);

  SwiGLUOptions options;
  torch::Tensor gate_up;  // (D, 2F)
  torch::Tensor down;     // (F, D)
};
TORCH_MODULE(SwiGLU);

}  // namespace gbmoe
