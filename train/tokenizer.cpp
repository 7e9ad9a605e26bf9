// Tokenizer: SentencePiece BPE training through the C++ trainer API, loading, encode/decode.
#include "train/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <fstream>
#include <unordered_map>

#include "train/token_dataset.h"

namespace gbmoe {
namespace {

// Feeds SentencePiece's trainer from a callback instead of a temporary text file.
class CallbackIterator : public sentencepiece::SentenceIterator {
 public:
  explicit CallbackIterator(const std::function<bool(std::string*)>& next) : next_(next) { Next(); }
  bool done() const override { return done_; }
  void Next() override { done_ = !next_(&value_); }
  const std::string& value() const override { return value_; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  const std::function<bool(std::string*)>& next_;
  std::string value_;
  bool done_ = false;
};

}  // namespace

Tokenizer Tokenizer::load(const std::string& model_path) {
  Tokenizer t;
  t.sp_ = std::make_shared<sentencepiece::SentencePieceProcessor>();
  const auto status = t.sp_->Load(model_path);
  if (!status.ok()) {
    throw DataError("tokenizer model " + model_path + " cannot be loaded: " + status.ToString());
  }
  return t;
}

Tokenizer Tokenizer::train(const std::function<bool(std::string*)>& next_line,
                           const std::string& model_path, const TokenizerTrainOptions& options) {
  // Identity normalization, kept whitespace and no dummy prefix make decode(encode(s)) == s;
  // byte fallback covers every byte (code, rare characters); newlines become the byte <0x0A>.
  const std::unordered_map<std::string, std::string> kwargs = {
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(options.vocab_size)},
      {"byte_fallback", "true"},
      {"character_coverage", "0.9995"},
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"add_dummy_prefix", "false"},
      {"allow_whitespace_only_pieces", "true"},
      {"split_digits", "true"},
      {"input_sentence_size", std::to_string(options.max_sentences)},
      {"shuffle_input_sentence", "true"},
      {"num_threads", std::to_string(options.num_threads)},
      {"minloglevel", "2"},
  };
  sentencepiece::SetRandomGeneratorSeed(static_cast<unsigned int>(options.seed % 0xfffffffeULL));
  CallbackIterator it(next_line);
  std::string proto;
  const auto status = sentencepiece::SentencePieceTrainer::Train(kwargs, &it, &proto);
  if (!status.ok()) {
    throw DataError("training the tokenizer (vocab size " + std::to_string(options.vocab_size) +
                    ") failed: " + status.ToString());
  }
  {
    const std::string tmp = model_path + ".tmp";
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(proto.data(), static_cast<std::streamsize>(proto.size()));
    out.flush();
    if (!out) throw DataError("cannot write the tokenizer model " + tmp);
    out.close();
    if (std::rename(tmp.c_str(), model_path.c_str()) != 0) {
      throw DataError("cannot rename " + tmp + " to " + model_path);
    }
  }
  Tokenizer t;
  t.sp_ = std::make_shared<sentencepiece::SentencePieceProcessor>();
  const auto loaded = t.sp_->LoadFromSerializedProto(proto);
  if (!loaded.ok()) throw DataError("the trained tokenizer cannot be loaded: " + loaded.ToString());
  return t;
}

std::vector<int> Tokenizer::encode(const std::string& text) const {
  std::vector<int> ids;
  const auto status = sp_->Encode(text, &ids);
  if (!status.ok()) throw DataError("tokenizer encode failed: " + status.ToString());
  return ids;
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
  std::string text;
  const auto status = sp_->Decode(ids, &text);
  if (!status.ok()) throw DataError("tokenizer decode failed: " + status.ToString());
  return text;
}

int64_t Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }
int Tokenizer::bos_id() const { return sp_->bos_id(); }
int Tokenizer::eos_id() const { return sp_->eos_id(); }
std::string Tokenizer::serialized_model() const { return sp_->serialized_model_proto(); }

}  // namespace gbmoe
