// The training loop. Every rank runs the same sequence of collectives; rank 0 writes files.
#include "train/trainer.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <limits>
#include <mutex>
#include <sstream>

#include "moe/autocast.h"
#include "moe/objective.h"
#include "parallel/balance_sync.h"
#include "parallel/data_parallel.h"
#include "parallel/expert_parallel.h"
#include "parallel/runtime.h"
#include "train/analysis.h"
#include "train/checkpoint.h"
#include "train/fused_adamw.h"
#include "train/hf_model.h"
#include "train/json.h"
#include "train/model_kernels_cpu.h"
#include "train/profile.h"
#include "train/routing_monitor.h"
#include "train/run_control.h"
#include "train/run_dir.h"
#include "train/sampler.h"
#include "train/token_dataset.h"
#ifdef GBMOE_WITH_CUDA_KERNELS
#include "csrc_cuda/moe_kernels.h"
#endif

namespace gbmoe {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Linear warmup to lr, then cosine decay to min_lr at the last step.
double learning_rate(const OptimConfig& o, int64_t step, int64_t total_steps) {
  if (step < o.warmup_steps) return o.lr * static_cast<double>(step + 1) / o.warmup_steps;
  const double span = std::max<int64_t>(1, total_steps - o.warmup_steps);
  const double progress = std::min(1.0, (step - o.warmup_steps) / span);
  return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + std::cos(M_PI * progress));
}

std::string format_duration(double seconds) {
  const auto s = static_cast<int64_t>(std::max(0.0, seconds));
  std::ostringstream out;
  if (s >= 3600) out << s / 3600 << "h";
  if (s >= 60) out << (s % 3600) / 60 << "m";
  out << s % 60 << "s";
  return out.str();
}

torch::Tensor sum_over(Communicator& comm, torch::Tensor t) {
  t = t.to(torch::kDouble).cpu().contiguous();
  comm.all_reduce(t, ReduceOp::Sum);
  return t;
}

