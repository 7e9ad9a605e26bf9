// gbmoe-convert: a Hugging Face model directory (config.json + safetensors) to a gbmoe checkpoint,
// and a gbmoe checkpoint to a directory transformers.AutoModelForCausalLM.from_pretrained loads.
// Example: gbmoe-convert --input hf-qwen --output ckpt && gbmoe-convert --input ckpt --output hf2
#include <cxxopts.hpp>

#include <iostream>

#include "parallel/runtime.h"
#include "train/cli_flags.h"
#include "train/hf_model.h"

int main(int argc, char** argv) {
  cxxopts::Options cli("gbmoe-convert",
                       "Convert between Hugging Face MoE models (qwen3_moe, mixtral) and gbmoe "
                       "checkpoints; the direction follows from --input");
  cli.add_options()("input", "HF model directory or gbmoe checkpoint directory",
                    cxxopts::value<std::string>())("output", "directory to write",
                                                   cxxopts::value<std::string>())(
      "dtype", "HF export: float32, bfloat16 or float16",
      cxxopts::value<std::string>()->default_value("float32"))(
      "max-shard-mib", "HF export: largest safetensors shard in MiB",
      cxxopts::value<std::string>()->default_value("5120"))("h,help", "print this help");
  try {
    auto r = cli.parse(argc, argv);
    if (r.count("help")) {
      std::cout << cli.help();
      return 0;
    }
    if (!r.count("input")) throw std::invalid_argument("--input is required");
    if (!r.count("output")) throw std::invalid_argument("--output is required");
    const auto input = r["input"].as<std::string>(), output = r["output"].as<std::string>();
    const auto dtype_name = r["dtype"].as<std::string>();
    const auto shard_mib = gbmoe::flag<double>(r, "max-shard-mib");
    if (!(shard_mib > 0))
      throw std::invalid_argument("--max-shard-mib (" + r["max-shard-mib"].as<std::string>() +
                                  ") must be > 0");
    torch::ScalarType dtype = torch::kFloat;
    if (dtype_name == "bfloat16") {
      dtype = torch::kBFloat16;
    } else if (dtype_name == "float16") {
      dtype = torch::kHalf;
    } else if (dtype_name != "float32") {
      throw std::invalid_argument("--dtype (" + dtype_name +
                                  ") must be float32, bfloat16 or float16");
    }
    gbmoe::Config config;
    auto model = gbmoe::load_model_from(input, &config);
    const auto state = gbmoe::module_state(*model);
    if (gbmoe::is_hf_model_dir(input)) {
      gbmoe::write_gbmoe_checkpoint(output, config, state);
      std::cout << "gbmoe-convert: " << input << " (" << config.model.family << ", "
                << config.model.num_layers << " layers, " << config.model.num_experts
                << " experts) -> gbmoe checkpoint " << output << "\n";
    } else {
      gbmoe::write_hf_model(output, config.model, state, dtype,
                            static_cast<int64_t>(shard_mib * (1 << 20)));
      std::cout << "gbmoe-convert: " << input << " -> Hugging Face " << config.model.family
                << " directory " << output << " (" << dtype_name << ")\n";
    }
  } catch (const std::exception& e) {
    std::cerr << "gbmoe-convert: " << gbmoe::error_message(e) << "\n";
    return 1;
  }
  return 0;
}
