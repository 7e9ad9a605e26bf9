// RoutingMonitor: the trainer's routing metrics, TensorBoard, traces and expert loads.
#include "train/routing_monitor.h"

#include <filesystem>
#include <fstream>

namespace gbmoe {
namespace fs = std::filesystem;

RoutingMonitor::RoutingMonitor(const Config& config, std::vector<MoELayer> layers,
                               std::vector<std::string> domains, int rank, bool resumed)
    : layers_(std::move(layers)), rank_(rank), trace_every_(config.train.routing_trace_every) {
  const auto L = static_cast<int64_t>(layers_.size());
  const fs::path run(config.train.run_dir);
  if (!config.train.routing_replay.empty() && L > 0) {
    // Read before this run's own trace is opened, which may truncate it.
    const fs::path source = config.train.routing_replay;
    const auto source_dir = fs::is_directory(source) ? source : source.parent_path();
    TORCH_CHECK(trace_every_ == 0 ||
                    fs::weakly_canonical(source_dir) != fs::weakly_canonical(run / "traces"),
                "train.routing_replay (", config.train.routing_replay,
                ") is this run's own trace directory, which it rewrites; replay another run's");
    replay_path_ = config.train.routing_replay;
    auto trace = read_routing_trace(routing_trace_files(replay_path_));
    const auto& h = trace.header;
    const auto& o = layers_[0]->options;
    if (h.num_experts != o.num_experts() || h.top_k != o.router().top_k() || h.num_layers != L) {
      throw std::invalid_argument(
          "train.routing_replay (" + replay_path_ + ") traces " + std::to_string(h.num_layers) +
          " MoE layers of top-" + std::to_string(h.top_k) + " of " + std::to_string(h.num_experts) +
          " experts; this model has " + std::to_string(L) + " of top-" +
          std::to_string(o.router().top_k()) + " of " + std::to_string(o.num_experts()));
    }
    for (auto& rec : trace.records) {
      if (rec.rank == rank) {
        const auto key = std::make_tuple(rec.step, rec.micro_batch, rec.layer);
        replay_[key] = std::move(rec);
      }
    }
  }
  if (rank == 0 && config.train.tensorboard) {
    // A fresh run replaces the event files of an earlier run in the same directory; a resumed
    // one adds a file beside them (TensorBoard reads a directory's files as one run).
    const auto tb_dir = run / "tb";
    if (!resumed && fs::is_directory(tb_dir)) {
      for (const auto& e : fs::directory_iterator(tb_dir)) {
        if (e.path().filename().string().rfind("events.out.tfevents.", 0) == 0) fs::remove(e);
      }
    }
    tb_ = std::make_unique<TensorBoardWriter>(tb_dir.string());
  }
  if (trace_every_ > 0 && L > 0) {
    RoutingTraceHeader header{layers_[0]->options.num_experts(),
                              layers_[0]->options.router().top_k(), L, std::move(domains)};
    trace_ = std::make_unique<RoutingTraceWriter>(
        (run / "traces" / ("rank" + std::to_string(rank) + ".gbrt")).string(), std::move(header),
        resumed);
  }
  if (rank == 0 && config.train.expert_loads) {
    loads_path_ = (run / "expert_loads.jsonl").string();
    fs::create_directories(run);
    if (!resumed) std::ofstream(loads_path_, std::ios::trunc);
  }
}

void RoutingMonitor::before_forward(int64_t step, int64_t micro_batch, const Batch& batch) {
  if (replay_path_.empty()) return;
  const auto valid_T = batch.mask.reshape({-1}).to(torch::kCPU, torch::kBool);
  const auto domain_T = batch.domain.reshape({-1, 1}).expand_as(batch.mask).reshape({-1});
  const int64_t T = valid_T.numel();
  for (size_t l = 0; l < layers_.size(); ++l) {
    const auto where = "train.routing_replay (" + replay_path_ + "): step " + std::to_string(step) +
                       ", micro-batch " + std::to_string(micro_batch) + ", MoE layer " +
                       std::to_string(l) + " of rank " + std::to_string(rank_);
    const auto it = replay_.find(std::make_tuple(step, micro_batch, static_cast<int64_t>(l)));
    if (it == replay_.end())
      throw std::invalid_argument(where +
                                  " is not in the trace; trace the source run with "
                                  "train.routing_trace_every=1 and the same world size");
    const auto& rec = it->second;
    if (rec.domain.numel() != valid_T.sum().item<int64_t>() ||
        !torch::equal(rec.domain, domain_T.index({valid_T}).to(torch::kCPU, torch::kLong)))
      throw std::invalid_argument(
          where + ": the trace's " + std::to_string(rec.domain.numel()) +
          " tokens differ from this batch's; replay needs the source run's data, batch sizes, "
          "train.seed and world size");
    const int64_t K = rec.expert_ids.size(1);
    // Padding tokens reach no expert; they get distinct valid ids.
    auto ids_TK = torch::arange(K, torch::kLong).repeat({T, 1});
    ids_TK.index_put_({valid_T}, rec.expert_ids);
    layers_[l]->router->replay_routing({ids_TK});
  }
}

void RoutingMonitor::after_forward(int64_t step, int64_t micro_batch, const Batch& batch,
                                   const std::vector<RoutingResult>& routings) {
  TORCH_CHECK(routings.size() == layers_.size(), "RoutingMonitor::after_forward: ", routings.size(),
              " routings for ", layers_.size(), " MoE layers");
  if (trace_ && step % trace_every_ == 0) {
    trace_->add_forward(step, rank_, micro_batch, routings, batch);
  }
}

std::string RoutingMonitor::end_step(Communicator& world, int64_t step,
                                     const std::vector<torch::Tensor>& global_counts,
                                     const std::vector<double>& micro_max_violation,
                                     const std::vector<LayerStepStats>& layer_stats) {
  const auto L = static_cast<int64_t>(layers_.size());
  TORCH_CHECK(static_cast<int64_t>(global_counts.size()) == L &&
                  static_cast<int64_t>(micro_max_violation.size()) == L &&
                  static_cast<int64_t>(layer_stats.size()) == L,
              "RoutingMonitor::end_step: ", global_counts.size(), " counts, ",
              micro_max_violation.size(), " MaxVio values and ", layer_stats.size(),
              " layer figures for ", L, " MoE layers");
  if (!replay_path_.empty()) {
    for (auto& layer : layers_) layer->router->stop_routing_replay();
  }
  // The objective's per-rank means back to sums, then summed over ranks: token means of the
  // global batch.
  auto sums = torch::zeros({3, L}, torch::kDouble);
  for (int64_t l = 0; l < L; ++l) {
    const auto& st = layer_stats[l];
    sums[0][l] = st.routing_entropy * st.local_tokens;
    sums[1][l] = st.topk_score_sum * st.local_tokens;
    sums[2][l] = st.local_tokens;
  }
  world.all_reduce(sums, ReduceOp::Sum);
  metrics_.clear();
  for (int64_t l = 0; l < L; ++l) {
    const double n = std::max(1.0, sums[2][l].item<double>());
    metrics_.push_back(
        layer_routing_metrics({global_counts[l], micro_max_violation[l],
                               sums[0][l].item<double>() / n, sums[1][l].item<double>() / n}));
  }
  if (!loads_path_.empty()) {
    std::ofstream out(loads_path_, std::ios::app);
    out << "{\"step\":" << step << ",\"loads\":[";
    for (int64_t l = 0; l < L; ++l) {
      auto c = global_counts[l].round().to(torch::kLong).cpu().contiguous();
      out << (l ? "," : "") << "[";
      for (int64_t i = 0; i < c.numel(); ++i) out << (i ? "," : "") << c.data_ptr<int64_t>()[i];
      out << "]";
    }
    out << "]}\n";
    TORCH_CHECK(out, "cannot append to ", loads_path_);
  }
  return "," + routing_metrics_json(metrics_);
}

void RoutingMonitor::log_line(const std::string& json_line) {
  if (tb_) tb_->add_json_line(json_line);
}

}  // namespace gbmoe
