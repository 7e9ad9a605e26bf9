// Checkpoints of a training run: written atomically (a crash while writing never spoils the
// previous one), the last few kept, found again for resuming; the training state in them holds
// full expert tensors, so it loads at any expert-parallel size.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/data_parallel.h"

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

/// The model's parameters and buffers ("model/<name>") and the AdamW state of each parameter
/// ("adamw/<name>/step", ".../exp_avg", ...), as full CPU tensors: tensors of parameters that
/// `rule` (unset: expert_parameter_rule(model)) names are expert shards, split along dim 0 over
/// the expert-parallel group in rank
/// order, and are gathered here. Collective over expert_parallel; every rank gets the archive
/// (one of them saves it).
///
/// Example:
///   auto state = gather_training_state(*model, optimizer, *groups.expert_parallel);
///   if (rank0) state.save_to(dir + "/state.pt");
torch::serialize::OutputArchive gather_training_state(torch::nn::Module& model,
                                                      torch::optim::AdamW& optimizer,
                                                      Communicator& expert_parallel,
                                                      const ExpertParameterRule& rule = nullptr);

/// Loads what gather_training_state saved into a model and optimizer of the same architecture
/// at any expert-parallel size: each rank takes its block of the expert tensors. Mismatched
/// names or shapes fail naming the tensor, both shapes and the file. Needs no communication.
///
/// Example:
///   load_training_state(dir + "/state.pt", *model, optimizer, *groups.expert_parallel);
void load_training_state(const std::string& path, torch::nn::Module& model,
                         torch::optim::AdamW& optimizer, const Communicator& expert_parallel,
                         const ExpertParameterRule& rule = nullptr);

/// Loads only the model (all experts, as on one process) from what gather_training_state saved:
/// for analysis and inference. Mismatched names or shapes fail naming the tensor and the file.
///
/// Example:
///   LanguageModel model(options);
///   load_model_state(checkpoint_dir + "/state.pt", *model);
void load_model_state(const std::string& path, torch::nn::Module& model);

}  // namespace gbmoe
