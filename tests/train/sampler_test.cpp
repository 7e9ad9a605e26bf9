// Tests of SequenceSampler and validation_batches on a synthetic token file whose token values
// tell which document and position they come from.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <map>
#include <set>

#include "test_util.h"
#include "train/data.h"

namespace gbmoe {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kStride = 1000;  // token = document * kStride + position

// 30 documents over 3 domains; lengths from 3 to 160 tokens, so some are shorter than a window.
class SamplerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = fs::temp_directory_path() / ("gbmoe_sampler_test_" + std::to_string(getpid()));
    fs::create_directories(dir_);
    TokenFileWriter w(dir_.string(), "train", 70000, {"code", "math", "prose"});
    TokenFileWriter v(dir_.string(), "val", 70000, {"code", "math", "prose"});
    for (int64_t doc = 0; doc < 30; ++doc) {
      const int64_t len = 3 + (doc * 37) % 158;
      std::vector<int> ids(static_cast<size_t>(len));
      for (int64_t p = 0; p < len; ++p)
        ids[static_cast<size_t>(p)] = static_cast<int>(doc * kStride + p);
      w.add_document(doc % 3, ids);
      v.add_document(doc % 3, ids);
    }
    w.commit();
    v.commit();
    data_ = std::make_shared<TokenDataset>(TokenDataset::open(dir_.string(), "train"));
  }
  static void TearDownTestSuite() {
    data_.reset();
    fs::remove_all(dir_);
  }

  static SamplerOptions opts(int64_t seq_len = 16, int64_t batch = 4) {
    return SamplerOptions(seq_len, batch).seed(3);
  }
  // The (document, position) of a window's first token, read back from the batch.
  static std::pair<int64_t, int64_t> origin(const Batch& b, int64_t row) {
    const int64_t t = b.inputs[row][0].item<int64_t>();
    return {t / kStride, t % kStride};
  }

  static fs::path dir_;
  static std::shared_ptr<TokenDataset> data_;
};

fs::path SamplerTest::dir_;
std::shared_ptr<TokenDataset> SamplerTest::data_;

void expect_same(const Batch& a, const Batch& b) {
  EXPECT_TRUE(torch::equal(a.inputs, b.inputs));
  EXPECT_TRUE(torch::equal(a.targets, b.targets));
  EXPECT_TRUE(torch::equal(a.mask, b.mask));
  EXPECT_TRUE(torch::equal(a.domain, b.domain));
}

TEST_F(SamplerTest, EachRowIsOneDocumentWithShiftedTargets) {
  SequenceSampler s(data_, opts(16, 4));
  int64_t padded_rows = 0;
  for (int step = 0; step < 40; ++step) {
    Batch b = s.next_batch();
    ASSERT_EQ(b.inputs.sizes(), torch::IntArrayRef({4, 16}));
    ASSERT_EQ(b.targets.sizes(), torch::IntArrayRef({4, 16}));
    ASSERT_EQ(b.mask.scalar_type(), torch::kBool);
    ASSERT_EQ(b.domain.sizes(), torch::IntArrayRef({4}));
    for (int64_t r = 0; r < 4; ++r) {
      const auto [doc, pos] = origin(b, r);
      EXPECT_EQ(pos % 16, 0);
      EXPECT_EQ(b.domain[r].item<int64_t>(), doc % 3);
      const int64_t n = b.mask[r].sum().item<int64_t>();
      const int64_t len = data_->document(doc).length;
      EXPECT_EQ(n, std::min<int64_t>(16, len - 1 - pos));
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t in = b.inputs[r][i].item<int64_t>(), tg = b.targets[r][i].item<int64_t>();
        if (i < n) {
          EXPECT_TRUE(b.mask[r][i].item<bool>());
          EXPECT_EQ(in, doc * kStride + pos + i);
          EXPECT_EQ(tg, in + 1);
        } else {
          EXPECT_FALSE(b.mask[r][i].item<bool>());
          EXPECT_EQ(tg, -100);
        }
      }
      padded_rows += n < 16;
    }
  }
  EXPECT_GT(padded_rows, 0);
}

TEST_F(SamplerTest, OneEpochPredictsEveryTokenOnce) {
  SequenceSampler s(data_, opts(16, 1));
  std::set<int64_t> targets;
  int64_t count = 0;
  for (int64_t i = 0; i < s.num_windows(); ++i) {
    Batch b = s.next_batch();
    auto t = b.targets.masked_select(b.mask);
    for (int64_t k = 0; k < t.numel(); ++k) targets.insert(t[k].item<int64_t>());
    count += t.numel();
  }
  EXPECT_EQ(count, data_->num_tokens() - data_->num_documents());
  EXPECT_EQ(static_cast<int64_t>(targets.size()), count);
  EXPECT_EQ(s.state().epoch, 1);
  EXPECT_EQ(s.state().position, 0);
}

TEST_F(SamplerTest, RanksAreDisjointAndCoverTheEpoch) {
  for (int64_t R : {1, 2, 3, 4, 5}) {
    const int64_t N = SequenceSampler(data_, opts()).num_windows();
    for (int64_t epoch : {0, 1}) {
      std::set<int64_t> seen;
      int64_t total = 0;
      for (int64_t r = 0; r < R; ++r) {
        SequenceSampler s(data_, opts(16, 2).rank(r).world_size(R));
        EXPECT_EQ(s.windows_per_rank(), N / R);
        // What the rank draws is what rank_windows says.
        s.skip_to_step(epoch * s.windows_per_rank() / 2);
        const auto windows = s.rank_windows(epoch);
        if (s.windows_per_rank() % 2 == 0) {
          Batch b = s.next_batch();
          EXPECT_EQ(origin(b, 0), std::make_pair(windows[0].document,
                                                 windows[0].offset -
                                                     data_->document(windows[0].document).offset));
        }
        for (const Window& w : windows) {
          EXPECT_TRUE(seen.insert(w.offset).second)
              << "window at " << w.offset << " twice, R=" << R;
        }
        total += static_cast<int64_t>(windows.size());
      }
      EXPECT_EQ(total, N - N % R) << "R=" << R;
      if (R == 1) EXPECT_EQ(static_cast<int64_t>(seen.size()), N);
    }
  }
}

