// Balancer: stages each layer's counts as routing happens, reduces them once per micro-batch,
// keeps the step's running buffer and forms the weighted balancing objective.
#include "moe/balancer.h"

namespace gbmoe {

Balancer::Balancer(std::vector<MoELayer> layers, std::shared_ptr<CountReducer> reducer)
    : layers_(std::move(layers)), reducer_(std::move(reducer)) {
  TORCH_CHECK(!layers_.empty(), "Balancer needs at least one MoE layer");
  options_ = layers_.front()->options.balance();
  int64_t offset = 0;
  for (size_t l = 0; l < layers_.size(); ++l) {
    const auto& b = layers_[l]->options.balance();
    TORCH_CHECK(b.scope() == options_.scope() && b.method() == options_.method(),
                "every MoE layer must use the same balance scope and method: layer 0 has ",
                to_string(options_.scope()), "/", to_string(options_.method()), ", layer ", l,
                " has ", to_string(b.scope()), "/", to_string(b.method()));
    offsets_.push_back(offset);
    offset += layers_[l]->options.num_experts() + 1;
    const auto index = static_cast<int64_t>(l);
    layers_[l]->set_routing_hook([this, index](const RoutingResult& r) { on_routing(index, r); });
  }
  offsets_.push_back(offset);
  reported_.assign(layers_.size(), false);
  stats_.resize(layers_.size());
  if (options_.scope() == BalanceScope::Group && reducer_) {
    TORCH_CHECK(reducer_->size() == options_.group_size(), "balance group_size (",
                options_.group_size(), ") differs from the size of the group reducer (",
                reducer_->size(), ")");
  }
}

Balancer::~Balancer() {
  for (auto& layer : layers_) layer->set_routing_hook(nullptr);
}

void Balancer::begin_step(int64_t num_micro_batches, double step_tokens) {
  TORCH_CHECK(num_micro_batches >= 1, "num_micro_batches (", num_micro_batches, ") must be >= 1");
  TORCH_CHECK(step_tokens >= 0, "step_tokens (", step_tokens, ") must be >= 0");
  TORCH_CHECK(micro_batches_ == 0, "begin_step() called inside a step after ", micro_batches_,
              " micro-batches: call end_step() after the optimizer step");
  step_micro_batches_ = num_micro_batches;
  step_tokens_ = step_tokens;
}

void Balancer::set_local_step_tokens(double tokens) {
  TORCH_CHECK(tokens >= 0, "local step tokens (", tokens, ") must be >= 0");
  TORCH_CHECK(micro_batches_ == 0 && num_reported_ == 0,
              "set_local_step_tokens() after the step's first forward: call it right after "
              "begin_step()");
  local_step_tokens_ = tokens;
}

void Balancer::on_routing(int64_t layer, const RoutingResult& routing) {
  TORCH_CHECK(!reported_[layer], "MoE layer ", layer,
              " ran twice in one micro-batch: call micro_batch_loss() after each forward");
  if (!staged_.defined()) {
    auto opts = routing.counts.options().dtype(torch::kDouble);
    staged_ = torch::zeros({offsets_.back() + 1}, opts);
    running_ = torch::zeros_like(staged_);
    local_running_ = torch::zeros_like(staged_);
  }
  const int64_t E = offsets_[layer + 1] - offsets_[layer] - 1;
  staged_.narrow(0, offsets_[layer], E).copy_(routing.counts);
  staged_[offsets_[layer] + E].fill_(static_cast<double>(routing.num_valid));
  reported_[layer] = true;
  if (++num_reported_ == num_layers()) {
    const bool first = micro_batches_ == 0 && local_step_tokens_ >= 0;
    staged_[offsets_.back()].fill_(first ? local_step_tokens_ : 0.0);
    local_staged_ = staged_.clone();
    // One collective for all layers, started before the last layer's experts run.
    if (is_synchronized(options_.scope()) && reducer_) wait_ = reducer_->sum_async(staged_);
  }
}

torch::Tensor Balancer::micro_batch_loss() {
  TORCH_CHECK(num_reported_ == num_layers(), "micro_batch_loss() needs one training forward of ",
              "every MoE layer first (", num_reported_, " of ", num_layers(), " layers ran)");
  if (wait_) {
    wait_();
    wait_ = nullptr;
  }
  ++micro_batches_;
  TORCH_CHECK(micro_batches_ <= step_micro_batches_, "micro-batch ", micro_batches_,
              " in a step opened for ", step_micro_batches_,
              " micro-batches: call begin_step(M) before the first micro-batch of each step");
  running_ += staged_;
  local_running_ += local_staged_;
  if (local_step_tokens_ >= 0 && step_tokens_ == 0) {
    step_tokens_ = running_[offsets_.back()].item<double>();  // the group's step tokens
  }
  const bool synchronized = is_synchronized(options_.scope());
  const auto& counts_all = synchronized ? running_ : local_running_;
  const double group_size = synchronized && reducer_ ? static_cast<double>(reducer_->size()) : 1.0;

  torch::Tensor total;
  for (int64_t l = 0; l < num_layers(); ++l) {
    auto& layer = *layers_[l];
    const auto& s = layer.stats();
    const int64_t E = offsets_[l + 1] - offsets_[l] - 1;
    const int64_t K = layer.last_routing().top_k;
    auto counts = counts_all.narrow(0, offsets_[l], E);
    const double tokens = counts_all[offsets_[l] + E].item<double>();
    auto local = local_staged_.narrow(0, offsets_[l], E);

    torch::Tensor term = s.z_loss;
    double lbl_value = s.balance_loss.item<double>();
    if (options_.method() == BalanceMethod::AuxLoss) {
      if (synchronized) {
        auto lbl = load_balancing_loss(counts, tokens, s.prob_mean, K, options_.alpha());
        lbl_value = lbl.item<double>();
        // Rank weight n_rm * R * M / N makes averaged gradients exact (spec).
        const double step_tokens =
            step_tokens_ > 0 ? step_tokens_
                             : tokens * static_cast<double>(step_micro_batches_) / micro_batches_;
        const double weight = step_tokens > 0 ? static_cast<double>(s.num_tokens) * group_size *
                                                    step_micro_batches_ / step_tokens
                                              : 0.0;
        term = term + lbl * weight;
        if (options_.micro_alpha() > 0) {
          term = term + load_balancing_loss(s.counts, static_cast<double>(s.num_tokens),
                                            s.prob_mean, K, options_.micro_alpha());
        }
      } else {
        term = term + s.balance_loss;
      }
    }
    total = total.defined() ? total + term : term;

    auto& st = stats_[l];
    st.frequency = selection_frequency(counts, tokens, K);
    st.local_counts = local_running_.narrow(0, offsets_[l], E).clone();
    st.tokens = tokens;
    st.max_violation = max_violation(counts);
    st.micro_max_violation += (max_violation(local) - st.micro_max_violation) / micro_batches_;
    st.balance_loss = lbl_value;
    st.z_loss = s.z_loss.item<double>();
    st.micro_batches = micro_batches_;
  }
  std::fill(reported_.begin(), reported_.end(), false);
  num_reported_ = 0;
  return total;
}

void Balancer::update_expert_bias() {
  const auto& counts_all = is_synchronized(options_.scope()) ? running_ : local_running_;
  torch::NoGradGuard no_grad;
  for (int64_t l = 0; l < num_layers(); ++l) {
    const int64_t E = offsets_[l + 1] - offsets_[l] - 1;
    auto c = counts_all.narrow(0, offsets_[l], E);
    auto& bias = layers_[l]->router->expert_bias;
    // Under-loaded experts (below the mean) get a higher selection bias, over-loaded a lower.
    auto step = torch::sign(c.mean() - c) * options_.bias_update_rate();
    bias.add_(step.to(bias.device(), bias.scalar_type()));
  }
}

std::vector<LayerBalanceStats> Balancer::end_step() {
  TORCH_CHECK(num_reported_ == 0,
              "end_step() after a forward whose micro_batch_loss() was not taken (", num_reported_,
              " layers reported)");
  if (options_.method() == BalanceMethod::LossFree && micro_batches_ > 0) update_expert_bias();
  auto out = stats_;
  if (running_.defined()) {
    running_.zero_();
    local_running_.zero_();
  }
  stats_.assign(layers_.size(), LayerBalanceStats());
  micro_batches_ = 0;
  step_micro_batches_ = 1;
  step_tokens_ = 0;
  local_step_tokens_ = -1;
  return out;
}

torch::Tensor Balancer::running_counts(int64_t layer) const {
  TORCH_CHECK(layer >= 0 && layer < num_layers(), "layer (", layer, ") out of range [0, ",
              num_layers(), ")");
  const int64_t E = offsets_[layer + 1] - offsets_[layer] - 1;
  if (!running_.defined()) return torch::zeros({E}, torch::kDouble);
  const auto& buffer = is_synchronized(options_.scope()) ? running_ : local_running_;
  return buffer.narrow(0, offsets_[layer], E).clone();
}

double Balancer::running_tokens(int64_t layer) const {
  TORCH_CHECK(layer >= 0 && layer < num_layers(), "layer (", layer, ") out of range [0, ",
              num_layers(), ")");
  if (!running_.defined()) return 0.0;
  const auto& buffer = is_synchronized(options_.scope()) ? running_ : local_running_;
  return buffer[offsets_[layer + 1] - 1].item<double>();
}

}  // namespace gbmoe