// bf16 autocast on CUDA around forward passes (train.dtype bfloat16): parameters, gradients
// and optimizer state stay fp32. Leaving drops autocast's cache of cast weights, which the
// next optimizer step makes stale.
class AutocastScope {
 public:
  explicit AutocastScope(bool enabled) : enabled_(enabled) {
    if (enabled_) set(true);
  }
  ~AutocastScope() {
    if (!enabled_) return;
    set(false);
    at::autocast::clear_cache();
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  static void set(bool on) { CudaAutocast::set({on, at::kBFloat16}); }
  bool enabled_;
};

// The launcher's node-local rank (Open MPI, MPICH, Slurm, torchrun), else the world rank.
int local_rank() {
  for (const char* name :
       {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK"}) {
    if (const char* value = std::getenv(name)) return std::atoi(value);
  }
  return world_rank();
}

}  // namespace

torch::Device select_device(const Config& config) {
  if (config.train.device != "cuda") return torch::Device(torch::kCPU);
  TORCH_CHECK(torch::cuda::is_available(), "train.device (cuda) but no CUDA device is visible");
  const int count = static_cast<int>(torch::cuda::device_count());
  torch::Device device(torch::kCUDA, static_cast<c10::DeviceIndex>(local_rank() % count));
  c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->setDevice(device);
#ifdef GBMOE_WITH_CUDA_KERNELS
  cuda::register_kernels();
#endif
  return device;
}

BalanceOptions balance_options_from_config(const Config& config, int64_t steps_done) {
  const BalanceConfig b = config.balance.at_step(steps_done);
  // scope shuffle is the global scope over each step's random subset (BalanceSubset).
  const bool shuffle = b.scope == "shuffle";
  return BalanceOptions()
      .scope(shuffle ? BalanceScope::Global : balance_scope_from_string(b.scope))
      .shuffle(shuffle)
      .shuffle_seed(static_cast<uint64_t>(config.train.seed))
      .alpha(b.alpha)
      .micro_alpha(b.micro_alpha)
      .group_size(b.scope == "group" ? b.group_size : 0)
      .method(balance_method_from_string(b.method))
      .bias_update_rate(b.bias_update_rate)
      .z_loss(b.z_loss);
}

LanguageModelOptions model_options_from_config(const Config& config, int64_t vocab_size) {
  const auto& m = config.model;
  auto moe = MoELayerOptions(m.dim, m.num_experts, m.expert_hidden)
                 .shared_experts(m.shared_experts)
                 .router(RouterOptions()
                             .top_k(m.top_k)
                             .score_function(score_function_from_string(m.score_function))
                             .renormalize(m.renormalize)
                             .init_std(m.init_std))
                 .dispatcher(DispatcherOptions()
                                 .capacity_factor(m.capacity_factor)
                                 .drop_policy(drop_policy_from_string(m.drop_policy)))
                 .init_std(m.init_std);
  return LanguageModelOptions(vocab_size, m.dim, m.num_layers, m.num_heads)
      .family(model_family_from_string(m.family))
      .num_kv_heads(m.num_kv_heads)
      .head_dim(m.head_dim)
      .moe_layers(m.moe_layer_indices())
      .moe(moe)
      .dense_hidden(m.dense_hidden)
      .tie_embeddings(m.tie_embeddings)
      .rope_theta(m.rope_theta)
      .init_std(m.init_std)
      .norm_eps(m.norm_eps)
      .activation_checkpointing(config.train.activation_checkpointing);
}

namespace {
// Whether a backward would recompute a block whose router replays or records ids: the recomputed
// forward reuses the router's last ids, which must then be the forward it recomputes.
bool recomputes_replayed_routing(const LanguageModel& model) {
  if (!model->options.activation_checkpointing()) return false;
  for (const auto& layer : model->moe_layers()) {
    if (layer->router->replay_mode() != RoutingReplayMode::Off) return true;
  }
  return false;
}

// One micro-batch between its forward and its backward.
struct ForwardDone {
  RoutingContext routing;
  torch::Tensor task;  // () the token-summed cross-entropy
};
}  // namespace

StepLosses forward_backward(LanguageModel& model, TrainingObjective& objective,
                            const std::vector<Batch>& micro_batches, const torch::Device& device,
                            bool autocast_bf16, const MicroBatchHooks& hooks, bool forward_ahead) {
  double local_tokens = 0;
  for (const auto& b : micro_batches) local_tokens += b.mask.sum().item<double>();
  const auto M = static_cast<int64_t>(micro_batches.size());
  objective.begin_step(M, local_tokens);
  const auto ce_sum = torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum);
  auto forward = [&](int64_t m) {
    const auto& b = micro_batches[m];
    if (hooks.before_forward) hooks.before_forward(m, b);
    ForwardDone done{objective.context(), {}};
    {
      AutocastScope autocast(autocast_bf16);
      auto logits = model->forward(b.inputs.to(device), b.mask.to(device), &done.routing);
      // Padding targets are -100 (ignored): the sum runs over exactly the valid tokens.
      GBMOE_PROFILE_REGION("cross_entropy");
      auto logits_NV = logits.flatten(0, 1);
      auto targets_N = b.targets.to(device).flatten();
      done.task = cross_entropy_sum_cpu_applies(logits_NV, targets_N)
                      ? cross_entropy_sum_cpu(logits_NV, targets_N)
                      : torch::nn::functional::cross_entropy(logits_NV, targets_N, ce_sum);
    }
    if (hooks.after_forward) {
      GBMOE_PROFILE_REGION("routing_monitor");
      hooks.after_forward(m, b, done.routing);
    }
    return done;
  };
  auto backward = [&](ForwardDone& done) {
    GBMOE_PROFILE_REGION("objective.backward");  // the terms and the engine's own work
    objective.micro_batch_backward(done.routing, done.task);
  };
  // Forward ahead: micro-batch m + 1's forward runs before m's backward, so m's count reduction
  // has that whole forward to arrive in, and a rank that runs behind by less than a forward is
  // not waited for until the end of the step. It holds one more micro-batch's activations, so
  // it is used only where the backward waits for other ranks' counts.
  const bool ahead =
      forward_ahead && M > 1 && objective.waits_for_counts() && !recomputes_replayed_routing(model);
  if (ahead) {
    auto next = forward(0);
    for (int64_t m = 0; m < M; ++m) {
      auto current = std::move(next);
      if (m + 1 < M) next = forward(m + 1);
      backward(current);
    }
  } else {
    for (int64_t m = 0; m < M; ++m) {
      auto done = forward(m);
      backward(done);
    }
  }
  StepLosses out;
  out.values = objective.step_values();
  out.local_tokens = local_tokens;
  for (const auto& [name, v] : {std::pair<const char*, double>{"cross_entropy", out.values.task},
                                {"balance loss", out.values.balance},
                                {"z-loss", out.values.z_loss}}) {
    if (out.finite && !std::isfinite(v)) {
      out.finite = false;
      out.bad_term = std::string(name) + " = " + std::to_string(v);
    }
  }
  return out;
}

