// Sets LibTorch's intra-op thread count for one scope: the tests run with OMP_NUM_THREADS=1, and
// code that splits its work across threads must also be checked on its parallel path.
#pragma once

#include <torch/torch.h>

namespace gbmoe {

/// Example:
///   ThreadsGuard threads(2);  // restored when the scope ends
struct ThreadsGuard {
  explicit ThreadsGuard(int n) : saved(torch::get_num_threads()) { torch::set_num_threads(n); }
  ~ThreadsGuard() { torch::set_num_threads(saved); }
  ThreadsGuard(const ThreadsGuard&) = delete;
  ThreadsGuard& operator=(const ThreadsGuard&) = delete;
  int saved;
};

}  // namespace gbmoe
