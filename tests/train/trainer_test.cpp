// End-to-end tests of train() under mpirun (1 and 2 ranks): a tiny run on a tiny corpus built
// here, exact resume, metrics and checkpoints, and clear errors for bad settings.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>

#include "moe/kernels.h"
#include "parallel/balance_sync.h"
#include "parallel/expert_parallel.h"
#include "parallel/runtime.h"
#include "test_util.h"
#include "train/checkpoint.h"
#include "train/data_build.h"
#include "train/routing_trace.h"
#include "train/run_dir.h"
#include "train/tensorboard.h"
#include "train/token_dataset.h"
#include "train/trainer.h"

namespace gbmoe {
namespace {
namespace fs = std::filesystem;

// Each domain draws sentences from its own small vocabulary, so routing can tell them apart.
void write_domain(const fs::path& dir, const std::vector<std::string>& words, int docs,
                  uint32_t seed) {
  fs::create_directories(dir);
  std::mt19937 gen(seed);
  for (int d = 0; d < docs; ++d) {
    std::ofstream out(dir / ("doc" + std::to_string(d) + ".txt"));
    for (int s = 0; s < 60; ++s) {
      for (int w = 0; w < 8; ++w) out << words[gen() % words.size()] << (w < 7 ? " " : ".\n");
    }
  }
}

class TrainerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    world_ = std::make_shared<ProcessGroups>(build_process_groups(ParallelSizes{mpi_size()}));
    root_ = fs::path(GBMOE_TEST_TMP) / ("np" + std::to_string(mpi_size()));
    if (world_->world->rank() == 0) {
      fs::remove_all(root_);
      write_domain(root_ / "raw" / "animals", {"cat", "dog", "horse", "lion", "mouse", "owl"}, 6,
                   1);
      write_domain(root_ / "raw" / "numbers", {"one", "two", "three", "seven", "ninety", "zero"}, 6,
                   2);
      write_domain(root_ / "raw" / "code", {"int", "x", "=", "{", "}", "return", "(", ")"}, 6, 3);
      build_dataset(DataBuildOptions((root_ / "raw").string(), (root_ / "corpus").string())
                        .vocab_size(400)
                        .val_fraction(0.2)
                        .threads(1));
    }
    world_->world->barrier();
  }
  static void TearDownTestSuite() { world_.reset(); }

  static int mpi_size() {
    int size = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    return size;
  }

  Config tiny(const std::string& run) const {
    auto c = Config::from_yaml_file(std::string(GBMOE_SOURCE_DIR) + "/configs/tiny.yaml");
    c.data.dir = (root_ / "corpus").string();
    c.train.run_dir = (root_ / run).string();
    c.train.log_every = 100;
    return c;
  }

  static std::shared_ptr<ProcessGroups> world_;
  static fs::path root_;
};
std::shared_ptr<ProcessGroups> TrainerTest::world_;
fs::path TrainerTest::root_;

TEST_F(TrainerTest, TinyRunTrainsEvaluatesAndCheckpoints) {
  auto config = tiny("run");
  auto s = train(config, *world_);
  EXPECT_EQ(s.first_step, 0);
  EXPECT_EQ(s.last_step, config.train.steps);
  ASSERT_EQ(static_cast<int64_t>(s.losses.size()), config.train.steps);
  for (double l : s.losses) EXPECT_TRUE(std::isfinite(l));
  EXPECT_LT(s.losses.back(), s.losses.front());
  EXPECT_EQ(s.eval.domain_loss.size(), 3u);
  EXPECT_EQ(s.eval.mutual_information.size(), 2u);  // both blocks are MoE
  auto checkpoints = list_checkpoints(config.train.run_dir);
  EXPECT_EQ(checkpoints.size(), 2u);  // every 3 steps, keep 2
  if (world_->world->rank() == 0) {
    std::ifstream metrics(fs::path(config.train.run_dir) / "metrics.jsonl");
    int steps = 0, evals = 0;
    for (std::string line; std::getline(metrics, line);) {
      if (line.find("\"eval\"") != std::string::npos) {
        ++evals;
      } else if (line.find("\"maxvio_global\"") != std::string::npos) {
        ++steps;
      }
    }
    EXPECT_EQ(steps, config.train.steps);
    EXPECT_EQ(evals, 2);  // at step 3 and step 6
    EXPECT_TRUE(fs::exists(fs::path(config.train.run_dir) / "config.yaml"));
  }
}

