// The run directory of gbmoe-train: a lock held for the run's lifetime, the leftovers of
// interrupted checkpoint saves cleared, a fresh run kept from mixing with an earlier one, and
// metrics.jsonl appended with every write checked.
#pragma once

#include <cstdint>
#include <string>

#include "parallel/communicator.h"
#include "train/config.h"

namespace gbmoe {

/// Collective over world: when the error of any rank is not empty, every rank throws JobStopped
/// with the error of the lowest such rank, so that all ranks stop together with one message.
///
/// Example:
///   stop_together_if(world, rank0 ? problem_of(run_dir) : "");
void stop_together_if(Communicator& world, const std::string& error);

/// The run directory of one train() call (collective over world; rank 0 touches the files).
/// Opening it: creates train.run_dir, takes `lock` in it (flock, released when the object
/// dies or the process ends, even by kill -9) or fails naming the job that holds it, removes
/// the temporary directories of interrupted checkpoint saves (restoring a checkpoint that an
/// interrupted replacement had moved aside), and refuses a fresh run (train.resume "") in a
/// directory that holds checkpoints or metrics, unless train.overwrite clears them.
///
/// Example:
///   RunDirectory run(config, world);
///   auto resume_dir = resolve_resume(config.train.run_dir, config.train.resume, &config);
///   run.start(start_step);
///   if (rank0) run.append_metrics("{\"step\":1,...}");
class RunDirectory {
 public:
  RunDirectory(const Config& config, Communicator& world);
  ~RunDirectory();
  RunDirectory(const RunDirectory&) = delete;
  RunDirectory& operator=(const RunDirectory&) = delete;

  /// Writes config.yaml and keeps of metrics.jsonl only the lines of steps <= start_step (a
  /// resumed run repeats the steps after its checkpoint). Collective.
  void start(int64_t start_step);

  /// Appends one line to metrics.jsonl (rank 0). A failed write (a full disk) removes the
  /// partial line and throws naming the file and the reason.
  void append_metrics(const std::string& line);

  const std::string& metrics_path() const { return metrics_path_; }

 private:
  const Config& config_;
  Communicator& world_;
  std::string run_dir_;
  std::string metrics_path_;
  int lock_fd_ = -1;
  int metrics_fd_ = -1;
};

}  // namespace gbmoe
