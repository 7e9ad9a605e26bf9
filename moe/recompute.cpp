// Thread-local recompute flag.
#include "moe/recompute.h"

namespace gbmoe {
namespace {
thread_local bool recomputing = false;
}

bool is_recomputing() { return recomputing; }

RecomputeGuard::RecomputeGuard() : previous_(recomputing) { recomputing = true; }

RecomputeGuard::~RecomputeGuard() { recomputing = previous_; }

}  // namespace gbmoe
