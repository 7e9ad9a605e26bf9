// Config: YAML round trip of every key, --help coverage, --set parsing per type, the error
// messages (unknown key, wrong type, out of range, bad name, cross-field), and configs/*.yaml.
#include "train/config.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <vector>

namespace gbmoe {
namespace {

// The message of the ConfigError that f throws ("" and a test failure when it throws none).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const ConfigError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a ConfigError";
  return "";
}

void expect_same_values(const Config& a, const Config& b) {
  for (const auto& key : Config::keys()) EXPECT_EQ(a.get(key), b.get(key)) << key;
}

// A valid value other than the default for every key: the round trip must carry each one.
// A new key must be added here.
const std::map<std::string, std::string> kEveryKeyChanged = {
    {"model.family", "qwen3_moe"},
    {"model.init_from", "hf/models/tiny"},
    {"model.vocab_size", "5000"},
    {"model.dim", "96"},
    {"model.num_layers", "6"},
    {"model.num_heads", "6"},
    {"model.num_kv_heads", "3"},
    {"model.head_dim", "32"},
    {"model.moe_layers", "1,3,5"},
    {"model.num_experts", "16"},
    {"model.top_k", "3"},
    {"model.expert_hidden", "48"},
    {"model.shared_experts", "2"},
    {"model.score_function", "sigmoid"},
    {"model.renormalize", "false"},
    {"model.capacity_factor", "1.25"},
    {"model.drop_policy", "score"},
    {"model.dense_hidden", "384"},
    {"model.tie_embeddings", "false"},
    {"model.rope_theta", "500000"},
    {"model.init_std", "0.1"},
    {"model.norm_eps", "1e-6"},
    {"balance.scope", "group"},
    {"balance.alpha", "0.008"},
    {"balance.micro_alpha", "8e-5"},
    {"balance.group_size", "2"},
    {"balance.z_loss", "0"},
    {"balance.method", "loss_free"},
    {"balance.bias_update_rate", "0.0005"},
    {"balance.schedule", "[{step: 3, scope: group, group_size: 2, alpha: 0.02}]"},
    {"data.dir", "data dir/with: a \"quote\" # and hash"},
    {"data.seq_len", "64"},
    {"data.micro_batch_size", "3"},
    {"data.grad_accum", "1"},
    {"data.val_batches_per_domain", "2"},
    {"optim.lr", "3.0000000000000004e-4"},
    {"optim.min_lr", "0"},
    {"optim.warmup_steps", "0"},
    {"optim.weight_decay", "0.0"},
    {"optim.beta1", "0.8"},
    {"optim.beta2", "0.999"},
    {"optim.eps", "1e-10"},
    {"optim.grad_clip", "0"},
    {"optim.fused", "false"},
    {"train.steps", "7"},
    {"train.eval_every", "0"},
    {"train.log_every", "1"},
    {"train.checkpoint_every", "0"},
    {"train.keep_checkpoints", "1"},
    {"train.seed", "0"},
    {"train.run_dir", "true"},
    {"train.resume", "auto"},
    {"train.device", "cuda"},
    {"train.dtype", "bfloat16"},
    {"train.activation_checkpointing", "true"},
    {"train.forward_ahead", "false"},
    {"train.cpu_buffer_cache_mib", "512"},
    {"train.tensorboard", "false"},
    {"train.routing_trace_every", "50"},
    {"train.expert_loads", "true"},
    {"train.routing_replay", "runs/a/traces"},
    {"train.threads", "2"},
    {"train.profile_steps", "2"},
    {"train.profile_start", "3"},
    {"train.overwrite", "true"},
    {"train.max_nonfinite_steps", "3"},
    {"train.collective_timeout_s", "60"},
    {"parallel.expert_parallel", "2"},
};

Config every_key_changed() {
  Config cfg;
  for (const auto& [key, value] : kEveryKeyChanged) cfg.set(key, value);
  return cfg;
}

TEST(Config, DefaultsAreValid) {
  Config cfg;
  EXPECT_NO_THROW(cfg.validate());
  for (int world : {1, 2, 4, 8}) EXPECT_NO_THROW(cfg.validate_for_world(world)) << world;
}

TEST(Config, DefaultsRoundTripThroughYaml) {
  const Config cfg;
  expect_same_values(cfg, Config::from_yaml_string(cfg.to_yaml()));
}

TEST(Config, EveryKeyChangedRoundTripsThroughYaml) {
  for (const auto& key : Config::keys()) {
    ASSERT_TRUE(kEveryKeyChanged.count(key))
        << "add a non-default value of " << key << " to kEveryKeyChanged";
  }
  const Config defaults;
  const Config cfg = every_key_changed();
  for (const auto& key : Config::keys()) EXPECT_NE(cfg.get(key), defaults.get(key)) << key;
  EXPECT_NO_THROW(cfg.validate_for_world(4));
  const Config back = Config::from_yaml_string(cfg.to_yaml());
  expect_same_values(cfg, back);
  EXPECT_EQ(back.data.dir, "data dir/with: a \"quote\" # and hash");
  EXPECT_EQ(back.train.run_dir, "true");
  EXPECT_EQ(back.optim.lr, 3.0000000000000004e-4);
  EXPECT_EQ(back.to_yaml(), cfg.to_yaml());
}

TEST(Config, KeysAreSectionDotNameAndUnique) {
  const auto keys = Config::keys();
  EXPECT_EQ(std::set<std::string>(keys.begin(), keys.end()).size(), keys.size());
  for (const auto& key : keys) EXPECT_NE(key.find('.'), std::string::npos) << key;
  EXPECT_EQ(keys.front(), "model.vocab_size");
}

TEST(Config, HelpTextListsEveryKeyWithItsDefault) {
  const std::string help = Config::help_text();
  const Config defaults;
  for (const auto& key : Config::keys()) {
    const auto begin = help.find("\n  " + key + " (");
    ASSERT_NE(begin, std::string::npos) << key;
    const std::string line = help.substr(begin, help.find('\n', begin + 1) - begin);
    const std::string value = defaults.get(key);
    const bool quoted = line.find("default \"" + value + "\"") != std::string::npos;
    EXPECT_TRUE(quoted || line.find("default " + value) != std::string::npos) << line;
  }
  EXPECT_NE(help.find("model.score_function (softmax|sigmoid, default softmax)"),
            std::string::npos);
  EXPECT_NE(help.find("model.dim (int, default 256, >= 1)"), std::string::npos);
  EXPECT_NE(help.find("optim.beta1 (float, default 0.9, [0, 1))"), std::string::npos);
  EXPECT_NE(help.find("train.resume (string, default \"\")"), std::string::npos);
}

TEST(Config, DumpIsCommentedAndDoublesReadAsFloats) {
  const Config cfg;
  const std::string yaml = cfg.to_yaml();
  EXPECT_NE(yaml.find("\nmodel:\n  vocab_size: "), std::string::npos);
  EXPECT_NE(yaml.find("# model width D"), std::string::npos);
  EXPECT_EQ(cfg.get("model.rope_theta"), "10000.0");
  EXPECT_EQ(cfg.get("optim.eps"), "1.0e-08");
  EXPECT_EQ(cfg.get("optim.lr"), "0.001");
  EXPECT_NE(yaml.find("run_dir: \"runs/default\""), std::string::npos);
}

TEST(Config, OverridesParseEachType) {
  Config cfg;
  cfg.apply_overrides({"model.dim=512", "optim.lr=3e-4", "model.capacity_factor=2",
                       "model.renormalize=false", "train.activation_checkpointing=yes",
                       "balance.scope=micro", "train.run_dir=runs/a=b", "train.resume="});
  EXPECT_EQ(cfg.model.dim, 512);
  EXPECT_EQ(cfg.optim.lr, 3e-4);
  EXPECT_EQ(cfg.model.capacity_factor, 2.0);
  EXPECT_FALSE(cfg.model.renormalize);
  EXPECT_TRUE(cfg.train.activation_checkpointing);
  EXPECT_EQ(cfg.balance.scope, "micro");
  EXPECT_EQ(cfg.train.run_dir, "runs/a=b");
  EXPECT_EQ(cfg.train.resume, "");
  cfg.apply_overrides({"model.dim=64", "model.dim=128"});
  EXPECT_EQ(cfg.model.dim, 128);
}

TEST(Config, OverridesApplyOnTopOfTheFile) {
  Config cfg = Config::from_yaml_string("model:\n  dim: 64\n  top_k: 1\n");
  cfg.apply_override("model.dim=32");
  EXPECT_EQ(cfg.model.dim, 32);
  EXPECT_EQ(cfg.model.top_k, 1);
  EXPECT_EQ(cfg.model.num_experts, Config().model.num_experts);
}

TEST(Config, FileMayOmitKeysAndSections) {
  const Config defaults;
  expect_same_values(Config::from_yaml_string(""), defaults);
  expect_same_values(Config::from_yaml_string("# nothing\nmodel:\n"), defaults);
  const Config cfg = Config::from_yaml_string("balance:\n  scope: micro\n");
  EXPECT_EQ(cfg.balance.scope, "micro");
  EXPECT_EQ(cfg.balance.alpha, defaults.balance.alpha);
  EXPECT_EQ(cfg.model.dim, defaults.model.dim);
}

TEST(Config, UnknownKeyIsAnErrorWithASuggestion) {
  Config cfg;
  const std::string msg = error_of([&] { cfg.apply_override("model.dimm=3"); });
  EXPECT_NE(msg.find("--set model.dimm=3: unknown key model.dimm (did you mean model.dim?)"),
            std::string::npos)
      << msg;
  EXPECT_NE(error_of([&] { cfg.apply_override("dim=3"); }).find("did you mean model.dim?"),
            std::string::npos);
  const std::string yaml =
      error_of([] { Config::from_yaml_string("model:\n  dim: 64\n  num_expert: 4\n", "x.yaml"); });
  EXPECT_NE(yaml.find("x.yaml:3:3: unknown key model.num_expert (did you mean model.num_experts?)"),
            std::string::npos)
      << yaml;
}

TEST(Config, UnknownSectionIsAnError) {
  const std::string msg =
      error_of([] { Config::from_yaml_string("modle:\n  dim: 64\n", "x.yaml"); });
  EXPECT_NE(msg.find("x.yaml:1:1: unknown section 'modle' (did you mean model?)"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("sections are model, balance, data, optim, train, parallel"),
            std::string::npos)
      << msg;
  Config cfg;
  EXPECT_NE(error_of([&] { cfg.set("trainer.steps", "3"); }).find("unknown section 'trainer'"),
            std::string::npos);
}

TEST(Config, WrongTypeNamesKeyValueFileAndLine) {
  const std::string msg =
      error_of([] { Config::from_yaml_string("model:\n  dim: abc\n", "configs/x.yaml"); });
  EXPECT_NE(msg.find("configs/x.yaml:2:8: model.dim: expected an integer, got 'abc'"),
            std::string::npos)
      << msg;
  Config cfg;
  EXPECT_NE(error_of([&] {
              cfg.apply_override("model.dim=2.5");
            }).find("--set model.dim=2.5: model.dim: expected an integer, got '2.5'"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              cfg.set("optim.lr", "fast");
            }).find("optim.lr: expected a finite number, got 'fast'"),
            std::string::npos);
  EXPECT_NE(error_of([&] { cfg.set("optim.lr", "nan"); }).find("expected a finite number"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              cfg.set("model.renormalize", "maybe");
            }).find("model.renormalize: expected true or false, got 'maybe'"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              Config::from_yaml_string("model:\n  dim: [1, 2]\n");
            }).find("model.dim: expected an integer, got a list"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              Config::from_yaml_string("train:\n  resume:\n");
            }).find("train.resume: expected a string, got an empty value"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              Config::from_yaml_string("model: 3\n");
            }).find("section model must be a mapping of keys, got '3'"),
            std::string::npos);
  EXPECT_EQ(cfg.model.dim, Config().model.dim) << "a rejected value must not be stored";
}

