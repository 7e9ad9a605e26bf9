// The Communicator interface: collectives over tensors shared by the MPI (CPU) and NCCL (CUDA)
// backends, their asynchronous handles, and the autograd-aware all-to-all.
#pragma once

#include <torch/torch.h>

#include <memory>
#include <string>
#include <vector>

namespace gbmoe {

/// Reduction of all_reduce. Avg is the sum divided by size() and needs a floating dtype.
enum class ReduceOp { Sum, Max, Avg };

std::string to_string(ReduceOp op);

/// Handle of an asynchronous collective. The tensors involved stay alive until the operation
/// is complete; destroying an unfinished Work waits for it.
class Work {
 public:
  virtual ~Work() = default;
  /// Blocks until the operation is complete and its output is in place.
  virtual void wait() = 0;
  /// The output: the reduced tensor (in place) or the received rows. Valid after wait().
  const torch::Tensor& result() const { return result_; }

 protected:
  torch::Tensor result_;
};

/// A Work that is complete when created: what a backend returns for an operation it ran
/// synchronously.
class CompletedWork : public Work {
 public:
  explicit CompletedWork(torch::Tensor result) { result_ = std::move(result); }
  void wait() override {}
};

/// Collectives among the ranks of one group. Every rank of the group must make the same calls
/// in the same order; shapes may differ only where a method says so. Tensors are taken as
/// const references because the collectives write into their storage, as torch's in-place ops
/// do. Groups are passed in (see process_groups.h), never looked up globally.
///
/// Example:
///   auto groups = build_process_groups(ParallelSizes{world_size}, MPI_COMM_WORLD);
///   auto counts_E = torch::bincount(ids, {}, E);
///   groups.world->all_reduce(counts_E, ReduceOp::Sum);  // every rank holds the global counts
///   auto rows = groups.expert_parallel->all_to_all(x_ND, send_splits, recv_splits);
class Communicator {
 public:
  virtual ~Communicator() = default;

  /// This process's index in the group, in [0, size()).
  virtual int rank() const = 0;
  /// Number of ranks in the group.
  virtual int size() const = 0;
  /// Backend name for messages: "mpi" or "nccl".
  virtual std::string backend() const = 0;

  /// Reduces t over the group, in place: afterwards every rank holds the result.
  virtual void all_reduce(const torch::Tensor& t, ReduceOp op = ReduceOp::Sum);
  virtual std::shared_ptr<Work> all_reduce_async(const torch::Tensor& t,
                                                 ReduceOp op = ReduceOp::Sum) = 0;

  /// Sums each of tensors over the group, in place, each sum then divided by divisor (as
  /// torch::div_out by a 0-dim tensor of their dtype): what DataParallel averages gradients with,
  /// where the divisor need not be size(). The tensors share a dtype and a device, do not
  /// overlap in memory, and have the same sizes on every rank; staging is a contiguous 1-dim
  /// buffer of that dtype and device with room for all of them (check_sum_divided). Default:
  /// copy the tensors into staging, all_reduce(Sum) it, divide back out; a backend may reduce
  /// the tensors where they are and leave staging alone.
  virtual void sum_divided(const std::vector<torch::Tensor>& tensors, double divisor,
                           const torch::Tensor& staging);
  /// The checks of sum_divided's arguments, which every rank makes before choosing a path, so
  /// that a bad call fails on every rank instead of leaving some waiting in a collective.
  static void check_sum_divided(const std::vector<torch::Tensor>& tensors,
                                const torch::Tensor& staging);

  /// Sum of a small buffer over the group, in place, as all_reduce_async, but in one round of
  /// messages where the backend has them, so that a rank's wait needs the others only to have
  /// started theirs: what the balance counts use (a few hundred values per micro-batch). The
  /// result is the same on every rank. Default: all_reduce_async(t, Sum).
  virtual std::shared_ptr<Work> sum_one_round_async(const torch::Tensor& t) {
    return all_reduce_async(t, ReduceOp::Sum);
  }

  /// t: (d0, ...) of the same shape on every rank. Returns (size() * d0, ...): rank 0's rows
  /// first. A 0-dim t gives (size(),).
  virtual torch::Tensor all_gather(const torch::Tensor& t) = 0;

  /// Exchanges rows along dim 0. input: (sum(send_splits), ...); send_splits[j] rows go to rank
  /// j, in order; recv_splits[j] rows arrive from rank j. Returns (sum(recv_splits), ...). Both
  /// vectors have size() entries, zeros allowed; recv_splits must match the senders'
  /// send_splits. No autograd: see all_to_all_autograd.
  virtual torch::Tensor all_to_all(const torch::Tensor& input,
                                   const std::vector<int64_t>& send_splits,
                                   const std::vector<int64_t>& recv_splits);
  virtual std::shared_ptr<Work> all_to_all_async(const torch::Tensor& input,
                                                 const std::vector<int64_t>& send_splits,
                                                 const std::vector<int64_t>& recv_splits) = 0;

  /// Copies root's t into every rank's t, in place.
  virtual void broadcast(const torch::Tensor& t, int root = 0) = 0;

  /// Returns when every rank of the group has entered it.
  virtual void barrier() = 0;
};

/// all_to_all that autograd sees: the gradient of the output returns to the senders by the
/// reverse all_to_all (splits swapped). Every rank of the group must run the backward through
/// it, as for any collective. The communicator is kept alive until the backward has run.
///
/// Example:
///   auto recv_ND = all_to_all_autograd(groups.expert_parallel, send_ND, send_splits, recv_splits);
torch::Tensor all_to_all_autograd(std::shared_ptr<Communicator> comm, const torch::Tensor& x,
                                  std::vector<int64_t> send_splits,
                                  std::vector<int64_t> recv_splits);

/// The empty output of an all_gather of input over size ranks: (size * d0, ...), or (size,)
/// for a 0-dim input.
torch::Tensor all_gather_output(const torch::Tensor& input, int size);

/// Checks the split vectors of an all_to_all and the row count of its input, naming every
/// value. Returns the number of rows to receive.
int64_t check_all_to_all_splits(const torch::Tensor& input, const std::vector<int64_t>& send_splits,
                                const std::vector<int64_t>& recv_splits, int group_size);

}  // namespace gbmoe
