// Seeded mutation of the files a run reads back: token indexes and token files, checkpoint
// manifests, metadata, configs and training states. A damaged file that a checksum guards is
// refused with a message naming it; where none does (the checksum re-sealed over the damage, or
// a reader called past verification) it either loads into something consistent or is refused
// naming the file. None crashes.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "single_communicator.h"
#include "test_util.h"
#include "train/checkpoint.h"
#include "train/model.h"
#include "train/token_dataset.h"

namespace gbmoe {
namespace {
namespace fs = std::filesystem;

// A copy of bytes with 1 to 4 bytes changed, or cut short, or with bytes inserted.
std::string mutate(const std::string& bytes, std::mt19937_64& gen) {
  std::string out = bytes;
  switch (gen() % 3) {
    case 0:
      for (int n = 1 + static_cast<int>(gen() % 4); n > 0; --n) {
        out[gen() % out.size()] = static_cast<char>(gen());
      }
      break;
    case 1:
      out.resize(gen() % out.size());
      break;
    default:
      out.insert(gen() % out.size(), std::string(1 + gen() % 8, static_cast<char>(gen())));
  }
  return out;
}

constexpr int kTrials = 400;

// A fresh directory, in memory where there is /dev/shm: the trials rewrite files thousands of
// times, which takes seconds on a busy disk.
fs::path scratch(const std::string& name) {
  const fs::path base = fs::is_directory("/dev/shm") ? "/dev/shm" : fs::temp_directory_path();
  const auto dir = base / ("gbmoe-" + name + "-" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// A train split of two domains and 300 token ids (uint16 tokens) in dir.
void write_split(const fs::path& dir) {
  TokenFileWriter w(dir.string(), "train", 300, {"code", "prose"});
  w.add_document(0, {1, 2, 299, 4});
  w.add_document(1, {7, 8, 9});
  w.add_document(0, {250, 3});
  w.commit();
}

// Opens the split and, when it opens, reads every document: each lies within the token file
// and holds ids below the vocabulary. Returns "" or the DataError's message.
std::string open_and_read(const fs::path& dir) {
  try {
    const auto data = TokenDataset::open(dir.string(), "train");
    int64_t end = 0;
    for (const auto& d : data.documents()) {
      EXPECT_EQ(d.offset, end);
      end = d.offset + d.length;
      const auto ids = data.tokens(d.offset, d.length);
      EXPECT_TRUE(ids.ge(0).all().item<bool>() && ids.lt(data.vocab_size()).all().item<bool>());
    }
    EXPECT_EQ(end, data.num_tokens());
    return "";
  } catch (const DataError& e) {
    return e.what();
  }
}

TEST(Mutation, DamagedTokenIndexesAndFilesAreRefusedNamingTheFile) {
  const auto dir = scratch("idx-mutation");
  write_split(dir);
  std::mt19937_64 gen(15);
  for (const std::string name : {"train.idx", "train.bin"}) {
    const auto path = dir / name;
    const std::string good = slurp(path);
    for (int t = 0; t < kTrials; ++t) {
      const std::string bad = mutate(good, gen);
      if (bad == good) continue;
      spit(path, bad);
      const std::string why = open_and_read(dir);
      EXPECT_NE(why, "") << name << " trial " << t << ": a damaged file opened";
      EXPECT_NE(why.find(dir.string()), std::string::npos) << name << " trial " << t << ": " << why;
    }
    spit(path, good);
  }
  fs::remove_all(dir);
}

// The index's own checksum recomputed over a damaged body: every count, offset, length, width,
// vocabulary and name it holds is checked against the others and against the token file.
TEST(Mutation, ResealedTokenIndexesOpenConsistentOrAreRefused) {
  const auto dir = scratch("idx-reseal");
  write_split(dir);
  const std::string good = slurp(dir / "train.idx");
  const std::string body = good.substr(0, good.size() - 8);
  std::mt19937_64 gen(16);
  int opened = 0;
  for (int t = 0; t < kTrials; ++t) {
    std::string bad = mutate(body, gen);
    if (bad == body || bad.empty()) continue;
    const uint64_t sum = fnv1a64(bad.data(), bad.size());
    bad.append(reinterpret_cast<const char*>(&sum), 8);
    spit(dir / "train.idx", bad);
    const std::string why = open_and_read(dir);
    opened += why.empty();
    EXPECT_TRUE(why.empty() || why.find(dir.string()) != std::string::npos)
        << "trial " << t << ": " << why;
  }
  EXPECT_LT(opened, kTrials / 4);  // most damage is caught
  fs::remove_all(dir);
}

// Damaged token files whose checksum the index was re-sealed with: ids beyond the vocabulary
// and sizes other than the index's are refused naming the .bin.
TEST(Mutation, ResealedTokenFilesOpenWithinTheVocabularyOrAreRefused) {
  const auto dir = scratch("bin-reseal");
  write_split(dir);
  const std::string good = slurp(dir / "train.bin");
  const auto index = TokenIndex::parse(slurp(dir / "train.idx"), "train.idx");
  std::mt19937_64 gen(17);
  int beyond = 0;
  for (int t = 0; t < kTrials; ++t) {
    const std::string bad = mutate(good, gen);
    if (bad == good) continue;
    auto resealed = index;
    resealed.bin_checksum = fnv1a64(bad.data(), bad.size());
    spit(dir / "train.idx", resealed.serialize());
    spit(dir / "train.bin", bad);
    const std::string why = open_and_read(dir);
    EXPECT_TRUE(why.empty() || why.find((dir / "train.bin").string()) != std::string::npos)
        << "trial " << t << ": " << why;
    beyond += why.find("outside its vocabulary") != std::string::npos;
  }
  EXPECT_GT(beyond, 0);  // the vocabulary check was reached
  fs::remove_all(dir);
}

TEST(Mutation, DamagedCheckpointsAreRefusedWithAReason) {
  const auto root = scratch("checkpoint-mutation");
  Config config;
  CheckpointMeta meta{5, "epoch=0 position=1 seed=2 seq_len=8 world_size=1 num_windows=9",
                      config.to_yaml(), 3, config_fingerprint(config)};
  const auto dir = write_checkpoint(root.string(), meta, 1, [](const std::string& d) {
    std::ofstream out(d + "/state.pt", std::ios::binary);
    for (int i = 0; i < 300; ++i) out.put(static_cast<char>(i * 13));
  });
  ASSERT_EQ(checkpoint_problem(dir, &config), "");
  std::mt19937_64 gen(15);
  for (const std::string name : {"manifest.txt", "meta.txt", "state.pt", "config.yaml"}) {
    const auto path = fs::path(dir) / name;
    const std::string good = slurp(path);
    for (int t = 0; t < kTrials / 4; ++t) {
      const std::string bad = mutate(good, gen);
      if (bad == good) continue;
      spit(path, bad);
      EXPECT_NE(checkpoint_problem(dir, &config), "") << name << " trial " << t;
    }
    spit(path, good);
    ASSERT_EQ(checkpoint_problem(dir, &config), "") << name;
  }
  fs::remove_all(root);
}

// A tiny MoE language model with AdamW state after one step.
struct TinyTraining {
  LanguageModel model{LanguageModelOptions(40, 16, 1, 2)
                          .moe_layers({0})
                          .moe(MoELayerOptions(16, 4, 8).router(RouterOptions().top_k(2)))};
  torch::optim::AdamW optimizer{model->parameters()};

  void step() {
    auto ids = torch::randint(40, {2, 6});
    model->forward(ids).square().mean().backward();
    optimizer.step();
  }
};

// The readers behind a verified checkpoint, given damaged files directly (as if a checksum had
// missed the damage): a training state, meta.txt and config.yaml either load or fail naming the
// file; a state that loads holds only finite values.
TEST(Mutation, DamagedCheckpointFilesLoadOrAreRefusedNamingTheFile) {
  const auto root = scratch("state-mutation");
  torch::manual_seed(5);
  TinyTraining trained;
  trained.step();
  SingleCommunicator single;
  auto state = gather_training_state(*trained.model, trained.optimizer, single);
  Config config;
  CheckpointMeta meta{1, "epoch=0 position=1 seed=2 seq_len=8 world_size=1 num_windows=9",
                      config.to_yaml(), -1, config_fingerprint(config)};
  const auto dir = write_checkpoint(root.string(), meta, 1,
                                    [&](const std::string& d) { state.save_to(d + "/state.pt"); });
  std::mt19937_64 gen(18);
  const std::vector<std::pair<std::string, std::function<void(const std::string&)>>> readers = {
      {"state.pt",
       [&](const std::string& path) {
         TinyTraining fresh;
         load_training_state(path, *fresh.model, fresh.optimizer, single);
         for (const auto& p : fresh.model->parameters()) {
           EXPECT_TRUE(torch::isfinite(p).all().item<bool>());
         }
       }},
      {"meta.txt", [&](const std::string&) { read_checkpoint_meta(dir); }},
      {"config.yaml", [&](const std::string& path) { Config::from_yaml_file(path); }}};
  for (const auto& [name, read] : readers) {
    const auto path = (fs::path(dir) / name).string();
    const std::string good = slurp(path);
    int loaded = 0;
    for (int t = 0; t < kTrials / 2; ++t) {
      const std::string bad = mutate(good, gen);
      if (bad == good) continue;
      spit(path, bad);
      try {
        read(path);
        ++loaded;
      } catch (const std::exception& e) {
        EXPECT_NE(std::string(e.what()).find(path), std::string::npos)
            << name << " trial " << t << ": " << e.what();
      }
    }
    EXPECT_LT(loaded, kTrials / 2) << name;
    spit(path, good);
  }
  fs::remove_all(root);
}

}  // namespace
}  // namespace gbmoe
