// safetensors: an 8-byte little-endian header length, a JSON header (parsed with nlohmann-json)
// naming each tensor's dtype, shape and byte range, then the raw little-endian data.
#include "train/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <vector>

namespace gbmoe {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const std::vector<std::pair<std::string, torch::ScalarType>>& dtype_names() {
  static const std::vector<std::pair<std::string, torch::ScalarType>> names = {
      {"F32", torch::kFloat},  {"BF16", torch::kBFloat16}, {"F16", torch::kHalf},
      {"F64", torch::kDouble}, {"I64", torch::kLong},      {"I32", torch::kInt},
      {"I16", torch::kShort},  {"I8", torch::kChar},       {"U8", torch::kByte},
      {"BOOL", torch::kBool}};
  return names;
}

torch::ScalarType dtype_from_name(const std::string& name, const std::string& where) {
  for (const auto& [n, t] : dtype_names()) {
    if (n == name) return t;
  }
  TORCH_CHECK(false, where, ": unsupported dtype '", name,
              "' (supported: F32, BF16, F16, F64, I64, I32, I16, I8, U8, BOOL)");
}

std::string dtype_name(torch::ScalarType type, const std::string& where) {
  for (const auto& [n, t] : dtype_names()) {
    if (t == type) return n;
  }
  TORCH_CHECK(false, where, ": dtype ", type, " cannot be written to safetensors");
}

// A read-only memory mapping of a whole file, unmapped when the last tensor copy is done.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY);
    TORCH_CHECK(fd >= 0, "cannot open safetensors file ", path, ": ", std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      TORCH_CHECK(false, "cannot stat ", path, ": ", std::strerror(errno));
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      ::close(fd);
      TORCH_CHECK(p != MAP_FAILED, "cannot memory-map ", path, ": ", std::strerror(errno));
      data_ = static_cast<const uint8_t*>(p);
    } else {
      ::close(fd);
    }
  }
  ~MappedFile() {
    if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

uint64_t read_le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

std::vector<int64_t> shape_of(const json& entry, const std::string& where) {
  TORCH_CHECK(entry.contains("shape") && entry["shape"].is_array(), where,
              ": header entry lacks a \"shape\" list");
  std::vector<int64_t> shape;
  for (const auto& d : entry["shape"]) {
    TORCH_CHECK(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0), where,
                ": shape ", entry["shape"].dump(), " must hold non-negative integers");
    shape.push_back(d.get<int64_t>());
  }
  return shape;
}

}  // namespace

TensorMap read_safetensors(const std::string& path) {
  auto file = std::make_shared<MappedFile>(path);
  TORCH_CHECK(file->size() >= 8, "safetensors file ", path, " is truncated: ", file->size(),
              " bytes, fewer than the 8 of the header length");
  const uint64_t header_len = read_le64(file->data());
  TORCH_CHECK(header_len <= file->size() - 8, "safetensors file ", path,
              " is truncated or not safetensors: its header length (", header_len,
              " bytes) exceeds the file (", file->size(), " bytes)");
  json header;
  try {
    header = json::parse(file->data() + 8, file->data() + 8 + header_len);
  } catch (const json::parse_error& e) {
    TORCH_CHECK(false, "safetensors file ", path, " has a bad JSON header: ", e.what());
  }
  TORCH_CHECK(header.is_object(), "safetensors file ", path, ": the header must be a JSON object");
  const uint8_t* data = file->data() + 8 + header_len;
  const uint64_t data_len = file->size() - 8 - header_len;

  TensorMap out;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    const std::string where = "safetensors file " + path + ", tensor " + name;
    TORCH_CHECK(entry.is_object() && entry.contains("dtype") && entry["dtype"].is_string(), where,
                ": header entry lacks a \"dtype\" string");
    const auto dtype = dtype_from_name(entry["dtype"].get<std::string>(), where);
    const auto shape = shape_of(entry, where);
    TORCH_CHECK(entry.contains("data_offsets") && entry["data_offsets"].is_array() &&
                    entry["data_offsets"].size() == 2 &&
                    entry["data_offsets"][0].is_number_unsigned() &&
                    entry["data_offsets"][1].is_number_unsigned(),
                where, ": header entry needs \"data_offsets\": [begin, end]");
    const uint64_t begin = entry["data_offsets"][0].get<uint64_t>();
    const uint64_t end = entry["data_offsets"][1].get<uint64_t>();
    int64_t numel = 1;
    for (auto d : shape) numel *= d;
    const uint64_t expected = static_cast<uint64_t>(numel) * c10::elementSize(dtype);
    TORCH_CHECK(begin <= end && end - begin == expected, where, ": data_offsets [", begin, ", ",
                end, "] hold ", end - begin, " bytes but dtype ", entry["dtype"].get<std::string>(),
                " and shape ", entry["shape"].dump(), " need ", expected);
    TORCH_CHECK(end <= data_len, where, ": the file is truncated (the tensor ends at byte ", end,
                " of the data, which has only ", data_len, " bytes)");
    auto t = torch::empty(shape, torch::TensorOptions().dtype(dtype));
    if (expected > 0) std::memcpy(t.data_ptr(), data + begin, expected);
    out.emplace(name, std::move(t));
  }
  return out;
}

