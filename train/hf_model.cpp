// HF <-> gbmoe: config.json fields to model.* settings, tensor names and layouts (HF Linear
// weights are (out, in); gbmoe's expert and dense FFN matrices are (in, out) with gate and up
// side by side), and the checks that keep a conversion from silently corrupting experts.
#include "train/hf_model.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "moe/experts.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace gbmoe {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string shape_str(c10::IntArrayRef s) { return c10::str(s); }

// A config.json value, or fallback when the key is absent or null.
template <class T>
T value_or(const json& cfg, const std::string& key, T fallback) {
  if (!cfg.contains(key) || cfg[key].is_null()) return fallback;
  return cfg[key].get<T>();
}

template <class T>
T required(const json& cfg, const std::string& key, const std::string& path) {
  TORCH_CHECK(cfg.contains(key) && !cfg[key].is_null(), path, " lacks the key ", key);
  try {
    return cfg[key].get<T>();
  } catch (const json::exception& e) {
    TORCH_CHECK(false, path, ": key ", key, " has an unexpected value ", cfg[key].dump());
  }
}

bool is_qwen(const ModelConfig& m) { return m.family == "qwen3_moe"; }
bool is_olmoe(const ModelConfig& m) { return m.family == "olmoe"; }

// HF names of the feed-forward module of a MoE layer and of its experts' gate, up, down.
struct ExpertNames {
  std::string mlp, gate, up, down;
};
ExpertNames expert_names(const ModelConfig& m) {
  if (is_qwen(m) || is_olmoe(m)) return {"mlp", "gate_proj", "up_proj", "down_proj"};
  return {"block_sparse_moe", "w1", "w3", "w2"};
}

int64_t head_size(const ModelConfig& m) {
  return m.head_dim > 0 ? m.head_dim : m.dim / m.num_heads;
}
int64_t kv_heads(const ModelConfig& m) { return m.num_kv_heads > 0 ? m.num_kv_heads : m.num_heads; }

// Takes HF tensors by name, checking shapes against the config, and remembers which were used.
class HfReader {
 public:
  HfReader(const TensorMap& hf, std::string source) : hf_(hf), source_(std::move(source)) {}
  bool has(const std::string& key) const { return hf_.count(key) > 0; }
  torch::Tensor take(const std::string& key, std::vector<int64_t> shape) {
    auto it = hf_.find(key);
    TORCH_CHECK(it != hf_.end(), source_, " lacks tensor ", key);
    TORCH_CHECK(it->second.sizes() == c10::IntArrayRef(shape), source_, ": tensor ", key,
                " has shape ", shape_str(it->second.sizes()), " but config.json needs ",
                shape_str(shape));
    used_.insert(key);
    return it->second.to(torch::kFloat);
  }
  void check_all_used() const {
    std::vector<std::string> unused;
    for (const auto& item : hf_) {
      if (!used_.count(item.first)) unused.push_back(item.first);
    }
    if (unused.empty()) return;
    std::string list;
    for (size_t i = 0; i < unused.size() && i < 5; ++i) list += (i ? ", " : "") + unused[i];
    TORCH_CHECK(false, source_, " holds ", unused.size(), " tensors this model has no place for (",
                list, unused.size() > 5 ? ", ..." : "",
                "); is config.json the one of these weights?");
  }

 private:
  const TensorMap& hf_;
  std::string source_;
  std::set<std::string> used_;
};

}  // namespace

void check_stacked_experts(const torch::Tensor& gate_up_EDH, const torch::Tensor& down_EFD,
                           const std::vector<torch::Tensor>& gate,
                           const std::vector<torch::Tensor>& up,
                           const std::vector<torch::Tensor>& down, const std::string& where) {
  torch::NoGradGuard no_grad;
  const int64_t E = gate_up_EDH.size(0), D = gate_up_EDH.size(1), N = 4;
  auto gen = at::detail::createCPUGenerator(1234);
  auto x_ND = at::randn({N, D}, gen, torch::kDouble);
  auto tokens = x_ND.repeat({E, 1});
  auto got = grouped_swiglu_reference(tokens, torch::full({E}, N, torch::kLong),
                                      gate_up_EDH.to(torch::kDouble), down_EFD.to(torch::kDouble));
  for (int64_t e = 0; e < E; ++e) {
    namespace F = torch::nn::functional;
    auto h = F::silu(F::linear(x_ND, gate[e].to(torch::kDouble))) *
             F::linear(x_ND, up[e].to(torch::kDouble));
    auto want = F::linear(h, down[e].to(torch::kDouble));
    auto mine = got.narrow(0, e * N, N);
    const double err = (mine - want).abs().max().item<double>();
    const double scale = want.abs().max().item<double>() + 1e-30;
    TORCH_CHECK(err <= 1e-6 * scale, where, ": expert ", e,
                " computes differently after conversion (relative error ", err / scale,
                "): its stacked weights are transposed or have gate and up swapped");
  }
}

