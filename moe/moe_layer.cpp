// MoELayer forward: route, dispatch, compute, combine; then the layer's balance statistics.
#include "moe/moe_layer.h"

#include "moe/kernels.h"
#include "moe/recompute.h"

namespace gbmoe {

RouterOptions MoELayerOptions::resolved_router() const {
  RouterOptions r = router();
  r.dim(dim());
  r.num_experts(num_experts());
  return r;
}

void MoELayerOptions::validate() const {
  TORCH_CHECK(dim() > 0, "moe dim (", dim(), ") must be > 0");
  TORCH_CHECK(num_experts() > 0, "num_experts (", num_experts(), ") must be > 0");
  TORCH_CHECK(expert_hidden() > 0, "expert_hidden (", expert_hidden(), ") must be > 0");
  TORCH_CHECK(shared_experts() >= 0, "shared_experts (", shared_experts(), ") must be >= 0");
  resolved_router().validate();
  dispatcher().validate();
  balance().validate();
}

MoELayerImpl::MoELayerImpl(MoELayerOptions options_) : options(std::move(options_)) { reset(); }

void MoELayerImpl::reset() {
  options.validate();
  router = register_module("router", Router(options.resolved_router()));
  experts = register_module(
      "experts", GroupedExperts(GroupedExpertsOptions(options.num_experts(), options.dim(),
                                                      options.expert_hidden())
                                    .init_std(options.init_std())));
  if (options.shared_experts() > 0) {
    shared = register_module(
        "shared",
        SwiGLU(SwiGLUOptions(options.dim(), options.shared_experts() * options.expert_hidden())
                   .init_std(options.init_std())));
  }
  dispatcher_ = std::make_shared<LocalDispatcher>(options.num_experts(), options.dispatcher());
}

void MoELayerImpl::reset_parameters() {
  router->reset_parameters();
  experts->reset_parameters();
  if (shared) shared->reset_parameters();
}

void MoELayerImpl::pretty_print(std::ostream& stream) const {
  stream << "gbmoe::MoELayer(dim=" << options.dim() << ", num_experts=" << options.num_experts()
         << ", expert_hidden=" << options.expert_hidden() << ", top_k=" << options.router().top_k()
         << ", shared_experts=" << options.shared_experts()
         << ", scope=" << to_string(options.balance().scope()) << ")";
}

void MoELayerImpl::set_dispatcher(std::shared_ptr<TokenDispatcher> dispatcher) {
  TORCH_CHECK(dispatcher, "set_dispatcher needs a dispatcher");
  TORCH_CHECK(dispatcher->num_local_experts() == experts->options.num_experts(),
              "dispatcher delivers ", dispatcher->num_local_experts(),
              " experts but the layer holds ", experts->options.num_experts());
  dispatcher_ = std::move(dispatcher);
}

std::vector<torch::Tensor> MoELayerImpl::differentiable_stats() const {
  return {stats_.prob_mean, stats_.balance_loss, stats_.z_loss};
}

void MoELayerImpl::set_differentiable_stats(const std::vector<torch::Tensor>& stats) {
  TORCH_CHECK(stats.size() == 3, "set_differentiable_stats takes {prob_mean, balance_loss, ",
              "z_loss}, got ", stats.size(), " tensors");
  stats_.prob_mean = stats[0];
  stats_.balance_loss = stats[1];
  stats_.z_loss = stats[2];
}

torch::Tensor MoELayerImpl::forward(const torch::Tensor& x, const torch::Tensor& mask) {
  const int64_t D = options.dim();
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == D, "MoELayer input must be (..., ", D, "), got ",
              x.sizes());
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  if (mask.defined()) {
    TORCH_CHECK(mask.sizes() == lead, "MoELayer mask must have shape ", lead, ", got ",
                mask.sizes());
  }
  auto x_TD = x.reshape({-1, D});
  auto mask_T = mask.defined() ? mask.reshape({-1}) : torch::Tensor();

  routing_ = router->forward(x_TD, mask_T);
  if (routing_hook_ && is_training() && !is_recomputing()) routing_hook_(routing_);
  // Under autocast the experts compute in its dtype: cast once, before the rows are copied.
  auto dispatched = dispatcher_->dispatch(x_TD.to(compute_dtype(x_TD)), routing_);
  auto expert_out = experts->forward(dispatched.tokens, dispatched.group_sizes);
  auto y_TD = dispatcher_->combine(expert_out, dispatched);
  if (shared) y_TD = y_TD + shared->forward(x_TD);

  const auto& balance = options.balance();
  stats_ = MoEStats();
  stats_.counts = routing_.counts;
  stats_.num_tokens = routing_.num_valid;
  stats_.num_dropped = dispatched.num_dropped;
  stats_.prob_mean = mean_scores(routing_.scores, routing_.valid);
  stats_.max_violation = max_violation(routing_.counts);
  if (balance.scope() == BalanceScope::Sequence) {
    const int64_t S = x.dim() >= 2 ? x.size(-2) : 1;
    const int64_t B = x_TD.size(0) / S;
    const int64_t E = options.num_experts(), K = routing_.top_k;
    stats_.balance_loss = sequence_load_balancing_loss(
        routing_.scores.view({B, S, E}), routing_.expert_ids.view({B, S, K}),
        routing_.valid.view({B, S}), balance.alpha());
  } else {
    stats_.balance_loss =
        load_balancing_loss(routing_.counts, static_cast<double>(routing_.num_valid),
                            stats_.prob_mean, routing_.top_k, balance.alpha());
  }
  const double beta = options.router().z_loss_coef();
  stats_.z_loss = beta > 0 ? router_z_loss(routing_.logits, routing_.valid, beta)
                           : torch::zeros({}, routing_.logits.options());
  return y_TD.view(x.sizes());
}

}  // namespace gbmoe
