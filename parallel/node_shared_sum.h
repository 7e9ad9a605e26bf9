// Small sums among the ranks of one node through MPI-3 shared memory: posting is a copy and a
// store, and a wait reads the peers' slots, so neither makes an MPI call in the middle of a step.
// Internal to MpiCommunicator (not installed).
#pragma once

#include <mpi.h>
#include <torch/torch.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace gbmoe {
namespace detail {

/// One segment per rank in an MPI shared-memory window (MPI_Win_allocate_shared over a
/// communicator whose ranks are all on one node), holding kSlots slots of kSlotBytes.
///
/// Sum number s (counted from 1, in the order every rank posts) goes to slot s % kSlots of every
/// rank's segment: post() copies the buffer in and then publishes s in the slot's sequence word;
/// collect() waits for each peer's word to read s, copies the peer's row out and acknowledges it
/// in its own segment. A rank reuses a slot once every peer has acknowledged the sum that used it
/// kSlots sums before; if this rank has not collected that sum itself yet, post() collects it
/// first (every peer has posted it), so any number of sums may be in flight and waited in any
/// order. Waiting yields the core (sched_yield, then short sleeps): with more ranks than cores,
/// the rank being waited for gets to run.
///
/// Synchronization is by acquire/release atomics on the shared words (lock-free 64-bit atomics,
/// which are address-free, as the collective watchdog's shared counts already rely on), inside
/// a passive-target epoch (MPI_Win_lock_all) over the window's life.
///
/// Example:
///   auto area = NodeSharedSum::create(comm, rank, size);  // collective; null across nodes
///   if (area && area->fits(bytes)) {
///     auto rows_RN = torch::empty({size, n});  // row rank: this rank's buffer
///     const int64_t s = area->post(rows_RN, bytes);
///     ...;                // compute
///     area->collect(s);  // rows_RN[j] holds rank j's buffer
///   }
class NodeSharedSum {
 public:
  static constexpr int64_t kSlots = 16;
  static constexpr int64_t kSlotBytes = 32 << 10;

  /// Collective over comm. Null when comm's ranks are not all on one node, when the window
  /// cannot be allocated, or when GBMOE_NODE_SHARED_SUM=0 on rank 0 (then every rank uses MPI
  /// messages).
  static std::shared_ptr<NodeSharedSum> create(MPI_Comm comm, int rank, int size);
  ~NodeSharedSum();
  NodeSharedSum(const NodeSharedSum&) = delete;
  NodeSharedSum& operator=(const NodeSharedSum&) = delete;

  bool fits(int64_t bytes) const { return bytes <= kSlotBytes; }
  /// Copies row rank of rows_RN (contiguous, (size, n), bytes per row) into this rank's next
  /// slot and publishes it; returns the sum's number. rows_RN stays referenced until the sum
  /// is collected, into its other rows. Waits only until the peers have collected the sum kSlots
  /// before.
  int64_t post(const torch::Tensor& rows_RN, int64_t bytes);
  /// Waits until every peer has posted sum s and copies peer j's bytes into row j of the rows
  /// that post() took. Throws when a peer posted a different number of bytes. Does nothing
  /// for a sum already collected.
  void collect(int64_t s);

 private:
  NodeSharedSum(MPI_Win win, int rank, int size, std::vector<char*> bases);
  std::atomic<int64_t>* sequence(int r, int64_t slot) const;
  std::atomic<int64_t>* posted_bytes(int r, int64_t slot) const;
  std::atomic<int64_t>* acknowledged(int reader, int writer, int64_t slot) const;
  char* data(int r, int64_t slot) const;

  // A sum this rank posted and has not collected yet, by slot.
  struct Pending {
    int64_t number = 0;      // 0: none
    int64_t bytes = 0;
    torch::Tensor rows_RN;  // (size, n)
  };

  MPI_Win win_;
  int rank_;
  int size_;
  std::vector<char*> bases_;  // each rank's segment, mapped into this process
  int64_t next_ = 1;          // the number of the next sum this rank posts
  std::vector<Pending> pending_;  // (kSlots,)
};

/// Bytes of one rank's segment for a group of size ranks.
int64_t node_shared_sum_segment_bytes(int size);

}  // namespace detail
}  // namespace gbmoe
