// Per-domain routing sums over validation batches and the JSON / CSV files built from them.
#include "train/analysis.h"

#include <sstream>

#include "losses/balance.h"
#include "losses/specialization.h"
#include "train/json.h"

namespace gbmoe {

RoutingAnalysis analyze_routing(LanguageModel& model, const std::vector<Batch>& batches,
                                const std::vector<std::string>& domains, int64_t rank,
                                int64_t ranks) {
  TORCH_CHECK(ranks >= 1 && rank >= 0 && rank < ranks, "analyze_routing: rank (", rank,
              ") must be in [0, ranks (", ranks, "))");
  const bool was_training = model->is_training();
  model->eval();
  torch::NoGradGuard no_grad;
  auto moe = model->moe_layers();
  const auto M = static_cast<int64_t>(domains.size());
  RoutingAnalysis a;
  a.domains = domains;
  a.num_experts = moe.empty() ? 0 : moe[0]->options.num_experts();
  a.top_k = moe.empty() ? 0 : moe[0]->options.router().top_k();
  a.tokens = torch::zeros({M}, torch::kDouble);
  a.loss_sum = torch::zeros({M}, torch::kDouble);
  const auto& moe_blocks = model->options.moe_layers();
  for (size_t l = 0; l < moe.size(); ++l) {
    const int64_t E = moe[l]->options.num_experts();
    a.layers.push_back(LayerRouting{moe_blocks[l], torch::zeros({M, E}, torch::kDouble),
                                    torch::zeros({M}, torch::kDouble)});
  }
  const auto device = model->parameters().front().device();
  const auto num_batches = static_cast<int64_t>(batches.size());
  for (int64_t first = 0; first < num_batches; first += ranks) {
    if (first + rank >= num_batches) {
      model->forward(batches[0].inputs.to(device), torch::zeros_like(batches[0].mask).to(device));
      continue;
    }
    const auto& b = batches[first + rank];
    const int64_t d = b.domain[0].item<int64_t>();
    TORCH_CHECK(d >= 0 && d < M, "batch domain id (", d, ") is outside the ", M, " domains");
    TORCH_CHECK((b.domain == d).all().item<bool>(),
                "analyze_routing needs batches of one domain each (validation_batches)");
    RoutingContext routing;
    auto logits = model->forward(b.inputs.to(device), b.mask.to(device), &routing);
    a.loss_sum[d] += torch::nn::functional::cross_entropy(
                         logits.flatten(0, 1), b.targets.to(device).flatten(),
                         torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                         .item<double>();
    a.tokens[d] += b.mask.sum().item<double>();
    for (size_t l = 0; l < moe.size(); ++l) {
      const auto& r = routing.layers()[l].routing;
      a.layers[l].counts[d] += r.counts.to(torch::kDouble).cpu();
      a.layers[l].score_sum[d] +=
          topk_score_sum(r.scores, r.expert_ids).masked_select(r.valid.cpu()).sum();
    }
  }
  if (was_training) model->train();
  return a;
}

LayerFigures layer_figures(const LayerRouting& layer, const torch::Tensor& tokens) {
  LayerFigures f;
  auto n = tokens.to(torch::kDouble);
  f.frequency = domain_selection_frequency(layer.counts, n);
  f.mutual_information = domain_expert_mutual_information(layer.counts);
  const double h = domain_entropy(layer.counts);
  f.normalized_mi = h > 0 ? f.mutual_information / h : 0.0;
  f.mean_topk_score_sum =
      layer.score_sum.sum().item<double>() / std::max(1.0, n.sum().item<double>());
  f.domain_topk_score_sum = layer.score_sum / n.clamp_min(1);
  f.max_violation = max_violation(layer.counts.sum(0));
  f.domain_max_violation = domain_max_violation(layer.counts);
  return f;
}

namespace {

std::vector<double> to_vector(const torch::Tensor& t) {
  auto c = t.to(torch::kDouble).contiguous().cpu();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

std::string json_matrix(const torch::Tensor& t) {
  std::string out = "[";
  for (int64_t r = 0; r < t.size(0); ++r) out += (r ? "," : "") + json_list(to_vector(t[r]));
  return out + "]";
}

std::string json_domain_map(const std::vector<std::string>& domains, const torch::Tensor& values) {
  std::string out = "{";
  for (size_t d = 0; d < domains.size(); ++d) {
    out += (d ? "," : "") + json_string(domains[d]) + ":" +
           json_number(values[static_cast<int64_t>(d)].item<double>());
  }
  return out + "}";
}

double mean_of(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0.0 : s / static_cast<double>(v.size());
}

}  // namespace

std::string analysis_json(const RoutingAnalysis& a, const std::string& header) {
  std::ostringstream s;
  auto domain_loss = a.loss_sum / a.tokens.clamp_min(1);
  s << "{" << header << (header.empty() ? "" : ",") << "\"domains\":[";
  for (size_t d = 0; d < a.domains.size(); ++d) s << (d ? "," : "") << json_string(a.domains[d]);
  s << "],\"num_experts\":" << a.num_experts << ",\"top_k\":" << a.top_k
    << ",\"domain_tokens\":" << json_domain_map(a.domains, a.tokens) << ",\"val_loss\":"
    << json_number(a.loss_sum.sum().item<double>() / std::max(1.0, a.tokens.sum().item<double>()))
    << ",\"domain_val_loss\":" << json_domain_map(a.domains, domain_loss) << ",\"layers\":[";
  std::vector<double> mi, nmi, score, mv, domain_mv;
  for (size_t l = 0; l < a.layers.size(); ++l) {
    const auto f = layer_figures(a.layers[l], a.tokens);
    mi.push_back(f.mutual_information);
    nmi.push_back(f.normalized_mi);
    score.push_back(f.mean_topk_score_sum);
    mv.push_back(f.max_violation);
    domain_mv.push_back(f.domain_max_violation.mean().item<double>());
    s << (l ? "," : "") << "{\"block\":" << a.layers[l].block
      << ",\"mutual_information\":" << json_number(f.mutual_information)
      << ",\"normalized_mi\":" << json_number(f.normalized_mi)
      << ",\"mean_topk_score_sum\":" << json_number(f.mean_topk_score_sum)
      << ",\"domain_topk_score_sum\":" << json_domain_map(a.domains, f.domain_topk_score_sum)
      << ",\"max_violation\":" << json_number(f.max_violation)
      << ",\"domain_max_violation\":" << json_domain_map(a.domains, f.domain_max_violation)
      << ",\"selection_frequency\":" << json_matrix(f.frequency)
      << ",\"selections\":" << json_matrix(a.layers[l].counts) << "}";
  }
  s << "],\"mean\":{\"mutual_information\":" << json_number(mean_of(mi))
    << ",\"normalized_mi\":" << json_number(mean_of(nmi))
    << ",\"mean_topk_score_sum\":" << json_number(mean_of(score))
    << ",\"max_violation\":" << json_number(mean_of(mv))
    << ",\"domain_max_violation\":" << json_number(mean_of(domain_mv)) << "}}";
  return s.str();
}

std::string selection_csv(const RoutingAnalysis& a) {
  std::ostringstream s;
  s << "layer,block,domain,expert,selections,frequency\n";
  for (size_t l = 0; l < a.layers.size(); ++l) {
    auto freq = domain_selection_frequency(a.layers[l].counts, a.tokens);
    for (int64_t d = 0; d < freq.size(0); ++d) {
      for (int64_t i = 0; i < freq.size(1); ++i) {
        s << l << "," << a.layers[l].block << "," << a.domains[d] << "," << i << ","
          << json_number(a.layers[l].counts[d][i].item<double>()) << ","
          << json_number(freq[d][i].item<double>()) << "\n";
      }
    }
  }
  return s.str();
}

std::string layers_csv(const RoutingAnalysis& a) {
  std::ostringstream s;
  s << "layer,block,domain,tokens,val_loss,mutual_information,normalized_mi,mean_topk_score_sum,"
       "max_violation\n";
  const auto M = static_cast<int64_t>(a.domains.size());
  for (size_t l = 0; l < a.layers.size(); ++l) {
    const auto f = layer_figures(a.layers[l], a.tokens);
    auto row = [&](const std::string& domain, double tokens, double loss, double score, double mv) {
      s << l << "," << a.layers[l].block << "," << domain << "," << json_number(tokens) << ","
        << json_number(loss) << "," << json_number(f.mutual_information) << ","
        << json_number(f.normalized_mi) << "," << json_number(score) << "," << json_number(mv)
        << "\n";
    };
    for (int64_t d = 0; d < M; ++d) {
      const double n = a.tokens[d].item<double>();
      row(a.domains[d], n, a.loss_sum[d].item<double>() / std::max(1.0, n),
          f.domain_topk_score_sum[d].item<double>(), f.domain_max_violation[d].item<double>());
    }
    const double n = a.tokens.sum().item<double>();
    row("all", n, a.loss_sum.sum().item<double>() / std::max(1.0, n), f.mean_topk_score_sum,
        f.max_violation);
  }
  return s.str();
}

}  // namespace gbmoe
