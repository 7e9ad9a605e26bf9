// Where a training step's time goes: LibTorch's (Kineto) profiler over a few steps of
// gbmoe-train, summarized by region (the gbmoe:: scopes the model, the objective and the trainer
// open) with each backward op charged to the region of the forward op that made it.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moe/profile_region.h"

namespace gbmoe {

/// Time per region of the profiled steps, from the events of one thread.
struct ProfileSummary {
  struct Row {
    std::string name;    // a region ("attention.sdpa (backward)", "optimizer") or an op name
    double seconds = 0;  // self time charged to it, summed over the profiled steps
  };
  std::vector<Row> regions;  // largest first
  std::vector<Row> ops;      // the same by op name (self time), largest first
  double step_seconds = 0;   // wall time of the profiled steps
  int64_t steps = 0;
};

/// Profiles steps [first_step, first_step + num_steps) of a run (0-based, as the trainer counts
/// them) and writes `dir/rank<r>.txt` (the summary tables) and `dir/rank<r>.trace.json` (a
/// Chrome trace: chrome://tracing or ui.perfetto.dev).
///
/// Example:
///   StepProfiler profiler(run_dir + "/profile", rank, 10, 5);
///   for (step ...) { profiler.before_step(step); train_step(step); profiler.after_step(step); }
class StepProfiler {
 public:
  StepProfiler(std::string dir, int64_t rank, int64_t first_step, int64_t num_steps);
  ~StepProfiler();
  void before_step(int64_t step);
  /// After the last profiled step: stops, writes the files and returns true (once).
  bool after_step(int64_t step);
  /// The summary, once after_step returned true.
  const ProfileSummary& summary() const { return summary_; }
  /// The text table of the summary (what rank<r>.txt holds).
  static std::string format(const ProfileSummary& s);

 private:
  std::string dir_;
  int64_t rank_, first_step_, num_steps_;
  bool running_ = false;
  double started_ = 0;
  ProfileSummary summary_;
};

}  // namespace gbmoe
