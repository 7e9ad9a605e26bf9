// Slots in an MPI shared-memory window, published and acknowledged by sequence numbers.
#include "parallel/node_shared_sum.h"

#include <sched.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "parallel/mpi_communicator.h"
#include "parallel/runtime.h"

namespace gbmoe {
namespace detail {
namespace {

constexpr int64_t kAlign = 64;

int64_t header_words(int size) {
  return NodeSharedSum::kSlots * (2 + size);  // sequence and bytes per slot, then the acks
}

int64_t header_bytes(int size) {
  const int64_t bytes = header_words(size) * static_cast<int64_t>(sizeof(int64_t));
  return (bytes + kAlign - 1) / kAlign * kAlign;
}

// Spins briefly, then yields the core, then sleeps: a peer that shares this core gets to run,
// and a long wait (a peer writing a checkpoint) does not hold a core busy. A wait that starts
// at all is a collective wait for the watchdog.
template <typename Ready>
void wait_until(const Ready& ready, const char* what, int size) {
  if (ready()) return;
  CollectiveWatch watch(what, size);
  const auto start = std::chrono::steady_clock::now();
  for (int pass = 0; !ready(); ++pass) {
    if (pass < 64) continue;
    if (std::chrono::steady_clock::now() - start < std::chrono::microseconds(200)) {
      sched_yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }
}

bool enabled_by_environment() {
  const char* value = std::getenv("GBMOE_NODE_SHARED_SUM");
  return value == nullptr || std::string(value) != "0";
}

}  // namespace

int64_t node_shared_sum_segment_bytes(int size) {
  return header_bytes(size) + NodeSharedSum::kSlots * NodeSharedSum::kSlotBytes;
}

std::shared_ptr<NodeSharedSum> NodeSharedSum::create(MPI_Comm comm, int rank, int size) {
  // Every rank takes rank 0's choice, and shared memory only if every rank is on its node.
  int enabled = rank == 0 ? static_cast<int>(enabled_by_environment()) : 0;
  GBMOE_MPI_CHECK(MPI_Bcast(&enabled, 1, MPI_INT, 0, comm));
  MPI_Comm node = MPI_COMM_NULL;
  GBMOE_MPI_CHECK(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node));
  int node_size = 0;
  GBMOE_MPI_CHECK(MPI_Comm_size(node, &node_size));
  GBMOE_MPI_CHECK(MPI_Comm_free(&node));
  int use = enabled && node_size == size ? 1 : 0;
  GBMOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &use, 1, MPI_INT, MPI_MIN, comm));
  if (!use) return nullptr;

  const int64_t bytes = node_shared_sum_segment_bytes(size);
  char* own = nullptr;
  MPI_Win win = MPI_WIN_NULL;
  GBMOE_MPI_CHECK(
      MPI_Win_allocate_shared(bytes, 1, MPI_INFO_NULL, comm, static_cast<void*>(&own), &win));
  std::vector<char*> bases(size);
  for (int r = 0; r < size; ++r) {
    MPI_Aint segment = 0;
    int unit = 0;
    GBMOE_MPI_CHECK(MPI_Win_shared_query(win, r, &segment, &unit, static_cast<void*>(&bases[r])));
    TORCH_CHECK(segment >= bytes, "MPI_Win_shared_query gave rank ", r, " a segment of ", segment,
                " bytes, fewer than the ", bytes, " allocated");
  }
  std::memset(own, 0, static_cast<size_t>(header_bytes(size)));
  std::atomic_thread_fence(std::memory_order_seq_cst);
  GBMOE_MPI_CHECK(MPI_Win_lock_all(MPI_MODE_NOCHECK, win));
  GBMOE_MPI_CHECK(MPI_Barrier(comm));  // every header is zero before any rank posts
  return std::shared_ptr<NodeSharedSum>(new NodeSharedSum(win, rank, size, std::move(bases)));
}

NodeSharedSum::NodeSharedSum(MPI_Win win, int rank, int size, std::vector<char*> bases)
    : win_(win), rank_(rank), size_(size), bases_(std::move(bases)), pending_(kSlots) {}