namespace {
// Evaluates the validation batches: rank r takes batches r, r + R, ...; sums are all-reduced.
EvalResult evaluate(LanguageModel& model, const std::vector<Batch>& batches,
                    const std::vector<std::string>& domains, Communicator& world,
                    bool autocast_bf16, int64_t step) {
  RoutingAnalysis a;
  {
    AutocastScope autocast(autocast_bf16);
    a = analyze_routing(model, batches, domains, world.rank(), world.size());
  }
  a.tokens = sum_over(world, a.tokens);
  a.loss_sum = sum_over(world, a.loss_sum);
  for (auto& layer : a.layers) layer.counts = sum_over(world, layer.counts);

  EvalResult r;
  r.step = step;
  r.loss = a.loss_sum.sum().item<double>() / std::max(1.0, a.tokens.sum().item<double>());
  for (size_t d = 0; d < domains.size(); ++d) {
    const double n = a.tokens[d].item<double>();
    r.domain_tokens.push_back(n);
    if (n > 0) r.domain_loss[domains[d]] = a.loss_sum[d].item<double>() / n;
  }
  for (const auto& layer : a.layers) {
    const auto f = layer_figures(layer, a.tokens);
    r.mutual_information.push_back(f.mutual_information);
    r.normalized_mi.push_back(f.normalized_mi);
    r.max_violation.push_back(f.max_violation);
    r.domain_counts.push_back(layer.counts);
  }
  return r;
}

std::string eval_json(const EvalResult& r) {
  std::ostringstream s;
  s << "{\"step\":" << r.step << ",\"eval\":{\"val_loss\":" << json_number(r.loss)
    << ",\"domains\":{";
  bool first = true;
  for (const auto& [name, loss] : r.domain_loss) {
    s << (first ? "" : ",") << "\"" << name << "\":" << json_number(loss);
    first = false;
  }
  s << "},\"mutual_information\":" << json_list(r.mutual_information)
    << ",\"normalized_mi\":" << json_list(r.normalized_mi)
    << ",\"max_violation\":" << json_list(r.max_violation) << "}}";
  return s.str();
}

/// Everything one rank's training run holds, and the named pieces of a step.
class Trainer {
 public:
  Trainer(const Config& config, const ProcessGroups& groups);
  TrainSummary run(int64_t stop_after);

 private:
  void open_data();
  void build_model();
  void build_optimizer();
  int64_t resume();
  // The objective of the balance settings in force after steps_done steps (balance.schedule).
  void use_balance_for(int64_t steps_done);
  // Forward, backward, optimizer: one step; returns false (after all ranks agreed) to stop.
  bool train_step(int64_t step, int64_t stop_after);
  void record_step(int64_t done, double lr, double grad_norm, const StepLosses& losses,
                   const std::vector<LayerStepStats>& layers, double seconds);
  void log_progress(int64_t done);
  void evaluate_now(int64_t done);
  void save(int64_t step);
  void save_on_stop();

