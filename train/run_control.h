// What stops a training run in the middle: SIGTERM/SIGINT/SIGUSR1 (a checkpoint at once, then
// exit 0; a second signal ends the process at once) and steps whose loss or gradient norm is not
// finite (not applied; the run stops, or skips up to train.max_nonfinite_steps of them).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <thread>

#include "parallel/communicator.h"

namespace gbmoe {

/// While alive, the first SIGTERM, SIGINT or SIGUSR1 asks the training loop to stop
/// (stop_requested()) and runs on_stop, when given, at once on a thread of its own; a second one
/// restores the default action and re-raises, ending the process at once. The previous handlers
/// come back on destruction, which waits for a running on_stop. One StopSignals at a time.
///
/// gbmoe-train's on_stop writes the checkpoint of the last completed step while the step under
/// way goes on: until its optimizer step, a step changes neither the parameters, nor the
/// optimizer state, nor the router biases, and the sampler state of its start is kept aside, so
/// they are exactly those of the last completed step; the optimizer step waits while they are
/// copied. on_stop makes no MPI call (MPI runs MPI_THREAD_SERIALIZED): with expert parallelism
/// the other ranks of world rank 0's group write their expert shards to files that rank 0 joins
/// (write_training_state_copy). The training loop then stops at the end of the step, with a
/// checkpoint of that step too, and exits 0 on every rank, unless it is killed first.
///
/// Under mpirun (Open MPI 4.1): mpirun passes a SIGTERM or SIGINT on to the ranks only
/// odls_base_sigkill_timeout seconds later (default 1) and SIGKILLs them as long again later, so
/// a step that outlasts that window ends with the checkpoint of the step before it, written
/// within the window; raise the window (mpirun --mca odls_base_sigkill_timeout 60) to also get
/// the checkpoint of the step under way. mpirun then exits 1 even when every rank exits 0, and
/// it refuses SIGTERM in ess_base_forward_signals. SIGUSR1 it forwards at once and exits with
/// the ranks' code: `kill -USR1 <mpirun pid>` stops a run with no kill and exit code 0.
///
/// Example:
///   StopSignals signals([&] { save_last_completed_step(); });
///   for (...) { ...; if (stop_requested()) { save(); break; } }
class StopSignals {
 public:
  explicit StopSignals(std::function<void()> on_stop = nullptr);
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

 private:
  std::function<void()> on_stop_;
  std::thread thread_;
};

/// Whether a stop was asked for (a signal, or request_stop()) since the last StopSignals began.
bool stop_requested();

/// Asks a running train() to stop after the current step, as a stop signal does (on_stop runs
/// too). Async-signal-safe.
void request_stop();

/// Decides whether a step with a non-finite loss or gradient norm is applied: it never is; up
/// to max_skipped such steps are skipped (logged), the next one stops the run with JobStopped
/// naming the step, the term and the last checkpoint in run_dir (which holds no such state).
///
/// Example:
///   NonFiniteSteps nonfinite(config.train.max_nonfinite_steps, config.train.run_dir);
///   if (nonfinite.accept_loss(step, finite, term)) { ...; if (nonfinite.accept_grad_norm(
///       step, norm, world)) optimizer.step(); }
class NonFiniteSteps {
 public:
  NonFiniteSteps(int64_t max_skipped, std::string run_dir);

  /// finite_everywhere: the loss was finite on every rank (agreed in a collective); term names
  /// the bad term ("cross_entropy = nan", or "on another rank"). True: go on with the step.
  bool accept_loss(int64_t step, bool finite_everywhere, const std::string& term);
  /// Collective over world (every rank decides alike). True: apply the step.
  bool accept_grad_norm(int64_t step, double grad_norm, Communicator& world);

  int64_t skipped() const { return skipped_; }

 private:
  bool accept(int64_t step, const std::string& what);

  int64_t max_skipped_;
  std::string run_dir_;
  int64_t skipped_ = 0;
};

}  // namespace gbmoe