// 2N steps in one run and N + resume + N give identical losses.
TEST_F(TrainerTest, ResumeIsExact) {
  auto full = tiny("full");
  auto whole = train(full, *world_);

  auto staged = tiny("staged");
  auto first = train(staged, *world_, /*stop_after=*/3);
  EXPECT_EQ(first.last_step, 3);
  EXPECT_TRUE(first.interrupted);
  staged.train.resume = "auto";
  auto second = train(staged, *world_);
  EXPECT_EQ(second.first_step, 3);
  ASSERT_EQ(second.losses.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(second.losses[i], whole.losses[3 + i]) << "step " << 4 + i;
  }
  EXPECT_EQ(second.eval.loss, whole.eval.loss);
}

// Resume is bit-exact for every scope and method (loss-free and quantile included: their
// expert_bias is the same on every rank, so the checkpoint's copy is everyone's; shuffle draws the
// subsets of the resumed steps again): 6 steps equal 3 + resume + 3, in every step's loss, the
// evaluation and every parameter and buffer of the final checkpoint.
TEST_F(TrainerTest, ResumeIsExactForEveryScopeAndMethod) {
  for (const std::string scope : {"micro", "sequence", "global", "group", "shuffle"}) {
    for (const std::string method : {"aux_loss", "loss_free", "quantile"}) {
      if (scope == "shuffle" && method != "aux_loss") continue;  // an ablation of the LBL only
      const std::string name = scope + "_" + method;
      auto configure = [&](const std::string& run) {
        auto c = tiny(run);
        c.balance.scope = scope;
        c.balance.method = method;
        c.balance.bias_update_rate = 0.01;
        c.train.steps = 6;
        c.train.eval_every = 6;
        c.train.checkpoint_every = 6;
        return c;
      };
      auto full = configure("resume_full_" + name);
      auto whole = train(full, *world_);
      auto staged = configure("resume_staged_" + name);
      train(staged, *world_, /*stop_after=*/3);
      staged.train.resume = "auto";
      auto second = train(staged, *world_);
      ASSERT_EQ(second.losses.size(), 3u) << name;
      for (size_t i = 0; i < 3; ++i) {
        EXPECT_EQ(second.losses[i], whole.losses[3 + i]) << name << " step " << 4 + i;
      }
      EXPECT_EQ(second.eval.loss, whole.eval.loss) << name;
      const auto a = list_checkpoints(full.train.run_dir).back();
      const auto b = list_checkpoints(staged.train.run_dir).back();
      const int64_t vocab = TokenDataset::open(full.data.dir, "train").vocab_size();
      LanguageModel ma(model_options_from_config(full, vocab));
      LanguageModel mb(model_options_from_config(full, vocab));
      load_model_state(a + "/state.pt", *ma);
      load_model_state(b + "/state.pt", *mb);
      for (const auto& item : ma->named_buffers()) {
        EXPECT_TRUE(torch::equal(item.value(), mb->named_buffers()[item.key()]))
            << name << " " << item.key();
      }
      for (const auto& item : ma->named_parameters()) {
        EXPECT_TRUE(torch::equal(item.value(), mb->named_parameters()[item.key()]))
            << name << " " << item.key();
      }
    }
  }
}

// A checkpoint holds full expert tensors and their AdamW state: 3 steps at one expert-parallel
// size, then 3 more resumed at the other, give the losses of 6 uninterrupted steps without
// expert parallelism. Expert gradients are then summed in another order, hence a tolerance.
TEST_F(TrainerTest, CheckpointResumesAtAnotherExpertParallelSize) {
  if (mpi_size() % 2 != 0) GTEST_SKIP() << "needs an even number of ranks";
  auto whole = train(tiny("ep_whole"), *world_);
  auto ep2 = build_process_groups(ParallelSizes{mpi_size(), 2});
  for (int64_t first_ep : {1, 2}) {
    auto staged = tiny("ep_from_" + std::to_string(first_ep));
    staged.parallel.expert_parallel = first_ep;
    train(staged, first_ep == 2 ? ep2 : *world_, /*stop_after=*/3);
    staged.train.resume = "auto";
    staged.parallel.expert_parallel = 3 - first_ep;
    auto second = train(staged, first_ep == 2 ? *world_ : ep2);
    ASSERT_EQ(second.losses.size(), 3u);
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_NEAR(second.losses[i], whole.losses[3 + i], 1e-5 * whole.losses[3 + i])
          << "step " << 4 + i << ", first expert_parallel " << first_ep;
    }
    EXPECT_NEAR(second.eval.loss, whole.eval.loss, 1e-5 * whole.eval.loss);
  }
}

// Two state.pt files hold the same entries with equal values.
void expect_same_state(const std::string& a_path, const std::string& b_path) {
  torch::serialize::InputArchive a, b;
  a.load_from(a_path);
  b.load_from(b_path);
  const auto keys = a.keys();
  ASSERT_EQ(keys.size(), b.keys().size());
  for (const auto& key : keys) {
    torch::Tensor ta, tb;
    if (a.try_read(key, ta) || a.try_read(key, ta, /*is_buffer=*/true)) {
      ASSERT_TRUE(b.try_read(key, tb) || b.try_read(key, tb, true)) << key;
      EXPECT_TRUE(torch::equal(ta, tb)) << key;
    } else {
      c10::IValue va, vb;
      ASSERT_TRUE(a.try_read(key, va) && b.try_read(key, vb)) << key;
      EXPECT_EQ(va.toInt(), vb.toInt()) << key;
    }
  }
}