NodeSharedSum::~NodeSharedSum() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  MPI_Win_unlock_all(win_);
  MPI_Win_free(&win_);
}

std::atomic<int64_t>* NodeSharedSum::sequence(int r, int64_t slot) const {
  return reinterpret_cast<std::atomic<int64_t>*>(bases_[r]) + slot;
}

std::atomic<int64_t>* NodeSharedSum::posted_bytes(int r, int64_t slot) const {
  return reinterpret_cast<std::atomic<int64_t>*>(bases_[r]) + kSlots + slot;
}

// In the reader's segment: the last sum it collected from writer's slot.
std::atomic<int64_t>* NodeSharedSum::acknowledged(int reader, int writer, int64_t slot) const {
  return reinterpret_cast<std::atomic<int64_t>*>(bases_[reader]) + 2 * kSlots + writer * kSlots +
         slot;
}

char* NodeSharedSum::data(int r, int64_t slot) const {
  return bases_[r] + header_bytes(size_) + slot * kSlotBytes;
}

int64_t NodeSharedSum::post(const torch::Tensor& rows_RN, int64_t bytes) {
  TORCH_CHECK(fits(bytes), "NodeSharedSum::post of ", bytes, " bytes, more than a slot's ",
              kSlotBytes);
  TORCH_CHECK(rows_RN.is_contiguous() && rows_RN.dim() == 2 && rows_RN.size(0) == size_ &&
                  rows_RN.size(1) * rows_RN.element_size() == bytes,
              "NodeSharedSum::post needs contiguous (", size_, ", n) rows of ", bytes,
              " bytes each, got shape ", rows_RN.sizes(), " of ", rows_RN.dtype());
  const int64_t s = next_++;
  const int64_t slot = s % kSlots;
  // The slot's previous sum: collect this rank's share first, so that peers waiting in their
  // own post() for this rank's acknowledgement get it.
  if (pending_[slot].number != 0) collect(pending_[slot].number);
  wait_until(
      [&] {
        for (int r = 0; r < size_; ++r) {
          if (r != rank_ &&
              acknowledged(r, rank_, slot)->load(std::memory_order_acquire) < s - kSlots) {
            return false;
          }
        }
        return true;
      },
      "a node-shared sum (a peer has not collected an earlier one)", size_);
  const char* own = static_cast<const char*>(rows_RN.data_ptr()) + rank_ * bytes;
  std::memcpy(data(rank_, slot), own, static_cast<size_t>(bytes));
  posted_bytes(rank_, slot)->store(bytes, std::memory_order_relaxed);
  sequence(rank_, slot)->store(s, std::memory_order_release);
  pending_[slot] = Pending{s, bytes, rows_RN};
  return s;
}

void NodeSharedSum::collect(int64_t s) {
  const int64_t slot = s % kSlots;
  if (pending_[slot].number != s) return;  // collected already (post() may have done it)
  const Pending pending = std::move(pending_[slot]);
  pending_[slot] = Pending();
  char* rows = static_cast<char*>(pending.rows_RN.data_ptr());
  for (int j = 0; j < size_; ++j) {
    if (j == rank_) continue;
    const auto* published = sequence(j, slot);
    wait_until([&] { return published->load(std::memory_order_acquire) >= s; },
               "a node-shared sum (waiting for a peer's counts)", size_);
    const int64_t posted = posted_bytes(j, slot)->load(std::memory_order_relaxed);
    TORCH_CHECK(posted == pending.bytes, "sum_one_round_async number ", s, ": rank ", j,
                " posted ", posted, " bytes and rank ", rank_, " ", pending.bytes,
                "; every rank must sum buffers of the same shape and dtype");
    std::memcpy(rows + j * pending.bytes, data(j, slot), static_cast<size_t>(pending.bytes));
    acknowledged(rank_, j, slot)->store(s, std::memory_order_release);
  }
}

}  // namespace detail
}  // namespace gbmoe
