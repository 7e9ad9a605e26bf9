// A two-rank job in which rank 1 throws while rank 0 waits in a collective: run_distributed must
// end the whole job with a tagged message instead of leaving rank 0 hanging.
#include <stdexcept>

#include <torch/torch.h>

#include "parallel/mpi_communicator.h"
#include "parallel/runtime.h"

int main(int argc, char** argv) {
  gbmoe::MpiRuntime mpi(&argc, &argv);
  return gbmoe::run_distributed([&] {
    gbmoe::MpiCommunicator world(MPI_COMM_WORLD);
    auto x = torch::ones({4});
    world.all_reduce(x);
    // Node shared memory set up too: the throwing rank must not wait in freeing it.
    auto counts = torch::ones({8});
    world.sum_one_round_async(counts)->wait();
    auto bucket = torch::ones({1 << 20});
    world.all_reduce(bucket);
    if (mpi.rank() == 1) throw std::runtime_error("deliberate failure on rank 1");
    world.all_reduce(x);  // rank 1 never joins: without the abort this waits forever
    return 0;
  });
}