// What a stop signal writes in the middle of a step, with no communication (ranks 1..P-1 of
// rank 0's expert-parallel group hand their shards to rank 0 in files), is the checkpoint
// save_checkpoint writes with collectives; parts of another step or missing parts are refused.
TEST_F(TrainerTest, ACheckpointFromStateCopiesEqualsTheGatheredOne) {
  std::vector<int64_t> sizes{1};
  if (mpi_size() % 2 == 0) sizes.push_back(2);
  for (int64_t ep : sizes) {
    auto config = tiny("copy_ep" + std::to_string(ep));
    config.parallel.expert_parallel = ep;
    const auto groups = build_process_groups(ParallelSizes{mpi_size(), ep});
    train(config, groups, /*stop_after=*/2);
    const auto trained = list_checkpoints(config.train.run_dir).back();
    const int64_t vocab = TokenDataset::open(config.data.dir, "train").vocab_size();
    LanguageModel model(model_options_from_config(config, vocab));
    if (ep > 1) apply_expert_parallel(*model, groups);
    torch::optim::AdamW optimizer(model->parameters());
    load_training_state(trained + "/state.pt", *model, optimizer, *groups.expert_parallel);
    const std::string sampler = read_checkpoint_meta(trained).sampler_state;
    auto gathered = config, copied = config;
    gathered.train.run_dir += "_gathered";
    copied.train.run_dir += "_copied";
    const auto a = save_checkpoint(gathered, 2, sampler, *model, optimizer, groups);
    const auto copy = copy_training_state(*model, optimizer, groups, 2, sampler);
    const auto b = write_training_state_copy(copied, copy, 30.0);
    world_->world->barrier();
    if (world_->world->rank() == 0) {
      EXPECT_EQ(fs::path(b).filename(), fs::path(a).filename());
      EXPECT_EQ(checkpoint_problem(b, &config), "");
      EXPECT_EQ(read_checkpoint_meta(b).sampler_state, sampler);
      expect_same_state(a + "/state.pt", b + "/state.pt");
      EXPECT_FALSE(fs::exists(fs::path(copied.train.run_dir) / "checkpoints/stop_parts.tmp"));
    }
    world_->world->barrier();
    if (ep == 1) continue;
    // Rank 1's copy is of the next step (the copies straddled an optimizer step).
    const auto next = copy_training_state(*model, optimizer, groups, 3, sampler);
    if (world_->world->rank() == 0) {
      expect_throw_with([&] { write_training_state_copy(copied, copy, 30.0); },
                        "part_1.pt holds the shards of another step than 2");
    } else if (groups.expert_data_parallel->rank() == 0) {
      write_training_state_copy(copied, next, 30.0);
    }
    world_->world->barrier();
    if (world_->world->rank() == 0) {  // no part at all
      expect_throw_with([&] { write_training_state_copy(copied, copy, 0.2); },
                        "the expert shards of expert-parallel rank 1 did not appear as ");
    }
    world_->world->barrier();
  }
}

TEST_F(TrainerTest, LossFreeAndMicroScopesRun) {
  auto config = tiny("lossfree");
  config.balance.method = "loss_free";
  config.balance.bias_update_rate = 0.01;
  auto s = train(config, *world_);
  EXPECT_EQ(s.last_step, config.train.steps);
  config = tiny("micro");
  config.balance.scope = "micro";
  s = train(config, *world_);
  for (double l : s.losses) EXPECT_TRUE(std::isfinite(l));
}

TEST_F(TrainerTest, ActivationCheckpointingGivesTheSameTraining) {
  auto plain = tiny("plain");
  auto recompute = tiny("recompute");
  recompute.train.activation_checkpointing = true;
  auto a = train(plain, *world_), b = train(recompute, *world_);
  ASSERT_EQ(a.losses.size(), b.losses.size());
  EXPECT_EQ(a.losses[0], b.losses[0]);  // same forward before any update
  // Later steps differ only by the order in which gradient contributions are summed.
  for (size_t i = 1; i < a.losses.size(); ++i) {
    EXPECT_NEAR(b.losses[i], a.losses[i], 1e-4 * std::abs(a.losses[i])) << "step " << i + 1;
  }
  EXPECT_NEAR(b.eval.loss, a.eval.loss, 1e-4 * a.eval.loss);
  EXPECT_EQ(a.max_violation_global, b.max_violation_global);  // counted once per micro-batch
  if (mpi_size() % 2 == 0) {  // recomputed forwards exchange tokens again on every rank
    auto ep = tiny("recompute_ep2");
    ep.train.activation_checkpointing = true;
    ep.parallel.expert_parallel = 2;
    auto c = train(ep, build_process_groups(ParallelSizes{mpi_size(), 2}));
    for (size_t i = 0; i < a.losses.size(); ++i) {
      EXPECT_NEAR(c.losses[i], a.losses[i], 1e-4 * std::abs(a.losses[i])) << "step " << i + 1;
    }
  }
}

