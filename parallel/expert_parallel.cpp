// All-to-all dispatch over the expert-parallel group, and sharding a model's MoE layers.
#include "parallel/expert_parallel.h"

#include "moe/moe_layer.h"

namespace gbmoe {

ExpertShard expert_shard(int64_t num_experts, int64_t size, int64_t rank) {
  TORCH_CHECK(size >= 1 && num_experts % size == 0, "expert_parallel (", size,
              ") must divide num_experts (", num_experts, "): use an expert_parallel among the ",
              "divisors of ", num_experts);
  TORCH_CHECK(rank >= 0 && rank < size, "expert-parallel rank (", rank, ") must be in [0, ", size,
              ")");
  const int64_t count = num_experts / size;
  return ExpertShard{rank * count, count};
}

namespace {

// What combine needs besides the fields of Dispatched.
struct ExchangeState {
  std::vector<int64_t> send_splits;  // (P,) rows sent to each rank
  std::vector<int64_t> recv_splits;  // (P,) rows received from each rank
  torch::Tensor to_arrival_order;    // (R,) expert-major row of each arrival
};

std::vector<int64_t> to_vector(const torch::Tensor& t) {
  auto c = t.to(torch::kCPU, torch::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

// Rows arrive source-rank major, local-expert minor; the experts want them local-expert major,
// source-rank minor. Returns the arrival row of each expert-major row. counts_PL: (P, L) rows
// of each (source, local expert) on the CPU.
torch::Tensor expert_major_order(const torch::Tensor& counts_PL) {
  auto counts = counts_PL.reshape({-1});
  auto arrival_start_LP = (counts.cumsum(0) - counts).view(counts_PL.sizes()).t().reshape({-1});
  auto counts_LP = counts_PL.t().reshape({-1});
  auto block = torch::repeat_interleave(counts_LP);  // block of each expert-major row
  auto block_start = counts_LP.cumsum(0) - counts_LP;
  auto row = torch::arange(block.size(0), block.options());
  return arrival_start_LP.index_select(0, block) + row - block_start.index_select(0, block);
}

}  // namespace

AllToAllDispatcher::AllToAllDispatcher(std::shared_ptr<Communicator> expert_parallel,
                                       int64_t num_experts, DispatcherOptions options)
    : comm_(std::move(expert_parallel)), num_experts_(num_experts), options_(std::move(options)) {
  TORCH_CHECK(comm_, "AllToAllDispatcher needs an expert-parallel communicator, got null");
  TORCH_CHECK(num_experts > 0, "num_experts (", num_experts, ") must be > 0");
  options_.validate();
  shard_ = expert_shard(num_experts, comm_->size(), comm_->rank());
}

Dispatched AllToAllDispatcher::dispatch(const torch::Tensor& x, const RoutingResult& routing) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == routing.expert_ids.size(0),
              "dispatch input must be (T, D) with T = ", routing.expert_ids.size(0), ", got ",
              x.sizes());
  const int64_t P = comm_->size(), L = shard_.count;
  // The full routing decides the order and the capacity, as without expert parallelism; the
  // rows of rank j's experts are then one contiguous block.
  auto sorted = sort_assignments(routing, num_experts_, options_);
  auto state = std::make_shared<ExchangeState>();
  state->send_splits = to_vector(sorted.counts.view({P, L}).sum(1));

  // Split sizes first: rank j learns how many rows of each of its experts every rank sends.
  auto counts_PL = comm_
                       ->all_to_all(sorted.counts.contiguous(), std::vector<int64_t>(P, L),
                                    std::vector<int64_t>(P, L))
                       .to(torch::kCPU)
                       .view({P, L});
  state->recv_splits = to_vector(counts_PL.sum(1));

  auto received = all_to_all_autograd(comm_, x.index_select(0, sorted.token_index),
                                      state->send_splits, state->recv_splits);
  auto order = expert_major_order(counts_PL);
  auto to_arrival = torch::empty_like(order).index_copy_(0, order, torch::arange(order.size(0)));
  state->to_arrival_order = to_arrival.to(x.device());

  Dispatched d;
  d.tokens = received.index_select(0, order.to(x.device()));
  d.group_sizes = counts_PL.sum(0);
  d.token_index = sorted.token_index;
  d.weights = sorted.weights;
  d.num_tokens = x.size(0);
  d.num_dropped = sorted.num_dropped;
  d.state = state;
  return d;
}

torch::Tensor AllToAllDispatcher::combine(const torch::Tensor& expert_out,
                                          const Dispatched& dispatched) {
  auto state = std::static_pointer_cast<ExchangeState>(dispatched.state);
  TORCH_CHECK(state, "combine needs the Dispatched of this dispatcher's dispatch");
  TORCH_CHECK(expert_out.dim() == 2 && expert_out.size(0) == state->to_arrival_order.size(0),
              "combine input must be (", state->to_arrival_order.size(0), ", D), got ",
              expert_out.sizes());
  auto returned = all_to_all_autograd(comm_, expert_out.index_select(0, state->to_arrival_order),
                                      state->recv_splits, state->send_splits);
  return combine_rows(returned, dispatched.token_index, dispatched.weights, dispatched.num_tokens);
}

int64_t apply_expert_parallel(torch::nn::Module& model, const ProcessGroups& groups) {
  TORCH_CHECK(groups.expert_parallel, "apply_expert_parallel needs groups.expert_parallel");
  const auto& comm = groups.expert_parallel;
  int64_t sharded = 0;
  for (const auto& item : model.named_modules()) {
    auto layer = std::dynamic_pointer_cast<MoELayerImpl>(item.value());
    if (!layer) continue;
    const int64_t E = layer->options.num_experts();
    TORCH_CHECK(layer->experts->options.num_experts() == E, "MoE layer '", item.key(), "' holds ",
                layer->experts->options.num_experts(), " of its ", E,
                " experts: apply_expert_parallel was already applied");
    TORCH_CHECK(E % comm->size() == 0, "expert_parallel (", comm->size(),
                ") must divide num_experts (", E, ") of MoE layer '", item.key(), "'");
    auto dispatcher = std::make_shared<AllToAllDispatcher>(comm, E, layer->options.dispatcher());
    const auto shard = expert_shard(E, comm->size(), comm->rank());
    layer->experts->keep_experts(shard.first, shard.count);
    layer->experts->shards = comm->size();
    layer->set_dispatcher(std::move(dispatcher));
    ++sharded;
  }
  return sharded;
}

double clip_grad_norm(torch::nn::Module& model, double max_norm, Communicator& expert_parallel,
                      const ExpertParameterRule& rule) {
  TORCH_CHECK(max_norm > 0, "clip_grad_norm max_norm (", max_norm, ") must be > 0");
  const auto is_shard = rule ? rule : expert_parameter_rule(model);
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> grads;
  // Squared norms of the dense gradients (equal on every rank) and of this rank's shards.
  auto squares = torch::zeros({2}, torch::kDouble);
  for (const auto& item : model.named_parameters()) {
    const auto& grad = item.value().grad();
    if (!grad.defined()) continue;
    grads.push_back(grad);
    squares[is_shard(item.key()) ? 1 : 0] += grad.to(torch::kDouble).pow(2).sum().cpu();
  }
  auto shards = squares.narrow(0, 1, 1).to(grads.empty() ? torch::kCPU : grads[0].device());
  expert_parallel.all_reduce(shards, ReduceOp::Sum);
  const double norm = std::sqrt(squares[0].item<double>() + shards.item<double>());
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1.0) {
    for (auto& grad : grads) grad.mul_(coef);
  }
  return norm;
}

}  // namespace gbmoe
