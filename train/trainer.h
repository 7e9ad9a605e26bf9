// The training loop of gbmoe-train: data, model, balancing, data parallelism, AdamW with warmup
// and cosine decay, evaluation per domain, metrics, checkpoints, exact resume, SIGTERM.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "moe/objective.h"
#include "parallel/process_groups.h"
#include "train/config.h"
#include "train/model.h"
#include "train/sampler.h"

namespace gbmoe {

/// The model options a config describes, for a vocabulary of vocab_size tokens.
LanguageModelOptions model_options_from_config(const Config& config, int64_t vocab_size);

/// The balance options of a config's balance section in force after steps_done optimizer steps
/// (balance.schedule changes of step <= steps_done applied).
BalanceOptions balance_options_from_config(const Config& config, int64_t steps_done = 0);

/// What the forward and backward passes of one optimizer step gave on this rank.
struct StepLosses {
  StepValues values;        // this rank's share of the step's objective
  double local_tokens = 0;  // this rank's valid tokens of the step
  bool finite = true;
  std::string bad_term;  // the first non-finite term, "name = value"
};

/// Optional calls around each micro-batch's forward (gbmoe-train's RoutingMonitor uses them).
/// With forward_ahead, those of micro-batch m + 1 run before micro-batch m's backward.
struct MicroBatchHooks {
  std::function<void(int64_t micro_batch, const Batch& batch)> before_forward;
  std::function<void(int64_t micro_batch, const Batch& batch, const RoutingContext& routing)>
      after_forward;
};

/// The forward and backward passes of one optimizer step on this rank: the micro-batches run
/// through the model with the objective's routing context, the token-summed cross-entropy and
/// the balancing terms backpropagate through objective.micro_batch_backward() (no wait for other
/// ranks in the forward pass), and the gradients
/// accumulate in the parameters' .grad (not yet averaged over ranks). Opens the objective's
/// step (begin_step); the caller averages gradients, steps the optimizer and calls end_step().
/// forward_ahead (train.forward_ahead): where the objective waits for other ranks' counts
/// (objective.waits_for_counts()) and there are several micro-batches, micro-batch m + 1's
/// forward runs before m's backward (the same gradients, bit for bit; one more micro-batch's
/// activations held). Not with activation checkpointing of a router in replay or record mode
/// when the step begins, whose recomputation needs the forward it recomputes to be the router's
/// last; a caller that switches replay on in before_forward must pass false itself (the
/// trainer does, for train.routing_replay with activation checkpointing).
///
/// Example:
///   auto losses = forward_backward(model, objective, micro_batches, device, false);
///   dp.average_gradients(); optimizer.step(); objective.end_step();
StepLosses forward_backward(LanguageModel& model, TrainingObjective& objective,
                            const std::vector<Batch>& micro_batches, const torch::Device& device,
                            bool autocast_bf16, const MicroBatchHooks& hooks = {},
                            bool forward_ahead = false);

/// Validation figures of one evaluation.
struct EvalResult {
  int64_t step = 0;
  double loss = 0;                            // token-weighted over all domains
  std::map<std::string, double> domain_loss;  // per domain
  std::vector<double> mutual_information;     // per MoE layer, bits
  std::vector<double> normalized_mi;          // per MoE layer, MI / H(domain)
  std::vector<double> max_violation;          // per MoE layer, over the whole validation set
  std::vector<torch::Tensor> domain_counts;   // per MoE layer: (domains, E) selections
  std::vector<double> domain_tokens;          // per domain
};

/// What a run did.
struct TrainSummary {
  int64_t first_step = 0;                    // the step it started from (resumed runs: > 0)
  int64_t last_step = 0;                     // steps completed
  bool interrupted = false;                  // stopped by SIGTERM after writing a checkpoint
  std::vector<double> losses;                // training loss (cross-entropy) of each step run
  EvalResult eval;                           // the last evaluation
  std::vector<double> max_violation_global;  // last step, per MoE layer
  std::vector<double> max_violation_micro;   // last step, per MoE layer
  double tokens_per_second = 0;
  std::string run_dir;
};

/// Runs the training a config describes on the ranks of groups (collective: every rank calls
/// it). Rank 0 writes the run directory: config.yaml, metrics.jsonl, checkpoints/.
/// stop_after >= 0 stops (with a checkpoint) once that many steps are done, as SIGTERM does.
///
/// Example:
///   auto config = Config::from_yaml_file("configs/default.yaml");
///   auto groups = build_process_groups(ParallelSizes{world, config.parallel.expert_parallel});
///   TrainSummary s = train(config, groups);
TrainSummary train(const Config& config, const ProcessGroups& groups, int64_t stop_after = -1);

/// The device of this rank for config.train.device: the CPU, or cuda:(local rank mod visible
/// GPUs) made current (and the CUDA kernels registered, where built), so that NCCL process
/// groups and allocations land on it. Call before build_process_groups; train() calls it too.
///
/// Example:
///   auto device = select_device(config);
///   auto groups = build_process_groups(sizes, MPI_COMM_WORLD,
///                                      device.is_cuda() ? Backend::Nccl : Backend::Mpi);
torch::Device select_device(const Config& config);

/// Asks a running train() to stop as SIGTERM does: the checkpoint of the last completed step at
/// once (StopSignals), then that of the current step and stop. Async-signal-safe.
void request_stop();

}  // namespace gbmoe
