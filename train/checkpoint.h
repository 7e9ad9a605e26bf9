// Checkpoints of a training run: written atomically (a crash while writing never spoils the
// previous one), sealed by a manifest of checksums that is verified before resuming, the last
// few kept, found again for resuming; the training state in them holds full expert tensors, so
// it loads at any expert-parallel size.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/data_parallel.h"
#include "parallel/process_groups.h"
#include "train/config.h"

namespace gbmoe {

/// What a checkpoint holds besides the tensors: the step and the sampler's state; for the
/// manifest, the number of tensors in state.pt (-1: not recorded) and the config fingerprint.
struct CheckpointMeta {
  int64_t step = 0;
  std::string sampler_state;
  std::string config_yaml;
  int64_t tensors = -1;
  std::string config_fingerprint;
};

/// Writes a checkpoint of `step` under run_dir/checkpoints/step_XXXXXXXX: `write_files(dir)`
/// fills a temporary directory; meta.txt, config.yaml and manifest.txt (step, config
/// fingerprint, tensor count, size and checksum of every file) follow; the directory is then
/// renamed into place; `latest` is updated atomically afterwards; only the newest `keep`
/// checkpoints stay. Returns the final path. Any failed write (a full disk) removes the
/// temporary directory, keeps the previous checkpoints and throws naming the path and the
/// reason ("no space left on device").
///
/// Example:
///   write_checkpoint("runs/a", meta, 3, [&](const std::string& d) { torch::save(model, d +
///   "/model.pt"); });
std::string write_checkpoint(const std::string& run_dir, const CheckpointMeta& meta, int64_t keep,
                             const std::function<void(const std::string& dir)>& write_files);

/// The checkpoint to resume from: `resume` = "" (none: returns ""), "auto" (the latest in
/// run_dir that verifies, saying which newer ones it refused and why; "" when there is none;
/// throws when there are checkpoints but none verifies), or the path of a checkpoint directory
/// (must verify). With a config, a checkpoint of another model configuration is refused.
std::string resolve_resume(const std::string& run_dir, const std::string& resume,
                           const Config* config = nullptr);

/// Why dir cannot be resumed from, or "" when it can: its manifest.txt is missing or damaged,
/// a file is missing, of another size (truncated) or fails its checksum (zeroed, overwritten),
/// meta.txt is bad (a negative step, a sampler state that does not parse), the step of meta.txt,
/// of the manifest and of the directory name disagree, or (with a config) the checkpoint's
/// model settings differ from the config's (named).
///
/// Example:
///   if (auto why = checkpoint_problem(dir); !why.empty()) std::cerr << dir << ": " << why;
std::string checkpoint_problem(const std::string& dir, const Config* config = nullptr);

/// A fingerprint of the settings the tensors of a checkpoint depend on (the model section).
std::string config_fingerprint(const Config& config);

/// Reads meta.txt of a checkpoint directory; throws naming the file when it is missing or bad
/// (incomplete, or a negative step).
CheckpointMeta read_checkpoint_meta(const std::string& dir);

/// Writes the checkpoint of `step` of a run (collective over groups.world): the training state
/// is gathered (expert_data_parallel rank 0's expert-parallel group) and written by world rank
/// 0 with write_checkpoint. A state with a non-finite tensor is never written. When the write
/// fails, every rank throws JobStopped naming the path and the reason, the previous
/// checkpoints intact. Returns the checkpoint's path (on every rank).
///
/// Example:
///   save_checkpoint(config, step, sampler.state().to_string(), *model, optimizer, groups);
std::string save_checkpoint(const Config& config, int64_t step, const std::string& sampler_state,
                            torch::nn::Module& model, torch::optim::AdamW& optimizer,
                            const ProcessGroups& groups);

/// One entry of a rank's training state, keyed as in state.pt: a tensor ("model/<name>",
/// "adamw/<name>/exp_avg", ...) or an AdamW step count ("adamw/<name>/step", tensor undefined).
struct StateEntry {
  std::string key;
  torch::Tensor tensor;
  int64_t count = 0;     // the AdamW step count
  bool sharded = false;  // an expert shard: this rank's block along dim 0
  bool buffer = false;
};

/// What one rank contributes to the checkpoint of `step`, copied to the CPU with no
/// communication: world rank 0 all its entries, the other ranks of its expert-parallel group
/// their expert shards, any other rank nothing (entries empty).
struct TrainingStateCopy {
  int64_t step = -1;
  std::string sampler_state;
  int world_rank = 0;
  int expert_rank = 0, expert_size = 1;  // in world rank 0's expert-parallel group
  std::vector<StateEntry> entries;
};

/// Copies this rank's share of the training state (see TrainingStateCopy). Makes no MPI call,
/// so a thread beside the training loop can call it; the parameters, optimizer state and
/// buffers must not change meanwhile.
///
/// Example:
///   auto copy = copy_training_state(*model, optimizer, groups, step, sampler.state().to_string());
TrainingStateCopy copy_training_state(torch::nn::Module& model, torch::optim::AdamW& optimizer,
                                      const ProcessGroups& groups, int64_t step,
                                      std::string sampler_state);

/// Writes a checkpoint from the copies of all ranks without communication (what save_checkpoint
/// writes, for a stop signal in the middle of a step): ranks 1..P-1 of world rank 0's
/// expert-parallel group write their shards to run_dir/checkpoints/stop_parts.tmp/part_<r>.pt;
/// world rank 0 waits up to wait_s seconds for them (the group must share train.run_dir),
/// joins them to full tensors, writes the checkpoint with write_checkpoint and returns its path.
/// Other ranks return "". Throws on this rank only, naming the file or the rank and the reason;
/// a part of another step (the copies straddled an optimizer step) is refused.
///
/// Example:
///   const auto dir = write_training_state_copy(config, copy, 60.0);
std::string write_training_state_copy(const Config& config, const TrainingStateCopy& copy,
                                      double wait_s);

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
/// names or shapes, non-finite values, an unreadable file or a tensor count other than the
/// manifest's fail naming the tensor or the reason and the file. Needs no communication.
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
