// JSON lines -> DIR/<domain>/*.txt: records parsed with nlohmann-json, .gz read with zlib; bad
// records counted by reason.
#include "train/jsonl_corpus.h"

#include <zlib.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "train/token_dataset.h"

namespace gbmoe {
namespace {

namespace fs = std::filesystem;

bool valid_utf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t n = 0;  // continuation bytes
    uint32_t cp = 0;
    if ((c >> 5) == 0x6) {
      n = 1, cp = c & 0x1f;
    } else if ((c >> 4) == 0xe) {
      n = 2, cp = c & 0x0f;
    } else if ((c >> 3) == 0x1e) {
      n = 3, cp = c & 0x07;
    } else {
      return false;
    }
    if (i + n >= s.size()) return false;
    for (size_t k = 1; k <= n; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d >> 6) != 0x2) return false;
      cp = (cp << 6) | (d & 0x3f);
    }
    const uint32_t min[] = {0, 0x80, 0x800, 0x10000};
    if (cp < min[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += n + 1;
  }
  return true;
}

// Lines of a plain or gzip-compressed file.
class LineReader {
 public:
  explicit LineReader(const std::string& path) : path_(path) {
    if (!fs::is_regular_file(path)) throw DataError("--jsonl file \"" + path + "\" does not exist");
    file_ = gzopen(path.c_str(), "rb");  // reads uncompressed files as they are
    if (!file_) throw DataError("cannot open --jsonl file \"" + path + "\"");
  }
  ~LineReader() { gzclose(file_); }
  LineReader(const LineReader&) = delete;
  LineReader& operator=(const LineReader&) = delete;

  bool next(std::string& line) {
    line.clear();
    while (true) {
      const auto nl = buffer_.find('\n', start_);
      if (nl != std::string::npos) {
        line.assign(buffer_, start_, nl - start_);
        start_ = nl + 1;
        return true;
      }
      buffer_.erase(0, start_);
      start_ = 0;
      char chunk[1 << 16];
      const int n = gzread(file_, chunk, sizeof(chunk));
      if (n < 0) {
        int err = 0;
        throw DataError("reading --jsonl file \"" + path_ + "\" failed: " + gzerror(file_, &err));
      }
      if (n == 0) {
        if (buffer_.empty()) return false;
        line.swap(buffer_);
        return true;
      }
      buffer_.append(chunk, static_cast<size_t>(n));
    }
  }

 private:
  std::string path_;
  gzFile file_ = nullptr;
  std::string buffer_;
  size_t start_ = 0;
};

bool blank(const std::string& s) { return s.find_first_not_of(" \t\r\n") == std::string::npos; }

bool usable_domain(const std::string& d) {
  return !d.empty() && d[0] != '.' && d.find('/') == std::string::npos &&
         d.find('\0') == std::string::npos && d.size() <= 200;
}

}  // namespace

JsonlSummary jsonl_to_domain_dirs(const std::vector<std::string>& files, const std::string& out_dir,
                                  const JsonlFields& fields) {
  if (files.empty()) throw DataError("--jsonl names no file");
  if (fields.text.empty()) throw DataError("--text-field must not be empty");
  JsonlSummary s;
  for (size_t f = 0; f < files.size(); ++f) {
    LineReader reader(files[f]);
    std::string line;
    for (int64_t number = 1; reader.next(line); ++number) {
      if (blank(line)) continue;
      ++s.records;
      if (!valid_utf8(line)) {
        ++s.invalid_utf8;
        continue;
      }
      nlohmann::json record = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (!record.is_object()) {
        ++s.invalid_json;
        continue;
      }
      const auto text = record.find(fields.text);
      const auto domain = fields.domain.empty() ? record.end() : record.find(fields.domain);
      if (text == record.end() || !text->is_string() ||
          (!fields.domain.empty() && (domain == record.end() || !domain->is_string()))) {
        ++s.missing_field;
        continue;
      }
      const std::string name = fields.domain.empty() ? "all" : domain->get<std::string>();
      if (!usable_domain(name)) {
        ++s.bad_domain;
        continue;
      }
      const auto& body = text->get_ref<const std::string&>();
      if (blank(body)) {
        ++s.empty_text;
        continue;
      }
      const fs::path dir = fs::path(out_dir) / name;
      fs::create_directories(dir);
      char file[48];  // zero-padded, so that documents sort in file and line order
      std::snprintf(file, sizeof(file), "%zu-%09lld.txt", f, static_cast<long long>(number));
      const auto path = dir / file;
      std::ofstream out(path, std::ios::binary);
      out << body;
      if (!out) throw DataError("cannot write " + path.string());
      ++s.domains[name];
    }
  }
  if (s.bad() == s.records) {
    std::string names;
    for (const auto& f : files) names += (names.empty() ? "" : ", ") + f;
    throw DataError("every one of the " + std::to_string(s.records) + " records of " + names +
                    " is bad" + (s.records ? ":\n" + format_jsonl_summary(s, fields) : ""));
  }
  return s;
}

std::string format_jsonl_summary(const JsonlSummary& s, const JsonlFields& fields) {
  std::string out;
  auto line = [&](int64_t n, const std::string& why) {
    if (n > 0) out += "  " + std::to_string(n) + " records " + why + "\n";
  };
  line(s.invalid_json, "that are not a JSON object");
  line(s.invalid_utf8, "with invalid UTF-8");
  line(s.missing_field, "without a string field \"" + fields.text + "\"" +
                            (fields.domain.empty() ? "" : " or \"" + fields.domain + "\""));
  line(s.bad_domain, "whose domain cannot be a directory name");
  line(s.empty_text, "with empty text");
  return out;
}

}  // namespace gbmoe
