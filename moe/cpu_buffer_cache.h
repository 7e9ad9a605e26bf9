// A LibTorch CPU allocator that keeps freed large buffers for reuse and asks the kernel to back
// them with transparent huge pages. A MoE training step allocates and frees the same large
// activation buffers every step; with glibc's defaults each of them is a fresh mapping whose
// pages fault in again, and with 4 KiB pages the GEMMs' packing walks miss the TLB.
#pragma once

#include <cstddef>
#include <cstdint>

namespace gbmoe {

/// What the cache keeps.
struct CpuBufferCacheOptions {
  /// Buffers of at least this many bytes (>= 2 MiB) are cached, rounded up to whole huge pages;
  /// smaller ones go to LibTorch's own CPU allocation. A request takes the smallest cached
  /// buffer that fits it with at most a quarter to spare.
  size_t min_bytes = size_t{2} << 20;
  /// Freed buffers beyond this many bytes in the cache are returned to the system, least
  /// recently freed first. (In AddressSanitizer builds nothing is kept.)
  size_t max_cached_bytes = size_t{2} << 30;
  /// madvise(MADV_HUGEPAGE) on the cached buffers (Linux; ignored elsewhere).
  bool huge_pages = true;
};

/// Makes the cache LibTorch's CPU allocator for tensors created from now on; tensors that exist
/// keep their own allocator. Call it once, early (before the model is built). Later calls only
/// change the options. Returns false where LibTorch is older than 2.3 (another allocator
/// interface): there it only tells glibc to keep freed memory (mallopt).
///
/// Example (first lines of main):
///   gbmoe::install_cpu_buffer_cache();
///   gbmoe::MoELayer layer(gbmoe::MoELayerOptions(512, 8, 1024));
bool install_cpu_buffer_cache(const CpuBufferCacheOptions& options = {});

/// What the cache holds and has done since it was installed.
struct CpuBufferCacheStats {
  size_t cached_bytes = 0;  // freed buffers kept for reuse
  size_t live_bytes = 0;    // cached-size buffers in use by tensors
  int64_t reused = 0;       // allocations served from the cache
  int64_t fresh = 0;        // allocations that took new memory
};

CpuBufferCacheStats cpu_buffer_cache_stats();

/// Returns every cached (free) buffer to the system.
void release_cpu_buffer_cache();

}  // namespace gbmoe
