// The experiment configuration of gbmoe-train: one table of every setting (key, type, default,
// allowed values, help) that drives YAML loading, --set overrides, --help and the resolved dump.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace gbmoe {

/// One change of balance.schedule: after `step` optimizer steps (from logged step step + 1 on)
/// the balance scope becomes `scope` (with `group_size` ranks per group for scope group, 0 = all
/// ranks) and, when given, balance.alpha becomes `alpha`. Written in YAML as a mapping:
/// {step: 200, scope: group, group_size: 1, alpha: 0.005}.
///
/// Example:
///   cfg.apply_override("balance.schedule=[{step: 200, scope: global}]");
///   BalanceConfig phase = cfg.balance.at_step(250);  // scope global from step 201 on
struct BalanceChange {
  int64_t step = 0;
  std::string scope;
  int64_t group_size = 0;
  std::optional<double> alpha;  // unset: the alpha in force before the change
  bool operator==(const BalanceChange& o) const {
    return step == o.step && scope == o.scope && group_size == o.group_size && alpha == o.alpha;
  }
};
using BalanceSchedule = std::vector<BalanceChange>;

/// A setting that cannot be used. The message names the key, the value, where it came from
/// (file:line:column or --set) and, for cross-field checks, the settings to change.
class ConfigError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// The field lists: X(type, name, default, allowed values, help) per setting, the only place a
// setting is declared. The allowed-value checks (AnyValue, AtLeast, Above, AtLeastBelow, Between,
// OneOf, LayerList) are evaluated in config.cpp.
// clang-format off
#define GBMOE_MODEL_FIELDS(X)                                                                      \
  X(int64_t, vocab_size, 0, AtLeast(0), "vocabulary size; 0 = take it from the dataset")           \
  X(int64_t, dim, 256, AtLeast(1), "model width D")                                                \
  X(int64_t, num_layers, 4, AtLeast(1), "transformer blocks")                                      \
  X(int64_t, num_heads, 4, AtLeast(1), "attention heads; must divide model.dim")                   \
  X(int64_t, num_kv_heads, 0, AtLeast(0),                                                          \
    "key/value heads of grouped-query attention (must divide model.num_heads); 0 = num_heads")     \
  X(int64_t, head_dim, 0, AtLeast(0), "size of each attention head; 0 = model.dim / num_heads")    \
  X(std::string, moe_layers, "all", LayerList(),                                                   \
    "blocks whose feed-forward is a MoE layer: all, every_other (1, 3, 5, ...) or a list of "      \
    "block indices like 1,3; the others use a dense SwiGLU")                                       \
  X(int64_t, num_experts, 8, AtLeast(1), "routed experts E per MoE layer")                         \
  X(int64_t, top_k, 2, AtLeast(1), "experts K selected per token")                                 \
  X(int64_t, expert_hidden, 256, AtLeast(1), "hidden size F of each routed expert")                \
  X(int64_t, shared_experts, 0, AtLeast(0),                                                        \
    "always-on shared experts (one SwiGLU of hidden shared_experts * expert_hidden); 0 = none")    \
  X(std::string, score_function, "softmax", OneOf("softmax", "sigmoid"),                           \
    "router scores: softmax over experts, or sigmoid normalized over the selected experts")        \
  X(bool, renormalize, true, AnyValue(), "renormalize the top-k weights of each token to sum 1")   \
  X(double, capacity_factor, 0.0, AtLeast(0.0),                                                    \
    "expert capacity = ceil(capacity_factor * tokens * K / E); 0 = dropless")                      \
  X(std::string, drop_policy, "position", OneOf("position", "score"),                              \
    "which assignments an over-full expert keeps: the earliest tokens, or the highest scores")     \
  X(int64_t, dense_hidden, 1024, AtLeast(1), "hidden size of the dense SwiGLU of non-MoE blocks")  \
  X(bool, tie_embeddings, true, AnyValue(), "share the input embedding with the output head")      \
  X(double, rope_theta, 10000.0, Above(0.0), "rotary position embedding base")                     \
  X(double, init_std, 0.02, Above(0.0), "standard deviation of the normal weight initialization")  \
  X(double, norm_eps, 1e-5, Above(0.0), "epsilon of the RMSNorm layers")                           \
  X(std::string, family, "gbmoe", OneOf("gbmoe", "qwen3_moe", "mixtral", "olmoe"),                 \
    "architecture conventions: gbmoe's own, or those of transformers' Qwen3-MoE (grouped-query "   \
    "attention, per-head q/k RMSNorm, rotate-half RoPE), Mixtral (grouped-query, rotate-half "     \
    "RoPE) or OLMoE (q/k RMSNorm over all heads, rotate-half RoPE)")                               \
  X(std::string, init_from, "", AnyValue(),                                                        \
    "\"\" = random initialization, else a Hugging Face model directory or a gbmoe checkpoint to "  \
    "start from; the model.* architecture is taken from it")

