// Routing analytics of a trained model on the validation data: per MoE layer and domain, the
// expert selection counts and top-k score sums, and the figures derived from them (selection
// frequency, domain/expert mutual information, MaxVio overall and per domain), written as JSON
// and CSV by gbmoe-analyze. Letters: L MoE layers, M domains, E experts, K top-k.
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

#include "train/model.h"
#include "train/sampler.h"

namespace gbmoe {

/// What one MoE layer did on the validation set.
struct LayerRouting {
  int64_t block = 0;        // index of the transformer block holding the layer
  torch::Tensor counts;     // (M, E) fp64 selections c[d][i] by valid tokens of domain d
  torch::Tensor score_sum;  // (M,) fp64 sum over domain d's valid tokens of sum_k s[t][S_t,k]
};

/// Routing and loss of a model over validation batches, summed per domain.
struct RoutingAnalysis {
  std::vector<std::string> domains;  // (M)
  int64_t num_experts = 0;           // E
  int64_t top_k = 0;                 // K
  torch::Tensor tokens;              // (M,) fp64 valid tokens per domain
  torch::Tensor loss_sum;            // (M,) fp64 summed cross-entropy per domain
  std::vector<LayerRouting> layers;  // (L)
};

/// The figures of one layer.
struct LayerFigures {
  torch::Tensor frequency;              // (M, E) share of domain d's tokens whose top-k holds i
  double mutual_information = 0;        // I(domain; expert), bits
  double normalized_mi = 0;             // I / H(domain), in [0, 1]
  double mean_topk_score_sum = 0;       // over all valid tokens
  torch::Tensor domain_topk_score_sum;  // (M,) mean per domain
  double max_violation = 0;             // MaxVio of the whole set's load
  torch::Tensor domain_max_violation;   // (M,) MaxVio of each domain's own load
};

/// Runs the model (in eval mode, no gradients) over batches whose sequences are each of one
/// domain (Batch::domain[0], as validation_batches() makes them) and sums per domain.
/// With ranks > 1 this process takes batches rank, rank + ranks, ... (the caller sums the
/// ranks' results); every rank runs the same number of forwards, a rank without a batch of its
/// own an all-padding one, since expert-parallel forwards are collective.
///
/// Example:
///   auto val = TokenDataset::open("data/corpus", "val");
///   auto a = analyze_routing(model, validation_batches(val, 128, 4, 4), val.domain_names());
///   LayerFigures f = layer_figures(a.layers[0], a.tokens);
RoutingAnalysis analyze_routing(LanguageModel& model, const std::vector<Batch>& batches,
                                const std::vector<std::string>& domains, int64_t rank = 0,
                                int64_t ranks = 1);

/// The figures of one layer from its sums; tokens: (M,) valid tokens per domain.
LayerFigures layer_figures(const LayerRouting& layer, const torch::Tensor& tokens);

/// Everything as one JSON object: domains, validation loss (overall and per domain), and per
/// layer the figures, the selection frequency matrix and the counts; means over layers.
/// `header` holds extra members (already JSON, e.g. "\"step\":400"), written first.
std::string analysis_json(const RoutingAnalysis& analysis, const std::string& header);

/// One row per (layer, domain, expert): layer,block,domain,expert,selections,frequency.
std::string selection_csv(const RoutingAnalysis& analysis);

/// One row per (layer, domain) plus a domain "all" row per layer:
/// layer,block,domain,tokens,val_loss,mutual_information,normalized_mi,mean_topk_score_sum,
/// max_violation (the latter three of the domain's tokens; MI is per layer).
std::string layers_csv(const RoutingAnalysis& analysis);

}  // namespace gbmoe
