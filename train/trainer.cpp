// The training loop. Every rank runs the same sequence of collectives; rank 0 writes files.
#include "train/trainer.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <sstream>

#include "moe/autocast.h"
#include "moe/balancer.h"
#include "parallel/balance_sync.h"
#include "parallel/data_parallel.h"
#include "parallel/expert_parallel.h"
#include "parallel/runtime.h"
#include "train/analysis.h"
#include "train/checkpoint.h"
#include "train/json.h"
#include "train/routing_monitor.h"
#include "train/sampler.h"
#include "train/token_dataset.h"
#ifdef GBMOE_WITH_CUDA_KERNELS
#include "csrc_cuda/moe_kernels.h"
#endif

namespace gbmoe {
namespace fs = std::filesystem;

namespace {

volatile std::sig_atomic_t g_stop_requested = 0;

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

// While alive, SIGTERM asks the loop to checkpoint and stop; the previous handler comes back
// however train() ends.
class SigtermStops {
 public:
  SigtermStops() : previous_(std::signal(SIGTERM, [](int) { request_stop(); })) {
    g_stop_requested = 0;
  }
  ~SigtermStops() { std::signal(SIGTERM, previous_); }
  SigtermStops(const SigtermStops&) = delete;
  SigtermStops& operator=(const SigtermStops&) = delete;

