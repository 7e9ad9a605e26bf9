// TrainingObjective: stages each micro-batch's counts as the layers route, reduces them once per
// micro-batch, keeps the step's running buffer and forms the token-weighted objective. The
// waits for other ranks sit in two backward functions: the micro-batch's term (R/N) and the
// tie of each global or group LBL gradient to its MoE layer's combine weights.
#include "moe/objective.h"

#include <string>
#include <utility>

#include "moe/profile_region.h"

namespace gbmoe {

/// One micro-batch's share of the step's objective: what its backward functions need once the
/// reductions have arrived, and its values (before R/N) until then.
struct TrainingObjective::MicroBatch : torch::CustomClassHolder {
  TrainingObjective* objective = nullptr;
  int64_t index = 0;                  // m, from 0
  torch::Tensor key;                  // the counts of its context's first record (which context)
  torch::Tensor staged;               // (sum_l (E_l + 1),) fp64 its counts, reduced in place
  torch::Tensor local_staged;         // the same, before reduction (this rank only)
  std::function<void()> counts_wait;  // waits for the reduction of `staged`; null when none
  bool resolved = false;              // counts and N arrived; f and the values formed
  bool direct = false;                // micro_batch_loss(): the LBL terms are in its graph
  int64_t tied_layers = 0;            // layers whose LBL gradient is tied to their weights
  int64_t ties_run = 0;               // tied gradients the backward has delivered
  torch::Tensor grad_scale;           // () the gradient that reached the term (its backward)
  torch::Tensor task;                 // () fp64 the task loss sum
  std::vector<torch::Tensor> z;       // per layer () z-loss sum, undefined when off
  std::vector<torch::Tensor> lbl;     // per layer () the micro-batch's own LBL terms, or undefined
  std::vector<torch::Tensor> P;       // per layer (E,) mean scores of the tied layers
  std::vector<torch::Tensor> valid;   // per layer (T,) bool, or undefined
  std::vector<torch::Tensor> f;       // per layer (E,) f of the running buffer (tied layers)
  std::vector<double> n;              // per layer n, f . P's multiplier in a tied term (1: shuffle)
  std::vector<int64_t> top_k;         // per layer K
  torch::Tensor value;                // () fp64 the term R/N (task + z + LBL), once resolved
  torch::Tensor subset_rows;          // (T,) bool shuffle: the rows of the step's subset S
};

/// What the backward functions reach inside the objective.
struct ObjectiveAccess {
  static const torch::Tensor& weight(TrainingObjective& o) { return o.weight(); }
  static torch::Tensor tied_balance_gradient(TrainingObjective::MicroBatch& micro, int64_t l,
                                             const torch::Tensor& scores) {
    return micro.objective->tied_balance_gradient(micro, l, scores, micro.grad_scale);
  }
};

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using MicroBatchPtr = c10::intrusive_ptr<TrainingObjective::MicroBatch>;

MicroBatchPtr micro_batch_of(AutogradContext* ctx) {
  return c10::static_intrusive_pointer_cast<TrainingObjective::MicroBatch>(
      ctx->saved_data["micro"].toCapsule());
}

// The micro-batch's term R/N * local. The forward gives `value` (the term's value, or a stand-in
// where micro_batch_backward reports values through step_values()); the backward waits for the
// step's token count N if it is still in flight, scales the gradient by R/N and keeps the
// gradient that reached the term, which the tied LBL gradients are scaled by.
class StepTermFunction : public torch::autograd::Function<StepTermFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& local,
                               const torch::Tensor& value, MicroBatchPtr micro) {
    ctx->saved_data["micro"] = c10::IValue::make_capsule(std::move(micro));
    return value.detach().to(local.scalar_type()).clone();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto micro = micro_batch_of(ctx);
    micro->grad_scale = grads[0].detach();
    const auto& w = ObjectiveAccess::weight(*micro->objective);
    return {grads[0] * w.to(grads[0].scalar_type()), torch::Tensor(), torch::Tensor()};
  }
};