  const Config& config_;
  const ProcessGroups& groups_;
  Communicator& world_;
  const bool rank0_;
  torch::Device device_{torch::kCPU};
  bool autocast_bf16_ = false;
  bool expert_parallel_ = false;
  std::shared_ptr<TokenDataset> train_data_;
  std::unique_ptr<SequenceSampler> sampler_;
  std::vector<Batch> val_batches_;
  std::vector<std::string> domains_;
  LanguageModel model_{nullptr};
  std::unique_ptr<TrainingObjective> objective_;
  BalanceConfig balance_;         // the settings objective_ was built from
  ProcessGroups balance_groups_;  // groups_ with the balance group of balance_
  std::unique_ptr<DataParallel> dp_;
  std::unique_ptr<torch::optim::AdamW> optimizer_;
  std::unique_ptr<RunDirectory> run_directory_;
  std::unique_ptr<NonFiniteSteps> nonfinite_;
  std::unique_ptr<RoutingMonitor> monitor_;  // per-layer metrics, TensorBoard, traces, replay
  TrainSummary summary_;
  double window_tokens_ = 0, window_seconds_ = 0;
  // The last completed step, for save_on_stop in the middle of the next one: its parameters,
  // optimizer state and router biases change only under state_mutex_ (the optimizer step).
  std::mutex state_mutex_;
  int64_t completed_step_ = 0;
  SamplerState completed_sampler_;
  // Rank 0's writes into checkpoints/ one at a time; the newest step saved (or resumed from).
  std::mutex save_mutex_;
  std::atomic<int64_t> saved_step_{0};
};

Trainer::Trainer(const Config& config, const ProcessGroups& groups)
    : config_(config),
      groups_(groups),
      world_(*groups.world),
      rank0_(world_.rank() == 0),
      balance_groups_(groups) {
  config.validate_for_world(static_cast<int>(groups.sizes.world));
  torch::set_num_threads(static_cast<int>(config.train.threads));
  TORCH_CHECK(config.parallel.expert_parallel == groups.sizes.expert_parallel,
              "parallel.expert_parallel (", config.parallel.expert_parallel,
              ") differs from the process groups' expert-parallel size (",
              groups.sizes.expert_parallel, "); build them from the config");
  device_ = select_device(config);
  TORCH_CHECK(config.train.dtype == "float32" || device_.is_cuda(), "train.dtype (",
              config.train.dtype, ") needs train.device cuda; use float32 on the CPU");
  autocast_bf16_ = config.train.dtype == "bfloat16";
  expert_parallel_ = groups.sizes.expert_parallel > 1;
  open_data();
  build_model();
  build_optimizer();
}

void Trainer::open_data() {
  train_data_ = std::make_shared<TokenDataset>(TokenDataset::open(config_.data.dir, "train"));
  auto val_data = TokenDataset::open(config_.data.dir, "val");
  check_same_domains(*train_data_, val_data, config_.data.dir);
  sampler_ = std::make_unique<SequenceSampler>(
      train_data_, SamplerOptions(config_.data.seq_len, config_.data.micro_batch_size)
                       .seed(static_cast<uint64_t>(config_.train.seed))
                       .rank(world_.rank())
                       .world_size(world_.size()));
  val_batches_ = validation_batches(val_data, config_.data.seq_len, config_.data.micro_batch_size,
                                    config_.data.val_batches_per_domain);
  domains_ = val_data.domain_names();
}

void Trainer::build_model() {
  const int64_t vocab =
      config_.model.vocab_size > 0 ? config_.model.vocab_size : train_data_->vocab_size();
  TORCH_CHECK(vocab >= train_data_->vocab_size(), "model.vocab_size (", vocab,
              ") is smaller than the dataset's vocabulary (", train_data_->vocab_size(), ") in ",
              config_.data.dir);
  torch::manual_seed(static_cast<uint64_t>(config_.train.seed));
  model_ = LanguageModel(model_options_from_config(config_, vocab));
  load_init_from(config_, *model_);  // model.init_from's weights (a resume overwrites them)
  model_->to(device_);
  if (expert_parallel_) apply_expert_parallel(*model_, groups_);
  dp_ = std::make_unique<DataParallel>(model_.ptr(), groups_.data_parallel,
                                       expert_parallel_ ? groups_.expert_data_parallel : nullptr);
  dp_->broadcast_parameters();
}

void Trainer::build_optimizer() {
  std::vector<torch::Tensor> decay, no_decay;
  for (auto& p : model_->parameters()) (p.dim() >= 2 ? decay : no_decay).push_back(p);
  const auto& o = config_.optim;
  auto adamw = torch::optim::AdamWOptions(o.lr).betas({o.beta1, o.beta2}).eps(o.eps);
  std::vector<torch::optim::OptimizerParamGroup> param_groups;
  param_groups.emplace_back(
      decay, std::make_unique<torch::optim::AdamWOptions>(adamw.weight_decay(o.weight_decay)));
  param_groups.emplace_back(no_decay,
                            std::make_unique<torch::optim::AdamWOptions>(adamw.weight_decay(0.0)));
  if (o.fused) {
    optimizer_ = std::make_unique<FusedAdamW>(param_groups, adamw);
  } else {
    optimizer_ = std::make_unique<torch::optim::AdamW>(param_groups, adamw);
  }
}

int64_t Trainer::resume() {
  const std::string& run_dir = config_.train.run_dir;
  run_directory_ = std::make_unique<RunDirectory>(config_, world_);
  int64_t start_step = 0;
  const std::string resume_dir = resolve_resume(run_dir, config_.train.resume, &config_);
  if (!resume_dir.empty()) {
    auto meta = read_checkpoint_meta(resume_dir);
    load_training_state(resume_dir + "/state.pt", *model_, *optimizer_, *groups_.expert_parallel);
    try {
      sampler_->load_state(SamplerState::from_string(meta.sampler_state));
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "checkpoint ", resume_dir, ": ", error_message(e));
    }
    start_step = meta.step;
    log0("resumed from ", resume_dir, " at step ", start_step);
  }
  run_directory_->start(start_step);
  return start_step;
}

