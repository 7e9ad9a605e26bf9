"""The transformers peer of gbmoe-train: ../shared/peers/hf_train_peer.py (a Qwen3-MoE causal LM
shaped like configs/default.yaml in a plain PyTorch loop: AdamW, aux loss 0.01, grad clip 1, random
tokens) with the shape as arguments and a data-parallel mode. At its defaults it is that peer.
Prints tokens/s of all ranks over the timed steps.

Usage: THREADS=t python hf_train_peer.py [--steps 20] [--dim 128] [--layers 4] [--heads 4]
         [--experts 8] [--top-k 2] [--expert-hidden 256] [--vocab 4096] [--seq 128]
         [--micro-batch 4] [--accum 2] [--impl grouped_mm]
       torch DDP over gloo, one thread per process:
       THREADS=1 python -m torch.distributed.run --nproc_per_node 2 hf_train_peer.py --ddp ...
"""
import argparse, os, time
import torch
import torch.distributed as dist
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

p = argparse.ArgumentParser()
for name, default in [("steps", 20), ("dim", 128), ("layers", 4), ("heads", 4), ("experts", 8),
                      ("top-k", 2), ("expert-hidden", 256), ("vocab", 4096), ("seq", 128),
                      ("micro-batch", 4), ("accum", 2), ("warmup", 3)]:
    p.add_argument("--" + name, type=int, default=default)
p.add_argument("--impl", default="grouped_mm")
p.add_argument("--ddp", action="store_true")
a = p.parse_args()

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
rank, world = 0, 1
if a.ddp:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
cfg = Qwen3MoeConfig(vocab_size=a.vocab, hidden_size=a.dim, num_hidden_layers=a.layers,
                     num_attention_heads=a.heads, num_key_value_heads=a.heads,
                     head_dim=a.dim // a.heads, moe_intermediate_size=a.expert_hidden,
                     intermediate_size=4 * a.dim, num_experts=a.experts,
                     num_experts_per_tok=a.top_k, norm_topk_prob=True, decoder_sparse_step=1,
                     mlp_only_layers=[], tie_word_embeddings=True, output_router_logits=True,
                     router_aux_loss_coef=0.01, max_position_embeddings=a.seq)
cfg._experts_implementation = a.impl
cfg._attn_implementation = "sdpa"
model = Qwen3MoeForCausalLM(cfg)
model.train()
params = sum(p.numel() for p in model.parameters())
net = torch.nn.parallel.DistributedDataParallel(model) if a.ddp else model
opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
gen = torch.Generator().manual_seed(1 + rank)


def micro_batch(m):
    ids = torch.randint(0, a.vocab, (a.micro_batch, a.seq), generator=gen)
    out = net(input_ids=ids, labels=ids)
    (out.loss / a.accum).backward()


def step():
    for m in range(a.accum):
        if a.ddp and m < a.accum - 1:
            with net.no_sync():  # gradients are all-reduced once, in the last backward
                micro_batch(m)
        else:
            micro_batch(m)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


for _ in range(a.warmup):
    step()
if a.ddp:
    dist.barrier()
t0 = time.perf_counter()
for _ in range(a.steps):
    step()
if a.ddp:
    dist.barrier()
dt = time.perf_counter() - t0
tok = a.steps * a.accum * a.micro_batch * a.seq * world
if rank == 0:
    print(f"hf_train impl={a.impl} params={params} steps={a.steps} tok_s={tok / dt:.0f} "
          f"threads={torch.get_num_threads()} processes={world}", flush=True)
if a.ddp:
    dist.destroy_process_group()
