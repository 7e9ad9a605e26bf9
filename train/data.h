// The data side of the trainer in one include: token shards, tokenizer, dataset builder, sampler.
#pragma once

/// Example:
///   build_dataset(DataBuildOptions("data/raw", "data/corpus").vocab_size(4096));
///   auto train = std::make_shared<TokenDataset>(TokenDataset::open("data/corpus", "train"));
///   SequenceSampler sampler(train, SamplerOptions(256, 8).rank(rank).world_size(world));
///   Batch batch = sampler.next_batch();  // inputs, targets, mask (B, S); domain (B)
#include "train/data_build.h"
#include "train/sampler.h"
#include "train/token_dataset.h"
#include "train/tokenizer.h"
