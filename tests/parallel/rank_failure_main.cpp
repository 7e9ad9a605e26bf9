// A two-rank job in which rank 1 throws while rank 0 waits in a collective: run_distributed must
// end the whole job with a tagged message instead of leaving rank 0 hanging.
#include <stdexcept>

#include "parallel/mpi_communicator.h"
#include "parallel/runtime.h"

int main(int argc, char** argv) {
  gbmoe::MpiRuntime mpi(&argc, &argv);
  return gbmoe::run_distributed([&] {
    gbmoe::MpiCommunicator world(MPI_COMM_WORLD);
    auto x = torch::ones({4});
    world.all_reduce(x);
    if (mpi.rank() == 1) throw std::runtime_error("deliberate failure on rank 1");
    world.all_reduce(x);  // rank 1 never joins: without the abort this waits forever
    return 0;
  });
}
