// The CPU buffer cache: large buffers are reused by size, small ones are not cached, the cap
// holds, the raw and clone interfaces work, and cached buffers are eligible for huge pages.
// Each test runs in its own process (gtest_discover_tests), so installing changes no other test.
#include "moe/cpu_buffer_cache.h"

#include <c10/core/CPUAllocator.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "moe/moe_layer.h"
#include "moe/objective.h"
#include "tests/test_util.h"

namespace gbmoe {
namespace {

constexpr size_t kMiB = size_t{1} << 20;

torch::Tensor floats(size_t bytes) { return torch::empty({static_cast<int64_t>(bytes / 4)}); }

TEST(CpuBufferCache, ReusesFreedLargeBuffersBySize) {
  ASSERT_TRUE(install_cpu_buffer_cache());
  release_cpu_buffer_cache();
  const auto before = cpu_buffer_cache_stats();
  void* first;
  {
    auto t = floats(3 * kMiB);  // rounded up to 4 MiB
    first = t.data_ptr();
    EXPECT_EQ(reinterpret_cast<uintptr_t>(first) % (2 * kMiB), 0u);
    EXPECT_EQ(cpu_buffer_cache_stats().live_bytes, before.live_bytes + 4 * kMiB);
  }
  EXPECT_EQ(cpu_buffer_cache_stats().cached_bytes, 4 * kMiB);
  auto again = floats(4 * kMiB - 64);  // another size with the same rounding
  EXPECT_EQ(again.data_ptr(), first);
  const auto after = cpu_buffer_cache_stats();
  EXPECT_EQ(after.reused, before.reused + 1);
  EXPECT_EQ(after.fresh, before.fresh + 1);
  EXPECT_EQ(after.cached_bytes, 0u);
  auto other = floats(6 * kMiB);  // a different size does not take it
  EXPECT_NE(other.data_ptr(), first);
}

TEST(CpuBufferCache, LeavesSmallBuffersToLibTorch) {
  ASSERT_TRUE(install_cpu_buffer_cache());
  const auto before = cpu_buffer_cache_stats();
  { auto t = floats(64 * 1024); }
  const auto after = cpu_buffer_cache_stats();
  EXPECT_EQ(after.fresh, before.fresh);
  EXPECT_EQ(after.cached_bytes, before.cached_bytes);
}

TEST(CpuBufferCache, KeepsNoMoreThanItsCap) {
  CpuBufferCacheOptions options;
  options.max_cached_bytes = 4 * kMiB;
  ASSERT_TRUE(install_cpu_buffer_cache(options));
  release_cpu_buffer_cache();
  { auto a = floats(4 * kMiB), b = floats(4 * kMiB); }
  EXPECT_EQ(cpu_buffer_cache_stats().cached_bytes, 4 * kMiB);
  release_cpu_buffer_cache();
  EXPECT_EQ(cpu_buffer_cache_stats().cached_bytes, 0u);
}

TEST(CpuBufferCache, RawAndCloneInterfacesWork) {
  ASSERT_TRUE(install_cpu_buffer_cache());
  c10::Allocator* allocator = c10::GetCPUAllocator();
  const size_t n = 5 * kMiB;
  void* raw = allocator->raw_allocate(n);
  std::memset(raw, 7, n);
  auto copy = allocator->clone(raw, n);
  EXPECT_EQ(std::memcmp(copy.get(), raw, n), 0);
  const auto live = cpu_buffer_cache_stats().live_bytes;
  allocator->raw_deallocate(raw);
  EXPECT_EQ(cpu_buffer_cache_stats().live_bytes, live - 6 * kMiB);
  void* small = allocator->raw_allocate(100);
  allocator->raw_deallocate(small);
}

TEST(CpuBufferCache, RejectsThresholdsBelowAHugePage) {
  CpuBufferCacheOptions options;
  options.min_bytes = 4096;
  expect_throw_with([&] { install_cpu_buffer_cache(options); },
                    "CpuBufferCacheOptions::min_bytes (4096) must be >= 2097152");
}

// A request takes the smallest cached buffer with at most a quarter to spare.
TEST(CpuBufferCache, ReusesALargerBufferWithinAQuarter) {
  ASSERT_TRUE(install_cpu_buffer_cache());
  release_cpu_buffer_cache();
  void* ten;
  {
    auto t = floats(10 * kMiB);
    ten = t.data_ptr();
  }
  {
    auto six = floats(6 * kMiB);  // 10 MiB would waste more than a quarter
    EXPECT_NE(six.data_ptr(), ten);
  }
  auto eight = floats(8 * kMiB);
  EXPECT_EQ(eight.data_ptr(), ten);
}

// Past the cap the least recently freed buffers go back to the system.
TEST(CpuBufferCache, EvictsTheLeastRecentlyFreed) {
  CpuBufferCacheOptions options;
  options.max_cached_bytes = 8 * kMiB;
  ASSERT_TRUE(install_cpu_buffer_cache(options));
  release_cpu_buffer_cache();
  auto a = floats(4 * kMiB), b = floats(4 * kMiB), c = floats(4 * kMiB);
  void* first = a.data_ptr();
  a = torch::Tensor();  // freed first: evicted when c comes back
  b = torch::Tensor();
  c = torch::Tensor();
  EXPECT_EQ(cpu_buffer_cache_stats().cached_bytes, 8 * kMiB);
  auto x = floats(4 * kMiB), y = floats(4 * kMiB);
  EXPECT_NE(x.data_ptr(), first);
  EXPECT_NE(y.data_ptr(), first);
  EXPECT_EQ(cpu_buffer_cache_stats().cached_bytes, 0u);
}

// Threads allocating, filling, checking and freeing buffers of mixed sizes through a small cache
// never see each other's bytes, and the books balance at the end.
TEST(CpuBufferCache, ConcurrentUseKeepsBuffersApart) {
  CpuBufferCacheOptions options;
  options.max_cached_bytes = 24 * kMiB;
  ASSERT_TRUE(install_cpu_buffer_cache(options));
  const auto before = cpu_buffer_cache_stats();
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([t, &bad] {
      for (int i = 0; i < 100; ++i) {
        const size_t bytes = (2 + (i * 7 + t * 3) % 9) * kMiB + 4096 * (i % 3);
        auto buf = torch::empty({static_cast<int64_t>(bytes)}, torch::kUInt8);
        auto* p = buf.data_ptr<uint8_t>();
        std::memset(p, t + 1, bytes);
        for (size_t j = 0; j < bytes; j += 4093) {
          if (p[j] != t + 1) ++bad;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
  const auto after = cpu_buffer_cache_stats();
  EXPECT_EQ(after.live_bytes, before.live_bytes);
  EXPECT_LE(after.cached_bytes, 24 * kMiB);
  EXPECT_GT(after.reused, before.reused);
}

// A MoE layer's step gives the same result with the cache (the buffers it reuses hold the last
// step's data, which nothing may read).
TEST(CpuBufferCache, LayerStepsMatchWithoutIt) {
  const auto start = cpu_buffer_cache_stats();
  if (start.fresh + start.reused > 0) {
    GTEST_SKIP() << "the cache already serves this process (run this test on its own)";
  }
  auto steps = [] {
    torch::manual_seed(0);
    MoELayer layer(MoELayerOptions(256, 8, 512).router(RouterOptions().top_k(2)));
    auto x = torch::randn({2048, 256}, torch::requires_grad());
    std::vector<torch::Tensor> out;
    TrainingObjective objective({layer}, BalanceOptions().scope(BalanceScope::Micro));
    for (int i = 0; i < 3; ++i) {
      objective.begin_step(1, static_cast<double>(x.size(0)));
      auto routing = objective.context();
      auto y = layer->forward(x, {}, &routing);
      (y.square().mean() + objective.micro_batch_loss(routing, torch::zeros({}))).backward();
      objective.end_step();
      out.push_back(y.detach().clone());
    }
    out.push_back(layer->experts->gate_up.grad().clone());
    out.push_back(x.grad().clone());
    return out;
  };
  auto plain = steps();
  ASSERT_TRUE(install_cpu_buffer_cache());
  auto cached = steps();
  EXPECT_GT(cpu_buffer_cache_stats().reused, 0);
  for (size_t i = 0; i < plain.size(); ++i) EXPECT_TRUE(torch::equal(plain[i], cached[i])) << i;
}

// The kernel's view of the mapping that holds p: its THPeligible line (Linux 5.0 on).
std::string thp_eligible(const void* p) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool inside = false;
  const auto addr = reinterpret_cast<uintptr_t>(p);
  while (std::getline(smaps, line)) {
    uintptr_t lo, hi;
    char dash;
    std::istringstream head(line);
    if (line.find(':') == std::string::npos || line.find('-') < line.find(' ')) {
      if (head >> std::hex >> lo >> dash >> hi && dash == '-') inside = lo <= addr && addr < hi;
    }
    if (inside && line.rfind("THPeligible:", 0) == 0) return line.substr(12);
  }
  return "";
}

TEST(CpuBufferCache, AdvisesHugePagesForCachedBuffers) {
  std::ifstream mode("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string modes;
  std::getline(mode, modes);
  if (modes.find("[madvise]") == std::string::npos) {
    GTEST_SKIP() << "transparent huge pages not in madvise mode here (" << modes
                 << "): the advice would not show";
  }
  ASSERT_TRUE(install_cpu_buffer_cache());
  auto t = floats(8 * kMiB);
  const std::string eligible = thp_eligible(t.data_ptr());
  if (eligible.empty()) GTEST_SKIP() << "kernel without THPeligible in /proc/self/smaps";
  EXPECT_NE(eligible.find('1'), std::string::npos) << "THPeligible:" << eligible;
}

}  // namespace
}  // namespace gbmoe
