// Kernel registry and the runtime switch between fused kernels and the LibTorch reference.
#include "moe/kernels.h"

#include <ATen/autocast_mode.h>
#include <torch/version.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <mutex>

namespace gbmoe {
namespace {

constexpr size_t kDeviceTypes = static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES);

struct Registry {
  std::mutex mutex;
  std::array<MoEKernels, kDeviceTypes> kernels{};
  std::array<std::atomic<bool>, kDeviceTypes> present{};
};

Registry& registry() {
  static Registry r;
  return r;
}

std::atomic<int>& mode_flag() {
  static std::atomic<int> mode{[] {
    const char* env = std::getenv("GBMOE_KERNELS");
    return static_cast<int>(env && *env ? kernel_mode_from_string(env) : KernelMode::Fused);
  }()};
  return mode;
}

}  // namespace

std::string to_string(KernelMode m) { return m == KernelMode::Fused ? "fused" : "reference"; }

KernelMode kernel_mode_from_string(const std::string& name) {
  if (name == "fused") return KernelMode::Fused;
  if (name == "reference") return KernelMode::Reference;
  TORCH_CHECK(false, "GBMOE_KERNELS (", name, ") must be fused or reference");
}

KernelMode kernel_mode() { return static_cast<KernelMode>(mode_flag().load()); }

void set_kernel_mode(KernelMode mode) { mode_flag().store(static_cast<int>(mode)); }

void register_kernels(c10::DeviceType device_type, const MoEKernels& kernels) {
  const bool all = kernels.route && kernels.permute && kernels.unpermute;
  const bool none = !kernels.route && !kernels.permute && !kernels.unpermute;
  TORCH_CHECK(all || none, "register_kernels for ", device_type,
              " needs route, permute and unpermute (or none, to remove the registration)");
  auto& r = registry();
  const auto i = static_cast<size_t>(device_type);
  std::lock_guard<std::mutex> lock(r.mutex);
  r.present[i].store(false);
  r.kernels[i] = kernels;
  r.present[i].store(all);
}

const MoEKernels* fused_kernels(const torch::Tensor& t) {
  if (!t.defined() || kernel_mode() != KernelMode::Fused) return nullptr;
  auto& r = registry();
  const auto i = static_cast<size_t>(t.device().type());
  return r.present[i].load() ? &r.kernels[i] : nullptr;
}

torch::ScalarType compute_dtype(const torch::Tensor& x) {
  if (!torch::isFloatingType(x.scalar_type())) return x.scalar_type();
    // The per-device autocast API arrived in LibTorch 2.4; before it only CUDA had autocast here.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  const auto type = x.device().type();
  if (at::autocast::is_autocast_enabled(type)) return at::autocast::get_autocast_dtype(type);
#else
  if (x.is_cuda() && at::autocast::is_enabled()) return at::autocast::get_autocast_gpu_dtype();
#endif
  return x.scalar_type();
}

torch::Tensor token_rows(const torch::Tensor& assignment_N, int64_t num_tokens, int64_t top_k) {
  auto rows = torch::full({num_tokens * top_k}, -1, assignment_N.options().dtype(torch::kLong));
  rows.index_put_({assignment_N},
                  torch::arange(assignment_N.size(0), assignment_N.options().dtype(torch::kLong)));
  return rows.view({num_tokens, top_k});
}

}  // namespace gbmoe
