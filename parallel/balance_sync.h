// Connects model-level balancing (gbmoe::Balancer) to the process groups: the count reducer
// over a Communicator, and the group that each balance scope reduces over.
#pragma once

#include <memory>

#include "moe/balancer.h"
#include "parallel/communicator.h"
#include "parallel/process_groups.h"

namespace gbmoe {

/// CountReducer over a Communicator: an asynchronous all-reduce (sum) of the count buffer.
class CommunicatorCountReducer : public CountReducer {
 public:
  explicit CommunicatorCountReducer(std::shared_ptr<Communicator> comm);
  int64_t size() const override { return comm_->size(); }
  std::function<void()> sum_async(torch::Tensor& buffer) override;

 private:
  std::shared_ptr<Communicator> comm_;
};

/// The reducer a balance scope needs: the data-parallel world for global (every rank holds
/// distinct data, expert-parallel ranks included), the balance group for group, none for
/// micro and sequence.
///
/// Example:
///   Balancer balancer(model->moe_layers(), balance_reducer(options.balance(), groups));
std::shared_ptr<CountReducer> balance_reducer(const BalanceOptions& options,
                                              const ProcessGroups& groups);

/// Sum of a double over the communicator's ranks (e.g. the valid tokens of a step).
double all_reduce_sum(Communicator& comm, double value);

}  // namespace gbmoe
