// The transformer language model: RMSNorm, rotary causal attention, MoE / dense blocks.
#include "train/model.h"

#include <cmath>

#include "moe/checkpoint.h"
#include "moe/profile_region.h"
#include "train/attention_cpu.h"
#include "train/model_kernels_cpu.h"

namespace gbmoe {

std::string to_string(ModelFamily f) {
  switch (f) {
    case ModelFamily::GBMoE:
      return "gbmoe";
    case ModelFamily::Qwen3MoE:
      return "qwen3_moe";
    case ModelFamily::Mixtral:
      return "mixtral";
    case ModelFamily::OLMoE:
      return "olmoe";
  }
  return "?";
}

ModelFamily model_family_from_string(const std::string& name) {
  for (auto f :
       {ModelFamily::GBMoE, ModelFamily::Qwen3MoE, ModelFamily::Mixtral, ModelFamily::OLMoE}) {
    if (to_string(f) == name) return f;
  }
  TORCH_CHECK(false, "model.family (", name, ") must be one of gbmoe, qwen3_moe, mixtral, olmoe");
}

void LanguageModelOptions::validate() const {
  TORCH_CHECK(vocab_size() > 1, "model.vocab_size (", vocab_size(), ") must be > 1");
  TORCH_CHECK(num_heads() > 0 && num_kv_heads() >= 0 && head_dim() >= 0, "model.num_heads (",
              num_heads(), "), model.num_kv_heads (", num_kv_heads(), ") and model.head_dim (",
              head_dim(), ") must not be negative");
  TORCH_CHECK(dim() > 0 && (head_dim() > 0 || dim() % num_heads() == 0), "model.dim (", dim(),
              ") must be a positive multiple of model.num_heads (", num_heads(),
              ") unless model.head_dim is set");
  TORCH_CHECK(head_size() % 2 == 0, "the head size (", head_size(),
              ") must be even for rotary embeddings");
  TORCH_CHECK(num_heads() % kv_heads() == 0, "model.num_kv_heads (", kv_heads(),
              ") must divide model.num_heads (", num_heads(), ")");
  TORCH_CHECK(family() != ModelFamily::GBMoE ||
                  (kv_heads() == num_heads() && head_size() * num_heads() == dim()),
              "model.family gbmoe has model.num_kv_heads = model.num_heads and model.head_dim = "
              "model.dim / model.num_heads; use family qwen3_moe or mixtral for others");
  TORCH_CHECK(num_layers() > 0, "model.num_layers (", num_layers(), ") must be > 0");
  for (auto l : moe_layers()) {
    TORCH_CHECK(l >= 0 && l < num_layers(), "model.moe_layers names block ", l, " but there are ",
                num_layers(), " blocks");
  }
  TORCH_CHECK(moe().dim() == dim(), "MoE dim (", moe().dim(), ") must equal model.dim (", dim(),
              ")");
  moe().validate();
}

RMSNormImpl::RMSNormImpl(int64_t dim_, double eps_) : dim(dim_), eps(eps_) { reset(); }

void RMSNormImpl::reset() { weight = register_parameter("weight", torch::ones({dim})); }

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  GBMOE_PROFILE_REGION("norm");
  if (rms_norm_cpu_applies(x, weight)) return rms_norm_cpu(x, weight, eps);
  // At least fp32 (bf16 activations are normalized in fp32; fp64 stays fp64).
  const auto dtype = x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  auto xf = x.to(dtype);
  auto normed = xf * torch::rsqrt(xf.square().mean(-1, true) + eps);
  return (normed * weight.to(dtype)).to(x.scalar_type());
}

AttentionImpl::AttentionImpl(const LanguageModelOptions& options)
    : dim(options.dim()),
      num_heads(options.num_heads()),
      num_kv_heads(options.kv_heads()),
      head_dim(options.head_size()),
      rope_theta(options.rope_theta()),
      norm_eps(options.norm_eps()),
      family(options.family()) {
  reset();
}

void AttentionImpl::reset() {
  const int64_t qkv_out = (num_heads + 2 * num_kv_heads) * head_dim;
  qkv =
      register_module("qkv", torch::nn::Linear(torch::nn::LinearOptions(dim, qkv_out).bias(false)));
  out = register_module(
      "out", torch::nn::Linear(torch::nn::LinearOptions(num_heads * head_dim, dim).bias(false)));
  if (family == ModelFamily::Qwen3MoE) {
    q_norm = register_module("q_norm", RMSNorm(head_dim, norm_eps));
    k_norm = register_module("k_norm", RMSNorm(head_dim, norm_eps));
  } else if (family == ModelFamily::OLMoE) {
    q_norm = register_module("q_norm", RMSNorm(num_heads * head_dim, norm_eps));
    k_norm = register_module("k_norm", RMSNorm(num_kv_heads * head_dim, norm_eps));
  }
}