bool is_hf_model_dir(const std::string& dir) { return fs::exists(fs::path(dir) / "config.json"); }

bool is_gbmoe_checkpoint(const std::string& dir) {
  return fs::exists(fs::path(dir) / "config.yaml") && fs::exists(fs::path(dir) / "state.pt");
}

namespace {

// config.json parsed, with everything gbmoe cannot run refused naming the key; returns the
// RoPE base (rope_theta, or rope_parameters.rope_theta).
double read_supported_hf_config(const std::string& path, json& cfg) {
  {
    std::ifstream in(path);
    TORCH_CHECK(in, "cannot read ", path);
    try {
      cfg = json::parse(in);
    } catch (const json::parse_error& e) {
      TORCH_CHECK(false, path, " is not valid JSON: ", e.what());
    }
  }
  const auto type = value_or<std::string>(cfg, "model_type", "");
  TORCH_CHECK(type == "qwen3_moe" || type == "mixtral" || type == "olmoe", path,
              ": unsupported model_type '", type, "' (gbmoe reads qwen3_moe, mixtral and olmoe)");
  TORCH_CHECK(!cfg.contains("clip_qkv") || cfg["clip_qkv"].is_null(), path,
              ": clip_qkv is not supported");
  TORCH_CHECK(value_or<std::string>(cfg, "hidden_act", "silu") == "silu", path, ": hidden_act ",
              cfg["hidden_act"].dump(), " is not supported (only silu)");
  TORCH_CHECK(!value_or<bool>(cfg, "attention_bias", false), path,
              ": attention_bias true is not supported");
  TORCH_CHECK(!value_or<bool>(cfg, "use_sliding_window", false) &&
                  (type == "qwen3_moe" || !cfg.contains("sliding_window") ||
                   cfg["sliding_window"].is_null()),
              path, ": sliding_window attention is not supported");
  double theta = value_or<double>(cfg, "rope_theta", 10000.0);
  if (cfg.contains("rope_parameters") && cfg["rope_parameters"].is_object()) {
    const auto& rp = cfg["rope_parameters"];
    TORCH_CHECK(value_or<std::string>(rp, "rope_type", "default") == "default", path,
                ": rope_parameters.rope_type ", rp["rope_type"].dump(),
                " is not supported (only default)");
    theta = value_or<double>(rp, "rope_theta", theta);
  }
  TORCH_CHECK(!cfg.contains("rope_scaling") || cfg["rope_scaling"].is_null(), path,
              ": rope_scaling is not supported");
  return theta;
}

}  // namespace

