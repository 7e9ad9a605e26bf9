// A communicator of one process, for saving and loading training states in single-process tests.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "parallel/communicator.h"

namespace gbmoe {

/// Every collective of one rank: the input is the result.
///
/// Example:
///   SingleCommunicator single;
///   gather_training_state(*model, optimizer, single).save_to(path);
struct SingleCommunicator : Communicator {
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend() const override { return "none"; }
  std::shared_ptr<Work> all_reduce_async(const torch::Tensor& t, ReduceOp) override {
    return std::make_shared<CompletedWork>(t);
  }
  torch::Tensor all_gather(const torch::Tensor& t) override { return t.unsqueeze(0); }
  std::shared_ptr<Work> all_to_all_async(const torch::Tensor& t, const std::vector<int64_t>&,
                                         const std::vector<int64_t>&) override {
    return std::make_shared<CompletedWork>(t);
  }
  void broadcast(const torch::Tensor&, int) override {}
  void barrier() override {}
};

}  // namespace gbmoe
