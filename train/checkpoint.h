// Checkpoints of a training run: written atomically (a crash while writing never spoils the
// previous one), the last few kept, found again for resuming.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace gbmoe {

/// What a checkpoint holds besides the tensors: the step and the sampler's state.
struct CheckpointMeta {
  int64_t step = 0;
  std::string sampler_state;
  std::string config_yaml;
};

/// Writes a checkpoint of `step` under run_dir/checkpoints/step_XXXXXXXX: `write_files(dir)`
/// fills a temporary directory, which is then renamed into place; `latest` is updated
/// atomically afterwards; only the newest `keep` checkpoints stay. Returns the final path.
///
/// Example:
///   write_checkpoint("runs/a", meta, 3, [&](const std::string& d) { torch::save(model, d +
///   "/model.pt"); });
std::string write_checkpoint(const std::string& run_dir, const CheckpointMeta& meta, int64_t keep,
                             const std::function<void(const std::string& dir)>& write_files);

/// The checkpoint to resume from: `resume` = "" (none: returns ""), "auto" (the latest in
/// run_dir, or "" when there is none), or the path of a checkpoint directory (must exist).
std::string resolve_resume(const std::string& run_dir, const std::string& resume);

/// Reads meta.txt of a checkpoint directory; throws naming the file when it is missing or bad.
CheckpointMeta read_checkpoint_meta(const std::string& dir);

/// Checkpoint directories of a run, oldest first.
std::vector<std::string> list_checkpoints(const std::string& run_dir);

}  // namespace gbmoe
