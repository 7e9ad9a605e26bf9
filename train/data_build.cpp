// build_dataset: find the domains and documents, split them, train or load the tokenizer,
// tokenize in parallel, write the shards into a staging directory and swap it into place.
#include "train/data_build.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <sstream>
#include <thread>

#include "train/token_dataset.h"
#include "train/tokenizer.h"

namespace gbmoe {
namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string quoted(const std::string& s) { return "\"" + s + "\""; }

// A source file's text, or one part of it when it is longer than max_doc_bytes.
struct SourceDoc {
  int64_t domain = 0;
  std::string path;  // for messages
  std::string text;
};

// splitmix64: a fixed, portable generator, so splits do not depend on the standard library.
uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Returns the byte offset of the first invalid UTF-8 sequence, or -1.
int64_t invalid_utf8_at(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    size_t len = c < 0x80           ? 1
                 : (c >> 5) == 0x6  ? 2
                 : (c >> 4) == 0xe  ? 3
                 : (c >> 3) == 0x1e ? 4
                                    : 0;
    if (len == 0 || i + len > n) return static_cast<int64_t>(i);
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xc0) != 0x80) return static_cast<int64_t>(i);
    }
    if (len == 2 && c < 0xc2) return static_cast<int64_t>(i);  // overlong
    i += len;
  }
  return -1;
}

// Splits text into pieces of at most max_bytes, cutting after a newline where there is one and
// never inside a UTF-8 character.
std::vector<std::string> split_text(const std::string& text, size_t max_bytes) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (text.size() - start > max_bytes) {
    size_t cut = text.rfind('\n', start + max_bytes - 1);
    if (cut == std::string::npos || cut < start) {
      cut = start + max_bytes;
      while (cut > start && (static_cast<unsigned char>(text[cut]) & 0xc0) == 0x80) --cut;
    } else {
      ++cut;  // keep the newline with the first part
    }
    parts.push_back(text.substr(start, cut - start));
    start = cut;
  }
  parts.push_back(text.substr(start));
  return parts;
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DataError("cannot read input file " + path.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out;
}

// The domains (sorted subdirectory names) and their files (sorted relative paths).
struct Corpus {
  std::vector<std::string> domains;
  std::vector<std::vector<fs::path>> files;  // per domain
};

Corpus find_corpus(const std::string& input) {
  std::error_code ec;
  if (!fs::is_directory(input, ec)) {
    throw DataError("--input " + quoted(input) +
                    (fs::exists(input, ec) ? " is not a directory" : " does not exist") +
                    ": give the directory that holds one subdirectory of .txt files per domain");
  }
  Corpus c;
  std::vector<fs::path> dirs;
  int64_t stray = 0;
  for (const auto& e : fs::directory_iterator(input)) {
    if (e.path().filename().string()[0] == '.') continue;  // hidden: caches, markers
    if (e.is_directory()) {
      dirs.push_back(e.path());
    } else {
      ++stray;
    }
  }
  std::sort(dirs.begin(), dirs.end());
  if (dirs.empty()) {
    throw DataError("--input " + quoted(input) +
                    " has no subdirectories: put each domain's .txt files in " + input +
                    "/<domain>/");
  }
  if (stray > 0) {
    std::fprintf(stderr, "gbmoe-data: ignoring %lld files directly in %s (not in a domain)\n",
                 static_cast<long long>(stray), input.c_str());
  }
  for (const auto& dir : dirs) {
    std::vector<fs::path> files;
    for (const auto& e : fs::recursive_directory_iterator(dir)) {
      if (e.is_regular_file() && e.path().extension() == ".txt" && e.file_size() > 0) {
        files.push_back(e.path());
      }
    }
    std::sort(files.begin(), files.end());
    const std::string name = dir.filename().string();
    if (files.size() < 2) {
      throw DataError("domain " + quoted(name) + " (" + dir.string() + ") holds " +
                      std::to_string(files.size()) +
                      " non-empty .txt files; each domain needs at least 2 (one for validation)");
    }
    c.domains.push_back(name);
    c.files.push_back(std::move(files));
  }
  return c;
}

