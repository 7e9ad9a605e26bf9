// Every collective of the MPI communicator against values computed by hand on each rank, over
// several dtypes, strided tensors, uneven and zero all_to_all splits, and the autograd all_to_all.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <thread>

#include "parallel/mpi_communicator.h"
#include "tests/parallel/mpi_test_util.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

const std::vector<torch::ScalarType> kReduceDtypes = {
    torch::kFloat, torch::kDouble, torch::kBFloat16, torch::kHalf,
    torch::kInt,   torch::kLong,   torch::kByte};

// Rank r's contribution: small integers, exact in every dtype above, different per rank.
torch::Tensor contribution(int r, torch::ScalarType dtype) {
  return (torch::arange(12, torch::kLong).view({3, 4}) % 5 + 3 * r).to(dtype);
}

TEST(Collectives, AllReduceSumMaxAvgEqualHandComputed) {
  auto world = test_world();
  const int R = world->size();
  for (auto dtype : kReduceDtypes) {
    auto sum = torch::zeros({3, 4}, torch::kDouble),
         max = torch::full({3, 4}, -1.0, torch::kDouble);
    for (int r = 0; r < R; ++r) {
      sum += contribution(r, torch::kDouble);
      max = torch::maximum(max, contribution(r, torch::kDouble));
    }
    auto x = contribution(world->rank(), dtype);
    world->all_reduce(x, ReduceOp::Sum);
    EXPECT_EQ(x.scalar_type(), dtype);
    EXPECT_TRUE(torch::equal(x.to(torch::kDouble), sum)) << dtype;
    auto m = contribution(world->rank(), dtype);
    world->all_reduce(m, ReduceOp::Max);
    EXPECT_TRUE(torch::equal(m.to(torch::kDouble), max)) << dtype;
    if (torch::isFloatingType(dtype)) {
      auto a = contribution(world->rank(), dtype);
      world->all_reduce(a, ReduceOp::Avg);
      const double tol = dtype == torch::kBFloat16 ? 1e-2 : (dtype == torch::kHalf ? 1e-3 : 1e-7);
      EXPECT_LT(max_rel_diff(a, sum / R), tol) << dtype;
    }
  }
}

TEST(Collectives, AllReduceBoolIsLogicalOr) {
  auto world = test_world();
  auto x = torch::zeros({world->size() + 1}, torch::kBool);
  x[world->rank()] = true;
  world->all_reduce(x, ReduceOp::Sum);
  auto expected = torch::ones({world->size() + 1}, torch::kBool);
  expected[world->size()] = false;
  EXPECT_TRUE(torch::equal(x, expected));
}

TEST(Collectives, AllReduceWritesIntoStridedAndEmptyTensors) {
  auto world = test_world();
  const int R = world->size();
  auto base = torch::ones({4, 6}, torch::kFloat) * (world->rank() + 1);
  auto strided = base.t();  // (6, 4), not contiguous
  world->all_reduce(strided, ReduceOp::Sum);
  EXPECT_TRUE(torch::equal(base, torch::full({4, 6}, R * (R + 1) / 2.0)));
  auto column = base.select(1, 2);  // a strided view into base
  world->all_reduce(column, ReduceOp::Max);
  EXPECT_TRUE(torch::equal(base.select(1, 2), torch::full({4}, R * (R + 1) / 2.0)));
  auto empty = torch::empty({0, 3});
  world->all_reduce(empty, ReduceOp::Avg);
  EXPECT_EQ(empty.numel(), 0);
}

TEST(Collectives, AllReduceAsyncOverlapsSeveralOperations) {
  auto world = test_world();
  const int R = world->size();
  auto a = torch::full({1000}, world->rank() + 1.0, torch::kDouble);
  auto b = torch::full({64}, static_cast<float>(world->rank()), torch::kFloat);
  auto wa = world->all_reduce_async(a, ReduceOp::Sum);
  auto wb = world->all_reduce_async(b, ReduceOp::Max);
  auto busy = torch::randn({64, 64}).matmul(torch::randn({64, 64}));  // work while in flight
  wb->wait();
  wa->wait();
  EXPECT_TRUE(torch::equal(a, torch::full({1000}, R * (R + 1) / 2.0, torch::kDouble)));
  EXPECT_TRUE(torch::equal(b, torch::full({64}, R - 1.0f)));
  EXPECT_TRUE(wa->result().is_same(a));
}