TEST_F(SamplerTest, TwoRanksDrawDisjointBatchesOverAnEpoch) {
  SequenceSampler a(data_, opts(16, 3).rank(0).world_size(2));
  SequenceSampler b(data_, opts(16, 3).rank(1).world_size(2));
  std::set<std::pair<int64_t, int64_t>> from_a, from_b;
  const int64_t steps = a.windows_per_rank() / 3;
  for (int64_t i = 0; i < steps; ++i) {
    Batch x = a.next_batch(), y = b.next_batch();
    for (int64_t r = 0; r < 3; ++r) {
      from_a.insert(origin(x, r));
      from_b.insert(origin(y, r));
    }
  }
  EXPECT_EQ(static_cast<int64_t>(from_a.size()), 3 * steps);
  EXPECT_EQ(static_cast<int64_t>(from_b.size()), 3 * steps);
  for (const auto& o : from_a) EXPECT_EQ(from_b.count(o), 0u);
}

TEST_F(SamplerTest, DeterministicFromTheSeed) {
  SequenceSampler a(data_, opts()), b(data_, opts()), c(data_, opts().seed(4));
  bool differs = false;
  for (int i = 0; i < 30; ++i) {
    Batch x = a.next_batch(), y = b.next_batch(), z = c.next_batch();
    expect_same(x, y);
    differs = differs || !torch::equal(x.inputs, z.inputs);
  }
  EXPECT_TRUE(differs);
  // Epochs are shuffled differently.
  const auto e0 = a.rank_windows(0), e1 = a.rank_windows(1);
  bool epochs_differ = false;
  for (size_t i = 0; i < e0.size(); ++i) epochs_differ |= e0[i].offset != e1[i].offset;
  EXPECT_TRUE(epochs_differ);
}

TEST_F(SamplerTest, ResumesExactlyFromAState) {
  for (int64_t k : {0, 1, 7, 19, 40}) {  // the epoch has 37 windows per rank: crosses epochs
    SequenceSampler a(data_, opts(16, 3).rank(1).world_size(2));
    for (int64_t i = 0; i < k; ++i) a.next_batch();
    const std::string saved = a.state().to_string();
    SequenceSampler b(data_, opts(16, 3).rank(1).world_size(2));
    b.load_state(SamplerState::from_string(saved));
    EXPECT_EQ(b.state(), a.state());
    SequenceSampler c(data_, opts(16, 3).rank(1).world_size(2));
    c.skip_to_step(k);
    EXPECT_EQ(c.state(), a.state()) << c.state().to_string() << " vs " << saved;
    for (int i = 0; i < 30; ++i) {
      Batch x = a.next_batch();
      expect_same(x, b.next_batch());
      expect_same(x, c.next_batch());
    }
  }
}

TEST_F(SamplerTest, MismatchedStateIsRefused) {
  SequenceSampler a(data_, opts(16, 3));
  SequenceSampler other(data_, opts(8, 3));
  expect_throw_with([&] { other.load_state(a.state()); }, "seq_len=16");
  SamplerState s = a.state();
  s.position = 1000000;
  expect_throw_with([&] { a.load_state(s); }, "position (1000000) must be in [0, ");
  expect_throw_with([&] { SamplerState::from_string("epoch=1 position=x"); },
                    "position (x) is not a non-negative integer");
  expect_throw_with([&] { SamplerState::from_string("epoch=1"); }, "needs epoch, position");
}

TEST_F(SamplerTest, BadOptionsAreRefused) {
  expect_throw_with([&] { SequenceSampler(data_, opts().rank(2).world_size(2)); },
                    "sampler rank (2) must be in [0, world_size (2))");
  expect_throw_with([&] { SequenceSampler(data_, opts(0, 1)); }, "seq_len (0) must be >= 1");
  expect_throw_with([&] { SequenceSampler(data_, opts(16, 1).world_size(100000)); },
                    "fewer than world_size (100000)");
}

TEST_F(SamplerTest, ValidationBatchesAreSingleDomainAndDeterministic) {
  auto val = TokenDataset::open(dir_.string(), "val");
  const auto batches = validation_batches(val, 16, 4, 3);
  std::map<int64_t, int64_t> per_domain;
  for (const Batch& b : batches) {
    const int64_t d = b.domain[0].item<int64_t>();
    EXPECT_TRUE(b.domain.eq(d).all().item<bool>());
    EXPECT_LE(b.inputs.size(0), 4);
    EXPECT_TRUE(
        b.targets.masked_select(b.mask).eq(b.inputs.masked_select(b.mask) + 1).all().item<bool>());
    per_domain[d] += 1;
  }
  EXPECT_EQ(per_domain.size(), 3u);
  for (const auto& [d, n] : per_domain) EXPECT_EQ(n, 3) << "domain " << d;
  const auto again = validation_batches(val, 16, 4, 3);
  ASSERT_EQ(again.size(), batches.size());
  for (size_t i = 0; i < batches.size(); ++i) expect_same(batches[i], again[i]);
}

}  // namespace
}  // namespace gbmoe