#define GBMOE_BALANCE_FIELDS(X)                                                                    \
  X(std::string, scope, "global", OneOf("micro", "sequence", "global", "group", "shuffle"),        \
    "tokens the expert selection frequencies f are counted over: micro (the rank's micro-batch), " \
    "sequence (each sequence), global (all ranks x all accumulation micro-batches of the step), "  \
    "group (like global within groups of balance.group_size consecutive ranks), shuffle (the "     \
    "Shuffle ablation: f and P of the load-balancing loss over a random subset of the global "     \
    "batch's valid tokens as large as a micro-batch, drawn per step from train.seed)")            \
  X(double, alpha, 0.01, AtLeast(0.0), "weight of the load-balancing loss; 0 = off")               \
  X(double, micro_alpha, 0.0, AtLeast(0.0),                                                        \
    "weight of an extra micro-batch load-balancing loss added to a global or group one "           \
    "(the paper used 1% of balance.alpha); 0 = off")                                               \
  X(int64_t, group_size, 0, AtLeast(0),                                                            \
    "ranks per balance group for balance.scope group; must divide the world size; 0 = all ranks")  \
  X(double, z_loss, 0.001, AtLeast(0.0), "weight of the router z-loss; 0 = off")                   \
  X(std::string, method, "aux_loss", OneOf("aux_loss", "loss_free", "quantile"),                   \
    "aux_loss: the load-balancing loss; loss_free: per-expert routing bias updated from counts; "  \
    "quantile: per-expert routing bias set after each step from quantiles of the routing scores "  \
    "of balance.scope (quantile balancing; no loss, no step size)")                                \
  X(double, bias_update_rate, 0.001, AtLeast(0.0),                                                 \
    "step size of the loss_free bias update; it reads the counts of balance.scope")               \
  X(BalanceSchedule, schedule, {}, AnyValue(),                                                     \
    "changes of the balance set during training, a YAML list of {step, scope, group_size, "        \
    "alpha} in increasing step (1 <= step < train.steps): after `step` steps the scope becomes "   \
    "`scope` (group_size: ranks per group for scope group, default 0 = all ranks) and alpha "      \
    "`alpha` (left out: unchanged); e.g. [{step: 200, scope: global}]; [] = none")

#define GBMOE_DATA_FIELDS(X)                                                                       \
  X(std::string, dir, "data/corpus", AnyValue(), "directory of the tokenized multi-domain corpus") \
  X(int64_t, seq_len, 256, AtLeast(1), "tokens per training sequence")                             \
  X(int64_t, micro_batch_size, 4, AtLeast(1), "sequences per micro-batch on each rank")            \
  X(int64_t, grad_accum, 4, AtLeast(1), "micro-batches accumulated per optimizer step")            \
  X(int64_t, val_batches_per_domain, 4, AtLeast(0),                                                \
    "validation micro-batches per domain at each evaluation")

#define GBMOE_OPTIM_FIELDS(X)                                                                      \
  X(double, lr, 1e-3, Above(0.0), "peak learning rate (AdamW)")                                    \
  X(double, min_lr, 1e-4, AtLeast(0.0), "final learning rate of the cosine decay")                 \
  X(int64_t, warmup_steps, 50, AtLeast(0), "steps of linear warmup to optim.lr")                   \
  X(double, weight_decay, 0.1, AtLeast(0.0), "decoupled weight decay of the matrices")             \
  X(double, beta1, 0.9, AtLeastBelow(0.0, 1.0), "AdamW beta1")                                     \
  X(double, beta2, 0.95, AtLeastBelow(0.0, 1.0), "AdamW beta2")                                    \
  X(double, eps, 1e-8, Above(0.0), "AdamW epsilon")                                                \
  X(double, grad_clip, 1.0, AtLeast(0.0), "maximum global gradient norm; 0 = no clipping")        \
  X(bool, fused, true, AnyValue(),                                                                 \
    "AdamW in LibTorch's fused kernel (one pass per tensor); false = torch::optim::AdamW's "      \
    "op-by-op step, the reference (the two agree to fp32 rounding)")