TEST(Collectives, OneRoundSumEqualsTheAllReduceInOrderOfPosting) {
  auto world = test_world();
  for (auto dtype : {torch::kDouble, torch::kFloat, torch::kLong}) {
    auto expected = contribution(world->rank(), dtype);
    world->all_reduce(expected, ReduceOp::Sum);
    auto a = contribution(world->rank(), dtype), b = contribution(world->rank(), dtype) * 2;
    auto strided = contribution(world->rank(), dtype).t();
    auto wa = world->sum_one_round_async(a);
    auto wb = world->sum_one_round_async(b);  // two in flight: matched in the order posted
    auto ws = world->sum_one_round_async(strided);
    ws->wait();
    wb->wait();
    wa->wait();
    EXPECT_TRUE(torch::equal(a, expected)) << dtype;
    EXPECT_TRUE(torch::equal(b, expected * 2)) << dtype;
    EXPECT_TRUE(torch::equal(strided, expected.t())) << dtype;
    EXPECT_TRUE(wa->result().is_same(a));
  }
}

// A new MpiCommunicator over a duplicate of MPI_COMM_WORLD, with or without node shared memory.
std::shared_ptr<MpiCommunicator> world_copy(bool shared_memory) {
  MPI_Comm comm;
  GBMOE_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &comm));
  auto world = std::make_shared<MpiCommunicator>(comm, /*take_ownership=*/true);
  world->use_node_shared_memory(shared_memory);
  return world;
}

// What the balance counts rely on: a rank's wait needs the others only to have posted their
// sum. The last rank posts, then stays out of MPI for 3 s; the others' waits return long before.
// Through node shared memory this holds on any machine. By messages it is timed only when every
// rank has a core of its own: on an oversubscribed machine the sleeping rank's sends may not
// have left when its push passes end (seen once at 4 ranks on 2 cores under ctest -j2).
TEST(Collectives, OneRoundSumCompletesWhileAnotherRankComputes) {
  const int R = test_world()->size();
  if (R == 1) GTEST_SKIP() << "needs two ranks";
  for (bool shared : {true, false}) {
    auto world = world_copy(shared);
    auto x = torch::full({40}, world->rank() + 1.0, torch::kDouble);
    auto warm_up = x.clone();  // a first sum sets up the window, or MPI's connections
    world->sum_one_round_async(warm_up)->wait();
    world->barrier();
    const auto start = std::chrono::steady_clock::now();
    auto work = world->sum_one_round_async(x);
    if (world->rank() == R - 1) std::this_thread::sleep_for(std::chrono::seconds(3));
    work->wait();
    const double waited =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_EQ(world->uses_node_shared_sums(), shared);  // the test job runs on one node
    EXPECT_TRUE(torch::equal(x, torch::full({40}, R * (R + 1) / 2.0, torch::kDouble)));
    const bool own_cores = R <= static_cast<int>(std::thread::hardware_concurrency());
    if ((shared || own_cores) && world->rank() < R - 1) {
      EXPECT_LT(waited, 2.0) << "rank " << world->rank() << (shared ? ", shared memory" : "");
    }
    world->barrier();
  }
}

// Rank r's i-th buffer: values whose sum depends on the order of addition in fp32 and fp64.
torch::Tensor uneven_contribution(int r, int i, int64_t n, torch::ScalarType dtype) {
  torch::manual_seed(1000 * i + r);
  return (torch::randn({n}, torch::kDouble) * std::pow(10.0, r % 3 * 4)).to(dtype);
}

