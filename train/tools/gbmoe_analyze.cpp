// gbmoe-analyze: expert specialization of a trained run on the validation data, per MoE layer and
// domain, written as JSON and CSV. Example: gbmoe-analyze --run runs/global (latest checkpoint).
// With --trace, per-domain selection frequencies from a routing trace of the run instead.
#include <cxxopts.hpp>

#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>

#include "parallel/runtime.h"
#include "train/analysis.h"
#include "train/checkpoint.h"
#include "train/cli_flags.h"
#include "train/config.h"
#include "train/json.h"
#include "train/routing_trace.h"
#include "train/token_dataset.h"
#include "train/trainer.h"

namespace fs = std::filesystem;

namespace {

struct Args {
  std::string run, checkpoint, data, output;
  int64_t val_batches = -1, threads = 1;
  std::string trace;  // --trace: read a routing trace instead of a checkpoint
};

Args parse_args(int argc, char** argv, cxxopts::Options& cli) {
  cli.add_options()("run", "run directory of gbmoe-train (holds checkpoints/)",
                    cxxopts::value<std::string>())(
      "checkpoint", "checkpoint directory (default: the run's latest)",
      cxxopts::value<std::string>()->default_value(""))(
      "data", "tokenized corpus (default: the checkpoint config's data.dir)",
      cxxopts::value<std::string>()->default_value(""))(
      "val-batches", "validation batches per domain (default: data.val_batches_per_domain)",
      cxxopts::value<std::string>()->default_value("-1"))(
      "output", "output directory (default: RUN/analysis)",
      cxxopts::value<std::string>()->default_value(""))(
      "threads", "intra-op CPU threads", cxxopts::value<std::string>()->default_value("1"))(
      "trace",
      "routing trace of a run (a .gbrt file or RUN/traces): write its per-domain selection "
      "frequencies to OUTPUT/trace_selection.csv instead (no checkpoint needed)",
      cxxopts::value<std::string>()->default_value(""))("h,help", "print this help");
  auto r = cli.parse(argc, argv);
  if (r.count("help")) {
    std::cout << cli.help();
    std::exit(0);
  }
  const std::string trace = r["trace"].as<std::string>();
  if (!trace.empty()) {
    Args a;
    a.trace = trace;
    a.run = r.count("run") ? r["run"].as<std::string>() : "";
    a.output = r["output"].as<std::string>();
    if (a.output.empty()) {
      a.output = !a.run.empty()            ? (fs::path(a.run) / "analysis").string()
                 : fs::is_directory(trace) ? trace
                                           : fs::path(trace).parent_path().string();
    }
    return a;
  }
  if (!r.count("run")) throw std::invalid_argument("--run is required (or --trace)");
  Args a{r["run"].as<std::string>(),
         r["checkpoint"].as<std::string>(),
         r["data"].as<std::string>(),
         r["output"].as<std::string>(),
         gbmoe::flag<int64_t>(r, "val-batches"),
         gbmoe::flag<int64_t>(r, "threads"),
         ""};
  if (!fs::is_directory(a.run))
    throw std::invalid_argument("--run \"" + a.run + "\" is not a directory");
  if (a.threads < 1)
    throw std::invalid_argument("--threads (" + std::to_string(a.threads) + ") must be >= 1");
  if (a.val_batches == 0 || a.val_batches < -1)
    throw std::invalid_argument("--val-batches (" + std::to_string(a.val_batches) +
                                ") must be >= 1");
  if (a.checkpoint.empty()) a.checkpoint = gbmoe::resolve_resume(a.run, "auto");
  if (a.checkpoint.empty())
    throw std::invalid_argument("--run \"" + a.run + "\" has no checkpoint in " + a.run +
                                "/checkpoints; train it first or pass --checkpoint");
  if (a.output.empty()) a.output = (fs::path(a.run) / "analysis").string();
  return a;
}

std::string header_json(const Args& args, const gbmoe::Config& config, int64_t step) {
  const auto& b = config.balance;
  return "\"run_dir\":" + gbmoe::json_string(args.run) +
         ",\"checkpoint\":" + gbmoe::json_string(args.checkpoint) +
         ",\"step\":" + std::to_string(step) +
         ",\"balance\":{\"scope\":" + gbmoe::json_string(b.scope) +
         ",\"group_size\":" + std::to_string(b.group_size) +
         ",\"alpha\":" + gbmoe::json_number(b.alpha) +
         ",\"micro_alpha\":" + gbmoe::json_number(b.micro_alpha) +
         ",\"method\":" + gbmoe::json_string(b.method) + "}";
}

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  if (!out) throw std::runtime_error("cannot write " + path.string());
}