namespace {

// cos and sin (S, Dh/2) of the angles pos * theta^(-2i/Dh) of gbmoe's rotary embedding.
std::pair<torch::Tensor, torch::Tensor> rope_tables(int64_t S, int64_t Dh, double theta,
                                                    const torch::Device& device) {
  auto opts = torch::TensorOptions().dtype(torch::kFloat).device(device);
  auto inv_freq = torch::pow(theta, -torch::arange(0, Dh, 2, opts) / static_cast<double>(Dh));
  auto angles = torch::outer(torch::arange(S, opts), inv_freq);  // (S, Dh/2)
  return {angles.cos(), angles.sin()};
}

// Rotates pairs (x[2i], x[2i+1]) of each head by angle pos * theta^(-2i/Dh). x: (B, H, S, Dh).
torch::Tensor apply_rope(const torch::Tensor& x, double theta) {
  const int64_t S = x.size(2), Dh = x.size(3);
  const auto [cos, sin] = rope_tables(S, Dh, theta, x.device());
  auto xf = x.to(torch::kFloat).unflatten(-1, {Dh / 2, 2});
  auto x0 = xf.select(-1, 0), x1 = xf.select(-1, 1);
  auto rotated = torch::stack({x0 * cos - x1 * sin, x0 * sin + x1 * cos}, -1).flatten(-2);
  return rotated.to(x.scalar_type());
}

// transformers' convention: x * cos + rotate_half(x) * sin with the angle of pair i on both
// x[i] and x[i + Dh/2], inv_freq = 1 / theta^(2i/Dh) computed as transformers does.
torch::Tensor apply_rope_half(const torch::Tensor& x, double theta) {
  const int64_t S = x.size(2), Dh = x.size(3);
  auto opts = torch::TensorOptions().dtype(torch::kFloat).device(x.device());
  auto inv_freq =
      1.0 / torch::pow(theta, torch::arange(0, Dh, 2, opts.dtype(torch::kLong)).to(torch::kFloat) /
                                  static_cast<double>(Dh));
  auto angles = torch::outer(torch::arange(S, opts), inv_freq);  // (S, Dh/2)
  auto emb = torch::cat({angles, angles}, -1);                   // (S, Dh)
  auto cos = emb.cos(), sin = emb.sin();
  auto xf = x.to(torch::kFloat);
  auto rotated_half = torch::cat({-xf.narrow(-1, Dh / 2, Dh / 2), xf.narrow(-1, 0, Dh / 2)}, -1);
  return (xf * cos + rotated_half * sin).to(x.scalar_type());
}

}  // namespace

torch::Tensor AttentionImpl::forward(const torch::Tensor& x) {
  const int64_t B = x.size(0), S = x.size(1), Dh = head_dim;
  if (family != ModelFamily::GBMoE) {
    auto parts = qkv->forward(x).split_with_sizes(
        {num_heads * Dh, num_kv_heads * Dh, num_kv_heads * Dh}, -1);
    if (family == ModelFamily::OLMoE) {  // normalized over all heads' features at once
      parts[0] = q_norm->forward(parts[0]);
      parts[1] = k_norm->forward(parts[1]);
    }
    auto q_BSHD = parts[0].view({B, S, num_heads, Dh});
    auto k_BSGD = parts[1].view({B, S, num_kv_heads, Dh});
    if (family == ModelFamily::Qwen3MoE) {  // normalized per head
      q_BSHD = q_norm->forward(q_BSHD);
      k_BSGD = k_norm->forward(k_BSGD);
    }
    auto q = apply_rope_half(q_BSHD.transpose(1, 2), rope_theta);
    auto k = apply_rope_half(k_BSGD.transpose(1, 2), rope_theta);
    auto v = parts[2].view({B, S, num_kv_heads, Dh}).transpose(1, 2);
    if (num_kv_heads != num_heads) {  // key/value head g serves query heads g R .. g R + R - 1
      k = k.repeat_interleave(num_heads / num_kv_heads, 1);
      v = v.repeat_interleave(num_heads / num_kv_heads, 1);
    }
    auto y = at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true);
    return out->forward(y.transpose(1, 2).reshape({B, S, num_heads * Dh}));
  }
  torch::Tensor qkv_BS3HD, q, k, v, y;
  {
    GBMOE_PROFILE_REGION("attention.qkv");
    qkv_BS3HD = qkv->forward(x).view({B, S, 3, num_heads, Dh});
  }
  {
    GBMOE_PROFILE_REGION("attention.rope");
    if (qkv_heads_cpu_applies(qkv_BS3HD)) {  // the fused pass; the reference below
      if (!rope_cos_.defined() || rope_cos_.size(0) != S) {
        std::tie(rope_cos_, rope_sin_) = rope_tables(S, Dh, rope_theta, x.device());
      }
      auto heads = qkv_heads_rope_cpu(qkv_BS3HD, rope_cos_, rope_sin_);
      q = heads[0], k = heads[1], v = heads[2];
    } else {
      q = apply_rope(qkv_BS3HD.select(2, 0).transpose(1, 2), rope_theta);
      k = apply_rope(qkv_BS3HD.select(2, 1).transpose(1, 2), rope_theta);
      v = qkv_BS3HD.select(2, 2).transpose(1, 2);
    }
  }
  {
    GBMOE_PROFILE_REGION("attention.sdpa");
    if (causal_attention_cpu_applies(q, k, v)) {  // the fused kernel writes (B, S, H, Dh)
      y = causal_attention_cpu(q, k, v);
    } else {
      y = at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true).transpose(1, 2);
    }
  }
  GBMOE_PROFILE_REGION("attention.out");
  return out->forward(y.reshape({B, S, dim}));
}

