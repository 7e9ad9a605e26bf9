// A thread-local flag for recomputed forwards (activation checkpointing): balance statistics
// must count each micro-batch once, so layers do not report routing while it is set.
#pragma once

namespace gbmoe {

/// True while a RecomputeGuard is alive on this thread.
bool is_recomputing();

/// Marks the forwards run in its scope as recomputations.
///
/// Example:
///   { RecomputeGuard recompute; block->forward(saved_input); }  // in a checkpoint's backward
class RecomputeGuard {
 public:
  RecomputeGuard();
  ~RecomputeGuard();
  RecomputeGuard(const RecomputeGuard&) = delete;
  RecomputeGuard& operator=(const RecomputeGuard&) = delete;

 private:
  bool previous_;
};

}  // namespace gbmoe
