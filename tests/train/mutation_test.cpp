// Seeded mutation of the files a run reads back (token indexes, checkpoint manifests and
// metadata): every damaged file is refused with a message naming it, none crashes or passes.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "test_util.h"
#include "train/checkpoint.h"
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

fs::path scratch(const std::string& name) {
  const auto dir = fs::temp_directory_path() / ("gbmoe-" + name + "-" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

TEST(Mutation, DamagedTokenIndexesAreRefusedNamingTheFile) {
  const auto dir = scratch("idx-mutation");
  {
    TokenFileWriter w(dir.string(), "train", 300, {"code", "prose"});
    w.add_document(0, {1, 2, 299, 4});
    w.add_document(1, {7, 8, 9});
    w.commit();
  }
  const auto idx = dir / "train.idx";
  const std::string good = slurp(idx);
  std::mt19937_64 gen(15);
  for (int t = 0; t < kTrials; ++t) {
    const std::string bad = mutate(good, gen);
    if (bad == good) continue;
    spit(idx, bad);
    try {
      TokenDataset::open(dir.string(), "train");
      ADD_FAILURE() << "trial " << t << ": a damaged index opened";
    } catch (const DataError& e) {
      EXPECT_NE(std::string(e.what()).find(dir.string()), std::string::npos)
          << "trial " << t << ": " << e.what();
    }
  }
  fs::remove_all(dir);
}

TEST(Mutation, DamagedCheckpointsAreRefusedWithAReason) {
  const auto root = scratch("checkpoint-mutation");
  Config config;
  CheckpointMeta meta{5, "sampler", config.to_yaml(), 3, config_fingerprint(config)};
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

}  // namespace
}  // namespace gbmoe
