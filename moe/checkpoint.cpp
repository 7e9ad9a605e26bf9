// Activation checkpointing as a custom autograd function whose backward reruns the forward.
#include "moe/checkpoint.h"

#include "moe/autocast.h"
#include "moe/recompute.h"

namespace gbmoe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Autograd runs backward functions with autocast off: the recomputation gets the forward's.
class AutocastRestore {
 public:
  explicit AutocastRestore(const CudaAutocast& s) : previous_(CudaAutocast::current()) {
    CudaAutocast::set(s);
  }
  ~AutocastRestore() { CudaAutocast::set(previous_); }

 private:
  CudaAutocast previous_;
};

// What the backward needs besides the saved input; held by the autograd graph as a capsule.
struct CheckpointState : torch::CustomClassHolder {
  CheckpointedFn fn;
  bool records = false;  // whether the forward recorded routing (the rerun must return the same)
  CudaAutocast autocast;
  RoutingContext forward_routing;  // the forward's records, handed on after apply()
  // The caller's OnWeights and the index of the block's first record in the caller's context:
  // the recomputation (whose graph the backward runs through) ties weights as the caller would.
  RoutingContext::OnWeights on_weights;
  int64_t first_record = 0;

  // fn's output followed by each record's scores and logits.
  variable_list run(const torch::Tensor& x, RoutingContext* routing) const {
    variable_list out{fn(x, routing)};
    if (routing) {
      for (const auto& r : routing->layers()) {
        out.push_back(r.routing.scores);
        out.push_back(r.routing.logits);
      }
    }
    return out;
  }
};

class CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const torch::Tensor& x,
                               c10::intrusive_ptr<CheckpointState> state) {
    state->autocast = CudaAutocast::current();
    auto out = state->run(x, state->records ? &state->forward_routing : nullptr);
    ctx->save_for_backward({x});
    ctx->saved_data["state"] = c10::IValue::make_capsule(std::move(state));
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto x = ctx->get_saved_variables()[0];
    auto holder = ctx->saved_data["state"].toCapsule();
    const auto& state = *static_cast<CheckpointState*>(holder.get());
    auto input = x.detach().requires_grad_(x.requires_grad());
    variable_list outputs;
    {
      torch::AutoGradMode grad_mode(true);
      RecomputeGuard recompute;  // a replaying router reuses the forward's choices
      AutocastRestore autocast(state.autocast);
      // The recomputation's routing counts nowhere; its weights are tied as the forward's.
      RoutingContext::OnWeights tie;
      if (state.on_weights) {
        tie = [&state](const RoutingRecord& r, int64_t index, const torch::Tensor& w) {
          return state.on_weights(r, state.first_record + index, w);
        };
      }
      RoutingContext scratch({}, tie);
      outputs = state.run(input, state.records ? &scratch : nullptr);
    }
    TORCH_CHECK(outputs.size() == grad_outputs.size(), "checkpoint: the recomputation returned ",
                outputs.size(), " tensors, the forward ", grad_outputs.size());
    variable_list roots, grads;
    for (size_t i = 0; i < outputs.size(); ++i) {
      if (grad_outputs[i].defined() && outputs[i].requires_grad()) {
        roots.push_back(outputs[i]);
        grads.push_back(grad_outputs[i]);
      }
    }
    if (!roots.empty()) torch::autograd::backward(roots, grads);
    return {input.requires_grad() ? input.grad() : torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor checkpoint(CheckpointedFn fn, const torch::Tensor& x, RoutingContext* routing) {
  TORCH_CHECK(x.is_floating_point(), "checkpoint: x must be a floating tensor, got ", x.dtype());
  auto state = c10::make_intrusive<CheckpointState>();
  state->fn = std::move(fn);
  state->records = routing != nullptr;
  if (routing) {
    state->on_weights = routing->on_weights();
    state->first_record = routing->size();
  }
  auto out = CheckpointFunction::apply(x, state);
  if (routing) {
    auto& records = state->forward_routing.layers();
    for (size_t l = 0; l < records.size(); ++l) {
      RoutingRecord r = records[l];
      r.routing.scores = out[1 + 2 * l];
      r.routing.logits = out[2 + 2 * l];
      routing->record(std::move(r));
    }
    records.clear();  // the graph keeps the state; the records live on in `routing`
  }
  return out[0];
}

}  // namespace gbmoe
