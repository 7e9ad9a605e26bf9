// Router: fp32 gate, score function, top-k selection, counts over valid tokens.
#include "moe/router.h"

#include "moe/kernels.h"
#include "moe/recompute.h"
#include "moe/router_cpu.h"

namespace gbmoe {

std::string to_string(ScoreFunction f) {
  return f == ScoreFunction::Softmax ? "softmax" : "sigmoid";
}

ScoreFunction score_function_from_string(const std::string& name) {
  if (name == "softmax") return ScoreFunction::Softmax;
  if (name == "sigmoid") return ScoreFunction::Sigmoid;
  TORCH_CHECK(false, "score_function (", name, ") must be softmax or sigmoid");
}

void RouterOptions::validate() const {
  TORCH_CHECK(dim() > 0, "router dim (", dim(), ") must be > 0");
  TORCH_CHECK(num_experts() > 0, "num_experts (", num_experts(), ") must be > 0");
  TORCH_CHECK(top_k() >= 1 && top_k() <= num_experts(), "top_k (", top_k(),
              ") must be in [1, num_experts (", num_experts(), ")]");
  TORCH_CHECK(init_std() > 0, "router init_std (", init_std(), ") must be > 0");
}

RouterImpl::RouterImpl(RouterOptions options_) : options(std::move(options_)) { reset(); }

void RouterImpl::reset() {
  options.validate();
  weight = register_parameter("weight", torch::empty({options.num_experts(), options.dim()}));
  expert_bias = register_buffer("expert_bias", torch::zeros({options.num_experts()}));
  reset_parameters();
}

void RouterImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  weight.normal_(0.0, options.init_std());
  expert_bias.zero_();
}

void RouterImpl::pretty_print(std::ostream& stream) const {
  stream << "gbmoe::Router(dim=" << options.dim() << ", num_experts=" << options.num_experts()
         << ", top_k=" << options.top_k() << ", score=" << to_string(options.score_function())
         << ", renormalize=" << options.renormalize() << ")";
}

torch::Tensor count_selections(const torch::Tensor& expert_ids, const torch::Tensor& valid,
                               int64_t num_experts) {
  torch::NoGradGuard no_grad;
  auto ids = expert_ids.index({valid}).reshape({-1});
  auto counts = torch::zeros({num_experts}, expert_ids.options().dtype(torch::kLong));
  return counts.index_add_(0, ids, torch::ones_like(ids));
}

namespace {

// Scores s and the gates that select and weight experts (s itself for softmax).
torch::Tensor scores_and_gates(const torch::Tensor& logits_TE, ScoreFunction score_function,
                               RoutedScores& r) {
  if (score_function == ScoreFunction::Softmax) {
    r.scores = torch::softmax(logits_TE, -1);
    return r.scores;
  }
  auto gates_TE = torch::sigmoid(logits_TE);
  r.scores = gates_TE / gates_TE.sum(-1, true);
  return gates_TE;
}

void weights_and_counts(const torch::Tensor& gates_TE, const torch::Tensor& valid_T,
                        bool renormalize, RoutedScores& r) {
  r.weights = gates_TE.gather(-1, r.expert_ids);
  if (renormalize && r.expert_ids.size(1) > 1) r.weights = r.weights / r.weights.sum(-1, true);
  r.counts = count_selections(r.expert_ids, valid_T, gates_TE.size(1));
}

}  // namespace

RoutedScores route_logits_reference(const torch::Tensor& logits_TE, const torch::Tensor& bias_E,
                                    const torch::Tensor& valid_T, int64_t top_k,
                                    ScoreFunction score_function, bool renormalize) {
  RoutedScores r;
  auto gates_TE = scores_and_gates(logits_TE, score_function, r);
  {
    torch::NoGradGuard no_grad;
    auto selection_TE = gates_TE.detach() + bias_E.to(gates_TE.device());
    r.expert_ids = std::get<1>(selection_TE.topk(top_k, -1));
  }
  weights_and_counts(gates_TE, valid_T, renormalize, r);
  return r;
}

RoutedScores route_logits_given(const torch::Tensor& logits_TE, const torch::Tensor& expert_ids_TK,
                                const torch::Tensor& valid_T, ScoreFunction score_function,
                                bool renormalize) {
  const int64_t T = logits_TE.size(0), E = logits_TE.size(1);
  TORCH_CHECK(expert_ids_TK.dim() == 2 && expert_ids_TK.size(0) == T, "given expert ids must be (",
              T, ", K), got ", expert_ids_TK.sizes());
  RoutedScores r;
  r.expert_ids = expert_ids_TK.to(logits_TE.device(), torch::kLong);
  if (r.expert_ids.numel() > 0) {
    TORCH_CHECK(r.expert_ids.min().item<int64_t>() >= 0 && r.expert_ids.max().item<int64_t>() < E,
                "given expert ids must be in [0, num_experts (", E, "))");
  }
  auto gates_TE = scores_and_gates(logits_TE, score_function, r);
  weights_and_counts(gates_TE, valid_T, renormalize, r);
  return r;
}