TEST(Config, OutOfRangeAndBadNamesAreErrors) {
  Config cfg;
  EXPECT_NE(error_of([&] { cfg.set("model.dim", "0"); }).find("model.dim (0) must be >= 1"),
            std::string::npos);
  EXPECT_NE(error_of([&] { cfg.set("optim.lr", "0"); }).find("optim.lr (0) must be > 0"),
            std::string::npos);
  EXPECT_NE(
      error_of([&] { cfg.set("optim.beta2", "1"); }).find("optim.beta2 (1) must be in [0, 1)"),
      std::string::npos);
  EXPECT_NE(error_of([&] {
              cfg.set("balance.scope", "batch");
            }).find("balance.scope (batch) must be one of micro, sequence, global, group"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              cfg.set("model.moe_layers", "1,x");
            }).find("model.moe_layers (1,x) must be all, every_other or a comma list"),
            std::string::npos);
  EXPECT_NE(error_of([&] { cfg.set("model.moe_layers", "1,1"); }).find("model.moe_layers (1,1)"),
            std::string::npos);
  const std::string msg =
      error_of([] { Config::from_yaml_string("\ntrain:\n  device: tpu\n", "configs/y.yaml"); });
  EXPECT_NE(msg.find("configs/y.yaml:3:11: train.device (tpu) must be one of cpu, cuda"),
            std::string::npos)
      << msg;
}