ModelConfig model_config_from_hf(const std::string& path) {
  json cfg;
  const double theta = read_supported_hf_config(path, cfg);
  const auto type = value_or<std::string>(cfg, "model_type", "");
  ModelConfig m;
  m.family = type;
  m.vocab_size = required<int64_t>(cfg, "vocab_size", path);
  m.dim = required<int64_t>(cfg, "hidden_size", path);
  m.num_layers = required<int64_t>(cfg, "num_hidden_layers", path);
  m.num_heads = required<int64_t>(cfg, "num_attention_heads", path);
  m.num_kv_heads = value_or<int64_t>(cfg, "num_key_value_heads", m.num_heads);
  m.head_dim = value_or<int64_t>(cfg, "head_dim", m.dim / m.num_heads);
  m.top_k = required<int64_t>(cfg, "num_experts_per_tok", path);
  m.rope_theta = theta;
  m.norm_eps = value_or<double>(cfg, "rms_norm_eps", 1e-6);
  m.tie_embeddings = value_or<bool>(cfg, "tie_word_embeddings", false);
  m.score_function = "softmax";
  m.shared_experts = 0;
  m.init_std = value_or<double>(cfg, "initializer_range", m.init_std);
  std::vector<int64_t> sparse;
  if (type == "qwen3_moe") {
    m.num_experts = cfg.contains("num_experts") ? required<int64_t>(cfg, "num_experts", path)
                                                : required<int64_t>(cfg, "num_local_experts", path);
    m.expert_hidden = required<int64_t>(cfg, "moe_intermediate_size", path);
    m.dense_hidden = required<int64_t>(cfg, "intermediate_size", path);
    m.renormalize = value_or<bool>(cfg, "norm_topk_prob", false);
    const int64_t step = value_or<int64_t>(cfg, "decoder_sparse_step", 1);
    const auto dense_only = value_or<std::vector<int64_t>>(cfg, "mlp_only_layers", {});
    TORCH_CHECK(step >= 1, path, ": decoder_sparse_step (", step, ") must be >= 1");
    for (int64_t l = 0; l < m.num_layers; ++l) {
      const bool only_mlp = std::find(dense_only.begin(), dense_only.end(), l) != dense_only.end();
      if (!only_mlp && m.num_experts > 0 && (l + 1) % step == 0) sparse.push_back(l);
    }
  } else {
    m.num_experts = cfg.contains("num_local_experts")
                        ? required<int64_t>(cfg, "num_local_experts", path)
                        : required<int64_t>(cfg, "num_experts", path);
    m.expert_hidden = required<int64_t>(cfg, "intermediate_size", path);
    m.dense_hidden = m.expert_hidden;
    m.renormalize = type == "mixtral" || value_or<bool>(cfg, "norm_topk_prob", false);
    for (int64_t l = 0; l < m.num_layers; ++l) sparse.push_back(l);
  }
  TORCH_CHECK(type != "olmoe" || m.head_dim * m.num_heads == m.dim, path, ": head_dim (",
              m.head_dim, ") must be hidden_size / num_attention_heads (", m.dim / m.num_heads,
              ") for olmoe, whose q/k norms span hidden_size");
  TORCH_CHECK(!sparse.empty(), path,
              ": the model has no MoE layer (decoder_sparse_step, "
              "mlp_only_layers); gbmoe needs at least one");
  if (static_cast<int64_t>(sparse.size()) == m.num_layers) {
    m.moe_layers = "all";
  } else {
    m.moe_layers.clear();
    for (size_t i = 0; i < sparse.size(); ++i) {
      m.moe_layers += (i ? "," : "") + std::to_string(sparse[i]);
    }
  }
  return m;
}

