// The shared-memory window, the slots of the small sums and the chunked all-reduce, synchronized
// by sequence and phase numbers.
#include "parallel/node_shared_memory.h"

#include <sched.h>
#include <sys/statvfs.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <thread>

#include "parallel/mpi_communicator.h"
#include "parallel/runtime.h"

namespace gbmoe {
namespace detail {
namespace {

constexpr int64_t kAlign = 64;

int64_t round_up(int64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// Spins briefly, then yields the core, then sleeps (see NodeSharedWindow). The callers hold a
// CollectiveWatch over each operation, made whether or not it waits, so that every rank counts
// the same collectives for the watchdog's message.
template <typename Ready>
void wait_until(const Ready& ready) {
  if (ready()) return;
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
  const char* value = std::getenv("GBMOE_NODE_SHARED_MEMORY");
  return value == nullptr || std::string(value) != "0";
}

// Open MPI backs shared windows with files in osc_sm_backing_directory (/dev/shm by default). A
// full one would end the job with SIGBUS at the first write, so a window that would take more
// than half of the free space is not made (a container's /dev/shm is often 64 MiB), nor one in a
// directory that cannot be read.
bool backing_has_room(int64_t bytes_per_rank, int ranks_on_node, int rank) {
  const char* setting = std::getenv("OMPI_MCA_osc_sm_backing_directory");
  const std::string dir = setting && *setting ? setting : "/dev/shm";
  struct statvfs fs;
  const bool readable = ::statvfs(dir.c_str(), &fs) == 0;
  const double free_bytes =
      readable ? static_cast<double>(fs.f_bavail) * static_cast<double>(fs.f_frsize) : 0.0;
  const double need = static_cast<double>(bytes_per_rank) * ranks_on_node;
  if (readable && 2 * need <= free_bytes) return true;
  if (rank == 0) {
    write_log_line(
        c10::str("node shared memory not used: a window of ", need / (1 << 20), " MiB in ", dir,
                 readable ? c10::str(", which has ", free_bytes / (1 << 20), " MiB free")
                          : std::string(", which cannot be read (osc_sm_backing_directory)"),
                 "; the collectives go by MPI"));
  }
  return false;
}

}  // namespace

std::unique_ptr<NodeSharedWindow> NodeSharedWindow::create(MPI_Comm comm, int rank, int size,
                                                           int64_t bytes, bool allowed) {
  // Every rank takes rank 0's environment, and shared memory only if every rank allows it, is
  // on the node and has room.
  int enabled = rank == 0 ? static_cast<int>(enabled_by_environment()) : 0;
  GBMOE_MPI_CHECK(MPI_Bcast(&enabled, 1, MPI_INT, 0, comm));
  enabled = enabled && allowed;
  MPI_Comm node = MPI_COMM_NULL;
  GBMOE_MPI_CHECK(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node));
  int node_size = 0;
  GBMOE_MPI_CHECK(MPI_Comm_size(node, &node_size));
  GBMOE_MPI_CHECK(MPI_Comm_free(&node));
  int use = enabled && node_size == size && backing_has_room(bytes, size, rank) ? 1 : 0;
  GBMOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &use, 1, MPI_INT, MPI_MIN, comm));
  if (!use) return nullptr;

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
  std::memset(own, 0, static_cast<size_t>(bytes));
  std::atomic_thread_fence(std::memory_order_seq_cst);
  GBMOE_MPI_CHECK(MPI_Win_lock_all(MPI_MODE_NOCHECK, win));
  GBMOE_MPI_CHECK(MPI_Barrier(comm));  // every segment is zero before any rank uses one
  return std::unique_ptr<NodeSharedWindow>(new NodeSharedWindow(win, rank, size, std::move(bases)));
}

