// The NCCL backend on CUDA tensors against hand-computed values: every collective, async waits,
// and NCCL process groups. With one GPU the job is a world of size 1; skipped without a GPU.
#include <gtest/gtest.h>

#include <c10/cuda/CUDAFunctions.h>

#include "parallel/nccl_communicator.h"
#include "parallel/process_groups.h"
#include "tests/parallel/mpi_test_util.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

class Nccl : public testing::Test {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
    const int world_rank = test_world()->rank();
    device_ = world_rank % static_cast<int>(torch::cuda::device_count());
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device_));
    comm_ = std::make_shared<NcclCommunicator>(MPI_COMM_WORLD, device_);
  }
  torch::TensorOptions on_gpu(torch::ScalarType dtype) const {
    return torch::TensorOptions().dtype(dtype).device(torch::kCUDA,
                                                      static_cast<c10::DeviceIndex>(device_));
  }
  int device_ = 0;
  std::shared_ptr<NcclCommunicator> comm_;
};

TEST_F(Nccl, AllReduceSumMaxAvgEqualHandComputed) {
  const int R = comm_->size(), me = comm_->rank();
  for (auto dtype :
       {torch::kFloat, torch::kDouble, torch::kBFloat16, torch::kHalf, torch::kInt, torch::kLong}) {
    auto base = torch::arange(12, torch::kLong).view({3, 4}) % 5;
    auto sum = torch::zeros({3, 4}, torch::kDouble);
    for (int r = 0; r < R; ++r) sum += (base + 3 * r).to(torch::kDouble);
    auto x = (base + 3 * me).to(on_gpu(dtype));
    comm_->all_reduce(x, ReduceOp::Sum);
    EXPECT_TRUE(torch::equal(x.cpu().to(torch::kDouble), sum)) << dtype;
    auto m = (base + 3 * me).to(on_gpu(dtype)).t();  // strided
    comm_->all_reduce(m, ReduceOp::Max);
    EXPECT_TRUE(
        torch::equal(m.t().cpu().to(torch::kDouble), (base + 3 * (R - 1)).to(torch::kDouble)))
        << dtype;
    if (torch::isFloatingType(dtype)) {
      auto a = (base + 3 * me).to(on_gpu(dtype));
      auto work = comm_->all_reduce_async(a, ReduceOp::Avg);
      work->wait();
      EXPECT_LT(max_rel_diff(a.cpu(), sum / R), 1e-2) << dtype;
    }
  }
}

TEST_F(Nccl, AllGatherAllToAllBroadcastBarrier) {
  const int R = comm_->size(), me = comm_->rank();
  auto x = torch::full({2, 3}, me, on_gpu(torch::kBFloat16));
  std::vector<torch::Tensor> parts;
  for (int r = 0; r < R; ++r) parts.push_back(torch::full({2, 3}, r, torch::kBFloat16));
  EXPECT_TRUE(torch::equal(comm_->all_gather(x).cpu(), torch::cat(parts)));

  // Rank src sends (src + 2 dst) % 3 rows to dst, rows encode (src, dst, i); zeros included.
  auto rows = [](int src, int dst) {
    const int64_t n = (src + 2 * dst) % 3;
    return (torch::arange(n, torch::kLong) + 10 * dst + 40 * src).unsqueeze(1).expand({n, 2});
  };
  std::vector<int64_t> send(R), recv(R);
  std::vector<torch::Tensor> outgoing, expected;
  for (int j = 0; j < R; ++j) {
    send[j] = (me + 2 * j) % 3;
    recv[j] = (j + 2 * me) % 3;
    outgoing.push_back(rows(me, j));
    expected.push_back(rows(j, me));
  }
  auto input = torch::cat(outgoing).to(on_gpu(torch::kFloat));
  auto work = comm_->all_to_all_async(input, send, recv);
  work->wait();
  EXPECT_TRUE(torch::equal(work->result().cpu(), torch::cat(expected).to(torch::kFloat)));

  auto b = torch::full({5}, me == R - 1 ? 7 : 0, on_gpu(torch::kLong));
  comm_->broadcast(b, R - 1);
  EXPECT_TRUE(torch::equal(b.cpu(), torch::full({5}, 7, torch::kLong)));
  comm_->barrier();
}

TEST_F(Nccl, StagesCpuTensorsThroughTheDevice) {
  const int R = comm_->size(), me = comm_->rank();
  auto x = torch::full({3}, 1.5, torch::kDouble);
  comm_->all_reduce(x, ReduceOp::Sum);
  EXPECT_TRUE(x.is_cpu());
  EXPECT_TRUE(torch::equal(x, torch::full({3}, 1.5 * R, torch::kDouble)));
  auto gathered = comm_->all_gather(torch::full({1}, me, torch::kLong));
  EXPECT_TRUE(gathered.is_cpu());
  EXPECT_TRUE(torch::equal(gathered, torch::arange(R, torch::kLong)));
  auto b = torch::full({2}, me == 0 ? 7.0 : 0.0);
  comm_->broadcast(b, 0);
  EXPECT_TRUE(torch::equal(b, torch::full({2}, 7.0)));
  expect_throw_with(
      [&] {
        comm_->all_to_all(torch::ones({R, 2}), std::vector<int64_t>(R, 1),
                          std::vector<int64_t>(R, 1));
      },
      "needs tensors on cuda:");
}

TEST_F(Nccl, ProcessGroupsOnNccl) {
  const int R = comm_->size();
  auto groups = build_process_groups(ParallelSizes{R}, MPI_COMM_WORLD, Backend::Nccl);
  EXPECT_EQ(groups.world->backend(), "nccl");
  auto x = torch::ones({4}, on_gpu(torch::kFloat));
  groups.balance->all_reduce(x, ReduceOp::Sum);
  EXPECT_TRUE(torch::equal(x.cpu(), torch::full({4}, static_cast<float>(R))));
}

}  // namespace
}  // namespace gbmoe
