// Local token dispatch: sort assignments by expert, apply capacity, gather, weighted scatter-add.
#include "moe/dispatcher.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <numeric>
#include <vector>

#include "moe/kernels.h"

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
  return combine_rows(expert_out, dispatched.token_index, dispatched.weights,
                      dispatched.num_tokens);
}

namespace {

// The rows each token receives: rows[starts[t] .. starts[t + 1]) in increasing order. A counting
// sort of token_index, so a token's sum can be computed by one thread without write conflicts.
struct RowsByToken {
  std::vector<int64_t> starts, rows;
};

RowsByToken rows_by_token(const torch::Tensor& token_index, int64_t num_tokens) {
  auto idx = token_index.to(torch::kLong).contiguous();
  const int64_t* tok = idx.data_ptr<int64_t>();
  const int64_t N = idx.numel();
  RowsByToken out;
  out.starts.assign(num_tokens + 1, 0);
  out.rows.resize(N);
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(tok[i] >= 0 && tok[i] < num_tokens, "token_index[", i, "] (", tok[i],
                ") must be in [0, ", num_tokens, ")");
    ++out.starts[tok[i] + 1];
  }
  std::partial_sum(out.starts.begin(), out.starts.end(), out.starts.begin());
  std::vector<int64_t> next(out.starts.begin(), out.starts.end() - 1);
  for (int64_t i = 0; i < N; ++i) out.rows[next[tok[i]]++] = i;
  return out;
}

// out_TD[t] = sum over the rows n of token t of weights[n] * rows_ND[n], in one pass per token.
template <typename scalar_t>
void weighted_sum_by_token(const torch::Tensor& rows_ND, const torch::Tensor& weights_N,
                           const RowsByToken& by_token, torch::Tensor& out_TD) {
  const int64_t D = rows_ND.size(1), T = out_TD.size(0);
  const scalar_t* rows = rows_ND.data_ptr<scalar_t>();
  const scalar_t* w = weights_N.data_ptr<scalar_t>();
  scalar_t* out = out_TD.data_ptr<scalar_t>();
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      scalar_t* o = out + t * D;
      std::fill(o, o + D, scalar_t(0));
      for (int64_t j = by_token.starts[t]; j < by_token.starts[t + 1]; ++j) {
        const int64_t n = by_token.rows[j];
        const scalar_t wn = w[n];
        const scalar_t* r = rows + n * D;
        for (int64_t d = 0; d < D; ++d) o[d] += wn * r[d];
      }
    }
  });
}

// <a, b> over D entries with eight partial sums, so the compiler can vectorize the loop (a single
// running sum fixes the order of the additions and keeps it scalar).
template <typename scalar_t>
scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t D) {
  constexpr int64_t kLanes = 8;
  scalar_t partial[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) partial[j] += a[d + j] * b[d + j];
  }
  scalar_t sum = 0;
  for (int64_t j = 0; j < kLanes; ++j) sum += partial[j];
  for (; d < D; ++d) sum += a[d] * b[d];
  return sum;
}

// The backward of weighted_sum_by_token, one pass per row:
// drows[n] = weights[n] * dout[token n], dweights[n] = <dout[token n], rows[n]>.
template <typename scalar_t>
void weighted_sum_backward(const torch::Tensor& dout_TD, const torch::Tensor& rows_ND,
                           const torch::Tensor& weights_N, const torch::Tensor& token_index,
                           torch::Tensor& drows_ND, torch::Tensor& dweights_N) {
  const int64_t N = rows_ND.size(0), D = rows_ND.size(1);
  const scalar_t* dout = dout_TD.data_ptr<scalar_t>();
  const scalar_t* rows = rows_ND.data_ptr<scalar_t>();
  const scalar_t* w = weights_N.data_ptr<scalar_t>();
  const int64_t* tok = token_index.data_ptr<int64_t>();
  scalar_t* drows = drows_ND.data_ptr<scalar_t>();
  scalar_t* dw = dweights_N.data_ptr<scalar_t>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* g = dout + tok[n] * D;
      const scalar_t* r = rows + n * D;
      scalar_t* dr = drows + n * D;
      for (int64_t d = 0; d < D; ++d) dr[d] = w[n] * g[d];
      dw[n] = dot(g, r, D);
    }
  });
}

// combine_rows on the CPU for fp32 and fp64: the weighting, the scatter-add and their
// backward each in one pass, instead of a multiply, a zero fill, an index_add and, backward,
// an index_select, two multiplies and a row sum over (N, D) tensors.
class WeightedCombineFunction : public torch::autograd::Function<WeightedCombineFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& rows_ND,
                               const torch::Tensor& weights_N, const torch::Tensor& token_index,
                               int64_t num_tokens) {
    auto rows = rows_ND.contiguous(), weights = weights_N.contiguous();
    auto tokens = token_index.to(torch::kLong).contiguous();
    const auto by_token = rows_by_token(tokens, num_tokens);
    auto out_TD = torch::empty({num_tokens, rows.size(1)}, rows.options());
    AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "combine_rows", [&] {
      weighted_sum_by_token<scalar_t>(rows, weights, by_token, out_TD);
    });
    ctx->save_for_backward({rows, weights, tokens});
    return out_TD;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto rows = saved[0], weights = saved[1], tokens = saved[2];
    auto dout_TD = grads[0].contiguous();
    auto drows_ND = torch::empty_like(rows);
    auto dweights_N = torch::empty_like(weights);
    AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "combine_rows_backward", [&] {
      weighted_sum_backward<scalar_t>(dout_TD, rows, weights, tokens, drows_ND, dweights_N);
    });
    return {drows_ND, dweights_N, torch::Tensor(), torch::Tensor()};
  }
};

bool use_fused_path(const torch::Tensor& rows) {
  return rows.is_cpu() &&
         (rows.scalar_type() == torch::kFloat || rows.scalar_type() == torch::kDouble);
}

}  // namespace

torch::Tensor combine_rows(const torch::Tensor& rows_ND, const torch::Tensor& token_index,
                           const torch::Tensor& weights, int64_t num_tokens) {
  auto weights_N = weights.to(rows_ND.scalar_type());
  if (use_fused_path(rows_ND)) {
    return WeightedCombineFunction::apply(rows_ND, weights_N, token_index, num_tokens);
  }
  return unpermute_reference(rows_ND, weights_N, token_index, num_tokens);
}

}  // namespace gbmoe
