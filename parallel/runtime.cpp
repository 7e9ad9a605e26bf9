// MPI initialization and finalization, job-wide abort on failure, logging helpers.
#include "parallel/runtime.h"

#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iostream>

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
  } catch (const std::exception& e) {
    abort_job(error_message(e));
  } catch (...) {
    abort_job("exception of unknown type");
  }
}

void write_log_line(const std::string& line) { std::cout << line << '\n' << std::flush; }

}  // namespace gbmoe
