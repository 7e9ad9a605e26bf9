// safetensors: round trips of single files and shards in every float dtype, and the errors for
// truncated files, bad headers, missing shards and inconsistent byte ranges.
#include "train/safetensors.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "tests/test_util.h"

namespace gbmoe {
namespace {

namespace fs = std::filesystem;

std::string temp_dir(const std::string& name) {
  const auto dir = fs::temp_directory_path() / ("gbmoe-safetensors-" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

TensorMap sample() {
  torch::manual_seed(3);
  return {{"a.weight", torch::randn({3, 5})},
          {"b.bf16", torch::randn({4, 2}).to(torch::kBFloat16)},
          {"c.f16", torch::randn({7}).to(torch::kHalf)},
          {"d.ids", torch::arange(6, torch::kLong).view({2, 3})},
          {"e.transposed", torch::randn({5, 3}).t()},
          {"f.empty", torch::empty({0, 4})}};
}

void expect_equal(const TensorMap& a, const TensorMap& b) {
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [name, t] : a) {
    ASSERT_TRUE(b.count(name)) << name;
    EXPECT_EQ(b.at(name).scalar_type(), t.scalar_type()) << name;
    EXPECT_TRUE(torch::equal(b.at(name), t)) << name;
  }
}

TEST(Safetensors, SingleFileRoundTripKeepsDtypesAndValues) {
  const auto path = temp_dir("single") + "/t.safetensors";
  write_safetensors(path, sample(), {{"format", "pt"}});
  expect_equal(sample(), read_safetensors(path));
  std::ifstream in(path, std::ios::binary);
  uint64_t n = 0;
  in.read(reinterpret_cast<char*>(&n), 8);
  EXPECT_EQ((8 + n) % 8, 0u) << "data must start 8-byte aligned";
}

TEST(Safetensors, ShardedDirectoryRoundTripWritesAnIndex) {
  const auto dir = temp_dir("sharded");
  EXPECT_EQ(write_safetensors_dir(dir, sample(), 40), 5);
  EXPECT_TRUE(fs::exists(dir + "/model.safetensors.index.json"));
  EXPECT_TRUE(fs::exists(dir + "/model-00001-of-00005.safetensors"));
  expect_equal(sample(), read_safetensors_dir(dir));
  // Written again unsharded, the stale index is gone and the single file is read.
  EXPECT_EQ(write_safetensors_dir(dir, sample()), 1);
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors.index.json"));
  expect_equal(sample(), read_safetensors_dir(dir));
}

TEST(Safetensors, MissingShardNamesTheShardAndATensor) {
  const auto dir = temp_dir("missing");
  write_safetensors_dir(dir, sample(), 40);
  fs::remove(dir + "/model-00002-of-00005.safetensors");
  const auto msg = exception_message([&] { read_safetensors_dir(dir); });
  EXPECT_NE(msg.find("missing shard " + dir + "/model-00002-of-00005.safetensors"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("e.g. b.bf16"), std::string::npos) << msg;
}

TEST(Safetensors, TruncatedFileNamesTheFileAndTheTensor) {
  const auto path = temp_dir("truncated") + "/t.safetensors";
  write_safetensors(path, sample());
  fs::resize_file(path, fs::file_size(path) - 3);
  const auto msg = exception_message([&] { read_safetensors(path); });
  EXPECT_NE(msg.find(path + ", tensor e.transposed"), std::string::npos)
      << msg;  // the last with data
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
  fs::resize_file(path, 20);
  EXPECT_NE(exception_message([&] { read_safetensors(path); }).find("exceeds the file"),
            std::string::npos);
  fs::resize_file(path, 4);
  EXPECT_NE(exception_message([&] { read_safetensors(path); }).find("is truncated: 4 bytes"),
            std::string::npos);
}

void write_raw(const std::string& path, const std::string& header, size_t data_bytes) {
  std::ofstream out(path, std::ios::binary);
  uint64_t n = header.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << header << std::string(data_bytes, '\0');
}

TEST(Safetensors, BadHeadersAreReportedWithTheTensor) {
  const auto path = temp_dir("bad") + "/t.safetensors";
  write_raw(path, "{\"w\": {\"dtype\": \"F32\", \"shape\": [2, 2]", 16);
  EXPECT_NE(exception_message([&] { read_safetensors(path); }).find("bad JSON header"),
            std::string::npos);
  write_raw(path, R"({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}})", 16);
  auto msg = exception_message([&] { read_safetensors(path); });
  EXPECT_NE(msg.find("tensor w: data_offsets [0, 12] hold 12 bytes but dtype F32 and shape "
                     "[2,2] need 16"),
            std::string::npos)
      << msg;
  write_raw(path, R"({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}})", 2);
  msg = exception_message([&] { read_safetensors(path); });
  EXPECT_NE(msg.find("tensor w: unsupported dtype 'F8_E4M3'"), std::string::npos) << msg;
  write_raw(path, R"({"w": {"shape": [2], "data_offsets": [0, 8]}})", 8);
  EXPECT_NE(exception_message([&] { read_safetensors(path); }).find("lacks a \"dtype\""),
            std::string::npos);
}

}  // namespace
}  // namespace gbmoe