NodeSharedWindow::~NodeSharedWindow() {
  // MPI_Win_free is collective (Open MPI's ends in a barrier): a rank unwinding from an
  // exception would wait there for peers that never come, instead of reaching run_distributed's
  // abort. It leaves the window to the end of the process.
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized || std::uncaught_exceptions() > 0) return;
  MPI_Win_unlock_all(win_);
  MPI_Win_free(&win_);
}

// ---- NodeSharedSum: per segment, kSlots sequence words, kSlots byte counts, size x kSlots
// acknowledgements (of each writer's slots, by this reader), then kSlots slots of data.

namespace {

int64_t sum_header_bytes(int size) {
  return round_up(NodeSharedSum::kSlots * (2 + size) * static_cast<int64_t>(sizeof(int64_t)));
}

}  // namespace

std::shared_ptr<NodeSharedSum> NodeSharedSum::create(MPI_Comm comm, int rank, int size,
                                                     bool allowed) {
  auto window = NodeSharedWindow::create(comm, rank, size,
                                         sum_header_bytes(size) + kSlots * kSlotBytes, allowed);
  if (!window) return nullptr;
  return std::shared_ptr<NodeSharedSum>(new NodeSharedSum(std::move(window)));
}

NodeSharedSum::NodeSharedSum(std::unique_ptr<NodeSharedWindow> window)
    : window_(std::move(window)),
      rank_(window_->rank()),
      size_(window_->size()),
      pending_(kSlots) {}

std::atomic<int64_t>* NodeSharedSum::sequence(int r, int64_t slot) const {
  return window_->word(r, slot * 8);
}

std::atomic<int64_t>* NodeSharedSum::posted_bytes(int r, int64_t slot) const {
  return window_->word(r, (kSlots + slot) * 8);
}

// In the reader's segment: the last sum it collected from writer's slot.
std::atomic<int64_t>* NodeSharedSum::acknowledged(int reader, int writer, int64_t slot) const {
  return window_->word(reader, (2 * kSlots + writer * kSlots + slot) * 8);
}

char* NodeSharedSum::data(int r, int64_t slot) const {
  return window_->segment(r) + sum_header_bytes(size_) + slot * kSlotBytes;
}

int64_t NodeSharedSum::post(const torch::Tensor& rows_RN) {
  TORCH_CHECK(rows_RN.is_contiguous() && rows_RN.dim() == 2 && rows_RN.size(0) == size_,
              "NodeSharedSum::post needs contiguous (", size_, ", n) rows, got shape ",
              rows_RN.sizes());
  const int64_t bytes = rows_RN.size(1) * static_cast<int64_t>(rows_RN.element_size());
  TORCH_CHECK(fits(bytes), "NodeSharedSum::post of ", bytes, " bytes, more than a slot's ",
              kSlotBytes);
  CollectiveWatch watch("a node-shared sum (posting; a peer has not collected an earlier one)",
                        size_);
  const int64_t s = next_++;
  const int64_t slot = s % kSlots;
  // The slot's previous sum: collect this rank's share first, so that peers waiting in their
  // own post() for this rank's acknowledgement get it.
  if (pending_[slot].number != 0) collect(pending_[slot].number);
  wait_until([&] {
    for (int r = 0; r < size_; ++r) {
      if (r != rank_ &&
          acknowledged(r, rank_, slot)->load(std::memory_order_acquire) < s - kSlots) {
        return false;
      }
    }
    return true;
  });
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
  CollectiveWatch watch("a node-shared sum (waiting for a peer's buffer)", size_);
  const Pending pending = std::move(pending_[slot]);
  pending_[slot] = Pending();
  char* rows = static_cast<char*>(pending.rows_RN.data_ptr());
  for (int j = 0; j < size_; ++j) {
    if (j == rank_) continue;
    const auto* published = sequence(j, slot);
    wait_until([&] { return published->load(std::memory_order_acquire) >= s; });
    const int64_t posted = posted_bytes(j, slot)->load(std::memory_order_relaxed);
    TORCH_CHECK(posted == pending.bytes, "sum_one_round_async number ", s, ": rank ", j, " posted ",
                posted, " bytes and rank ", rank_, " ", pending.bytes,
                "; every rank must sum buffers of the same shape and dtype");
    std::memcpy(rows + j * pending.bytes, data(j, slot), static_cast<size_t>(pending.bytes));
    acknowledged(rank_, j, slot)->store(s, std::memory_order_release);
  }
}