TEST(Config, MalformedInputIsAnError) {
  Config cfg;
  EXPECT_NE(error_of([&] {
              cfg.apply_override("model.dim");
            }).find("--set model.dim: expected section.key=value"),
            std::string::npos);
  EXPECT_NE(
      error_of([] { Config::from_yaml_string("model:\n  dim: [1\n", "z.yaml"); }).find("z.yaml:"),
      std::string::npos);
  EXPECT_NE(error_of([] {
              Config::from_yaml_string("- 1\n- 2\n");
            }).find("expected a mapping of sections"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              Config::from_yaml_string("model:\n  dim: 8\n  dim: 16\n");
            }).find("duplicate key model.dim"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              Config::from_yaml_file("/nonexistent/gbmoe.yaml");
            }).find("cannot read config file '/nonexistent/gbmoe.yaml'"),
            std::string::npos);
}

TEST(Config, FileErrorsNameThePath) {
  const auto path = std::filesystem::temp_directory_path() / "gbmoe_config_test_bad.yaml";
  std::ofstream(path) << "# a comment\ndata:\n  seq_len: -4\n";
  const std::string msg = error_of([&] { Config::from_yaml_file(path.string()); });
  EXPECT_NE(msg.find(path.string() + ":3:12: data.seq_len (-4) must be >= 1"), std::string::npos)
      << msg;
  std::filesystem::remove(path);
}

