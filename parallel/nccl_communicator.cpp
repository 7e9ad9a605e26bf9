// NCCL backend: unique id over MPI, collectives on a communication stream ordered by CUDA events.
#include "parallel/nccl_communicator.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>

#include <functional>
#include <sstream>
#include <stdexcept>

#include "parallel/mpi_communicator.h"

namespace gbmoe {
namespace detail {

void throw_cuda_error(cudaError_t code, const char* expr, const char* file, int line) {
  std::ostringstream message;
  message << "CUDA error " << static_cast<int>(code) << " (" << cudaGetErrorString(code) << ") in "
          << expr << " at " << file << ":" << line;
  throw std::runtime_error(message.str());
}

void throw_nccl_error(ncclResult_t code, const char* expr, const char* file, int line) {
  std::ostringstream message;
  message << "NCCL error " << static_cast<int>(code) << " (" << ncclGetErrorString(code);
#if defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE >= NCCL_VERSION(2, 13, 0)
  const char* last = ncclGetLastError(nullptr);
  if (last != nullptr && last[0] != '\0') message << ": " << last;
#endif
  message << ") in " << expr << " at " << file << ":" << line;
  throw std::runtime_error(message.str());
}

}  // namespace detail

namespace {

// A CUDA event without timing: recorded on one stream, waited for by another. Plain CUDA, so
// this file needs only c10/cuda, not ATen's CUDA context (and its math-library headers).
class Event {
 public:
  explicit Event(int device) {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    GBMOE_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
  }
  ~Event() { cudaEventDestroy(event_); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  void record(const c10::cuda::CUDAStream& stream) {
    GBMOE_CUDA_CHECK(cudaEventRecord(event_, stream.stream()));
  }
  void block(const c10::cuda::CUDAStream& stream) {
    GBMOE_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), event_, 0));
  }

 private:
  cudaEvent_t event_ = nullptr;
};

// The event recorded after a collective on the communication stream; wait() orders the
// caller's current stream after it.
class NcclWork : public Work {
 public:
  NcclWork(std::shared_ptr<Event> done, int device, torch::Tensor result,
           std::function<void()> finish)
      : done_(std::move(done)), device_(device), finish_(std::move(finish)) {
    result_ = std::move(result);
  }

  void wait() override {
    if (waited_) return;
    waited_ = true;
    done_->block(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)));
    if (finish_) finish_();
  }

 private:
  std::shared_ptr<Event> done_;
  int device_;
  std::function<void()> finish_;
  bool waited_ = false;
};

ncclDataType_t nccl_reduce_type(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat:
      return ncclFloat32;
    case torch::kDouble:
      return ncclFloat64;
    case torch::kHalf:
      return ncclFloat16;
    case torch::kBFloat16:
      return ncclBfloat16;
    case torch::kChar:
      return ncclInt8;
    case torch::kInt:
      return ncclInt32;
    case torch::kLong:
      return ncclInt64;
    case torch::kByte:
    case torch::kBool:
      return ncclUint8;
    default:
      TORCH_CHECK(false, "NcclCommunicator cannot reduce dtype ", dtype,
                  "; supported: float, double, half, bfloat16, int8, int32, int64, uint8, bool");
  }
}

void check_cuda(const torch::Tensor& t, int device, const char* what) {
  TORCH_CHECK(t.defined(), "NcclCommunicator::", what, " got an undefined tensor");
  TORCH_CHECK(t.is_cuda() && t.get_device() == device, "NcclCommunicator::", what,
              " needs tensors on cuda:", device, ", got one on ", t.device());
}

std::shared_ptr<Event> record_done(c10::cuda::CUDAStream stream) {
  auto done = std::make_shared<Event>(stream.device_index());
  done->record(stream);
  return done;
}

}  // namespace

NcclCommunicator::NcclCommunicator(MPI_Comm bootstrap, int device)
    : device_(device < 0 ? static_cast<int>(c10::cuda::current_device()) : device),
      stream_(c10::cuda::getStreamFromPool(/*isHighPriority=*/true,
                                           static_cast<c10::DeviceIndex>(device_))) {
  GBMOE_MPI_CHECK(MPI_Comm_rank(bootstrap, &rank_));
  GBMOE_MPI_CHECK(MPI_Comm_size(bootstrap, &size_));
  ncclUniqueId id;
  if (rank_ == 0) GBMOE_NCCL_CHECK(ncclGetUniqueId(&id));
  GBMOE_MPI_CHECK(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, bootstrap));
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  GBMOE_NCCL_CHECK(ncclCommInitRank(&comm_, size_, id, rank_));
}

NcclCommunicator::~NcclCommunicator() {
  if (comm_ != nullptr) ncclCommDestroy(comm_);
}

c10::cuda::CUDAStream NcclCommunicator::begin(const std::vector<torch::Tensor>& tensors) {
  auto current = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_));
  Event ready(device_);
  ready.record(current);
  ready.block(stream_);
  // The allocator must not hand these blocks out again before the collective is done.
  for (const auto& t : tensors) {
    c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), stream_);
  }
  return stream_;
}

torch::Tensor NcclCommunicator::staged(const torch::Tensor& t) const {
  return t.to(torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(device_)));
}