std::string hf_config_json(const ModelConfig& m, const std::string& dtype) {
  TORCH_CHECK(m.family == "qwen3_moe" || m.family == "mixtral" || m.family == "olmoe",
              "model.family (", m.family,
              ") has no Hugging Face equivalent; export needs qwen3_moe, mixtral or olmoe");
  TORCH_CHECK(m.score_function == "softmax", "model.score_function (", m.score_function,
              ") cannot be exported: transformers' ", m.family, " routes with softmax");
  TORCH_CHECK(m.shared_experts == 0, "model.shared_experts (", m.shared_experts,
              ") cannot be exported: transformers' ", m.family, " has no shared experts");
  const auto sparse = m.moe_layer_indices();
  json cfg = {{"hidden_act", "silu"},
              {"hidden_size", m.dim},
              {"num_hidden_layers", m.num_layers},
              {"num_attention_heads", m.num_heads},
              {"num_key_value_heads", kv_heads(m)},
              {"head_dim", head_size(m)},
              {"num_experts_per_tok", m.top_k},
              {"rms_norm_eps", m.norm_eps},
              {"rope_theta", m.rope_theta},
              {"rope_parameters", {{"rope_theta", m.rope_theta}, {"rope_type", "default"}}},
              {"tie_word_embeddings", m.tie_embeddings},
              {"vocab_size", m.vocab_size},
              {"max_position_embeddings", 32768},
              {"initializer_range", m.init_std},
              {"attention_dropout", 0.0},
              {"use_cache", true},
              {"dtype", dtype}};
  if (is_qwen(m)) {
    std::vector<int64_t> dense_only;
    for (int64_t l = 0; l < m.num_layers; ++l) {
      if (std::find(sparse.begin(), sparse.end(), l) == sparse.end()) dense_only.push_back(l);
    }
    cfg["architectures"] = {"Qwen3MoeForCausalLM"};
    cfg["model_type"] = "qwen3_moe";
    cfg["num_experts"] = m.num_experts;
    cfg["moe_intermediate_size"] = m.expert_hidden;
    cfg["intermediate_size"] = m.dense_hidden;
    cfg["norm_topk_prob"] = m.renormalize;
    cfg["decoder_sparse_step"] = 1;
    cfg["mlp_only_layers"] = dense_only;
    cfg["attention_bias"] = false;
    cfg["use_sliding_window"] = false;
  } else if (is_olmoe(m)) {
    TORCH_CHECK(static_cast<int64_t>(sparse.size()) == m.num_layers, "model.moe_layers (",
                m.moe_layers, ") cannot be exported as olmoe, whose every block is MoE");
    cfg["architectures"] = {"OlmoeForCausalLM"};
    cfg["model_type"] = "olmoe";
    cfg["num_experts"] = m.num_experts;
    cfg["intermediate_size"] = m.expert_hidden;
    cfg["norm_topk_prob"] = m.renormalize;
    cfg["clip_qkv"] = nullptr;
    cfg["attention_bias"] = false;
  } else {
    TORCH_CHECK(static_cast<int64_t>(sparse.size()) == m.num_layers, "model.moe_layers (",
                m.moe_layers, ") cannot be exported as mixtral, whose every block is MoE");
    TORCH_CHECK(m.renormalize,
                "model.renormalize false cannot be exported as mixtral, which "
                "always renormalizes the top-k weights");
    cfg["architectures"] = {"MixtralForCausalLM"};
    cfg["model_type"] = "mixtral";
    cfg["num_local_experts"] = m.num_experts;
    cfg["intermediate_size"] = m.expert_hidden;
    cfg["sliding_window"] = nullptr;
  }
  return cfg.dump(2) + "\n";
}