TEST(Config, ValidateNamesTheSettingsToChange) {
  const auto problem = [](std::vector<std::string> overrides) {
    Config cfg;
    cfg.apply_overrides(overrides);
    return error_of([&] { cfg.validate(); });
  };
  const auto has = [](const std::string& msg, const std::string& part) {
    return msg.find(part) != std::string::npos;
  };
  EXPECT_TRUE(has(problem({"model.top_k=8", "model.num_experts=4"}),
                  "model.top_k (8) must be <= model.num_experts (4)"));
  EXPECT_TRUE(has(problem({"model.dim=100", "model.num_heads=3"}),
                  "model.dim (100) must be divisible by model.num_heads (3)"));
  EXPECT_TRUE(has(problem({"model.dim=96", "model.num_heads=32"}),
                  "model.dim / model.num_heads (96 / 32 = 3) must be even"));
  EXPECT_TRUE(has(problem({"model.moe_layers=1,5"}),
                  "model.moe_layers (1,5) names block 5, but model.num_layers is 4"));
  EXPECT_TRUE(has(problem({"model.moe_layers=every_other", "model.num_layers=1"}),
                  "model.moe_layers (every_other) selects no block"));
  EXPECT_TRUE(has(problem({"parallel.expert_parallel=3"}),
                  "model.num_experts (8) must be divisible by parallel.expert_parallel (3)"));
  EXPECT_TRUE(has(problem({"balance.group_size=2"}),
                  "balance.group_size (2) only applies to balance.scope group"));
  EXPECT_TRUE(has(problem({"balance.scope=micro", "balance.micro_alpha=0.0001"}),
                  "balance.micro_alpha (0.0001) only adds to a global or group loss"));
  EXPECT_TRUE(has(problem({"balance.method=quantile", "model.top_k=8"}),
                  "balance.method quantile needs model.top_k (8) < model.num_experts (8)"));
  EXPECT_TRUE(has(problem({"balance.scope=shuffle", "balance.method=quantile"}),
                  "balance.scope (shuffle) is an ablation of the load-balancing loss, but "
                  "balance.method is quantile; set balance.method=aux_loss"));
  EXPECT_TRUE(has(problem({"optim.min_lr=0.01"}), "optim.min_lr (0.01) must be <= optim.lr"));
  EXPECT_TRUE(
      has(problem({"data.val_batches_per_domain=0"}), "needs data.val_batches_per_domain >= 1"));

  const std::string both = problem({"model.top_k=9", "optim.min_lr=1"});
  EXPECT_TRUE(has(both, "model.top_k (9)") && has(both, "optim.min_lr (1.0)")) << both;
}