// Indices of the files of one domain that go to validation, from the seed and the domain name
// (adding a domain leaves the other domains' splits as they were).
std::vector<bool> choose_val(size_t n, double fraction, uint64_t seed, const std::string& domain) {
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  uint64_t state = seed ^ fnv1a64(domain.data(), domain.size());
  for (size_t i = n - 1; i > 0; --i) {
    const size_t j = static_cast<size_t>(splitmix64(state) % (i + 1));
    std::swap(order[i], order[j]);
  }
  const auto want = static_cast<size_t>(std::llround(fraction * static_cast<double>(n)));
  const size_t num_val = std::min(std::max<size_t>(want, 1), n - 1);
  std::vector<bool> is_val(n, false);
  for (size_t i = 0; i < num_val; ++i) is_val[order[i]] = true;
  return is_val;
}

// Prepares the output location: returns the staging directory to write into.
fs::path prepare_output(const DataBuildOptions& o) {
  const fs::path out(o.output());
  std::error_code ec;
  if (fs::exists(out, ec)) {
    if (!fs::is_directory(out, ec)) {
      throw DataError("--output " + quoted(o.output()) + " exists and is not a directory");
    }
    const bool is_dataset = fs::exists(out / "meta.json", ec) || fs::exists(out / "train.idx", ec);
    if (!is_dataset && !fs::is_empty(out, ec)) {
      throw DataError("--output " + quoted(o.output()) +
                      " is a non-empty directory that holds no gbmoe dataset; choose a new or "
                      "empty directory");
    }
    if (is_dataset && !o.overwrite()) {
      throw DataError("--output " + quoted(o.output()) +
                      " already holds a dataset; pass --overwrite to replace it or choose "
                      "another --output");
    }
  }
  fs::path parent = out.parent_path();
  if (parent.empty()) parent = ".";
  fs::create_directories(parent, ec);
  if (ec) {
    throw DataError("--output " + quoted(o.output()) + ": cannot create " + parent.string() + ": " +
                    ec.message());
  }
  // Staging directories of interrupted runs (their process is gone) are removed.
  const std::string prefix = out.filename().string() + ".tmp-";
  for (const auto& e : fs::directory_iterator(parent, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind(prefix, 0) != 0) continue;
    const std::string pid = name.substr(prefix.size());
    if (!pid.empty() && pid.find_first_not_of("0123456789") == std::string::npos &&
        kill(static_cast<pid_t>(std::stol(pid)), 0) != 0 && errno == ESRCH) {
      std::error_code ignored;
      fs::remove_all(e.path(), ignored);
    }
  }
  fs::path staging = parent / (prefix + std::to_string(getpid()));
  fs::remove_all(staging, ec);
  fs::create_directory(staging, ec);
  if (ec || access(staging.c_str(), W_OK) != 0) {
    throw DataError("--output " + quoted(o.output()) + " is not writable: cannot create " +
                    staging.string() + (ec ? ": " + ec.message() : ""));
  }
  return staging;
}

// Replaces output by staging; the old dataset is removed only once the new one is in place.
void publish(const fs::path& staging, const fs::path& out) {
  std::error_code ec;
  fs::path old;
  if (fs::exists(out, ec)) {
    old = out;
    old += ".old-" + std::to_string(getpid());
    fs::rename(out, old, ec);
    if (ec)
      throw DataError("cannot move the old dataset " + out.string() + " aside: " + ec.message());
  }
  fs::rename(staging, out, ec);
  if (ec) {
    throw DataError("cannot rename " + staging.string() + " to " + out.string() + ": " +
                    ec.message() + (old.empty() ? "" : "; the old dataset is in " + old.string()));
  }
  if (!old.empty()) fs::remove_all(old, ec);
}

