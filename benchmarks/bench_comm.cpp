// Communication benchmark, run under mpirun: latency of a small all-reduce (E = 64 floats, the
// size of one layer's expert counts), time and bus bandwidth of a 16 MiB all-reduce, and bus
// bandwidth of DataParallel's bucketed gradient averaging, and that averaging straight from the
// gradients against its staged form (through one buffer per bucket). Rank 0 prints one line per
// figure.
// Large all-reduces of ranks on one node go through node shared memory; GBMOE_NODE_SHARED_MEMORY=0
// measures Open MPI's MPI_Allreduce instead.
//   mpirun -np 4 build/parallel/gbmoe_bench_comm
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "parallel/data_parallel.h"
#include "parallel/mpi_communicator.h"
#include "parallel/process_groups.h"
#include "parallel/runtime.h"

namespace {

using gbmoe::Communicator;
using gbmoe::ReduceOp;

// Median seconds of reps runs of op, after warmup runs; every rank times the same calls and the
// slowest rank's median is reported.
double median_seconds(Communicator& comm, int warmup, int reps, const std::function<void()>& op) {
  for (int i = 0; i < warmup; ++i) op();
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    comm.barrier();
    const auto start = std::chrono::steady_clock::now();
    op();
    times.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::nth_element(times.begin(), times.begin() + reps / 2, times.end());
  auto median = torch::tensor({times[reps / 2]}, torch::kDouble);
  comm.all_reduce(median, ReduceOp::Max);
  return median.item<double>();
}

// Bus bandwidth of an all-reduce of bytes in t seconds on R ranks: 2 (R - 1) / R * bytes / t,
// the traffic each link carries in a ring (as nccl-tests reports it), in GB/s.
double bus_bandwidth_gbs(double bytes, double t, int R) {
  return R > 1 ? 2.0 * (R - 1) / R * bytes / t / 1e9 : 0.0;
}

int run() {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  auto groups = gbmoe::build_process_groups(gbmoe::ParallelSizes{size}, MPI_COMM_WORLD);
  auto& world = *groups.world;
  const int R = world.size();
  char library[MPI_MAX_LIBRARY_VERSION_STRING] = {0};
  int len = 0;
  MPI_Get_library_version(library, &len);
  std::string version(library);
  version = version.substr(0, version.find(','));
  gbmoe::log0("bench_comm: ", R, " ranks, backend ", world.backend(), " (", version,
              "), torch threads ", torch::get_num_threads());

  auto counts = torch::ones({64});
  const double t_small = median_seconds(world, 200, 2000, [&] { world.all_reduce(counts); });
  gbmoe::log0("all_reduce 64 x fp32 (256 B, MPI_Allreduce): ", t_small * 1e6,
              " us (median of 2000)");

  const int64_t bucket_bytes = int64_t{16} << 20;
  auto bucket = torch::ones({bucket_bytes / 4});
  const double t_bucket =
      median_seconds(world, 3, 20, [&] { world.all_reduce(bucket, ReduceOp::Avg); });
  const auto* mpi = dynamic_cast<const gbmoe::MpiCommunicator*>(&world);
  const bool shared = mpi && mpi->uses_node_shared_all_reduce();
  gbmoe::log0("all_reduce 16 MiB fp32 bucket (avg, ",
              shared ? "node shared memory" : "MPI_Allreduce, coll/tuned", "): ", t_bucket * 1e3,
              " ms, busbw ", bus_bandwidth_gbs(bucket_bytes, t_bucket, R), " GB/s");

  // A model with 8 x (1024 x 1024 + 1024) fp32 parameters: 32 MiB of gradients, 2 buckets.
  torch::nn::Sequential model;
  for (int i = 0; i < 8; ++i) model->push_back(torch::nn::Linear(1024, 1024));
  gbmoe::DataParallel dp(model.ptr(), groups.data_parallel);
  for (auto& p : model->parameters()) p.mutable_grad() = torch::ones_like(p);
  const double t_dp = median_seconds(world, 2, 10, [&] { dp.average_gradients(); });
  gbmoe::log0("DataParallel::average_gradients ", dp.gradient_bytes() / double(1 << 20), " MiB in ",
              dp.buckets().size(), " buckets: ", t_dp * 1e3, " ms, busbw ",
              bus_bandwidth_gbs(static_cast<double>(dp.gradient_bytes()), t_dp, R), " GB/s");

  // The same buckets' gradients straight through the communicator (what average_gradients does)
  // against the staged default of Communicator::sum_divided (copied into the bucket's flat
  // buffer, all-reduced, divided back out: DataParallel before), 7 alternated rounds of 5.
  std::vector<std::vector<torch::Tensor>> grads;
  for (const auto& b : dp.buckets()) {
    grads.emplace_back();
    for (const auto& p : b.params) grads.back().push_back(p.grad());
  }
  auto average = [&](bool staged) {
    for (size_t b = 0; b < grads.size(); ++b) {
      const auto& flat = dp.buckets()[b].flat;
      staged ? world.Communicator::sum_divided(grads[b], R, flat)
             : world.sum_divided(grads[b], R, flat);
    }
  };
  std::vector<double> direct, staged, ratio;
  for (int round = 0; round < 7; ++round) {
    double t[2];
    for (int k = 0; k < 2; ++k) {
      const bool is_staged = (k + round) % 2 == 1;
      t[is_staged] = median_seconds(world, 1, 5, [&] { average(is_staged); });
    }
    direct.push_back(t[0]), staged.push_back(t[1]), ratio.push_back(t[1] / t[0]);
  }
  auto med = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  auto range = [](const std::vector<double>& v) {
    return std::to_string(*std::min_element(v.begin(), v.end())).substr(0, 5) + "-" +
           std::to_string(*std::max_element(v.begin(), v.end())).substr(0, 5);
  };
  gbmoe::log0("sum_divided of the buckets, ", dp.gradient_bytes() / double(1 << 20),
              " MiB: direct ", med(direct) * 1e3, " ms, staged ", med(staged) * 1e3,
              " ms, staged/direct ", med(ratio), " (", range(ratio), ") over 7 rounds");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  gbmoe::MpiRuntime mpi(&argc, &argv);
  return gbmoe::run_distributed([&] { return run(); });
}