void RouterImpl::record_routing() {
  replay_mode_ = RoutingReplayMode::Record;
  recorded_.clear();
  replay_.clear();
  replay_next_ = 0;
  last_ids_ = torch::Tensor();
}

void RouterImpl::replay_routing(std::vector<torch::Tensor> expert_ids) {
  replay_mode_ = RoutingReplayMode::Replay;
  replay_ = std::move(expert_ids);
  replay_next_ = 0;
  last_ids_ = torch::Tensor();
}

void RouterImpl::stop_routing_replay() {
  replay_mode_ = RoutingReplayMode::Off;
  replay_.clear();
  replay_next_ = 0;
  last_ids_ = torch::Tensor();
}

RoutedScores RouterImpl::replayed(const torch::Tensor& logits_TE, const torch::Tensor& valid_T) {
  const bool recompute = is_recomputing();
  if (recompute) {
    TORCH_CHECK(last_ids_.defined(), "router replay: a recomputed forward before any ",
                replay_mode_ == RoutingReplayMode::Record ? "recorded" : "replayed", " forward");
    TORCH_CHECK(last_ids_.size(0) == logits_TE.size(0),
                "router replay: the recomputed forward has ", logits_TE.size(0),
                " tokens, the forward it recomputes had ", last_ids_.size(0));
    return route_logits_given(logits_TE, last_ids_, valid_T, options.score_function(),
                              options.renormalize());
  }
  if (replay_mode_ == RoutingReplayMode::Record) {
    auto routed =
        route_logits_reference(logits_TE, expert_bias.to(logits_TE.device()), valid_T,
                               options.top_k(), options.score_function(), options.renormalize());
    last_ids_ = routed.expert_ids;
    recorded_.push_back(routed.expert_ids);
    return routed;
  }
  TORCH_CHECK(replay_next_ < replay_.size(), "router replay: forward ", replay_next_ + 1,
              " but only ", replay_.size(), " routings were given to replay_routing()");
  const auto& ids = replay_[replay_next_];
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == logits_TE.size(0) && ids.size(1) == options.top_k(),
              "router replay: forward ", replay_next_ + 1, " routes (", logits_TE.size(0), ", ",
              options.top_k(), ") token choices, the replayed ids are ", ids.sizes());
  ++replay_next_;
  last_ids_ = ids;
  return route_logits_given(logits_TE, ids, valid_T, options.score_function(),
                            options.renormalize());
}

RoutingResult RouterImpl::forward(const torch::Tensor& x, const torch::Tensor& mask) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == options.dim(), "router input must be (T, ",
              options.dim(), "), got ", x.sizes());
  const int64_t T = x.size(0);
  RoutingResult r;
  r.top_k = options.top_k();
  if (mask.defined()) {
    TORCH_CHECK(mask.dim() == 1 && mask.size(0) == T, "router mask must be (", T, "), got ",
                mask.sizes());
    r.valid = mask.to(x.device(), torch::kBool);
  } else {
    r.valid = torch::ones({T}, x.options().dtype(torch::kBool));
  }
  // The gate runs in fp32 (fp64 for fp64 inputs) whatever the activations' dtype: routing is
  // precision-sensitive.
  const auto gate_dtype = x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  {
    // Autocast (bf16 training on CUDA) must not lower the gate's precision.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    r.logits = torch::nn::functional::linear(x.to(gate_dtype), weight.to(gate_dtype));
  }
  RoutedScores routed;
  if (replay_mode_ == RoutingReplayMode::Off) {
    const auto* kernels = gate_dtype == torch::kFloat ? fused_kernels(r.logits) : nullptr;
    const auto route = kernels                              ? kernels->route
                       : route_logits_cpu_applies(r.logits) ? route_logits_cpu
                                                            : route_logits_reference;
    routed = route(r.logits, expert_bias.to(r.logits.device()), r.valid, options.top_k(),
                   options.score_function(), options.renormalize());
  } else {
    routed = replayed(r.logits, r.valid);
  }
  r.scores = routed.scores;
  r.expert_ids = routed.expert_ids;
  r.weights = routed.weights;
  r.counts = routed.counts;
  r.num_valid = r.valid.sum().item<int64_t>();
  return r;
}

}  // namespace gbmoe
