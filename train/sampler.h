// SequenceSampler: fixed-length training sequences, each from one document of one domain,
// sharded disjointly across data-parallel ranks, deterministic from the seed and resumable.
// Letters: B sequences in a micro-batch, S sequence length.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "train/token_dataset.h"

namespace gbmoe {

/// Options of a SequenceSampler.
///
/// Example:
///   SamplerOptions(256, 8).seed(1).rank(r).world_size(R)
struct SamplerOptions {
  SamplerOptions(int64_t seq_len = 256, int64_t micro_batch_size = 8)
      : seq_len_(seq_len), micro_batch_size_(micro_batch_size) {}
  /// Tokens per sequence S; each window spans S + 1 tokens (inputs and shifted targets).
  TORCH_ARG(int64_t, seq_len);
  /// Sequences per micro-batch B on each rank.
  TORCH_ARG(int64_t, micro_batch_size);
  /// Seed of the per-epoch shuffle of windows.
  TORCH_ARG(uint64_t, seed) = 0;
  /// This rank among the ranks that read distinct data, and their number.
  TORCH_ARG(int64_t, rank) = 0;
  TORCH_ARG(int64_t, world_size) = 1;

 public:
  /// Throws with the option's name and value when an option is out of range.
  void validate() const;
};

/// One micro-batch. Padded positions (documents or document tails shorter than S + 1 tokens)
/// have mask false, input 0 and target -100 (cross_entropy's default ignore_index).
struct Batch {
  torch::Tensor inputs;   // (B, S) int64 token ids
  torch::Tensor targets;  // (B, S) int64: inputs shifted by one, -100 where mask is false
  torch::Tensor mask;     // (B, S) bool: positions with a real target
  torch::Tensor domain;   // (B,) int64 domain id of each sequence
};

/// A window of S + 1 (or fewer, at a document's end) consecutive tokens of one document.
struct Window {
  int64_t document = 0;
  int64_t offset = 0;  // first token in the split's token file
  int64_t length = 0;  // tokens, at most S + 1
};

/// Where a sampler stands: the same on every rank, so rank 0 can save it for all. The other
/// fields only check that a state is loaded into a sampler that draws the same windows.
struct SamplerState {
  int64_t epoch = 0;
  int64_t position = 0;  // windows of this rank already drawn in this epoch
  uint64_t seed = 0;
  int64_t seq_len = 0;
  int64_t world_size = 0;
  int64_t num_windows = 0;

  /// "epoch=2 position=40 seed=0 seq_len=256 world_size=2 num_windows=5120"
  std::string to_string() const;
  /// Parses to_string()'s output; throws naming the text on anything else.
  static SamplerState from_string(const std::string& text);
  bool operator==(const SamplerState& o) const;
};

/// Draws micro-batches of windows. Every document is cut into windows of S + 1 tokens at stride S
/// (the last one of a document may be shorter and is padded), so each target token is predicted
/// once per epoch. Each epoch shuffles all windows with (seed, epoch); rank r takes windows
/// r, r + R, r + 2R, ... of that order, so ranks are disjoint and all ranks draw the same number
/// (the N mod R windows left over are skipped that epoch). Batches run across epoch boundaries.
///
/// Example:
///   auto train = std::make_shared<TokenDataset>(TokenDataset::open("data/corpus", "train"));
///   SequenceSampler sampler(train, SamplerOptions(256, 8).rank(rank).world_size(world));
///   Batch b = sampler.next_batch();
///   SamplerState s = sampler.state();  // save; later: sampler.load_state(s)
class SequenceSampler {
 public:
  SequenceSampler(std::shared_ptr<const TokenDataset> data, SamplerOptions options);

  Batch next_batch();

  SamplerState state() const;
  /// Continues exactly where the sampler that produced `state` stood.
  void load_state(const SamplerState& state);
  /// Positions the sampler as if `step` batches had been drawn since the start.
  void skip_to_step(int64_t step);

  /// Windows over all ranks in one epoch (N).
  int64_t num_windows() const { return static_cast<int64_t>(windows_.size()); }
  /// Windows this rank draws per epoch (N / R).
  int64_t windows_per_rank() const { return num_windows() / options_.world_size(); }
  /// This rank's windows of an epoch, in the order they are drawn.
  std::vector<Window> rank_windows(int64_t epoch) const;
  const std::vector<Window>& all_windows() const { return windows_; }
  const SamplerOptions& options() const { return options_; }

 private:
  std::vector<int64_t> epoch_order(int64_t epoch) const;  // this rank's window ids

  std::shared_ptr<const TokenDataset> data_;
  SamplerOptions options_;
  std::vector<Window> windows_;  // (N) in document order
  int64_t epoch_ = 0;
  int64_t position_ = 0;
  std::vector<int64_t> order_;  // this rank's windows of epoch_
};

/// Fills row `row` of a batch with one window (padding the rest of the row).
void fill_batch_row(const TokenDataset& data, const Window& w, int64_t domain, int64_t row,
                    Batch& batch);

/// Validation batches for per-domain loss: for each domain, its documents in order, cut into
/// windows like the sampler's, grouped into batches of batch_size windows of that domain only
/// (a domain's last batch may be smaller), at most max_batches_per_domain batches per domain.
/// Deterministic; domain ids are kept in Batch::domain.
///
/// Example:
///   auto val = TokenDataset::open("data/corpus", "val");
///   for (const Batch& b : validation_batches(val, 256, 8, 4)) { ... }
std::vector<Batch> validation_batches(const TokenDataset& data, int64_t seq_len, int64_t batch_size,
                                      int64_t max_batches_per_domain);

}  // namespace gbmoe