// The process groups gbmoe-train builds for a config: the balance group only for scope group.
ProcessGroups groups_for(const Config& c, int world) {
  return build_process_groups(ParallelSizes{world, c.parallel.expert_parallel,
                                            c.balance.scope == "group" ? c.balance.group_size : 0});
}

// Every balance value that --help documents starts a run and trains: group_size 0 (= all ranks)
// and 1, sequence scope, loss_free and quantile with each scope, shuffle, micro_alpha with
// accumulation (R > 1 under mpirun -np 2), expert parallelism with scope group.
TEST_F(TrainerTest, EveryDocumentedBalanceSettingStartsATinyRun) {
  std::vector<std::vector<std::string>> cases = {
      {"balance.scope=group"},
      {"balance.scope=group", "balance.group_size=1"},
      {"balance.scope=sequence"},
      {"balance.scope=sequence", "train.activation_checkpointing=true"},
      {"balance.method=loss_free", "balance.scope=micro"},
      {"balance.method=loss_free", "balance.scope=sequence"},
      {"balance.method=loss_free", "balance.scope=global"},
      {"balance.method=loss_free", "balance.scope=group"},
      {"balance.method=quantile", "balance.scope=micro"},
      {"balance.method=quantile", "balance.scope=sequence"},
      {"balance.method=quantile", "balance.scope=global", "data.grad_accum=3"},
      {"balance.method=quantile", "balance.scope=group", "balance.group_size=1"},
      {"balance.scope=shuffle", "data.grad_accum=3"},
      {"balance.micro_alpha=0.0001", "data.grad_accum=3"},
      {"balance.scope=group", "balance.micro_alpha=0.0001"},
  };
  if (mpi_size() % 2 == 0) {
    cases.push_back({"parallel.expert_parallel=2", "balance.scope=group"});
    cases.push_back({"parallel.expert_parallel=2", "balance.scope=group", "balance.group_size=1"});
    cases.push_back(
        {"parallel.expert_parallel=2", "balance.method=loss_free", "balance.scope=micro"});
    cases.push_back(
        {"parallel.expert_parallel=2", "balance.method=quantile", "balance.scope=global"});
  }
  for (size_t i = 0; i < cases.size(); ++i) {
    std::string what;
    for (const auto& o : cases[i]) what += o + " ";
    auto config = tiny("settings_" + std::to_string(i));
    auto overrides = cases[i];
    for (const char* o : {"train.steps=2", "train.eval_every=2", "train.checkpoint_every=2"}) {
      overrides.push_back(o);
    }
    config.apply_overrides(overrides);
    TrainSummary s;
    try {
      s = train(config, groups_for(config, mpi_size()));
    } catch (const std::exception& e) {
      ADD_FAILURE() << what << "failed to run: " << e.what();
      continue;
    }
    EXPECT_EQ(s.last_step, 2) << what;
    ASSERT_EQ(s.losses.size(), 2u) << what;
    for (double l : s.losses) EXPECT_TRUE(std::isfinite(l)) << what;
    EXPECT_EQ(s.max_violation_global.size(), 2u) << what;
  }
}

// The value of "key" in each training line of a run's metrics.jsonl, as written, by step.
std::map<int64_t, std::string> metric_by_step(const std::string& run_dir, const std::string& key) {
  std::map<int64_t, std::string> out;
  std::ifstream in(fs::path(run_dir) / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    const auto at = line.find("\"" + key + "\":");
    if (line.find("\"eval\"") != std::string::npos || at == std::string::npos) continue;
    const auto begin = at + key.size() + 3;
    out[std::stoll(line.substr(line.find(':') + 1))] =
        line.substr(begin, line.find_first_of(",}", begin) - begin);
  }
  return out;
}

