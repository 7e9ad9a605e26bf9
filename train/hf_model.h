// Hugging Face model directories (config.json + safetensors) of Qwen3-MoE, Mixtral and OLMoE to
// gbmoe models and back: the config mapping, the per-expert <-> stacked expert tensor mapping with
// its checks, and loading a model from either an HF directory or a gbmoe checkpoint.
#pragma once

#include <string>
#include <vector>

#include "train/config.h"
#include "train/model.h"
#include "train/safetensors.h"

namespace gbmoe {

/// True when dir holds a config.json (a Hugging Face model directory).
bool is_hf_model_dir(const std::string& dir);
/// True when dir holds config.yaml and state.pt (a gbmoe checkpoint).
bool is_gbmoe_checkpoint(const std::string& dir);

/// The model.* settings (family, vocab_size included) described by an HF config.json of
/// model_type qwen3_moe, mixtral or olmoe. Other model types and features gbmoe lacks (attention
/// bias, sliding windows, RoPE scaling, activations other than silu) fail naming the file and key.
///
/// Example:
///   ModelConfig m = model_config_from_hf("hf-model/config.json");
ModelConfig model_config_from_hf(const std::string& config_json_path);

/// The config.json text of a qwen3_moe, mixtral or olmoe model; dtype names the stored tensors'
/// (float32, bfloat16, float16).
std::string hf_config_json(const ModelConfig& m, const std::string& dtype = "float32");

/// HF tensor names -> gbmoe state names (fp32, the model's shapes). Every tensor of the model
/// must come from exactly one HF tensor whose shape the config predicts, and every HF tensor
/// must be used; experts may be stored per expert (experts.N.gate_proj ...) or fused
/// (experts.gate_up_proj). Each MoE layer's converted experts are then evaluated against the
/// HF formula on random tokens, so transposed (square) or swapped gate/up weights fail. source
/// names the directory in errors.
TensorMap hf_to_gbmoe_state(const ModelConfig& m, const TensorMap& hf, const std::string& source);

/// Checks that stacked experts gate_up (E, D, 2F) and down (E, F, D) compute what the HF
/// per-expert Linear weights gate, up (F, D) and down (D, F) compute, y = down(silu(gate x) *
/// up(x)), on random tokens: a mapping that transposed a square matrix or swapped gate and up
/// fails naming where and the expert. Run by both conversion directions on every MoE layer.
void check_stacked_experts(const torch::Tensor& gate_up_EDH, const torch::Tensor& down_EFD,
                           const std::vector<torch::Tensor>& gate,
                           const std::vector<torch::Tensor>& up,
                           const std::vector<torch::Tensor>& down, const std::string& where);

/// The inverse: gbmoe state -> HF tensors (per-expert keys, as transformers saves them), in
/// dtype. A nonzero loss-free expert bias is written as mlp.gate.e_score_correction_bias.
TensorMap gbmoe_state_to_hf(const ModelConfig& m, const TensorMap& state,
                            torch::ScalarType dtype = torch::kFloat);

/// Every parameter and buffer of a module by name, as CPU tensors.
TensorMap module_state(torch::nn::Module& module);
/// Copies state into a module's parameters and buffers: names and shapes must match exactly
/// (a missing or unexpected tensor fails naming it and source).
void load_module_state(torch::nn::Module& module, const TensorMap& state,
                       const std::string& source);

/// The configuration of an HF directory (defaults + its model.* settings) or of a gbmoe
/// checkpoint (its config.yaml; model.vocab_size is resolved from its tensors when 0).
Config read_model_source_config(const std::string& path);

/// A model (on the CPU, eval mode) with the weights of an HF directory or a gbmoe checkpoint.
///
/// Example:
///   Config config;
///   LanguageModel model = load_model_from(path, &config);
LanguageModel load_model_from(const std::string& path, Config* config = nullptr);

/// Writes a gbmoe checkpoint directory (config.yaml, state.pt with model/<name> tensors,
/// meta.txt at step 0) that gbmoe-analyze, gbmoe-score and model.init_from read.
void write_gbmoe_checkpoint(const std::string& dir, const Config& config, const TensorMap& state);

/// Writes an HF directory (config.json, generation_config.json, safetensors sharded above
/// max_shard_bytes) that transformers.AutoModelForCausalLM.from_pretrained loads.
void write_hf_model(const std::string& dir, const ModelConfig& m, const TensorMap& state,
                    torch::ScalarType dtype = torch::kFloat,
                    int64_t max_shard_bytes = int64_t{5} << 30);

/// For --set model.init_from: takes the model.* architecture from the source into config.
/// A setting the user changed from its default to a value the source contradicts fails naming
/// both values. Settings that are not architecture (init_std, capacity_factor, drop_policy)
/// keep the user's values.
void resolve_init_from(Config& config);

/// Copies the weights of config.model.init_from into a freshly built model (the trainer calls
/// this before its first step when it is not resuming).
void load_init_from(const Config& config, torch::nn::Module& model);

}  // namespace gbmoe
