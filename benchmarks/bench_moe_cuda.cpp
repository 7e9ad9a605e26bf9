// MoE layer forward + backward on a CUDA GPU in bf16, fused path (CUDA kernels + grouped GEMM)
// against the reference path (LibTorch ops, per-expert GEMM loop), next to the bf16
// matrix-multiply rate measured in the same run. Letters: T tokens, D, F, E, K.
// Usage: gbmoe_bench_moe_cuda [--T 16384 --D 2048 --F 1408 --E 64 --K 8 --reps 10]
#include <torch/torch.h>

#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>

#include "csrc_cuda/moe_kernels.h"
#include "moe/kernels.h"
#include "moe/moe_layer.h"

namespace {

double seconds_per_call(const std::function<void()>& fn, int reps) {
  fn();
  c10::cuda::device_synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) fn();
  c10::cuda::device_synchronize();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
}

double bf16_mm_tflops() {
  const int64_t n = 8192;
  auto opts = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16);
  auto a = torch::randn({n, n}, opts), b = torch::randn({n, n}, opts);
  const double s = seconds_per_call([&] { torch::mm(a, b); }, 20);
  return 2.0 * n * n * n / s / 1e12;
}

std::map<std::string, int64_t> parse(int argc, char** argv) {
  std::map<std::string, int64_t> v{{"T", 16384}, {"D", 2048}, {"F", 1408},
                                   {"E", 64},    {"K", 8},    {"reps", 10}};
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string key = argv[i];
    TORCH_CHECK(key.rfind("--", 0) == 0 && v.count(key.substr(2)), "unknown argument ", key,
                "; use --T --D --F --E --K --reps");
    v[key.substr(2)] = std::atoll(argv[i + 1]);
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  auto a = parse(argc, argv);
  const int64_t T = a["T"], D = a["D"], F = a["F"], E = a["E"], K = a["K"];
  const int reps = static_cast<int>(a["reps"]);
  if (!torch::cuda::is_available()) {
    std::fprintf(stderr, "gbmoe_bench_moe_cuda: no CUDA device\n");
    return 1;
  }
  gbmoe::cuda::register_kernels();
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  torch::manual_seed(0);
  gbmoe::MoELayer moe(gbmoe::MoELayerOptions(D, E, F).router(gbmoe::RouterOptions().top_k(K)));
  moe->to(torch::kCUDA);
  auto opts = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16);
  auto x = torch::randn({T, D}, opts).requires_grad_(true);
  auto dy = torch::randn({T, D}, opts);
  const double flops = 18.0 * T * K * D * F;  // forward + backward of the experts' GEMMs
  const double mm = bf16_mm_tflops();
  std::printf("gpu=%s T=%ld D=%ld F=%ld E=%ld K=%ld bf16_mm_tflops=%.1f grouped_gemm=%s\n",
              prop.name, static_cast<long>(T), static_cast<long>(D), static_cast<long>(F),
              static_cast<long>(E), static_cast<long>(K), mm,
              gbmoe::grouped_gemm_available() ? "yes" : "no");
  for (auto mode : {gbmoe::KernelMode::Fused, gbmoe::KernelMode::Reference}) {
    gbmoe::set_kernel_mode(mode);
    const double s = seconds_per_call(
        [&] {
          moe->zero_grad();
          x.mutable_grad() = torch::Tensor();
          moe->forward(x).backward(dy);
        },
        reps);
    const double tflops = flops / s / 1e12;
    std::printf("path=%-9s step_ms=%.2f tok_s=%.0f tflops=%.1f of_mm=%.0f%%\n",
                gbmoe::to_string(mode).c_str(), s * 1e3, T / s, tflops, 100.0 * tflops / mm);
  }
  return 0;
}