// balance.schedule: a YAML list in the file (block or flow style) or on --set, the settings in
// force after each step, and its dump reads back.
TEST(Config, BalanceScheduleReadsFromYamlAndSet) {
  const Config cfg = Config::from_yaml_string(
      "balance:\n  scope: micro\n  alpha: 0.01\n  schedule:\n    - step: 100\n      scope: group\n"
      "      group_size: 2\n    - {step: 200, scope: global, alpha: 0.004}\ntrain:\n  steps: "
      "300\n");
  ASSERT_EQ(cfg.balance.schedule.size(), 2u);
  EXPECT_EQ(cfg.balance.schedule[0], (BalanceChange{100, "group", 2, std::nullopt}));
  EXPECT_EQ(cfg.balance.schedule[1], (BalanceChange{200, "global", 0, 0.004}));
  EXPECT_NO_THROW(cfg.validate_for_world(2));
  const std::vector<std::tuple<int64_t, std::string, int64_t, double>> phases = {
      {0, "micro", 0, 0.01},   {99, "micro", 0, 0.01},    {100, "group", 2, 0.01},
      {199, "group", 2, 0.01}, {200, "global", 0, 0.004}, {299, "global", 0, 0.004}};
  for (const auto& [done, scope, group_size, alpha] : phases) {
    const BalanceConfig b = cfg.balance.at_step(done);
    EXPECT_EQ(b.scope, scope) << done;
    EXPECT_EQ(b.group_size, group_size) << done;
    EXPECT_EQ(b.alpha, alpha) << done;
  }
  const std::string text =
      "[{step: 100, scope: group, group_size: 2}, {step: 200, scope: global, group_size: 0, "
      "alpha: 0.004}]";
  EXPECT_EQ(cfg.get("balance.schedule"), text);
  expect_same_values(cfg, Config::from_yaml_string(cfg.to_yaml()));
  Config set;
  set.apply_override("balance.schedule=" + text);
  EXPECT_EQ(set.balance.schedule, cfg.balance.schedule);
  set.apply_override("balance.schedule=[]");
  EXPECT_TRUE(set.balance.schedule.empty());
  EXPECT_EQ(Config().get("balance.schedule"), "[]");
}

