// Process groups cut from the world: data-parallel, expert-parallel, expert-data-parallel and
// the balance group of the `group` balance scope (see spec global-lbl.md).
#pragma once

#include <mpi.h>

#include <memory>
#include <vector>

#include "parallel/communicator.h"

namespace gbmoe {

/// The parallel layout of a job. Every rank holds distinct data, so data-parallel = world.
/// Ranks are laid out expert-parallel first: the EP groups are consecutive blocks of
/// expert_parallel ranks, and the expert-data-parallel groups join the ranks at the same index
/// of their EP block (stride expert_parallel). The balance groups are consecutive blocks of
/// balance_group ranks (0 = the whole world).
///
/// Example:
///   ParallelSizes sizes{/*world=*/8, /*expert_parallel=*/4, /*balance_group=*/2};
///   sizes.validate();
struct ParallelSizes {
  int64_t world = 1;
  int64_t expert_parallel = 1;
  int64_t balance_group = 0;

  /// The one check of all sizes; the message lists every value and every violation.
  void validate() const;
  /// Ranks per balance group, with 0 resolved to the world size.
  int64_t resolved_balance_group() const { return balance_group == 0 ? world : balance_group; }
  /// Ranks holding a copy of the same expert shard: world / expert_parallel.
  int64_t expert_data_parallel() const { return world / expert_parallel; }
};

/// World ranks of each group that contains `rank`, in group-rank order. A pure function of the
/// layout: the reference build_process_groups is tested against.
struct GroupMembers {
  std::vector<int> data_parallel;
  std::vector<int> expert_parallel;
  std::vector<int> expert_data_parallel;
  std::vector<int> balance;
};
GroupMembers group_members(const ParallelSizes& sizes, int rank);

/// Which backend the group communicators use: MPI for CPU tensors, NCCL for CUDA tensors.
enum class Backend { Mpi, Nccl };

class MpiCommunicator;

/// True when gbmoe was built with the NCCL backend.
bool nccl_available();

/// The communicators of this rank's groups. Ranks of a group talk only to each other; the
/// world communicator is a duplicate of the MPI world handed in, so gbmoe traffic never
/// mixes with the caller's.
struct ProcessGroups {
  ParallelSizes sizes;
  std::shared_ptr<Communicator> world;
  std::shared_ptr<Communicator> data_parallel;  // all ranks: the same object as world
  std::shared_ptr<Communicator> expert_parallel;
  std::shared_ptr<Communicator> expert_data_parallel;
  std::shared_ptr<Communicator> balance;
  Backend backend = Backend::Mpi;
  std::shared_ptr<MpiCommunicator> world_mpi;  // an MPI copy of the world to cut groups from
};

/// Validates sizes (and that sizes.world is the size of world) and splits world
/// (MPI_Comm_split) into this rank's groups. Collective over world. With Backend::Nccl each
/// group gets an NCCL communicator on the current CUDA device, bootstrapped over the MPI group.
///
/// Example:
///   MpiRuntime mpi(&argc, &argv);
///   auto groups = build_process_groups(ParallelSizes{mpi.size(), /*expert_parallel=*/2});
///   groups.balance->all_reduce(counts_E);
ProcessGroups build_process_groups(const ParallelSizes& sizes, MPI_Comm world = MPI_COMM_WORLD,
                                   Backend backend = Backend::Mpi);

/// groups with the balance group cut anew for balance_group ranks (0 = the whole world), the
/// other groups shared: what a balance.schedule that changes the group size needs. Collective
/// over the world: every rank calls it at the same point. groups must come from
/// build_process_groups.
///
/// Example:
///   auto g1 = with_balance_group(groups, 1);  // g1.balance: each rank alone
///   TrainingObjective objective(layers, options, objective_reducers(options, g1));
ProcessGroups with_balance_group(const ProcessGroups& groups, int64_t balance_group);

}  // namespace gbmoe
