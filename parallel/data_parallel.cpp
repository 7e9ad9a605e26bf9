// DataParallel: bucket layout, parameter broadcast, fused gradient averaging.
#include "parallel/data_parallel.h"

#include <map>
#include <set>
#include <tuple>

#include "moe/experts.h"

namespace gbmoe {

ExpertParameterRule expert_parameter_rule(const torch::nn::Module& model) {
  std::set<std::string> names;
  auto mark = [&](const torch::nn::Module& module, const std::string& prefix) {
    const auto* experts = dynamic_cast<const GroupedExpertsImpl*>(&module);
    if (!experts || experts->shards <= 1) return;
    for (const auto& p : experts->named_parameters(/*recurse=*/false)) {
      names.insert(prefix.empty() ? p.key() : prefix + "." + p.key());
    }
  };
  mark(model, "");  // the model itself may be the experts (and need not be in a shared_ptr)
  for (const auto& item : model.named_modules("", /*include_self=*/false)) {
    mark(*item.value(), item.key());
  }
  return [names = std::move(names)](const std::string& name) { return names.count(name) > 0; };
}

void DataParallelOptions::validate() const {
  TORCH_CHECK(bucket_bytes() > 0, "bucket_bytes (", bucket_bytes(), ") must be > 0");
}

DataParallel::DataParallel(std::shared_ptr<torch::nn::Module> module,
                           std::shared_ptr<Communicator> data_parallel,
                           std::shared_ptr<Communicator> expert_data_parallel,
                           DataParallelOptions options)
    : module_(std::move(module)),
      data_parallel_(std::move(data_parallel)),
      expert_data_parallel_(std::move(expert_data_parallel)),
      options_(std::move(options)) {
  options_.validate();
  TORCH_CHECK(module_, "DataParallel needs a module, got null");
  if (!options_.expert_rule()) options_.expert_rule(expert_parameter_rule(*module_));
  TORCH_CHECK(data_parallel_, "DataParallel needs a data-parallel communicator, got null");
  if (expert_data_parallel_) {
    TORCH_CHECK(data_parallel_->size() % expert_data_parallel_->size() == 0,
                "expert-data-parallel size (", expert_data_parallel_->size(),
                ") must divide data-parallel size (", data_parallel_->size(), ")");
  }
  // Open bucket of each (expert, dtype, device); reverse registration order approximates the
  // order in which backward finishes the gradients.
  using Key = std::tuple<bool, int, std::string>;
  std::map<Key, size_t> open;
  std::vector<int64_t> bucket_numel;
  auto named = module_->named_parameters(/*recurse=*/true);
  for (auto it = named.items().rbegin(); it != named.items().rend(); ++it) {
    const auto& name = it->key();
    const auto& p = it->value();
    if (!p.requires_grad()) continue;
    const bool expert = expert_data_parallel_ && options_.expert_rule()(name);
    const Key key{expert, static_cast<int>(p.scalar_type()), p.device().str()};
    const int64_t bytes = p.numel() * static_cast<int64_t>(p.element_size());
    auto found = open.find(key);
    if (found == open.end() ||
        (bucket_numel[found->second] * static_cast<int64_t>(p.element_size()) + bytes >
             options_.bucket_bytes() &&
         bucket_numel[found->second] > 0)) {
      buckets_.emplace_back();
      buckets_.back().expert = expert;
      bucket_numel.push_back(0);
      open[key] = buckets_.size() - 1;
      found = open.find(key);
    }
    auto& bucket = buckets_[found->second];
    bucket.params.push_back(p);
    bucket.names.push_back(name);
    bucket_numel[found->second] += p.numel();
  }
  for (size_t b = 0; b < buckets_.size(); ++b) {
    buckets_[b].flat = torch::zeros({bucket_numel[b]}, buckets_[b].params.front().options());
  }
}

Communicator& DataParallel::comm_of(const GradientBucket& bucket) const {
  return bucket.expert ? *expert_data_parallel_ : *data_parallel_;
}

int64_t DataParallel::gradient_bytes() const {
  int64_t bytes = 0;
  for (const auto& bucket : buckets_) bytes += bucket.flat.nbytes();
  return bytes;
}

void DataParallel::broadcast_parameters() {
  TORCH_CHECK(pending_.empty(),
              "broadcast_parameters called between start_gradient_averaging and "
              "finish_gradient_averaging");
  torch::NoGradGuard no_grad;
  for (auto& bucket : buckets_) {
    int64_t offset = 0;
    for (const auto& p : bucket.params) {
      bucket.flat.narrow(0, offset, p.numel()).view(p.sizes()).copy_(p);
      offset += p.numel();
    }
    comm_of(bucket).broadcast(bucket.flat, 0);
    offset = 0;
    for (const auto& p : bucket.params) {
      p.copy_(bucket.flat.narrow(0, offset, p.numel()).view(p.sizes()));
      offset += p.numel();
    }
  }
  // Frozen parameters and buffers are few and small: one broadcast each.
  auto broadcast_one = [this](const std::string& name, const torch::Tensor& t) {
    const bool expert = expert_data_parallel_ && options_.expert_rule()(name);
    (expert ? *expert_data_parallel_ : *data_parallel_).broadcast(t, 0);
  };
  for (const auto& item : module_->named_parameters(/*recurse=*/true)) {
    if (!item.value().requires_grad()) broadcast_one(item.key(), item.value());
  }
  for (const auto& item : module_->named_buffers(/*recurse=*/true)) {
    broadcast_one(item.key(), item.value());
  }
}

namespace {

// Copies the bucket's gradients into its flat buffer; a missing gradient counts as zeros.
void flatten_gradients(GradientBucket& bucket) {
  int64_t offset = 0;
  for (size_t i = 0; i < bucket.params.size(); ++i) {
    const auto& p = bucket.params[i];
    const auto& grad = p.grad();
    auto slice = bucket.flat.narrow(0, offset, p.numel());
    if (grad.defined()) {
      TORCH_CHECK(!grad.is_sparse(), "DataParallel does not support sparse gradients (",
                  bucket.names[i], ")");
      slice.view(p.sizes()).copy_(grad);
    } else {
      slice.zero_();
    }
    offset += p.numel();
  }
}

// Writes sum / data_parallel_size back into the gradients (creating those that were missing),
// dividing on the way instead of in a pass of its own. Dense buckets were summed over the
// data-parallel group, expert ones over the replicas of their shard (see the class comment).
void unflatten_gradients(GradientBucket& bucket, int data_parallel_size) {
  const auto divisor = torch::scalar_tensor(data_parallel_size, bucket.flat.options());
  int64_t offset = 0;
  for (auto& p : bucket.params) {
    auto summed = bucket.flat.narrow(0, offset, p.numel()).view(p.sizes());
    auto& grad = p.mutable_grad();
    if (grad.defined()) {
      torch::div_out(grad, summed, divisor);
    } else {
      grad = summed / divisor;
    }
    offset += p.numel();
  }
}

}  // namespace

void DataParallel::average_gradients() {
  TORCH_CHECK(pending_.empty(),
              "average_gradients called between start_gradient_averaging and "
              "finish_gradient_averaging");
  torch::NoGradGuard no_grad;
  if (data_parallel_->size() == 1) {  // the average is the gradient: no copies through buckets
    for (auto& bucket : buckets_) {
      for (auto& p : bucket.params) {
        if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);  // as flattening would
      }
    }
    return;
  }
  // One bucket at a time with blocking collectives: MPI's blocking all-reduce is its fastest.
  // The bucket's flat buffer is the staging of a backend that needs one; the node-shared
  // all-reduce reads and writes the gradients where they are.
  std::vector<torch::Tensor> grads;
  for (auto& bucket : buckets_) {
    grads.clear();
    for (size_t i = 0; i < bucket.params.size(); ++i) {
      auto& p = bucket.params[i];
      auto& grad = p.mutable_grad();
      if (!grad.defined()) {
        grad = torch::zeros_like(p);
      } else {
        TORCH_CHECK(!grad.is_sparse(), "DataParallel does not support sparse gradients (",
                    bucket.names[i], ")");
      }
      grads.push_back(grad);
    }
    comm_of(bucket).sum_divided(grads, data_parallel_->size(), bucket.flat);
  }
}

void DataParallel::start_gradient_averaging() {
  TORCH_CHECK(pending_.empty(),
              "start_gradient_averaging called twice without finish_gradient_averaging");
  torch::NoGradGuard no_grad;
  for (auto& bucket : buckets_) {
    flatten_gradients(bucket);
    pending_.push_back(comm_of(bucket).all_reduce_async(bucket.flat, ReduceOp::Sum));
  }
}

void DataParallel::finish_gradient_averaging() {
  TORCH_CHECK(pending_.size() == buckets_.size(),
              "finish_gradient_averaging called without start_gradient_averaging");
  torch::NoGradGuard no_grad;
  for (size_t b = 0; b < buckets_.size(); ++b) {
    pending_[b]->wait();
    unflatten_gradients(buckets_[b], data_parallel_->size());
  }
  pending_.clear();
}

}  // namespace gbmoe
