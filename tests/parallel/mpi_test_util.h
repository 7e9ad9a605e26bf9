// What the multi-rank tests share: the world communicator of the test job.
#pragma once

#include <memory>

#include "parallel/communicator.h"

namespace gbmoe {

/// A communicator over all ranks of the test job (a duplicate of MPI_COMM_WORLD).
std::shared_ptr<Communicator> test_world();

}  // namespace gbmoe
