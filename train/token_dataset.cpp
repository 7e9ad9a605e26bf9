// Token shards: index (de)serialization with checks, the atomic split writer, the mmap reader.
#include "train/token_dataset.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "gbmoe token files are little-endian and read in place");

namespace gbmoe {
namespace {

const char* kRebuild = "; rebuild it with gbmoe-data";

template <typename T>
void put(std::string& out, T value) {
  out.append(reinterpret_cast<const char*>(&value), sizeof(T));
}

// Reads fixed-size fields from an index, naming the field and the byte offset when it runs out.
class Reader {
 public:
  Reader(const std::string& bytes, const std::string& path) : bytes_(bytes), path_(path) {}

  template <typename T>
  T get(const char* field) {
    need(sizeof(T), field);
    T value;
    std::memcpy(&value, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return value;
  }
  std::string get_string(size_t n, const char* field) {
    need(n, field);
    std::string s = bytes_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  size_t pos() const { return pos_; }
  size_t remaining() const { return bytes_.size() - pos_; }

 private:
  void need(size_t n, const char* field) {
    if (bytes_.size() - pos_ < n) {
      std::ostringstream msg;
      msg << path_ << " is truncated: it ends at byte " << bytes_.size() << " while reading "
          << field << " (at byte " << pos_ << ", " << n << " bytes)" << kRebuild;
      throw DataError(msg.str());
    }
  }
  const std::string& bytes_;
  const std::string& path_;
  size_t pos_ = 0;
};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DataError(path + " cannot be opened: " + std::strerror(errno) + kRebuild);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

uint32_t token_bytes_for_vocab(int64_t vocab_size) { return vocab_size <= 65535 ? 2 : 4; }

uint64_t fnv1a64(const void* data, size_t size, uint64_t hash) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < size; ++i) {
    hash ^= p[i];
    hash *= 0x100000001b3ULL;
  }
  return hash;
}

std::string TokenIndex::serialize() const {
  std::string out(kMagic, 8);
  put<uint32_t>(out, kVersion);
  put<uint32_t>(out, token_bytes);
  put<uint64_t>(out, static_cast<uint64_t>(vocab_size));
  put<uint64_t>(out, domain_names.size());
  for (const auto& name : domain_names) {
    put<uint32_t>(out, static_cast<uint32_t>(name.size()));
    out += name;
  }
  put<uint64_t>(out, documents.size());
  for (const auto& d : documents) {
    put<uint32_t>(out, static_cast<uint32_t>(d.domain));
    put<uint64_t>(out, static_cast<uint64_t>(d.offset));
    put<uint64_t>(out, static_cast<uint64_t>(d.length));
  }
  put<uint64_t>(out, static_cast<uint64_t>(total_tokens));
  put<uint64_t>(out, bin_checksum);
  put<uint64_t>(out, fnv1a64(out.data(), out.size()));
  return out;
}

namespace {

// The magic number, the format version and the trailing checksum, before any count is trusted.
void check_index_header(Reader& r, const std::string& bytes, const std::string& path) {
  const std::string magic = r.get_string(8, "the magic number");
  if (magic != std::string(TokenIndex::kMagic, 8)) {
    std::string shown;
    for (char c : magic) shown += (c >= 32 && c < 127) ? c : '?';
    throw DataError(path + " has magic \"" + shown + "\", expected \"" + TokenIndex::kMagic +
                    "\": it is not a gbmoe token index or it is corrupt" + kRebuild);
  }
  const auto version = r.get<uint32_t>("the format version");
  if (version != TokenIndex::kVersion) {
    throw DataError(path + " has format version " + std::to_string(version) +
                    " but this build reads version " + std::to_string(TokenIndex::kVersion) +
                    kRebuild);
  }
  if (bytes.size() >= 16) {
    uint64_t stored;
    std::memcpy(&stored, bytes.data() + bytes.size() - 8, 8);
    if (stored != fnv1a64(bytes.data(), bytes.size() - 8)) {
      throw DataError(path + " fails its checksum: the file is truncated or corrupt" + kRebuild);
    }
  }
}

// The token width, the vocabulary and the domain names.
void read_index_vocabulary(Reader& r, size_t file_bytes, const std::string& path, TokenIndex& idx) {
  idx.token_bytes = r.get<uint32_t>("the token width");
  if (idx.token_bytes != 2 && idx.token_bytes != 4) {
    throw DataError(path + " says tokens are " + std::to_string(idx.token_bytes) +
                    " bytes wide; only 2 (uint16) and 4 (uint32) exist" + kRebuild);
  }
  idx.vocab_size = static_cast<int64_t>(r.get<uint64_t>("the vocabulary size"));
  if (idx.token_bytes == 2 && idx.vocab_size > 65536) {
    throw DataError(path + " stores uint16 tokens for a vocabulary of " +
                    std::to_string(idx.vocab_size) + " (more than 65536)" + kRebuild);
  }
  const auto num_domains = r.get<uint64_t>("the domain count");
  if (num_domains == 0 || num_domains > r.remaining() / 4) {
    throw DataError(path + " says it has " + std::to_string(num_domains) +
                    " domains, which cannot be right for a file of " + std::to_string(file_bytes) +
                    " bytes" + kRebuild);
  }
  for (uint64_t d = 0; d < num_domains; ++d) {
    const auto n = r.get<uint32_t>("a domain name length");
    idx.domain_names.push_back(r.get_string(n, "a domain name"));
  }
}

// The documents, each of a known domain and following the previous one; returns their tokens.
int64_t read_index_documents(Reader& r, const std::string& path, TokenIndex& idx) {
  const auto num_domains = static_cast<int64_t>(idx.domain_names.size());
  const auto num_docs = r.get<uint64_t>("the document count");
  if (num_docs > r.remaining() / 20) {
    throw DataError(path + " says it has " + std::to_string(num_docs) + " documents but only " +
                    std::to_string(r.remaining()) + " bytes remain: the file is truncated" +
                    kRebuild);
  }
  idx.documents.resize(num_docs);
  int64_t next_offset = 0;
  for (uint64_t i = 0; i < num_docs; ++i) {
    Document& d = idx.documents[i];
    d.domain = r.get<uint32_t>("a document's domain");
    d.offset = static_cast<int64_t>(r.get<uint64_t>("a document's offset"));
    d.length = static_cast<int64_t>(r.get<uint64_t>("a document's length"));
    if (d.domain >= num_domains || d.offset != next_offset || d.length <= 0) {
      throw DataError(
          path + ": document " + std::to_string(i) + " (domain " + std::to_string(d.domain) +
          ", offset " + std::to_string(d.offset) + ", length " + std::to_string(d.length) +
          ") is inconsistent: expected a domain below " + std::to_string(num_domains) +
          ", offset " + std::to_string(next_offset) + " and a positive length" + kRebuild);
    }
    next_offset += d.length;
  }
  return next_offset;
}

}  // namespace

TokenIndex TokenIndex::parse(const std::string& bytes, const std::string& path) {
  Reader r(bytes, path);
  check_index_header(r, bytes, path);
  TokenIndex idx;
  read_index_vocabulary(r, bytes.size(), path, idx);
  const int64_t document_tokens = read_index_documents(r, path, idx);
  idx.total_tokens = static_cast<int64_t>(r.get<uint64_t>("the total token count"));
  idx.bin_checksum = r.get<uint64_t>("the token file checksum");
  r.get<uint64_t>("the index checksum");
  if (r.remaining() != 0) {
    throw DataError(path + " has " + std::to_string(r.remaining()) +
                    " unexpected bytes after its end at byte " + std::to_string(r.pos()) +
                    kRebuild);
  }
  if (idx.total_tokens != document_tokens) {
    throw DataError(path + " says it holds " + std::to_string(idx.total_tokens) +
                    " tokens but its documents add up to " + std::to_string(document_tokens) +
                    kRebuild);
  }
  return idx;
}

// ---------------------------------------------------------------------------------------------
// TokenFileWriter

TokenFileWriter::TokenFileWriter(std::string dir, std::string split, int64_t vocab_size,
                                 std::vector<std::string> domain_names) {
  bin_path_ = dir + "/" + split + ".bin";
  idx_path_ = dir + "/" + split + ".idx";
  bin_tmp_ = bin_path_ + ".tmp";
  idx_tmp_ = idx_path_ + ".tmp";
  index_.vocab_size = vocab_size;
  index_.token_bytes = token_bytes_for_vocab(vocab_size);
  index_.domain_names = std::move(domain_names);
  index_.bin_checksum = fnv1a64(nullptr, 0);
  bin_ = std::fopen(bin_tmp_.c_str(), "wb");
  if (!bin_) throw DataError("cannot write " + bin_tmp_ + ": " + std::strerror(errno));
}

TokenFileWriter::~TokenFileWriter() {
  if (bin_) std::fclose(bin_);
  if (!committed_) {
    std::remove(bin_tmp_.c_str());
    std::remove(idx_tmp_.c_str());
  }
}

void TokenFileWriter::add_document(int64_t domain, const std::vector<int>& ids) {
  if (committed_) throw DataError("add_document on " + bin_path_ + " after commit()");
  if (domain < 0 || domain >= static_cast<int64_t>(index_.domain_names.size())) {
    throw DataError("document domain " + std::to_string(domain) + " is not below the " +
                    std::to_string(index_.domain_names.size()) + " domains of " + bin_path_);
  }
  if (ids.empty()) throw DataError("empty document for " + bin_path_);
  std::string buf(ids.size() * index_.token_bytes, '\0');
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= index_.vocab_size) {
      throw DataError("token id " + std::to_string(ids[i]) + " is outside the vocabulary [0, " +
                      std::to_string(index_.vocab_size) + ") for " + bin_path_);
    }
    if (index_.token_bytes == 2) {
      const auto v = static_cast<uint16_t>(ids[i]);
      std::memcpy(&buf[2 * i], &v, 2);
    } else {
      const auto v = static_cast<uint32_t>(ids[i]);
      std::memcpy(&buf[4 * i], &v, 4);
    }
  }
  if (std::fwrite(buf.data(), 1, buf.size(), bin_) != buf.size()) {
    throw DataError("cannot write " + bin_tmp_ + ": " + std::strerror(errno));
  }
  index_.bin_checksum = fnv1a64(buf.data(), buf.size(), index_.bin_checksum);
  const int64_t n = static_cast<int64_t>(ids.size());
  index_.documents.push_back({domain, index_.total_tokens, n});
  index_.total_tokens += n;
}

