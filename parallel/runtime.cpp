// MPI initialization and finalization, job-wide abort on failure, logging helpers.
#include "parallel/runtime.h"

#include <fcntl.h>
#include <mpi.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iomanip>
#include <iostream>
#include <mutex>
#include <sstream>
#include <thread>

#include "parallel/mpi_communicator.h"

namespace gbmoe {
namespace {

bool mpi_running() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

// Uncaught exceptions (from any thread) end the job instead of one rank dying silently.
[[noreturn]] void terminate_handler() {
  std::string what = "terminate called without an active exception";
  if (auto current = std::current_exception()) {
    try {
      std::rethrow_exception(current);
    } catch (const std::exception& e) {
      what = "uncaught exception: " + error_message(e);
    } catch (...) {
      what = "uncaught exception of unknown type";
    }
  }
  abort_job(what);
}

}  // namespace

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int initialized = 0;
  GBMOE_MPI_CHECK(MPI_Initialized(&initialized));
  if (!initialized) {
    GBMOE_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &thread_level_));
    owns_mpi_ = true;
  } else {
    GBMOE_MPI_CHECK(MPI_Query_thread(&thread_level_));
  }
  GBMOE_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  GBMOE_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank_));
  GBMOE_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &size_));
  std::set_terminate(terminate_handler);
}

MpiRuntime::~MpiRuntime() {
  if (owns_mpi_ && mpi_running()) MPI_Finalize();
}

int world_rank() {
  if (!mpi_running()) return 0;
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

std::string rank_prefix() { return c10::str("[rank ", world_rank(), "] "); }

void abort_job(const std::string& message) {
  const std::string line = rank_prefix() + "error: " + message + "\n";
  std::fputs(line.c_str(), stderr);
  std::fflush(stderr);
  std::fflush(stdout);
  if (mpi_running()) MPI_Abort(MPI_COMM_WORLD, 1);
  std::_Exit(1);
}

std::string error_message(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) {
    return c10_error->what_without_backtrace();
  }
  return e.what();
}

int run_distributed(const std::function<int()>& body) {
  try {
    return body();
  } catch (const JobStopped& e) {
    if (world_rank() == 0) {
      std::fflush(stdout);
      std::cerr << "error: " << e.what() << "\n" << std::flush;
    }
    return 1;
  } catch (const std::exception& e) {
    abort_job(error_message(e));
  } catch (...) {
    abort_job("exception of unknown type");
  }
}

void write_log_line(const std::string& line) { std::cout << line << '\n' << std::flush; }

namespace {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The collective in flight (one at a time: MPI runs serialized) and the watchdog's limit.
std::atomic<int64_t> g_collective_since_ns{0};  // 0: none in flight
std::atomic<const char*> g_collective_name{""};
std::atomic<int> g_collective_size{0};
std::atomic<int64_t> g_collective_count{0};
std::atomic<double> g_collective_timeout_s{0};
std::string g_collective_setting;  // written before the watchdog starts
// The collective counts of the ranks on this node, in shared memory (one slot per world rank;
// 0 = not on this node or not started): a rank that times out names the ranks behind it.
std::atomic<int64_t>* g_rank_counts = nullptr;
int g_world_rank = 0;
int g_world_size = 0;

// Maps the shared counts, named by rank 0 and opened by every rank (collective over
// MPI_COMM_WORLD). Without shared memory the message just names no rank.
void share_collective_counts() {
  if (!mpi_running()) return;
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  char name[64] = {0};
  if (rank == 0) {
    std::snprintf(name, sizeof(name), "/gbmoe-collectives-%d-%lld", static_cast<int>(::getpid()),
                  static_cast<long long>(now_ns() % 1000000007));
  }
  MPI_Bcast(name, sizeof(name), MPI_CHAR, 0, MPI_COMM_WORLD);
  const size_t bytes = sizeof(std::atomic<int64_t>) * static_cast<size_t>(size);
  const int fd = ::shm_open(name, O_RDWR | O_CREAT, 0600);
  void* p = MAP_FAILED;
  if (fd >= 0 && ::ftruncate(fd, static_cast<off_t>(bytes)) == 0) {
    p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  }
  if (fd >= 0) ::close(fd);
  MPI_Barrier(MPI_COMM_WORLD);  // every rank of the node has it open before it is unlinked
  ::shm_unlink(name);
  if (p == MAP_FAILED) return;
  g_rank_counts = static_cast<std::atomic<int64_t>*>(p);
  g_world_rank = rank;
  g_world_size = size;
}

// " Ranks behind this one: 1 (at collective 31)." from the shared counts, or "".
std::string ranks_behind(int64_t own) {
  if (!g_rank_counts) return "";
  std::string out;
  for (int r = 0; r < g_world_size; ++r) {
    const int64_t count = g_rank_counts[r].load();
    if (count > 0 && count < own) {
      out += (out.empty() ? "" : ", ") + std::to_string(r) + " (at collective " +
             std::to_string(count) + ")";
    }
  }
  return out.empty() ? "" : "; the ranks behind it on this node: " + out;
}

[[noreturn]] void collective_timed_out(double waited, double limit) {
  std::ostringstream line;
  const int size = g_collective_size.load();
  line << rank_prefix() << "error: " << g_collective_name.load() << " (collective "
       << g_collective_count.load() << " of this rank"
       << (size > 0 ? ", over " + std::to_string(size) + " ranks" : std::string())
       << ") has waited " << std::fixed << std::setprecision(1) << waited
       << " s, more than the limit of " << std::defaultfloat << limit << " s"
       << (g_collective_setting.empty() ? "" : " (" + g_collective_setting + ")")
       << ": another rank is stopped, stuck or dead" << ranks_behind(g_collective_count.load())
       << "; ending the job\n";
  const std::string text = line.str();
  std::fputs(text.c_str(), stderr);
  std::fflush(stderr);
  std::fflush(stdout);
  // Not MPI_Abort: the main thread is inside MPI, and MPI runs serialized. mpirun ends the
  // other ranks once this one exits non-zero.
  std::_Exit(1);
}

void watchdog() {
  for (;;) {
    const double limit = g_collective_timeout_s.load();
    std::this_thread::sleep_for(std::chrono::milliseconds(
        limit > 0 ? std::min<int64_t>(1000, static_cast<int64_t>(limit * 250) + 1) : 1000));
    const int64_t since = g_collective_since_ns.load();
    if (limit <= 0 || since == 0) continue;
    const double waited = (now_ns() - since) * 1e-9;
    if (waited > limit) collective_timed_out(waited, limit);
  }
}

}  // namespace

void set_collective_timeout(double seconds, const std::string& setting) {
  static std::once_flag started;
  if (seconds <= 0) {
    g_collective_timeout_s = 0;
    return;
  }
  std::call_once(started, [&] {
    g_collective_setting = setting;
    share_collective_counts();
    std::thread(watchdog).detach();
  });
  g_collective_timeout_s = seconds;
}

CollectiveWatch::CollectiveWatch(const char* name, int group_size) {
  g_collective_name = name;
  g_collective_size = group_size;
  const int64_t count = ++g_collective_count;
  if (g_rank_counts) g_rank_counts[g_world_rank].store(count);
  g_collective_since_ns = now_ns();
}

CollectiveWatch::~CollectiveWatch() { g_collective_since_ns = 0; }

}  // namespace gbmoe