#define GBMOE_TRAIN_FIELDS(X)                                                                      \
  X(int64_t, steps, 300, AtLeast(1), "optimizer steps")                                            \
  X(int64_t, eval_every, 100, AtLeast(0), "evaluate every N steps and at the end; 0 = never")      \
  X(int64_t, log_every, 10, AtLeast(1), "log training metrics every N steps")                      \
  X(int64_t, checkpoint_every, 100, AtLeast(0),                                                    \
    "save a checkpoint every N steps and at the end; 0 = only when stopped by a signal")           \
  X(int64_t, keep_checkpoints, 3, AtLeast(1), "most recent checkpoints kept in the run directory") \
  X(int64_t, seed, 1234, AtLeast(0), "seed of initialization and data order")                      \
  X(std::string, run_dir, "runs/default", AnyValue(),                                              \
    "directory of logs, checkpoints and the resolved config")                                      \
  X(std::string, resume, "", AnyValue(),                                                           \
    "\"\" = start fresh, auto = the latest checkpoint in train.run_dir if any, "                   \
    "else the path of a checkpoint")                                                               \
  X(bool, overwrite, false, AnyValue(),                                                            \
    "a fresh run (train.resume \"\") in a train.run_dir that holds a run deletes that run's "       \
    "checkpoints and metrics; false = refuse to start")                                            \
  X(int64_t, max_nonfinite_steps, 0, AtLeast(0),                                                   \
    "steps with a non-finite loss or gradient norm skipped (not applied) before the run stops; "   \
    "0 = stop at the first")                                                                       \
  X(double, collective_timeout_s, 1800.0, AtLeast(0.0),                                            \
    "seconds one MPI collective may wait for the other ranks before the job is aborted; 0 = none") \
  X(std::string, device, "cpu", OneOf("cpu", "cuda"), "device of each rank")                       \
  X(std::string, dtype, "float32", OneOf("float32", "bfloat16"),                                   \
    "compute dtype (parameters and optimizer state stay float32)")                                 \
  X(bool, activation_checkpointing, false, AnyValue(),                                             \
    "recompute each block's activations in the backward pass to save memory")                      \
  X(bool, forward_ahead, true, AnyValue(),                                                         \
    "with global or group balancing over several ranks and data.grad_accum > 1, run each "         \
    "micro-batch's forward before the previous one's backward, so that the count reduction "       \
    "overlaps a whole forward; holds one more micro-batch's activations; false = in turn")         \
  X(int64_t, threads, 1, Between(1, 1024), "intra-op CPU threads per rank")                        \
  X(int64_t, profile_steps, 0, AtLeast(0),                                                         \
    "profile this many steps from train.profile_start on: where the time goes, by region, into "   \
    "train.run_dir/profile/rank<r>.txt, and a Chrome trace beside it; 0 = off")                  \
  X(int64_t, profile_start, 5, AtLeast(0),                                                         \
    "steps done before the first profiled one (warm-up left out of train.profile_steps)")         \
  X(int64_t, cpu_buffer_cache_mib, 2048, AtLeast(0),                                               \
    "MiB of freed CPU buffers (2 MiB and more, on huge pages) each rank keeps for reuse; "         \
    "0 = off (glibc malloc)")                                                                  \
  X(bool, tensorboard, true, AnyValue(),                                                           \
    "write the scalars of metrics.jsonl as TensorBoard events into train.run_dir/tb/")             \
  X(int64_t, routing_trace_every, 0, AtLeast(0),                                                   \
    "every N steps, write each valid token's top-k expert ids and domain per MoE layer into "      \
    "train.run_dir/traces/rank<r>.gbrt; 0 = never")                                                \
  X(bool, expert_loads, false, AnyValue(),                                                         \
    "write every step's per-expert selection counts of each MoE layer to "                        \
    "train.run_dir/expert_loads.jsonl")                                                           \
  X(std::string, routing_replay, "", AnyValue(),                                                   \
    "routing trace (a .gbrt file or a traces/ directory) of an earlier run with the same data, "   \
    "batches and world size, traced every step: training forwards use its expert choices "        \
    "instead of the routers' own top-k; \"\" = off")

#define GBMOE_PARALLEL_FIELDS(X)                                                                   \
  X(int64_t, expert_parallel, 1, AtLeast(1),                                                       \
    "ranks that share one copy of the experts (each holds num_experts / expert_parallel); "        \
    "must divide the world size and model.num_experts")

