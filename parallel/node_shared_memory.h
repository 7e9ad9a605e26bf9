// Collectives among the ranks of one node through an MPI-3 shared-memory window: small sums
// whose posting and waiting make no MPI call (the balance counts, mid-step), and a chunked
// all-reduce of large buffers (the gradient buckets). Internal to MpiCommunicator (not
// installed).
#pragma once

#include <mpi.h>
#include <torch/torch.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace gbmoe {
namespace detail {

/// One segment per rank of a communicator whose ranks are all on one node
/// (MPI_Win_allocate_shared), each mapped into every rank's process, zeroed at creation, inside
/// a passive-target epoch (MPI_Win_lock_all) over the window's life. Freeing it is collective
/// (MPI_Win_free), like freeing the communicator.
///
/// The classes below synchronize through acquire/release atomics on 64-bit words in the
/// segments (lock-free, hence address-free, as the collective watchdog's shared counts already
/// rely on), and wait by spinning briefly, then yielding the core (sched_yield), then short
/// sleeps: with more ranks than cores, the rank being waited for gets to run, and a long wait
/// (a peer writing a checkpoint) holds no core busy.
///
/// Example:
///   auto window = NodeSharedWindow::create(comm, rank, size, 1 << 20);  // null across nodes
///   char* mine = window->segment(rank);
class NodeSharedWindow {
 public:
  /// Collective over comm: every rank calls it, with allowed false for a communicator told to
  /// keep to MPI. Null (on every rank) when some rank passed allowed false, when comm's ranks
  /// are not all on one node, when GBMOE_NODE_SHARED_MEMORY=0 on rank 0, or when Open MPI's
  /// backing directory (osc_sm_backing_directory, /dev/shm) cannot be read or has less than
  /// twice the window's bytes free (said once, by rank 0).
  static std::unique_ptr<NodeSharedWindow> create(MPI_Comm comm, int rank, int size, int64_t bytes,
                                                  bool allowed = true);
  ~NodeSharedWindow();
  NodeSharedWindow(const NodeSharedWindow&) = delete;
  NodeSharedWindow& operator=(const NodeSharedWindow&) = delete;

  char* segment(int r) const { return bases_[r]; }
  int rank() const { return rank_; }
  int size() const { return size_; }
  /// The 64-bit word at byte offset in rank r's segment.
  std::atomic<int64_t>* word(int r, int64_t offset) const {
    return reinterpret_cast<std::atomic<int64_t>*>(bases_[r] + offset);
  }

 private:
  NodeSharedWindow(MPI_Win win, int rank, int size, std::vector<char*> bases)
      : win_(win), rank_(rank), size_(size), bases_(std::move(bases)) {}
  MPI_Win win_;
  int rank_;
  int size_;
  std::vector<char*> bases_;
};

/// Small sums in slots: sum number s (counted from 1, in the order every rank posts) goes to
/// slot s % kSlots of every rank's segment. post() copies the buffer in and then publishes s in
/// the slot's sequence word; collect() waits for each peer's word to read s, copies the peer's
/// row out and acknowledges it in its own segment. A rank reuses a slot once every peer has
/// acknowledged the sum that used it kSlots sums before; if this rank has not collected that
/// sum itself yet, post() collects it first (every peer has posted it), so any number of sums
/// may be in flight and waited in any order. What this costs: a post() may wait until the
/// peers have reached their own post() kSlots sums later than a sum they have not collected,
/// so no rank may block in another collective while holding kSlots sums uncollected that a
/// peer posts after it. Buffers of different sizes on different ranks are a misuse that is
/// reported only when both fit a slot; otherwise the ranks take different paths and wait.
///
/// Example:
///   auto area = NodeSharedSum::create(comm, rank, size);  // collective; null across nodes
///   if (area && area->fits(bytes)) {
///     auto rows_RN = torch::empty({size, n});  // row rank: this rank's buffer
///     const int64_t s = area->post(rows_RN);
///     ...;                // compute
///     area->collect(s);  // rows_RN[j] holds rank j's buffer
///   }
class NodeSharedSum {
 public:
  static constexpr int64_t kSlots = 16;
  static constexpr int64_t kSlotBytes = 32 << 10;

  /// Collective over comm; null as NodeSharedWindow::create.
  static std::shared_ptr<NodeSharedSum> create(MPI_Comm comm, int rank, int size,
                                               bool allowed = true);

