// Group layout (pure), size validation, and the MPI_Comm_split that builds the communicators.
#include "parallel/process_groups.h"

#include <sstream>

#include "parallel/mpi_communicator.h"
#ifdef GBMOE_WITH_NCCL
#include "parallel/nccl_communicator.h"
#endif

namespace gbmoe {

void ParallelSizes::validate() const {
  std::ostringstream errors;
  auto fail = [&errors](const std::string& what) {
    if (errors.tellp() > 0) errors << "; ";
    errors << what;
  };
  if (world < 1) fail(c10::str("world size (", world, ") must be >= 1"));
  if (expert_parallel < 1) {
    fail(c10::str("expert_parallel (", expert_parallel, ") must be >= 1"));
  } else if (world >= 1 && world % expert_parallel != 0) {
    fail(c10::str("expert_parallel (", expert_parallel, ") must divide world size (", world, ")"));
  }
  if (balance_group < 0) {
    fail(c10::str("balance_group (", balance_group, ") must be >= 0 (0 = whole world)"));
  } else if (balance_group > 0 && world >= 1 && world % balance_group != 0) {
    fail(c10::str("balance_group (", balance_group, ") must divide world size (", world,
                  "); 0 = whole world"));
  }
  const std::string message = errors.str();
  TORCH_CHECK(message.empty(), "invalid parallel sizes (world ", world, ", expert_parallel ",
              expert_parallel, ", balance_group ", balance_group, "): ", message);
}

GroupMembers group_members(const ParallelSizes& sizes, int rank) {
  sizes.validate();
  TORCH_CHECK(rank >= 0 && rank < sizes.world, "rank (", rank, ") must be in [0, world size (",
              sizes.world, "))");
  const int world = static_cast<int>(sizes.world);
  const int ep = static_cast<int>(sizes.expert_parallel);
  const int g = static_cast<int>(sizes.resolved_balance_group());
  GroupMembers m;
  for (int r = 0; r < world; ++r) {
    m.data_parallel.push_back(r);
    if (r / ep == rank / ep) m.expert_parallel.push_back(r);
    if (r % ep == rank % ep) m.expert_data_parallel.push_back(r);
    if (r / g == rank / g) m.balance.push_back(r);
  }
  return m;
}

bool nccl_available() {
#ifdef GBMOE_WITH_NCCL
  return true;
#else
  return false;
#endif
}

namespace {

// Ranks with the same color form one group, ordered by world rank.
std::shared_ptr<Communicator> split(MPI_Comm world, int color, int rank, Backend backend) {
  MPI_Comm comm = MPI_COMM_NULL;
  GBMOE_MPI_CHECK(MPI_Comm_split(world, color, rank, &comm));
  GBMOE_MPI_CHECK(MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN));
  auto mpi = std::make_shared<MpiCommunicator>(comm, /*take_ownership=*/true);
  if (backend == Backend::Mpi) return mpi;
#ifdef GBMOE_WITH_NCCL
  return std::make_shared<NcclCommunicator>(comm);
#else
  TORCH_CHECK(false, "Backend::Nccl requested but gbmoe was built without NCCL ",
              "(configure with CUDA LibTorch and NCCL, GBMOE_WITH_CUDA=ON)");
#endif
}

}  // namespace

ProcessGroups build_process_groups(const ParallelSizes& sizes, MPI_Comm world, Backend backend) {
  int world_size = 0, rank = 0;
  GBMOE_MPI_CHECK(MPI_Comm_size(world, &world_size));
  GBMOE_MPI_CHECK(MPI_Comm_rank(world, &rank));
  TORCH_CHECK(sizes.world == world_size, "ParallelSizes.world (", sizes.world,
              ") must equal the number of MPI ranks (", world_size, ")");
  sizes.validate();
  TORCH_CHECK(backend == Backend::Mpi || nccl_available(),
              "Backend::Nccl requested but gbmoe was built without NCCL ",
              "(configure with CUDA LibTorch and NCCL, GBMOE_WITH_CUDA=ON)");
  const int ep = static_cast<int>(sizes.expert_parallel);
  const int g = static_cast<int>(sizes.resolved_balance_group());
  ProcessGroups groups;
  groups.sizes = sizes;
  groups.world = split(world, 0, rank, backend);
  groups.data_parallel = groups.world;
  groups.expert_parallel = split(world, rank / ep, rank, backend);
  groups.expert_data_parallel = split(world, rank % ep, rank, backend);
  groups.balance = split(world, rank / g, rank, backend);
  groups.backend = backend;
  groups.world_mpi = std::static_pointer_cast<MpiCommunicator>(split(world, 0, rank, Backend::Mpi));
  return groups;
}

ProcessGroups with_balance_group(const ProcessGroups& groups, int64_t balance_group) {
  TORCH_CHECK(groups.world_mpi, "with_balance_group needs process groups made by ",
              "build_process_groups (they keep an MPI copy of the world to cut groups from)");
  ProcessGroups out = groups;
  out.sizes.balance_group = balance_group;
  out.sizes.validate();
  const int rank = groups.world_mpi->rank();
  out.balance =
      split(groups.world_mpi->comm(), rank / static_cast<int>(out.sizes.resolved_balance_group()),
            rank, groups.backend);
  return out;
}

}  // namespace gbmoe
