"""The Python loop-over-experts MoE block (Hugging Face Mixtral style: softmax router, top-k,
renormalized weights, one SwiGLU expert call per expert on its tokens, index_add_ combine) on
a GPU in bf16: the baseline of gbmoe's fused CUDA path. Prints forward + backward time,
tokens/s and achieved TFLOP/s next to the bf16 matrix-multiply rate measured in the same run.
Usage: python3 benchmarks/moe_loop_gpu.py [T D F E K [reps]]   (default 16384 2048 1408 64 8 10)
"""
import sys, time, torch
import torch.nn as nn
import torch.nn.functional as Fn


class Expert(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.w2(Fn.silu(self.w1(x)) * self.w3(x))


class LoopMoeBlock(nn.Module):
    def __init__(self, d, f, e, k):
        super().__init__()
        self.e, self.k = e, k
        self.gate = nn.Linear(d, e, bias=False)
        self.experts = nn.ModuleList([Expert(d, f) for _ in range(e)])

    def forward(self, h):
        logits = self.gate(h)
        w = Fn.softmax(logits, dim=1, dtype=torch.float)
        w, sel = torch.topk(w, self.k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(h)
        mask = Fn.one_hot(sel, num_classes=self.e).permute(2, 1, 0)
        for i in range(self.e):
            idx, top_x = torch.where(mask[i])
            if top_x.numel() == 0:
                continue
            cur = self.experts[i](h[top_x]) * w[top_x, idx, None]
            out.index_add_(0, top_x, cur.to(h.dtype))
        return out


def timed(fn, reps):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def main():
    args = [int(a) for a in sys.argv[1:]]
    T, D, F, E, K = args[:5] if len(args) >= 5 else (16384, 2048, 1408, 64, 8)
    reps = args[5] if len(args) > 5 else 10
    assert torch.cuda.is_available(), "moe_loop_gpu.py needs a CUDA GPU"
    torch.manual_seed(0)
    dev = torch.device("cuda")
    blk = LoopMoeBlock(D, F, E, K).to(dev, torch.bfloat16)
    x = torch.randn(T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(T, D, device=dev, dtype=torch.bfloat16)

    def step():
        blk(x).backward(dy)

    dt = timed(step, reps)
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    mm_tflops = 2 * n**3 / timed(lambda: torch.mm(a, b), 20) / 1e12
    flops = 18 * T * K * D * F  # forward + backward of the SwiGLU experts on the routed rows
    print(f"python_loop T={T} D={D} F={F} E={E} K={K} gpu={torch.cuda.get_device_name()} "
          f"step_ms={dt * 1e3:.2f} tok_s={T / dt:.0f} tflops={flops / dt / 1e12:.1f} "
          f"bf16_mm_tflops={mm_tflops:.1f} torch={torch.__version__}")


if __name__ == "__main__":
    main()
