// build_dataset: the logic of the gbmoe-data tool. Text files grouped by domain become a trained
// (or loaded) tokenizer and train/val token shards with their indexes and a meta.json summary.
#pragma once

#include <torch/arg.h>

#include <cstdint>
#include <string>
#include <vector>

namespace gbmoe {

/// Options of build_dataset; the gbmoe-data flags of the same names set them.
///
/// Example:
///   build_dataset(DataBuildOptions("data/raw", "data/corpus").vocab_size(4096).seed(0));
struct DataBuildOptions {
  DataBuildOptions(std::string input = "", std::string output = "")
      : input_(std::move(input)), output_(std::move(output)) {}
  /// Directory holding one subdirectory per domain, each with *.txt documents (UTF-8, one
  /// document per file, searched recursively). Entries whose names start with '.' are skipped.
  TORCH_ARG(std::string, input);
  /// Dataset directory to create: tokenizer.model, {train,val}.{bin,idx}, meta.json.
  TORCH_ARG(std::string, output);
  /// Vocabulary size of the tokenizer to train (ignored with tokenizer()).
  TORCH_ARG(int64_t, vocab_size) = 4096;
  /// An existing SentencePiece .model to use instead of training one; copied into output.
  TORCH_ARG(std::string, tokenizer) = "";
  /// Share of each domain's files that goes to validation (at least one file per domain).
  TORCH_ARG(double, val_fraction) = 0.05;
  /// Seed of the train/validation split and of the tokenizer's sentence sampling.
  TORCH_ARG(uint64_t, seed) = 0;
  /// Files longer than this are split at line ends into documents of at most this many bytes.
  TORCH_ARG(int64_t, max_doc_bytes) = 1 << 20;
  /// Lines sampled to train the tokenizer (SentencePiece's input_sentence_size).
  TORCH_ARG(int64_t, tokenizer_sentences) = 1000000;
  /// Replace an existing dataset at output (otherwise that is an error).
  TORCH_ARG(bool, overwrite) = false;
  /// Threads that tokenize (0: all hardware threads).
  TORCH_ARG(int, threads) = 0;
  /// Print progress lines on stderr.
  TORCH_ARG(bool, progress) = false;

 public:
  /// Throws DataError naming the flag and its value when a setting is out of range.
  void validate() const;
};

/// What build_dataset wrote, per domain and split.
struct DomainSummary {
  std::string name;
  int64_t files = 0;            // source files
  int64_t bytes = 0;            // source text bytes
  int64_t train_documents = 0;  // documents (files, or parts of long files)
  int64_t val_documents = 0;
  int64_t train_tokens = 0;  // end-of-document tokens included
  int64_t val_tokens = 0;
};

struct DataBuildSummary {
  std::vector<DomainSummary> domains;
  int64_t vocab_size = 0;
  int token_bytes = 0;
  double tokenizer_seconds = 0;  // training or loading the tokenizer
  double tokenize_seconds = 0;
  double total_seconds = 0;
};

/// Builds the dataset described by options; deterministic for a given input, seed and settings.
/// Everything is first written to a sibling staging directory that is renamed into place at the
/// end, so an interrupted run leaves the previous dataset (or none), never a partial one.
/// Throws DataError naming the setting or file at fault.
DataBuildSummary build_dataset(const DataBuildOptions& options);

/// The summary as an aligned text table (domains x documents and tokens per split).
std::string format_summary(const DataBuildSummary& summary);

}  // namespace gbmoe