// Both paths add the rows in rank order: the same bits, for more sums in flight than the shared
// memory has slots, waited newest first, buffers up to a full slot, and larger ones (which go
// by messages) among them. The ranks post out of step (the last one starts 50 ms late, and rank
// r sleeps r ms before every seventh sum), so that early ranks reach slots whose earlier sums
// the late ones have not collected.
TEST(Collectives, OneRoundSumThroughSharedMemoryEqualsTheMessages) {
  const int R = test_world()->size();
  auto shared = world_copy(true), messages = world_copy(false);
  const int64_t slot_doubles = 32 << 10 >> 3;  // NodeSharedSum::kSlotBytes of doubles
  const std::vector<int64_t> sizes = {1, 3, 40, 257, slot_doubles, slot_doubles + 1};
  const int rank = shared->rank();
  for (auto dtype : {torch::kDouble, torch::kFloat}) {
    std::vector<torch::Tensor> a, b;
    std::vector<std::shared_ptr<Work>> works;
    const int n_sums = 3 * 16 + 5;  // three times NodeSharedSum::kSlots, and some
    if (rank == R - 1) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    for (int i = 0; i < n_sums; ++i) {
      if (i % 7 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(rank));
      const int64_t n = sizes[i % sizes.size()];
      a.push_back(uneven_contribution(rank, i, n, dtype));
      b.push_back(a.back().clone());
      works.push_back(shared->sum_one_round_async(a.back()));
    }
    for (int i = n_sums - 1; i >= 0; --i) works[i]->wait();
    for (int i = 0; i < n_sums; ++i) messages->sum_one_round_async(b[i])->wait();
    for (int i = 0; i < n_sums; ++i) {
      EXPECT_TRUE(torch::equal(a[i], b[i])) << dtype << " sum " << i;
      auto expected = torch::zeros_like(a[i]);
      for (int r = 0; r < R; ++r) expected += uneven_contribution(r, i, a[i].numel(), dtype);
      EXPECT_TRUE(torch::equal(a[i], expected)) << dtype << " sum " << i << " in rank order";
    }
  }
  EXPECT_EQ(shared->uses_node_shared_sums(), R > 1);
  EXPECT_FALSE(messages->uses_node_shared_sums());
}

// A Work dropped unwaited finishes in its destructor; one that outlives its communicator was
// collected when the communicator went, and its wait still gives the sum.
TEST(Collectives, OneRoundSumsDroppedOrOutlivingTheirCommunicatorComplete) {
  const int R = test_world()->size();
  auto world = world_copy(true);
  auto dropped = torch::full({5}, world->rank() + 1.0, torch::kDouble);
  world->sum_one_round_async(dropped);  // the Work is destroyed at once
  EXPECT_TRUE(torch::equal(dropped, torch::full({5}, R * (R + 1) / 2.0, torch::kDouble)));
  auto x = torch::full({7}, world->rank() + 1.0, torch::kDouble);
  auto work = world->sum_one_round_async(x);
  world.reset();  // the last reference: the communicator and its windows go
  work->wait();
  EXPECT_TRUE(torch::equal(x, torch::full({7}, R * (R + 1) / 2.0, torch::kDouble)));
}

// Large all-reduces through node shared memory: each element added in rank order (the same bits
// as adding the ranks' buffers by hand in that order), over sizes below the shared-memory
// minimum, within one chunk, and over several chunks with an uneven last one, strided, in 16-bit
// floats (reduced in fp32), integers, and max.
TEST(Collectives, LargeAllReduceThroughSharedMemoryAddsInRankOrder) {
  const int R = test_world()->size();
  auto world = world_copy(true), messages = world_copy(false);
  const int64_t chunk_floats = int64_t{4} << 20 >> 2;  // NodeSharedAllReduce::kSegmentBytes
  const int64_t min_bytes = int64_t{64} << 10;         // NodeSharedAllReduce::kMinBytes
  const std::vector<int64_t> sizes = {1000, chunk_floats - 7, 2 * chunk_floats + 4099};
  for (auto dtype : {torch::kFloat, torch::kDouble, torch::kBFloat16, torch::kLong}) {
    // Rank r's buffer, as the dtype's values in the dtype the reduction adds them in.
    const auto reduced_in = dtype == torch::kBFloat16 ? torch::kFloat : dtype;
    for (int64_t n : sizes) {
      auto of_rank = [&](int r) {
        auto x = uneven_contribution(r, static_cast<int>(n % 97), n, torch::kDouble);
        if (dtype == torch::kLong) x = (x * 1000).round();
        return x.to(dtype).to(reduced_in);
      };
      auto sum = of_rank(0), max = of_rank(0);
      for (int r = 1; r < R; ++r) {
        sum += of_rank(r);
        max = torch::maximum(max, of_rank(r));
      }
      for (auto op : {ReduceOp::Sum, ReduceOp::Max}) {
        auto x = of_rank(world->rank()).to(dtype), y = x.clone();
        // Out of step: a late rank keeps the others waiting in a phase.
        std::this_thread::sleep_for(std::chrono::milliseconds((world->rank() * 3 + n) % 5));
        world->all_reduce(x, op);
        messages->all_reduce(y, op);
        if (n * c10::elementSize(reduced_in) >= min_bytes) {
          EXPECT_TRUE(torch::equal(x, (op == ReduceOp::Sum ? sum : max).to(dtype)))
              << dtype << " n " << n << " " << to_string(op);
        } else {  // by MPI: its order of addition
          EXPECT_TRUE(torch::equal(x, y)) << dtype << " n " << n << " " << to_string(op);
        }
      }
    }
  }
  auto base = torch::full({1024, 96}, world->rank() + 1.0f);
  auto strided = base.t();  // 384 KiB, not contiguous
  world->all_reduce(strided, ReduceOp::Avg);
  EXPECT_TRUE(torch::equal(base, torch::full({1024, 96}, (R + 1) / 2.0f)));
  EXPECT_EQ(world->uses_node_shared_all_reduce(), R > 1);
  EXPECT_FALSE(messages->uses_node_shared_all_reduce());
}