void TokenFileWriter::commit() {
  if (committed_) return;
  if (std::fflush(bin_) != 0 || fsync(fileno(bin_)) != 0 || std::fclose(bin_) != 0) {
    bin_ = nullptr;
    throw DataError("cannot write " + bin_tmp_ + ": " + std::strerror(errno));
  }
  bin_ = nullptr;
  const std::string idx = index_.serialize();
  {
    std::ofstream out(idx_tmp_, std::ios::binary | std::ios::trunc);
    out.write(idx.data(), static_cast<std::streamsize>(idx.size()));
    out.flush();
    if (!out) throw DataError("cannot write " + idx_tmp_ + ": " + std::strerror(errno));
  }
  if (std::rename(bin_tmp_.c_str(), bin_path_.c_str()) != 0) {
    throw DataError("cannot rename " + bin_tmp_ + " to " + bin_path_ + ": " + std::strerror(errno));
  }
  if (std::rename(idx_tmp_.c_str(), idx_path_.c_str()) != 0) {
    throw DataError("cannot rename " + idx_tmp_ + " to " + idx_path_ + ": " + std::strerror(errno));
  }
  committed_ = true;
}

// ---------------------------------------------------------------------------------------------
// TokenDataset

namespace {

// Every token id of a split below its vocabulary: an id beyond it would fail as an embedding
// lookup in the middle of training instead of here, with the file named.
template <typename T>
void check_ids(const unsigned char* data, int64_t n, int64_t vocab, const std::string& path) {
  T max_id = 0;
  int64_t at = 0;
  for (int64_t i = 0; i < n; ++i) {
    T id;
    std::memcpy(&id, data + i * sizeof(T), sizeof(T));
    if (id > max_id) max_id = id, at = i;
  }
  if (n > 0 && static_cast<int64_t>(max_id) >= vocab) {
    throw DataError(path + " holds token id " + std::to_string(max_id) + " (token " +
                    std::to_string(at) + ") outside its vocabulary of " + std::to_string(vocab) +
                    " ids: the file does not belong to this index" + kRebuild);
  }
}

}  // namespace