// S(struct, member, field list) per section, in the order of the YAML file and of --help.
#define GBMOE_CONFIG_SECTIONS(S)                                                                   \
  S(ModelConfig, model, GBMOE_MODEL_FIELDS)                                                        \
  S(BalanceConfig, balance, GBMOE_BALANCE_FIELDS)                                                  \
  S(DataConfig, data, GBMOE_DATA_FIELDS)                                                           \
  S(OptimConfig, optim, GBMOE_OPTIM_FIELDS)                                                        \
  S(TrainConfig, train, GBMOE_TRAIN_FIELDS)                                                        \
  S(ParallelConfig, parallel, GBMOE_PARALLEL_FIELDS)
// clang-format on

#define GBMOE_CONFIG_DECLARE_FIELD(type, name, default_value, allowed, help) \
  type name = default_value;

struct ModelConfig {
  GBMOE_MODEL_FIELDS(GBMOE_CONFIG_DECLARE_FIELD)

  /// The block indices whose feed-forward is a MoE layer, ascending (from moe_layers and
  /// num_layers). Throws ConfigError when moe_layers is malformed or names a missing block.
  std::vector<int64_t> moe_layer_indices() const;
};
struct BalanceConfig {
  GBMOE_BALANCE_FIELDS(GBMOE_CONFIG_DECLARE_FIELD)

  /// The balance settings in force after steps_done optimizer steps: scope, group_size and
  /// alpha with every schedule change of step <= steps_done applied (the schedule is kept).
  BalanceConfig at_step(int64_t steps_done) const;
};
struct DataConfig {
  GBMOE_DATA_FIELDS(GBMOE_CONFIG_DECLARE_FIELD)
};
struct OptimConfig {
  GBMOE_OPTIM_FIELDS(GBMOE_CONFIG_DECLARE_FIELD)
};
struct TrainConfig {
  GBMOE_TRAIN_FIELDS(GBMOE_CONFIG_DECLARE_FIELD)
};
struct ParallelConfig {
  GBMOE_PARALLEL_FIELDS(GBMOE_CONFIG_DECLARE_FIELD)
};
#undef GBMOE_CONFIG_DECLARE_FIELD

/// The whole experiment configuration. Built from the defaults, then a YAML file (any key may
/// be omitted), then `--set section.key=value` overrides, then validated. Every setting is
/// addressed by its key "section.name" (see keys() and help_text()).
///
/// Example:
///   Config cfg = Config::from_yaml_file("configs/default.yaml");
///   cfg.apply_overrides({"balance.scope=micro", "train.run_dir=runs/micro"});
///   cfg.validate_for_world(world_size);
///   write_file(cfg.train.run_dir + "/config.yaml", cfg.to_yaml());
struct Config {
#define GBMOE_CONFIG_DECLARE_SECTION(type, member, fields) type member;
  GBMOE_CONFIG_SECTIONS(GBMOE_CONFIG_DECLARE_SECTION)
#undef GBMOE_CONFIG_DECLARE_SECTION

  /// The defaults overridden by the settings of a YAML file of sections of keys.
  static Config from_yaml_file(const std::string& path);
  /// As from_yaml_file; source names the text in error messages.
  static Config from_yaml_string(const std::string& text,
                                 const std::string& source = "<yaml string>");

  /// Applies one "section.key=value" override (the value is parsed by the key's type).
  void apply_override(const std::string& key_eq_value);
  /// Applies overrides in order; a later one wins.
  void apply_overrides(const std::vector<std::string>& key_eq_values);
  /// Sets one key from its string form, checking type and allowed values.
  void set(const std::string& key, const std::string& value);
  /// The string form of one key's value, as written by to_yaml (strings unquoted).
  std::string get(const std::string& key) const;

  /// Every key "section.name", in declaration order.
  static std::vector<std::string> keys();
  /// Every key with its type, default, allowed values and help: the text of --help.
  static std::string help_text();
  /// The full resolved configuration as YAML, one commented line per key; from_yaml_string
  /// of it gives back an equal Config.
  std::string to_yaml() const;

  /// Checks every value against its allowed values and the settings against each other.
  /// Throws one ConfigError listing every problem and the settings to change.
  void validate() const;
  /// validate() plus the checks that need the number of ranks (expert parallelism, balance
  /// groups).
  void validate_for_world(int world_size) const;
};

}  // namespace gbmoe
