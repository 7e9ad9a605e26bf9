// MPI backend: CPU tensors, blocking and non-blocking MPI collectives, 16-bit floats reduced in
// fp32.
#include "parallel/mpi_communicator.h"

#include "parallel/node_shared_memory.h"
#include "parallel/runtime.h"

#include <climits>
#include <exception>
#include <functional>
#include <sstream>
#include <stdexcept>

namespace gbmoe {
namespace detail {

void throw_mpi_error(int code, const char* expr, const char* file, int line) {
  char text[MPI_MAX_ERROR_STRING] = {0};
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) {
    std::snprintf(text, sizeof(text), "unknown MPI error");
  }
  std::ostringstream message;
  message << "MPI error " << code << " (" << text << ") in " << expr << " at " << file << ":"
          << line;
  throw std::runtime_error(message.str());
}

}  // namespace detail

namespace {

bool mpi_finalized() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  return finalized != 0;
}

// The requests of one non-blocking MPI operation (none for a node-shared sum, whose finish
// collects it) and what must outlive them.
class MpiWork : public Work {
 public:
  MpiWork(std::vector<MPI_Request> requests, torch::Tensor result,
          std::vector<torch::Tensor> buffers, std::shared_ptr<void> arrays,
          std::function<void()> finish)
      : requests_(std::move(requests)),
        buffers_(std::move(buffers)),
        arrays_(std::move(arrays)),
        finish_(std::move(finish)) {
    result_ = std::move(result);
  }

  ~MpiWork() override {
    if (done_ || mpi_finalized()) return;
    try {
      wait();
    } catch (const std::exception&) {
      // A destructor cannot report; the error reaches whoever waits on the next collective.
    }
  }

  void wait() override {
    if (done_) return;
    done_ = true;
    if (!requests_.empty()) {
      CollectiveWatch watch("MPI_Waitall (a non-blocking all-reduce or all-to-all)", 0);
      GBMOE_MPI_CHECK(
          MPI_Waitall(static_cast<int>(requests_.size()), requests_.data(), MPI_STATUSES_IGNORE));
    }
    if (finish_) finish_();
    buffers_.clear();
    arrays_.reset();
  }

 private:
  std::vector<MPI_Request> requests_;
  std::vector<torch::Tensor> buffers_;
  std::shared_ptr<void> arrays_;  // count and displacement arrays of MPI_Ialltoallv
  std::function<void()> finish_;
  bool done_ = false;
};

int checked_count(int64_t n, const char* what) {
  TORCH_CHECK(n <= INT_MAX, what, " moves ", n, " elements, more than MPI's int count allows (",
              INT_MAX, "); split the tensor");
  return static_cast<int>(n);
}

void check_cpu(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.defined(), "MpiCommunicator::", what, " got an undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), "MpiCommunicator::", what, " needs CPU tensors, got one on ",
              t.device(), "; use NcclCommunicator for CUDA tensors");
}

bool is_16bit_float(torch::ScalarType dtype) {
  return dtype == torch::kBFloat16 || dtype == torch::kHalf;
}

}  // namespace

MPI_Datatype mpi_datatype(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat:
      return MPI_FLOAT;
    case torch::kDouble:
      return MPI_DOUBLE;
    case torch::kBFloat16:
    case torch::kHalf:
      return MPI_UINT16_T;
    case torch::kChar:
      return MPI_INT8_T;
    case torch::kShort:
      return MPI_INT16_T;
    case torch::kInt:
      return MPI_INT32_T;
    case torch::kLong:
      return MPI_INT64_T;
    case torch::kByte:
      return MPI_UINT8_T;
    case torch::kBool:
      return MPI_C_BOOL;
    default:
      TORCH_CHECK(false, "MpiCommunicator does not support dtype ", dtype,
                  "; supported: float, double, bfloat16, half, int8, int16, int32, int64, uint8, "
                  "bool");
  }
}

MpiCommunicator::MpiCommunicator(MPI_Comm comm, bool take_ownership)
    : comm_(comm), owned_(take_ownership) {
  TORCH_CHECK(comm != MPI_COMM_NULL, "MpiCommunicator needs a valid MPI_Comm, got MPI_COMM_NULL");
  GBMOE_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  GBMOE_MPI_CHECK(MPI_Comm_size(comm_, &size_));
}

