// Named regions of the step profile (train/profile.h summarizes them): a RecordFunction of user
// scope, which costs one branch while no profiler runs.
#pragma once

#include <ATen/record_function.h>

/// Opens region `name` ("gbmoe::" name) until the end of the enclosing C++ scope. Regions nest;
/// a profile charges time to the innermost one.
///
/// Example:
///   { GBMOE_PROFILE_REGION("moe.router"); routed = router->forward(x_TD, mask_T); }
#define GBMOE_PROFILE_REGION(name) RECORD_USER_SCOPE("gbmoe::" name)
