// Local token dispatch: sort assignments by expert, apply capacity, gather, weighted scatter-add.
#include "moe/dispatcher.h"

#include "moe/kernels.h"

#include <cmath>

namespace gbmoe {

std::string to_string(DropPolicy p) { return p == DropPolicy::Position ? "position" : "score"; }

DropPolicy drop_policy_from_string(const std::string& name) {
  if (name == "position") return DropPolicy::Position;
  if (name == "score") return DropPolicy::Score;
  TORCH_CHECK(false, "drop_policy (", name, ") must be position or score");
}

void DispatcherOptions::validate() const {
  TORCH_CHECK(std::isfinite(capacity_factor()) && capacity_factor() >= 0.0, "capacity_factor (",
              capacity_factor(), ") must be 0 (dropless) or > 0");
}

int64_t expert_capacity(const DispatcherOptions& options, int64_t num_valid, int64_t top_k,
                        int64_t num_experts) {
  if (options.capacity_factor() <= 0.0) return -1;
  return static_cast<int64_t>(std::ceil(options.capacity_factor() * static_cast<double>(num_valid) *
                                        static_cast<double>(top_k) /
                                        static_cast<double>(num_experts)));
}

SortedAssignments sort_assignments(const RoutingResult& routing, int64_t num_experts,
                                   const DispatcherOptions& options) {
  const int64_t T = routing.expert_ids.size(0);
  const int64_t K = routing.expert_ids.size(1);
  auto long_opts = routing.expert_ids.options();
  SortedAssignments out;
  torch::Tensor ids_TK = routing.expert_ids;
  torch::Tensor weights_TK = routing.weights;
  torch::Tensor tokens_TK = torch::arange(T, long_opts).unsqueeze(1).expand({T, K});
  torch::Tensor slots_TK = torch::arange(T * K, long_opts).view({T, K});
  if (routing.num_valid < T) {
    ids_TK = ids_TK.index({routing.valid});
    weights_TK = weights_TK.index({routing.valid});
    tokens_TK = tokens_TK.index({routing.valid});
    slots_TK = slots_TK.index({routing.valid});
  }
  auto ids = ids_TK.reshape({-1});
  auto weights = weights_TK.reshape({-1});
  auto tokens = tokens_TK.reshape({-1});
  auto slots = slots_TK.reshape({-1});

  const int64_t capacity = expert_capacity(options, routing.num_valid, K, num_experts);
  torch::Tensor order;
  if (capacity >= 0 && options.drop_policy() == DropPolicy::Score) {
    // Highest weight first inside each expert: stable sort by weight, then stably by expert.
    auto by_weight = std::get<1>(weights.detach().sort(/*stable=*/true, 0, /*descending=*/true));
    auto by_expert = std::get<1>(ids.index_select(0, by_weight).sort(true, 0, false));
    order = by_weight.index_select(0, by_expert);
  } else {
    order = std::get<1>(ids.sort(/*stable=*/true, 0, /*descending=*/false));
  }
  ids = ids.index_select(0, order);
  tokens = tokens.index_select(0, order);
  weights = weights.index_select(0, order);
  slots = slots.index_select(0, order);
  auto counts = torch::zeros({num_experts}, long_opts).index_add_(0, ids, torch::ones_like(ids));

  if (capacity >= 0) {
    // Rank of each row inside its expert's group: position minus the group's start.
    auto starts = counts.cumsum(0) - counts;
    auto rank = torch::arange(ids.size(0), long_opts) - starts.index_select(0, ids);
    auto keep = rank < capacity;
    out.num_dropped = ids.size(0) - keep.sum().item<int64_t>();
    if (out.num_dropped > 0) {
      ids = ids.index({keep});
      tokens = tokens.index({keep});
      weights = weights.index({keep});
      slots = slots.index({keep});
      counts = counts.clamp_max(capacity);
    }
  }
  out.token_index = tokens;
  out.expert_id = ids;
  out.weights = weights;
  out.counts = counts;
  out.assignment = slots;
  return out;
}

torch::Tensor permute_reference(const torch::Tensor& x_TD, const torch::Tensor& token_index_N) {
  return x_TD.index_select(0, token_index_N);
}

torch::Tensor unpermute_reference(const torch::Tensor& expert_out_ND,
                                  const torch::Tensor& weights_N,
                                  const torch::Tensor& token_index_N, int64_t num_tokens) {
  auto weighted = expert_out_ND * weights_N.to(expert_out_ND.scalar_type()).unsqueeze(1);
  auto out = torch::zeros({num_tokens, expert_out_ND.size(1)}, expert_out_ND.options());
  return out.index_add(0, token_index_N, weighted);
}

LocalDispatcher::LocalDispatcher(int64_t num_experts, DispatcherOptions options)
    : num_experts_(num_experts), options_(std::move(options)) {
  TORCH_CHECK(num_experts > 0, "num_experts (", num_experts, ") must be > 0");
  options_.validate();
}

Dispatched LocalDispatcher::dispatch(const torch::Tensor& x, const RoutingResult& routing) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == routing.expert_ids.size(0),
              "dispatch input must be (T, D) with T = ", routing.expert_ids.size(0), ", got ",
              x.sizes());
  auto sorted = sort_assignments(routing, num_experts_, options_);
  Dispatched d;
  if (const auto* kernels = fused_kernels(x)) {
    auto rows_TK = token_rows(sorted.assignment, x.size(0), routing.top_k);
    d.tokens = kernels->permute(x, sorted.token_index, rows_TK);
    d.state = std::make_shared<torch::Tensor>(rows_TK);
  } else {
    d.tokens = permute_reference(x, sorted.token_index);
  }
  d.group_sizes = sorted.counts.cpu();
  d.token_index = sorted.token_index;
  d.weights = sorted.weights;
  d.num_tokens = x.size(0);
  d.num_dropped = sorted.num_dropped;
  return d;
}

torch::Tensor LocalDispatcher::combine(const torch::Tensor& expert_out,
                                       const Dispatched& dispatched) {
  TORCH_CHECK(expert_out.dim() == 2 && expert_out.size(0) == dispatched.token_index.size(0),
              "combine input must be (", dispatched.token_index.size(0), ", D), got ",
              expert_out.sizes());
  const auto* kernels = fused_kernels(expert_out);
  if (kernels && dispatched.state) {
    const auto& rows_TK = *std::static_pointer_cast<torch::Tensor>(dispatched.state);
    return kernels->unpermute(expert_out, dispatched.weights, dispatched.token_index, rows_TK);
  }
  return unpermute_reference(expert_out, dispatched.weights, dispatched.token_index,
                             dispatched.num_tokens);
}

}  // namespace gbmoe
