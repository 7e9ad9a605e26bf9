// Router: the bias-free fp32 gate of a MoE layer, top-k expert selection and its statistics.
// Letters: T tokens, D model dim, E experts, K top-k.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>

namespace gbmoe {

/// How router logits become expert scores.
/// Softmax: s = softmax(z). Sigmoid: g = sigmoid(z) selects and weights, s = g / sum(g) feeds
/// the balancing loss (the normalized sigmoid of DeepSeek-V3).
enum class ScoreFunction { Softmax, Sigmoid };

std::string to_string(ScoreFunction f);
ScoreFunction score_function_from_string(const std::string& name);

/// Options of a Router. dim and num_experts are required; MoELayer fills them from its own.
///
/// Example:
///   Router router(RouterOptions(512, 64).top_k(4));
struct RouterOptions {
  RouterOptions(int64_t dim = 0, int64_t num_experts = 0) : dim_(dim), num_experts_(num_experts) {}
  /// Model dimension D of the tokens routed.
  TORCH_ARG(int64_t, dim);
  /// Number of experts E.
  TORCH_ARG(int64_t, num_experts);
  /// Experts selected per token, K.
  TORCH_ARG(int64_t, top_k) = 2;
  TORCH_ARG(ScoreFunction, score_function) = ScoreFunction::Softmax;
  /// Renormalize the K selected weights to sum to 1 (used when K > 1).
  TORCH_ARG(bool, renormalize) = true;
  /// Standard deviation of the gate's normal initialization.
  TORCH_ARG(double, init_std) = 0.02;

 public:
  /// Throws with the option's name and value when an option is out of range.
  void validate() const;
};

/// Everything the rest of the layer needs to know about one routing decision.
struct RoutingResult {
  torch::Tensor logits;      // (T, E) fp32 (fp64 for fp64 input) router logits z
  torch::Tensor scores;      // (T, E) scores s (softmax or normalized sigmoid), dtype of logits
  torch::Tensor expert_ids;  // (T, K) int64 selected experts S_t
  torch::Tensor weights;     // (T, K) fp32 combine weights of the selected experts
  torch::Tensor valid;       // (T,) bool: tokens that take part in routing statistics and losses
  torch::Tensor counts;      // (E,) int64 selections c_i by valid tokens, no gradient
  int64_t num_valid = 0;     // n: number of valid tokens
  int64_t top_k = 0;         // K
};

/// Bias-free linear gate (E, D) evaluated in fp32 (fp64 for fp64 input), then top-k selection.
/// The buffer expert_bias (E) is added to the scores for selection only (loss-free balancing);
/// it never changes the combine weights or the balancing loss.
///
/// Example:
///   Router router(RouterOptions(256, 8).top_k(2));
///   RoutingResult r = router->forward(x_TD);          // all tokens valid
///   RoutingResult m = router->forward(x_TD, mask_T);  // padding excluded from statistics
class RouterImpl : public torch::nn::Cloneable<RouterImpl> {
 public:
  explicit RouterImpl(RouterOptions options);

  void reset() override;
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  /// x: (T, D) in any floating dtype; mask: (T,) bool or undefined (every token valid).
  RoutingResult forward(const torch::Tensor& x, const torch::Tensor& mask = {});

  RouterOptions options;
  torch::Tensor weight;       // (E, D) gate
  torch::Tensor expert_bias;  // (E,) fp32 selection bias, a buffer
};
TORCH_MODULE(Router);

/// What routing derives from the gate logits.
struct RoutedScores {
  torch::Tensor scores;      // (T, E) dtype of the logits, differentiable
  torch::Tensor expert_ids;  // (T, K) int64
  torch::Tensor weights;     // (T, K) dtype of the logits, differentiable
  torch::Tensor counts;      // (E,) int64 selections by valid tokens
};

/// Scores, top-k of (gates + bias), weights (renormalized when asked and K > 1) and counts from
/// logits (T, E) with plain LibTorch ops: what Router::forward runs without a fused kernel, and
/// the reference the fused router kernel is tested against.
///
/// Example:
///   auto s = route_logits_reference(logits_TE, bias_E, valid_T, 2, ScoreFunction::Softmax, true);
RoutedScores route_logits_reference(const torch::Tensor& logits_TE, const torch::Tensor& bias_E,
                                    const torch::Tensor& valid_T, int64_t top_k,
                                    ScoreFunction score_function, bool renormalize);

/// Selection counts (E,) int64 of the valid tokens' top-k ids.
torch::Tensor count_selections(const torch::Tensor& expert_ids, const torch::Tensor& valid,
                               int64_t num_experts);

}  // namespace gbmoe