// DataParallel's gradient average: the tensors straight through the shared window give the bits
// of the staged default (one buffer, all-reduced, divided back out) and of the sum in rank order
// divided by hand, for pieces straddling the 4 MiB chunks and the ranks' shares (an empty one
// among them), a divisor other than the group size, and one rank passing a strided tensor (it
// takes the default path while the others do not). A bf16 set and a set below the minimum stay
// on the default path.
TEST(Collectives, SumDividedThroughSharedMemoryEqualsTheStagedPath) {
  const int R = test_world()->size();
  auto world = world_copy(true), messages = world_copy(false);
  const int64_t chunk_floats = int64_t{4} << 20 >> 2;  // NodeSharedAllReduce::kSegmentBytes
  struct Case {
    std::vector<int64_t> sizes;
    torch::ScalarType dtype;
    bool strided_on_last_rank;
  };
  const std::vector<Case> cases = {
      {{5, chunk_floats - 3, 0, 2 * chunk_floats / 3, 17, chunk_floats + 11}, torch::kFloat, false},
      {{300000, 7}, torch::kDouble, false},
      {{40000, 40000}, torch::kFloat, true},
      {{100000}, torch::kBFloat16, false},
      {{1000, 24}, torch::kFloat, false},  // 4 KiB: by MPI
  };
  const double divisor = 3.0;
  for (size_t c = 0; c < cases.size(); ++c) {
    const auto& k = cases[c];
    auto of_rank = [&](int r) {
      std::vector<torch::Tensor> out;
      for (size_t i = 0; i < k.sizes.size(); ++i) {
        out.push_back(
            uneven_contribution(r, static_cast<int>(10 * c + i), k.sizes[i], torch::kDouble)
                .to(k.dtype));
      }
      return out;
    };
    const auto mine = of_rank(world->rank());
    std::vector<torch::Tensor> direct, staged, by_mpi;
    int64_t total = 0;
    for (const auto& t : mine) {
      direct.push_back(t.clone()), staged.push_back(t.clone()), by_mpi.push_back(t.clone());
      total += t.numel();
    }
    if (k.strided_on_last_rank && world->rank() == R - 1) {
      auto wide = torch::zeros({mine[0].numel(), 2}, mine[0].options());
      direct[0] = wide.select(1, 0);
      direct[0].copy_(mine[0]);
    }
    const bool shared =
        k.dtype != torch::kBFloat16 && total * c10::elementSize(k.dtype) >= 64 << 10;
    // Straight through the window, staging stays as it was (NaN); the default writes into it.
    auto staging = torch::full({total + 5}, std::nan(""), torch::TensorOptions(k.dtype));
    world->sum_divided(direct, divisor, staging);
    const bool direct_path = R > 1 && shared && !(k.strided_on_last_rank && world->rank() == R - 1);
    EXPECT_EQ(staging.isnan().all().item<bool>(), direct_path) << "case " << c;
    world->Communicator::sum_divided(staged, divisor, staging);
    messages->sum_divided(by_mpi, divisor, staging);
    for (size_t i = 0; i < mine.size(); ++i) {
      EXPECT_TRUE(torch::equal(direct[i], staged[i])) << "case " << c << " piece " << i;
      if (shared) {
        auto expected = of_rank(0)[i];
        for (int r = 1; r < R; ++r) expected = expected + of_rank(r)[i];
        expected = expected / torch::scalar_tensor(divisor, k.dtype);
        EXPECT_TRUE(torch::equal(direct[i], expected)) << "case " << c << " piece " << i;
      } else if (k.dtype != torch::kBFloat16) {  // MPI's order of addition, on both
        EXPECT_TRUE(torch::equal(direct[i], by_mpi[i])) << "case " << c << " piece " << i;
      }
      EXPECT_TRUE(torch::allclose(direct[i].to(torch::kDouble), by_mpi[i].to(torch::kDouble), 1e-2,
                                  1e-2 * std::pow(10.0, (R - 1) % 3 * 4)))
          << "case " << c << " piece " << i;
    }
  }
  EXPECT_EQ(world->uses_node_shared_all_reduce(), R > 1);
  // A staging buffer that could not hold the tensors fails on every rank, whichever path it
  // would have taken.
  auto x = torch::ones({100000});
  expect_throw_with([&] { world->sum_divided({x}, 2.0, torch::empty({10})); },
                    "must be a contiguous 1-dim buffer of the tensors' dtype and device");
  expect_throw_with([&] { world->sum_divided({x}, 2.0, torch::empty({100000}, torch::kDouble)); },
                    "with at least 100000 elements");
}

