// Process groups: the layout for world 4 by hand, the built communicators' membership for every
// size that divides the job's world, and size validation naming every value.
#include <gtest/gtest.h>

#include "parallel/process_groups.h"
#include "tests/parallel/mpi_test_util.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

using Ranks = std::vector<int>;

TEST(ProcessGroups, LayoutOfWorldFourByHand) {
  // ep 2, g 2: EP blocks {0,1} {2,3}; EDP stride 2: {0,2} {1,3}; balance blocks {0,1} {2,3}.
  auto m = group_members(ParallelSizes{4, 2, 2}, 1);
  EXPECT_EQ(m.data_parallel, (Ranks{0, 1, 2, 3}));
  EXPECT_EQ(m.expert_parallel, (Ranks{0, 1}));
  EXPECT_EQ(m.expert_data_parallel, (Ranks{1, 3}));
  EXPECT_EQ(m.balance, (Ranks{0, 1}));
  // ep 4, g 1: one EP block, every rank its own EDP and balance group.
  m = group_members(ParallelSizes{4, 4, 1}, 2);
  EXPECT_EQ(m.expert_parallel, (Ranks{0, 1, 2, 3}));
  EXPECT_EQ(m.expert_data_parallel, (Ranks{2}));
  EXPECT_EQ(m.balance, (Ranks{2}));
  // ep 1, g 0 (whole world): EP groups are single ranks, EDP and balance are the world.
  m = group_members(ParallelSizes{4, 1, 0}, 3);
  EXPECT_EQ(m.expert_parallel, (Ranks{3}));
  EXPECT_EQ(m.expert_data_parallel, (Ranks{0, 1, 2, 3}));
  EXPECT_EQ(m.balance, (Ranks{0, 1, 2, 3}));
  // ep 2, g 4.
  m = group_members(ParallelSizes{4, 2, 4}, 2);
  EXPECT_EQ(m.expert_parallel, (Ranks{2, 3}));
  EXPECT_EQ(m.expert_data_parallel, (Ranks{0, 2}));
  EXPECT_EQ(m.balance, (Ranks{0, 1, 2, 3}));
}

// The world ranks of a built group, as its members report them.
Ranks members_of(Communicator& group, int world_rank) {
  auto ranks = group.all_gather(torch::tensor({world_rank}, torch::kInt));
  return Ranks(ranks.data_ptr<int>(), ranks.data_ptr<int>() + ranks.numel());
}

TEST(ProcessGroups, BuiltGroupsMatchTheLayoutForEverySizeDividingTheWorld) {
  auto world = test_world();
  const int R = world->size(), me = world->rank();
  for (int ep = 1; ep <= R; ++ep) {
    for (int g = 0; g <= R; ++g) {
      if (R % ep != 0 || (g > 0 && R % g != 0)) continue;
      SCOPED_TRACE(c10::str("world ", R, " ep ", ep, " g ", g));
      const ParallelSizes sizes{R, ep, g};
      auto groups = build_process_groups(sizes, MPI_COMM_WORLD);
      auto expected = group_members(sizes, me);
      EXPECT_EQ(groups.world->size(), R);
      EXPECT_EQ(groups.world->rank(), me);
      EXPECT_EQ(groups.data_parallel, groups.world);
      EXPECT_EQ(members_of(*groups.data_parallel, me), expected.data_parallel);
      EXPECT_EQ(members_of(*groups.expert_parallel, me), expected.expert_parallel);
      EXPECT_EQ(members_of(*groups.expert_data_parallel, me), expected.expert_data_parallel);
      EXPECT_EQ(members_of(*groups.balance, me), expected.balance);
      EXPECT_EQ(groups.expert_parallel->size(), ep);
      EXPECT_EQ(groups.expert_data_parallel->size(), R / ep);
      EXPECT_EQ(groups.balance->size(), g == 0 ? R : g);
      // A reduction stays inside its group: the balance group sums its own members' ranks.
      auto sum = torch::tensor({me}, torch::kLong);
      groups.balance->all_reduce(sum);
      int64_t expected_sum = 0;
      for (int r : expected.balance) expected_sum += r;
      EXPECT_EQ(sum.item<int64_t>(), expected_sum);
    }
  }
}

// with_balance_group cuts a new balance group (what a balance.schedule changing group_size
// needs) and shares every other group.
TEST(ProcessGroups, WithBalanceGroupCutsOnlyTheBalanceGroup) {
  auto world = test_world();
  const int R = world->size(), me = world->rank();
  const auto groups = build_process_groups(ParallelSizes{R, 1, 0}, MPI_COMM_WORLD);
  for (int g = 0; g <= R; ++g) {
    if (g > 0 && R % g != 0) continue;
    SCOPED_TRACE(c10::str("world ", R, " g ", g));
    const auto cut = with_balance_group(groups, g);
    EXPECT_EQ(cut.sizes.balance_group, g);
    EXPECT_EQ(members_of(*cut.balance, me), group_members(cut.sizes, me).balance);
    EXPECT_EQ(cut.world, groups.world);
    EXPECT_EQ(cut.expert_parallel, groups.expert_parallel);
    EXPECT_EQ(cut.expert_data_parallel, groups.expert_data_parallel);
  }
  expect_throw_with([&] { with_balance_group(groups, R + 1); },
                    c10::str("balance_group (", R + 1, ") must divide world size (", R, ")"));
  expect_throw_with([] { with_balance_group(ProcessGroups{}, 1); },
                    "with_balance_group needs process groups made by build_process_groups");
}

TEST(ProcessGroups, SizesThatDoNotDivideTheWorldAreRejectedWithEveryValue) {
  expect_throw_with(
      [] {
        ParallelSizes{4, 3, 0}.validate();
      },
      "expert_parallel (3) must divide world size (4)");
  expect_throw_with(
      [] {
        ParallelSizes{4, 1, 3}.validate();
      },
      "balance_group (3) must divide world size (4)");
  expect_throw_with(
      [] {
        ParallelSizes{6, 4, 4}.validate();
      },
      "invalid parallel sizes (world 6, expert_parallel 4, balance_group 4): "
      "expert_parallel (4) must divide world size (6); balance_group (4) must "
      "divide world size (6)");
  expect_throw_with(
      [] {
        ParallelSizes{4, 0, -1}.validate();
      },
      "expert_parallel (0) must be >= 1; balance_group (-1) must be >= 0");
  expect_throw_with([] { ParallelSizes{0, 1, 0}.validate(); }, "world size (0) must be >= 1");
  EXPECT_NO_THROW((ParallelSizes{8, 4, 2}.validate()));
}

TEST(ProcessGroups, BuildRejectsSizesThatDoNotMatchTheJob) {
  const int R = test_world()->size();
  expect_throw_with(
      [&] { build_process_groups(ParallelSizes{R + 1}, MPI_COMM_WORLD); },
      c10::str("ParallelSizes.world (", R + 1, ") must equal the number of MPI ranks (", R, ")"));
  expect_throw_with(
      [&] {
        build_process_groups(ParallelSizes{R, R + 1}, MPI_COMM_WORLD);
      },
      c10::str("expert_parallel (", R + 1, ") must divide world size (", R, ")"));
}

TEST(ProcessGroups, NcclBackendNamesWhatIsMissingWhenNotBuilt) {
  if (nccl_available()) GTEST_SKIP() << "built with NCCL";
  expect_throw_with(
      [] {
        build_process_groups(ParallelSizes{test_world()->size()}, MPI_COMM_WORLD, Backend::Nccl);
      },
      "gbmoe was built without NCCL");
}

}  // namespace
}  // namespace gbmoe