void print_summary(const gbmoe::RoutingAnalysis& a, int64_t step, const std::string& output) {
  std::cout << std::fixed << std::setprecision(4) << "gbmoe-analyze: step " << step << ", "
            << a.tokens.sum().item<double>() << " validation tokens in " << a.domains.size()
            << " domains\nval loss";
  for (size_t d = 0; d < a.domains.size(); ++d) {
    const auto i = static_cast<int64_t>(d);
    std::cout << " | " << a.domains[d] << " "
              << a.loss_sum[i].item<double>() / std::max(1.0, a.tokens[i].item<double>());
  }
  std::cout << "\nblock | MI bits | MI / H(domain) | top-k score sum | MaxVio | MaxVio per "
               "domain (mean)\n";
  for (const auto& layer : a.layers) {
    const auto f = gbmoe::layer_figures(layer, a.tokens);
    std::cout << std::setw(5) << layer.block << " | " << std::setw(7) << f.mutual_information
              << " | " << std::setw(14) << f.normalized_mi << " | " << std::setw(15)
              << f.mean_topk_score_sum << " | " << std::setw(6) << f.max_violation << " | "
              << f.domain_max_violation.mean().item<double>() << "\n";
  }
  std::cout << "wrote " << output << "/{analysis.json,selection.csv,layers.csv}\n";
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options cli("gbmoe-analyze",
                       "Expert specialization of a trained run on its validation data");
  Args args;
  gbmoe::Config config;
  int64_t step = 0;
  try {
    args = parse_args(argc, argv, cli);
    if (!args.trace.empty()) {
      const auto files = gbmoe::routing_trace_files(args.trace);
      const auto trace = gbmoe::read_routing_trace(files);
      const auto selection = gbmoe::trace_selection(trace);
      fs::create_directories(args.output);
      write_file(fs::path(args.output) / "trace_selection.csv",
                 gbmoe::trace_selection_csv(trace, selection));
      std::cout << "gbmoe-analyze: " << trace.records.size() << " trace records from "
                << files.size() << " file(s), "
                << (selection.tokens.empty() ? 0.0 : selection.tokens[0].sum().item<double>())
                << " tokens per layer; wrote " << args.output << "/trace_selection.csv\n";
      return 0;
    }
    const auto meta = gbmoe::read_checkpoint_meta(args.checkpoint);
    // The checkpoint's own config describes its model; older checkpoints only have the run's.
    const auto own = fs::path(args.checkpoint) / "config.yaml";
    config = gbmoe::Config::from_yaml_file(
        (fs::exists(own) ? own : fs::path(args.run) / "config.yaml").string());
    step = meta.step;
    if (!args.data.empty()) config.data.dir = args.data;
    if (args.val_batches > 0) config.data.val_batches_per_domain = args.val_batches;
  } catch (const std::exception& e) {
    std::cerr << "gbmoe-analyze: " << gbmoe::error_message(e) << "\n";
    return 2;
  }
  try {
    torch::set_num_threads(static_cast<int>(args.threads));
    auto val = gbmoe::TokenDataset::open(config.data.dir, "val");
    const int64_t vocab = config.model.vocab_size > 0 ? config.model.vocab_size : val.vocab_size();
    gbmoe::LanguageModel model(gbmoe::model_options_from_config(config, vocab));
    gbmoe::load_model_state(args.checkpoint + "/state.pt", *model);
    auto batches = gbmoe::validation_batches(val, config.data.seq_len, config.data.micro_batch_size,
                                             config.data.val_batches_per_domain);
    const auto analysis = gbmoe::analyze_routing(model, batches, val.domain_names());
    fs::create_directories(args.output);
    write_file(fs::path(args.output) / "analysis.json",
               gbmoe::analysis_json(analysis, header_json(args, config, step)) + "\n");
    write_file(fs::path(args.output) / "selection.csv", gbmoe::selection_csv(analysis));
    write_file(fs::path(args.output) / "layers.csv", gbmoe::layers_csv(analysis));
    print_summary(analysis, step, args.output);
  } catch (const std::exception& e) {
    std::cerr << "gbmoe-analyze: " << gbmoe::error_message(e) << "\n";
    return 1;
  }
  return 0;
}