TensorMap hf_to_gbmoe_state(const ModelConfig& m, const TensorMap& hf, const std::string& source) {
  HfReader r(hf, source);
  const int64_t D = m.dim, V = m.vocab_size, H = m.num_heads, G = kv_heads(m), Dh = head_size(m);
  const int64_t E = m.num_experts, F = m.expert_hidden;
  const auto sparse = m.moe_layer_indices();
  const auto names = expert_names(m);
  TensorMap out;
  out["embed.weight"] = r.take("model.embed_tokens.weight", {V, D});
  out["final_norm.weight"] = r.take("model.norm.weight", {D});
  if (!m.tie_embeddings) {
    out["head.weight"] = r.take("lm_head.weight", {V, D});
  } else if (r.has("lm_head.weight")) {
    r.take("lm_head.weight", {V, D});  // tied: a saved copy of the embedding
  }
  for (int64_t l = 0; l < m.num_layers; ++l) {
    const std::string hp = "model.layers." + std::to_string(l) + ".";
    const std::string gp = "blocks." + std::to_string(l) + ".";
    out[gp + "attn_norm.weight"] = r.take(hp + "input_layernorm.weight", {D});
    out[gp + "ffn_norm.weight"] = r.take(hp + "post_attention_layernorm.weight", {D});
    out[gp + "attn.qkv.weight"] = torch::cat({r.take(hp + "self_attn.q_proj.weight", {H * Dh, D}),
                                              r.take(hp + "self_attn.k_proj.weight", {G * Dh, D}),
                                              r.take(hp + "self_attn.v_proj.weight", {G * Dh, D})},
                                             0);
    out[gp + "attn.out.weight"] = r.take(hp + "self_attn.o_proj.weight", {D, H * Dh});
    if (is_qwen(m) || is_olmoe(m)) {
      const int64_t q = is_qwen(m) ? Dh : H * Dh, k = is_qwen(m) ? Dh : G * Dh;
      out[gp + "attn.q_norm.weight"] = r.take(hp + "self_attn.q_norm.weight", {q});
      out[gp + "attn.k_norm.weight"] = r.take(hp + "self_attn.k_norm.weight", {k});
    }
    if (std::find(sparse.begin(), sparse.end(), l) == sparse.end()) {
      const int64_t Fd = m.dense_hidden;
      auto g = r.take(hp + "mlp.gate_proj.weight", {Fd, D});
      auto u = r.take(hp + "mlp.up_proj.weight", {Fd, D});
      out[gp + "dense.gate_up"] = torch::cat({g.t(), u.t()}, 1).contiguous();
      out[gp + "dense.down"] = r.take(hp + "mlp.down_proj.weight", {D, Fd}).t().contiguous();
      continue;
    }
    const std::string mp = hp + names.mlp + ".";
    out[gp + "moe.router.weight"] = r.take(mp + "gate.weight", {E, D});
    const std::string bias = mp + "gate.e_score_correction_bias";
    out[gp + "moe.router.expert_bias"] = r.has(bias) ? r.take(bias, {E}) : torch::zeros({E});
    std::vector<torch::Tensor> gate, up, down;
    if (r.has(mp + "experts.gate_up_proj")) {  // transformers' fused layout
      auto gu = r.take(mp + "experts.gate_up_proj", {E, 2 * F, D});
      auto dn = r.take(mp + "experts.down_proj", {E, D, F});
      for (int64_t e = 0; e < E; ++e) {
        gate.push_back(gu[e].narrow(0, 0, F));
        up.push_back(gu[e].narrow(0, F, F));
        down.push_back(dn[e]);
      }
    } else {
      for (int64_t e = 0; e < E; ++e) {
        const std::string ep = mp + "experts." + std::to_string(e) + ".";
        gate.push_back(r.take(ep + names.gate + ".weight", {F, D}));
        up.push_back(r.take(ep + names.up + ".weight", {F, D}));
        down.push_back(r.take(ep + names.down + ".weight", {D, F}));
      }
    }
    std::vector<torch::Tensor> gate_up_e, down_e;
    for (int64_t e = 0; e < E; ++e) {
      gate_up_e.push_back(torch::cat({gate[e].t(), up[e].t()}, 1));  // (D, 2F)
      down_e.push_back(down[e].t());                                 // (F, D)
    }
    auto gate_up = torch::stack(gate_up_e).contiguous();
    auto down_stacked = torch::stack(down_e).contiguous();
    check_stacked_experts(gate_up, down_stacked, gate, up, down,
                          source + ", layer " + std::to_string(l));
    out[gp + "moe.experts.gate_up"] = gate_up;
    out[gp + "moe.experts.down"] = down_stacked;
  }
  r.check_all_used();
  return out;
}

