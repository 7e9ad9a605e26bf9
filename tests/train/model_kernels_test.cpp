// The fused fp32 CPU passes of the model (RMSNorm, q/k/v heads with the rotary embedding, causal
// attention) against the plain LibTorch reference in model.cpp (kernel mode Reference) or
// LibTorch's attention in fp64, over shapes and strides, through the modules; and FusedAdamW
// against torch::optim::AdamW, including a state handed from one to the other.
#include "train/model_kernels_cpu.h"

#include <gtest/gtest.h>

#include <cmath>

#include "moe/kernels.h"
#include "moe/swiglu_cpu.h"
#include "tests/test_util.h"
#include "train/attention_cpu.h"
#include "train/fused_adamw.h"
#include "train/model.h"

namespace gbmoe {
namespace {

// max |a - b| <= tol max(1, |b|_max), with a message naming what differs.
void expect_close(const torch::Tensor& a, const torch::Tensor& b, double tol,
                  const std::string& what) {
  ASSERT_TRUE(a.defined() && b.defined()) << what;
  ASSERT_EQ(a.sizes(), b.sizes()) << what;
  const double scale = std::max(1.0, b.abs().max().item<double>());
  EXPECT_LE((a - b).abs().max().item<double>(), tol * scale) << what;
}

struct NormRun {
  torch::Tensor y, dx, dw;
};

NormRun run_norm(KernelMode mode, RMSNorm& norm, const torch::Tensor& x, const torch::Tensor& g) {
  KernelModeGuard guard(mode);
  auto xv = x.detach().requires_grad_();  // x's own strides
  norm->zero_grad();
  auto y = norm->forward(xv);
  (y * g).sum().backward();
  return {y.detach(), xv.grad().clone(), norm->weight.grad().clone()};
}

TEST(ModelKernelsCpu, RMSNormMatchesTheReference) {
  torch::manual_seed(0);
  for (auto shape : std::vector<std::vector<int64_t>>{{512, 128}, {3, 5, 7}, {2, 9, 33}, {1, 1}}) {
    RMSNorm norm(shape.back(), 1e-5);
    {
      torch::NoGradGuard no_grad;
      norm->weight.uniform_(0.5, 1.5);
    }
    auto x = torch::randn(shape) * 3;
    auto g = torch::randn(shape);
    ASSERT_TRUE(rms_norm_cpu_applies(x, norm->weight));
    const auto ref = run_norm(KernelMode::Reference, norm, x, g);
    const auto fused = run_norm(KernelMode::Fused, norm, x, g);
    const std::string at = "shape " + c10::str(torch::IntArrayRef(shape));
    expect_close(fused.y, ref.y, 2e-6, "y, " + at);
    expect_close(fused.dx, ref.dx, 2e-6, "dx, " + at);
    expect_close(fused.dw, ref.dw, 2e-5, "dweight, " + at);  // a sum over up to 512 rows
  }
}

TEST(ModelKernelsCpu, RMSNormTakesStridedRowsAndLeavesOtherDtypesToTheReference) {
  torch::manual_seed(1);
  RMSNorm norm(16, 1e-6);
  auto x = torch::randn({16, 10}).transpose(0, 1);  // (10, 16), column stride 10: not unit
  EXPECT_FALSE(rms_norm_cpu_applies(x, norm->weight));
  auto rows = torch::randn({10, 40}).narrow(1, 3, 16);  // rows of stride 40, unit in D
  auto g = torch::randn({10, 16});
  ASSERT_TRUE(rms_norm_cpu_applies(rows, norm->weight));
  const auto ref = run_norm(KernelMode::Reference, norm, rows, g);
  const auto fused = run_norm(KernelMode::Fused, norm, rows, g);
  expect_close(fused.y, ref.y, 2e-6, "y of strided rows");
  expect_close(fused.dx, ref.dx, 2e-6, "dx of strided rows");
  EXPECT_FALSE(rms_norm_cpu_applies(rows.to(torch::kDouble), norm->weight));
  EXPECT_FALSE(rms_norm_cpu_applies(rows.to(torch::kBFloat16), norm->weight));
  KernelModeGuard reference(KernelMode::Reference);
  EXPECT_FALSE(rms_norm_cpu_applies(rows, norm->weight));
}

struct AttentionRun {
  torch::Tensor y, dx, dqkv, dout;
};

AttentionRun run_attention(KernelMode mode, Attention& attn, const torch::Tensor& x,
                           const torch::Tensor& g) {
  KernelModeGuard guard(mode);
  attn->zero_grad();
  auto xr = x.detach().clone().requires_grad_();
  auto y = attn->forward(xr);
  (y * g).sum().backward();
  return {y.detach(), xr.grad().clone(), attn->qkv->weight.grad().clone(),
          attn->out->weight.grad().clone()};
}

TEST(ModelKernelsCpu, AttentionWithFusedHeadsAndRopeMatchesTheReference) {
  torch::manual_seed(2);
  for (auto [B, S, D, H] : std::vector<std::array<int64_t, 4>>{{4, 128, 128, 4}, {2, 7, 24, 3}}) {
    auto options = LanguageModelOptions(16, D, 1, H);
    Attention attn(options);
    auto x = torch::randn({B, S, D});
    auto g = torch::randn({B, S, D});
    const auto ref = run_attention(KernelMode::Reference, attn, x, g);
    const auto fused = run_attention(KernelMode::Fused, attn, x, g);
    const std::string at = "B " + std::to_string(B) + " S " + std::to_string(S);
    // The fused attention sums in another order than LibTorch's (fp32 both): 2e-6, about 4x
    // what this machine shows.
    expect_close(fused.y, ref.y, 2e-6, "y, " + at);
    expect_close(fused.dx, ref.dx, 2e-6, "dx, " + at);
    expect_close(fused.dqkv, ref.dqkv, 2e-6, "dqkv weight, " + at);
    expect_close(fused.dout, ref.dout, 2e-6, "dout weight, " + at);
  }
}

// The rotation itself, exactly as the reference's ops compute it (same products, same order),
// from a strided qkv; only q's output feeds the loss, so k's and v's gradients are zero.
TEST(ModelKernelsCpu, QkvHeadsRopeIsTheReferenceRotationAndGradient) {
  torch::manual_seed(3);
  const int64_t B = 2, S = 5, H = 3, Dh = 6, P = Dh / 2;
  auto base = torch::randn({B, S, 3, H, Dh + 2});
  auto angles = torch::rand({S, P}) * 6;
  auto cos = angles.cos(), sin = angles.sin();
  auto qkv = base.narrow(4, 1, Dh).detach().requires_grad_();  // stride 8 per head
  ASSERT_TRUE(qkv_heads_cpu_applies(qkv));
  auto heads = qkv_heads_rope_cpu(qkv, cos, sin);
  auto x = qkv.detach().unflatten(-1, {P, 2});  // (B, S, 3, H, P, 2)
  auto c = cos.view({1, S, 1, P}), s = sin.view({1, S, 1, P});
  for (int64_t part = 0; part < 2; ++part) {
    auto x0 = x.select(2, part).select(-1, 0), x1 = x.select(2, part).select(-1, 1);  // (B,S,H,P)
    auto want = torch::stack({x0 * c - x1 * s, x0 * s + x1 * c}, -1).flatten(-2).transpose(1, 2);
    EXPECT_TRUE(torch::equal(heads[part], want)) << "part " << part;
    EXPECT_TRUE(heads[part].is_contiguous());
  }
  EXPECT_TRUE(torch::equal(heads[2], qkv.detach().select(2, 2).transpose(1, 2)));
  auto g = torch::randn({B, H, S, Dh});
  (heads[0] * g).sum().backward();
  auto g_BSHP2 = g.transpose(1, 2).unflatten(-1, {P, 2});
  auto g0 = g_BSHP2.select(-1, 0), g1 = g_BSHP2.select(-1, 1);
  auto want_dq = torch::stack({g0 * c + g1 * s, g1 * c - g0 * s}, -1).flatten(-2);
  EXPECT_TRUE(torch::equal(qkv.grad().select(2, 0), want_dq));
  EXPECT_EQ(qkv.grad().select(2, 1).abs().max().item<float>(), 0.f);
  EXPECT_EQ(qkv.grad().select(2, 2).abs().max().item<float>(), 0.f);
}

TEST(ModelKernelsCpu, QkvHeadsRopeRefusesTablesOfTheWrongShape) {
  auto qkv = torch::randn({1, 4, 3, 2, 8});
  auto wrong = torch::ones({4, 3});
  expect_throw_with([&] { qkv_heads_rope_cpu(qkv, wrong, wrong); }, "(4, 4)");
}

struct CausalAttentionRun {
  torch::Tensor y_BSHD, dq, dk, dv;
};

// y and the gradients of sum(y * g) in q, k, v: the fused kernel, or (reference) LibTorch's
// attention in fp64 on the same values.
CausalAttentionRun run_causal_attention(bool fused, const std::vector<torch::Tensor>& qkv,
                                        const torch::Tensor& g_BSHD) {
  std::vector<torch::Tensor> in;
  for (const auto& t : qkv) {
    in.push_back((fused ? t : t.to(torch::kDouble)).detach().requires_grad_());
  }
  auto y =
      fused ? causal_attention_cpu(in[0], in[1], in[2])
            : at::scaled_dot_product_attention(in[0], in[1], in[2], {}, 0.0, true).transpose(1, 2);
  (y * g_BSHD.to(y.scalar_type())).sum().backward();
  auto f = [](const torch::Tensor& t) { return t.to(torch::kFloat); };
  return {f(y.detach()), f(in[0].grad()), f(in[1].grad()), f(in[2].grad())};
}

// The fused attention needs the BLAS product libtorch_cpu exports on x86-64 Linux; elsewhere the
// model runs LibTorch's and these tests have nothing to check.
#define SKIP_WITHOUT_FUSED_ATTENTION()                                        \
  if (!causal_attention_cpu_available()) {                                    \
    GTEST_SKIP() << "no sgemm_ in the loaded libraries: the model uses sdpa"; \
  }

TEST(ModelKernelsCpu, CausalAttentionMatchesTheReference) {
  SKIP_WITHOUT_FUSED_ATTENTION();
  torch::manual_seed(5);
  const std::string saved = detail::swiglu_cpu_variant();  // the softmax's exp variants
  for (const std::string variant : {"avx512", "avx2", "baseline"}) {
    if (!detail::set_swiglu_cpu_variant(variant)) continue;
    // Shapes around the 32-row tiles: one position, within one tile, a tile and one more, the
    // training shape, the longest S taken, odd sizes.
    for (auto [B, H, S, Dh] :
         std::vector<std::array<int64_t, 4>>{{1, 1, 1, 4},
                                             {2, 3, 7, 8},
                                             {1, 2, 33, 16},
                                             {4, 4, 128, 32},
                                             {2, 2, 100, 64},
                                             {1, 1, kCausalAttentionCpuMaxPositions, 8},
                                             {3, 1, 65, 5}}) {
      std::vector<torch::Tensor> qkv;
      for (int i = 0; i < 3; ++i) qkv.push_back(torch::randn({B, H, S, Dh}) * (i == 0 ? 2 : 1));
      ASSERT_TRUE(causal_attention_cpu_applies(qkv[0], qkv[1], qkv[2]));
      auto g = torch::randn({B, S, H, Dh});
      const auto fused = run_causal_attention(true, qkv, g);
      const auto ref = run_causal_attention(false, qkv, g);
      const std::string at = variant + ", B " + std::to_string(B) + " H " + std::to_string(H) +
                             " S " + std::to_string(S) + " Dh " + std::to_string(Dh);
      EXPECT_TRUE(fused.y_BSHD.is_contiguous()) << at;
      expect_close(fused.y_BSHD, ref.y_BSHD, 2e-6, "y, " + at);
      expect_close(fused.dq, ref.dq, 1e-5, "dq, " + at);
      expect_close(fused.dk, ref.dk, 1e-5, "dk, " + at);
      expect_close(fused.dv, ref.dv, 1e-5, "dv, " + at);
    }
  }
  ASSERT_TRUE(detail::set_swiglu_cpu_variant(saved));
}

// A query row sees only the keys up to its own position: changing later keys and values leaves
// earlier outputs bit for bit, and a NaN in a key reaches exactly the rows at and after it.
TEST(ModelKernelsCpu, CausalAttentionIsCausal) {
  SKIP_WITHOUT_FUSED_ATTENTION();
  torch::manual_seed(6);
  const int64_t S = 70, at_pos = 40;
  auto q = torch::randn({1, 2, S, 16}), k = torch::randn({1, 2, S, 16});
  auto v = torch::randn({1, 2, S, 16});
  auto y = causal_attention_cpu(q, k, v);
  auto k2 = k.clone(), v2 = v.clone();
  k2.narrow(2, at_pos, S - at_pos).fill_(std::nanf(""));
  v2.narrow(2, at_pos, S - at_pos).normal_();
  auto y2 = causal_attention_cpu(q, k2, v2);
  EXPECT_TRUE(torch::equal(y2.narrow(1, 0, at_pos), y.narrow(1, 0, at_pos)));
  EXPECT_TRUE(y2.narrow(1, at_pos, S - at_pos).isnan().all().item<bool>());
}

// Without a backward (evaluation) nothing is kept, and the output is the same bits; a call whose
// kept probabilities would pass the cap goes to LibTorch when it needs a backward, not otherwise.
TEST(ModelKernelsCpu, CausalAttentionKeepsProbabilitiesOnlyForABackward) {
  SKIP_WITHOUT_FUSED_ATTENTION();
  torch::manual_seed(8);
  std::vector<torch::Tensor> qkv;
  for (int i = 0; i < 3; ++i) qkv.push_back(torch::randn({2, 3, 45, 16}).requires_grad_());
  auto with_grad = causal_attention_cpu(qkv[0], qkv[1], qkv[2]);
  EXPECT_TRUE(with_grad.requires_grad());
  torch::Tensor without;
  {
    torch::NoGradGuard no_grad;
    without = causal_attention_cpu(qkv[0], qkv[1], qkv[2]);
  }
  EXPECT_FALSE(without.requires_grad());
  EXPECT_TRUE(torch::equal(without, with_grad.detach()));
  const int64_t S = kCausalAttentionCpuMaxPositions;
  const int64_t heads = kCausalAttentionCpuMaxKeptBytes / (S * S * 4) + 1;  // one over the cap
  auto big = torch::empty({1, heads, S, 1});
  EXPECT_TRUE(causal_attention_cpu_applies(big, big, big));
  big.requires_grad_();
  EXPECT_FALSE(causal_attention_cpu_applies(big, big, big));
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(causal_attention_cpu_applies(big, big, big));
}

TEST(ModelKernelsCpu, CausalAttentionLeavesOtherInputsToTheReference) {
  SKIP_WITHOUT_FUSED_ATTENTION();
  auto q = torch::randn({2, 2, 8, 4});
  EXPECT_TRUE(causal_attention_cpu_applies(q, q, q));
  const int64_t too_long = kCausalAttentionCpuMaxPositions + 1;
  auto long_q = torch::randn({1, 1, too_long, 4});
  EXPECT_FALSE(causal_attention_cpu_applies(long_q, long_q, long_q));
  auto strided = torch::randn({2, 8, 2, 4}).transpose(1, 2);  // (B, H, S, Dh), not contiguous
  EXPECT_FALSE(causal_attention_cpu_applies(strided, strided, strided));
  EXPECT_FALSE(causal_attention_cpu_applies(q, q, torch::randn({2, 2, 8, 5})));
  auto qd = q.to(torch::kDouble);
  EXPECT_FALSE(causal_attention_cpu_applies(qd, qd, qd));
  {
    KernelModeGuard reference(KernelMode::Reference);
    EXPECT_FALSE(causal_attention_cpu_applies(q, q, q));
  }
  expect_throw_with([&] { causal_attention_cpu(long_q, long_q, long_q); }, "S <= 512");
}

// The fused cross-entropy against LibTorch's in fp64: value and logits gradient (for an incoming
// gradient other than 1), with ignored rows, over the exp variants and row lengths around the
// vector widths.
TEST(ModelKernelsCpu, CrossEntropySumMatchesTheReference) {
  torch::manual_seed(7);
  const std::string saved = detail::swiglu_cpu_variant();
  for (const std::string variant : {"avx512", "avx2", "baseline"}) {
    if (!detail::set_swiglu_cpu_variant(variant)) continue;
    for (auto [N, V] : std::vector<std::array<int64_t, 2>>{{1, 1}, {5, 7}, {64, 4096}, {9, 33}}) {
      auto logits = (torch::randn({N, V}) * 4).requires_grad_();
      auto targets = torch::randint(V, {N}, torch::kLong);
      if (N > 1) targets.index_put_({torch::arange(0, N, 3)}, -100);  // every third row ignored
      ASSERT_TRUE(cross_entropy_sum_cpu_applies(logits, targets));
      auto loss = cross_entropy_sum_cpu(logits, targets);
      (loss * 0.37).backward();
      auto ref_logits = logits.detach().to(torch::kDouble).requires_grad_();
      auto ref = torch::nn::functional::cross_entropy(
          ref_logits, targets,
          torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
      (ref * 0.37).backward();
      const std::string at = variant + ", N " + std::to_string(N) + " V " + std::to_string(V);
      EXPECT_EQ(loss.scalar_type(), torch::kFloat) << at;
      EXPECT_EQ(loss.dim(), 0) << at;
      expect_close(loss.detach().to(torch::kDouble), ref.detach(), 1e-6, "loss, " + at);
      expect_close(logits.grad(), ref_logits.grad().to(torch::kFloat), 1e-6, "grad, " + at);
    }
  }
  ASSERT_TRUE(detail::set_swiglu_cpu_variant(saved));
}

// Rows (cross-entropy) and heads (attention) split over threads: the cross-entropy gives the same
// bits as one thread; the attention the same values to fp32 rounding (MKL's products need not
// keep their bits across thread settings).
TEST(ModelKernelsCpu, FusedAttentionAndCrossEntropyOnThreeThreadsAsOnOne) {
  SKIP_WITHOUT_FUSED_ATTENTION();
  torch::manual_seed(9);
  auto logits = torch::randn({300, 50});
  auto targets = torch::randint(50, {300}, torch::kLong);
  std::vector<torch::Tensor> qkv;
  for (int i = 0; i < 3; ++i) qkv.push_back(torch::randn({3, 5, 40, 8}));
  auto g = torch::randn({3, 40, 5, 8});
  auto run = [&] {
    auto l = logits.detach().requires_grad_();
    auto loss = cross_entropy_sum_cpu(l, targets);
    loss.backward();
    const auto fused = run_causal_attention(true, qkv, g);
    return std::vector<torch::Tensor>{loss.detach(), l.grad(), fused.y_BSHD,
                                      fused.dq,      fused.dk, fused.dv};
  };
  const int saved = torch::get_num_threads();
  torch::set_num_threads(1);
  const auto one = run();
  torch::set_num_threads(3);
  const auto three = run();
  torch::set_num_threads(saved);
  EXPECT_TRUE(torch::equal(one[0], three[0]));
  EXPECT_TRUE(torch::equal(one[1], three[1]));
  for (size_t i = 2; i < one.size(); ++i) expect_close(three[i], one[i], 1e-6, std::to_string(i));
}

TEST(ModelKernelsCpu, CrossEntropySumRefusesBadTargetsAndASecondBackward) {
  auto logits = torch::randn({3, 5}, torch::requires_grad());
  expect_throw_with(
      [&] {
        cross_entropy_sum_cpu(logits, torch::tensor({0, 5, 1}));
      },
      "target 5 at row 1 is outside [0, 5)");
  expect_throw_with(
      [&] {
        cross_entropy_sum_cpu(logits, torch::tensor({0, -1, 1}));
      },
      "target -1 at row 1");
  auto all_ignored = cross_entropy_sum_cpu(logits, torch::tensor({-100, -100, -100}));
  EXPECT_EQ(all_ignored.item<float>(), 0.f);
  all_ignored.backward(torch::ones({}), /*retain_graph=*/true);
  EXPECT_EQ(logits.grad().abs().max().item<float>(), 0.f);
  expect_throw_with([&] { all_ignored.backward(); }, "backpropagated twice");
  EXPECT_FALSE(cross_entropy_sum_cpu_applies(logits.to(torch::kDouble), torch::tensor({0, 1, 2})));
  EXPECT_FALSE(cross_entropy_sum_cpu_applies(logits.t(), torch::tensor({0, 1, 2, 3, 4})));
  KernelModeGuard reference(KernelMode::Reference);
  EXPECT_FALSE(cross_entropy_sum_cpu_applies(logits, torch::tensor({0, 1, 2})));
}

// Parameters of two groups (with and without weight decay), gradients given per step.
std::vector<torch::Tensor> adam_params() {
  torch::manual_seed(4);
  return {torch::randn({64, 32}), torch::randn({32}), torch::randn({7, 3, 5})};
}

std::vector<torch::optim::OptimizerParamGroup> adam_groups(std::vector<torch::Tensor>& p) {
  auto o = torch::optim::AdamWOptions(3e-3).betas({0.9, 0.95}).eps(1e-8);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{p[0], p[2]},
                      std::make_unique<torch::optim::AdamWOptions>(o.weight_decay(0.1)));
  groups.emplace_back(std::vector<torch::Tensor>{p[1]},
                      std::make_unique<torch::optim::AdamWOptions>(o.weight_decay(0.0)));
  return groups;
}

void take_steps(torch::optim::AdamW& opt, std::vector<torch::Tensor>& p, int64_t first, int64_t n) {
  for (int64_t step = first; step < first + n; ++step) {
    torch::manual_seed(100 + step);
    for (auto& t : p) t.mutable_grad() = torch::randn_like(t) * (step % 3 + 0.5);
    opt.step();
  }
}

TEST(FusedAdamW, StepsAsAdamWDoesAndSharesItsState) {
  auto ref_p = adam_params(), fused_p = adam_params();
  torch::optim::AdamW ref(adam_groups(ref_p));
  FusedAdamW fused(adam_groups(fused_p));
  take_steps(ref, ref_p, 0, 12);
  take_steps(fused, fused_p, 0, 12);
  for (size_t i = 0; i < ref_p.size(); ++i) {
    expect_close(fused_p[i], ref_p[i], 1e-6, "parameter " + std::to_string(i));
  }
  EXPECT_GT((fused_p[0] - adam_params()[0]).abs().max().item<double>(), 1e-3);  // it moved
  // The fused state (step counts, moments) loads into the reference optimizer and on.
  std::stringstream saved;
  {
    torch::serialize::OutputArchive archive;
    fused.save(archive);
    archive.save_to(saved);
  }
  auto handed = fused_p;
  for (auto& t : handed) t = t.detach().clone();
  torch::optim::AdamW continued(adam_groups(handed));
  {
    torch::serialize::InputArchive archive;
    archive.load_from(saved);
    continued.load(archive);
  }
  take_steps(continued, handed, 12, 5);
  take_steps(ref, ref_p, 12, 5);
  for (size_t i = 0; i < ref_p.size(); ++i) {
    expect_close(handed[i], ref_p[i], 1e-6, "after hand-over, parameter " + std::to_string(i));
  }
}

}  // namespace
}  // namespace gbmoe
