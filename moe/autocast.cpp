// CUDA autocast state across LibTorch versions (the device-type API arrived in 2.4).
#include "moe/autocast.h"

#include <ATen/autocast_mode.h>
#include <torch/version.h>

namespace gbmoe {

CudaAutocast CudaAutocast::current() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  return {at::autocast::is_autocast_enabled(at::kCUDA),
          at::autocast::get_autocast_dtype(at::kCUDA)};
#else
  return {at::autocast::is_enabled(), at::autocast::get_autocast_gpu_dtype()};
#endif
}

void CudaAutocast::set(const CudaAutocast& state) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  at::autocast::set_autocast_dtype(at::kCUDA, state.dtype);
  at::autocast::set_autocast_enabled(at::kCUDA, state.enabled);
#else
  at::autocast::set_autocast_gpu_dtype(state.dtype);
  at::autocast::set_enabled(state.enabled);
#endif
}

}  // namespace gbmoe