void TokenDataset::check_token_ids(const TokenDataset& ds) {
  if (ds.index_.token_bytes == 2) {
    check_ids<uint16_t>(ds.data_, ds.index_.total_tokens, ds.index_.vocab_size, ds.bin_path_);
  } else {
    check_ids<uint32_t>(ds.data_, ds.index_.total_tokens, ds.index_.vocab_size, ds.bin_path_);
  }
}

void check_same_domains(const TokenDataset& train, const TokenDataset& val,
                        const std::string& dir) {
  if (train.domain_names() == val.domain_names()) {
    for (const auto* split : {&train, &val}) {
      std::vector<int64_t> tokens(split->domain_names().size(), 0);
      for (const auto& d : split->documents()) tokens[d.domain] += d.length;
      for (size_t d = 0; d < tokens.size(); ++d) {
        // A window needs an input and a target token.
        if (tokens[d] < 2) {
          throw DataError("data.dir (" + dir + "): domain " + split->domain_names()[d] + " has " +
                          std::to_string(tokens[d]) + " tokens in " + split->bin_path() +
                          ", too few to train or evaluate on; give it more documents or "
                          "rebuild the dataset with a larger --val-fraction");
        }
      }
    }
    return;
  }
  std::string train_names, val_names;
  for (const auto& d : train.domain_names()) train_names += (train_names.empty() ? "" : ", ") + d;
  for (const auto& d : val.domain_names()) val_names += (val_names.empty() ? "" : ", ") + d;
  throw DataError("data.dir (" + dir + "): the train split has domains [" + train_names +
                  "] but the val split [" + val_names +
                  "]: every domain needs validation data; rebuild the dataset with gbmoe-data");
}