TEST(Collectives, OneRoundSumNamesAPeerThatPostedAnotherSize) {
  const int R = test_world()->size();
  if (R == 1) GTEST_SKIP() << "needs two ranks";
  auto world = world_copy(true);
  auto x = torch::ones({world->rank() == 0 ? 4 : 5}, torch::kDouble);
  expect_throw_with([&] { world->sum_one_round_async(x)->wait(); },
                    "every rank must sum buffers of the same shape and dtype");
  world->barrier();
}

TEST(Collectives, AllReduceAvgRejectsIntegers) {
  auto x = torch::ones({2}, torch::kLong);
  expect_throw_with([&] { test_world()->all_reduce(x, ReduceOp::Avg); },
                    "all_reduce with avg needs a floating-point tensor, got Long");
}

TEST(Collectives, AllGatherConcatenatesRanksInOrder) {
  auto world = test_world();
  const int R = world->size();
  for (auto dtype :
       {torch::kFloat, torch::kDouble, torch::kBFloat16, torch::kInt, torch::kLong, torch::kBool}) {
    auto x = contribution(world->rank(), torch::kLong).t().remainder(2).to(dtype);  // strided
    auto gathered = world->all_gather(x);
    std::vector<torch::Tensor> parts;
    for (int r = 0; r < R; ++r)
      parts.push_back(contribution(r, torch::kLong).t().remainder(2).to(dtype));
    EXPECT_TRUE(torch::equal(gathered, torch::cat(parts))) << dtype;
  }
  auto scalar = torch::tensor(static_cast<int64_t>(world->rank()) * 10);
  EXPECT_TRUE(torch::equal(world->all_gather(scalar), torch::arange(R, torch::kLong) * 10));
}

// Rows that rank src sends to rank dst: (src + 2 dst) % 3 of them, zero allowed.
int64_t rows_between(int src, int dst) { return (src + 2 * dst) % 3; }

// Row i from src to dst, 2 columns: encodes (src, dst, i) so misplaced rows are visible.
torch::Tensor rows_from(int src, int dst, torch::ScalarType dtype) {
  const int64_t n = rows_between(src, dst);
  auto i = torch::arange(n, torch::kLong).unsqueeze(1);
  return torch::cat({i + 10 * dst + 40 * src, -i}, 1).to(dtype);
}