// Ties a global or group LBL gradient to its MoE layer's combine weights w: the forward is the
// identity on w; the backward passes w's gradient on and gives the router's scores the LBL
// gradient, waiting for the micro-batch's counts first. It runs once the combine's backward has
// given w its gradient and the experts' backward (later nodes, which autograd runs first) is
// done: the last point before the router's backward, which needs the LBL gradient.
class BalanceTieFunction : public torch::autograd::Function<BalanceTieFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& w,
                               const torch::Tensor& scores, MicroBatchPtr micro, int64_t layer) {
    ctx->save_for_backward({scores});
    ctx->saved_data["micro"] = c10::IValue::make_capsule(std::move(micro));
    ctx->saved_data["layer"] = layer;
    return w.view_as(w);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    GBMOE_PROFILE_REGION("objective.tie (backward)");
    auto micro = micro_batch_of(ctx);
    auto scores = ctx->get_saved_variables()[0];
    auto grad_scores =
        ObjectiveAccess::tied_balance_gradient(*micro, ctx->saved_data["layer"].toInt(), scores);
    return {grads[0], grad_scores, torch::Tensor(), torch::Tensor()};
  }
};

// Sum over the valid rows of per-token values (T,), as fp64 without gradient.
torch::Tensor valid_sum(const torch::Tensor& values_T, const torch::Tensor& valid_T) {
  auto v = values_T.detach().to(torch::kDouble);
  return valid_T.defined() ? (v * valid_T.to(torch::kDouble)).sum() : v.sum();
}

// MaxVio of counts (E,) as a 0-dim fp64 tensor (no device-to-host copy); 0 when empty.
torch::Tensor max_violation_tensor(const torch::Tensor& counts) {
  auto c = counts.to(torch::kDouble);
  auto mean = c.mean();
  return torch::where(mean > 0, (c.max() - mean) / mean.clamp_min(1e-300), torch::zeros_like(mean));
}

// "(B, S, D)"-style text of a record's input shape.
std::string input_shape(const RoutingRecord& r) {
  std::string out = "(";
  for (auto d : r.lead_shape) out += std::to_string(d) + ", ";
  return out + "D)";
}

// sign(mean_j c_j - c_i): +1 for under-loaded experts, -1 for over-loaded ones.
torch::Tensor bias_vote(const torch::Tensor& counts_E) {
  return torch::sign(counts_E.mean(-1, /*keepdim=*/true) - counts_E);
}

}  // namespace

TrainingObjective::TrainingObjective(std::vector<MoELayer> layers, BalanceOptions options,
                                     ObjectiveReducers reducers)
    : layers_(std::move(layers)), options_(std::move(options)), reducers_(std::move(reducers)) {
  TORCH_CHECK(!layers_.empty(), "TrainingObjective needs at least one MoE layer");
  options_.validate();
  if (reducers_.data_parallel) data_parallel_size_ = reducers_.data_parallel->size();
  int64_t offset = 0;
  for (const auto& layer : layers_) {
    offsets_.push_back(offset);
    offset += layer->options.num_experts() + 1;
  }
  offsets_.push_back(offset);
  if (options_.scope() == BalanceScope::Group && reducers_.counts) {
    const int64_t expected =
        options_.group_size() > 0 ? options_.group_size() : data_parallel_size_;
    TORCH_CHECK(reducers_.counts->size() == expected, "balance group_size (", options_.group_size(),
                ", ", expected, " ranks) differs from the size of the group reducer (",
                reducers_.counts->size(), ")");
  }
  const auto L = layers_.size();
  entropy_sum_.resize(L), topk_sum_.resize(L), micro_max_violation_sum_.resize(L);
  if (options_.method() == BalanceMethod::Quantile) {
    quantile_ = std::make_unique<QuantileBalance>(layers_, options_.scope());
  }
  if (options_.shuffle()) subset_ = std::make_unique<BalanceSubset>(options_.shuffle_seed());
}

