// Routing traces: the binary writer and reader of routing_trace.h and the frequencies from them.
#include "train/routing_trace.h"

#include <filesystem>
#include <iomanip>
#include <sstream>
#include <stdexcept>

namespace gbmoe {
namespace fs = std::filesystem;
namespace {

constexpr char kMagic[8] = {'G', 'B', 'M', 'O', 'E', 'R', 'T', '1'};
constexpr uint32_t kVersion = 1;
constexpr int64_t kMaxId = 65536;

template <class T>
void put(std::string& out, T v) {
  for (size_t i = 0; i < sizeof(T); ++i) {
    out.push_back(static_cast<char>((static_cast<uint64_t>(v) >> (8 * i)) & 0xFF));
  }
}

std::string encode_header(const RoutingTraceHeader& h) {
  std::string out(kMagic, sizeof kMagic);
  put<uint32_t>(out, kVersion);
  put<uint32_t>(out, static_cast<uint32_t>(h.num_experts));
  put<uint32_t>(out, static_cast<uint32_t>(h.top_k));
  put<uint32_t>(out, static_cast<uint32_t>(h.num_layers));
  put<uint32_t>(out, static_cast<uint32_t>(h.domains.size()));
  for (const auto& d : h.domains) {
    put<uint32_t>(out, static_cast<uint32_t>(d.size()));
    out += d;
  }
  return out;
}

// Reads little-endian fields of one file, naming the file and offset when it runs short.
class Reader {
 public:
  explicit Reader(const std::string& path) : path_(path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot read routing trace " + path);
    std::ostringstream s;
    s << in.rdbuf();
    data_ = s.str();
  }
  bool done() const { return pos_ >= data_.size(); }
  size_t offset() const { return pos_; }
  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("routing trace " + path_ + " at byte " + std::to_string(pos_) + ": " +
                             what);
  }
  template <class T>
  T get() {
    need(sizeof(T), "field");
    uint64_t v = 0;
    for (size_t i = 0; i < sizeof(T); ++i) {
      v |= static_cast<uint64_t>(static_cast<unsigned char>(data_[pos_ + i])) << (8 * i);
    }
    pos_ += sizeof(T);
    return static_cast<T>(v);
  }
  std::string bytes(size_t n) {
    need(n, "string");
    auto s = data_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  // n little-endian uint16 as int64.
  torch::Tensor uint16s(int64_t n) {
    need(static_cast<size_t>(n) * 2, "id array");
    auto t = torch::empty({n}, torch::kLong);
    auto* p = t.data_ptr<int64_t>();
    const auto* b = reinterpret_cast<const unsigned char*>(data_.data() + pos_);
    for (int64_t i = 0; i < n; ++i) p[i] = b[2 * i] | (b[2 * i + 1] << 8);
    pos_ += static_cast<size_t>(n) * 2;
    return t;
  }

 private:
  void need(size_t n, const char* what) const {
    if (data_.size() - pos_ < n) {
      fail(std::string("truncated ") + what + " (" + std::to_string(n) + " bytes needed, " +
           std::to_string(data_.size() - pos_) + " left)");
    }
  }
  std::string path_;
  std::string data_;
  size_t pos_ = 0;
};

RoutingTraceHeader read_header(Reader& r) {
  if (r.bytes(sizeof kMagic) != std::string(kMagic, sizeof kMagic))
    r.fail("not a gbmoe routing trace (bad magic)");
  const auto version = r.get<uint32_t>();
  if (version != kVersion)
    r.fail("version " + std::to_string(version) + ", this reader knows " +
           std::to_string(kVersion));
  RoutingTraceHeader h;
  h.num_experts = r.get<uint32_t>();
  h.top_k = r.get<uint32_t>();
  h.num_layers = r.get<uint32_t>();
  const auto M = r.get<uint32_t>();
  for (uint32_t d = 0; d < M; ++d) h.domains.push_back(r.bytes(r.get<uint32_t>()));
  return h;
}

}  // namespace

bool RoutingTraceHeader::operator==(const RoutingTraceHeader& o) const {
  return num_experts == o.num_experts && top_k == o.top_k && num_layers == o.num_layers &&
         domains == o.domains;
}

RoutingTraceWriter::RoutingTraceWriter(const std::string& path, RoutingTraceHeader header,
                                       bool append)
    : path_(path), header_(std::move(header)) {
  TORCH_CHECK(header_.num_experts >= 1 && header_.num_experts <= kMaxId,
              "routing trace: num_experts (", header_.num_experts, ") must be in [1, ", kMaxId,
              "]");
  TORCH_CHECK(header_.top_k >= 1 && header_.top_k <= header_.num_experts, "routing trace: top_k (",
              header_.top_k, ") must be in [1, num_experts (", header_.num_experts, ")]");
  TORCH_CHECK(static_cast<int64_t>(header_.domains.size()) <= kMaxId,
              "routing trace: ", header_.domains.size(), " domains, at most ", kMaxId);
  const auto parent = fs::path(path).parent_path();
  if (!parent.empty()) fs::create_directories(parent);
  bool keep = false;
  if (append && fs::exists(path) && fs::file_size(path) > 0) {
    Reader r(path);
    keep = read_header(r) == header_;
  }
  out_.open(path, std::ios::binary | (keep ? std::ios::app : std::ios::trunc));
  TORCH_CHECK(out_, "cannot write routing trace ", path);
  if (!keep) out_ << encode_header(header_);
  out_.flush();
}

void RoutingTraceWriter::add(int64_t step, int64_t rank, int64_t micro_batch, int64_t layer,
                             const torch::Tensor& expert_ids_TK, const torch::Tensor& domain_T,
                             const torch::Tensor& valid_T) {
  torch::NoGradGuard no_grad;
  const int64_t K = header_.top_k;
  TORCH_CHECK(expert_ids_TK.dim() == 2 && expert_ids_TK.size(1) == K,
              "routing trace: expert_ids must be (T, ", K, "), got ", expert_ids_TK.sizes());
  const int64_t T = expert_ids_TK.size(0);
  TORCH_CHECK(domain_T.numel() == T, "routing trace: domain must have ", T, " entries, got ",
              domain_T.sizes());
  TORCH_CHECK(layer >= 0 && layer < header_.num_layers, "routing trace: layer (", layer,
              ") must be in [0, ", header_.num_layers, ")");
  auto ids = expert_ids_TK.to(torch::kCPU, torch::kLong);
  auto dom = domain_T.reshape({T}).to(torch::kCPU, torch::kLong);
  if (valid_T.defined()) {
    auto v = valid_T.reshape({T}).to(torch::kCPU, torch::kBool);
    ids = ids.index({v});
    dom = dom.index({v});
  }
  ids = ids.contiguous();
  dom = dom.contiguous();
  const int64_t N = dom.numel();
  if (N > 0) {
    TORCH_CHECK(ids.min().item<int64_t>() >= 0 && ids.max().item<int64_t>() < header_.num_experts,
                "routing trace: expert id outside [0, ", header_.num_experts, ")");
    TORCH_CHECK(dom.min().item<int64_t>() >= 0 &&
                    dom.max().item<int64_t>() < static_cast<int64_t>(header_.domains.size()),
                "routing trace: domain id outside [0, ", header_.domains.size(), ")");
  }
  std::string rec;
  rec.reserve(24 + static_cast<size_t>(N * (K + 1)) * 2);
  put<int64_t>(rec, step);
  put<uint32_t>(rec, static_cast<uint32_t>(rank));
  put<uint32_t>(rec, static_cast<uint32_t>(micro_batch));
  put<uint32_t>(rec, static_cast<uint32_t>(layer));
  put<uint32_t>(rec, static_cast<uint32_t>(N));
  const auto* d = dom.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) put<uint16_t>(rec, static_cast<uint16_t>(d[i]));
  const auto* e = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < N * K; ++i) put<uint16_t>(rec, static_cast<uint16_t>(e[i]));
  out_ << rec;
  out_.flush();
  TORCH_CHECK(out_, "cannot write routing trace ", path_);
}