TensorMap gbmoe_state_to_hf(const ModelConfig& m, const TensorMap& state, torch::ScalarType dtype) {
  hf_config_json(m);  // refuses what transformers cannot represent
  auto get = [&](const std::string& name) {
    auto it = state.find(name);
    TORCH_CHECK(it != state.end(), "the gbmoe state lacks ", name);
    return it->second.to(torch::kFloat);
  };
  const int64_t H = m.num_heads, G = kv_heads(m), Dh = head_size(m);
  const int64_t E = m.num_experts, F = m.expert_hidden;
  const auto sparse = m.moe_layer_indices();
  const auto names = expert_names(m);
  TensorMap out;
  out["model.embed_tokens.weight"] = get("embed.weight");
  out["model.norm.weight"] = get("final_norm.weight");
  if (!m.tie_embeddings) out["lm_head.weight"] = get("head.weight");
  for (int64_t l = 0; l < m.num_layers; ++l) {
    const std::string hp = "model.layers." + std::to_string(l) + ".";
    const std::string gp = "blocks." + std::to_string(l) + ".";
    out[hp + "input_layernorm.weight"] = get(gp + "attn_norm.weight");
    out[hp + "post_attention_layernorm.weight"] = get(gp + "ffn_norm.weight");
    auto qkv = get(gp + "attn.qkv.weight").split_with_sizes({H * Dh, G * Dh, G * Dh}, 0);
    out[hp + "self_attn.q_proj.weight"] = qkv[0];
    out[hp + "self_attn.k_proj.weight"] = qkv[1];
    out[hp + "self_attn.v_proj.weight"] = qkv[2];
    out[hp + "self_attn.o_proj.weight"] = get(gp + "attn.out.weight");
    if (is_qwen(m) || is_olmoe(m)) {
      out[hp + "self_attn.q_norm.weight"] = get(gp + "attn.q_norm.weight");
      out[hp + "self_attn.k_norm.weight"] = get(gp + "attn.k_norm.weight");
    }
    if (std::find(sparse.begin(), sparse.end(), l) == sparse.end()) {
      auto gu = get(gp + "dense.gate_up");
      const int64_t Fd = gu.size(1) / 2;
      out[hp + "mlp.gate_proj.weight"] = gu.narrow(1, 0, Fd).t();
      out[hp + "mlp.up_proj.weight"] = gu.narrow(1, Fd, Fd).t();
      out[hp + "mlp.down_proj.weight"] = get(gp + "dense.down").t();
      continue;
    }
    const std::string mp = hp + names.mlp + ".";
    out[mp + "gate.weight"] = get(gp + "moe.router.weight");
    auto bias = get(gp + "moe.router.expert_bias");
    if (bias.abs().max().item<double>() > 0) out[mp + "gate.e_score_correction_bias"] = bias;
    auto gate_up = get(gp + "moe.experts.gate_up"), down = get(gp + "moe.experts.down");
    TORCH_CHECK(gate_up.size(0) == E && gate_up.size(2) == 2 * F, "the gbmoe state's ", gp,
                "moe.experts.gate_up has shape ", shape_str(gate_up.sizes()),
                " but the config needs (", E, ", ", m.dim, ", ", 2 * F, ")");
    std::vector<torch::Tensor> g, u, d;
    for (int64_t e = 0; e < E; ++e) {
      g.push_back(gate_up[e].narrow(1, 0, F).t());
      u.push_back(gate_up[e].narrow(1, F, F).t());
      d.push_back(down[e].t());
      const std::string ep = mp + "experts." + std::to_string(e) + ".";
      out[ep + names.gate + ".weight"] = g.back();
      out[ep + names.up + ".weight"] = u.back();
      out[ep + names.down + ".weight"] = d.back();
    }
    check_stacked_experts(gate_up, down, g, u, d, "export of layer " + std::to_string(l));
  }
  for (auto& item : out) item.second = item.second.contiguous().to(dtype);
  return out;
}

TensorMap module_state(torch::nn::Module& module) {
  TensorMap out;
  for (const auto& item : module.named_parameters()) {
    out[item.key()] = item.value().detach().cpu().clone();
  }
  for (const auto& item : module.named_buffers()) {
    out[item.key()] = item.value().detach().cpu().clone();
  }
  return out;
}

void load_module_state(torch::nn::Module& module, const TensorMap& state,
                       const std::string& source) {
  torch::NoGradGuard no_grad;
  std::set<std::string> wanted;
  auto copy = [&](const std::string& name, torch::Tensor& into) {
    wanted.insert(name);
    auto it = state.find(name);
    TORCH_CHECK(it != state.end(), source, " lacks the model tensor ", name);
    TORCH_CHECK(it->second.sizes() == into.sizes(), source, ": ", name, " has shape ",
                shape_str(it->second.sizes()), " but the model needs ", shape_str(into.sizes()));
    into.copy_(it->second);
  };
  for (auto& item : module.named_parameters()) copy(item.key(), item.value());
  for (auto& item : module.named_buffers()) copy(item.key(), item.value());
  for (const auto& item : state) {
    TORCH_CHECK(wanted.count(item.first), source, " holds ", item.first,
                ", which the model does not have");
  }
}

Config read_model_source_config(const std::string& path) {
  if (is_hf_model_dir(path)) {
    Config config;
    config.model = model_config_from_hf((fs::path(path) / "config.json").string());
    return config;
  }
  TORCH_CHECK(is_gbmoe_checkpoint(path), path,
              " is neither a Hugging Face model directory (config.json) nor a gbmoe checkpoint "
              "(config.yaml and state.pt)");
  Config config = Config::from_yaml_file((fs::path(path) / "config.yaml").string());
  if (config.model.vocab_size == 0) {
    torch::serialize::InputArchive archive;
    archive.load_from((fs::path(path) / "state.pt").string());
    torch::Tensor embed;
    TORCH_CHECK(archive.try_read("model/embed.weight", embed), path,
                "/state.pt lacks model/embed.weight");
    config.model.vocab_size = embed.size(0);
  }
  config.model.init_from.clear();
  return config;
}

