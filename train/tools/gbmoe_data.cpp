// gbmoe-data: text files grouped by domain -> tokenizer + train/val token shards (build_dataset).
// Example: gbmoe-data --input data/raw --output data/corpus --vocab-size 4096
#include <cxxopts.hpp>

#include <cstdio>
#include <iostream>

#include "parallel/runtime.h"
#include "train/cli_flags.h"
#include "train/data.h"

int main(int argc, char** argv) {
  cxxopts::Options cli(
      "gbmoe-data",
      "Builds a gbmoe token dataset from text files grouped by domain: trains (or "
      "loads) a SentencePiece BPE tokenizer, splits each domain's files into train "
      "and validation, and writes tokenizer.model, {train,val}.{bin,idx} and "
      "meta.json.");
  const gbmoe::DataBuildOptions d;
  // clang-format off
  cli.add_options()
    ("input", "directory with one subdirectory of *.txt documents per domain",
     cxxopts::value<std::string>())
    ("output", "dataset directory to write", cxxopts::value<std::string>())
    ("vocab-size", "vocabulary of the tokenizer to train",
     cxxopts::value<std::string>()->default_value(std::to_string(d.vocab_size())))
    ("tokenizer", "use this SentencePiece .model instead of training one",
     cxxopts::value<std::string>()->default_value(""))
    ("val-fraction", "share of each domain's files held out for validation (at least 1 file)",
     cxxopts::value<std::string>()->default_value("0.05"))
    ("seed", "seed of the split and of the tokenizer's sampling",
     cxxopts::value<std::string>()->default_value(std::to_string(d.seed())))
    ("max-doc-bytes", "files longer than this are split at line ends into several documents",
     cxxopts::value<std::string>()->default_value(std::to_string(d.max_doc_bytes())))
    ("tokenizer-sentences", "lines sampled to train the tokenizer",
     cxxopts::value<std::string>()->default_value(std::to_string(d.tokenizer_sentences())))
    ("threads", "tokenizing threads (0: all cores)",
     cxxopts::value<std::string>()->default_value(std::to_string(d.threads())))
    ("overwrite", "replace an existing dataset at --output")
    ("quiet", "no progress display")
    ("h,help", "print this help");
  // clang-format on
  try {
    const auto args = cli.parse(argc, argv);
    if (args.count("help")) {
      std::cout << cli.help() << std::endl;
      return 0;
    }
    if (!args.unmatched().empty()) {
      throw gbmoe::DataError("unexpected argument \"" + args.unmatched().front() +
                             "\": every setting is a --flag (see --help)");
    }
    if (!args.count("input")) throw gbmoe::DataError("--input is required (see --help)");
    if (!args.count("output")) throw gbmoe::DataError("--output is required (see --help)");
    auto options = gbmoe::DataBuildOptions(gbmoe::flag<std::string>(args, "input"),
                                           gbmoe::flag<std::string>(args, "output"))
                       .vocab_size(gbmoe::flag<int64_t>(args, "vocab-size"))
                       .tokenizer(gbmoe::flag<std::string>(args, "tokenizer"))
                       .val_fraction(gbmoe::flag<double>(args, "val-fraction"))
                       .seed(gbmoe::flag<uint64_t>(args, "seed"))
                       .max_doc_bytes(gbmoe::flag<int64_t>(args, "max-doc-bytes"))
                       .tokenizer_sentences(gbmoe::flag<int64_t>(args, "tokenizer-sentences"))
                       .threads(gbmoe::flag<int>(args, "threads"))
                       .overwrite(args.count("overwrite") > 0)
                       .progress(args.count("quiet") == 0);
    const auto summary = gbmoe::build_dataset(options);
    std::cout << gbmoe::format_summary(summary) << "wrote " << options.output() << std::endl;
    return 0;
  } catch (const cxxopts::exceptions::exception& e) {
    std::cerr << "gbmoe-data: " << e.what() << " (see --help)" << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "gbmoe-data: " << gbmoe::error_message(e) << std::endl;
  }
  return 1;
}