void Trainer::use_balance_for(int64_t steps_done) {
  const BalanceConfig b = config_.balance.at_step(steps_done);
  if (objective_ && b.scope == balance_.scope && b.group_size == balance_.group_size &&
      b.alpha == balance_.alpha) {
    return;
  }
  const int64_t group = b.scope == "group" ? b.group_size : 0;
  if (group != balance_groups_.sizes.balance_group) {
    balance_groups_ = with_balance_group(groups_, group);  // collective: every rank is here
  }
  const auto options = balance_options_from_config(config_, steps_done);
  objective_ = std::make_unique<TrainingObjective>(model_->moe_layers(), options,
                                                   objective_reducers(options, balance_groups_));
  if (!config_.balance.schedule.empty()) {
    log0("balance from step ", steps_done + 1, ": scope ", b.scope,
         b.scope == "group" ? ", group_size " + std::to_string(b.group_size) : "", ", alpha ",
         b.alpha);
  }
  balance_ = b;
}

void Trainer::save(int64_t step) {
  std::lock_guard<std::mutex> saving(save_mutex_);
  save_checkpoint(config_, step, sampler_->state().to_string(), *model_, *optimizer_, groups_);
  saved_step_ = step;
}

// StopSignals' thread, on a stop signal: the checkpoint of the last completed step, written while
// the step under way goes on (a step that outlasts mpirun's kill window still leaves one), with
// no MPI call. A failure is logged; the training loop's checkpoint at the end of the step follows.
void Trainer::save_on_stop() {
  constexpr double kPartsWaitSeconds = 60;
  TrainingStateCopy copy;
  {
    std::lock_guard<std::mutex> unchanged(state_mutex_);
    if (completed_step_ <= saved_step_) return;
    copy = copy_training_state(*model_, *optimizer_, groups_, completed_step_,
                               completed_sampler_.to_string());
  }
  // Only rank 0 waits for a save of the training loop: the others' parts must not, as rank 0
  // waits for them while holding its lock.
  std::unique_lock<std::mutex> saving(save_mutex_, std::defer_lock);
  if (rank0_) saving.lock();
  if (copy.step <= saved_step_) return;  // the training loop saved it, or a later step, meanwhile
  try {
    const std::string dir = write_training_state_copy(config_, copy, kPartsWaitSeconds);
    saved_step_ = copy.step;
    if (rank0_) {
      write_log_line("stop signal during step " + std::to_string(copy.step + 1) +
                     ": checkpoint of step " + std::to_string(copy.step) + " " + dir);
    }
  } catch (const std::exception& e) {
    std::cerr << "[rank " << copy.world_rank << "] stop signal: no checkpoint of step " << copy.step
              << " during the next step: " << error_message(e)
              << "; the checkpoint at the end of the step follows\n"
              << std::flush;
  }
}

