// Times the MoE layer's forward + backward on the CPU and prints tokens/s and achieved GFLOP/s
// next to the fp32 matrix-multiply rate measured in the same run.
#include <torch/torch.h>
#include <cxxopts.hpp>

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "moe/cpu_buffer_cache.h"
#include "moe/kernels.h"
#include "moe/moe_layer.h"
#include "moe/objective.h"
#include "moe/swiglu_cpu.h"

namespace {

struct Shape {
  const char* name;
  int64_t T, D, F, E, K;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Best-of-reps fp32 GEMM rate at n x n x n, the machine's reference throughput.
double sgemm_gflops(int64_t n, int reps) {
  auto a = torch::randn({n, n}), b = torch::randn({n, n});
  torch::mm(a, b);
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    torch::mm(a, b);
    best = std::min(best, seconds_since(t0));
  }
  return 2.0 * n * n * n / best / 1e9;
}

void run(const Shape& s, int reps, const char* memory) {
  torch::manual_seed(0);
  using namespace gbmoe;
  MoELayer layer(MoELayerOptions(s.D, s.E, s.F).router(RouterOptions().top_k(s.K)));
  auto x = torch::randn({s.T, s.D}, torch::requires_grad());
  // The layer trained alone: its balancing and z-loss terms come from the objective.
  TrainingObjective objective({layer}, BalanceOptions().scope(BalanceScope::Micro));
  auto step = [&] {
    objective.begin_step(1, static_cast<double>(s.T));
    auto routing = objective.context();
    auto y = layer->forward(x, {}, &routing);
    auto loss = y.square().mean() + objective.micro_batch_loss(routing, torch::zeros({}));
    loss.backward();
    objective.end_step();
  };
  step();
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    step();
    times.push_back(seconds_since(t0));
  }
  std::sort(times.begin(), times.end());
  const double dt = times[times.size() / 2];
  // forward + backward of the SwiGLU experts on the routed rows: 3 GEMMs of 2*D*F each, x3.
  const double flops = 3.0 * 2.0 * s.T * s.K * 3.0 * s.D * s.F;
  std::printf(
      "gbmoe_layer %s T=%lld D=%lld F=%lld E=%lld K=%lld step_s=%.4f tok_s=%.0f gflops=%.1f "
      "sgemm_gflops=%.1f threads=%d kernels=%s swiglu=%s memory=%s\n",
      s.name, (long long)s.T, (long long)s.D, (long long)s.F, (long long)s.E, (long long)s.K, dt,
      s.T / dt, flops / dt / 1e9, sgemm_gflops(1024, 10), torch::get_num_threads(),
      to_string(kernel_mode()).c_str(), gbmoe::detail::swiglu_cpu_variant(), memory);
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options cli("gbmoe_bench_layer", "MoE layer forward+backward throughput on the CPU");
  cli.add_options()("threads", "intra-op threads", cxxopts::value<int>()->default_value("1"))(
      "reps", "timed repetitions (median reported)", cxxopts::value<int>()->default_value("5"))(
      "shape", "coarse, fine, or both", cxxopts::value<std::string>()->default_value("both"))(
      "memory",
      "large buffers: cache (gbmoe::install_cpu_buffer_cache, huge pages), mallopt (glibc "
      "keeps freed memory) or default (glibc as it is)",
      cxxopts::value<std::string>()->default_value("cache"))("h,help", "print help");
  cxxopts::ParseResult args;
  try {
    args = cli.parse(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gbmoe_bench_layer: %s\n%s", e.what(), cli.help().c_str());
    return 2;
  }
  if (args.count("help")) {
    std::printf("%s", cli.help().c_str());
    return 0;
  }
  torch::set_num_threads(args["threads"].as<int>());
  // Large activation buffers come and go every step: glibc unmaps freed ones, and every step
  // then pays page faults on fresh memory.
  const std::string memory = args["memory"].as<std::string>();
  if (memory == "cache") {
    if (!gbmoe::install_cpu_buffer_cache()) {
      std::fprintf(stderr, "gbmoe_bench_layer: --memory cache needs LibTorch >= 2.3\n");
      return 2;
    }
  } else if (memory == "mallopt") {
#ifdef __GLIBC__
    mallopt(M_MMAP_THRESHOLD, 1 << 30);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
#else
    std::fprintf(stderr, "gbmoe_bench_layer: --memory mallopt needs glibc\n");
    return 2;
#endif
  } else if (memory != "default") {
    std::fprintf(stderr, "gbmoe_bench_layer: --memory (%s) must be cache, mallopt or default\n",
                 memory.c_str());
    return 2;
  }
  const std::string which = args["shape"].as<std::string>();
  const Shape coarse{"coarse", 4096, 512, 1024, 8, 2};
  const Shape fine{"fine", 4096, 256, 128, 64, 8};
  if (which != "coarse" && which != "fine" && which != "both") {
    std::fprintf(stderr, "gbmoe_bench_layer: --shape (%s) must be coarse, fine or both\n",
                 which.c_str());
    return 2;
  }
  if (which != "fine") run(coarse, args["reps"].as<int>(), memory.c_str());
  if (which != "coarse") run(fine, args["reps"].as<int>(), memory.c_str());
  return 0;
}