TrainingObjective::~TrainingObjective() {
  // Reductions still in flight write into this objective's buffers: let them finish.
  for (auto& micro : staged_) {
    if (micro->counts_wait) std::exchange(micro->counts_wait, nullptr)();
  }
  if (tokens_wait_) tokens_wait_();
}

bool TrainingObjective::ties_balance() const {
  return options_.method() == BalanceMethod::AuxLoss && is_synchronized(options_.scope());
}

void TrainingObjective::begin_step(int64_t num_micro_batches, double local_tokens) {
  TORCH_CHECK(num_micro_batches >= 1, "num_micro_batches (", num_micro_batches, ") must be >= 1");
  TORCH_CHECK(local_tokens >= 0, "local step tokens (", local_tokens, ") must be >= 0");
  TORCH_CHECK(step_micro_batches_ == 0, "begin_step() inside a step (", micro_batches_,
              " micro-batches so far): call end_step() after the optimizer step");
  step_micro_batches_ = num_micro_batches;
  const auto options =
      torch::TensorOptions().dtype(torch::kDouble).device(layers_.front()->router->weight.device());
  // N is in flight while the first micro-batch runs; its backward is the first to need it.
  token_buffer_ = torch::full({1}, local_tokens, options);
  if (reducers_.data_parallel) tokens_wait_ = reducers_.data_parallel->sum_async(token_buffer_);
  weight_ = torch::Tensor();
  if (subset_) {
    subset_->begin_step(step_, num_micro_batches, local_tokens, reducers_.data_parallel.get());
  }
}

RoutingContext TrainingObjective::context() {
  auto micro = c10::make_intrusive<MicroBatch>();
  micro->objective = this;
  return RoutingContext([this, micro](RoutingContext& routing) { on_record(routing, micro); },
                        [this, micro](const RoutingRecord& r, int64_t l, const torch::Tensor& w) {
                          return on_weights(r, l, w, micro);
                        });
}

void TrainingObjective::on_record(RoutingContext& routing, const MicroBatchPtr& micro) {
  if (routing.size() != num_layers()) return;
  TORCH_CHECK(step_micro_batches_ > 0,
              "a training forward outside a step: call begin_step() before the micro-batches");
  TORCH_CHECK(micro_batches_ < step_micro_batches_, "micro-batch ", micro_batches_ + 1,
              " in a step opened for ", step_micro_batches_,
              " micro-batches: call begin_step(M) before the first micro-batch of each step");
  const auto& first = routing.layers().front().routing.counts;
  auto options = first.options().dtype(torch::kDouble);
  if (!running_.defined()) {
    running_ = torch::zeros({offsets_.back()}, options);
    local_running_ = torch::zeros_like(running_);
    votes_ = torch::zeros({offsets_.back()}, options);
    task_sum_ = torch::zeros({}, options);
    balance_sum_ = torch::zeros({}, options);
    z_sum_ = torch::zeros({}, options);
    for (int64_t l = 0; l < num_layers(); ++l) {
      entropy_sum_[l] = torch::zeros({}, options);
      topk_sum_[l] = torch::zeros({}, options);
      micro_max_violation_sum_[l] = torch::zeros({}, options);
    }
  }
  micro->staged = torch::empty({offsets_.back()}, options);
  auto& staged = micro->staged;
  for (int64_t l = 0; l < num_layers(); ++l) {
    const auto& r = routing.layers()[l];
    const int64_t E = experts(l);
    TORCH_CHECK(r.num_experts == E, "routing record ", l, " has ", r.num_experts,
                " experts but MoE layer ", l, " of the objective has ", E,
                ": pass the model's MoE layers in forward order");
    TORCH_CHECK(options_.scope() != BalanceScope::Sequence || r.lead_shape.size() >= 2,
                "balance scope sequence needs the MoE input as (B, S, D); MoE layer ", l, " got ",
                input_shape(r), ": pass sequences, or use balance scope micro");
    staged.narrow(0, offsets_[l], E).copy_(r.routing.counts);
    staged[offsets_[l] + E].fill_(static_cast<double>(r.routing.num_valid));
  }
  micro->local_staged = staged.clone();
  if (subset_) stage_subset(routing, *micro);
  // One collective for all layers, in flight while the rest of the forward runs (and, where the
  // caller runs later micro-batches' forwards first, those too).
  if (is_synchronized(options_.scope()) && reducers_.counts) {
    micro->counts_wait = reducers_.counts->sum_async(staged);
  }
  micro->index = micro_batches_++;
  micro->key = first;
  staged_.push_back(micro);
}