bool Trainer::train_step(int64_t step, int64_t stop_after) {
  auto t0 = std::chrono::steady_clock::now();
  GBMOE_PROFILE_REGION("step");  // what no region below holds: the trainer's own work
  const double lr = learning_rate(config_.optim, step, config_.train.steps);
  for (auto& group : optimizer_->param_groups()) {
    static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
  }
  optimizer_->zero_grad();
  std::vector<Batch> micro(config_.data.grad_accum);
  {
    GBMOE_PROFILE_REGION("data");
    for (auto& b : micro) b = sampler_->next_batch();
  }
  MicroBatchHooks hooks;
  hooks.before_forward = [&](int64_t m, const Batch& b) {
    monitor_->before_forward(step + 1, m, b);
  };
  hooks.after_forward = [&](int64_t m, const Batch& b, const RoutingContext& routing) {
    monitor_->after_forward(step + 1, m, b, routings_of(routing));
  };
  objective_->set_step(step);  // the Shuffle subset of a resumed step is the uninterrupted one's
  // The monitor switches replay on per micro-batch in before_forward, so forward_backward cannot
  // see it: a recomputed block would reuse the next micro-batch's replayed ids.
  const bool ahead = config_.train.forward_ahead && !(config_.train.activation_checkpointing &&
                                                      !config_.train.routing_replay.empty());
  const auto losses =
      forward_backward(model_, *objective_, micro, device_, autocast_bf16_, hooks, ahead);
  const bool stop_after_here = stop_after >= 0 && step + 1 >= stop_after;
  auto flags = torch::tensor(
      {losses.finite ? 0.0 : 1.0, stop_requested() ? 1.0 : 0.0, stop_after_here ? 1.0 : 0.0},
      torch::kDouble);
  {
    GBMOE_PROFILE_REGION("step_flags.all_reduce");
    world_.all_reduce(flags, ReduceOp::Max);
  }
  if (flags[1].item<double>() != 0.0) request_stop();  // a signal to one rank: save_on_stop on all
  // A step whose loss or gradient norm is not finite is never applied.
  bool apply = nonfinite_->accept_loss(step + 1, flags[0].item<double>() == 0.0,
                                       losses.finite ? "on another rank" : losses.bad_term);
  double grad_norm = std::numeric_limits<double>::quiet_NaN();
  if (apply) {
    {
      GBMOE_PROFILE_REGION("gradients.all_reduce");
      dp_->average_gradients();
    }
    GBMOE_PROFILE_REGION("gradients.clip");
    // With clipping off the call only measures the norm (an unreachable bound).
    const double clip = config_.optim.grad_clip > 0 ? config_.optim.grad_clip : 1e30;
    grad_norm = expert_parallel_ ? clip_grad_norm(*model_, clip, *groups_.expert_parallel)
                                 : torch::nn::utils::clip_grad_norm_(model_->parameters(), clip);
    apply = nonfinite_->accept_grad_norm(step + 1, grad_norm, world_);
  }
  std::vector<LayerStepStats> layers;
  {
    std::lock_guard<std::mutex> changing(state_mutex_);  // not while save_on_stop copies the state
    if (apply) {
      GBMOE_PROFILE_REGION("optimizer");
      optimizer_->step();
    }
    GBMOE_PROFILE_REGION("objective.end_step");
    layers = objective_->end_step();  // updates the router biases (loss-free balancing)
    completed_step_ = step + 1;
    completed_sampler_ = sampler_->state();
  }
  {
    GBMOE_PROFILE_REGION("metrics");
    record_step(step + 1, lr, grad_norm, losses, layers, seconds_since(t0));
  }
  return flags[1].item<double>() == 0.0 && flags[2].item<double>() == 0.0;
}

