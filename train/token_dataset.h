// Token shards on disk: the .bin/.idx file format written by gbmoe-data, its writer, and the
// validating, memory-mapped reader TokenDataset.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace gbmoe {

/// Thrown for bad data files and bad data-tool settings. The message names the file or the
/// setting, the value found and what to do about it.
class DataError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// One document of a split: its domain and where its tokens lie in the split's .bin file.
struct Document {
  int64_t domain = 0;  // index into domain_names()
  int64_t offset = 0;  // first token, counted in tokens from the start of the .bin file
  int64_t length = 0;  // number of tokens, the trailing end-of-document token included
};

/// Everything a split's .idx file says about its .bin file.
///
/// Layout (little-endian): magic "GBMOEIDX", u32 version, u32 token_bytes (2 or 4), u64 vocab_size,
/// u64 num_domains, then per domain (u32 length, UTF-8 name), u64 num_documents, then per
/// document (u32 domain, u64 offset, u64 length), u64 total_tokens, u64 FNV-1a checksum of the
/// .bin bytes, u64 FNV-1a checksum of every preceding .idx byte.
struct TokenIndex {
  static constexpr char kMagic[9] = "GBMOEIDX";
  static constexpr uint32_t kVersion = 1;

  uint32_t token_bytes = 2;  // 2: uint16 tokens (vocab_size <= 65535), 4: uint32 tokens
  int64_t vocab_size = 0;
  std::vector<std::string> domain_names;
  std::vector<Document> documents;  // contiguous: each starts where the previous one ends
  int64_t total_tokens = 0;
  uint64_t bin_checksum = 0;

  /// Serializes the index; the trailing checksum is computed here.
  std::string serialize() const;
  /// Parses and checks an index; `path` only names the file in error messages.
  static TokenIndex parse(const std::string& bytes, const std::string& path);
};

/// Token width on disk for a vocabulary: 2 bytes while every id fits in uint16, else 4.
uint32_t token_bytes_for_vocab(int64_t vocab_size);

/// 64-bit FNV-1a, continued from `hash` (start with the default).
uint64_t fnv1a64(const void* data, size_t size, uint64_t hash = 0xcbf29ce484222325ULL);

/// Writes one split as `<dir>/<split>.bin` and `<dir>/<split>.idx`, each first under a temporary
/// name; commit() renames the .bin and then the .idx into place, so a split that looks complete
/// (has an .idx) is complete. An uncommitted writer removes its temporary files.
///
/// Example:
///   TokenFileWriter w(dir, "train", vocab_size, {"code", "prose"});
///   w.add_document(0, ids);
///   w.commit();
class TokenFileWriter {
 public:
  TokenFileWriter(std::string dir, std::string split, int64_t vocab_size,
                  std::vector<std::string> domain_names);
  ~TokenFileWriter();
  TokenFileWriter(const TokenFileWriter&) = delete;
  TokenFileWriter& operator=(const TokenFileWriter&) = delete;

  /// Appends one document of `domain` with these token ids (each in [0, vocab_size)).
  void add_document(int64_t domain, const std::vector<int>& ids);
  /// Flushes, writes the index and renames both files into place.
  void commit();

  const TokenIndex& index() const { return index_; }

 private:
  std::string bin_path_, idx_path_, bin_tmp_, idx_tmp_;
  TokenIndex index_;
  std::FILE* bin_ = nullptr;
  bool committed_ = false;
};

/// One split (train or val) of a dataset written by gbmoe-data, memory-mapped read-only.
/// open() checks the .idx (magic, version, checksum, document table) and the .bin against it
/// (size, and, unless verify_checksum is false, the checksum and that every token id is below
/// the vocabulary), and throws DataError naming the file and what is wrong.
///
/// Example:
///   auto train = TokenDataset::open("data/corpus", "train");
///   Document d = train.document(0);
///   torch::Tensor ids = train.tokens(d.offset, d.length);  // (d.length,) int64
class TokenDataset {
 public:
  static TokenDataset open(const std::string& dir, const std::string& split,
                           bool verify_checksum = true);

  TokenDataset(TokenDataset&&) noexcept;
  TokenDataset& operator=(TokenDataset&&) noexcept;
  ~TokenDataset();

  int64_t num_domains() const { return static_cast<int64_t>(index_.domain_names.size()); }
  const std::vector<std::string>& domain_names() const { return index_.domain_names; }
  int64_t num_documents() const { return static_cast<int64_t>(index_.documents.size()); }
  const Document& document(int64_t i) const;
  const std::vector<Document>& documents() const { return index_.documents; }
  int64_t num_tokens() const { return index_.total_tokens; }
  int64_t vocab_size() const { return index_.vocab_size; }
  uint32_t token_bytes() const { return index_.token_bytes; }
  const std::string& bin_path() const { return bin_path_; }

  /// Tokens [offset, offset + length) as a (length,) int64 tensor.
  torch::Tensor tokens(int64_t offset, int64_t length) const;
  /// Copies tokens [offset, offset + length) into out[0, length) as int64.
  void copy_tokens(int64_t offset, int64_t length, int64_t* out) const;

 private:
  TokenDataset() = default;
  void unmap();
  static void check_token_ids(const TokenDataset& ds);

  std::string bin_path_;
  TokenIndex index_;
  const unsigned char* data_ = nullptr;  // the mapped .bin file
  size_t mapped_bytes_ = 0;
};

/// Throws DataError naming dir and both lists when the train and val splits of a dataset do
/// not hold the same domains in the same order, or naming the domain and the file when a
/// domain has fewer than 2 tokens in a split (a domain without validation data would drop out
/// of evaluation unseen).
///
/// Example:
///   check_same_domains(train, val, config.data.dir);
void check_same_domains(const TokenDataset& train, const TokenDataset& val, const std::string& dir);

}  // namespace gbmoe