// Shuffle: the counts reduced are those of the step's subset S; the local ones stay whole.
void TrainingObjective::stage_subset(const RoutingContext& routing, MicroBatch& micro) {
  micro.subset_rows = subset_->next_micro_batch(routing.layers().front().routing.valid);
  for (int64_t l = 0; l < num_layers(); ++l) {
    const auto& rt = routing.layers()[l].routing;
    const int64_t E = experts(l);
    micro.staged.narrow(0, offsets_[l], E)
        .copy_(count_selections(rt.expert_ids, micro.subset_rows, E));
    micro.staged[offsets_[l] + E].copy_(micro.subset_rows.sum());
  }
}

torch::Tensor TrainingObjective::on_weights(const RoutingRecord& r, int64_t layer,
                                            const torch::Tensor& w, const MicroBatchPtr& micro) {
  if (!ties_balance() || layer >= num_layers() || !torch::GradMode::is_enabled() ||
      !r.routing.scores.requires_grad()) {
    return w;
  }
  micro->valid.resize(layers_.size());
  micro->valid[layer] = r.routing.valid;
  return BalanceTieFunction::apply(w, r.routing.scores, micro, layer);
}

c10::intrusive_ptr<TrainingObjective::MicroBatch> TrainingObjective::staged_micro_batch(
    RoutingContext& routing, const char* caller) {
  TORCH_CHECK(routing.size() == num_layers(), caller, "() needs the routing of one training ",
              "forward of each of the ", num_layers(), " MoE layers; the context holds ",
              routing.size(), " records (pass objective.context() to one forward per micro-batch)");
  const auto& key = routing.layers().front().routing.counts;
  for (const auto& micro : staged_) {
    if (!micro->key.is_same(key)) continue;
    TORCH_CHECK(!micro->task.defined(), caller, "(): the term of micro-batch ", micro->index + 1,
                " was taken already; take it once per forward");
    for (const auto& earlier : staged_) {
      if (earlier == micro) break;
      TORCH_CHECK(earlier->task.defined(), caller, "(): micro-batch ", micro->index + 1,
                  "'s term was taken before micro-batch ", earlier->index + 1,
                  "'s: take the micro-batches' terms in the order of their forwards");
    }
    return micro;
  }
  TORCH_CHECK(false, caller, "(): the context's routing was not staged; use a context from this ",
              "objective's context(), once");
}

const torch::Tensor& TrainingObjective::weight() {
  if (!weight_.defined()) {
    if (tokens_wait_) {
      GBMOE_PROFILE_REGION("objective.wait_tokens");
      tokens_wait_();
      tokens_wait_ = nullptr;
    }
    // R / N: averaging gradients over R ranks then gives token means over the global batch.
    weight_ = static_cast<double>(data_parallel_size_) / token_buffer_[0].clamp_min(1.0);
  }
  return weight_;
}

