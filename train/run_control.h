// What stops a training run in the middle: SIGTERM/SIGINT (checkpoint, then exit 0; a second
// signal ends the process at once) and steps whose loss or gradient norm is not finite (not
// applied; the run stops, or skips up to train.max_nonfinite_steps of them).
#pragma once

#include <cstdint>
#include <string>

#include "parallel/communicator.h"

namespace gbmoe {

/// While alive, the first SIGTERM or SIGINT asks the training loop to checkpoint after the
/// current step and stop (stop_requested()); a second one restores the default action and
/// re-raises, ending the process at once. The previous handlers come back on destruction.
///
/// Under mpirun, a signal to mpirun reaches the ranks after odls_base_sigkill_timeout seconds
/// (Open MPI 4.1; 1 by default), and they are killed that many seconds later: raise it
/// (mpirun --mca odls_base_sigkill_timeout 60) above the time of one step and a checkpoint.
///
/// Example:
///   StopSignals signals;
///   for (...) { ...; if (stop_requested()) { save(); break; } }
class StopSignals {
 public:
  StopSignals();
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
};

/// Whether a stop was asked for (a signal, or request_stop()) since the last StopSignals began.
bool stop_requested();

/// Asks a running train() to write a checkpoint and stop after the current step (what SIGTERM
/// does). Async-signal-safe.
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