// ---- NodeSharedAllReduce: per segment, the phase word, then kSegmentBytes of data.

void NodeSharedSum::collect_all() {
  // In the order posted, as the peers' own waits may be.
  std::vector<int64_t> numbers;
  for (const auto& p : pending_) {
    if (p.number != 0) numbers.push_back(p.number);
  }
  std::sort(numbers.begin(), numbers.end());
  for (int64_t s : numbers) collect(s);
}

std::shared_ptr<NodeSharedAllReduce> NodeSharedAllReduce::create(MPI_Comm comm, int rank, int size,
                                                                 bool allowed) {
  auto window = NodeSharedWindow::create(comm, rank, size, kAlign + kSegmentBytes, allowed);
  if (!window) return nullptr;
  return std::shared_ptr<NodeSharedAllReduce>(new NodeSharedAllReduce(std::move(window)));
}

NodeSharedAllReduce::NodeSharedAllReduce(std::unique_ptr<NodeSharedWindow> window)
    : window_(std::move(window)), rank_(window_->rank()), size_(window_->size()) {}

bool NodeSharedAllReduce::handles(const torch::Tensor& buffer) {
  return buffer.is_contiguous() && buffer.numel() * buffer.element_size() >= kMinBytes &&
         buffer.scalar_type() != torch::kBool &&
         (torch::isFloatingType(buffer.scalar_type()) ||
          torch::isIntegralType(buffer.scalar_type(), /*includeBool=*/false));
}

void NodeSharedAllReduce::advance(bool wait) {
  window_->word(rank_, 0)->store(++phase_, std::memory_order_release);
  if (wait) wait_for_peers(phase_);
}

void NodeSharedAllReduce::wait_for_peers(int64_t phase) {
  wait_until([&] {
    for (int r = 0; r < size_; ++r) {
      if (window_->word(r, 0)->load(std::memory_order_acquire) < phase) return false;
    }
    return true;
  });
}

torch::Tensor NodeSharedAllReduce::data(int r, int64_t n, torch::ScalarType dtype) const {
  return torch::from_blob(window_->segment(r) + kAlign, {n}, torch::TensorOptions().dtype(dtype));
}

namespace {

// Calls fn(part, lo, hi) for each piece's part in [begin, end) of the pieces' concatenation
// (flat views; starts: their offsets in it, then its length): part is the piece's elements there,
// [lo, hi) their place relative to begin.
template <typename Fn>
void for_each_part(const std::vector<torch::Tensor>& pieces, const std::vector<int64_t>& starts,
                   int64_t begin, int64_t end, const Fn& fn) {
  auto i = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end() - 1, begin) -
                               starts.begin() - 1);
  for (; i < pieces.size() && starts[i] < end; ++i) {
    const int64_t lo = std::max(begin, starts[i]), hi = std::min(end, starts[i + 1]);
    if (hi > lo) fn(pieces[i].narrow(0, lo - starts[i], hi - lo), lo - begin, hi - begin);
  }
}

}  // namespace

void NodeSharedAllReduce::all_reduce(const torch::Tensor& buffer, bool take_max) {
  TORCH_CHECK(handles(buffer), "NodeSharedAllReduce::all_reduce cannot take a buffer of shape ",
              buffer.sizes(), " and dtype ", buffer.dtype());
  reduce_pieces({buffer.view({-1})}, take_max, torch::Tensor());
}

