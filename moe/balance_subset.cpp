// BalanceSubset: the seeded draw of each step's Shuffle subset and each rank's rows in it.
#include "moe/balance_subset.h"

#include "moe/objective.h"

namespace gbmoe {
namespace {

// A generator seed per (seed, step): distinct steps of one seed differ in the low 32 bits, which
// are the ones the CPU generator's mt19937 keeps.
uint64_t step_seed(uint64_t seed, int64_t step) {
  const uint64_t x = seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(step);
  return x ^ (x >> 32);
}

}  // namespace

int64_t shuffle_subset_size(int64_t num_tokens, int64_t ranks, int64_t micro_batches) {
  TORCH_CHECK(num_tokens >= 0 && ranks >= 1 && micro_batches >= 1, "shuffle subset size needs ",
              "tokens (", num_tokens, ") >= 0, ranks (", ranks, ") >= 1 and micro-batches (",
              micro_batches, ") >= 1");
  if (num_tokens == 0) return 0;
  const int64_t units = ranks * micro_batches;
  return std::max<int64_t>(1, (num_tokens + units / 2) / units);
}

torch::Tensor draw_balance_subset(uint64_t seed, int64_t step, int64_t num_tokens,
                                  int64_t subset_tokens) {
  TORCH_CHECK(subset_tokens >= 0 && subset_tokens <= num_tokens, "balance subset of ",
              subset_tokens, " tokens out of ", num_tokens);
  auto gen = at::detail::createCPUGenerator(step_seed(seed, step));
  auto perm = torch::randperm(num_tokens, gen, torch::kLong);
  return std::get<0>(perm.narrow(0, 0, subset_tokens).sort());
}

void BalanceSubset::begin_step(int64_t step, int64_t micro_batches, double local_tokens,
                               CountReducer* data_parallel) {
  step_ = step;
  micro_batches_ = micro_batches;
  ranks_ = data_parallel ? data_parallel->size() : 1;
  rank_ = data_parallel ? data_parallel->rank() : 0;
  cursor_ = 0;
  gathered_ = torch::zeros({ranks_, 1}, torch::kDouble);
  gathered_[rank_].fill_(local_tokens);
  if (data_parallel) {
    gather_wait_ = data_parallel->sum_async(gathered_);  // exact: one non-zero row per rank
  } else {
    draw();
  }
}

void BalanceSubset::draw() {
  auto tokens = gathered_.cpu().select(1, 0);
  step_tokens_ = tokens.sum().item<double>();
  const auto N = static_cast<int64_t>(step_tokens_);
  const auto first = static_cast<int64_t>(tokens.narrow(0, 0, rank_).sum().item<double>());
  const auto mine = static_cast<int64_t>(tokens[rank_].item<double>());
  subset_tokens_ = shuffle_subset_size(N, ranks_, micro_batches_);
  auto S = draw_balance_subset(seed_, step_, N, subset_tokens_);
  auto local = S.index({(S >= first).logical_and(S < first + mine)}) - first;
  in_subset_ = torch::zeros({mine}, torch::kBool);
  in_subset_.index_put_({local}, true);
}

torch::Tensor BalanceSubset::next_micro_batch(const torch::Tensor& valid_T) {
  if (gather_wait_) {
    gather_wait_();
    gather_wait_ = nullptr;
    draw();
  }
  auto valid = valid_T.to(torch::kBool).reshape({-1});
  auto positions = valid.nonzero().select(1, 0);
  const int64_t n = positions.numel();
  TORCH_CHECK(cursor_ + n <= in_subset_.numel(), "balance shuffle: the micro-batches of step ",
              step_, " hold more than the ", in_subset_.numel(),
              " valid tokens begin_step() was given for this rank");
  rows_ = torch::zeros_like(valid);
  rows_.index_put_({positions}, in_subset_.narrow(0, cursor_, n).to(valid.device()));
  cursor_ += n;
  return rows_;
}

torch::Tensor BalanceSubset::weighted_score_sum(const torch::Tensor& scores_TE,
                                                const torch::Tensor& rows_T) const {
  const double scale = subset_tokens_ > 0 ? step_tokens_ / static_cast<double>(subset_tokens_) : 0;
  return (scores_TE * rows_T.unsqueeze(-1).to(scores_TE.scalar_type())).sum(0) * scale;
}

torch::Tensor BalanceSubset::weighted_score_sum_backward(const torch::Tensor& grad_E,
                                                         const torch::Tensor& rows_T) const {
  const double scale = subset_tokens_ > 0 ? step_tokens_ / static_cast<double>(subset_tokens_) : 0;
  return (grad_E * scale).unsqueeze(0).expand({rows_T.size(0), grad_E.size(-1)}) *
         rows_T.unsqueeze(-1).to(grad_E.scalar_type());
}

}  // namespace gbmoe