void TrainingObjective::micro_batch_backward(RoutingContext& routing,
                                             const torch::Tensor& task_loss_sum) {
  auto micro = staged_micro_batch(routing, "micro_batch_backward");
  auto local = local_terms(routing, task_loss_sum, *micro);
  StepTermFunction::apply(local, local, micro).backward();
  resolve(*micro);  // when no tied gradient did (scopes micro and sequence, loss-free)
  TORCH_CHECK(micro->ties_run == micro->tied_layers, "micro_batch_backward(): the balance ",
              "gradient of ", micro->tied_layers - micro->ties_run, " of ", micro->tied_layers,
              " MoE layers did not run: their output, combined with the combine weights the ",
              "routing context returned, must be part of task_loss_sum's graph");
}

torch::Tensor TrainingObjective::micro_batch_loss(RoutingContext& routing,
                                                  const torch::Tensor& task_loss_sum) {
  auto micro = staged_micro_batch(routing, "micro_batch_loss");
  auto local = local_terms(routing, task_loss_sum, *micro);
  resolve(*micro);  // the value and the global-batch terms need the counts and N now
  // The global or group LBL terms enter this graph; the ties to the layers' weights stand aside.
  micro->direct = true;
  for (int64_t l = 0; l < num_layers(); ++l) {
    if (!micro->f[l].defined()) continue;
    const double alpha_E = options_.alpha() * static_cast<double>(experts(l));
    const auto& rt = routing.layers()[l].routing;
    auto P = subset_ ? subset_->weighted_score_sum(rt.scores, micro->subset_rows)
                     : mean_scores(rt.scores, rt.valid);
    local = local + alpha_E * (micro->f[l] * P).sum() * micro->n[l];
  }
  return StepTermFunction::apply(local, micro->value, micro);
}

// task_loss_sum plus every layer's terms that need no other rank (z-loss, micro and sequence
// LBL), summed over the micro-batch's tokens, before R/N; their values go to `micro`.
torch::Tensor TrainingObjective::local_terms(const RoutingContext& routing,
                                             const torch::Tensor& task_loss_sum,
                                             MicroBatch& micro) {
  const auto L = layers_.size();
  micro.z.resize(L), micro.lbl.resize(L), micro.P.resize(L), micro.f.resize(L);
  micro.n.resize(L), micro.top_k.resize(L), micro.valid.resize(L);
  micro.task = task_loss_sum.detach().to(torch::kDouble);
  auto total = task_loss_sum;
  for (int64_t l = 0; l < num_layers(); ++l) {
    total = total + local_layer_terms(l, routing.layers()[l], micro);
  }
  return total;
}