// Errors name the change, its field and the value: malformed changes when read, the rest by
// validate() and validate_for_world().
TEST(Config, BalanceScheduleErrorsNameTheChangeAndTheValue) {
  const auto set_error = [](const std::string& value) {
    Config cfg;
    return error_of([&] { cfg.set("balance.schedule", value); });
  };
  EXPECT_EQ(set_error("[{step: x, scope: global}]"),
            "balance.schedule[0].step: expected an integer, got 'x'");
  EXPECT_EQ(set_error("[{step: 1, scope: global}, {step: 2, scope: global, alpha: [1]}]"),
            "balance.schedule[1].alpha: expected a finite number, got a list");
  EXPECT_EQ(
      set_error("[{step: 1, scop: global}]"),
      "balance.schedule[0].scop: unknown key; a change has step, scope, group_size and alpha");
  EXPECT_EQ(set_error("[{step: 1}]"),
            "balance.schedule[0]: a change needs step and scope, e.g. {step: 200, scope: global}");
  EXPECT_EQ(set_error("[3]"),
            "balance.schedule[0]: expected a mapping like {step: 200, scope: global}, got '3'");
  EXPECT_EQ(set_error("{step: 1, scope: global}"),
            "balance.schedule: expected a list of changes like [{step: 200, scope: global}], got "
            "'{step: 1, scope: global}'");
  const std::string in_file = error_of([] {
    Config::from_yaml_string("balance:\n  schedule:\n    - {step: 1, scope: global, alpha: x}\n",
                             "configs/s.yaml");
  });
  EXPECT_NE(in_file.find("configs/s.yaml:3:5: balance.schedule[0].alpha: expected a finite "
                         "number, got 'x'"),
            std::string::npos)
      << in_file;

  const auto problem = [](const std::string& schedule, std::vector<std::string> more = {}) {
    Config cfg;
    cfg.apply_overrides({"train.steps=10", "balance.schedule=" + schedule});
    cfg.apply_overrides(more);
    return error_of([&] { cfg.validate_for_world(2); });
  };
  const auto has = [](const std::string& msg, const std::string& part) {
    return msg.find(part) != std::string::npos;
  };
  EXPECT_TRUE(has(problem("[{step: 0, scope: global}]"),
                  "balance.schedule[0].step (0) must be in [1, train.steps (10))"));
  EXPECT_TRUE(has(problem("[{step: 10, scope: global}]"),
                  "balance.schedule[0].step (10) must be in [1, train.steps (10))"));
  EXPECT_TRUE(
      has(problem("[{step: 5, scope: micro}, {step: 5, scope: global}]"),
          "balance.schedule[1].step (5) must be greater than balance.schedule[0].step (5)"));
  EXPECT_TRUE(
      has(problem("[{step: 5, scope: globl}]"),
          "balance.schedule[0].scope (globl) must be one of micro, sequence, global, group"));
  EXPECT_TRUE(has(problem("[{step: 5, scope: global, group_size: 2}]"),
                  "balance.schedule[0].group_size (2) only applies to scope group, but "
                  "balance.schedule[0].scope is global"));
  EXPECT_TRUE(has(problem("[{step: 5, scope: group, group_size: -1}]"),
                  "balance.schedule[0].group_size (-1) must be >= 0"));
  EXPECT_TRUE(has(problem("[{step: 5, scope: group, group_size: 4}]"),
                  "balance.schedule[0].group_size (4) must divide the world size (2)"));
  EXPECT_TRUE(has(problem("[{step: 5, scope: global, alpha: -0.5}]"),
                  "balance.schedule[0].alpha (-0.5) must be >= 0"));
  EXPECT_TRUE(has(problem("[{step: 5, scope: micro}]", {"balance.micro_alpha=0.0001"}),
                  "balance.schedule[0].scope (micro) cannot keep balance.micro_alpha (0.0001)"));
  Config ok;
  ok.apply_overrides(
      {"train.steps=10", "balance.schedule=[{step: 5, scope: group, group_size: 2}]"});
  EXPECT_NO_THROW(ok.validate_for_world(2));
  EXPECT_NO_THROW(ok.validate_for_world(4));
}

