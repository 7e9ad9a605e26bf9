// gbmoe-data: text files grouped by domain, or JSON-lines records with a text and a domain field,
// -> tokenizer + train/val token shards (build_dataset).
// Example: gbmoe-data --input data/raw --output data/corpus --vocab-size 4096
#include <cxxopts.hpp>

#include <cstdio>
#include <filesystem>
#include <iostream>
#include <sstream>

#include "parallel/runtime.h"
#include "train/cli_flags.h"
#include "train/data.h"
#include "train/jsonl_corpus.h"

namespace {

cxxopts::Options command_line() {
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
    ("jsonl", "instead of --input: JSON-lines files (plain or .gz), comma-separated, one "
     "document per record", cxxopts::value<std::string>())
    ("text-field", "--jsonl: the field holding the text",
     cxxopts::value<std::string>()->default_value("text"))
    ("domain-field", "--jsonl: the field holding the domain (\"\": one domain, all)",
     cxxopts::value<std::string>()->default_value("domain"))
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
  return cli;
}

// The JSON-lines records of --jsonl as domain directories under dir, with a summary on stderr.
void stage_jsonl(const cxxopts::ParseResult& args, const std::string& dir) {
  std::vector<std::string> files;
  std::stringstream list(gbmoe::flag<std::string>(args, "jsonl"));
  for (std::string f; std::getline(list, f, ',');) {
    if (!f.empty()) files.push_back(f);
  }
  gbmoe::JsonlFields fields;
  fields.text = gbmoe::flag<std::string>(args, "text-field");
  fields.domain = gbmoe::flag<std::string>(args, "domain-field");
  const auto read = gbmoe::jsonl_to_domain_dirs(files, dir, fields);
  std::cerr << "gbmoe-data: " << read.records << " JSON-lines records, "
            << read.records - read.bad() << " documents in " << read.domains.size() << " domains"
            << (read.bad() ? ", skipped:\n" : "\n") << gbmoe::format_jsonl_summary(read, fields);
}

}  // namespace

int main(int argc, char** argv) {
  auto cli = command_line();
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
    const bool jsonl = args.count("jsonl") > 0;
    if (jsonl && args.count("input"))
      throw gbmoe::DataError("give either --input or --jsonl, not both");
    if (!jsonl && !args.count("input")) throw gbmoe::DataError("--input is required (see --help)");
    if (!args.count("output")) throw gbmoe::DataError("--output is required (see --help)");
    const std::string output = gbmoe::flag<std::string>(args, "output");
    std::string input = jsonl ? output + ".jsonl-staging" : gbmoe::flag<std::string>(args, "input");
    // The JSON-lines records become a temporary domain directory, removed whatever happens.
    struct Staging {
      std::string dir;
      ~Staging() {
        if (!dir.empty()) std::filesystem::remove_all(dir);
      }
    } staging;
    if (jsonl) {
      std::filesystem::remove_all(input);
      staging.dir = input;
      stage_jsonl(args, input);
    }
    auto options = gbmoe::DataBuildOptions(input, output)
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