torch::Tensor TrainingObjective::local_layer_terms(int64_t l, const RoutingRecord& r,
                                                   MicroBatch& micro) {
  const auto& rt = r.routing;
  const int64_t K = rt.top_k;
  const double n = static_cast<double>(rt.num_valid);
  micro.top_k[l] = K;
  auto P = mean_scores(rt.scores, rt.valid);  // (E,) P_i(B_rm), differentiable
  auto term = torch::zeros({}, P.options());
  if (options_.z_loss() > 0) {
    auto z = router_z_loss(rt.logits, rt.valid, options_.z_loss()) * n;
    term = term + z;
    micro.z[l] = z.detach();
  }
  if (options_.method() == BalanceMethod::AuxLoss) {
    // The micro-batch's own LBL(f(B_rm), P(B_rm)), summed over its tokens.
    auto micro_lbl = [&](double alpha) {
      return load_balancing_loss(rt.counts, n, P, K, alpha) * n;
    };
    torch::Tensor lbl;  // the LBL terms of this micro-batch alone, summed over its tokens
    switch (options_.scope()) {
      case BalanceScope::Global:
      case BalanceScope::Group:
        // The global-batch term's gradient is tied to the layer's weights (on_weights). Its
        // f . P n; with shuffle f . (the subset's score sum scaled to N), multiplier 1.
        // Kept without its graph: a differentiable P would tie the micro-batch to the graph,
        // and through a checkpoint's saved state (which holds this objective's tie) back to
        // itself, so it would never be freed.
        micro.P[l] =
            (subset_ ? subset_->weighted_score_sum(rt.scores, micro.subset_rows) : P).detach();
        micro.n[l] = subset_ ? 1.0 : n;
        if (rt.scores.requires_grad() && torch::GradMode::is_enabled()) ++micro.tied_layers;
        if (options_.micro_alpha() > 0) lbl = micro_lbl(options_.micro_alpha());
        break;
      case BalanceScope::Micro:
        lbl = micro_lbl(options_.alpha());
        break;
      case BalanceScope::Sequence: {  // lead_shape checked when staged
        const int64_t E = experts(l), S = r.lead_shape.back(), B = rt.scores.size(0) / S;
        auto valid = rt.valid.defined() ? rt.valid.view({B, S}) : torch::Tensor();
        auto [per_seq_B, n_B] = sequence_balance_terms(
            rt.scores.view({B, S, E}), rt.expert_ids.view({B, S, K}), valid, options_.alpha());
        lbl = (per_seq_B * n_B).sum();
        break;
      }
    }
    if (lbl.defined()) {
      term = term + lbl;
      micro.lbl[l] = lbl.detach();
    }
  } else if (quantile_) {
    quantile_->add(l, r);
  } else {
    accumulate_bias_votes(l, r);
  }
  {
    torch::NoGradGuard no_grad;
    auto s = rt.scores.detach();
    entropy_sum_[l] += valid_sum(-(s * s.clamp_min(1e-30).log()).sum(-1), rt.valid);
    topk_sum_[l] += valid_sum(s.gather(1, rt.expert_ids).sum(-1), rt.valid);
    micro_max_violation_sum_[l] += max_violation_tensor(rt.counts);
  }
  return term;
}

// Waits for the micro-batch's counts and N, adds the counts to the running buffer, forms f of
// each tied layer and the micro-batch's values. Runs once per micro-batch: in the backward pass
// (the first tied gradient), or in micro_batch_loss().
void TrainingObjective::resolve(MicroBatch& micro) {
  if (micro.resolved) return;
  TORCH_CHECK(!staged_.empty() && staged_.front().get() == &micro, "the balance terms of ",
              "micro-batch ", micro.index + 1, " were backpropagated before those of micro-batch ",
              staged_.empty() ? 0 : staged_.front()->index + 1,
              ": backpropagate the micro-batches in the order of their forwards");
  torch::NoGradGuard no_grad;
  const auto& w = weight();
  if (micro.counts_wait) {
    GBMOE_PROFILE_REGION("objective.wait_counts");
    micro.counts_wait();
    micro.counts_wait = nullptr;
  }
  running_ += micro.staged;
  local_running_ += micro.local_staged;
  micro.staged = micro.local_staged = torch::Tensor();
  staged_.pop_front();
  auto value = micro.task * w;
  task_sum_ += value;
  for (int64_t l = 0; l < num_layers(); ++l) {
    torch::Tensor lbl = micro.lbl[l];
    if (micro.P[l].defined()) {
      // f from the running buffer, kept on the device (its token count is a tensor).
      const int64_t E = experts(l);
      auto counts = running_.narrow(0, offsets_[l], E);
      auto tokens = running_[offsets_[l] + E];
      auto P = micro.P[l].detach();
      micro.f[l] = (counts / (static_cast<double>(micro.top_k[l]) * tokens.clamp_min(1.0)))
                       .to(P.scalar_type());
      auto global = options_.alpha() * static_cast<double>(E) * (micro.f[l] * P).sum() * micro.n[l];
      lbl = lbl.defined() ? global + lbl : global;
    }
    if (micro.z[l].defined()) {
      auto z = micro.z[l].to(torch::kDouble) * w;
      z_sum_ += z;
      value = value + z;
    }
    if (lbl.defined()) {
      auto b = lbl.to(torch::kDouble) * w;
      balance_sum_ += b;
      value = value + b;
    }
  }
  micro.value = value;
  micro.resolved = true;
}