class Progress {
 public:
  Progress(bool enabled, int64_t total) : enabled_(enabled), total_(total), t0_(Clock::now()) {}
  void update(int64_t done, bool final = false) {
    if (!enabled_) return;
    const double dt = seconds_since(t0_);
    if (!final && (done == total_ || dt - last_ < 0.25)) return;  // final prints the end
    last_ = dt;
    std::fprintf(
        stderr, "\rgbmoe-data: tokenizing %5.1f%%  %lld/%lld docs  %.0f docs/s",
        100.0 * static_cast<double>(done) / static_cast<double>(std::max<int64_t>(total_, 1)),
        static_cast<long long>(done), static_cast<long long>(total_),
        static_cast<double>(done) / std::max(dt, 1e-9));
    if (final) std::fprintf(stderr, "\n");
    std::fflush(stderr);
  }

 private:
  bool enabled_;
  int64_t total_;
  Clock::time_point t0_;
  double last_ = -1;
};

void write_meta(const fs::path& path, const DataBuildOptions& o, const DataBuildSummary& s,
                const Tokenizer& tok) {
  std::ostringstream j;
  j << "{\n  \"format\": \"gbmoe-data\",\n  \"version\": " << TokenIndex::kVersion
    << ",\n  \"vocab_size\": " << s.vocab_size << ",\n  \"token_bytes\": " << s.token_bytes
    << ",\n  \"bos_id\": " << tok.bos_id() << ",\n  \"eos_id\": " << tok.eos_id()
    << ",\n  \"seed\": " << o.seed() << ",\n  \"val_fraction\": " << o.val_fraction()
    << ",\n  \"max_doc_bytes\": " << o.max_doc_bytes() << ",\n  \"tokenizer_source\": \""
    << json_escape(o.tokenizer().empty() ? "trained" : o.tokenizer()) << "\",\n  \"domains\": [";
  for (size_t d = 0; d < s.domains.size(); ++d) {
    const auto& m = s.domains[d];
    j << (d ? "," : "") << "\n    {\"name\": \"" << json_escape(m.name)
      << "\", \"files\": " << m.files << ", \"bytes\": " << m.bytes
      << ", \"train\": {\"documents\": " << m.train_documents << ", \"tokens\": " << m.train_tokens
      << "}, \"val\": {\"documents\": " << m.val_documents << ", \"tokens\": " << m.val_tokens
      << "}}";
  }
  j << "\n  ]\n}\n";
  std::ofstream out(path, std::ios::trunc);
  out << j.str();
  out.flush();
  if (!out) throw DataError("cannot write " + path.string());
}

}  // namespace

void DataBuildOptions::validate() const {
  if (input().empty()) throw DataError("--input is required: the directory of domain folders");
  if (output().empty()) throw DataError("--output is required: the dataset directory to write");
  if (tokenizer().empty() && (vocab_size() < 320 || vocab_size() > 1000000)) {
    throw DataError("--vocab-size (" + std::to_string(vocab_size()) +
                    ") must be in [320, 1000000]: 256 byte pieces and the special tokens come "
                    "first; 4096 or 8192 suit a small corpus");
  }
  if (!(val_fraction() > 0.0 && val_fraction() < 1.0)) {
    std::ostringstream v;
    v << val_fraction();
    throw DataError("--val-fraction (" + v.str() + ") must be in (0, 1), e.g. 0.05");
  }
  if (max_doc_bytes() < 256) {
    throw DataError("--max-doc-bytes (" + std::to_string(max_doc_bytes()) + ") must be >= 256");
  }
  if (tokenizer_sentences() < 1000) {
    throw DataError("--tokenizer-sentences (" + std::to_string(tokenizer_sentences()) +
                    ") must be >= 1000");
  }
  if (threads() < 0) {
    throw DataError("--threads (" + std::to_string(threads()) + ") must be >= 0 (0: all cores)");
  }
  const fs::path in = fs::weakly_canonical(input()), out = fs::weakly_canonical(output());
  const auto [a, b] = std::mismatch(in.begin(), in.end(), out.begin(), out.end());
  if (a == in.end() || b == out.end()) {
    throw DataError("--output (" + output() + ") and --input (" + input() +
                    ") must not contain one another");
  }
}

