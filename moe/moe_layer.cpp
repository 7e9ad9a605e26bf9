// MoELayer forward: route, dispatch, compute, combine; the routing goes to the caller's context.
#include "moe/moe_layer.h"

#include "moe/kernels.h"
#include "moe/profile_region.h"

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
         << ", shared_experts=" << options.shared_experts() << ")";
}

void MoELayerImpl::set_dispatcher(std::shared_ptr<TokenDispatcher> dispatcher) {
  TORCH_CHECK(dispatcher, "set_dispatcher needs a dispatcher");
  TORCH_CHECK(dispatcher->num_local_experts() == experts->options.num_experts(),
              "dispatcher delivers ", dispatcher->num_local_experts(),
              " experts but the layer holds ", experts->options.num_experts());
  dispatcher_ = std::move(dispatcher);
}

torch::Tensor MoELayerImpl::forward(const torch::Tensor& x, const torch::Tensor& mask,
                                    RoutingContext* routing) {
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

  RoutingResult routed;
  {
    GBMOE_PROFILE_REGION("moe.router");
    routed = router->forward(x_TD, mask_T);
  }
  Dispatched dispatched;
  {
    GBMOE_PROFILE_REGION("moe.dispatch");
    // Under autocast the experts compute in its dtype: cast once, before the rows are copied.
    dispatched = dispatcher_->dispatch(x_TD.to(compute_dtype(x_TD)), routed);
  }
  if (routing) {
    GBMOE_PROFILE_REGION("objective.record");
    routing->record(
        RoutingRecord{routed, lead.vec(), options.num_experts(), dispatched.num_dropped});
  }
  if (routing) dispatched.weights = routing->combine_weights(dispatched.weights);
  torch::Tensor y_TD;
  {
    GBMOE_PROFILE_REGION("moe.experts");
    auto expert_out = experts->forward(dispatched.tokens, dispatched.group_sizes);
    y_TD = dispatcher_->combine(expert_out, dispatched);
  }
  if (shared) {
    GBMOE_PROFILE_REGION("moe.shared");
    y_TD = y_TD + shared->forward(x_TD);
  }
  return y_TD.view(x.sizes());
}

}  // namespace gbmoe