// What used to pass silently as the defaults: a directory, an empty file, a second document.
TEST(Config, ConfigFilesThatHoldNoConfigAreErrors) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("gbmoe-config-test-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  EXPECT_NE(error_of([&] {
              Config::from_yaml_file(dir.string());
            }).find("config file '" + dir.string() + "' is a directory"),
            std::string::npos);
  const auto empty = (dir / "empty.yaml").string();
  std::ofstream(empty) << "\n# only a comment\n";
  EXPECT_NE(error_of([&] {
              Config::from_yaml_file(empty);
            }).find("config file '" + empty + "' holds no settings (empty)"),
            std::string::npos);
  const auto two = (dir / "two.yaml").string();
  std::ofstream(two) << "model:\n  dim: 64\n---\ntrain:\n  steps: 3\n";
  const std::string msg = error_of([&] { Config::from_yaml_file(two); });
  EXPECT_NE(msg.find(two + ":4:1: a second YAML document"), std::string::npos) << msg;
  std::filesystem::remove_all(dir);
}

TEST(Config, EmptyKeysPathsAndHugeThreadCountsAreErrors) {
  Config cfg;
  EXPECT_NE(error_of([&] { cfg.apply_override("="); }).find("--set =: expected section.key=value"),
            std::string::npos);
  EXPECT_NE(error_of([&] { cfg.apply_override("=3"); }).find("expected section.key=value"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              cfg.apply_override("train.threads=32768");
            }).find("train.threads (32768) must be in [1, 1024]"),
            std::string::npos);
  cfg.data.dir = "";
  cfg.train.run_dir = " ";
  const std::string msg = error_of([&] { cfg.validate(); });
  EXPECT_NE(msg.find("data.dir is empty"), std::string::npos) << msg;
  EXPECT_NE(msg.find("train.run_dir is empty"), std::string::npos) << msg;
}

TEST(Config, ValidateRechecksValuesSetInCode) {
  Config cfg;
  cfg.model.dim = 0;
  cfg.balance.scope = "batch";
  const std::string msg = error_of([&] { cfg.validate(); });
  EXPECT_NE(msg.find("model.dim (0) must be >= 1"), std::string::npos) << msg;
  EXPECT_NE(msg.find("balance.scope (batch) must be one of"), std::string::npos) << msg;
  cfg.parallel.expert_parallel = 0;
  EXPECT_NE(error_of([&] { cfg.validate_for_world(4); }).find("parallel.expert_parallel (0)"),
            std::string::npos);
}

TEST(Config, ValidateForWorldChecksDivisibility) {
  Config cfg;
  cfg.apply_overrides({"balance.scope=group", "balance.group_size=3"});
  EXPECT_NO_THROW(cfg.validate());
  EXPECT_NO_THROW(cfg.validate_for_world(6));
  EXPECT_NE(error_of([&] {
              cfg.validate_for_world(4);
            }).find("balance.group_size (3) must divide the world size (4)"),
            std::string::npos);
  cfg.apply_overrides({"balance.group_size=0", "parallel.expert_parallel=4"});
  EXPECT_NO_THROW(cfg.validate_for_world(8));
  EXPECT_NE(error_of([&] {
              cfg.validate_for_world(6);
            }).find("parallel.expert_parallel (4) must divide the world size (6)"),
            std::string::npos);
  EXPECT_NE(error_of([&] { cfg.validate_for_world(0); }).find("the world size (0) must be >= 1"),
            std::string::npos);
}