LanguageModel load_model_from(const std::string& path, Config* config_out) {
  Config config = read_model_source_config(path);
  config.validate();
  LanguageModel model(model_options_from_config(config, config.model.vocab_size));
  if (is_hf_model_dir(path)) {
    load_module_state(*model, hf_to_gbmoe_state(config.model, read_safetensors_dir(path), path),
                      path);
  } else {
    load_model_state((fs::path(path) / "state.pt").string(), *model);
  }
  model->eval();
  if (config_out) *config_out = config;
  return model;
}

void write_gbmoe_checkpoint(const std::string& dir, const Config& config, const TensorMap& state) {
  fs::create_directories(dir);
  torch::serialize::OutputArchive archive;
  LanguageModel model(model_options_from_config(config, config.model.vocab_size));
  std::set<std::string> buffers;
  for (const auto& item : model->named_buffers()) buffers.insert(item.key());
  load_module_state(*model, state, dir);  // checks names and shapes
  for (const auto& [name, t] : state) {
    archive.write("model/" + name, t.to(torch::kFloat).contiguous(),
                  /*is_buffer=*/buffers.count(name) > 0);
  }
  archive.save_to((fs::path(dir) / "state.pt").string());
  std::ofstream((fs::path(dir) / "config.yaml")) << config.to_yaml();
  std::ofstream((fs::path(dir) / "meta.txt")) << "step 0\nsampler none\n";
}

void write_hf_model(const std::string& dir, const ModelConfig& m, const TensorMap& state,
                    torch::ScalarType dtype, int64_t max_shard_bytes) {
  const std::string dtype_name = dtype == torch::kBFloat16 ? "bfloat16"
                                 : dtype == torch::kHalf   ? "float16"
                                                           : "float32";
  const std::string config_text = hf_config_json(m, dtype_name);
  const TensorMap hf = gbmoe_state_to_hf(m, state, dtype);
  fs::create_directories(dir);
  for (const auto& entry : fs::directory_iterator(dir)) {
    const auto name = entry.path().filename().string();
    if (name.size() > 12 && name.substr(name.size() - 12) == ".safetensors") fs::remove(entry);
  }
  write_safetensors_dir(dir, hf, max_shard_bytes);
  std::ofstream(fs::path(dir) / "config.json") << config_text;
  std::ofstream(fs::path(dir) / "generation_config.json")
      << "{\n  \"_from_model_config\": true\n}\n";
}

void resolve_init_from(Config& config) {
  const std::string path = config.model.init_from;
  if (path.empty()) return;
  const Config source = read_model_source_config(path);
  const Config defaults;
  // Settings that describe the tensors; the others (init_std, capacity_factor, drop_policy) are
  // free to change.
  const std::vector<std::string> arch = {"family",         "vocab_size",    "dim",
                                         "num_layers",     "num_heads",     "num_kv_heads",
                                         "head_dim",       "moe_layers",    "num_experts",
                                         "top_k",          "expert_hidden", "shared_experts",
                                         "score_function", "renormalize",   "dense_hidden",
                                         "tie_embeddings", "rope_theta",    "norm_eps"};
  std::vector<std::string> conflicts;
  for (const auto& name : arch) {
    const std::string key = "model." + name;
    const std::string mine = config.get(key), theirs = source.get(key);
    if (mine != defaults.get(key) && mine != theirs) {
      conflicts.push_back(key + " (" + mine + ") contradicts " + path + " (" + theirs + ")");
    }
    config.set(key, theirs);
  }
  if (!conflicts.empty()) {
    std::string msg = "model.init_from (" + path + "):";
    for (const auto& c : conflicts) msg += "\n  " + c;
    throw ConfigError(msg + "\nleave these settings out or make them equal to the model's");
  }
}

void load_init_from(const Config& config, torch::nn::Module& model) {
  const std::string& path = config.model.init_from;
  if (path.empty()) return;
  if (is_hf_model_dir(path)) {
    load_module_state(model, hf_to_gbmoe_state(config.model, read_safetensors_dir(path), path),
                      path);
  } else {
    load_model_state((fs::path(path) / "state.pt").string(), model);
  }
}

}  // namespace gbmoe
