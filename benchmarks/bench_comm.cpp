// Communication benchmark, run under mpirun: latency of a small all-reduce (E = 64 floats, the
// size of one layer's expert counts), time and bus bandwidth of a 16 MiB all-reduce, and bus
// bandwidth of DataParallel's bucketed gradient averaging. Rank 0 prints one line per figure.
// Large all-reduces of ranks on one node go through node shared memory; GBMOE_NODE_SHARED_MEMORY=0
// measures Open MPI's MPI_Allreduce instead.
//   mpirun -np 4 build/parallel/gbmoe_bench_comm
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
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
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  gbmoe::MpiRuntime mpi(&argc, &argv);
  return gbmoe::run_distributed([&] { return run(); });
}
