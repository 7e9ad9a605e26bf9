// Checkpoint manifests: a checkpoint that is truncated, zeroed, renamed, of another model
// configuration or without its manifest is refused with its path and the reason; resume=auto
// falls back to the newest one that verifies; unreadable state files name their path.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "single_communicator.h"
#include "test_util.h"
#include "train/checkpoint.h"

namespace gbmoe {
namespace {
namespace fs = std::filesystem;

const char* kSampler = "epoch=0 position=3 seed=1 seq_len=8 world_size=1 num_windows=40";

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() /
            ("gbmoe-checkpoint-test-" + std::to_string(::getpid()) + "-" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    fs::create_directories(root_);
    config_.model.dim = 64;
  }
  void TearDown() override { fs::remove_all(root_); }

  // A checkpoint of step with a state.pt of 1000 bytes of a pattern.
  std::string write(int64_t step, const std::string& sampler = kSampler) {
    CheckpointMeta meta{step, sampler, config_.to_yaml(), 7, config_fingerprint(config_)};
    return write_checkpoint(root_.string(), meta, 10, [](const std::string& dir) {
      std::ofstream out(dir + "/state.pt", std::ios::binary);
      for (int i = 0; i < 1000; ++i) out.put(static_cast<char>(i * 7));
    });
  }

  fs::path root_;
  Config config_;
};

TEST_F(CheckpointTest, AWrittenCheckpointVerifies) {
  const auto dir = write(3);
  EXPECT_TRUE(fs::exists(dir + "/manifest.txt"));
  EXPECT_EQ(checkpoint_problem(dir), "");
  EXPECT_EQ(checkpoint_problem(dir, &config_), "");
  EXPECT_EQ(resolve_resume(root_.string(), "auto", &config_), dir);
}

TEST_F(CheckpointTest, TruncatedZeroedOrUnsealedCheckpointsAreRefused) {
  const auto dir = write(3);
  fs::resize_file(dir + "/state.pt", 500);
  EXPECT_EQ(checkpoint_problem(dir),
            "state.pt holds 500 bytes, the manifest says 1000 (truncated or replaced)");
  spit(dir + "/state.pt", std::string(1000, '\0'));
  EXPECT_EQ(checkpoint_problem(dir), "state.pt fails its checksum (zeroed or overwritten)");
  std::ofstream(dir + "/manifest.txt", std::ios::app) << "file extra 1 0\n";
  EXPECT_NE(checkpoint_problem(dir).find("manifest.txt is damaged"), std::string::npos);
  fs::remove(dir + "/manifest.txt");
  EXPECT_NE(checkpoint_problem(dir).find("no manifest.txt"), std::string::npos);
  expect_throw_with([&] { resolve_resume(root_.string(), dir); },
                    "train.resume (" + dir +
                        ") is not a checkpoint to resume from: it has no "
                        "manifest.txt");
}

TEST_F(CheckpointTest, InconsistentStepsAreRefused) {
  const auto dir = write(3);
  const auto renamed = (root_ / "checkpoints" / "step_00000005").string();
  fs::rename(dir, renamed);
  EXPECT_EQ(checkpoint_problem(renamed),
            "the directory name step_00000005 disagrees with its step 3");
  const auto other = write(4);
  spit(other + "/meta.txt", "step -4\nsampler x\n");
  EXPECT_NE(checkpoint_problem(other), "");
  expect_throw_with([&] { read_checkpoint_meta(other); }, "has a negative step (-4)");
  const auto bad_sampler = write(5, "epoch=x");  // sealed by its manifest, still refused
  EXPECT_EQ(checkpoint_problem(bad_sampler),
            "meta.txt: sampler state \"epoch=x\": epoch (x) is not a non-negative integer");
}

TEST_F(CheckpointTest, ACheckpointOfAnotherModelIsRefusedNamingTheSettings) {
  const auto dir = write(3);
  Config other = config_;
  other.model.dim = 32;
  EXPECT_EQ(checkpoint_problem(dir, &other),
            "it was written for another model configuration (model.dim 64 (checkpoint) vs 32 "
            "(config))");
  other = config_;
  other.train.steps = 1000;  // only the model settings matter
  other.parallel.expert_parallel = 2;
  EXPECT_EQ(checkpoint_problem(dir, &other), "");
}

TEST_F(CheckpointTest, AutoResumeFallsBackToTheNewestThatVerifies) {
  const auto older = write(3);
  const auto newer = write(6);
  spit(newer + "/state.pt", "short");
  testing::internal::CaptureStdout();
  EXPECT_EQ(resolve_resume(root_.string(), "auto", &config_), older);
  const std::string log = testing::internal::GetCapturedStdout();
  EXPECT_NE(log.find("refused\n  " + newer + ": state.pt holds 5 bytes"), std::string::npos) << log;
  EXPECT_NE(log.find("resuming from " + older + " instead"), std::string::npos) << log;
  spit(older + "/meta.txt", "garbage");
  expect_throw_with([&] { resolve_resume(root_.string(), "auto", &config_); },
                    "no checkpoint in " + root_.string() + "/checkpoints can be resumed from");
}

TEST_F(CheckpointTest, UnreadableStateNamesItsPath) {
  const auto path = (root_ / "state.pt").string();
  spit(path, std::string(4096, 'x'));
  torch::nn::Linear model(2, 2);
  expect_throw_with([&] { load_model_state(path, *model); },
                    "checkpoint state " + path + " cannot be read (");
  spit(path, "");
  expect_throw_with([&] { load_model_state(path, *model); }, "the file is truncated or corrupt");
}

TEST_F(CheckpointTest, AStateOfZeroWeightsIsRefused) {
  torch::nn::Linear model(2, 2);
  torch::optim::AdamW optimizer(model->parameters());
  const auto path = (root_ / "state.pt").string();
  auto save = [&] {
    SingleCommunicator single;
    gather_training_state(*model, optimizer, single).save_to(path);
  };
  save();
  torch::nn::Linear loaded(2, 2);
  EXPECT_NO_THROW(load_model_state(path, *loaded));
  {
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.zero_();
  }
  save();
  expect_throw_with([&] { load_model_state(path, *loaded); },
                    "checkpoint " + path + ": every weight is zero");
}

TEST_F(CheckpointTest, AFailedWriteRemovesItsPartialFilesAndKeepsThePrevious) {
  const auto previous = write(3);
  CheckpointMeta meta{6, "s", "", 1, ""};
  expect_throw_with(
      [&] {
        write_checkpoint(root_.string(), meta, 10, [](const std::string& dir) {
          throw std::runtime_error(dir + "/state.pt: no space left on device");
        });
      },
      "no space left on device; its partial files were removed; the previous checkpoint " +
          previous + " is kept");
  std::vector<std::string> left;
  for (const auto& e : fs::directory_iterator(root_ / "checkpoints")) {
    left.push_back(e.path().filename().string());
  }
  std::sort(left.begin(), left.end());
  EXPECT_EQ(left, (std::vector<std::string>{"latest", "step_00000003"}));
}

}  // namespace
}  // namespace gbmoe
