// End-to-end tests of train() under mpirun (1 and 2 ranks): a tiny run on a tiny corpus built
// here, exact resume, metrics and checkpoints, and clear errors for bad settings.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>

#include "parallel/balance_sync.h"
#include "parallel/runtime.h"
#include "test_util.h"
#include "train/checkpoint.h"
#include "train/data_build.h"
#include "train/run_dir.h"
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
// and 1, sequence scope, loss_free with each scope, micro_alpha with accumulation (R > 1 under
// mpirun -np 2), expert parallelism with scope group.
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
      {"balance.micro_alpha=0.0001", "data.grad_accum=3"},
      {"balance.scope=group", "balance.micro_alpha=0.0001"},
  };
  if (mpi_size() % 2 == 0) {
    cases.push_back({"parallel.expert_parallel=2", "balance.scope=group"});
    cases.push_back({"parallel.expert_parallel=2", "balance.scope=group", "balance.group_size=1"});
    cases.push_back(
        {"parallel.expert_parallel=2", "balance.method=loss_free", "balance.scope=micro"});
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
