// Process-wide MPI lifetime, failure handling that ends the whole job, and rank-aware logging.
#pragma once

#include <c10/util/StringUtil.h>

#include <functional>
#include <stdexcept>
#include <string>

namespace gbmoe {

/// Initializes MPI (MPI_Init_thread, serialized threads) unless it already is, and finalizes it
/// on destruction if it initialized it. MPI_COMM_WORLD returns errors instead of aborting, so
/// GBMOE_MPI_CHECK reports them, and an uncaught exception anywhere aborts the whole job with a
/// "[rank r]" message instead of leaving the other ranks waiting. Create one, first thing in
/// main; destroy communicators before it.
///
/// Example:
///   int main(int argc, char** argv) {
///     MpiRuntime mpi(&argc, &argv);
///     return run_distributed([&] { return train(mpi.rank(), mpi.size()); });
///   }
class MpiRuntime {
 public:
  explicit MpiRuntime(int* argc = nullptr, char*** argv = nullptr);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  /// Rank and size in MPI_COMM_WORLD.
  int rank() const { return rank_; }
  int size() const { return size_; }
  /// The thread support MPI granted (MPI_THREAD_*).
  int thread_level() const { return thread_level_; }

 private:
  bool owns_mpi_ = false;
  int rank_ = 0;
  int size_ = 1;
  int thread_level_ = 0;
};

/// This process's rank in MPI_COMM_WORLD, or 0 when MPI is not running.
int world_rank();

/// The message of an exception for a person: a LibTorch error without its C++ backtrace.
std::string error_message(const std::exception& e);

/// "[rank r] " for messages that every rank prints.
std::string rank_prefix();

/// Prints "[rank r] error: <message>" to stderr and ends the whole job with MPI_Abort (exit 1
/// without MPI).
[[noreturn]] void abort_job(const std::string& message);

/// An error that every rank of the job raises together, after agreeing on it in a collective
/// (a failed checkpoint, a non-finite step): run_distributed prints it once, from rank 0, and
/// returns 1 on every rank, so the job ends through MPI_Finalize instead of MPI_Abort.
class JobStopped : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Runs body and returns its exit code. An exception on any rank prints "[rank r] error: what"
/// and aborts the whole job at once, so mpirun exits non-zero instead of the peers hanging in
/// their next collective; a JobStopped is printed by rank 0 and returns 1.
int run_distributed(const std::function<int()>& body);

/// Ends this process with "[rank r] error: ..." and exit code 1 (mpirun then ends the job) when
/// one collective waits longer than `seconds`: a rank that is stopped, stuck or dead turns into
/// an abort naming the collective, and the ranks of this node that are behind, instead of a job
/// that waits forever. 0 turns it off (the default). Covers the collectives of MpiCommunicator
/// (CollectiveWatch). The first call with seconds > 0 is collective over MPI_COMM_WORLD.
///
/// Example:
///   set_collective_timeout(config.train.collective_timeout_s);
void set_collective_timeout(double seconds, const std::string& setting = "");

/// Marks one blocking collective in flight for the watchdog of set_collective_timeout.
///
/// Example:
///   CollectiveWatch watch("MPI_Allreduce", size);
///   MPI_Allreduce(...);
class CollectiveWatch {
 public:
  CollectiveWatch(const char* name, int group_size);
  ~CollectiveWatch();
  CollectiveWatch(const CollectiveWatch&) = delete;
  CollectiveWatch& operator=(const CollectiveWatch&) = delete;
};

/// Writes one line to stdout.
void write_log_line(const std::string& line);

/// Logs a line from world rank 0 only: the default for progress messages.
template <typename... Args>
void log0(const Args&... args) {
  if (world_rank() == 0) write_log_line(c10::str(args...));
}

/// Logs a line from every rank, prefixed with "[rank r] ".
template <typename... Args>
void log_all(const Args&... args) {
  write_log_line(c10::str(rank_prefix(), args...));
}

}  // namespace gbmoe
