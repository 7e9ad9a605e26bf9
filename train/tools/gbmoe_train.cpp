// gbmoe-train: trains a MoE language model from an experiment config, on one process or under
// mpirun. Example: mpirun -np 2 gbmoe-train --config configs/default.yaml --set train.steps=50
// --set values keep their commas (model.moe_layers=1,3, balance.schedule=[{...}, {...}]):
// cxxopts would split the values of a list option at ','. This file is the only user of
// cxxopts in gbmoe-train.
#define CXXOPTS_VECTOR_DELIMITER '\0'
#include <cxxopts.hpp>

#include <cstdio>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "moe/cpu_buffer_cache.h"
#include "parallel/process_groups.h"
#include "parallel/runtime.h"
#include "train/config.h"
#include "train/hf_model.h"
#include "train/trainer.h"

namespace {

void print_summary(const gbmoe::TrainSummary& s) {
  std::ostringstream out;
  out << std::fixed << std::setprecision(4);
  out << "\n== gbmoe-train summary ==\n";
  out << "steps " << s.first_step << " -> " << s.last_step
      << (s.interrupted ? " (stopped by a signal)" : "") << "\n";
  if (!s.eval.domain_loss.empty()) {
    out << "validation loss " << s.eval.loss << " (step " << s.eval.step << ")\n";
    for (const auto& [domain, loss] : s.eval.domain_loss) {
      out << "  " << std::left << std::setw(12) << domain << " " << loss << "\n";
    }
    double mi = 0, nmi = 0, mv = 0;
    const auto L = s.eval.mutual_information.size();
    for (size_t l = 0; l < L; ++l) {
      mi += s.eval.mutual_information[l] / L;
      nmi += s.eval.normalized_mi[l] / L;
      mv += s.eval.max_violation[l] / L;
    }
    out << "specialization: mutual information domain;expert " << mi << " bits (normalized " << nmi
        << "), mean over " << L << " MoE layers\n";
    out << "validation MaxVio " << mv << "\n";
  }
  if (s.last_step == s.first_step) {
    out << "no training step run: the run was already at step " << s.last_step
        << " (raise train.steps to train further)\n";
  } else {
    double g = 0, m = 0;
    const auto L = s.max_violation_global.size();
    for (size_t l = 0; l < L; ++l)
      g += s.max_violation_global[l] / L, m += s.max_violation_micro[l] / L;
    out << "last step MaxVio: global batch " << g << ", micro-batch mean " << m << "\n";
    out << "throughput " << std::setprecision(0) << s.tokens_per_second << " tokens/s\n";
  }
  out << "run directory " << s.run_dir << " (config.yaml, metrics.jsonl, checkpoints/)\n";
  gbmoe::log0(out.str());
}

}  // namespace

int main(int argc, char** argv) {
  gbmoe::MpiRuntime mpi(&argc, &argv);
  return gbmoe::run_distributed([&] {
    cxxopts::Options cli("gbmoe-train", "Train a mixture-of-experts language model");
    cli.add_options()("config", "experiment config (YAML)", cxxopts::value<std::string>())(
        "set", "override one setting: section.key=value (repeatable)",
        cxxopts::value<std::vector<std::string>>())(
        "print-config", "print the resolved config and exit")("h,help", "print this help");
    cxxopts::ParseResult args;
    try {
      args = cli.parse(argc, argv);
      if (!args.unmatched().empty()) {
        throw std::invalid_argument("unexpected argument '" + args.unmatched().front() +
                                    "' (a config file goes after --config: --config " +
                                    args.unmatched().front() + ")");
      }
    } catch (const std::exception& e) {
      if (mpi.rank() == 0) std::cerr << "gbmoe-train: " << e.what() << "\n" << cli.help();
      return 2;
    }
    if (args.count("help")) {
      if (mpi.rank() == 0) std::cout << cli.help() << "\nSettings:\n" << gbmoe::Config::help_text();
      return 0;
    }
    gbmoe::Config config;
    try {
      if (args.count("config"))
        config = gbmoe::Config::from_yaml_file(args["config"].as<std::string>());
      if (args.count("set")) config.apply_overrides(args["set"].as<std::vector<std::string>>());
      gbmoe::resolve_init_from(config);  // the architecture of model.init_from, if any
      config.validate_for_world(mpi.size());
    } catch (const std::exception& e) {
      if (mpi.rank() == 0) std::cerr << "gbmoe-train: " << gbmoe::error_message(e) << "\n";
      return 2;
    }
    if (args.count("print-config")) {
      if (mpi.rank() == 0) std::cout << config.to_yaml();
      return 0;
    }
    if (config.train.cpu_buffer_cache_mib > 0) {
      // Reuse freed activation buffers (on huge pages) instead of mapping fresh memory each
      // step. Before the model is built: tensors keep the allocator they were made with.
      gbmoe::CpuBufferCacheOptions cache;
      cache.max_cached_bytes = static_cast<size_t>(config.train.cpu_buffer_cache_mib) << 20;
      gbmoe::install_cpu_buffer_cache(cache);
    }
    gbmoe::set_collective_timeout(config.train.collective_timeout_s, "train.collective_timeout_s");
    gbmoe::TrainSummary summary;
    {
      const auto& b = config.balance;
      const auto device = gbmoe::select_device(config);  // before NCCL communicators are made
      auto groups = gbmoe::build_process_groups(
          gbmoe::ParallelSizes{mpi.size(), config.parallel.expert_parallel,
                               b.scope == "group" ? b.group_size : 0},
          MPI_COMM_WORLD, device.is_cuda() ? gbmoe::Backend::Nccl : gbmoe::Backend::Mpi);
      summary = gbmoe::train(config, groups);
    }
    print_summary(summary);
    return 0;
  });
}