// Metrics in one all-reduce: rank shares of the objective and micro-batch figures averaged over
// ranks, valid tokens and selection counts summed (MaxVio of the whole step).
void Trainer::record_step(int64_t done, double lr, double grad_norm, const StepLosses& losses,
                          const std::vector<LayerStepStats>& layers, double seconds) {
  const int64_t L = static_cast<int64_t>(layers.size()), R = world_.size();
  std::vector<double> head{losses.values.task, losses.values.balance, losses.values.z_loss,
                           losses.local_tokens * R};
  for (const auto& st : layers) head.push_back(st.micro_max_violation);
  std::vector<torch::Tensor> parts{torch::tensor(head, torch::kDouble)};
  for (const auto& st : layers) parts.push_back(st.local_counts.cpu());
  auto packed = sum_over(world_, torch::cat(parts)) / static_cast<double>(R);
  std::vector<double> mv_global, mv_micro;
  std::vector<torch::Tensor> global_counts;  // (L) x (E,) selections of all ranks
  for (int64_t l = 0, offset = 4 + L; l < L; ++l) {
    const int64_t E = layers[l].local_counts.numel();
    mv_global.push_back(max_violation(packed.narrow(0, offset, E)));
    mv_micro.push_back(packed[4 + l].item<double>());
    global_counts.push_back((packed.narrow(0, offset, E) * static_cast<double>(R)).round());
    offset += E;
  }
  const std::string routing_json =
      monitor_->end_step(world_, done, global_counts, mv_micro, layers);
  const double ce = packed[0].item<double>(), bal = packed[1].item<double>();
  const double z = packed[2].item<double>(), step_tokens = packed[3].item<double>();
  summary_.last_step = done;
  summary_.losses.push_back(ce);
  summary_.max_violation_global = mv_global;
  summary_.max_violation_micro = mv_micro;
  window_tokens_ += step_tokens;
  window_seconds_ += seconds;
  if (!rank0_) return;
  std::ostringstream line;
  line << "{\"step\":" << done << ",\"loss\":" << json_number(ce + bal + z)
       << ",\"ce\":" << json_number(ce) << ",\"balance\":" << json_number(bal)
       << ",\"z_loss\":" << json_number(z) << ",\"lr\":" << json_number(lr)
       << ",\"grad_norm\":" << json_number(grad_norm)
       << ",\"tokens_per_s\":" << json_number(step_tokens / seconds)
       << ",\"balance_scope\":" << json_string(balance_.scope)
       << ",\"balance_group_size\":" << balance_.group_size
       << ",\"balance_alpha\":" << json_number(balance_.alpha)
       << ",\"maxvio_global\":" << json_list(mv_global)
       << ",\"maxvio_micro\":" << json_list(mv_micro) << routing_json << "}";
  run_directory_->append_metrics(line.str());
  monitor_->log_line(line.str());
}

void Trainer::log_progress(int64_t done) {
  const int64_t total = config_.train.steps;
  if (done % config_.train.log_every != 0 && done != total) return;
  double mvg = 0, mvm = 0;
  const auto L = static_cast<double>(summary_.max_violation_global.size());
  for (size_t l = 0; l < summary_.max_violation_global.size(); ++l) {
    mvg += summary_.max_violation_global[l] / L, mvm += summary_.max_violation_micro[l] / L;
  }
  const double tps = window_tokens_ / std::max(1e-9, window_seconds_);
  const double left =
      (total - done) * (window_seconds_ / std::max<int64_t>(1, config_.train.log_every));
  const double lr = learning_rate(config_.optim, done - 1, total);
  std::ostringstream p;
  p << std::fixed << "step " << done << "/" << total << " | loss " << std::setprecision(4)
    << summary_.losses.back() << " | maxvio global " << std::setprecision(2) << mvg << " micro "
    << mvm << " | " << balance_.scope
    << (balance_.scope == "group" ? " g=" + std::to_string(balance_.group_size) : "") << " alpha "
    << std::defaultfloat << std::setprecision(6) << balance_.alpha << std::fixed << " | "
    << std::setprecision(0) << tps << " tok/s | lr " << std::scientific << std::setprecision(2)
    << lr << " | " << format_duration(left) << " left";
  log0(p.str());
  summary_.tokens_per_second = tps;
  window_tokens_ = window_seconds_ = 0;
}

