// Expert-parallelism benchmark, run under mpirun: forward + backward time of one MoE layer at
// every expert-parallel size that divides the world (1 = all experts local, no exchange), and
// the share of that time spent in the all-to-all exchanges (split sizes and tokens, forward and
// backward). Each rank routes its own T tokens. Rank 0 prints one line per size.
//   mpirun -np 4 build/parallel/gbmoe_bench_ep [T D F E K reps]
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <vector>

#include "moe/cpu_buffer_cache.h"
#include "moe/moe_layer.h"
#include "parallel/expert_parallel.h"
#include "parallel/process_groups.h"
#include "parallel/runtime.h"

namespace {

using gbmoe::Communicator;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// A communicator that forwards to another and adds up the seconds spent in synchronous
// all_to_all calls: the dispatcher's exchanges and their backward.
class TimedCommunicator : public Communicator {
 public:
  explicit TimedCommunicator(std::shared_ptr<Communicator> inner) : inner_(std::move(inner)) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string backend() const override { return inner_->backend(); }
  std::shared_ptr<gbmoe::Work> all_reduce_async(const torch::Tensor& t,
                                                gbmoe::ReduceOp op) override {
    return inner_->all_reduce_async(t, op);
  }
  torch::Tensor all_gather(const torch::Tensor& t) override { return inner_->all_gather(t); }
  torch::Tensor all_to_all(const torch::Tensor& input, const std::vector<int64_t>& send_splits,
                           const std::vector<int64_t>& recv_splits) override {
    const auto t0 = Clock::now();
    auto out = inner_->all_to_all(input, send_splits, recv_splits);
    seconds += seconds_since(t0);
    return out;
  }
  std::shared_ptr<gbmoe::Work> all_to_all_async(const torch::Tensor& input,
                                                const std::vector<int64_t>& send_splits,
                                                const std::vector<int64_t>& recv_splits) override {
    return inner_->all_to_all_async(input, send_splits, recv_splits);
  }
  void broadcast(const torch::Tensor& t, int root) override { inner_->broadcast(t, root); }
  void barrier() override { inner_->barrier(); }

  double seconds = 0;

 private:
  std::shared_ptr<Communicator> inner_;
};

double max_over_ranks(Communicator& comm, double v) {
  auto t = torch::tensor({v}, torch::kDouble);
  comm.all_reduce(t, gbmoe::ReduceOp::Max);
  return t.item<double>();
}

double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

int run(int argc, char** argv) {
  auto arg = [&](int i, int64_t fallback) { return argc > i ? std::atoll(argv[i]) : fallback; };
  const int64_t T = arg(1, 2048), D = arg(2, 256), F = arg(3, 512), E = arg(4, 8), K = arg(5, 2);
  const int reps = static_cast<int>(arg(6, 5));
  int R = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &R);
  torch::set_num_threads(1);
  gbmoe::log0("bench_ep: ", R, " ranks, T=", T, " tokens per rank, D=", D, " F=", F, " E=", E,
              " K=", K, ", median of ", reps, " steps after 2 warm-up steps, torch threads 1");
  for (int P = 1; P <= R; ++P) {
    if (R % P != 0 || E % P != 0) continue;
    auto groups = gbmoe::build_process_groups(gbmoe::ParallelSizes{R, P});
    auto timed = std::make_shared<TimedCommunicator>(groups.expert_parallel);
    groups.expert_parallel = timed;
    torch::manual_seed(1);
    gbmoe::MoELayer layer(gbmoe::MoELayerOptions(D, E, F).router(gbmoe::RouterOptions().top_k(K)));
    if (P > 1) gbmoe::apply_expert_parallel(*layer, groups);
    auto x = torch::randn({T, D}).requires_grad_(true);
    std::vector<double> step_s, exchange_s;
    for (int i = 0; i < reps + 2; ++i) {
      groups.world->barrier();
      timed->seconds = 0;
      const auto t0 = Clock::now();
      auto y = layer->forward(x);
      y.square().mean().backward();
      const double dt = seconds_since(t0);
      if (i >= 2) step_s.push_back(dt), exchange_s.push_back(timed->seconds);
    }
    const double step = max_over_ranks(*groups.world, median(step_s));
    const double exchange = max_over_ranks(*groups.world, median(exchange_s));
    gbmoe::log0("expert_parallel ", P, ": ", E / P, " experts per rank, forward + backward ",
                step * 1e3, " ms, exchanges ", exchange * 1e3, " ms (", 100.0 * exchange / step,
                "% of the step)");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  gbmoe::install_cpu_buffer_cache();  // as bench_layer and gbmoe-train do
  gbmoe::MpiRuntime mpi(&argc, &argv);
  return gbmoe::run_distributed([&] { return run(argc, argv); });
}
