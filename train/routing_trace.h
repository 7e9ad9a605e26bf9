// Routing traces: the top-k expert ids of every valid token, per step, micro-batch, MoE layer and
// rank, with the token's domain, in a compact binary file; its reader and the per-domain
// selection frequencies rebuilt from it. Letters: N valid tokens, K top-k, E experts,
// M domains, L MoE layers.
//
// File layout (little-endian; scripts/read_routing_trace.py reads the same):
//   header
//     char[8]   magic "GBMOERT1"
//     uint32    version (1)
//     uint32    E   experts per layer
//     uint32    K   top-k
//     uint32    L   MoE layers
//     uint32    M   domains
//     M times:  uint32 byte length n, n bytes of the domain's name (UTF-8)
//   records, until the end of the file, one per (step, micro-batch, layer, rank):
//     int64     step (1-based optimizer step the forward belongs to)
//     uint32    rank
//     uint32    micro_batch (0-based within the step)
//     uint32    layer (0-based MoE layer index)
//     uint32    N   valid tokens
//     uint16[N]     domain id of each token
//     uint16[N*K]   expert ids, token-major (token 0's K ids, then token 1's, ...)
// E and M are at most 65536. Each rank writes its own file (RUN/traces/rank<r>.gbrt); the reader
// takes any number of files of the same run.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "moe/moe_layer.h"
#include "train/sampler.h"

namespace gbmoe {

/// What every record of a trace file shares.
struct RoutingTraceHeader {
  int64_t num_experts = 0;           // E
  int64_t top_k = 0;                 // K
  int64_t num_layers = 0;            // L
  std::vector<std::string> domains;  // (M)

  bool operator==(const RoutingTraceHeader& o) const;
};

/// The routing of one layer in one forward on one rank.
struct RoutingTraceRecord {
  int64_t step = 0;
  int64_t rank = 0;
  int64_t micro_batch = 0;
  int64_t layer = 0;
  torch::Tensor domain;      // (N,) int64
  torch::Tensor expert_ids;  // (N, K) int64
};

/// Writes a trace file: the header at construction, then records.
///
/// Example:
///   RoutingTraceWriter trace("runs/x/traces/rank0.gbrt", {E, K, L, domains});
///   trace.add_forward(step, rank, micro, routings_of(routing), batch);  // after model->forward
class RoutingTraceWriter {
 public:
  /// Creates the file (and its directory), truncating an existing one unless append is set and
  /// the file has the same header (a resumed run continues its trace).
  RoutingTraceWriter(const std::string& path, RoutingTraceHeader header, bool append = false);

  /// One record: expert_ids (T, K) of T tokens, domain (T,), valid (T,) bool or undefined (all
  /// valid); only the valid tokens are written.
  void add(int64_t step, int64_t rank, int64_t micro_batch, int64_t layer,
           const torch::Tensor& expert_ids_TK, const torch::Tensor& domain_T,
           const torch::Tensor& valid_T);
  /// One record per layer from the forward's routing of each layer, (L) in MoE layer order
  /// (from its RoutingContext), after a forward of batch (domains of its sequences broadcast
  /// over their tokens).
  void add_forward(int64_t step, int64_t rank, int64_t micro_batch,
                   const std::vector<RoutingResult>& routings, const Batch& batch);

  const std::string& path() const { return path_; }

 private:
  std::string path_;
  RoutingTraceHeader header_;
  std::ofstream out_;
};

/// A whole trace: the header of its files and their records in file order.
struct RoutingTrace {
  RoutingTraceHeader header;
  std::vector<RoutingTraceRecord> records;
};

/// Reads trace files (one per rank) of one run; throws naming the file and the byte offset on a
/// bad magic or version, a truncated record, an out-of-range id, or headers that differ.
RoutingTrace read_routing_trace(const std::vector<std::string>& paths);

/// The *.gbrt files of a directory in name order, or {path} for a file; throws when none.
std::vector<std::string> routing_trace_files(const std::string& path);

/// Per-domain selection counts rebuilt from a trace, per layer: (L) tensors (M, E) fp64,
/// counts[l][d][i] = tokens of domain d whose top-k at layer l holds expert i; tokens[l] (M,)
/// fp64 the tokens of each domain. Records outside [first_step, last_step] are skipped
/// (last_step < 0: no upper bound).
struct TraceSelection {
  std::vector<torch::Tensor> counts;  // (L) x (M, E)
  std::vector<torch::Tensor> tokens;  // (L) x (M,)
};
TraceSelection trace_selection(const RoutingTrace& trace, int64_t first_step = 0,
                               int64_t last_step = -1);

/// layer,domain,expert,selections,frequency rows (frequency = selections / domain tokens, as in
/// gbmoe-analyze's selection.csv).
std::string trace_selection_csv(const RoutingTrace& trace, const TraceSelection& selection);

}  // namespace gbmoe
