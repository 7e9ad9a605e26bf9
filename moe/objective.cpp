// TrainingObjective: stages each micro-batch's counts as the layers route, reduces them once per
// micro-batch, keeps the step's running buffer and forms the token-weighted objective.
#include "moe/objective.h"

#include <string>

namespace gbmoe {
namespace {

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

void TrainingObjective::begin_step(int64_t num_micro_batches, double local_tokens) {
  TORCH_CHECK(num_micro_batches >= 1, "num_micro_batches (", num_micro_batches, ") must be >= 1");
  TORCH_CHECK(local_tokens >= 0, "local step tokens (", local_tokens, ") must be >= 0");
  TORCH_CHECK(step_micro_batches_ == 0, "begin_step() inside a step (", micro_batches_,
              " micro-batches so far): call end_step() after the optimizer step");
  step_micro_batches_ = num_micro_batches;
  local_step_tokens_ = local_tokens;
  const auto options =
      torch::TensorOptions().dtype(torch::kDouble).device(layers_.front()->router->weight.device());
  const bool rides_with_counts = options_.scope() == BalanceScope::Global && reducers_.counts;
  if (!reducers_.data_parallel) {
    step_tokens_ = torch::full({}, local_tokens, options);
  } else if (!rides_with_counts) {
    token_buffer_ = torch::full({1}, local_tokens, options);
    tokens_wait_ = reducers_.data_parallel->sum_async(token_buffer_);
  }
  if (subset_) {
    subset_->begin_step(step_, num_micro_batches, local_tokens, reducers_.data_parallel.get());
  }
}

RoutingContext TrainingObjective::context() {
  return RoutingContext([this](RoutingContext& routing) { on_record(routing); });
}

void TrainingObjective::on_record(RoutingContext& routing) {
  if (routing.size() != num_layers()) return;
  TORCH_CHECK(!staged_pending_, "a micro-batch's routing was recorded before the previous one's ",
              "micro_batch_loss() was taken: call micro_batch_loss() after each forward");
  TORCH_CHECK(step_micro_batches_ > 0,
              "a training forward outside a step: call begin_step() before the micro-batches");
  TORCH_CHECK(micro_batches_ < step_micro_batches_, "micro-batch ", micro_batches_ + 1,
              " in a step opened for ", step_micro_batches_,
              " micro-batches: call begin_step(M) before the first micro-batch of each step");
  const auto& first = routing.layers().front().routing.counts;
  if (!staged_.defined()) {
    auto options = first.options().dtype(torch::kDouble);
    staged_ = torch::zeros({offsets_.back() + 1}, options);
    running_ = torch::zeros_like(staged_);
    local_running_ = torch::zeros_like(staged_);
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
  for (int64_t l = 0; l < num_layers(); ++l) {
    const auto& r = routing.layers()[l];
    const int64_t E = experts(l);
    TORCH_CHECK(r.num_experts == E, "routing record ", l, " has ", r.num_experts,
                " experts but MoE layer ", l, " of the objective has ", E,
                ": pass the model's MoE layers in forward order");
    TORCH_CHECK(options_.scope() != BalanceScope::Sequence || r.lead_shape.size() >= 2,
                "balance scope sequence needs the MoE input as (B, S, D); MoE layer ", l, " got ",
                input_shape(r), ": pass sequences, or use balance scope micro");
    staged_.narrow(0, offsets_[l], E).copy_(r.routing.counts);
    staged_[offsets_[l] + E].fill_(static_cast<double>(r.routing.num_valid));
  }
  const bool rides =
      options_.scope() == BalanceScope::Global && reducers_.counts && micro_batches_ == 0;
  staged_[offsets_.back()].fill_(rides ? local_step_tokens_ : 0.0);
  local_staged_ = staged_.clone();
  if (subset_) stage_subset(routing);
  // One collective for all layers, in flight while the rest of the forward runs.
  if (is_synchronized(options_.scope()) && reducers_.counts) {
    counts_wait_ = reducers_.counts->sum_async(staged_);
  }
  staged_pending_ = true;
}

// Shuffle: the counts reduced are those of the step's subset S; the local ones stay whole.
void TrainingObjective::stage_subset(const RoutingContext& routing) {
  auto rows_T = subset_->next_micro_batch(routing.layers().front().routing.valid);
  for (int64_t l = 0; l < num_layers(); ++l) {
    const auto& rt = routing.layers()[l].routing;
    const int64_t E = experts(l);
    staged_.narrow(0, offsets_[l], E).copy_(count_selections(rt.expert_ids, rows_T, E));
    staged_[offsets_[l] + E].copy_(rows_T.sum());
  }
}

void TrainingObjective::wait_for_reductions() {
  if (counts_wait_) {
    counts_wait_();
    counts_wait_ = nullptr;
  }
  if (tokens_wait_) {
    tokens_wait_();
    tokens_wait_ = nullptr;
    step_tokens_ = token_buffer_[0];
  }
}

torch::Tensor TrainingObjective::micro_batch_loss(RoutingContext& routing,
                                                  const torch::Tensor& task_loss_sum) {
  TORCH_CHECK(routing.size() == num_layers(), "micro_batch_loss() needs the routing of one ",
              "training forward of each of the ", num_layers(), " MoE layers; the context holds ",
              routing.size(), " records (pass objective.context() to one forward per micro-batch)");
  TORCH_CHECK(staged_pending_, "micro_batch_loss(): the context's routing was not staged; use a ",
              "context from this objective's context()");
  wait_for_reductions();
  ++micro_batches_;
  running_ += staged_;
  local_running_ += local_staged_;
  staged_pending_ = false;
  if (!step_tokens_.defined()) step_tokens_ = running_[offsets_.back()].clone();

  // R / N: averaging gradients over R ranks then gives token means over the global batch.
  auto weight = static_cast<double>(data_parallel_size_) / step_tokens_.clamp_min(1.0);
  auto total = task_loss_sum * weight.to(task_loss_sum.scalar_type());
  task_sum_ += task_loss_sum.detach().to(torch::kDouble) * weight;
  for (int64_t l = 0; l < num_layers(); ++l) {
    total = total + layer_terms(l, routing.layers()[l], weight);
  }
  return total;
}

torch::Tensor TrainingObjective::layer_terms(int64_t l, const RoutingRecord& r,
                                             const torch::Tensor& weight) {
  const auto& rt = r.routing;
  const int64_t E = experts(l), K = rt.top_k;
  const double n = static_cast<double>(rt.num_valid);
  auto P = mean_scores(rt.scores, rt.valid);  // (E,) P_i(B_rm), differentiable
  auto w = weight.to(P.scalar_type());
  auto term = torch::zeros({}, P.options());
  if (options_.z_loss() > 0) {
    auto z = router_z_loss(rt.logits, rt.valid, options_.z_loss()) * n;
    term = term + z * w.to(z.scalar_type());
    z_sum_ += z.detach().to(torch::kDouble) * weight;
  }
  if (options_.method() == BalanceMethod::AuxLoss) {
    // The micro-batch's own LBL(f(B_rm), P(B_rm)), summed over its tokens.
    auto micro_lbl = [&](double alpha) {
      return load_balancing_loss(rt.counts, n, P, K, alpha) * n;
    };
    torch::Tensor lbl;  // summed over the micro-batch's tokens
    switch (options_.scope()) {
      case BalanceScope::Global:
      case BalanceScope::Group: {
        // f from the running buffer, kept on the device (its token count is a tensor).
        auto counts = running_.narrow(0, offsets_[l], E);
        auto tokens = running_[offsets_[l] + E];
        auto f = (counts / (static_cast<double>(K) * tokens.clamp_min(1.0))).to(P.scalar_type());
        lbl = subset_ ? options_.alpha() * static_cast<double>(E) *
                            (f * subset_->weighted_score_sum(rt.scores)).sum()
                      : options_.alpha() * static_cast<double>(E) * (f * P).sum() * n;
        if (options_.micro_alpha() > 0) lbl = lbl + micro_lbl(options_.micro_alpha());
        break;
      }
      case BalanceScope::Micro:
        lbl = micro_lbl(options_.alpha());
        break;
      case BalanceScope::Sequence: {  // lead_shape checked when staged
        const int64_t S = r.lead_shape.back(), B = rt.scores.size(0) / S;
        auto valid = rt.valid.defined() ? rt.valid.view({B, S}) : torch::Tensor();
        auto [per_seq_B, n_B] = sequence_balance_terms(
            rt.scores.view({B, S, E}), rt.expert_ids.view({B, S, K}), valid, options_.alpha());
        lbl = (per_seq_B * n_B).sum();
        break;
      }
    }
    term = term + lbl * w;
    balance_sum_ += lbl.detach().to(torch::kDouble) * weight;
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
  TORCH_CHECK(!staged_pending_,
              "end_step() after a forward whose micro_batch_loss() was not taken");
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
    for (auto* t :
         {&staged_, &running_, &local_running_, &votes_, &task_sum_, &balance_sum_, &z_sum_}) {
      t->zero_();
    }
    for (int64_t l = 0; l < num_layers(); ++l) {
      entropy_sum_[l].zero_(), topk_sum_[l].zero_(), micro_max_violation_sum_[l].zero_();
    }
  }
  wait_for_reductions();  // a step without micro-batches may leave its token count in flight
  micro_batches_ = 0;
  step_micro_batches_ = 0;
  step_tokens_ = torch::Tensor();
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
  return step_tokens_.defined() ? step_tokens_.item<double>() : 0.0;
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
