// Count reducer over a Communicator, and the scope -> group mapping.
#include "parallel/balance_sync.h"

namespace gbmoe {

CommunicatorCountReducer::CommunicatorCountReducer(std::shared_ptr<Communicator> comm)
    : comm_(std::move(comm)) {
  TORCH_CHECK(comm_, "CommunicatorCountReducer needs a communicator");
}

std::function<void()> CommunicatorCountReducer::sum_async(torch::Tensor& buffer) {
  auto work = comm_->all_reduce_async(buffer, ReduceOp::Sum);
  return [work] { work->wait(); };
}

std::shared_ptr<CountReducer> balance_reducer(const BalanceOptions& options,
                                              const ProcessGroups& groups) {
  switch (options.scope()) {
    case BalanceScope::Global:
      return std::make_shared<CommunicatorCountReducer>(groups.data_parallel);
    case BalanceScope::Group:
      TORCH_CHECK(options.group_size() == groups.sizes.resolved_balance_group(),
                  "balance group_size (", options.group_size(),
                  ") differs from the process groups' balance group (",
                  groups.sizes.resolved_balance_group(), ")");
      return std::make_shared<CommunicatorCountReducer>(groups.balance);
    case BalanceScope::Micro:
    case BalanceScope::Sequence:
      return nullptr;
  }
  return nullptr;
}

double all_reduce_sum(Communicator& comm, double value) {
  auto t = torch::full({1}, value, torch::kDouble);
  comm.all_reduce(t, ReduceOp::Sum);
  return t.item<double>();
}

}  // namespace gbmoe
