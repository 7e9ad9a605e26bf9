// The CUDA autocast state, read and set through whichever API this LibTorch version has.
#pragma once

#include <c10/core/ScalarType.h>

namespace gbmoe {

/// Whether CUDA autocast is on and to which dtype it casts.
///
/// Example:
///   auto saved = CudaAutocast::current();
///   CudaAutocast::set({true, at::kBFloat16});
///   ...
///   CudaAutocast::set(saved);
struct CudaAutocast {
  bool enabled = false;
  c10::ScalarType dtype = c10::kBFloat16;

  static CudaAutocast current();
  static void set(const CudaAutocast& state);
};

}  // namespace gbmoe