void RoutingTraceWriter::add_forward(int64_t step, int64_t rank, int64_t micro_batch,
                                     const std::vector<RoutingResult>& routings,
                                     const Batch& batch) {
  const auto domain_T = batch.domain.reshape({-1, 1}).expand_as(batch.mask).reshape({-1});
  for (size_t l = 0; l < routings.size(); ++l) {
    const auto& r = routings[l];
    add(step, rank, micro_batch, static_cast<int64_t>(l), r.expert_ids, domain_T, r.valid);
  }
}

std::vector<std::string> routing_trace_files(const std::string& path) {
  if (fs::is_regular_file(path)) return {path};
  if (!fs::is_directory(path))
    throw std::invalid_argument("routing trace \"" + path + "\" is neither a file nor a directory");
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(path)) {
    if (e.is_regular_file() && e.path().extension() == ".gbrt") files.push_back(e.path().string());
  }
  std::sort(files.begin(), files.end());
  if (files.empty()) throw std::invalid_argument("no *.gbrt routing trace in \"" + path + "\"");
  return files;
}

RoutingTrace read_routing_trace(const std::vector<std::string>& paths) {
  TORCH_CHECK(!paths.empty(), "read_routing_trace: no files");
  RoutingTrace trace;
  for (size_t f = 0; f < paths.size(); ++f) {
    Reader r(paths[f]);
    const auto header = read_header(r);
    if (f == 0) {
      trace.header = header;
    } else if (!(header == trace.header)) {
      r.fail("header differs from that of " + paths[0] + " (another run?)");
    }
    const int64_t K = header.top_k, E = header.num_experts;
    const auto M = static_cast<int64_t>(header.domains.size());
    while (!r.done()) {
      RoutingTraceRecord rec;
      rec.step = r.get<int64_t>();
      rec.rank = r.get<uint32_t>();
      rec.micro_batch = r.get<uint32_t>();
      rec.layer = r.get<uint32_t>();
      const int64_t N = r.get<uint32_t>();
      if (rec.layer >= header.num_layers)
        r.fail("layer " + std::to_string(rec.layer) + " of " + std::to_string(header.num_layers));
      rec.domain = r.uint16s(N);
      rec.expert_ids = r.uint16s(N * K).reshape({N, K});
      if (N > 0 &&
          (rec.domain.max().item<int64_t>() >= M || rec.expert_ids.max().item<int64_t>() >= E))
        r.fail("domain or expert id out of range");
      trace.records.push_back(std::move(rec));
    }
  }
  return trace;
}

