// The MPI backend of Communicator, for CPU tensors, and the GBMOE_MPI_CHECK macro.
#pragma once

#include <mpi.h>

#include <memory>
#include <string>

#include "parallel/communicator.h"

namespace gbmoe {
namespace detail {
[[noreturn]] void throw_mpi_error(int code, const char* expr, const char* file, int line);
class NodeSharedSum;
class NodeSharedAllReduce;
}  // namespace detail

/// Throws std::runtime_error with the file, line, call and MPI_Error_string when an MPI call
/// fails. Communicators made by gbmoe return errors instead of aborting, so the check sees them.
#define GBMOE_MPI_CHECK(expr)                                                     \
  do {                                                                            \
    const int gbmoe_mpi_rc_ = (expr);                                             \
    if (gbmoe_mpi_rc_ != MPI_SUCCESS) {                                           \
      ::gbmoe::detail::throw_mpi_error(gbmoe_mpi_rc_, #expr, __FILE__, __LINE__); \
    }                                                                             \
  } while (0)

/// The MPI datatype that moves elements of a dtype (bfloat16 and half travel as 16-bit words).
/// Throws for dtypes MPI cannot carry, listing the supported ones.
MPI_Datatype mpi_datatype(torch::ScalarType dtype);

/// Communicator over an MPI communicator, for contiguous or strided CPU tensors of float,
/// double, bfloat16, half, int8/16/32/64, uint8 and bool. MPI has no 16-bit float reductions,
/// so bfloat16 and half are reduced in fp32 and rounded back once. Sum and Max on bool are
/// logical or. Asynchronous calls use non-blocking MPI collectives (MPI_Iallreduce,
/// MPI_Ialltoallv); a Work owns the request and the buffers. Ranks on one node share some
/// collectives through MPI-3 shared memory (all_reduce, sum_one_round_async): a Work of those
/// holds no request, and its wait reads the peers' shared segments.
///
/// Example:
///   MpiRuntime mpi(&argc, &argv);
///   MpiCommunicator world(MPI_COMM_WORLD);
///   auto x = torch::ones({4});
///   auto work = world.all_reduce_async(x, ReduceOp::Avg);
///   compute_something_else();
///   work->wait();
class MpiCommunicator : public Communicator {
 public:
  /// The tag of sum_one_round_async's messages (no other point-to-point traffic uses it).
  static constexpr int kOneRoundSumTag = 0x6b6d;
  /// Passes of MPI progress sum_one_round_async makes to send its buffer before it returns.
  static constexpr int kOneRoundSumPushPasses = 1000;
  /// Wraps comm. With take_ownership the communicator is freed (MPI_Comm_free) on
  /// destruction, unless MPI is already finalized.
  explicit MpiCommunicator(MPI_Comm comm, bool take_ownership = false);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }

  /// Large buffers (64 KiB and more, not bool) of a group on one node go through an MPI-3
  /// shared-memory window in 4 MiB chunks (detail::NodeSharedAllReduce: each rank reduces
  /// 1/size of every chunk, in rank order), the same bits on every rank; the rest through
  /// MPI_Allreduce. Max there is torch::maximum's: a NaN anywhere gives NaN.
  void all_reduce(const torch::Tensor& t, ReduceOp op = ReduceOp::Sum) override;
  std::shared_ptr<Work> all_reduce_async(const torch::Tensor& t,
                                         ReduceOp op = ReduceOp::Sum) override;
  /// Where all_reduce would take the tensors' concatenation through node shared memory and they
  /// are contiguous fp32 or fp64: straight from the tensors into the window and back, divided on
  /// the way out, with staging unused: the same bits as the default, without its two passes
  /// through staging. Otherwise the default.
  void sum_divided(const std::vector<torch::Tensor>& tensors, double divisor,
                   const torch::Tensor& staging) override;
  /// When every rank of the group is on one node: through an MPI-3 shared-memory window
  /// (detail::NodeSharedSum, buffers up to 32 KiB), so that neither posting nor waiting makes an
  /// MPI call. An MPI call in the middle of a step is not free: with more ranks than cores Open
  /// MPI yields the core in every call (mpi_yield_when_idle). Otherwise, and for larger
  /// buffers, point-to-point messages (MPI_Isend / MPI_Irecv, tag kOneRoundSumTag): small
  /// buffers travel eagerly (btl_vader_eager_limit, 4 KiB), so a wait needs the other ranks
  /// only to have started their sum, not to be inside MPI at the time, as MPI_Iallreduce
  /// (libnbc) would. Both add the rows in rank order and give the same bits. The first call
  /// sets up the window (collective).
  std::shared_ptr<Work> sum_one_round_async(const torch::Tensor& t) override;
  /// Whether all_reduce and sum_one_round_async may use node shared memory; every rank must
  /// pass the same value before the first of them. Default true; GBMOE_NODE_SHARED_MEMORY=0
  /// (read on rank 0) turns it off for the whole job.
  void use_node_shared_memory(bool allowed);
  /// Whether sum_one_round_async has set up node shared memory, which then takes every buffer
  /// of up to 32 KiB (false before the first call).
  bool uses_node_shared_sums() const { return shared_sums_ != nullptr; }
  /// Whether all_reduce has set up node shared memory for large buffers (false before the first
  /// large one).
  bool uses_node_shared_all_reduce() const { return shared_all_reduce_ != nullptr; }
  torch::Tensor all_gather(const torch::Tensor& t) override;
  torch::Tensor all_to_all(const torch::Tensor& input, const std::vector<int64_t>& send_splits,
                           const std::vector<int64_t>& recv_splits) override;
  std::shared_ptr<Work> all_to_all_async(const torch::Tensor& input,
                                         const std::vector<int64_t>& send_splits,
                                         const std::vector<int64_t>& recv_splits) override;
  void broadcast(const torch::Tensor& t, int root = 0) override;
  void barrier() override;

  MPI_Comm comm() const { return comm_; }

 private:
  // rows: (size, numel), this rank's buffer in row rank.
  std::shared_ptr<Work> sum_by_messages(const torch::Tensor& t, const torch::Tensor& rows);
  // The node shared all-reduce, set up (collectively) at the first call; null where it is off.
  detail::NodeSharedAllReduce* node_shared_all_reduce();

  MPI_Comm comm_;
  bool owned_;
  int rank_ = 0;
  int size_ = 1;
  bool shared_memory_allowed_ = true;
  bool shared_sums_set_up_ = false;
  bool shared_all_reduce_set_up_ = false;
  std::shared_ptr<detail::NodeSharedSum> shared_sums_;              // null: messages
  std::shared_ptr<detail::NodeSharedAllReduce> shared_all_reduce_;  // null: MPI_Allreduce
};

}  // namespace gbmoe