MpiCommunicator::~MpiCommunicator() {
  // The windows go before the communicator, in the same order on every rank; the sums still in
  // flight are collected first, so their Works (which hold the sums' window weakly) can finish.
  // Not while unwinding from an exception, when the peers may never post them.
  if (!mpi_finalized() && std::uncaught_exceptions() == 0 && shared_sums_) {
    shared_sums_->collect_all();
  }
  shared_sums_.reset();
  shared_all_reduce_.reset();
  if (owned_ && !mpi_finalized()) MPI_Comm_free(&comm_);
}

namespace {

// An all_reduce ready for MPI: the contiguous buffer reduced in place (fp32 for 16-bit floats).
struct ReducePlan {
  torch::Tensor buffer;
  MPI_Datatype type;
  MPI_Op op;
  int count;
};

ReducePlan plan_reduce(const torch::Tensor& t, ReduceOp op) {
  check_cpu(t, "all_reduce");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(op != ReduceOp::Avg || torch::isFloatingType(dtype), "all_reduce with ",
              to_string(op), " needs a floating-point tensor, got ", dtype, "; use sum and divide");
  ReducePlan plan;
  if (is_16bit_float(dtype)) {
    plan.buffer = t.to(torch::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
  } else {
    plan.buffer = t.is_contiguous() ? t : t.contiguous();
  }
  plan.type = mpi_datatype(plan.buffer.scalar_type());
  plan.op = MPI_SUM;
  if (dtype == torch::kBool) {
    plan.op = MPI_LOR;
  } else if (op == ReduceOp::Max) {
    plan.op = MPI_MAX;
  }
  plan.count = checked_count(plan.buffer.numel(), "all_reduce");
  return plan;
}

void finish_reduce(const torch::Tensor& t, const torch::Tensor& buffer, ReduceOp op, int size) {
  if (op == ReduceOp::Avg) buffer.div_(size);
  if (!buffer.is_same(t)) t.copy_(buffer);
}

// An all_to_all ready for MPI: contiguous input, output, and the four int arrays (send counts,
// send displacements, recv counts, recv displacements, in elements) that must outlive it.
struct AllToAllPlan {
  torch::Tensor in;
  torch::Tensor out;
  std::shared_ptr<std::vector<int>> arrays;
  MPI_Datatype type;
  int* array(int i) const { return arrays->data() + i * (arrays->size() / 4); }
};

AllToAllPlan plan_all_to_all(const torch::Tensor& input, const std::vector<int64_t>& send_splits,
                             const std::vector<int64_t>& recv_splits, int size) {
  check_cpu(input, "all_to_all");
  const int64_t recv_rows = check_all_to_all_splits(input, send_splits, recv_splits, size);
  AllToAllPlan plan;
  plan.in = input.contiguous();
  auto shape = plan.in.sizes().vec();
  int64_t row_elems = 1;
  for (size_t d = 1; d < shape.size(); ++d) row_elems *= shape[d];
  shape[0] = recv_rows;
  plan.out = torch::empty(shape, plan.in.options());
  plan.type = mpi_datatype(plan.in.scalar_type());
  plan.arrays = std::make_shared<std::vector<int>>(4 * size);
  int64_t send_offset = 0, recv_offset = 0;
  for (int j = 0; j < size; ++j) {
    plan.array(0)[j] = checked_count(send_splits[j] * row_elems, "all_to_all");
    plan.array(1)[j] = checked_count(send_offset, "all_to_all");
    plan.array(2)[j] = checked_count(recv_splits[j] * row_elems, "all_to_all");
    plan.array(3)[j] = checked_count(recv_offset, "all_to_all");
    send_offset += send_splits[j] * row_elems;
    recv_offset += recv_splits[j] * row_elems;
  }
  return plan;
}

}  // namespace

// The blocking calls use MPI's blocking collectives: in Open MPI they take the tuned algorithms,
// while the non-blocking ones go through libnbc, which is slower for large buffers.
void MpiCommunicator::all_reduce(const torch::Tensor& t, ReduceOp op) {
  auto plan = plan_reduce(t, op);
  if (size_ > 1 && plan.op != MPI_LOR && detail::NodeSharedAllReduce::handles(plan.buffer)) {
    if (auto* shared = node_shared_all_reduce()) {
      shared->all_reduce(plan.buffer, /*take_max=*/op == ReduceOp::Max);
      finish_reduce(t, plan.buffer, op, size_);
      return;
    }
  }
  CollectiveWatch watch("MPI_Allreduce", size_);
  GBMOE_MPI_CHECK(
      MPI_Allreduce(MPI_IN_PLACE, plan.buffer.data_ptr(), plan.count, plan.type, plan.op, comm_));
  finish_reduce(t, plan.buffer, op, size_);
}

detail::NodeSharedAllReduce* MpiCommunicator::node_shared_all_reduce() {
  if (!shared_all_reduce_set_up_) {
    shared_all_reduce_ =
        detail::NodeSharedAllReduce::create(comm_, rank_, size_, shared_memory_allowed_);
    shared_all_reduce_set_up_ = true;
  }
  return shared_all_reduce_.get();
}

void MpiCommunicator::sum_divided(const std::vector<torch::Tensor>& tensors, double divisor,
                                  const torch::Tensor& staging) {
  // A rank whose tensors are not contiguous takes the default, whose all_reduce of staging goes
  // through the same chunks and phases of the window: the ranks need not agree on the path.
  check_sum_divided(tensors, staging);
  if (size_ > 1 && detail::NodeSharedAllReduce::handles(tensors)) {
    if (auto* shared = node_shared_all_reduce()) {
      shared->sum_divided(
          tensors, torch::scalar_tensor(divisor, tensors.front().options().device(torch::kCPU)));
      return;
    }
  }
  Communicator::sum_divided(tensors, divisor, staging);
}

std::shared_ptr<Work> MpiCommunicator::all_reduce_async(const torch::Tensor& t, ReduceOp op) {
  auto plan = plan_reduce(t, op);
  MPI_Request request;
  GBMOE_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, plan.buffer.data_ptr(), plan.count, plan.type,
                                 plan.op, comm_, &request));
  const int size = size_;
  auto buffer = plan.buffer;
  return std::make_shared<MpiWork>(std::vector<MPI_Request>{request}, t,
                                   std::vector<torch::Tensor>{t, buffer}, nullptr,
                                   [t, buffer, op, size] { finish_reduce(t, buffer, op, size); });
}

