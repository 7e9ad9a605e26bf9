// Backend-independent parts of the Communicator: synchronous defaults, split checks and the
// autograd node of all_to_all.
#include "parallel/communicator.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <numeric>

namespace gbmoe {

std::string to_string(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum:
      return "sum";
    case ReduceOp::Max:
      return "max";
    case ReduceOp::Avg:
      return "avg";
  }
  return "unknown";
}

void Communicator::all_reduce(const torch::Tensor& t, ReduceOp op) {
  all_reduce_async(t, op)->wait();
}

void Communicator::check_sum_divided(const std::vector<torch::Tensor>& tensors,
                                     const torch::Tensor& staging) {
  TORCH_CHECK(!tensors.empty(), "sum_divided needs at least one tensor");
  int64_t numel = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.defined() && tensors[0].defined() &&
                    t.scalar_type() == tensors[0].scalar_type() &&
                    t.device() == tensors[0].device(),
                "sum_divided: tensor ", i, " (", t.defined() ? t.toString() : "undefined",
                ") is undefined or differs in dtype or device from tensor 0");
    numel += t.numel();
  }
  TORCH_CHECK(staging.defined() && staging.dim() == 1 && staging.is_contiguous() &&
                  staging.numel() >= numel && staging.scalar_type() == tensors[0].scalar_type() &&
                  staging.device() == tensors[0].device(),
              "sum_divided: staging (", staging.defined() ? staging.toString() : "undefined",
              " of ", staging.defined() ? staging.numel() : 0, " elements, ",
              staging.defined() ? staging.dim() : 0, "-dim) must be a contiguous 1-dim buffer of ",
              "the tensors' dtype and device (", tensors[0].toString(), ") with at least ", numel,
              " elements");
}

void Communicator::sum_divided(const std::vector<torch::Tensor>& tensors, double divisor,
                               const torch::Tensor& staging) {
  check_sum_divided(tensors, staging);
  int64_t numel = 0;
  for (const auto& t : tensors) numel += t.numel();
  auto flat = staging.narrow(0, 0, numel);
  int64_t offset = 0;
  for (const auto& t : tensors) {
    flat.narrow(0, offset, t.numel()).view(t.sizes()).copy_(t);
    offset += t.numel();
  }
  all_reduce(flat, ReduceOp::Sum);
  const auto d = torch::scalar_tensor(divisor, flat.options());
  offset = 0;
  for (auto out : tensors) {  // a handle on the same storage
    torch::div_out(out, flat.narrow(0, offset, out.numel()).view(out.sizes()), d);
    offset += out.numel();
  }
}

torch::Tensor Communicator::all_to_all(const torch::Tensor& input,
                                       const std::vector<int64_t>& send_splits,
                                       const std::vector<int64_t>& recv_splits) {
  auto work = all_to_all_async(input, send_splits, recv_splits);
  work->wait();
  return work->result();
}

torch::Tensor all_gather_output(const torch::Tensor& input, int size) {
  auto shape = input.sizes().vec();
  if (shape.empty()) {
    shape.push_back(size);
  } else {
    shape[0] *= size;
  }
  return torch::empty(shape, input.options());
}

int64_t check_all_to_all_splits(const torch::Tensor& input, const std::vector<int64_t>& send_splits,
                                const std::vector<int64_t>& recv_splits, int group_size) {
  TORCH_CHECK(input.dim() >= 1, "all_to_all input must have at least one dim (rows), got shape ",
              input.sizes());
  TORCH_CHECK(static_cast<int>(send_splits.size()) == group_size &&
                  static_cast<int>(recv_splits.size()) == group_size,
              "all_to_all needs one split per rank: send_splits has ", send_splits.size(),
              " and recv_splits ", recv_splits.size(), " entries for a group of size ", group_size);
  for (int j = 0; j < group_size; ++j) {
    TORCH_CHECK(send_splits[j] >= 0 && recv_splits[j] >= 0,
                "all_to_all splits must be >= 0: ", "send_splits[", j, "] = ", send_splits[j],
                ", recv_splits[", j, "] = ", recv_splits[j]);
  }
  const int64_t sent = std::accumulate(send_splits.begin(), send_splits.end(), int64_t{0});
  TORCH_CHECK(sent == input.size(0), "all_to_all send_splits sum to ", sent, " but the input has ",
              input.size(0), " rows (shape ", input.sizes(), ")");
  return std::accumulate(recv_splits.begin(), recv_splits.end(), int64_t{0});
}

namespace {

// Autograd nodes are held by std::shared_ptr in older LibTorch and by c10::intrusive_ptr in newer
// ones (2.13 has the latter); the pointer type of Edge::function tells which.
template <typename NodePtr>
struct NodeMaker;
template <typename N>
struct NodeMaker<std::shared_ptr<N>> {
  template <typename T, typename... Args>
  static std::shared_ptr<T> make(Args&&... args) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  }
};
template <typename N>
struct NodeMaker<c10::intrusive_ptr<N>> {
  template <typename T, typename... Args>
  static c10::intrusive_ptr<T> make(Args&&... args) {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
};
template <typename T, typename... Args>
auto make_node(Args&&... args) {
  using NodePtr = decltype(torch::autograd::Edge::function);
  return NodeMaker<NodePtr>::template make<T>(std::forward<Args>(args)...);
}

// Backward of all_to_all_autograd: the reverse exchange sends each gradient row home.
class AllToAllBackward : public torch::autograd::Node {
 public:
  AllToAllBackward(std::shared_ptr<Communicator> comm, std::vector<int64_t> send_splits,
                   std::vector<int64_t> recv_splits, std::vector<int64_t> input_shape,
                   torch::TensorOptions options)
      : comm_(std::move(comm)),
        send_splits_(std::move(send_splits)),
        recv_splits_(std::move(recv_splits)),
        input_shape_(std::move(input_shape)),
        options_(options) {}

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    torch::Tensor grad_out = grads[0];
    if (!grad_out.defined()) {
      // The output took no part in the loss here; the peers still expect this rank's rows.
      auto shape = input_shape_;
      shape[0] = std::accumulate(recv_splits_.begin(), recv_splits_.end(), int64_t{0});
      grad_out = torch::zeros(shape, options_);
    }
    return {comm_->all_to_all(grad_out.contiguous(), recv_splits_, send_splits_)};
  }

  std::string name() const override { return "gbmoe::AllToAllBackward"; }

 private:
  std::shared_ptr<Communicator> comm_;
  std::vector<int64_t> send_splits_;
  std::vector<int64_t> recv_splits_;
  std::vector<int64_t> input_shape_;
  torch::TensorOptions options_;
};

}  // namespace

torch::Tensor all_to_all_autograd(std::shared_ptr<Communicator> comm, const torch::Tensor& x,
                                  std::vector<int64_t> send_splits,
                                  std::vector<int64_t> recv_splits) {
  TORCH_CHECK(comm, "all_to_all_autograd needs a communicator, got null");
  torch::Tensor out;
  {
    torch::NoGradGuard no_grad;
    out = comm->all_to_all(x.detach(), send_splits, recv_splits);
  }
  if (torch::GradMode::is_enabled() && x.requires_grad()) {
    auto node = make_node<AllToAllBackward>(comm, std::move(send_splits), std::move(recv_splits),
                                            x.sizes().vec(), x.options());
    node->set_next_edges(torch::autograd::collect_next_edges(x));
    torch::autograd::set_history(out, node);
  }
  return out;
}

}  // namespace gbmoe
