// Causal attention forward + backward on the CPU: gbmoe's fused kernel (train/attention_cpu.h)
// against LibTorch's scaled_dot_product_attention (its flash kernel for fp32 CPU), rounds
// alternated; prints the median and spread of each and their ratio.
#include <ATen/ATen.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cxxopts.hpp>
#include <vector>

#include "train/attention_cpu.h"

namespace {

// Seconds of one forward + backward of sum(y * g).
double time_once(bool fused, const std::vector<torch::Tensor>& qkv, const torch::Tensor& g) {
  std::vector<torch::Tensor> in;
  for (const auto& t : qkv) in.push_back(t.detach().requires_grad_());
  const auto t0 = std::chrono::steady_clock::now();
  auto y =
      fused ? gbmoe::causal_attention_cpu(in[0], in[1], in[2])
            : at::scaled_dot_product_attention(in[0], in[1], in[2], {}, 0.0, true).transpose(1, 2);
  torch::autograd::backward({y}, {g});
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options cli("gbmoe_bench_attention",
                       "causal attention forward+backward: fused kernel vs LibTorch's sdpa");
  cli.add_options()("batch", "B", cxxopts::value<int64_t>()->default_value("4"))(
      "heads", "H", cxxopts::value<int64_t>()->default_value("4"))(
      "seq", "S, positions", cxxopts::value<int64_t>()->default_value("128"))(
      "head-dim", "Dh", cxxopts::value<int64_t>()->default_value("32"))(
      "threads", "intra-op threads", cxxopts::value<int>()->default_value("1"))(
      "rounds", "alternated rounds", cxxopts::value<int>()->default_value("7"))(
      "reps", "calls per round (their mean is the round's figure)",
      cxxopts::value<int>()->default_value("20"))(
      "only", "time only fused or sdpa (for a profiler)", cxxopts::value<std::string>())(
      "h,help", "print help");
  cxxopts::ParseResult args;
  try {
    args = cli.parse(argc, argv);
  } catch (const cxxopts::exceptions::exception& e) {
    std::fprintf(stderr, "gbmoe_bench_attention: %s (see --help)\n", e.what());
    return 2;
  }
  if (args.count("help")) {
    std::printf("%s\n", cli.help().c_str());
    return 0;
  }
  torch::set_num_threads(args["threads"].as<int>());
  const int64_t B = args["batch"].as<int64_t>(), H = args["heads"].as<int64_t>();
  const int64_t S = args["seq"].as<int64_t>(), Dh = args["head-dim"].as<int64_t>();
  const int rounds = args["rounds"].as<int>(), reps = args["reps"].as<int>();
  torch::manual_seed(0);
  std::vector<torch::Tensor> qkv;
  for (int i = 0; i < 3; ++i) qkv.push_back(torch::randn({B, H, S, Dh}));
  const auto g = torch::randn({B, S, H, Dh});
  if (!gbmoe::causal_attention_cpu_available()) {
    std::fprintf(stderr, "gbmoe_bench_attention: no BLAS sgemm_ in the loaded libraries\n");
    return 2;
  }
  if (!gbmoe::causal_attention_cpu_applies(qkv[0], qkv[1], qkv[2])) {
    std::fprintf(stderr, "gbmoe_bench_attention: the fused kernel does not take this shape\n");
    return 2;
  }
  if (args.count("only")) {
    const auto only = args["only"].as<std::string>();
    if (only != "fused" && only != "sdpa") {
      std::fprintf(stderr, "gbmoe_bench_attention: --only (%s) must be fused or sdpa\n",
                   only.c_str());
      return 2;
    }
    const bool fused = only == "fused";
    time_once(fused, qkv, g);  // warm-up
    double total = 0;
    for (int i = 0; i < rounds * reps; ++i) total += time_once(fused, qkv, g);
    std::printf("%s: %.3f ms per call\n", fused ? "fused" : "sdpa", total / (rounds * reps) * 1e3);
    return 0;
  }
  for (bool fused : {true, false}) time_once(fused, qkv, g);  // warm-up
  std::vector<double> ms[2], ratio;
  for (int r = 0; r < rounds; ++r) {
    double mean[2] = {};
    for (int k = 0; k < 2; ++k) {
      const bool fused = (k + r) % 2 == 0;  // the order flips every round
      for (int i = 0; i < reps; ++i) mean[fused ? 0 : 1] += time_once(fused, qkv, g) / reps;
    }
    for (int k = 0; k < 2; ++k) ms[k].push_back(mean[k] * 1e3);
    ratio.push_back(mean[1] / mean[0]);
  }
  // Causal FLOPs: forward q k^T and p v over the S (S + 1) / 2 pairs, backward four products.
  const double flops = 2.0 * 6 * B * H * Dh * S * (S + 1) / 2.0;
  for (int k = 0; k < 2; ++k) {
    std::printf("%-6s %8.3f ms (%.3f-%.3f) fwd+bwd, %5.1f GFLOP/s causal\n",
                k == 0 ? "fused" : "sdpa", median(ms[k]),
                *std::min_element(ms[k].begin(), ms[k].end()),
                *std::max_element(ms[k].begin(), ms[k].end()), flops / median(ms[k]) / 1e6);
  }
  std::printf(
      "bench_attention B=%lld H=%lld S=%lld Dh=%lld threads=%d rounds=%d: sdpa/fused "
      "%.2fx (%.2f-%.2f)\n",
      static_cast<long long>(B), static_cast<long long>(H), static_cast<long long>(S),
      static_cast<long long>(Dh), torch::get_num_threads(), rounds, median(ratio),
      *std::min_element(ratio.begin(), ratio.end()), *std::max_element(ratio.begin(), ratio.end()));
  return 0;
}
