// A thread-local flag for recomputed forwards (activation checkpointing): a router replaying
// given choices (RouterImpl::replay_routing) reuses the choices of the forward it recomputes.
// Balance statistics do not need it: the recomputation records into a scratch context.
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
