// SequenceSampler: windows of documents, the seeded per-epoch shuffle, rank sharding, resume;
// and the per-domain validation batches.
#include "train/sampler.h"

#include <sstream>

namespace gbmoe {
namespace {

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Windows of S + 1 tokens at stride S; the last may be shorter (at least 2 tokens).
void append_windows(const TokenDataset& data, int64_t doc, int64_t seq_len,
                    std::vector<Window>& out) {
  const Document& d = data.document(doc);
  for (int64_t start = 0; start + 1 < d.length; start += seq_len) {
    out.push_back({doc, d.offset + start, std::min(seq_len + 1, d.length - start)});
  }
}

Batch empty_batch(int64_t rows, int64_t seq_len) {
  Batch b;
  b.inputs = torch::zeros({rows, seq_len}, torch::kLong);
  b.targets = torch::full({rows, seq_len}, -100, torch::kLong);
  b.mask = torch::zeros({rows, seq_len}, torch::kBool);
  b.domain = torch::zeros({rows}, torch::kLong);
  return b;
}

}  // namespace

void SamplerOptions::validate() const {
  TORCH_CHECK(seq_len() >= 1, "data seq_len (", seq_len(), ") must be >= 1");
  TORCH_CHECK(micro_batch_size() >= 1, "micro_batch_size (", micro_batch_size(), ") must be >= 1");
  TORCH_CHECK(world_size() >= 1, "sampler world_size (", world_size(), ") must be >= 1");
  TORCH_CHECK(rank() >= 0 && rank() < world_size(), "sampler rank (", rank(),
              ") must be in [0, world_size (", world_size(), "))");
}

std::string SamplerState::to_string() const {
  std::ostringstream s;
  s << "epoch=" << epoch << " position=" << position << " seed=" << seed << " seq_len=" << seq_len
    << " world_size=" << world_size << " num_windows=" << num_windows;
  return s.str();
}

SamplerState SamplerState::from_string(const std::string& text) {
  SamplerState st;
  std::istringstream in(text);
  std::string field;
  int found = 0;
  while (in >> field) {
    const auto eq = field.find('=');
    TORCH_CHECK(eq != std::string::npos, "sampler state \"", text, "\": \"", field,
                "\" is not key=value");
    const std::string key = field.substr(0, eq), value = field.substr(eq + 1);
    size_t used = 0;
    uint64_t v = 0;
    try {
      v = std::stoull(value, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    TORCH_CHECK(used == value.size() && !value.empty(), "sampler state \"", text, "\": ", key, " (",
                value, ") is not a non-negative integer");
    if (key == "epoch")
      st.epoch = static_cast<int64_t>(v);
    else if (key == "position")
      st.position = static_cast<int64_t>(v);
    else if (key == "seed")
      st.seed = v;
    else if (key == "seq_len")
      st.seq_len = static_cast<int64_t>(v);
    else if (key == "world_size")
      st.world_size = static_cast<int64_t>(v);
    else if (key == "num_windows")
      st.num_windows = static_cast<int64_t>(v);
    else
      TORCH_CHECK(false, "sampler state \"", text, "\": unknown key ", key);
    ++found;
  }
  TORCH_CHECK(found == 6, "sampler state \"", text, "\" needs epoch, position, seed, seq_len, ",
              "world_size and num_windows");
  return st;
}

bool SamplerState::operator==(const SamplerState& o) const {
  return epoch == o.epoch && position == o.position && seed == o.seed && seq_len == o.seq_len &&
         world_size == o.world_size && num_windows == o.num_windows;
}

SequenceSampler::SequenceSampler(std::shared_ptr<const TokenDataset> data, SamplerOptions options)
    : data_(std::move(data)), options_(std::move(options)) {
  options_.validate();
  TORCH_CHECK(data_, "SequenceSampler needs a dataset");
  for (int64_t i = 0; i < data_->num_documents(); ++i) {
    append_windows(*data_, i, options_.seq_len(), windows_);
  }
  TORCH_CHECK(num_windows() >= options_.world_size(), data_->bin_path(), " has ", num_windows(),
              " windows of seq_len + 1 (", options_.seq_len() + 1,
              ") tokens, fewer than world_size (", options_.world_size(),
              "): use more data or fewer ranks");
  order_ = epoch_order(0);
}

std::vector<int64_t> SequenceSampler::epoch_order(int64_t epoch) const {
  const int64_t n = num_windows();
  std::vector<int64_t> perm(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) perm[static_cast<size_t>(i)] = i;
  uint64_t state = options_.seed() * 0x9e3779b97f4a7c15ULL + static_cast<uint64_t>(epoch);
  splitmix64(state);
  for (int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<int64_t>(splitmix64(state) % static_cast<uint64_t>(i + 1));
    std::swap(perm[static_cast<size_t>(i)], perm[static_cast<size_t>(j)]);
  }
  const int64_t R = options_.world_size(), per_rank = windows_per_rank();
  std::vector<int64_t> mine(static_cast<size_t>(per_rank));
  for (int64_t i = 0; i < per_rank; ++i) {
    mine[static_cast<size_t>(i)] = perm[static_cast<size_t>(options_.rank() + i * R)];
  }
  return mine;
}

std::vector<Window> SequenceSampler::rank_windows(int64_t epoch) const {
  std::vector<Window> out;
  for (int64_t id : epoch_order(epoch)) out.push_back(windows_[static_cast<size_t>(id)]);
  return out;
}

Batch SequenceSampler::next_batch() {
  const int64_t B = options_.micro_batch_size();
  Batch batch = empty_batch(B, options_.seq_len());
  for (int64_t row = 0; row < B; ++row) {
    if (position_ == windows_per_rank()) {
      ++epoch_;
      position_ = 0;
      order_ = epoch_order(epoch_);
    }
    const Window& w = windows_[static_cast<size_t>(order_[static_cast<size_t>(position_++)])];
    fill_batch_row(*data_, w, data_->document(w.document).domain, row, batch);
  }
  return batch;
}

SamplerState SequenceSampler::state() const {
  SamplerState s;
  s.epoch = epoch_;
  s.position = position_;
  if (s.position == windows_per_rank()) {
    ++s.epoch;
    s.position = 0;
  }
  s.seed = options_.seed();
  s.seq_len = options_.seq_len();
  s.world_size = options_.world_size();
  s.num_windows = num_windows();
  return s;
}

void SequenceSampler::load_state(const SamplerState& s) {
  TORCH_CHECK(s.seed == options_.seed() && s.seq_len == options_.seq_len() &&
                  s.world_size == options_.world_size() && s.num_windows == num_windows(),
              "sampler state (", s.to_string(), ") was saved by a sampler with other settings ",
              "or data than this one (seed=", options_.seed(), " seq_len=", options_.seq_len(),
              " world_size=", options_.world_size(), " num_windows=", num_windows(),
              "): resume with the same data, seq_len, seed and number of data-parallel ranks");
  TORCH_CHECK(s.epoch >= 0 && s.position >= 0 && s.position < windows_per_rank(),
              "sampler state position (", s.position, ") must be in [0, ", windows_per_rank(), ")");
  if (s.epoch != epoch_) order_ = epoch_order(s.epoch);
  epoch_ = s.epoch;
  position_ = s.position;
}

void SequenceSampler::skip_to_step(int64_t step) {
  TORCH_CHECK(step >= 0, "skip_to_step step (", step, ") must be >= 0");
  const int64_t drawn = step * options_.micro_batch_size();
  SamplerState s = state();
  s.epoch = drawn / windows_per_rank();
  s.position = drawn % windows_per_rank();
  load_state(s);
}

void fill_batch_row(const TokenDataset& data, const Window& w, int64_t domain, int64_t row,
                    Batch& batch) {
  const int64_t S = batch.inputs.size(1);
  TORCH_CHECK(w.length >= 2 && w.length <= S + 1, "window length (", w.length,
              ") must be in [2, seq_len + 1 (", S + 1, ")]");
  std::vector<int64_t> buf(static_cast<size_t>(w.length));
  data.copy_tokens(w.offset, w.length, buf.data());
  const int64_t n = w.length - 1;  // real targets
  auto* in = batch.inputs[row].data_ptr<int64_t>();
  auto* tg = batch.targets[row].data_ptr<int64_t>();
  auto* m = batch.mask[row].data_ptr<bool>();
  for (int64_t i = 0; i < n; ++i) {
    in[i] = buf[static_cast<size_t>(i)];
    tg[i] = buf[static_cast<size_t>(i + 1)];
    m[i] = true;
  }
  batch.domain[row] = domain;
}

std::vector<Batch> validation_batches(const TokenDataset& data, int64_t seq_len, int64_t batch_size,
                                      int64_t max_batches_per_domain) {
  TORCH_CHECK(seq_len >= 1, "validation seq_len (", seq_len, ") must be >= 1");
  TORCH_CHECK(batch_size >= 1, "validation batch_size (", batch_size, ") must be >= 1");
  TORCH_CHECK(max_batches_per_domain >= 1, "max_batches_per_domain (", max_batches_per_domain,
              ") must be >= 1");
  std::vector<Batch> out;
  for (int64_t domain = 0; domain < data.num_domains(); ++domain) {
    std::vector<Window> windows;
    const auto cap = static_cast<size_t>(batch_size * max_batches_per_domain);
    for (int64_t i = 0; i < data.num_documents() && windows.size() < cap; ++i) {
      if (data.document(i).domain == domain) append_windows(data, i, seq_len, windows);
    }
    if (windows.size() > cap) windows.resize(cap);
    for (size_t b0 = 0; b0 < windows.size(); b0 += static_cast<size_t>(batch_size)) {
      const size_t rows = std::min(windows.size() - b0, static_cast<size_t>(batch_size));
      Batch b = empty_batch(static_cast<int64_t>(rows), seq_len);
      for (size_t r = 0; r < rows; ++r) {
        fill_batch_row(data, windows[b0 + r], domain, static_cast<int64_t>(r), b);
      }
      out.push_back(std::move(b));
    }
  }
  return out;
}

}  // namespace gbmoe
