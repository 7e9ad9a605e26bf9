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
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define GBMOE_ASAN
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define GBMOE_ASAN
#endif
#endif

#if defined(__GLIBC__)
#include <malloc.h>
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
#ifdef GBMOE_ASAN
    options_.max_cached_bytes = 0;  // reused memory would hide use-after-free from ASan
#endif
    min_bytes_.store(options.min_bytes);
    evict_to(options_.max_cached_bytes);
  }

  size_t min_bytes() const { return min_bytes_.load(); }

  void* take(size_t n) {
    const size_t size = (n + kHugePage - 1) / kHugePage * kHugePage;
    bool huge_pages;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The smallest cached buffer that fits, if it wastes at most a quarter of the request.
      auto it = by_size_.lower_bound(size);
      if (it != by_size_.end() && it->first <= size + size / 4) {
        const auto entry = it->second;
        void* p = entry->ptr;
        const size_t got = entry->size;
        by_size_.erase(it);
        lru_.erase(entry);
        stats_.cached_bytes -= got;
        stats_.live_bytes += got;
        ++stats_.reused;
        live_[p] = got;
        return p;
      }
      huge_pages = options_.huge_pages;
    }
    void* p = aligned(size);
    if (!p) {  // give the cached buffers back and try once more
      release_all();
      p = aligned(size);
    }
    if (!p) {
      const auto st = stats();
      TORCH_CHECK(false, "gbmoe CPU buffer cache: out of memory allocating ", n,
                  " bytes (tensors hold ", st.live_bytes,
                  " bytes of cached-size buffers; lower the batch, or "
                  "CpuBufferCacheOptions::max_cached_bytes / train.cpu_buffer_cache_mib)");
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (huge_pages) madvise(p, size, MADV_HUGEPAGE);  // advice only: failure changes nothing
#endif
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.live_bytes += size;
    ++stats_.fresh;
    live_[p] = size;
    return p;
  }

  // Keeps p for reuse, dropping the least recently freed buffers past max_cached_bytes; false if
  // p is not one of ours.
  bool give_back(void* p) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = live_.find(p);
    if (it == live_.end()) return false;
    const size_t size = it->second;
    live_.erase(it);
    stats_.live_bytes -= size;
    lru_.push_front({p, size});
    by_size_.emplace(size, lru_.begin());
    stats_.cached_bytes += size;
    evict_to(options_.max_cached_bytes);
    return true;
  }

  void release_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    evict_to(0);
  }

  CpuBufferCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }

 private:
  struct Cached {
    void* ptr;
    size_t size;
  };
  using Lru = std::list<Cached>;  // most recently freed first

  static void* aligned(size_t size) {
    void* p = nullptr;
    return posix_memalign(&p, kHugePage, size) == 0 ? p : nullptr;
  }

  // Frees the least recently freed buffers until at most limit bytes stay cached. Holds mutex_.
  void evict_to(size_t limit) {
    while (stats_.cached_bytes > limit) {
      const Cached oldest = lru_.back();
      auto range = by_size_.equal_range(oldest.size);
      for (auto it = range.first; it != range.second; ++it) {
        if (it->second->ptr == oldest.ptr) {
          by_size_.erase(it);
          break;
        }
      }
      lru_.pop_back();
      stats_.cached_bytes -= oldest.size;
      std::free(oldest.ptr);
    }
  }

  std::mutex mutex_;
  CpuBufferCacheOptions options_;
  std::atomic<size_t> min_bytes_{CpuBufferCacheOptions().min_bytes};
  std::unordered_map<void*, size_t> live_;  // buffer -> its size
  Lru lru_;
  std::multimap<size_t, Lru::iterator> by_size_;
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
  TORCH_CHECK(options.min_bytes >= kHugePage, "CpuBufferCacheOptions::min_bytes (",
              options.min_bytes, ") must be >= ", kHugePage,
              " (2 MiB): cached buffers take whole huge pages");
#ifdef GBMOE_HAS_ALLOCATOR_API
  cache().set_options(options);
  static auto* allocator = new CachingCpuAllocator();  // SetAllocator wants static lifetime
  static std::once_flag installed;
  std::call_once(installed,
                 [] { c10::SetAllocator(c10::DeviceType::CPU, allocator, /*priority=*/255); });
  return true;
#else
#if defined(__GLIBC__)
  // The next best thing: glibc keeps freed memory instead of unmapping it.
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
#endif
  return false;
#endif
}

CpuBufferCacheStats cpu_buffer_cache_stats() { return cache().stats(); }

void release_cpu_buffer_cache() { cache().release_all(); }

}  // namespace gbmoe