std::shared_ptr<Work> NcclCommunicator::all_reduce_async(const torch::Tensor& t, ReduceOp op) {
  if (t.defined() && t.is_cpu()) {
    auto on_device = staged(t);
    all_reduce_async(on_device, op)->wait();
    t.copy_(on_device);
    return std::make_shared<CompletedWork>(t);
  }
  check_cuda(t, device_, "all_reduce");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(op != ReduceOp::Avg || torch::isFloatingType(dtype), "all_reduce with ",
              to_string(op), " needs a floating-point tensor, got ", dtype, "; use sum and divide");
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  auto buffer = t.is_contiguous() ? t : t.contiguous();
  ncclRedOp_t nccl_op = ncclSum;
  if (op == ReduceOp::Max || dtype == torch::kBool) nccl_op = ncclMax;
  if (op == ReduceOp::Avg) nccl_op = ncclAvg;
  auto stream = begin({buffer});
  GBMOE_NCCL_CHECK(ncclAllReduce(buffer.data_ptr(), buffer.data_ptr(),
                                 static_cast<size_t>(buffer.numel()), nccl_reduce_type(dtype),
                                 nccl_op, comm_, stream.stream()));
  auto finish = [t, buffer]() {
    if (!buffer.is_same(t)) t.copy_(buffer);
  };
  return std::make_shared<NcclWork>(record_done(stream), device_, t, std::move(finish));
}

torch::Tensor NcclCommunicator::all_gather(const torch::Tensor& t) {
  if (t.defined() && t.is_cpu()) return all_gather(staged(t)).cpu();
  check_cuda(t, device_, "all_gather");
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  auto input = t.contiguous();
  auto output = all_gather_output(input, size_);
  auto stream = begin({input, output});
  GBMOE_NCCL_CHECK(ncclAllGather(input.data_ptr(), output.data_ptr(),
                                 static_cast<size_t>(input.nbytes()), ncclInt8, comm_,
                                 stream.stream()));
  NcclWork(record_done(stream), device_, output, nullptr).wait();
  return output;
}

std::shared_ptr<Work> NcclCommunicator::all_to_all_async(const torch::Tensor& input,
                                                         const std::vector<int64_t>& send_splits,
                                                         const std::vector<int64_t>& recv_splits) {
  check_cuda(input, device_, "all_to_all");
  const int64_t recv_rows = check_all_to_all_splits(input, send_splits, recv_splits, size_);
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  auto in = input.contiguous();
  auto shape = in.sizes().vec();
  int64_t row_bytes = static_cast<int64_t>(in.element_size());
  for (size_t d = 1; d < shape.size(); ++d) row_bytes *= shape[d];
  shape[0] = recv_rows;
  auto out = torch::empty(shape, in.options());
  auto stream = begin({in, out});
  auto* send = static_cast<char*>(in.data_ptr());
  auto* recv = static_cast<char*>(out.data_ptr());
  GBMOE_NCCL_CHECK(ncclGroupStart());
  for (int j = 0; j < size_; ++j) {
    if (send_splits[j] > 0) {
      GBMOE_NCCL_CHECK(ncclSend(send, static_cast<size_t>(send_splits[j] * row_bytes), ncclInt8, j,
                                comm_, stream.stream()));
    }
    if (recv_splits[j] > 0) {
      GBMOE_NCCL_CHECK(ncclRecv(recv, static_cast<size_t>(recv_splits[j] * row_bytes), ncclInt8, j,
                                comm_, stream.stream()));
    }
    send += send_splits[j] * row_bytes;
    recv += recv_splits[j] * row_bytes;
  }
  GBMOE_NCCL_CHECK(ncclGroupEnd());
  return std::make_shared<NcclWork>(record_done(stream), device_, out, nullptr);
}

void NcclCommunicator::broadcast(const torch::Tensor& t, int root) {
  if (t.defined() && t.is_cpu()) {
    auto on_device = staged(t);
    broadcast(on_device, root);
    t.copy_(on_device);
    return;
  }
  check_cuda(t, device_, "broadcast");
  TORCH_CHECK(root >= 0 && root < size_, "broadcast root (", root, ") must be in [0, ", size_, ")");
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  auto buffer = t.is_contiguous() ? t : t.contiguous();
  auto stream = begin({buffer});
  GBMOE_NCCL_CHECK(ncclBroadcast(buffer.data_ptr(), buffer.data_ptr(),
                                 static_cast<size_t>(buffer.nbytes()), ncclInt8, root, comm_,
                                 stream.stream()));
  NcclWork(record_done(stream), device_, buffer, nullptr).wait();
  if (!buffer.is_same(t)) t.copy_(buffer);
}

void NcclCommunicator::barrier() {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  auto token = torch::zeros({1}, torch::TensorOptions()
                                     .dtype(torch::kFloat)
                                     .device(torch::kCUDA, static_cast<c10::DeviceIndex>(device_)));
  all_reduce(token, ReduceOp::Sum);
  GBMOE_CUDA_CHECK(cudaStreamSynchronize(
      c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream()));
}

}  // namespace gbmoe
