// Router: the bias-free fp32 gate of a MoE layer, top-k expert selection and its statistics.
// Letters: T tokens, D model dim, E experts, K top-k.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

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

/// Router replay (RL fine-tuning needs training forwards to pick the experts the rollout picked).
/// Record: every forward keeps its expert ids (T, K), in order. Replay: each forward takes the
/// next of a given list instead of its own top-k; weights are the forward's own gates gathered
/// at the replayed ids (renormalized as usual), so the router still gets its gradient through
/// the scores of the replayed choices. While either mode is on, routing runs the reference ops
/// (route_logits_reference / route_logits_given), so a replayed forward equals the recorded one
/// bit for bit on every device. Recomputed forwards (activation checkpointing, RecomputeGuard)
/// neither record nor advance: they reuse the ids of the last forward that did, which is the
/// forward they recompute when each micro-batch's backward follows its forward. Ids are global
/// expert ids, so replay holds under expert parallelism (routers stay whole).
enum class RoutingReplayMode { Off, Record, Replay };

struct RoutedScores;

/// Bias-free linear gate (E, D) evaluated in fp32 (fp64 for fp64 input), then top-k selection.
/// The buffer expert_bias (E) is added to the scores for selection only (loss-free balancing);
/// it never changes the combine weights or the balancing loss.
///
/// Example:
///   Router router(RouterOptions(256, 8).top_k(2));
///   RoutingResult r = router->forward(x_TD);          // all tokens valid
///   RoutingResult m = router->forward(x_TD, mask_T);  // padding excluded from statistics
///
///   router->record_routing();                         // rollout
///   router->forward(x_TD);
///   router->replay_routing(router->recorded_routing());  // training: same experts
///   router->forward(x_TD);
///   router->stop_routing_replay();
class RouterImpl : public torch::nn::Cloneable<RouterImpl> {
 public:
  explicit RouterImpl(RouterOptions options);

  void reset() override;
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  /// x: (T, D) in any floating dtype; mask: (T,) bool or undefined (every token valid).
  RoutingResult forward(const torch::Tensor& x, const torch::Tensor& mask = {});

  /// Starts recording: clears the recorded list; every later forward appends its ids.
  void record_routing();
  /// Starts replaying expert_ids (each (T, K) int64 of the forward it is for), in order; a
  /// forward past the end of the list, or whose T or K differ, throws naming both shapes.
  void replay_routing(std::vector<torch::Tensor> expert_ids);
  /// Back to the router's own top-k; the recorded list stays readable.
  void stop_routing_replay();
  RoutingReplayMode replay_mode() const { return replay_mode_; }
  /// The ids recorded since record_routing(), one (T, K) int64 per forward.
  const std::vector<torch::Tensor>& recorded_routing() const { return recorded_; }
  /// Forwards replayed since replay_routing().
  size_t replayed_forwards() const { return replay_next_; }

  RouterOptions options;
  torch::Tensor weight;       // (E, D) gate
  torch::Tensor expert_bias;  // (E,) fp32 selection bias, a buffer

 private:
  // Routing of a forward in Record or Replay mode (see RoutingReplayMode).
  RoutedScores replayed(const torch::Tensor& logits_TE, const torch::Tensor& valid_T);

  RoutingReplayMode replay_mode_ = RoutingReplayMode::Off;
  std::vector<torch::Tensor> recorded_;  // Record: the ids of each forward
  std::vector<torch::Tensor> replay_;    // Replay: the ids to use, in order
  size_t replay_next_ = 0;
  torch::Tensor last_ids_;  // ids of the last recording / replaying forward (for recomputation)
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

/// As route_logits_reference, with the expert ids given instead of selected: scores from the
/// logits, weights = gates gathered at expert_ids (T, K) (renormalized when asked and K > 1),
/// counts of the given ids. What a replaying Router runs.
///
/// Example:
///   auto s = route_logits_given(logits_TE, recorded_ids_TK, valid_T, ScoreFunction::Softmax,
///   true);
RoutedScores route_logits_given(const torch::Tensor& logits_TE, const torch::Tensor& expert_ids_TK,
                                const torch::Tensor& valid_T, ScoreFunction score_function,
                                bool renormalize);

/// Selection counts (E,) int64 of the valid tokens' top-k ids.
torch::Tensor count_selections(const torch::Tensor& expert_ids, const torch::Tensor& valid,
                               int64_t num_experts);

}  // namespace gbmoe
