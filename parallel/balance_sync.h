// Connects the training objective (gbmoe::TrainingObjective) to the process groups: the count
// reducer over a Communicator, and the group that each balance scope reduces over.
#pragma once

#include <memory>

#include "moe/objective.h"
#include "parallel/communicator.h"
#include "parallel/process_groups.h"

namespace gbmoe {

/// CountReducer over a Communicator: an asynchronous sum of the count buffer in one round of
/// messages (Communicator::sum_one_round_async), so that a rank waiting for the counts waits
/// only for the other ranks to have routed, not for them to reach their own wait.
class CommunicatorCountReducer : public CountReducer {
 public:
  explicit CommunicatorCountReducer(std::shared_ptr<Communicator> comm);
  int64_t size() const override { return comm_->size(); }
  int64_t rank() const override { return comm_->rank(); }
  std::function<void()> sum_async(torch::Tensor& buffer) override;

 private:
  std::shared_ptr<Communicator> comm_;
};

/// The reducers an objective needs: the data-parallel world (every rank holds distinct data,
/// expert-parallel ranks included) for the step's tokens, and for the counts the world for
/// scope global, the balance group for group, none for micro and sequence. On one process both
/// are null. options.group_size must be resolved (balance_group_size).
///
/// Example:
///   TrainingObjective objective(model->moe_layers(), options, objective_reducers(options,
///   groups));
ObjectiveReducers objective_reducers(const BalanceOptions& options, const ProcessGroups& groups);

/// balance.group_size as the process groups need it: 0 = every data-parallel rank.
int64_t balance_group_size(int64_t group_size, int64_t data_parallel_size);

/// Sum of a double over the communicator's ranks (e.g. the valid tokens of a step).
double all_reduce_sum(Communicator& comm, double value);

}  // namespace gbmoe