void Trainer::evaluate_now(int64_t done) {
  const int64_t every = config_.train.eval_every;
  if (every <= 0 || (done % every != 0 && done != config_.train.steps)) return;
  summary_.eval = evaluate(model_, val_batches_, domains_, world_, autocast_bf16_, done);
  if (rank0_) {
    run_directory_->append_metrics(eval_json(summary_.eval));
    monitor_->log_line(eval_json(summary_.eval));
  }
  std::ostringstream e;
  e << std::fixed << std::setprecision(4) << "eval step " << done << " | val loss "
    << summary_.eval.loss;
  for (const auto& [name, loss] : summary_.eval.domain_loss) e << " | " << name << " " << loss;
  log0(e.str());
}

TrainSummary Trainer::run(int64_t stop_after) {
  summary_.run_dir = config_.train.run_dir;
  const int64_t start_step = resume();
  summary_.first_step = summary_.last_step = start_step;
  completed_step_ = saved_step_ = start_step;
  completed_sampler_ = sampler_->state();
  monitor_ = std::make_unique<RoutingMonitor>(
      config_, model_->moe_layers(), train_data_->domain_names(), world_.rank(), start_step > 0);
  StopSignals stop_signals([this] { save_on_stop(); });
  nonfinite_ =
      std::make_unique<NonFiniteSteps>(config_.train.max_nonfinite_steps, config_.train.run_dir);
  const auto is_shard = expert_parameter_rule(*model_);
  int64_t parameters = 0;
  for (const auto& item : model_->named_parameters()) {
    parameters += item.value().numel() * (is_shard(item.key()) ? groups_.sizes.expert_parallel : 1);
  }
  log0("gbmoe-train: ", world_.size(), " ranks, ", parameters / 1e6, "M parameters, ",
       model_->moe_layers().size(), " MoE layers x ", config_.model.num_experts, " experts (top-",
       config_.model.top_k, "), scope ", config_.balance.scope, ", ", train_data_->num_tokens(),
       " training tokens in ", domains_.size(), " domains");
  StepProfiler profiler(config_.train.run_dir + "/profile", world_.rank(),
                        config_.train.profile_start, config_.train.profile_steps);
  for (int64_t step = start_step; step < config_.train.steps; ++step) {
    use_balance_for(step);
    profiler.before_step(step);
    const bool go_on = train_step(step, stop_after);
    if (profiler.after_step(step)) {
      log0("profile of steps ", config_.train.profile_start + 1, "-", step + 1,
           " (rank 0): ", config_.train.run_dir, "/profile/rank0.txt\n",
           StepProfiler::format(profiler.summary()));
    }
    const int64_t done = step + 1;
    log_progress(done);
    evaluate_now(done);
    const int64_t every = config_.train.checkpoint_every;
    // checkpoint_every 0: never, but a stop (signal, stop_after) still checkpoints.
    if ((every > 0 && (done % every == 0 || done == config_.train.steps)) || !go_on) save(done);
    if (!go_on) {
      log0("stopped after step ", done, "; resume with --set train.resume=auto");
      summary_.interrupted = true;
      break;
    }
  }
  return summary_;
}

}  // namespace

TrainSummary train(const Config& config, const ProcessGroups& groups, int64_t stop_after) {
  Trainer trainer(config, groups);
  return trainer.run(stop_after);
}

}  // namespace gbmoe