TEST(Config, MoeLayerIndices) {
  ModelConfig m;
  m.num_layers = 6;
  EXPECT_EQ(m.moe_layer_indices(), (std::vector<int64_t>{0, 1, 2, 3, 4, 5}));
  m.moe_layers = "every_other";
  EXPECT_EQ(m.moe_layer_indices(), (std::vector<int64_t>{1, 3, 5}));
  m.moe_layers = "4, 0";
  EXPECT_EQ(m.moe_layer_indices(), (std::vector<int64_t>{0, 4}));
  m.moe_layers = "6";
  EXPECT_THROW(m.moe_layer_indices(), ConfigError);
}

std::vector<std::filesystem::path> repo_configs() {
  std::vector<std::filesystem::path> out;
  for (const auto& e : std::filesystem::directory_iterator(GBMOE_SOURCE_DIR "/configs")) {
    if (e.path().extension() == ".yaml") out.push_back(e.path());
  }
  return out;
}

TEST(Config, EveryRepositoryConfigLoadsAndValidates) {
  std::set<std::string> names;
  for (const auto& path : repo_configs()) {
    SCOPED_TRACE(path.string());
    names.insert(path.filename().string());
    Config cfg;
    ASSERT_NO_THROW(cfg = Config::from_yaml_file(path.string()));
    EXPECT_NO_THROW(cfg.validate());
    const int world = cfg.train.device == "cuda" ? 1 : 2;
    EXPECT_NO_THROW(cfg.validate_for_world(world));
    expect_same_values(cfg, Config::from_yaml_string(cfg.to_yaml()));
  }
  for (const char* name :
       {"default.yaml", "micro.yaml", "global.yaml", "fine.yaml", "tiny.yaml", "paper-gpu.yaml"}) {
    EXPECT_TRUE(names.count(name)) << "configs/" << name << " is missing";
  }
}

TEST(Config, MicroAndGlobalConfigsDifferOnlyInScopeAndRunDir) {
  const auto dir = std::string(GBMOE_SOURCE_DIR) + "/configs/";
  const Config micro = Config::from_yaml_file(dir + "micro.yaml");
  const Config global = Config::from_yaml_file(dir + "global.yaml");
  EXPECT_EQ(micro.balance.scope, "micro");
  EXPECT_EQ(global.balance.scope, "global");
  for (const auto& key : Config::keys()) {
    if (key != "balance.scope" && key != "train.run_dir") {
      EXPECT_EQ(micro.get(key), global.get(key)) << key;
    }
  }
  EXPECT_NE(micro.train.run_dir, global.train.run_dir);
}

// fine.yaml: the coarse global.yaml with fine-grained experts and one shared expert, at the same
// active expert parameters per token and the same token budget (every other setting equal).
TEST(Config, FineConfigMatchesTheCoarseActiveParametersAndTokenBudget) {
  const auto dir = std::string(GBMOE_SOURCE_DIR) + "/configs/";
  const Config coarse = Config::from_yaml_file(dir + "global.yaml");
  const Config fine = Config::from_yaml_file(dir + "fine.yaml");
  const auto active = [](const ModelConfig& m) {  // SwiGLU weights of the experts a token uses
    return 3 * m.dim * m.expert_hidden * (m.top_k + m.shared_experts);
  };
  EXPECT_EQ(active(fine.model), active(coarse.model));
  EXPECT_EQ(fine.model.shared_experts, 1);
  EXPECT_GE(fine.model.num_experts, 32);
  EXPECT_LE(fine.model.num_experts, 64);
  EXPECT_GE(fine.model.top_k, 4);
  EXPECT_LE(fine.model.top_k, 8);
  const std::set<std::string> expert_shape = {"model.num_experts", "model.top_k",
                                              "model.expert_hidden", "model.shared_experts",
                                              "train.run_dir"};
  for (const auto& key : Config::keys()) {
    if (!expert_shape.count(key)) EXPECT_EQ(fine.get(key), coarse.get(key)) << key;
  }
}

}  // namespace
}  // namespace gbmoe
