// Bounded per-layer routing metrics from the step's counts, MaxVio, entropy and top-k scores.
#include "losses/routing_metrics.h"

#include <algorithm>
#include <cmath>
#include <iomanip>
#include <sstream>

#include "losses/balance.h"

namespace gbmoe {
namespace {

torch::Tensor valid_rows(const torch::Tensor& t, const torch::Tensor& valid_T) {
  if (!valid_T.defined()) return t;
  return t.index({valid_T.to(t.device(), torch::kBool)});
}

std::string number(double v) {
  if (!std::isfinite(v)) return "null";
  std::ostringstream s;
  s << std::setprecision(7) << v;
  return s.str();
}

}  // namespace

const std::vector<std::string>& routing_metric_names() {
  static const std::vector<std::string> names{"maxvio_global", "maxvio_micro",    "load_cv",
                                              "dead_experts",  "routing_entropy", "topk_score_sum"};
  return names;
}

std::vector<double> metric_values(const LayerRoutingMetrics& m) {
  return {m.max_violation_global, m.max_violation_micro, m.load_cv, m.dead_experts, m.entropy,
          m.topk_score_sum};
}

LayerRoutingMetrics layer_routing_metrics(const LayerRoutingInput& input) {
  TORCH_CHECK(input.counts.defined() && input.counts.dim() == 1 && input.counts.numel() > 0,
              "layer_routing_metrics: counts must be a non-empty (E,) tensor, got ",
              input.counts.defined() ? input.counts.sizes() : c10::IntArrayRef{});
  auto c = input.counts.detach().to(torch::kDouble).cpu();
  LayerRoutingMetrics m;
  m.max_violation_global = max_violation(c);
  m.max_violation_micro = input.micro_max_violation;
  const double mean = c.mean().item<double>();
  m.load_cv = mean > 0 ? c.std(/*unbiased=*/false).item<double>() / mean : 0.0;
  m.dead_experts = (c == 0).sum().item<double>();
  m.entropy = input.mean_entropy;
  m.topk_score_sum = input.mean_topk_score_sum;
  return m;
}

Spread spread(std::vector<double> values) {
  Spread s;
  if (values.empty()) return s;
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  s.min = values.front();
  s.max = values.back();
  s.median = n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
  return s;
}

std::vector<Spread> across_layers(const std::vector<LayerRoutingMetrics>& layers) {
  const size_t n = routing_metric_names().size();
  std::vector<std::vector<double>> per_metric(n);
  for (const auto& layer : layers) {
    const auto v = metric_values(layer);
    for (size_t i = 0; i < n; ++i) per_metric[i].push_back(v[i]);
  }
  std::vector<Spread> out;
  for (auto& values : per_metric) out.push_back(spread(std::move(values)));
  return out;
}

double routing_entropy_sum(const torch::Tensor& scores_TE, const torch::Tensor& valid_T) {
  torch::NoGradGuard no_grad;
  auto s = valid_rows(scores_TE.detach().to(torch::kDouble), valid_T);
  return -torch::special::xlogy(s, s).sum().item<double>();
}

double routing_topk_score_sum(const torch::Tensor& scores_TE, const torch::Tensor& expert_ids_TK,
                              const torch::Tensor& valid_T) {
  torch::NoGradGuard no_grad;
  auto picked = scores_TE.detach().to(torch::kDouble).gather(1, expert_ids_TK.to(torch::kLong));
  return valid_rows(picked, valid_T).sum().item<double>();
}

std::string routing_metrics_json(const std::vector<LayerRoutingMetrics>& layers) {
  const auto& names = routing_metric_names();
  std::ostringstream s;
  for (size_t i = 2; i < names.size(); ++i) {
    s << "\"" << names[i] << "\":[";
    for (size_t l = 0; l < layers.size(); ++l) {
      s << (l ? "," : "") << number(metric_values(layers[l])[i]);
    }
    s << "],";
  }
  s << "\"across_layers\":{";
  const auto spreads = across_layers(layers);
  for (size_t i = 0; i < names.size(); ++i) {
    s << (i ? "," : "") << "\"" << names[i] << "\":{\"min\":" << number(spreads[i].min)
      << ",\"median\":" << number(spreads[i].median) << ",\"max\":" << number(spreads[i].max)
      << "}";
  }
  s << "}";
  return s.str();
}

}  // namespace gbmoe
