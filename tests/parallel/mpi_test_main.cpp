// GoogleTest main for multi-rank tests: every rank runs every test; rank 0 prints the usual
// report, the others print only their failures with a "[rank r]" prefix. Exits non-zero when
// any rank failed.
#include <gtest/gtest.h>

#include <iostream>

#include "parallel/mpi_communicator.h"
#include "parallel/runtime.h"
#include "tests/parallel/mpi_test_util.h"

namespace gbmoe {
namespace {

std::shared_ptr<Communicator> g_world;

// Failure printer of the ranks other than 0.
class RankFailurePrinter : public testing::EmptyTestEventListener {
  void OnTestPartResult(const testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::cerr << rank_prefix() << (result.file_name() ? result.file_name() : "?") << ":"
              << result.line_number() << ": " << result.summary() << std::endl;
  }
  void OnTestEnd(const testing::TestInfo& info) override {
    if (info.result()->Failed()) {
      std::cerr << rank_prefix() << "FAILED " << info.test_suite_name() << "." << info.name()
                << std::endl;
    }
  }
};

}  // namespace

std::shared_ptr<Communicator> test_world() { return g_world; }

}  // namespace gbmoe

int main(int argc, char** argv) {
  gbmoe::MpiRuntime mpi(&argc, &argv);
  testing::InitGoogleTest(&argc, argv);
  MPI_Comm world;
  GBMOE_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &world));
  gbmoe::g_world = std::make_shared<gbmoe::MpiCommunicator>(world, /*take_ownership=*/true);
  if (mpi.rank() != 0) {
    auto& listeners = testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new gbmoe::RankFailurePrinter);
  }
  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  auto any_failed = torch::tensor({failed}, torch::kInt);
  gbmoe::g_world->all_reduce(any_failed, gbmoe::ReduceOp::Max);
  gbmoe::log0("[", mpi.size(), " ranks] ",
              any_failed.item<int>() ? "FAILED on at least one rank" : "PASSED on every rank");
  gbmoe::g_world.reset();
  return any_failed.item<int>();
}