void write_safetensors(const std::string& path, const TensorMap& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<torch::Tensor> contiguous;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t.defined(), "write_safetensors ", path, ": tensor ", name, " is undefined");
    auto c = t.detach().to(torch::kCPU).contiguous();
    const uint64_t bytes = static_cast<uint64_t>(c.numel()) * c.element_size();
    header[name] = {{"dtype", dtype_name(c.scalar_type(), path + ", tensor " + name)},
                    {"shape", c.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    contiguous.push_back(std::move(c));
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // data starts 8-byte aligned, as HF writes it
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    TORCH_CHECK(out, "cannot write ", tmp);
    uint8_t len[8];
    uint64_t n = text.size();
    for (int i = 0; i < 8; ++i, n >>= 8) len[i] = static_cast<uint8_t>(n & 0xff);
    out.write(reinterpret_cast<const char*>(len), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const auto& c : contiguous) {
      out.write(static_cast<const char*>(c.data_ptr()),
                static_cast<std::streamsize>(c.numel() * c.element_size()));
    }
    TORCH_CHECK(out.good(), "writing ", tmp, " failed");
  }
  fs::rename(tmp, path);
}

TensorMap read_safetensors_dir(const std::string& dir) {
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single = fs::path(dir) / "model.safetensors";
  if (!fs::exists(index_path)) {
    TORCH_CHECK(fs::exists(single), "model directory ", dir,
                " has neither model.safetensors nor model.safetensors.index.json");
    return read_safetensors(single.string());
  }
  json index;
  try {
    std::ifstream in(index_path);
    TORCH_CHECK(in, "cannot read ", index_path.string());
    index = json::parse(in);
  } catch (const json::parse_error& e) {
    TORCH_CHECK(false, "shard index ", index_path.string(), " is not valid JSON: ", e.what());
  }
  TORCH_CHECK(index.is_object() && index.contains("weight_map") && index["weight_map"].is_object(),
              "shard index ", index_path.string(), " lacks a \"weight_map\" object");
  // shard file -> tensors the index places there
  std::map<std::string, std::set<std::string>> shards;
  for (const auto& [name, file] : index["weight_map"].items()) {
    TORCH_CHECK(file.is_string(), "shard index ", index_path.string(), ": weight_map[\"", name,
                "\"] must be a file name");
    shards[file.get<std::string>()].insert(name);
  }
  TensorMap out;
  for (const auto& [file, names] : shards) {
    const fs::path shard = fs::path(dir) / file;
    TORCH_CHECK(fs::exists(shard), "missing shard ", shard.string(), " (named by ",
                index_path.string(), " for ", names.size(), " tensors, e.g. ", *names.begin(), ")");
    for (auto& [name, t] : read_safetensors(shard.string())) {
      TORCH_CHECK(names.count(name), "shard ", shard.string(), " holds tensor ", name, " but ",
                  index_path.string(), " places it ",
                  index["weight_map"].contains(name)
                      ? "in " + index["weight_map"][name].get<std::string>()
                      : std::string("nowhere"));
      out.emplace(name, std::move(t));
    }
    for (const auto& name : names) {
      TORCH_CHECK(out.count(name), "shard ", shard.string(), " lacks tensor ", name, " that ",
                  index_path.string(), " places there");
    }
  }
  return out;
}

int64_t write_safetensors_dir(const std::string& dir, const TensorMap& tensors,
                              int64_t max_shard_bytes) {
  TORCH_CHECK(max_shard_bytes > 0, "max_shard_bytes (", max_shard_bytes, ") must be > 0");
  fs::create_directories(dir);
  std::vector<TensorMap> shards(1);
  int64_t current = 0, total = 0;
  for (const auto& [name, t] : tensors) {
    const int64_t bytes = t.numel() * t.element_size();
    if (current > 0 && current + bytes > max_shard_bytes) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().emplace(name, t);
    current += bytes;
    total += bytes;
  }
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  fs::remove(fs::path(dir) / "model.safetensors.index.json");
  if (shards.size() == 1) {
    write_safetensors((fs::path(dir) / "model.safetensors").string(), shards[0], metadata);
    return 1;
  }
  json weight_map = json::object();
  const int64_t n = static_cast<int64_t>(shards.size());
  for (int64_t i = 0; i < n; ++i) {
    char file[64];
    std::snprintf(file, sizeof(file), "model-%05lld-of-%05lld.safetensors",
                  static_cast<long long>(i + 1), static_cast<long long>(n));
    write_safetensors((fs::path(dir) / file).string(), shards[i], metadata);
    for (const auto& item : shards[i]) weight_map[item.first] = file;
  }
  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  std::ofstream out(fs::path(dir) / "model.safetensors.index.json", std::ios::trunc);
  TORCH_CHECK(out, "cannot write ", dir, "/model.safetensors.index.json");
  out << index.dump(2) << "\n";
  return n;
}

}  // namespace gbmoe