// balance.schedule micro -> group g=1 with alpha 0.05 after step 2 -> global after step 4 trains
// exactly what a run stopped at each change and resumed with the next settings trains (the
// group phase cuts its balance group itself), the switch changes training from that step on,
// metrics.jsonl names the settings of every step, and a resume at, between or after the changes
// equals the uninterrupted run.
TEST_F(TrainerTest, BalanceScheduleSwitchesAtItsStepsAndResumesAcrossThem) {
  auto configure = [&](const std::string& run) {
    auto c = tiny(run);
    c.balance.scope = "micro";
    c.train.eval_every = 6;
    c.train.checkpoint_every = 6;
    return c;
  };
  auto scheduled = [&](const std::string& run) {
    auto c = configure(run);
    c.apply_override(
        "balance.schedule=[{step: 2, scope: group, group_size: 1, alpha: 0.05}, "
        "{step: 4, scope: global}]");
    return c;
  };
  const auto whole_config = scheduled("schedule_whole");
  const auto whole = train(whole_config, *world_);
  auto manual = configure("schedule_manual");
  const auto a = train(manual, *world_, /*stop_after=*/2);
  manual.train.resume = "auto";
  manual.balance.scope = "group";
  manual.balance.group_size = 1;
  manual.balance.alpha = 0.05;
  const auto b = train(manual, groups_for(manual, mpi_size()), /*stop_after=*/4);
  manual.balance.scope = "global";
  manual.balance.group_size = 0;
  const auto c = train(manual, *world_);
  std::vector<double> pieces = a.losses;
  pieces.insert(pieces.end(), b.losses.begin(), b.losses.end());
  pieces.insert(pieces.end(), c.losses.begin(), c.losses.end());
  EXPECT_EQ(pieces, whole.losses);
  EXPECT_EQ(c.eval.loss, whole.eval.loss);
  const auto micro = train(configure("schedule_none"), *world_);
  if (world_->world->rank() == 0) {
    const auto balance = metric_by_step(whole_config.train.run_dir, "balance");
    EXPECT_EQ(balance, metric_by_step(manual.train.run_dir, "balance"));
    const auto micro_balance = metric_by_step(micro.run_dir, "balance");
    for (int64_t step : {1, 2}) EXPECT_EQ(balance.at(step), micro_balance.at(step)) << step;
    EXPECT_NE(balance.at(3), micro_balance.at(3));  // the group loss from step 3 on
    const std::string dir = whole_config.train.run_dir;
    const std::map<int64_t, std::string> scopes = {{1, "\"micro\""},  {2, "\"micro\""},
                                                   {3, "\"group\""},  {4, "\"group\""},
                                                   {5, "\"global\""}, {6, "\"global\""}};
    EXPECT_EQ(metric_by_step(dir, "balance_scope"), scopes);
    const std::map<int64_t, std::string> groups = {{1, "0"}, {2, "0"}, {3, "1"},
                                                   {4, "1"}, {5, "0"}, {6, "0"}};
    EXPECT_EQ(metric_by_step(dir, "balance_group_size"), groups);
    const std::map<int64_t, std::string> alphas = {{1, "0.01"}, {2, "0.01"}, {3, "0.05"},
                                                   {4, "0.05"}, {5, "0.05"}, {6, "0.05"}};
    EXPECT_EQ(metric_by_step(dir, "balance_alpha"), alphas);
  }
  for (int64_t stop : {2, 3, 5}) {
    auto staged = scheduled("schedule_stop" + std::to_string(stop));
    train(staged, *world_, stop);
    staged.train.resume = "auto";
    const auto second = train(staged, *world_);
    EXPECT_EQ(second.first_step, stop);
    EXPECT_EQ(second.losses, std::vector<double>(whole.losses.begin() + stop, whole.losses.end()))
        << "stopped after step " << stop;
    EXPECT_EQ(second.eval.loss, whole.eval.loss) << "stopped after step " << stop;
  }
}

// Lines of metrics.jsonl: (training steps, evaluations) per step.
std::map<int64_t, std::pair<int, int>> metrics_by_step(const std::string& run_dir) {
  std::map<int64_t, std::pair<int, int>> out;
  std::ifstream in(fs::path(run_dir) / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    const int64_t step = std::stoll(line.substr(line.find(':') + 1));
    (line.find("\"eval\"") != std::string::npos ? out[step].second : out[step].first) += 1;
  }
  return out;
}

