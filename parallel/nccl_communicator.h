// The NCCL backend of Communicator, for CUDA tensors, bootstrapped over MPI; and the
// GBMOE_CUDA_CHECK / GBMOE_NCCL_CHECK macros. Built only with CUDA LibTorch and NCCL.
#pragma once

#include <cuda_runtime_api.h>
#include <mpi.h>
#include <nccl.h>

#include <c10/cuda/CUDAStream.h>

#include "parallel/communicator.h"

namespace gbmoe {
namespace detail {
[[noreturn]] void throw_cuda_error(cudaError_t code, const char* expr, const char* file, int line);
[[noreturn]] void throw_nccl_error(ncclResult_t code, const char* expr, const char* file, int line);
}  // namespace detail

/// Throws std::runtime_error with the file, line, call and cudaGetErrorString on failure.
#define GBMOE_CUDA_CHECK(expr)                                                      \
  do {                                                                              \
    const cudaError_t gbmoe_cuda_rc_ = (expr);                                      \
    if (gbmoe_cuda_rc_ != cudaSuccess) {                                            \
      ::gbmoe::detail::throw_cuda_error(gbmoe_cuda_rc_, #expr, __FILE__, __LINE__); \
    }                                                                               \
  } while (0)

/// Throws std::runtime_error with the file, line, call, ncclGetErrorString and NCCL's last
/// error message on failure.
#define GBMOE_NCCL_CHECK(expr)                                                      \
  do {                                                                              \
    const ncclResult_t gbmoe_nccl_rc_ = (expr);                                     \
    if (gbmoe_nccl_rc_ != ncclSuccess) {                                            \
      ::gbmoe::detail::throw_nccl_error(gbmoe_nccl_rc_, #expr, __FILE__, __LINE__); \
    }                                                                               \
  } while (0)

/// Communicator over NCCL for CUDA tensors on one device. Collectives run on a communication
/// stream that first waits for the caller's current stream; Work::wait() makes the current
/// stream wait for the collective (it does not block the host), so compute queued after it is
/// ordered correctly and compute queued before it overlaps the transfer. Sum, Max and Avg run
/// natively in every float dtype (bfloat16 included); bool reduces as logical or. CPU tensors
/// (a trainer's scalars and statistics) are staged through the device and reduced, gathered or
/// broadcast synchronously; all_to_all needs CUDA tensors.
///
/// Example:
///   MpiRuntime mpi(&argc, &argv);
///   c10::cuda::set_device(local_rank);
///   NcclCommunicator world(MPI_COMM_WORLD);
///   auto x = torch::ones({4}, torch::kCUDA);
///   world.all_reduce(x, ReduceOp::Avg);
class NcclCommunicator : public Communicator {
 public:
  /// Collective over bootstrap: its rank 0 creates the NCCL unique id and MPI_Bcast hands it
  /// to the others. device -1 = the current CUDA device. bootstrap may be freed afterwards.
  explicit NcclCommunicator(MPI_Comm bootstrap, int device = -1);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "nccl"; }

  std::shared_ptr<Work> all_reduce_async(const torch::Tensor& t,
                                         ReduceOp op = ReduceOp::Sum) override;
  torch::Tensor all_gather(const torch::Tensor& t) override;
  std::shared_ptr<Work> all_to_all_async(const torch::Tensor& input,
                                         const std::vector<int64_t>& send_splits,
                                         const std::vector<int64_t>& recv_splits) override;
  void broadcast(const torch::Tensor& t, int root = 0) override;
  void barrier() override;

  int device() const { return device_; }

 private:
  /// A copy of a CPU tensor on this communicator's device.
  torch::Tensor staged(const torch::Tensor& t) const;
  /// Makes the communication stream wait for the current stream; returns it.
  c10::cuda::CUDAStream begin(const std::vector<torch::Tensor>& tensors);

  ncclComm_t comm_ = nullptr;
  int rank_ = 0;
  int size_ = 1;
  int device_ = 0;
  c10::cuda::CUDAStream stream_;
};

}  // namespace gbmoe