TokenDataset TokenDataset::open(const std::string& dir, const std::string& split,
                                bool verify_checksum) {
  if (split != "train" && split != "val") {
    throw DataError("split \"" + split + "\" must be train or val");
  }
  const std::string idx_path = dir + "/" + split + ".idx";
  TokenDataset ds;
  ds.bin_path_ = dir + "/" + split + ".bin";
  ds.index_ = TokenIndex::parse(read_file(idx_path), idx_path);

  const int fd = ::open(ds.bin_path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    throw DataError(ds.bin_path_ + " cannot be opened: " + std::strerror(errno) + kRebuild);
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const std::string err = std::strerror(errno);
    ::close(fd);
    throw DataError(ds.bin_path_ + " cannot be read: " + err);
  }
  const auto tb = static_cast<int64_t>(ds.index_.token_bytes);
  const int64_t expected = ds.index_.total_tokens * tb;
  const int64_t size = static_cast<int64_t>(st.st_size);
  if (size != expected) {
    ::close(fd);
    std::ostringstream msg;
    msg << ds.bin_path_ << " holds " << size / tb << " tokens";
    if (size % tb) msg << " and " << size % tb << " stray bytes";
    msg << " but " << idx_path << " says " << ds.index_.total_tokens << ": the file is "
        << (size < expected ? "truncated" : "too long (mixed with another build?)") << kRebuild;
    throw DataError(msg.str());
  }
  if (size > 0) {
    void* p = mmap(nullptr, static_cast<size_t>(size), PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      const std::string err = std::strerror(errno);
      ::close(fd);
      throw DataError(ds.bin_path_ + " cannot be mapped: " + err);
    }
    ds.data_ = static_cast<const unsigned char*>(p);
    ds.mapped_bytes_ = static_cast<size_t>(size);
  }
  ::close(fd);
  if (verify_checksum && fnv1a64(ds.data_, ds.mapped_bytes_) != ds.index_.bin_checksum) {
    throw DataError(ds.bin_path_ + " does not match the checksum in " + idx_path +
                    ": the file is corrupt or from another build" + kRebuild);
  }
  if (verify_checksum) check_token_ids(ds);
  return ds;
}

TokenDataset::TokenDataset(TokenDataset&& other) noexcept { *this = std::move(other); }

TokenDataset& TokenDataset::operator=(TokenDataset&& other) noexcept {
  if (this != &other) {
    unmap();
    bin_path_ = std::move(other.bin_path_);
    index_ = std::move(other.index_);
    data_ = other.data_;
    mapped_bytes_ = other.mapped_bytes_;
    other.data_ = nullptr;
    other.mapped_bytes_ = 0;
  }
  return *this;
}

TokenDataset::~TokenDataset() { unmap(); }

void TokenDataset::unmap() {
  if (data_) munmap(const_cast<unsigned char*>(data_), mapped_bytes_);
  data_ = nullptr;
  mapped_bytes_ = 0;
}

const Document& TokenDataset::document(int64_t i) const {
  TORCH_CHECK(i >= 0 && i < num_documents(), "document index (", i, ") must be in [0, ",
              num_documents(), ") for ", bin_path_);
  return index_.documents[static_cast<size_t>(i)];
}

void TokenDataset::copy_tokens(int64_t offset, int64_t length, int64_t* out) const {
  TORCH_CHECK(offset >= 0 && length >= 0 && offset + length <= index_.total_tokens, "token range [",
              offset, ", ", offset + length, ") is outside [0, ", index_.total_tokens, ") of ",
              bin_path_);
  if (index_.token_bytes == 2) {
    const unsigned char* p = data_ + 2 * offset;
    for (int64_t i = 0; i < length; ++i) {
      uint16_t v;
      std::memcpy(&v, p + 2 * i, 2);
      out[i] = v;
    }
  } else {
    const unsigned char* p = data_ + 4 * offset;
    for (int64_t i = 0; i < length; ++i) {
      uint32_t v;
      std::memcpy(&v, p + 4 * i, 4);
      out[i] = v;
    }
  }
}

torch::Tensor TokenDataset::tokens(int64_t offset, int64_t length) const {
  auto t = torch::empty({length}, torch::kLong);
  copy_tokens(offset, length, t.data_ptr<int64_t>());
  return t;
}

}  // namespace gbmoe