 private:
  void (*previous_)(int);
};

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

void request_stop() { g_stop_requested = 1; }

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

BalanceOptions balance_options_from_config(const Config& config) {
  const auto& b = config.balance;
  return BalanceOptions()
      .scope(balance_scope_from_string(b.scope))
      .alpha(b.alpha)
      .micro_alpha(b.micro_alpha)
      .group_size(b.scope == "group" ? b.group_size : 0)
      .method(balance_method_from_string(b.method))
      .bias_update_rate(b.bias_update_rate);
}

LanguageModelOptions model_options_from_config(const Config& config, int64_t vocab_size) {
  const auto& m = config.model;
  auto moe = MoELayerOptions(m.dim, m.num_experts, m.expert_hidden)
                 .shared_experts(m.shared_experts)
                 .router(RouterOptions()
                             .top_k(m.top_k)
                             .score_function(score_function_from_string(m.score_function))
                             .renormalize(m.renormalize)
                             .z_loss_coef(config.balance.z_loss)
                             .init_std(m.init_std))
                 .dispatcher(DispatcherOptions()
                                 .capacity_factor(m.capacity_factor)
                                 .drop_policy(drop_policy_from_string(m.drop_policy)))
                 .balance(balance_options_from_config(config))
                 .init_std(m.init_std);
  return LanguageModelOptions(vocab_size, m.dim, m.num_layers, m.num_heads)
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

void append_line(const std::string& path, const std::string& line) {
  std::ofstream out(path, std::ios::app);
  TORCH_CHECK(out, "cannot append to ", path);
  out << line << "\n";
}

}  // namespace

TrainSummary train(const Config& config, const ProcessGroups& groups, int64_t stop_after) {
  config.validate_for_world(static_cast<int>(groups.sizes.world));
  Communicator& world = *groups.world;
  const bool rank0 = world.rank() == 0;
  torch::set_num_threads(static_cast<int>(config.train.threads));
  TORCH_CHECK(config.parallel.expert_parallel == groups.sizes.expert_parallel,
              "parallel.expert_parallel (", config.parallel.expert_parallel,
              ") differs from the process groups' expert-parallel size (",
              groups.sizes.expert_parallel, "); build them from the config");
  const torch::Device device = select_device(config);
  TORCH_CHECK(config.train.dtype == "float32" || device.is_cuda(), "train.dtype (",
              config.train.dtype, ") needs train.device cuda; use float32 on the CPU");
  const bool autocast_bf16 = config.train.dtype == "bfloat16";

  // Data.
  auto train_data = std::make_shared<TokenDataset>(TokenDataset::open(config.data.dir, "train"));
  auto val_data = TokenDataset::open(config.data.dir, "val");
  const int64_t vocab =
      config.model.vocab_size > 0 ? config.model.vocab_size : train_data->vocab_size();
  TORCH_CHECK(vocab >= train_data->vocab_size(), "model.vocab_size (", vocab,
              ") is smaller than the dataset's vocabulary (", train_data->vocab_size(), ") in ",
              config.data.dir);
  SequenceSampler sampler(train_data,
                          SamplerOptions(config.data.seq_len, config.data.micro_batch_size)
                              .seed(static_cast<uint64_t>(config.train.seed))
                              .rank(world.rank())
                              .world_size(world.size()));
  auto val_batches = validation_batches(val_data, config.data.seq_len, config.data.micro_batch_size,
                                        config.data.val_batches_per_domain);
  const auto& domains = val_data.domain_names();

  // Model, balancing, data parallelism, optimizer.
  torch::manual_seed(static_cast<uint64_t>(config.train.seed));
  LanguageModel model(model_options_from_config(config, vocab));
  model->to(device);
  const bool expert_parallel = groups.sizes.expert_parallel > 1;
  if (expert_parallel) apply_expert_parallel(*model, groups);
  auto moe_layers = model->moe_layers();
  const auto balance = balance_options_from_config(config);
  Balancer balancer(moe_layers, balance_reducer(balance, groups));
  DataParallel dp(model.ptr(), groups.data_parallel,
                  expert_parallel ? groups.expert_data_parallel : nullptr);
  dp.broadcast_parameters();

  std::vector<torch::Tensor> decay, no_decay;
  for (auto& p : model->parameters()) (p.dim() >= 2 ? decay : no_decay).push_back(p);
  auto adamw = torch::optim::AdamWOptions(config.optim.lr)
                   .betas({config.optim.beta1, config.optim.beta2})
                   .eps(config.optim.eps);
  std::vector<torch::optim::OptimizerParamGroup> param_groups;
  param_groups.emplace_back(decay, std::make_unique<torch::optim::AdamWOptions>(
                                       adamw.weight_decay(config.optim.weight_decay)));
  param_groups.emplace_back(no_decay,
                            std::make_unique<torch::optim::AdamWOptions>(adamw.weight_decay(0.0)));
  torch::optim::AdamW optimizer(param_groups, adamw);

  // Run directory and resume.
  const std::string run_dir = config.train.run_dir;
  const std::string metrics_path = (fs::path(run_dir) / "metrics.jsonl").string();
  TrainSummary summary;
  summary.run_dir = run_dir;
  int64_t start_step = 0;
  const std::string resume_dir = resolve_resume(run_dir, config.train.resume);
  if (!resume_dir.empty()) {
    auto meta = read_checkpoint_meta(resume_dir);
    load_training_state(resume_dir + "/state.pt", *model, optimizer, *groups.expert_parallel);
    sampler.load_state(SamplerState::from_string(meta.sampler_state));
    start_step = meta.step;
    log0("resumed from ", resume_dir, " at step ", start_step);
  }
  if (rank0) {
    fs::create_directories(run_dir);
    std::ofstream(fs::path(run_dir) / "config.yaml") << config.to_yaml();
    if (start_step == 0) std::ofstream(metrics_path, std::ios::trunc);
  }
  summary.first_step = start_step;
  summary.last_step = start_step;
  RoutingMonitor monitor(config, moe_layers, train_data->domain_names(), world.rank(),
                         start_step > 0);

  auto save = [&](int64_t step) {
    // Rank 0 writes; only its expert-parallel group (expert-data-parallel rank 0) gathers.
    torch::serialize::OutputArchive state;
    if (groups.expert_data_parallel->rank() == 0) {
      state = gather_training_state(*model, optimizer, *groups.expert_parallel);
    }
    if (rank0) {
      CheckpointMeta meta{step, sampler.state().to_string(), config.to_yaml()};
      auto dir = write_checkpoint(run_dir, meta, config.train.keep_checkpoints,
                                  [&](const std::string& d) { state.save_to(d + "/state.pt"); });
      log0("checkpoint ", dir);
    }
    world.barrier();
  };

  SigtermStops sigterm;
  const int64_t M = config.data.grad_accum;
  const int64_t total_steps = config.train.steps;
  int64_t parameters = 0;
  for (const auto& item : model->named_parameters()) {
    const bool shard = expert_parallel && is_expert_parameter(item.key());
    parameters += item.value().numel() * (shard ? groups.sizes.expert_parallel : 1);
  }
  log0("gbmoe-train: ", world.size(), " ranks, ", parameters / 1e6, "M parameters, ",
       moe_layers.size(), " MoE layers x ", config.model.num_experts, " experts (top-",
       config.model.top_k, "), scope ", config.balance.scope, ", ", train_data->num_tokens(),
       " training tokens in ", domains.size(), " domains");

  double window_tokens = 0, window_seconds = 0;
  for (int64_t step = start_step; step < total_steps; ++step) {
    auto t0 = std::chrono::steady_clock::now();
    const double lr = learning_rate(config.optim, step, total_steps);
    for (auto& group : optimizer.param_groups()) {
      static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
    }
    optimizer.zero_grad();
    std::vector<Batch> micro(M);
    double local_tokens = 0;
    for (auto& b : micro) {
      b = sampler.next_batch();
      local_tokens += b.mask.sum().item<double>();
    }
    balancer.begin_step(M);
    balancer.set_local_step_tokens(local_tokens);  // summed with the first micro-batch's counts
    double ce_sum = 0, balance_sum = 0;
    bool finite = true;
    std::string bad_term;
    for (const auto& b : micro) {
      auto mask = b.mask.to(device);
      torch::Tensor ce;
      monitor.before_forward(step + 1, &b - micro.data(), b);
      {
        AutocastScope autocast(autocast_bf16);
        auto logits = model->forward(b.inputs.to(device), mask);
        ce = torch::nn::functional::cross_entropy(logits.flatten(0, 1),
                                                  b.targets.to(device).flatten());
      }
      monitor.after_forward(step + 1, &b - micro.data(), b);
      auto bal = balancer.micro_batch_loss();
      const double ce_v = ce.item<double>(), bal_v = bal.item<double>();
      if (finite && (!std::isfinite(ce_v) || !std::isfinite(bal_v))) {
        finite = false;
        bad_term = !std::isfinite(ce_v) ? "cross_entropy = " + std::to_string(ce_v)
                                        : "balance loss = " + std::to_string(bal_v);
      }
      ((ce + bal) / static_cast<double>(M)).backward();
      ce_sum += ce_v;
      balance_sum += bal_v;
    }
    const bool stop_here = g_stop_requested || (stop_after >= 0 && step + 1 >= stop_after);
    auto flags = torch::tensor({finite ? 0.0 : 1.0, stop_here ? 1.0 : 0.0}, torch::kDouble);
    world.all_reduce(flags, ReduceOp::Max);
    TORCH_CHECK(flags[0].item<double>() == 0.0, "step ", step + 1, ": non-finite loss (",
                finite ? "on another rank" : bad_term,
                "); stopping without an optimizer step. The last checkpoint is intact; lower "
                "optim.lr or raise optim.warmup_steps");
    dp.average_gradients();
    // With clipping off the call only measures the norm (an unreachable bound).
    const double clip = config.optim.grad_clip > 0 ? config.optim.grad_clip : 1e30;
    const double grad_norm = expert_parallel
                                 ? clip_grad_norm(*model, clip, *groups.expert_parallel)
                                 : torch::nn::utils::clip_grad_norm_(model->parameters(), clip);
    optimizer.step();
    auto layer_stats = balancer.end_step();
    const int64_t done = step + 1;
    summary.last_step = done;

    // Metrics in one all-reduce: losses and micro-batch MaxVio averaged over ranks, valid
    // tokens and selection counts summed (MaxVio of the whole step).
    const int64_t L = static_cast<int64_t>(layer_stats.size());
    std::vector<torch::Tensor> parts{
        torch::tensor({ce_sum / M, balance_sum / M, local_tokens * world.size()}, torch::kDouble)};
    for (int64_t l = 0; l < L; ++l) {
      parts.push_back(torch::full({1}, layer_stats[l].micro_max_violation, torch::kDouble));
    }
    for (int64_t l = 0; l < L; ++l) parts.push_back(layer_stats[l].local_counts.cpu());
    auto packed = sum_over(world, torch::cat(parts)) / world.size();
    std::vector<double> mv_global, mv_micro;
    std::vector<torch::Tensor> global_counts;
    for (int64_t l = 0, offset = 3 + L; l < L; ++l) {
      const int64_t E = layer_stats[l].local_counts.numel();
      global_counts.push_back((packed.narrow(0, offset, E) * world.size()).round());
      mv_global.push_back(max_violation(packed.narrow(0, offset, E)));
      mv_micro.push_back(packed[3 + l].item<double>());
      offset += E;
    }
    const double ce_mean = packed[0].item<double>(), bal_mean = packed[1].item<double>();
    const std::string routing_json = monitor.end_step(world, done, global_counts, mv_micro);
    summary.losses.push_back(ce_mean);
    summary.max_violation_global = mv_global;
    summary.max_violation_micro = mv_micro;
    const double dt = seconds_since(t0);
    const double step_tokens = packed[2].item<double>();
    window_tokens += step_tokens;
    window_seconds += dt;
    if (rank0) {
      std::ostringstream line;
      line << "{\"step\":" << done << ",\"loss\":" << json_number(ce_mean + bal_mean)
           << ",\"ce\":" << json_number(ce_mean) << ",\"balance\":" << json_number(bal_mean)
           << ",\"lr\":" << json_number(lr) << ",\"grad_norm\":" << json_number(grad_norm)
           << ",\"tokens_per_s\":" << json_number(step_tokens / dt)
           << ",\"maxvio_global\":" << json_list(mv_global)
           << ",\"maxvio_micro\":" << json_list(mv_micro) << routing_json << "}";
      append_line(metrics_path, line.str());
      monitor.log_line(line.str());
    }
    if (done % config.train.log_every == 0 || done == total_steps) {
      double mvg = 0, mvm = 0;
      for (int64_t l = 0; l < L; ++l) mvg += mv_global[l] / L, mvm += mv_micro[l] / L;
      const double tps = window_tokens / std::max(1e-9, window_seconds);
      const double left =
          (total_steps - done) * (window_seconds / std::max<int64_t>(1, config.train.log_every));
      std::ostringstream p;
      p << std::fixed << "step " << done << "/" << total_steps << " | loss " << std::setprecision(4)
        << ce_mean << " | bal " << std::setprecision(4) << bal_mean << " | maxvio global "
        << std::setprecision(2) << mvg << " micro " << mvm << " | " << std::setprecision(0) << tps
        << " tok/s | lr " << std::scientific << std::setprecision(2) << lr << " | "
        << format_duration(left) << " left";
      log0(p.str());
      summary.tokens_per_second = tps;
      window_tokens = window_seconds = 0;
    }
    const bool eval_now =
        config.train.eval_every > 0 && (done % config.train.eval_every == 0 || done == total_steps);
    if (eval_now) {
      summary.eval = evaluate(model, val_batches, domains, world, autocast_bf16, done);
      if (rank0) append_line(metrics_path, eval_json(summary.eval));
      if (rank0) monitor.log_line(eval_json(summary.eval));
      std::ostringstream e;
      e << std::fixed << std::setprecision(4) << "eval step " << done << " | val loss "
        << summary.eval.loss;
      for (const auto& [name, loss] : summary.eval.domain_loss) e << " | " << name << " " << loss;
      log0(e.str());
    }
    const bool stop = flags[1].item<double>() > 0;
    if ((config.train.checkpoint_every > 0 && done % config.train.checkpoint_every == 0) ||
        done == total_steps || stop) {
      save(done);
    }
    if (stop) {
      log0("stopped after step ", done, "; resume with --set train.resume=auto");
      summary.interrupted = true;
      break;
    }
  }
  return summary;
}

}  // namespace gbmoe