// The gradient of alpha E n (f . P) R/N with respect to the scores, scaled by the gradient that
// reached the micro-batch's term: the ops autograd would run on that term, in the same order.
torch::Tensor TrainingObjective::tied_balance_gradient(MicroBatch& micro, int64_t l,
                                                       const torch::Tensor& scores,
                                                       const torch::Tensor& grad_scale) {
  resolve(micro);
  ++micro.ties_run;
  if (micro.direct) return torch::Tensor();  // micro_batch_loss() has the term in its graph
  TORCH_CHECK(grad_scale.defined(), "the balance gradient of MoE layer ", l,
              " ran before the backward of its micro-batch's term");
  const int64_t E = experts(l);
  const auto dtype = scores.scalar_type();
  auto grad_P = (grad_scale.to(dtype) * weight().to(dtype)) * micro.n[l];
  grad_P = (grad_P * (options_.alpha() * static_cast<double>(E))).expand({E}) * micro.f[l];
  return subset_ ? subset_->weighted_score_sum_backward(grad_P, micro.subset_rows)
                 : mean_scores_backward(grad_P, micro.valid[l], scores.size(0));
}

void TrainingObjective::accumulate_bias_votes(int64_t l, const RoutingRecord& r) {
  const auto& rt = r.routing;
  const int64_t E = experts(l), K = rt.top_k;
  auto votes = votes_.narrow(0, offsets_[l], E);
  auto units = votes_[offsets_[l] + E];
  if (options_.scope() == BalanceScope::Micro) {
    if (rt.num_valid == 0) return;
    votes += bias_vote(rt.counts.to(torch::kDouble));
    units += 1.0;
  } else if (options_.scope() == BalanceScope::Sequence) {
    const int64_t S = r.lead_shape.back(), B = rt.expert_ids.size(0) / S;
    auto valid_BS = rt.valid.defined() ? rt.valid.view({B, S}).to(torch::kDouble)
                                       : torch::ones({B, S}, votes_.options());
    auto counts_BE =
        torch::zeros({B, E}, votes_.options())
            .scatter_add_(1, rt.expert_ids.view({B, S * K}),
                          valid_BS.unsqueeze(-1).expand({B, S, K}).reshape({B, S * K}));
    auto has_tokens_B = (valid_BS.sum(1) > 0).to(torch::kDouble);
    votes += (bias_vote(counts_BE) * has_tokens_B.unsqueeze(-1)).sum(0);
    units += has_tokens_B.sum();
  }
}

void TrainingObjective::update_expert_bias() {
  torch::NoGradGuard no_grad;
  if (is_synchronized(options_.scope())) {
    // One unit per step: the global batch, or this rank's group.
    for (int64_t l = 0; l < num_layers(); ++l) {
      const int64_t E = experts(l);
      votes_.narrow(0, offsets_[l], E).copy_(bias_vote(running_.narrow(0, offsets_[l], E)));
      votes_[offsets_[l] + E].fill_(1.0);
    }
  }
  // Global counts are the same on every rank already; any other scope's votes are summed over
  // the data-parallel ranks. Votes and unit counts are small integers: the sums are exact, so
  // every replica computes the same bias.
  if (options_.scope() != BalanceScope::Global && reducers_.data_parallel) {
    reducers_.data_parallel->sum_async(votes_)();
  }
  for (int64_t l = 0; l < num_layers(); ++l) {
    const int64_t E = experts(l);
    auto units = votes_[offsets_[l] + E].clamp_min(1.0);
    auto step = votes_.narrow(0, offsets_[l], E) / units * options_.bias_update_rate();
    auto& bias = layers_[l]->router->expert_bias;
    bias.add_(step.to(bias.device(), bias.scalar_type()));
  }
}

