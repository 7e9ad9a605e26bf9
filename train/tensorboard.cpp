// TensorBoard event files: CRC32C, TFRecord framing, protobuf wire encoding of scalar Events,
// and the flattening of metrics.jsonl lines into tags.
#include "train/tensorboard.h"

#include <unistd.h>

#include <array>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <stdexcept>

namespace gbmoe {
namespace {

std::array<uint32_t, 256> crc32c_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    table[i] = c;
  }
  return table;
}

// Little-endian fixed-width integers (the TFRecord framing and protobuf fixed32/fixed64).
template <class T>
void put_le(std::string& out, T v) {
  for (size_t i = 0; i < sizeof(T); ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

// Protobuf keys: (field number << 3) | wire type (0 varint, 1 fixed64, 2 length-delimited,
// 5 fixed32).
void put_key(std::string& out, int field, int wire_type) {
  put_varint(out, static_cast<uint64_t>(field << 3 | wire_type));
}

void put_bytes(std::string& out, int field, const std::string& bytes) {
  put_key(out, field, 2);
  put_varint(out, bytes.size());
  out += bytes;
}

void put_double(std::string& out, int field, double v) {
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof bits);
  put_key(out, field, 1);
  put_le(out, bits);
}

void put_float(std::string& out, int field, float v) {
  uint32_t bits = 0;
  std::memcpy(&bits, &v, sizeof bits);
  put_key(out, field, 5);
  put_le(out, bits);
}

std::string event_header(double wall_time, int64_t step) {
  std::string e;
  put_double(e, 1, wall_time);
  if (step != 0) {
    put_key(e, 2, 0);
    put_varint(e, static_cast<uint64_t>(step));
  }
  return e;
}

double wall_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// A recursive-descent reader of the JSON gbmoe writes, collecting numbers under their paths.
class JsonFlattener {
 public:
  explicit JsonFlattener(const std::string& text) : s_(text) {}

  std::vector<std::pair<std::string, double>> run() {
    skip_space();
    value("");
    skip_space();
    if (i_ != s_.size()) fail("trailing characters");
    return out_;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw std::invalid_argument("malformed JSON (" + what + " at offset " + std::to_string(i_) +
                                "): " + s_);
  }
  void skip_space() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  bool eat(char c) {
    skip_space();
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }
  void expect(char c) {
    if (!eat(c)) fail(std::string("expected '") + c + "'");
  }
  static std::string join(const std::string& path, const std::string& key) {
    return path.empty() ? key : path + "/" + key;
  }

  std::string string() {
    expect('"');
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      if (s_[i_] == '\\') {
        if (++i_ >= s_.size()) fail("unterminated escape");
        if (s_[i_] == 'u') {
          out += '?';  // tags need no exotic characters
          i_ += 5;
          continue;
        }
        const char c = s_[i_];
        out += c == 'n' ? '\n' : c == 't' ? '\t' : c;
      } else {
        out += s_[i_];
      }
      ++i_;
    }
    if (i_ >= s_.size()) fail("unterminated string");
    ++i_;
    return out;
  }

  void value(const std::string& path) {
    skip_space();
    if (i_ >= s_.size()) fail("unexpected end");
    const char c = s_[i_];
    if (c == '{') {
      ++i_;
      if (eat('}')) return;
      do {
        skip_space();
        const std::string key = string();
        expect(':');
        if (path.empty() && key == "step") {
          skip_space();
          number("");
        } else {
          value(join(path, key));
        }
      } while (eat(','));
      expect('}');
    } else if (c == '[') {
      ++i_;
      if (eat(']')) return;
      int64_t n = 0;
      do value(join(path, "layer" + std::to_string(n++)));
      while (eat(','));
      expect(']');
    } else if (c == '"') {
      string();
    } else if (s_.compare(i_, 4, "null") == 0 || s_.compare(i_, 4, "true") == 0) {
      i_ += 4;
    } else if (s_.compare(i_, 5, "false") == 0) {
      i_ += 5;
    } else {
      number(path);
    }
  }

  void number(const std::string& path) {
    const char* begin = s_.c_str() + i_;
    char* end = nullptr;
    const double v = std::strtod(begin, &end);
    if (end == begin) fail("expected a value");
    i_ += static_cast<size_t>(end - begin);
    if (!path.empty()) out_.emplace_back(path, v);
  }

  const std::string& s_;
  size_t i_ = 0;
  std::vector<std::pair<std::string, double>> out_;
};

}  // namespace

uint32_t crc32c(const std::string& bytes) {
  static const auto table = crc32c_table();
  uint32_t crc = 0xFFFFFFFFu;
  for (unsigned char b : bytes) crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8);
  return crc ^ 0xFFFFFFFFu;
}

uint32_t masked_crc32c(const std::string& bytes) {
  const uint32_t crc = crc32c(bytes);
  return ((crc >> 15) | (crc << 17)) + 0xA282EAD8u;
}

std::string tfrecord(const std::string& payload) {
  std::string length;
  put_le<uint64_t>(length, payload.size());
  std::string out = length;
  put_le(out, masked_crc32c(length));
  out += payload;
  put_le(out, masked_crc32c(payload));
  return out;
}

std::string event_file_version(double wall_time, const std::string& version) {
  std::string e = event_header(wall_time, 0);
  put_bytes(e, 3, version);
  return e;
}

std::string event_scalars(double wall_time, int64_t step,
                          const std::vector<std::pair<std::string, double>>& scalars) {
  std::string summary;
  for (const auto& [tag, v] : scalars) {
    std::string value;
    put_bytes(value, 1, tag);
    put_float(value, 2, static_cast<float>(v));
    put_bytes(summary, 1, value);
  }
  std::string e = event_header(wall_time, step);
  put_bytes(e, 5, summary);
  return e;
}

std::vector<std::pair<std::string, double>> json_scalars(const std::string& json_line) {
  return JsonFlattener(json_line).run();
}

TensorBoardWriter::TensorBoardWriter(const std::string& dir) {
  std::filesystem::create_directories(dir);
  char host[256] = "localhost";
  gethostname(host, sizeof host - 1);
  const double now = wall_seconds();
  path_ = (std::filesystem::path(dir) /
           ("events.out.tfevents." + std::to_string(static_cast<int64_t>(now)) + "." + host + "." +
            std::to_string(getpid()) + ".gbmoe"))
              .string();
  out_.open(path_, std::ios::binary | std::ios::trunc);
  if (!out_) throw std::runtime_error("cannot write the TensorBoard event file " + path_);
  write(event_file_version(now));
}

void TensorBoardWriter::write(const std::string& event) {
  out_ << tfrecord(event);
  out_.flush();
  if (!out_) throw std::runtime_error("cannot write the TensorBoard event file " + path_);
}

void TensorBoardWriter::add_scalars(int64_t step,
                                    const std::vector<std::pair<std::string, double>>& scalars) {
  write(event_scalars(wall_seconds(), step, scalars));
}

void TensorBoardWriter::add_json_line(const std::string& json_line) {
  const auto key = json_line.find("\"step\":");
  if (key == std::string::npos)
    throw std::invalid_argument("metrics line has no \"step\": " + json_line);
  const int64_t step = std::strtoll(json_line.c_str() + key + 7, nullptr, 10);
  add_scalars(step, json_scalars(json_line));
}

}  // namespace gbmoe