namespace {

struct SplitDocs {
  std::vector<SourceDoc> train, val;
};

// Reads every input file (valid UTF-8 or an error naming it), splits large ones into documents
// and assigns whole files to train or validation; fills the per-domain file and document counts.
SplitDocs read_documents(const DataBuildOptions& o, const Corpus& corpus,
                         DataBuildSummary& summary) {
  SplitDocs docs;
  for (size_t d = 0; d < corpus.domains.size(); ++d) {
    DomainSummary ds;
    ds.name = corpus.domains[d];
    const auto& files = corpus.files[d];
    const std::vector<bool> is_val = choose_val(files.size(), o.val_fraction(), o.seed(), ds.name);
    for (size_t f = 0; f < files.size(); ++f) {
      std::string text = read_text(files[f]);
      const int64_t bad = invalid_utf8_at(text);
      if (bad >= 0) {
        throw DataError("input file " + files[f].string() + " is not valid UTF-8 at byte " +
                        std::to_string(bad) + "; convert it (e.g. iconv -f latin1 -t utf-8)");
      }
      ds.files += 1;
      ds.bytes += static_cast<int64_t>(text.size());
      for (auto& part : split_text(text, static_cast<size_t>(o.max_doc_bytes()))) {
        auto& dst = is_val[f] ? docs.val : docs.train;
        dst.push_back({static_cast<int64_t>(d), files[f].string(), std::move(part)});
        (is_val[f] ? ds.val_documents : ds.train_documents) += 1;
      }
    }
    summary.domains.push_back(ds);
  }
  return docs;
}

// The given tokenizer, copied to model_path, or a BPE tokenizer trained there on the training
// documents only, so validation text stays unseen.
Tokenizer make_tokenizer(const DataBuildOptions& o, const std::vector<SourceDoc>& train_docs,
                         const std::string& model_path) {
  if (!o.tokenizer().empty()) {
    Tokenizer tok;
    try {
      tok = Tokenizer::load(o.tokenizer());
    } catch (const DataError& e) {
      throw DataError(std::string("--tokenizer ") + quoted(o.tokenizer()) + ": " + e.what());
    }
    std::ofstream out(model_path, std::ios::binary);
    out << tok.serialized_model();
    if (!out) throw DataError("cannot write " + model_path);
    return tok;
  }
  size_t doc = 0, pos = 0;
  auto next_line = [&](std::string* line) {
    while (doc < train_docs.size()) {
      const std::string& t = train_docs[doc].text;
      if (pos >= t.size()) {
        ++doc;
        pos = 0;
        continue;
      }
      size_t end = t.find('\n', pos);
      if (end == std::string::npos) end = t.size();
      line->assign(t, pos, end - pos);
      pos = end + 1;
      if (!line->empty()) return true;
    }
    return false;
  };
  TokenizerTrainOptions to;
  to.vocab_size = o.vocab_size();
  to.max_sentences = o.tokenizer_sentences();
  to.seed = o.seed();
  to.num_threads =
      o.threads() > 0 ? o.threads() : std::max(1u, std::thread::hardware_concurrency());
  if (o.progress()) {
    std::fprintf(stderr, "gbmoe-data: training a BPE tokenizer, vocabulary %lld\n",
                 static_cast<long long>(o.vocab_size()));
  }
  try {
    return Tokenizer::train(next_line, model_path, to);
  } catch (const DataError& e) {
    throw DataError(std::string(e.what()) + " (--vocab-size " + std::to_string(o.vocab_size()) +
                    "; a smaller value may fit this corpus)");
  }
}

// Tokenizes one split in blocks (threads encode a block, then it is written in order) into the
// staging directory; adds the token counts to the summary and advances the progress line.
void write_split(const std::vector<SourceDoc>& docs, const std::string& split,
                 const fs::path& staging, const Corpus& corpus, const Tokenizer& tok, int threads,
                 DataBuildSummary& summary, Progress& progress, int64_t& done) {
  TokenFileWriter writer(staging.string(), split, summary.vocab_size, corpus.domains);
  const int eos = tok.eos_id();
  const size_t block = 256;
  std::vector<std::vector<int>> ids(block);
  for (size_t b0 = 0; b0 < docs.size(); b0 += block) {
    const size_t n = std::min(block, docs.size() - b0);
    std::atomic<size_t> next{0};
    auto work = [&] {
      for (size_t i = next++; i < n; i = next++) {
        ids[i] = tok.encode(docs[b0 + i].text);
        if (eos >= 0) ids[i].push_back(eos);
      }
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
    for (size_t i = 0; i < n; ++i) {
      const auto& doc = docs[b0 + i];
      writer.add_document(doc.domain, ids[i]);
      auto& ds = summary.domains[static_cast<size_t>(doc.domain)];
      (split == "train" ? ds.train_tokens : ds.val_tokens) += static_cast<int64_t>(ids[i].size());
    }
    done += static_cast<int64_t>(n);
    progress.update(done);
  }
  writer.commit();
}

}  // namespace

DataBuildSummary build_dataset(const DataBuildOptions& o) {
  const auto t_start = Clock::now();
  o.validate();
  const Corpus corpus = find_corpus(o.input());
  const fs::path staging = prepare_output(o);
  struct StagingGuard {
    fs::path dir;
    ~StagingGuard() {
      std::error_code ec;
      if (!dir.empty()) fs::remove_all(dir, ec);
    }
  } guard{staging};

  DataBuildSummary summary;
  const SplitDocs docs = read_documents(o, corpus, summary);

  const auto t_tok = Clock::now();
  const Tokenizer tok = make_tokenizer(o, docs.train, (staging / "tokenizer.model").string());
  summary.vocab_size = tok.vocab_size();
  summary.token_bytes = static_cast<int>(token_bytes_for_vocab(summary.vocab_size));
  summary.tokenizer_seconds = seconds_since(t_tok);

  const auto t_enc = Clock::now();
  const int threads = o.threads() > 0
                          ? o.threads()
                          : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  Progress progress(o.progress(), static_cast<int64_t>(docs.train.size() + docs.val.size()));
  int64_t done = 0;
  write_split(docs.train, "train", staging, corpus, tok, threads, summary, progress, done);
  write_split(docs.val, "val", staging, corpus, tok, threads, summary, progress, done);
  progress.update(done, true);
  summary.tokenize_seconds = seconds_since(t_enc);

  write_meta(staging / "meta.json", o, summary, tok);
  publish(staging, o.output());
  guard.dir.clear();
  summary.total_seconds = seconds_since(t_start);
  return summary;
}

std::string format_summary(const DataBuildSummary& s) {
  std::ostringstream out;
  out << std::left << std::setw(14) << "domain" << std::right << std::setw(8) << "files"
      << std::setw(12) << "MB" << std::setw(12) << "train docs" << std::setw(14) << "train tokens"
      << std::setw(10) << "val docs" << std::setw(12) << "val tokens" << std::setw(12)
      << "bytes/token"
      << "\n";
  DomainSummary total;
  total.name = "total";
  auto row = [&](const DomainSummary& d) {
    const int64_t tokens = d.train_tokens + d.val_tokens;
    out << std::left << std::setw(14) << d.name << std::right << std::setw(8) << d.files
        << std::setw(12) << std::fixed << std::setprecision(2) << d.bytes / 1e6 << std::setw(12)
        << d.train_documents << std::setw(14) << d.train_tokens << std::setw(10) << d.val_documents
        << std::setw(12) << d.val_tokens << std::setw(12) << std::setprecision(2)
        << static_cast<double>(d.bytes) / std::max<int64_t>(tokens, 1) << "\n";
  };
  for (const auto& d : s.domains) {
    row(d);
    total.files += d.files;
    total.bytes += d.bytes;
    total.train_documents += d.train_documents;
    total.val_documents += d.val_documents;
    total.train_tokens += d.train_tokens;
    total.val_tokens += d.val_tokens;
  }
  row(total);
  out << "vocabulary " << s.vocab_size << " (uint" << 8 * s.token_bytes << " tokens), tokenizer "
      << std::setprecision(1) << s.tokenizer_seconds << " s, tokenizing " << s.tokenize_seconds
      << " s, total " << s.total_seconds << " s\n";
  return out.str();
}

}  // namespace gbmoe
