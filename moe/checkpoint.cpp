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
// Layers are not owned: their stats() hold outputs of this graph, and owning them would make a
// reference cycle.
struct CheckpointState : torch::CustomClassHolder {
  std::function<torch::Tensor(const torch::Tensor&)> fn;
  std::vector<MoELayerImpl*> layers;
  CudaAutocast autocast;

  // fn's output followed by each layer's differentiable statistics.
  variable_list run(const torch::Tensor& x) const {
    variable_list out{fn(x)};
    for (const auto& layer : layers) {
      for (auto& t : layer->differentiable_stats()) out.push_back(t);
    }
    return out;
  }
};

class CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const torch::Tensor& x,
                               c10::intrusive_ptr<CheckpointState> state) {
    state->autocast = CudaAutocast::current();
    auto out = state->run(x);
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
      RecomputeGuard recompute;
      AutocastRestore autocast(state.autocast);
      outputs = state.run(input);
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

torch::Tensor checkpoint(std::function<torch::Tensor(const torch::Tensor&)> fn,
                         const torch::Tensor& x, const std::vector<MoELayer>& layers) {
  TORCH_CHECK(x.is_floating_point(), "checkpoint: x must be a floating tensor, got ", x.dtype());
  auto state = c10::make_intrusive<CheckpointState>();
  state->fn = std::move(fn);
  for (MoELayer layer : layers) state->layers.push_back(layer.get());
  auto out = CheckpointFunction::apply(x, state);
  for (size_t l = 0; l < state->layers.size(); ++l) {
    state->layers[l]->set_differentiable_stats({out[1 + 3 * l], out[2 + 3 * l], out[3 + 3 * l]});
  }
  return out[0];
}

}  // namespace gbmoe