// A diverging run (optim.lr 1e30): the first step whose gradient norm or loss is not finite is
// not applied; the run stops naming the step and the last checkpoint, which still loads (a
// non-finite tensor would be refused) and verifies.
TEST_F(TrainerTest, NonFiniteStepIsNotAppliedAndTheLastCheckpointResumes) {
  auto config = tiny("nan");
  config.optim.lr = 1e30;
  config.train.checkpoint_every = 1;
  config.train.eval_every = 0;
  std::string message;
  try {
    train(config, *world_);
  } catch (const JobStopped& e) {
    message = e.what();
  }
  const auto checkpoints = list_checkpoints(config.train.run_dir);
  ASSERT_FALSE(checkpoints.empty()) << message;
  const auto last = checkpoints.back();
  const int64_t last_step = read_checkpoint_meta(last).step;
  EXPECT_NE(message.find("step " + std::to_string(last_step + 1) + ": non-finite "),
            std::string::npos)
      << message;
  EXPECT_NE(message.find("the step was not applied and the run stops. The last checkpoint " + last +
                         " holds no non-finite state"),
            std::string::npos)
      << message;
  EXPECT_EQ(checkpoint_problem(last, &config), "");
  auto resumed = config;
  resumed.train.resume = "auto";
  resumed.train.steps = last_step;  // load only
  EXPECT_EQ(train(resumed, *world_).first_step, last_step);

  auto skipping = tiny("nan_skip");
  skipping.optim.lr = 1e30;
  skipping.train.max_nonfinite_steps = 2;
  skipping.train.eval_every = 0;
  expect_throw_with([&] { train(skipping, *world_); }, "the run stops after skipping 2");
}

// A fresh run in a directory that holds a run is refused (it would truncate the metrics and
// rotate away its own checkpoints), unless train.overwrite replaces the earlier run.
TEST_F(TrainerTest, AFreshRunDoesNotMixWithAnEarlierOne) {
  auto config = tiny("used");
  train(config, *world_, /*stop_after=*/3);
  expect_throw_with([&] { train(config, *world_); },
                    "already holds a run (1 checkpoint, the newest step_00000003; metrics.jsonl "
                    "of 4 lines): resume it with --set train.resume=auto");
  config.train.overwrite = true;
  auto s = train(config, *world_);
  EXPECT_EQ(s.first_step, 0);
  if (world_->world->rank() == 0) {
    const auto metrics = metrics_by_step(config.train.run_dir);
    EXPECT_EQ(metrics.size(), 6u);
    for (const auto& [step, lines] : metrics) EXPECT_EQ(lines.first, 1) << "step " << step;
  }
}

TEST_F(TrainerTest, ASecondJobInTheRunDirectoryFailsNamingTheHolder) {
  auto config = tiny("locked");
  {
    RunDirectory holder(config, *world_->world);
    expect_throw_with([&] { train(config, *world_); },
                      "is in use by another gbmoe-train job (pid ");
  }
  EXPECT_EQ(train(config, *world_).last_step, config.train.steps);  // released
}

// After a crash that left a damaged newest checkpoint and a half-written one, resume=auto takes
// the newest good one, removes the leftovers, and metrics.jsonl holds every step once.
TEST_F(TrainerTest, ResumeAfterACrashRepeatsNoMetricsAndSkipsDamagedCheckpoints) {
  auto config = tiny("crash");
  train(config, *world_);
  const auto root = fs::path(config.train.run_dir) / "checkpoints";
  const auto leftover = root / "step_00000009.tmp4242";
  if (world_->world->rank() == 0) {
    fs::resize_file(root / "step_00000006" / "state.pt", 100);
    fs::create_directories(leftover);
    std::ofstream(leftover / "state.pt") << "partial";
  }
  world_->world->barrier();
  config.train.resume = "auto";
  auto s = train(config, *world_);
  EXPECT_EQ(s.first_step, 3);
  EXPECT_FALSE(fs::exists(leftover));
  EXPECT_EQ(checkpoint_problem((root / "step_00000006").string(), &config), "");
  if (world_->world->rank() == 0) {
    const auto metrics = metrics_by_step(config.train.run_dir);
    EXPECT_EQ(metrics.size(), 6u);
    for (const auto& [step, lines] : metrics) {
      EXPECT_EQ(lines.first, 1) << "step " << step;
      EXPECT_EQ(lines.second, step % 3 == 0 ? 1 : 0) << "step " << step;
    }
  }
}

// train.checkpoint_every=0 writes no checkpoint, not even at the end; a stop still writes one.
TEST_F(TrainerTest, CheckpointEveryZeroWritesOnlyWhenStopped) {
  auto config = tiny("never");
  config.train.checkpoint_every = 0;
  train(config, *world_);
  EXPECT_TRUE(list_checkpoints(config.train.run_dir).empty());
  config = tiny("never_but_stopped");
  config.train.checkpoint_every = 0;
  train(config, *world_, /*stop_after=*/2);
  EXPECT_EQ(list_checkpoints(config.train.run_dir).size(), 1u);
}