bool NodeSharedAllReduce::handles(const std::vector<torch::Tensor>& pieces) {
  if (pieces.empty()) return false;
  const auto dtype = pieces.front().scalar_type();
  if (dtype != torch::kFloat && dtype != torch::kDouble) return false;
  int64_t bytes = 0;
  for (const auto& p : pieces) {
    if (p.scalar_type() != dtype || !p.is_contiguous() || !p.device().is_cpu()) return false;
    bytes += p.numel() * p.element_size();
  }
  return bytes >= kMinBytes;
}

void NodeSharedAllReduce::sum_divided(const std::vector<torch::Tensor>& pieces,
                                      const torch::Tensor& divisor) {
  TORCH_CHECK(handles(pieces), "NodeSharedAllReduce::sum_divided takes contiguous fp32 or fp64 ",
              "CPU tensors of one dtype and at least ", kMinBytes, " bytes together");
  TORCH_CHECK(divisor.defined() && divisor.dim() == 0 &&
                  divisor.scalar_type() == pieces.front().scalar_type(),
              "NodeSharedAllReduce::sum_divided needs a 0-dim divisor of the pieces' dtype");
  std::vector<torch::Tensor> flat;
  flat.reserve(pieces.size());
  for (const auto& p : pieces) flat.push_back(p.view({-1}));
  reduce_pieces(flat, /*take_max=*/false, divisor);
}

void NodeSharedAllReduce::reduce_pieces(const std::vector<torch::Tensor>& pieces, bool take_max,
                                        const torch::Tensor& divisor) {
  CollectiveWatch watch("a node-shared all-reduce", size_);
  const auto dtype = pieces.front().scalar_type();
  std::vector<int64_t> starts{0};
  for (const auto& p : pieces) starts.push_back(starts.back() + p.numel());
  const int64_t total = starts.back();
  const int64_t chunk = kSegmentBytes / static_cast<int64_t>(c10::elementSize(dtype));
  for (int64_t offset = 0; offset < total; offset += chunk) {
    const int64_t n = std::min(chunk, total - offset);
    auto share_lo = [&](int j) { return n * j / size_; };
    // Phase 1: this rank's chunk into its segment, once every peer has read the last one.
    wait_for_peers(phase_);
    auto own = data(rank_, n, dtype);
    for_each_part(pieces, starts, offset, offset + n,
                  [&](const torch::Tensor& part, int64_t lo, int64_t hi) {
                    own.narrow(0, lo, hi - lo).copy_(part);
                  });
    advance(/*wait=*/true);
    // Phase 2: this rank's share over every segment, in rank order, into its pieces (which the
    // sum may overwrite: their values are in its segment) and then into its segment.
    const int64_t mine = share_lo(rank_);
    for_each_part(
        pieces, starts, offset + mine, offset + share_lo(rank_ + 1),
        [&](torch::Tensor out, int64_t lo, int64_t hi) {
          auto at = [&](int r) { return data(r, n, dtype).narrow(0, mine + lo, hi - lo); };
          take_max ? torch::maximum_out(out, at(0), at(1)) : torch::add_out(out, at(0), at(1));
          for (int r = 2; r < size_; ++r) {
            take_max ? torch::maximum_out(out, out, at(r)) : out.add_(at(r));
          }
          at(rank_).copy_(out);
        });
    advance(/*wait=*/true);
    // Phase 3: the shares from their owners (this rank's own too when dividing).
    for (int r = 0; r < size_; ++r) {
      if (r == rank_ && !divisor.defined()) continue;
      const int64_t lo_r = share_lo(r);
      auto segment = data(r, n, dtype);
      for_each_part(pieces, starts, offset + lo_r, offset + share_lo(r + 1),
                    [&](torch::Tensor part, int64_t lo, int64_t hi) {
                      auto from = segment.narrow(0, lo_r + lo, hi - lo);
                      divisor.defined() ? (void)torch::div_out(part, from, divisor)
                                        : (void)part.copy_(from);
                    });
    }
    advance(/*wait=*/false);
  }
}

}  // namespace detail
}  // namespace gbmoe
