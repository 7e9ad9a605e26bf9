// gbmoe-score: loss and perplexity of a model (HF directory or gbmoe checkpoint) on given token
// ids or text, optionally writing the logits and each MoE layer's top-k expert ids as .npy files,
// so that gbmoe's outputs can be compared with another implementation's. Example: gbmoe-score
// --model hf-qwen --tokens 5,9,2,7 --logits logits.npy
#include <cxxopts.hpp>

#include <cmath>
#include <fstream>
#include <iostream>
#include <sstream>

#include "parallel/runtime.h"
#include "train/cli_flags.h"
#include "train/hf_model.h"
#include "train/tokenizer.h"

namespace {

// Sequences of token ids: "1,2,3" per sequence, sequences separated by ';' or newlines.
std::vector<std::vector<int64_t>> parse_sequences(const std::string& text,
                                                  const std::string& from) {
  std::vector<std::vector<int64_t>> out;
  std::string seq;
  std::stringstream all(text);
  const char separator = text.find(';') != std::string::npos ? ';' : '\n';
  while (std::getline(all, seq, separator)) {
    for (auto& c : seq) {
      if (c == ',' || c == '\n' || c == '\r' || c == '\t') c = ' ';
    }
    std::stringstream in(seq);
    std::vector<int64_t> ids;
    for (std::string tok; in >> tok;) {
      size_t used = 0;
      int64_t v = -1;
      try {
        v = std::stoll(tok, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != tok.size() || v < 0)
        throw std::invalid_argument(from + ": '" + tok + "' is not a token id");
      ids.push_back(v);
    }
    if (!ids.empty()) out.push_back(std::move(ids));
  }
  if (out.empty()) throw std::invalid_argument(from + " holds no token ids");
  for (const auto& s : out) {
    if (s.size() != out[0].size())
      throw std::invalid_argument(from + ": every sequence must have the same length (" +
                                  std::to_string(out[0].size()) + " and " +
                                  std::to_string(s.size()) + ")");
  }
  return out;
}

// A NumPy .npy file (format 1.0) of a contiguous float32 or int64 tensor.
void write_npy(const std::string& path, const torch::Tensor& t_in) {
  auto t = t_in.contiguous().cpu();
  const char* descr = t.scalar_type() == torch::kFloat ? "<f4" : "<i8";
  TORCH_CHECK(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kLong,
              "write_npy: float32 or int64 only");
  std::string shape = "(";
  for (auto d : t.sizes()) shape += std::to_string(d) + ",";
  if (t.dim() > 1) shape.pop_back();
  shape += ")";
  std::string header =
      "{'descr': '" + std::string(descr) + "', 'fortran_order': False, 'shape': " + shape + ", }";
  header.append(63 - (10 + header.size()) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  TORCH_CHECK(out, "cannot write ", path);
  out.write("\x93NUMPY\x01\x00", 8);
  const uint16_t len = static_cast<uint16_t>(header.size());
  const char len_le[2] = {static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
  out.write(len_le, 2);
  out << header;
  out.write(static_cast<const char*>(t.data_ptr()),
            static_cast<std::streamsize>(t.numel() * t.element_size()));
  TORCH_CHECK(out.good(), "writing ", path, " failed");
}

// The token ids to score as text ("1,2;3,4" or lines) from --tokens, --tokens-file or --text;
// `from` names where they came from, for messages.
std::string token_text(const cxxopts::ParseResult& r, std::string& from) {
  const auto tokens_text = r["tokens"].as<std::string>();
  const auto tokens_file = r["tokens-file"].as<std::string>();
  const auto raw_text = r["text"].as<std::string>();
  if ((!tokens_text.empty()) + (!tokens_file.empty()) + (!raw_text.empty()) != 1)
    throw std::invalid_argument("give exactly one of --tokens, --tokens-file and --text");
  std::string text = tokens_text;
  from = "--tokens";
  if (!raw_text.empty()) {
    const auto model = r["tokenizer"].as<std::string>();
    if (model.empty()) throw std::invalid_argument("--text needs --tokenizer");
    text.clear();
    for (int id : gbmoe::Tokenizer::load(model).encode(raw_text)) {
      text += (text.empty() ? "" : ",") + std::to_string(id);
    }
    from = "--text";
  } else if (!tokens_file.empty()) {
    std::ifstream in(tokens_file);
    if (!in) throw std::invalid_argument("--tokens-file \"" + tokens_file + "\" cannot be read");
    std::stringstream s;
    s << in.rdbuf();
    text = s.str();
    from = tokens_file;
    for (auto& c : text) {
      if (c == ';') c = ' ';
    }
  }
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options cli("gbmoe-score", "Loss, perplexity and logits of a model on token ids");
  cli.add_options()("model", "HF model directory or gbmoe checkpoint directory",
                    cxxopts::value<std::string>())(
      "tokens", "token ids: 1,2,3 (sequences of equal length separated by ';')",
      cxxopts::value<std::string>()->default_value(""))(
      "tokens-file", "file of token ids, one sequence per line",
      cxxopts::value<std::string>()->default_value(""))(
      "text", "text to score, encoded with --tokenizer (one sequence)",
      cxxopts::value<std::string>()->default_value(""))(
      "tokenizer", "--text: a SentencePiece .model (e.g. a gbmoe-data dataset's tokenizer.model)",
      cxxopts::value<std::string>()->default_value(""))(
      "logits", "write the logits (B, S, V) float32 to this .npy file",
      cxxopts::value<std::string>()->default_value(""))(
      "experts", "write the top-k expert ids (MoE layers, B*S, K) int64 to this .npy file",
      cxxopts::value<std::string>()->default_value(""))(
      "threads", "intra-op CPU threads", cxxopts::value<std::string>()->default_value("1"))(
      "h,help", "print this help");
  try {
    auto r = cli.parse(argc, argv);
    if (r.count("help")) {
      std::cout << cli.help();
      return 0;
    }
    if (!r.count("model")) throw std::invalid_argument("--model is required");
    std::string from;
    const std::string text = token_text(r, from);
    const auto sequences = parse_sequences(text, from);
    const int64_t threads = gbmoe::flag<int64_t>(r, "threads");
    if (threads < 1) throw std::invalid_argument("--threads must be >= 1");
    torch::set_num_threads(static_cast<int>(threads));

    gbmoe::Config config;
    auto model = gbmoe::load_model_from(r["model"].as<std::string>(), &config);
    const int64_t B = static_cast<int64_t>(sequences.size());
    const int64_t S = static_cast<int64_t>(sequences[0].size());
    auto tokens = torch::empty({B, S}, torch::kLong);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t s = 0; s < S; ++s) {
        const int64_t id = sequences[b][s];
        if (id >= config.model.vocab_size)
          throw std::invalid_argument(from + ": token id " + std::to_string(id) +
                                      " is outside the vocabulary (" +
                                      std::to_string(config.model.vocab_size) + ")");
        tokens[b][s] = id;
      }
    }
    torch::NoGradGuard no_grad;
    gbmoe::RoutingContext routing;  // each MoE layer's top-k choices, for --experts
    auto logits = model->forward(tokens, {}, &routing);  // (B, S, V)
    if (S > 1) {
      auto loss = torch::nn::functional::cross_entropy(
                      logits.narrow(1, 0, S - 1).reshape({-1, logits.size(2)}),
                      tokens.narrow(1, 1, S - 1).reshape({-1}))
                      .item<double>();
      std::cout << "{\"sequences\":" << B << ",\"predicted_tokens\":" << B * (S - 1)
                << ",\"loss\":" << loss << ",\"perplexity\":" << std::exp(loss) << "}\n";
    } else {
      std::cout << "{\"sequences\":" << B << ",\"predicted_tokens\":0}\n";
    }
    if (!r["logits"].as<std::string>().empty()) write_npy(r["logits"].as<std::string>(), logits);
    if (!r["experts"].as<std::string>().empty()) {
      std::vector<torch::Tensor> ids;
      for (const auto& record : routing.layers()) ids.push_back(record.routing.expert_ids);
      write_npy(r["experts"].as<std::string>(), torch::stack(ids));
    }
  } catch (const std::exception& e) {
    std::cerr << "gbmoe-score: " << gbmoe::error_message(e) << "\n";
    return 1;
  }
  return 0;
}
