// Tokenizer: a SentencePiece BPE model (Debian's libsentencepiece), trained or loaded, that
// round-trips text exactly (identity normalization, byte fallback, whitespace kept).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace gbmoe {

/// Settings for training a tokenizer.
struct TokenizerTrainOptions {
  int64_t vocab_size = 4096;
  /// At most this many lines are sampled from the input (SentencePiece's input_sentence_size).
  int64_t max_sentences = 1000000;
  /// Seed of SentencePiece's sampling and shuffling.
  uint64_t seed = 0;
  int num_threads = 2;
};

/// A loaded SentencePiece model. Ids: 0 <unk>, 1 <s> (bos), 2 </s> (eos), then 256 byte pieces
/// and the learned merges. Copies share the model; encode/decode are safe from several threads.
///
/// Example:
///   Tokenizer tok = Tokenizer::load("data/corpus/tokenizer.model");
///   std::vector<int> ids = tok.encode("int main() {}\n");
///   assert(tok.decode(ids) == "int main() {}\n");
class Tokenizer {
 public:
  /// Loads a .model file; throws DataError naming the path when it is missing or not a model.
  static Tokenizer load(const std::string& model_path);

  /// Trains a BPE model on the lines that next_line yields (it returns false when done) and writes
  /// it to model_path. Throws DataError with SentencePiece's reason when training fails.
  static Tokenizer train(const std::function<bool(std::string*)>& next_line,
                         const std::string& model_path, const TokenizerTrainOptions& options);

  std::vector<int> encode(const std::string& text) const;
  std::string decode(const std::vector<int>& ids) const;
  int64_t vocab_size() const;
  int bos_id() const;
  int eos_id() const;
  /// The serialized model, e.g. to copy it next to a dataset.
  std::string serialized_model() const;

 private:
  std::shared_ptr<sentencepiece::SentencePieceProcessor> sp_;
};

}  // namespace gbmoe