// train.profile_steps writes each rank's table of where the steps' time went, by region, with
// the backward of each region beside its forward, and a Chrome trace; profiling leaves the
// training as it was.
TEST_F(TrainerTest, ProfiledStepsWriteWhereTheTimeWentAndTrainTheSame) {
  auto plain = tiny("unprofiled");
  const auto expected = train(plain, *world_).losses;
  auto config = tiny("profiled");
  config.train.profile_start = 2;
  config.train.profile_steps = 3;
  EXPECT_EQ(train(config, *world_).losses, expected);
  const auto dir = fs::path(config.train.run_dir) / "profile";
  const auto r = std::to_string(world_->world->rank());
  const std::string table = slurp(dir / ("rank" + r + ".txt"));
  EXPECT_NE(table.find("profile of 3 steps"), std::string::npos) << table;
  for (const char* region :
       {"moe.experts", "moe.experts (backward)", "moe.router", "head", "head (backward)",
        "attention.sdpa (backward)", "norm (backward)", "attention.rope (backward)",
        "cross_entropy", "optimizer", "gradients.clip", "data"}) {
    EXPECT_NE(table.find("\n" + std::string(region) + " "), std::string::npos) << region;
  }
  EXPECT_NE(table.find("\nobjective.tie (backward) "), std::string::npos) << table;
  const std::string trace = slurp(dir / ("rank" + r + ".trace.json"));
  EXPECT_NE(trace.find("gbmoe::attention.sdpa"), std::string::npos);
}

// The fused CPU passes (norms, rotary q/k/v heads, AdamW) train as the plain LibTorch reference
// does: identical first step, then within fp32 rounding.
TEST_F(TrainerTest, FusedKernelsAndOptimizerTrainAsTheReference) {
  auto fused = tiny("fused");
  fused.train.steps = 4;
  const auto with_fused = train(fused, *world_).losses;
  auto reference = tiny("reference");
  reference.train.steps = 4;
  reference.optim.fused = false;
  std::vector<double> with_reference;
  {
    KernelModeGuard plain(KernelMode::Reference);
    with_reference = train(reference, *world_).losses;
  }
  ASSERT_EQ(with_fused.size(), with_reference.size());
  EXPECT_NEAR(with_fused[0], with_reference[0], 1e-6 * std::abs(with_reference[0]));
  for (size_t i = 0; i < with_fused.size(); ++i) {
    EXPECT_NEAR(with_fused[i], with_reference[i], 1e-4 * std::abs(with_reference[i])) << i;
  }
}

TEST_F(TrainerTest, BadSettingsNameTheSettingAndValue) {
  auto config = tiny("bad");
  config.data.dir = (root_ / "no-such-corpus").string();
  expect_throw_with([&] { train(config, *world_); }, "no-such-corpus");
  config = tiny("bad");
  config.model.vocab_size = 50;
  expect_throw_with([&] { train(config, *world_); }, "model.vocab_size (50)");
  config = tiny("bad");
  config.train.resume = (root_ / "nowhere").string();
  expect_throw_with([&] { train(config, *world_); }, "train.resume (");
  config = tiny("bad");
  config.train.profile_start = config.train.steps;
  config.train.profile_steps = 1;
  expect_throw_with([&] { config.validate(); },
                    "train.profile_start (" + std::to_string(config.train.steps) +
                        ") + train.profile_steps (1) must be <= train.steps (" +
                        std::to_string(config.train.steps) + ")");
}

// Routing traces of every rank (with and without expert parallelism) hold exactly the selections
// of expert_loads.jsonl on the traced steps; the per-layer metrics are in every step's line.
TEST_F(TrainerTest, RoutingTracesOfAllRanksMatchTheExpertLoads) {
  for (int64_t ep : {1, 2}) {
    if (ep == 2 && mpi_size() % 2 != 0) continue;
    auto config = tiny("trace_ep" + std::to_string(ep));
    config.parallel.expert_parallel = ep;
    config.train.routing_trace_every = 2;
    config.train.expert_loads = true;
    train(config, ep == 2 ? build_process_groups(ParallelSizes{mpi_size(), 2}) : *world_);
    world_->world->barrier();
    if (world_->world->rank() != 0) continue;
    const fs::path run(config.train.run_dir);
    const auto files = routing_trace_files((run / "traces").string());
    ASSERT_EQ(static_cast<int>(files.size()), mpi_size());
    const auto trace = read_routing_trace(files);
    std::ifstream loads(run / "expert_loads.jsonl");
    int checked = 0;
    for (std::string line; std::getline(loads, line);) {
      const int64_t step = std::stoll(line.substr(line.find(':') + 1));
      if (step % 2 != 0) continue;
      const auto sel = trace_selection(trace, step, step);
      const auto values = json_scalars(line);  // loads/layer<l>/layer<i>, in order
      ASSERT_EQ(static_cast<int64_t>(values.size()), 2 * config.model.num_experts);
      for (int64_t l = 0; l < 2; ++l) {
        for (int64_t i = 0; i < config.model.num_experts; ++i) {
          EXPECT_EQ(sel.counts[l].sum(0)[i].item<double>(),
                    values[l * config.model.num_experts + i].second)
              << "step " << step << " layer " << l << " expert " << i << " ep " << ep;
        }
      }
      ++checked;
    }
    EXPECT_EQ(checked, 3);  // steps 2, 4, 6
    std::ifstream metrics(run / "metrics.jsonl");
    std::string first;
    std::getline(metrics, first);
    for (const char* key : {"\"load_cv\":[", "\"dead_experts\":[", "\"routing_entropy\":[",
                            "\"topk_score_sum\":[", "\"across_layers\":{\"maxvio_global\""}) {
      EXPECT_NE(first.find(key), std::string::npos) << key << " in " << first;
    }
    // Softmax over 4 experts, top-2: entropy in (0, ln 4], top-2 score sum in [1/2, 1].
    for (const auto& [tag, value] : json_scalars(first)) {
      if (tag.rfind("routing_entropy/", 0) == 0) {
        EXPECT_GT(value, 0.0) << tag;
        EXPECT_LE(value, std::log(4.0) + 1e-6) << tag;
      } else if (tag.rfind("topk_score_sum/", 0) == 0) {
        EXPECT_GE(value, 0.5) << tag;
        EXPECT_LE(value, 1.0) << tag;
      }
    }
    EXPECT_FALSE(fs::is_empty(run / "tb"));
  }
}