TEST(Collectives, AllToAllUnevenSplitsEqualHandComputed) {
  auto world = test_world();
  const int R = world->size(), me = world->rank();
  for (auto dtype :
       {torch::kFloat, torch::kDouble, torch::kBFloat16, torch::kInt, torch::kLong, torch::kByte}) {
    std::vector<int64_t> send(R), recv(R);
    std::vector<torch::Tensor> outgoing, expected;
    for (int j = 0; j < R; ++j) {
      send[j] = rows_between(me, j);
      recv[j] = rows_between(j, me);
      outgoing.push_back(rows_from(me, j, dtype));
      expected.push_back(rows_from(j, me, dtype));
    }
    auto out = world->all_to_all(torch::cat(outgoing), send, recv);
    EXPECT_TRUE(torch::equal(out, torch::cat(expected))) << dtype;
    auto work = world->all_to_all_async(torch::cat(outgoing).view({-1, 2, 1}), send, recv);
    work->wait();
    EXPECT_TRUE(torch::equal(work->result(), torch::cat(expected).view({-1, 2, 1}))) << dtype;
  }
}

TEST(Collectives, AllToAllWithNothingToSend) {
  auto world = test_world();
  const int R = world->size();
  std::vector<int64_t> zeros(R, 0);
  auto out = world->all_to_all(torch::empty({0, 5}), zeros, zeros);
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{0, 5}));
}

TEST(Collectives, AllToAllChecksSplitsWithValues) {
  auto world = test_world();
  const int R = world->size();
  std::vector<int64_t> ones(R, 1);
  expect_throw_with(
      [&] {
        world->all_to_all(torch::zeros({R + 1, 2}), ones, ones);
      },
      c10::str("send_splits sum to ", R, " but the input has ", R + 1, " rows"));
  expect_throw_with(
      [&] {
        world->all_to_all(torch::zeros({1, 2}), {1}, {1, 0, 0, 0, 0});
      },
      c10::str("recv_splits 5 entries for a group of size ", R));
}

TEST(Collectives, AllToAllAutogradSendsGradientsHome) {
  auto world = test_world();
  const int R = world->size(), me = world->rank();
  std::vector<int64_t> send(R), recv(R);
  std::vector<torch::Tensor> outgoing;
  for (int j = 0; j < R; ++j) {
    send[j] = rows_between(me, j);
    recv[j] = rows_between(j, me);
    outgoing.push_back(rows_from(me, j, torch::kDouble));
  }
  auto x = torch::cat(outgoing).requires_grad_(true);
  auto y = all_to_all_autograd(world, x * 3, send, recv);
  // d/dy of 0.5 * sum(y^2) is y itself; home again it is 3x, times 3 from x * 3.
  (0.5 * y.square().sum()).backward();
  EXPECT_TRUE(torch::allclose(x.grad(), 9 * x.detach()));
}

TEST(Collectives, BroadcastCopiesRootIntoEveryRank) {
  auto world = test_world();
  const int root = world->size() - 1;
  for (auto dtype : {torch::kFloat, torch::kBFloat16, torch::kLong, torch::kBool}) {
    auto base = torch::full({3, 5}, world->rank() == root ? 1 : 0, dtype);
    auto strided = base.t();
    world->broadcast(strided, root);
    EXPECT_TRUE(torch::equal(base, torch::ones({3, 5}, dtype))) << dtype;
  }
  auto x = torch::zeros({1});
  expect_throw_with(
      [&] { world->broadcast(x, world->size()); },
      c10::str("broadcast root (", world->size(), ") must be in [0, ", world->size()));
  world->barrier();
}

TEST(Collectives, MpiErrorsCarryFileLineAndMpiText) {
  auto* mpi = dynamic_cast<MpiCommunicator*>(test_world().get());
  ASSERT_NE(mpi, nullptr);
  int value = 0;
  // Every rank passes the same invalid root, so the call fails the same way everywhere.
  expect_throw_with([&] { GBMOE_MPI_CHECK(MPI_Bcast(&value, 1, MPI_INT, -5, mpi->comm())); },
                    "MPI_ERR_ROOT");
  expect_throw_with([&] { GBMOE_MPI_CHECK(MPI_Bcast(&value, 1, MPI_INT, -5, mpi->comm())); },
                    "in MPI_Bcast(&value, 1, MPI_INT, -5, mpi->comm()) at ");
  expect_throw_with([&] { GBMOE_MPI_CHECK(MPI_Bcast(&value, 1, MPI_INT, -5, mpi->comm())); },
                    "collectives_test.cpp:");
}

TEST(Collectives, MpiRejectsUnsupportedDtypesByName) {
  expect_throw_with([] { mpi_datatype(torch::kComplexFloat); },
                    "does not support dtype ComplexFloat");
}

}  // namespace
}  // namespace gbmoe
