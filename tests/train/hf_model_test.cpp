// HF <-> gbmoe conversion without transformers: round trips with square dimensions, the guards
// against transposed or swapped experts and experts left out, the export refusals, and
// model.init_from taking the architecture and refusing contradictions.
#include "train/hf_model.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "tests/test_util.h"
#include "train/trainer.h"

namespace gbmoe {
namespace {

namespace fs = std::filesystem;

// A Qwen3-MoE whose expert matrices are square (dim == expert_hidden): shapes cannot catch a
// transposed expert, only the functional check can.
Config square_qwen() {
  Config c;
  auto& m = c.model;
  m.family = "qwen3_moe";
  m.vocab_size = 50;
  m.dim = 32;
  m.num_layers = 2;
  m.num_heads = 4;
  m.num_kv_heads = 2;
  m.head_dim = 8;
  m.num_experts = 4;
  m.expert_hidden = 32;
  m.dense_hidden = 40;
  m.moe_layers = "1";
  m.tie_embeddings = false;
  return c;
}

TensorMap random_state(const Config& c) {
  torch::manual_seed(5);
  LanguageModel model(model_options_from_config(c, c.model.vocab_size));
  return module_state(*model);
}

TEST(HfModel, SquareExpertsRoundTripExactly) {
  const Config c = square_qwen();
  const auto state = random_state(c);
  const auto hf = gbmoe_state_to_hf(c.model, state);
  EXPECT_TRUE(hf.count("model.layers.1.mlp.experts.3.gate_proj.weight"));
  EXPECT_TRUE(hf.count("model.layers.0.mlp.gate_proj.weight"));
  EXPECT_FALSE(hf.count("model.layers.1.mlp.gate.e_score_correction_bias")) << "zero bias";
  const auto back = hf_to_gbmoe_state(c.model, hf, "hf");
  ASSERT_EQ(back.size(), state.size());
  for (const auto& [name, t] : state) EXPECT_TRUE(torch::equal(back.at(name), t)) << name;
}

TEST(HfModel, LossFreeBiasIsExportedUnderDeepSeekV3sName) {
  const Config c = square_qwen();
  auto state = random_state(c);
  state["blocks.1.moe.router.expert_bias"] = torch::tensor({0.5f, -0.25f, 0.f, 1.f});
  const auto hf = gbmoe_state_to_hf(c.model, state);
  ASSERT_TRUE(hf.count("model.layers.1.mlp.gate.e_score_correction_bias"));
  const auto back = hf_to_gbmoe_state(c.model, hf, "hf");
  EXPECT_TRUE(torch::equal(back.at("blocks.1.moe.router.expert_bias"),
                           state.at("blocks.1.moe.router.expert_bias")));
}

TEST(HfModel, ExpertCheckCatchesTransposedSquareAndSwappedGateUp) {
  // What a converter bug would produce from correct per-expert HF weights of a square expert.
  torch::manual_seed(9);
  const int64_t E = 3, D = 16, F = 16;
  std::vector<torch::Tensor> gate, up, down, gate_up, stacked_down;
  for (int64_t e = 0; e < E; ++e) {
    gate.push_back(torch::randn({F, D}));
    up.push_back(torch::randn({F, D}));
    down.push_back(torch::randn({D, F}));
    gate_up.push_back(torch::cat({gate[e].t(), up[e].t()}, 1));
    stacked_down.push_back(down[e].t());
  }
  auto gu = torch::stack(gate_up), dn = torch::stack(stacked_down);
  EXPECT_NO_THROW(check_stacked_experts(gu, dn, gate, up, down, "layer 0"));

  auto transposed = dn.clone();
  transposed[1] = down[1];  // (F, D) == (D, F): shapes alone cannot tell
  auto msg =
      exception_message([&] { check_stacked_experts(gu, transposed, gate, up, down, "layer 0"); });
  EXPECT_NE(msg.find("layer 0: expert 1 computes differently"), std::string::npos) << msg;

  auto swapped = torch::cat({gu.narrow(2, F, F), gu.narrow(2, 0, F)}, 2);
  msg = exception_message([&] { check_stacked_experts(swapped, dn, gate, up, down, "layer 3"); });
  EXPECT_NE(msg.find("layer 3: expert 0 computes differently"), std::string::npos) << msg;
  EXPECT_NE(msg.find("gate and up swapped"), std::string::npos) << msg;
}

TEST(HfModel, FusedExpertLayoutReadsAsPerExpert) {
  // transformers keeps experts fused in memory: gate_up_proj (E, 2F, D), gate rows first.
  const Config c = square_qwen();
  const auto state = random_state(c);
  auto hf = gbmoe_state_to_hf(c.model, state);
  std::vector<torch::Tensor> gu, dn;
  for (int64_t e = 0; e < c.model.num_experts; ++e) {
    const std::string p = "model.layers.1.mlp.experts." + std::to_string(e) + ".";
    gu.push_back(torch::cat({hf.at(p + "gate_proj.weight"), hf.at(p + "up_proj.weight")}, 0));
    dn.push_back(hf.at(p + "down_proj.weight"));
    for (const char* w : {"gate_proj.weight", "up_proj.weight", "down_proj.weight"})
      hf.erase(p + w);
  }
  hf["model.layers.1.mlp.experts.gate_up_proj"] = torch::stack(gu);
  hf["model.layers.1.mlp.experts.down_proj"] = torch::stack(dn);
  const auto back = hf_to_gbmoe_state(c.model, hf, "hf");
  EXPECT_TRUE(torch::equal(back.at("blocks.1.moe.experts.gate_up"),
                           state.at("blocks.1.moe.experts.gate_up")));
  EXPECT_TRUE(
      torch::equal(back.at("blocks.1.moe.experts.down"), state.at("blocks.1.moe.experts.down")));
}

TEST(HfModel, MissingOrExtraExpertTensorsFail) {
  const Config c = square_qwen();
  auto hf = gbmoe_state_to_hf(c.model, random_state(c));
  auto extra = hf;
  extra["model.layers.1.mlp.experts.4.up_proj.weight"] = torch::zeros({32, 32});
  auto msg = exception_message([&] { hf_to_gbmoe_state(c.model, extra, "dir"); });
  EXPECT_NE(msg.find("dir holds 1 tensors this model has no place for "
                     "(model.layers.1.mlp.experts.4.up_proj.weight)"),
            std::string::npos)
      << msg;
  hf.erase("model.layers.1.mlp.experts.3.up_proj.weight");
  msg = exception_message([&] { hf_to_gbmoe_state(c.model, hf, "dir"); });
  EXPECT_NE(msg.find("dir lacks tensor model.layers.1.mlp.experts.3.up_proj.weight"),
            std::string::npos)
      << msg;
}

TEST(HfModel, ExportRefusesWhatTransformersCannotRepresent) {
  Config c = square_qwen();
  c.model.family = "gbmoe";
  EXPECT_NE(exception_message([&] { hf_config_json(c.model); }).find("model.family (gbmoe)"),
            std::string::npos);
  c = square_qwen();
  c.model.family = "mixtral";
  EXPECT_NE(exception_message([&] {
              hf_config_json(c.model);
            }).find("model.moe_layers (1) cannot be exported as mixtral"),
            std::string::npos);
  c = square_qwen();
  c.model.shared_experts = 1;
  EXPECT_NE(exception_message([&] { hf_config_json(c.model); }).find("model.shared_experts (1)"),
            std::string::npos);
}

TEST(HfModel, InitFromTakesTheArchitectureAndRefusesContradictions) {
  const auto dir = (fs::temp_directory_path() / "gbmoe-hf-init-from").string();
  fs::remove_all(dir);
  const Config source = square_qwen();
  write_hf_model(dir, source.model, random_state(source));
  EXPECT_EQ(model_config_from_hf(dir + "/config.json").moe_layers, "1");

  Config config;
  config.model.init_from = dir;
  config.model.init_std = 0.05;  // not architecture: kept
  resolve_init_from(config);
  EXPECT_EQ(config.model.family, "qwen3_moe");
  EXPECT_EQ(config.model.dim, 32);
  EXPECT_EQ(config.model.num_kv_heads, 2);
  EXPECT_EQ(config.model.init_std, 0.05);
  LanguageModel model(model_options_from_config(config, config.model.vocab_size));
  load_init_from(config, *model);
  const auto loaded = module_state(*model), want = random_state(source);
  for (const auto& [name, t] : want) EXPECT_TRUE(torch::equal(loaded.at(name), t)) << name;

  Config bad;
  bad.model.init_from = dir;
  bad.model.dim = 64;
  bad.model.num_experts = 16;
  const auto msg = exception_message([&] { resolve_init_from(bad); });
  EXPECT_NE(msg.find("model.dim (64) contradicts " + dir + " (32)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("model.num_experts (16) contradicts " + dir + " (4)"), std::string::npos)
      << msg;
}

}  // namespace
}  // namespace gbmoe