BlockImpl::BlockImpl(const LanguageModelOptions& options_, bool is_moe_)
    : options(options_), is_moe(is_moe_) {
  reset();
}

void BlockImpl::reset() {
  attn_norm = register_module("attn_norm", RMSNorm(options.dim(), options.norm_eps()));
  attn = register_module("attn", Attention(options));
  ffn_norm = register_module("ffn_norm", RMSNorm(options.dim(), options.norm_eps()));
  if (is_moe) {
    moe = register_module("moe", MoELayer(options.moe()));
  } else {
    dense = register_module("dense", SwiGLU(SwiGLUOptions(options.dim(), options.dense_hidden())));
  }
}

torch::Tensor BlockImpl::forward(const torch::Tensor& x, const torch::Tensor& mask,
                                 RoutingContext* routing) {
  GBMOE_PROFILE_REGION("block");  // the residual adds; the rest has regions of its own
  torch::Tensor a;
  {
    GBMOE_PROFILE_REGION("attention");
    a = attn->forward(attn_norm->forward(x));
  }
  auto h = x + a;
  auto n = ffn_norm->forward(h);
  torch::Tensor f;
  if (is_moe) {
    GBMOE_PROFILE_REGION("moe");
    f = moe->forward(n, mask, routing);
  } else {
    GBMOE_PROFILE_REGION("dense");
    f = dense->forward(n);
  }
  return h + f;
}

LanguageModelImpl::LanguageModelImpl(LanguageModelOptions options_) : options(std::move(options_)) {
  reset();
}

void LanguageModelImpl::reset() {
  options.validate();
  embed = register_module("embed", torch::nn::Embedding(options.vocab_size(), options.dim()));
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (int64_t l = 0; l < options.num_layers(); ++l) {
    const auto& m = options.moe_layers();
    const bool is_moe = std::find(m.begin(), m.end(), l) != m.end();
    blocks->push_back(Block(options, is_moe));
  }
  final_norm = register_module("final_norm", RMSNorm(options.dim(), options.norm_eps()));
  if (!options.tie_embeddings()) {
    head = register_module(
        "head", torch::nn::Linear(
                    torch::nn::LinearOptions(options.dim(), options.vocab_size()).bias(false)));
  }
  reset_parameters();
}

void LanguageModelImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  const double std = options.init_std();
  const double residual_std = std / std::sqrt(2.0 * options.num_layers());
  embed->weight.normal_(0.0, std);
  if (head) head->weight.normal_(0.0, std);
  for (const auto& module : *blocks) {
    auto block = module->as<BlockImpl>();
    block->attn->qkv->weight.normal_(0.0, std);
    block->attn->out->weight.normal_(0.0, residual_std);
    if (block->is_moe) {
      block->moe->router->weight.normal_(0.0, std);
      block->moe->experts->gate_up.normal_(0.0, std);
      block->moe->experts->down.normal_(0.0, residual_std);
      if (block->moe->shared) {
        block->moe->shared->gate_up.normal_(0.0, std);
        block->moe->shared->down.normal_(0.0, residual_std);
      }
    } else {
      block->dense->gate_up.normal_(0.0, std);
      block->dense->down.normal_(0.0, residual_std);
    }
  }
}

torch::Tensor LanguageModelImpl::forward(const torch::Tensor& tokens, const torch::Tensor& mask,
                                         RoutingContext* routing) {
  TORCH_CHECK(tokens.dim() == 2, "tokens must be (B, S), got ", tokens.sizes());
  torch::Tensor x;
  {
    GBMOE_PROFILE_REGION("embed");
    x = embed->forward(tokens);
  }
  const bool recompute =
      options.activation_checkpointing() && is_training() && torch::GradMode::is_enabled();
  for (const auto& module : *blocks) {
    auto* block = module->as<BlockImpl>();
    if (!recompute) {
      x = block->forward(x, mask, routing);
      continue;
    }
    x = checkpoint([block, mask](const torch::Tensor& in,
                                 RoutingContext* r) { return block->forward(in, mask, r); },
                   x, routing);
  }
  x = final_norm->forward(x);
  GBMOE_PROFILE_REGION("head");
  auto logits = head ? head->forward(x) : torch::nn::functional::linear(x, embed->weight);
  // fp32 logits under autocast; an fp64 model (tests) keeps fp64.
  return logits.scalar_type() == torch::kDouble ? logits : logits.to(torch::kFloat);
}

std::vector<MoELayer> LanguageModelImpl::moe_layers() const {
  std::vector<MoELayer> out;
  for (const auto& module : *blocks) {
    auto block = module->as<BlockImpl>();
    if (block->is_moe) out.push_back(block->moe);
  }
  return out;
}

}  // namespace gbmoe