  bool fits(int64_t bytes) const { return bytes <= kSlotBytes; }
  /// Copies row rank of rows_RN (contiguous, (size, n), at most kSlotBytes a row) into this rank's
  /// next slot and publishes it; returns the sum's number. rows_RN stays referenced until the sum
  /// is collected, into its other rows. Waits only until the peers have collected the sum kSlots
  /// before.
  int64_t post(const torch::Tensor& rows_RN);
  /// Waits until every peer has posted sum s and copies peer j's bytes into row j of the rows
  /// that post() took. Throws when a peer posted a different number of bytes. Does nothing
  /// for a sum already collected.
  void collect(int64_t s);
  /// Collects every sum not collected yet, oldest first (before the window is freed).
  void collect_all();

 private:
  explicit NodeSharedSum(std::unique_ptr<NodeSharedWindow> window);
  std::atomic<int64_t>* sequence(int r, int64_t slot) const;
  std::atomic<int64_t>* posted_bytes(int r, int64_t slot) const;
  std::atomic<int64_t>* acknowledged(int reader, int writer, int64_t slot) const;
  char* data(int r, int64_t slot) const;

  // A sum this rank posted and has not collected yet, by slot.
  struct Pending {
    int64_t number = 0;  // 0: none
    int64_t bytes = 0;
    torch::Tensor rows_RN;  // (size, n)
  };

  std::unique_ptr<NodeSharedWindow> window_;
  int rank_;
  int size_;
  int64_t next_ = 1;              // the number of the next sum this rank posts
  std::vector<Pending> pending_;  // (kSlots,)
};

/// All-reduce of a large contiguous buffer, or of several taken as their concatenation, in
/// chunks of up to kSegmentBytes. Per chunk: every rank copies its chunk into its segment; rank j
/// adds share j of the chunk (the j-th of size near-equal ranges) over the segments in rank
/// order, into its own buffers and then its segment; every rank copies the other shares from
/// their owners' segments into its buffers (when dividing, all shares, its own too, divided on
/// the way). So each element is reduced once, in rank order, and every rank holds the same
/// bits. Three phases a chunk, each ended by publishing a phase
/// number that the next phase waits for on every peer (the last one is waited for only when the
/// segment is next written).
///
/// Example:
///   auto reduce = NodeSharedAllReduce::create(comm, rank, size);  // null across nodes
///   if (reduce && reduce->handles(buffer)) reduce->all_reduce(buffer, /*take_max=*/false);
///   if (reduce && reduce->handles(grads)) reduce->sum_divided(grads, divisor);  // in place
class NodeSharedAllReduce {
 public:
  static constexpr int64_t kSegmentBytes = int64_t{4} << 20;
  /// Smaller buffers go by MPI, whose latency is lower.
  static constexpr int64_t kMinBytes = int64_t{64} << 10;

  /// Collective over comm; null as NodeSharedWindow::create.
  static std::shared_ptr<NodeSharedAllReduce> create(MPI_Comm comm, int rank, int size,
                                                     bool allowed = true);

  /// Whether all_reduce takes buffer: contiguous, of at least kMinBytes, a floating or
  /// non-bool integral dtype.
  static bool handles(const torch::Tensor& buffer);
  /// Sum (max when take_max) over the ranks of buffer, in place. Max is torch::maximum's: a
  /// NaN on any rank gives NaN.
  void all_reduce(const torch::Tensor& buffer, bool take_max);

  /// Whether sum_divided takes pieces: at least one, each contiguous and on the CPU, all fp32 or
  /// all fp64, of at least kMinBytes together.
  static bool handles(const std::vector<torch::Tensor>& pieces);
  /// Sums the pieces over the ranks as one buffer, their concatenation in order (so every rank
  /// must pass pieces of the same sizes), and writes each sum divided by divisor (a 0-dim tensor
  /// of their dtype; torch::div_out's rounding) back into the pieces. No staging copy: the
  /// pieces go straight into the segments and come back out of them, chunk by chunk, so pieces
  /// that overlap in memory would see earlier chunks' results (DataParallel's gradients do not
  /// overlap).
  void sum_divided(const std::vector<torch::Tensor>& pieces, const torch::Tensor& divisor);

 private:
  explicit NodeSharedAllReduce(std::unique_ptr<NodeSharedWindow> window);
  // Publishes this rank's next phase and, when wait, waits until every peer has reached it.
  void advance(bool wait);
  void wait_for_peers(int64_t phase);
  torch::Tensor data(int r, int64_t n, torch::ScalarType dtype) const;
  // The three phases over pieces (flat views of one dtype) taken as their concatenation;
  // divisor undefined: no division.
  void reduce_pieces(const std::vector<torch::Tensor>& pieces, bool take_max,
                     const torch::Tensor& divisor);

  std::unique_ptr<NodeSharedWindow> window_;
  int rank_;
  int size_;
  int64_t phase_ = 0;  // the last phase this rank published
};

}  // namespace detail
}  // namespace gbmoe
