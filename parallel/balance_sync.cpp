// Count reducer over a Communicator, and the scope -> group mapping.
#include "parallel/balance_sync.h"

namespace gbmoe {

CommunicatorCountReducer::CommunicatorCountReducer(std::shared_ptr<Communicator> comm)
    : comm_(std::move(comm)) {
  TORCH_CHECK(comm_, "CommunicatorCountReducer needs a communicator");
}

std::function<void()> CommunicatorCountReducer::sum_async(torch::Tensor& buffer) {
  auto work = comm_->sum_one_round_async(buffer);
  return [work] { work->wait(); };
}

ObjectiveReducers objective_reducers(const BalanceOptions& options, const ProcessGroups& groups) {
  ObjectiveReducers r;
  if (groups.data_parallel->size() == 1) return r;
  r.data_parallel = std::make_shared<CommunicatorCountReducer>(groups.data_parallel);
  switch (options.scope()) {
    case BalanceScope::Global:
      r.counts = r.data_parallel;
      break;
    case BalanceScope::Group: {
      const int64_t g = balance_group_size(options.group_size(), groups.data_parallel->size());
      TORCH_CHECK(g == groups.sizes.resolved_balance_group(), "balance group_size (",
                  options.group_size(), ", ", g, " ranks) differs from the process groups' ",
                  "balance group (", groups.sizes.resolved_balance_group(), " ranks)");
      r.counts = std::make_shared<CommunicatorCountReducer>(groups.balance);
      break;
    }
    case BalanceScope::Micro:
    case BalanceScope::Sequence:
      break;
  }
  return r;
}

int64_t balance_group_size(int64_t group_size, int64_t data_parallel_size) {
  return group_size > 0 ? group_size : data_parallel_size;
}

double all_reduce_sum(Communicator& comm, double value) {
  auto t = torch::full({1}, value, torch::kDouble);
  comm.all_reduce(t, ReduceOp::Sum);
  return t.item<double>();
}

}  // namespace gbmoe