void TrainingObjective::update_quantile_bias() {
  std::vector<torch::Tensor> unit_tokens;
  for (int64_t l = 0; l < num_layers(); ++l) unit_tokens.push_back(running_[offsets_[l + 1] - 1]);
  quantile_->update_biases(unit_tokens, reducers_.counts.get(), reducers_.data_parallel.get());
  quantile_->reset();
}

StepValues TrainingObjective::step_values() const {
  if (!task_sum_.defined()) return {};
  auto v = torch::stack({task_sum_, balance_sum_, z_sum_}).cpu();
  return {v[0].item<double>(), v[1].item<double>(), v[2].item<double>()};
}

std::vector<LayerStepStats> TrainingObjective::end_step() {
  TORCH_CHECK(staged_.empty(), "end_step() after a forward whose micro_batch_backward() or ",
              "micro_batch_loss() was not taken");
  std::vector<LayerStepStats> out(layers_.size());
  if (micro_batches_ > 0) {
    if (options_.method() == BalanceMethod::LossFree) update_expert_bias();
    if (quantile_) update_quantile_bias();
    auto running = running_.cpu(), local = local_running_.cpu();
    for (int64_t l = 0; l < num_layers(); ++l) {
      const int64_t E = experts(l);
      auto& st = out[l];
      st.counts = running.narrow(0, offsets_[l], E).clone();
      st.local_counts = local.narrow(0, offsets_[l], E).clone();
      st.tokens = running[offsets_[l] + E].item<double>();
      st.max_violation = max_violation(st.counts);
      st.micro_batches = micro_batches_;
      st.micro_max_violation = micro_max_violation_sum_[l].item<double>() / micro_batches_;
      st.local_tokens = local[offsets_[l] + E].item<double>();
      st.routing_entropy = entropy_sum_[l].item<double>() / std::max(1.0, st.local_tokens);
      st.topk_score_sum = topk_sum_[l].item<double>() / std::max(1.0, st.local_tokens);
    }
    for (auto* t : {&running_, &local_running_, &votes_, &task_sum_, &balance_sum_, &z_sum_}) {
      t->zero_();
    }
    for (int64_t l = 0; l < num_layers(); ++l) {
      entropy_sum_[l].zero_(), topk_sum_[l].zero_(), micro_max_violation_sum_[l].zero_();
    }
  }
  if (tokens_wait_) {  // a step without micro-batches leaves its token count in flight
    tokens_wait_();
    tokens_wait_ = nullptr;
  }
  micro_batches_ = 0;
  step_micro_batches_ = 0;
  weight_ = torch::Tensor();
  ++step_;
  return out;
}

torch::Tensor TrainingObjective::running_counts(int64_t layer) const {
  TORCH_CHECK(layer >= 0 && layer < num_layers(), "layer (", layer, ") out of range [0, ",
              num_layers(), ")");
  const int64_t E = experts(layer);
  if (!running_.defined()) return torch::zeros({E}, torch::kDouble);
  return running_.narrow(0, offsets_[layer], E).cpu().clone();
}

double TrainingObjective::running_tokens(int64_t layer) const {
  TORCH_CHECK(layer >= 0 && layer < num_layers(), "layer (", layer, ") out of range [0, ",
              num_layers(), ")");
  if (!running_.defined()) return 0.0;
  return running_[offsets_[layer + 1] - 1].item<double>();
}

double TrainingObjective::step_tokens() const {
  return weight_.defined() ? token_buffer_[0].item<double>() : 0.0;
}

torch::Tensor gather_rows(CountReducer& reducer, const torch::Tensor& local) {
  const int64_t R = reducer.size(), rank = reducer.rank();
  TORCH_CHECK(rank >= 0 && rank < R, "reducer rank (", rank, ") out of [0, ", R, ")");
  std::vector<int64_t> shape{R};
  for (auto d : local.sizes()) shape.push_back(d);
  auto rows = torch::zeros(shape, local.options());
  rows[rank].copy_(local);
  reducer.sum_async(rows)();
  return rows;
}

}  // namespace gbmoe
