// safetensors files (the tensor format of Hugging Face checkpoints): read memory-mapped, written
// single-file or sharded with a model.safetensors.index.json, in fp32, bf16 or fp16.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <string>

namespace gbmoe {

/// Named tensors, sorted by name (the order safetensors headers are written in).
using TensorMap = std::map<std::string, torch::Tensor>;

/// Reads every tensor of one .safetensors file. The file is memory-mapped and each tensor copied
/// out of the mapping into its own CPU tensor of the stored dtype (F32, BF16, F16, F64, I64,
/// I32, I16, I8, U8, BOOL). A truncated file, a bad header, an unknown dtype or a tensor whose
/// byte range contradicts its shape fails naming the file and the tensor.
///
/// Example:
///   TensorMap t = read_safetensors("model.safetensors");
TensorMap read_safetensors(const std::string& path);

/// Writes tensors (any of the dtypes above, contiguous or not, any device) to one file, with
/// optional string metadata in the header's "__metadata__".
///
/// Example:
///   write_safetensors("out.safetensors", {{"w", torch::ones({2, 3})}}, {{"format", "pt"}});
void write_safetensors(const std::string& path, const TensorMap& tensors,
                       const std::map<std::string, std::string>& metadata = {});

/// Reads the tensors of a Hugging Face model directory: model.safetensors.index.json and the
/// shards it names when it exists, else model.safetensors. A missing shard fails naming the
/// shard, the index and a tensor it should hold; a tensor held by a shard other than the one the
/// index names fails too.
///
/// Example:
///   TensorMap t = read_safetensors_dir("hf-model");
TensorMap read_safetensors_dir(const std::string& dir);

/// Writes tensors into dir as model.safetensors, or, when they exceed max_shard_bytes, as
/// model-0000i-of-0000n.safetensors shards (tensors kept whole, in name order) plus
/// model.safetensors.index.json. Returns the number of files written.
///
/// Example:
///   write_safetensors_dir("hf-out", tensors, 5LL << 30);
int64_t write_safetensors_dir(const std::string& dir, const TensorMap& tensors,
                              int64_t max_shard_bytes = int64_t{5} << 30);

}  // namespace gbmoe
