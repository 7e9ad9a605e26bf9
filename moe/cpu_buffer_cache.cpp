// The CPU buffer cache: large buffers come from a free list keyed by size (rounded up to whole
// huge pages), aligned to and advised for huge pages; small ones from LibTorch's alloc_cpu.
#include "moe/cpu_buffer_cache.h"

#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// c10::Allocator took its present form (non-const allocate, pure virtual copy_data) in 2.3.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
#define GBMOE_HAS_ALLOCATOR_API
#endif

namespace gbmoe {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

class BufferCache {
 public:
  void set_options(const CpuBufferCacheOptions& options) {
    std::lock_guard<std::mutex> lock(mutex_);
    options_ = options;
    min_bytes_.store(options.min_bytes);
  }

  size_t min_bytes() const { return min_bytes_.load(); }

  void* take(size_t n) {
    const size_t size = (n + kHugePage - 1) / kHugePage * kHugePage;
    bool huge_pages;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(size);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        stats_.cached_bytes -= size;
        stats_.live_bytes += size;
        ++stats_.reused;
        live_[p] = size;
        return p;
      }
      huge_pages = options_.huge_pages;
    }
    void* p = aligned(size);
    if (!p) {  // give the cached buffers back and try once more
      release_all();
      p = aligned(size);
    }
    TORCH_CHECK(p, "gbmoe CPU buffer cache: out of memory allocating ", n, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (huge_pages) madvise(p, size, MADV_HUGEPAGE);  // advice only: failure changes nothing
#endif
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.live_bytes += size;
    ++stats_.fresh;
    live_[p] = size;
    return p;
  }

  // Keeps p for reuse (or frees it past max_cached_bytes); false if p is not one of ours.
  bool give_back(void* p) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = live_.find(p);
    if (it == live_.end()) return false;
    const size_t size = it->second;
    live_.erase(it);
    stats_.live_bytes -= size;
    if (stats_.cached_bytes + size <= options_.max_cached_bytes) {
      free_[size].push_back(p);
      stats_.cached_bytes += size;
    } else {
      std::free(p);
    }
    return true;
  }

  void release_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [size, buffers] : free_) {
      for (void* p : buffers) std::free(p);
    }
    free_.clear();
    stats_.cached_bytes = 0;
  }

  CpuBufferCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }

 private:
  static void* aligned(size_t size) {
    void* p = nullptr;
    return posix_memalign(&p, kHugePage, size) == 0 ? p : nullptr;
  }

  std::mutex mutex_;
  CpuBufferCacheOptions options_;
  std::atomic<size_t> min_bytes_{CpuBufferCacheOptions().min_bytes};
  std::unordered_map<void*, size_t> live_;               // buffer -> rounded size
  std::unordered_map<size_t, std::vector<void*>> free_;  // rounded size -> buffers
  CpuBufferCacheStats stats_;
};

// Never destroyed: tensors may be freed while static objects are torn down.
BufferCache& cache() {
  static auto* c = new BufferCache();
  return *c;
}

// The deleter of every buffer the allocator hands out: cached buffers are huge-page aligned, so
// anything else goes straight back to alloc_cpu's free without taking the cache's lock.
void delete_buffer(void* p) {
  if (reinterpret_cast<uintptr_t>(p) % kHugePage == 0 && cache().give_back(p)) return;
  c10::free_cpu(p);
}

#ifdef GBMOE_HAS_ALLOCATOR_API
class CachingCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    void* p = n >= cache().min_bytes() ? cache().take(n) : c10::alloc_cpu(n);
    return {p, p, &delete_buffer, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &delete_buffer; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};
#endif

}  // namespace

bool install_cpu_buffer_cache(const CpuBufferCacheOptions& options) {
#ifdef GBMOE_HAS_ALLOCATOR_API
  TORCH_CHECK(options.min_bytes > 0, "CpuBufferCacheOptions min_bytes (", options.min_bytes,
              ") must be > 0");
  cache().set_options(options);
  static auto* allocator = new CachingCpuAllocator();  // SetAllocator wants static lifetime
  static std::once_flag installed;
  std::call_once(installed,
                 [] { c10::SetAllocator(c10::DeviceType::CPU, allocator, /*priority=*/255); });
  return true;
#else
  (void)options;
  return false;
#endif
}

CpuBufferCacheStats cpu_buffer_cache_stats() { return cache().stats(); }

void release_cpu_buffer_cache() { cache().release_all(); }

}  // namespace gbmoe
