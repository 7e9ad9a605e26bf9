// The decoder-only transformer language model of the trainer: token embedding, pre-norm blocks
// (RMSNorm, causal grouped-query attention with rotary positions, MoE or dense SwiGLU
// feed-forward), final norm, output head. A model family selects the conventions of gbmoe's own
// architecture or of transformers' Qwen3-MoE or Mixtral. Letters: B batch, S positions, D dim,
// H heads, G key/value heads, Dh head size, V vocab.
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

#include "moe/moe_layer.h"

namespace gbmoe {

/// The conventions a model follows. GBMoE: one fused q/k/v projection of H heads of D / H, RoPE on
/// interleaved pairs (x[2i], x[2i+1]). Qwen3MoE, Mixtral and OLMoE match transformers' models:
/// G <= H key/value heads, rotate-half RoPE (x[i], x[i + Dh/2]); Qwen3MoE adds an RMSNorm over
/// each query and key head before RoPE, OLMoE one over all query and all key features.
enum class ModelFamily { GBMoE, Qwen3MoE, Mixtral, OLMoE };

std::string to_string(ModelFamily f);
/// gbmoe, qwen3_moe, mixtral or olmoe.
ModelFamily model_family_from_string(const std::string& name);

/// Example:
///   LanguageModelOptions(4096, 128, 4, 4).moe_layers({0, 1, 2, 3}).moe(MoELayerOptions(128, 8,
///   256))
struct LanguageModelOptions {
  LanguageModelOptions(int64_t vocab_size, int64_t dim, int64_t num_layers, int64_t num_heads)
      : vocab_size_(vocab_size),
        dim_(dim),
        num_layers_(num_layers),
        num_heads_(num_heads),
        moe_(dim, 8, 4 * dim) {}
  TORCH_ARG(int64_t, vocab_size);
  TORCH_ARG(int64_t, dim);
  TORCH_ARG(int64_t, num_layers);
  TORCH_ARG(int64_t, num_heads);
  TORCH_ARG(ModelFamily, family) = ModelFamily::GBMoE;
  /// Key/value heads G (grouped-query attention; must divide num_heads). 0 = num_heads.
  TORCH_ARG(int64_t, num_kv_heads) = 0;
  /// Size Dh of each attention head. 0 = dim / num_heads.
  TORCH_ARG(int64_t, head_dim) = 0;
  /// Indices of the blocks whose feed-forward is a MoE layer; the others are dense SwiGLU.
  TORCH_ARG(std::vector<int64_t>, moe_layers) = {};
  /// The options of every MoE layer (its dim must equal the model's).
  TORCH_ARG(MoELayerOptions, moe);
  /// Hidden size of the dense SwiGLU blocks.
  TORCH_ARG(int64_t, dense_hidden) = 1024;
  TORCH_ARG(bool, tie_embeddings) = true;
  TORCH_ARG(double, rope_theta) = 10000.0;
  /// Weights ~ N(0, init_std); the projections that write into the residual stream
  /// (attention output, FFN down) ~ N(0, init_std / sqrt(2 * num_layers)) as in GPT-2.
  TORCH_ARG(double, init_std) = 0.02;
  TORCH_ARG(double, norm_eps) = 1e-5;
  /// Training forwards keep only each block's input and recompute the block in the backward
  /// pass (moe/checkpoint.h): less memory, one more block forward per backward.
  TORCH_ARG(bool, activation_checkpointing) = false;

 public:
  void validate() const;
  /// num_kv_heads, or num_heads when 0.
  int64_t kv_heads() const { return num_kv_heads_ > 0 ? num_kv_heads_ : num_heads_; }
  /// head_dim, or dim / num_heads when 0.
  int64_t head_size() const { return head_dim_ > 0 ? head_dim_ : dim_ / num_heads_; }
};

/// Root-mean-square layer norm with a learned scale.
class RMSNormImpl : public torch::nn::Cloneable<RMSNormImpl> {
 public:
  RMSNormImpl(int64_t dim, double eps);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);
  int64_t dim;
  double eps;
  torch::Tensor weight;  // (D,)
};
TORCH_MODULE(RMSNorm);

/// Causal grouped-query self-attention with rotary position embeddings. The query, key and value
/// projections are one matrix whose output rows are [q (H Dh) | k (G Dh) | v (G Dh)].
class AttentionImpl : public torch::nn::Cloneable<AttentionImpl> {
 public:
  explicit AttentionImpl(const LanguageModelOptions& options);
  void reset() override;
  /// x: (B, S, D). Returns (B, S, D).
  torch::Tensor forward(const torch::Tensor& x);
  int64_t dim, num_heads, num_kv_heads, head_dim;
  double rope_theta, norm_eps;
  ModelFamily family;
  torch::nn::Linear qkv{nullptr};            // D -> (H + 2G) Dh
  torch::nn::Linear out{nullptr};            // H Dh -> D
  RMSNorm q_norm{nullptr}, k_norm{nullptr};  // Qwen3MoE: (Dh,) each; OLMoE: (H Dh,), (G Dh,)

 private:
  torch::Tensor rope_cos_, rope_sin_;  // (S, Dh / 2) of the last sequence length (fused path)
};
TORCH_MODULE(Attention);

/// One pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x)).
class BlockImpl : public torch::nn::Cloneable<BlockImpl> {
 public:
  BlockImpl(const LanguageModelOptions& options, bool is_moe);
  void reset() override;
  /// x: (B, S, D); mask: (B, S) bool of valid tokens or undefined; routing: where the MoE layer
  /// records its routing (null: nowhere).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask = {},
                        RoutingContext* routing = nullptr);
  LanguageModelOptions options;
  bool is_moe;
  RMSNorm attn_norm{nullptr}, ffn_norm{nullptr};
  Attention attn{nullptr};
  MoELayer moe{nullptr};  // when is_moe
  SwiGLU dense{nullptr};  // otherwise
};
TORCH_MODULE(Block);

/// The language model.
///
/// Example:
///   LanguageModel model(options);
///   auto logits = model->forward(tokens_BS, mask_BS);  // (B, S, V)
///   TrainingObjective objective(model->moe_layers(), balance_options, reducers);
class LanguageModelImpl : public torch::nn::Cloneable<LanguageModelImpl> {
 public:
  explicit LanguageModelImpl(LanguageModelOptions options);
  void reset() override;
  void reset_parameters();

  /// tokens: (B, S) int64; mask: (B, S) bool (false = padding) or undefined; routing: where the
  /// MoE layers record their routing, in block order (null: nowhere). Returns logits (B, S, V)
  /// in fp32 (fp64 for an fp64 model).
  torch::Tensor forward(const torch::Tensor& tokens, const torch::Tensor& mask = {},
                        RoutingContext* routing = nullptr);

  /// The MoE layers in block order.
  std::vector<MoELayer> moe_layers() const;

  LanguageModelOptions options;
  torch::nn::Embedding embed{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  RMSNorm final_norm{nullptr};
  torch::nn::Linear head{nullptr};  // null when tied to embed
};
TORCH_MODULE(LanguageModel);

}  // namespace gbmoe