void MpiCommunicator::use_node_shared_memory(bool allowed) {
  TORCH_CHECK(!shared_sums_set_up_ && !shared_all_reduce_set_up_, "use_node_shared_memory(",
              allowed, ") after the first sum_one_round_async or ",
              "large all_reduce: call it before them");
  shared_memory_allowed_ = allowed;
}

// Every rank's buffer reaches every other rank, and each adds the R rows in rank order, so
// every rank holds the same sum.
std::shared_ptr<Work> MpiCommunicator::sum_one_round_async(const torch::Tensor& t) {
  check_cpu(t, "sum_one_round_async");
  if (!shared_sums_set_up_) {
    if (size_ > 1) {
      shared_sums_ = detail::NodeSharedSum::create(comm_, rank_, size_, shared_memory_allowed_);
    }
    shared_sums_set_up_ = true;
  }
  auto rows = torch::empty({size_, t.numel()}, t.options());  // row j: rank j's buffer
  rows[rank_].copy_(t.reshape(-1));
  if (!shared_sums_ || !shared_sums_->fits(t.nbytes())) return sum_by_messages(t, rows);
  const int64_t number = shared_sums_->post(rows);
  // No request: the wait collects the peers' rows from shared memory and adds them.
  return std::make_shared<MpiWork>(
      std::vector<MPI_Request>{}, t, std::vector<torch::Tensor>{t, rows}, nullptr,
      [area = std::weak_ptr<detail::NodeSharedSum>(shared_sums_), number, t, rows] {
        // Gone: the communicator collected it when destroyed.
        if (auto live = area.lock()) live->collect(number);
        t.copy_(rows.sum(0).view(t.sizes()));
      });
}