TraceSelection trace_selection(const RoutingTrace& trace, int64_t first_step, int64_t last_step) {
  const auto& h = trace.header;
  const auto M = static_cast<int64_t>(h.domains.size());
  TraceSelection s;
  for (int64_t l = 0; l < h.num_layers; ++l) {
    s.counts.push_back(torch::zeros({M, h.num_experts}, torch::kDouble));
    s.tokens.push_back(torch::zeros({M}, torch::kDouble));
  }
  for (const auto& rec : trace.records) {
    if (rec.step < first_step || (last_step >= 0 && rec.step > last_step)) continue;
    // Flat index d * E + i of each (token, k) pair.
    auto flat = (rec.domain.unsqueeze(1) * h.num_experts + rec.expert_ids).reshape({-1});
    s.counts[rec.layer].view({-1}).index_add_(0, flat, torch::ones({flat.numel()}, torch::kDouble));
    s.tokens[rec.layer].index_add_(0, rec.domain,
                                   torch::ones({rec.domain.numel()}, torch::kDouble));
  }
  return s;
}

std::string trace_selection_csv(const RoutingTrace& trace, const TraceSelection& selection) {
  std::ostringstream s;
  s << "layer,domain,expert,selections,frequency\n" << std::setprecision(9);
  const auto& h = trace.header;
  for (size_t l = 0; l < selection.counts.size(); ++l) {
    for (size_t d = 0; d < h.domains.size(); ++d) {
      const auto di = static_cast<int64_t>(d);
      const double n = selection.tokens[l][di].item<double>();
      for (int64_t i = 0; i < h.num_experts; ++i) {
        const double c = selection.counts[l][di][i].item<double>();
        s << l << "," << h.domains[d] << "," << i << "," << static_cast<int64_t>(c) << ","
          << (n > 0 ? c / n : 0.0) << "\n";
      }
    }
  }
  return s.str();
}

}  // namespace gbmoe