// train.routing_replay: a run whose routers would choose differently (another init) trains with
// the expert choices of the source run's trace, also with expert parallelism and activation
// checkpointing; without replay its choices differ.
TEST_F(TrainerTest, RoutingReplayTrainsWithTheChoicesOfAnotherRun) {
  auto source = tiny("replay_source");
  source.train.routing_trace_every = 1;
  train(source, *world_);
  const auto source_traces = (fs::path(source.train.run_dir) / "traces").string();
  auto routing_of = [&](const Config& c) {
    world_->world->barrier();
    return read_routing_trace(routing_trace_files((fs::path(c.train.run_dir) / "traces").string()));
  };
  const auto expected = routing_of(source);
  auto same_choices = [&](const RoutingTrace& t) {
    if (t.records.size() != expected.records.size()) return false;
    for (size_t r = 0; r < t.records.size(); ++r) {
      if (!torch::equal(t.records[r].expert_ids, expected.records[r].expert_ids)) return false;
    }
    return true;
  };
  auto other = tiny("replay_off");
  other.model.init_std = 0.2;
  other.train.routing_trace_every = 1;
  train(other, *world_);
  EXPECT_FALSE(same_choices(routing_of(other))) << "another init should route differently";

  for (int64_t ep : {1, 2}) {
    if (ep == 2 && mpi_size() % 2 != 0) continue;
    auto replay = tiny("replay_ep" + std::to_string(ep));
    replay.model.init_std = 0.2;
    replay.train.routing_trace_every = 1;
    replay.train.routing_replay = source_traces;
    replay.parallel.expert_parallel = ep;
    replay.train.activation_checkpointing = ep == 2;
    auto s = train(replay, ep == 2 ? build_process_groups(ParallelSizes{mpi_size(), 2}) : *world_);
    for (double l : s.losses) EXPECT_TRUE(std::isfinite(l));
    EXPECT_TRUE(same_choices(routing_of(replay))) << "expert_parallel " << ep;
    if (ep == 2) {
      // Recomputed blocks must replay their own micro-batch's ids, so train.forward_ahead (on
      // by default) does not run ahead here: the same losses as in turn, bit for bit.
      auto in_turn = replay;
      in_turn.train.run_dir += "_in_turn";
      in_turn.train.forward_ahead = false;
      EXPECT_EQ(train(in_turn, build_process_groups(ParallelSizes{mpi_size(), 2})).losses,
                s.losses);
    }
  }

  auto bad = tiny("replay_bad");
  bad.train.routing_replay = source_traces;
  bad.data.micro_batch_size = 3;
  expect_throw_with([&] { train(bad, *world_); }, "train.routing_replay (");
  bad.train.routing_replay = (root_ / "no-such-trace").string();
  expect_throw_with([&] { train(bad, *world_); }, "no-such-trace");
  auto own = tiny("replay_source");
  own.train.routing_trace_every = 1;
  own.train.routing_replay = source_traces;
  own.train.resume = "auto";  // the run directory may be reused only by resuming it
  expect_throw_with([&] { train(own, *world_); }, "is this run's own trace directory");
  EXPECT_EQ(routing_of(source).records.size(), expected.records.size()) << "the source is intact";
}

}  // namespace
}  // namespace gbmoe

int main(int argc, char** argv) {
  gbmoe::MpiRuntime mpi(&argc, &argv);
  testing::InitGoogleTest(&argc, argv);
  if (mpi.rank() != 0) {
    auto& listeners = testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return any;
}