std::shared_ptr<Work> MpiCommunicator::sum_by_messages(const torch::Tensor& t,
                                                       const torch::Tensor& rows) {
  const int count = checked_count(t.numel(), "sum_one_round_async");
  const auto type = mpi_datatype(t.scalar_type());
  // Receives first, then the sends (requests[R - 1 ...]).
  std::vector<MPI_Request> requests;
  for (int j = 0; j < size_; ++j) {
    if (j == rank_) continue;
    requests.emplace_back();
    GBMOE_MPI_CHECK(
        MPI_Irecv(rows[j].data_ptr(), count, type, j, kOneRoundSumTag, comm_, &requests.back()));
  }
  for (int j = 0; j < size_; ++j) {
    if (j == rank_) continue;
    requests.emplace_back();
    GBMOE_MPI_CHECK(MPI_Isend(rows[rank_].data_ptr(), count, type, j, kOneRoundSumTag, comm_,
                              &requests.back()));
  }
  // Push the sends out now: a small (eager) send completes once its data has left, which may
  // take a few passes of MPI's progress; larger ones need the receiver, so the passes are
  // bounded and the wait finishes them. (Spinning up to 50 ms instead cost global balancing 8%
  // at 4 ranks on 2 cores: the sends often do not complete while the peers compute.)
  MPI_Request* sends = requests.data() + (size_ - 1);
  for (int pass = 0, sent = 0; pass < kOneRoundSumPushPasses && !sent; ++pass) {
    GBMOE_MPI_CHECK(MPI_Testall(size_ - 1, sends, &sent, MPI_STATUSES_IGNORE));
  }
  return std::make_shared<MpiWork>(std::move(requests), t, std::vector<torch::Tensor>{t, rows},
                                   nullptr, [t, rows] { t.copy_(rows.sum(0).view(t.sizes())); });
}

torch::Tensor MpiCommunicator::all_gather(const torch::Tensor& t) {
  check_cpu(t, "all_gather");
  auto input = t.contiguous();
  auto output = all_gather_output(input, size_);
  const int count = checked_count(input.numel(), "all_gather");
  const auto type = mpi_datatype(input.scalar_type());
  CollectiveWatch watch("MPI_Allgather", size_);
  GBMOE_MPI_CHECK(
      MPI_Allgather(input.data_ptr(), count, type, output.data_ptr(), count, type, comm_));
  return output;
}

torch::Tensor MpiCommunicator::all_to_all(const torch::Tensor& input,
                                          const std::vector<int64_t>& send_splits,
                                          const std::vector<int64_t>& recv_splits) {
  auto plan = plan_all_to_all(input, send_splits, recv_splits, size_);
  CollectiveWatch watch("MPI_Alltoallv", size_);
  GBMOE_MPI_CHECK(MPI_Alltoallv(plan.in.data_ptr(), plan.array(0), plan.array(1), plan.type,
                                plan.out.data_ptr(), plan.array(2), plan.array(3), plan.type,
                                comm_));
  return plan.out;
}

std::shared_ptr<Work> MpiCommunicator::all_to_all_async(const torch::Tensor& input,
                                                        const std::vector<int64_t>& send_splits,
                                                        const std::vector<int64_t>& recv_splits) {
  auto plan = plan_all_to_all(input, send_splits, recv_splits, size_);
  MPI_Request request;
  GBMOE_MPI_CHECK(MPI_Ialltoallv(plan.in.data_ptr(), plan.array(0), plan.array(1), plan.type,
                                 plan.out.data_ptr(), plan.array(2), plan.array(3), plan.type,
                                 comm_, &request));
  return std::make_shared<MpiWork>(std::vector<MPI_Request>{request}, plan.out,
                                   std::vector<torch::Tensor>{plan.in, plan.out}, plan.arrays,
                                   nullptr);
}

void MpiCommunicator::broadcast(const torch::Tensor& t, int root) {
  check_cpu(t, "broadcast");
  TORCH_CHECK(root >= 0 && root < size_, "broadcast root (", root, ") must be in [0, ", size_, ")");
  auto buffer = t.is_contiguous() ? t : t.contiguous();
  CollectiveWatch watch("MPI_Bcast", size_);
  GBMOE_MPI_CHECK(MPI_Bcast(buffer.data_ptr(), checked_count(buffer.numel(), "broadcast"),
                            mpi_datatype(buffer.scalar_type()), root, comm_));
  if (!buffer.is_same(t)) t.copy_(buffer);
}

void MpiCommunicator::barrier() {
  CollectiveWatch watch("MPI_Barrier", size_);
  GBMOE_MPI_CHECK(MPI_Barrier(comm_));
}

}  // namespace gbmoe
