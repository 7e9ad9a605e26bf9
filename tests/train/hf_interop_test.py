"""gbmoe against the real transformers: tiny random Qwen3-MoE, Mixtral and OLMoE models built and saved
by transformers load in gbmoe with the same logits (fp32, relative 1e-5) and the same top-k
experts in every MoE layer; export round trips are bit-identical and load back in transformers;
bad checkpoints fail with errors naming the file and the tensor or key.

Usage: hf_interop_test.py TOOLS_DIR TMP_DIR  (TOOLS_DIR holds gbmoe-convert and gbmoe-score)
"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen3MoeConfig

TOOLS, TMP = sys.argv[1], sys.argv[2]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENS = [[3, 17, 42, 5, 88, 61, 9, 0, 96, 23, 54, 7], [11, 2, 73, 40, 40, 1, 65, 30, 19, 84, 6, 50]]
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


def tool(name, *args, fail=False):
    r = subprocess.run([os.path.join(TOOLS, name), *map(str, args)], capture_output=True, text=True)
    if fail:
        check(r.returncode != 0, f"{name} {' '.join(map(str, args))} fails")
    elif r.returncode != 0:
        raise SystemExit(f"{name} {' '.join(map(str, args))} failed:\n{r.stdout}{r.stderr}")
    return r.stdout + r.stderr


def randomize(model):
    # Larger than transformers' 0.02 init, so logits and router choices are far from ties.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)


def build(kind, path, **overrides):
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_experts_per_tok=2,
                  max_position_embeddings=128, tie_word_embeddings=False)
    if kind == "qwen3_moe":
        qwen = dict(intermediate_size=112, moe_intermediate_size=80, num_experts=6,
                    mlp_only_layers=[1], norm_topk_prob=True, rope_theta=50000.0)
        cfg = Qwen3MoeConfig(**{**common, **qwen, **overrides})
    elif kind == "olmoe":  # q/k norms span hidden_size: head_dim = hidden_size / heads
        common.pop("head_dim")
        cfg = OlmoeConfig(**{**common, "intermediate_size": 80, "num_experts": 5, **overrides})
    else:
        cfg = MixtralConfig(**{**common, "intermediate_size": 80, "num_local_experts": 5,
                               **overrides})
    model = AutoModelForCausalLM.from_config(cfg)
    randomize(model)
    model.save_pretrained(path)
    return model


def hf_outputs(path_or_model):
    model = path_or_model
    if isinstance(model, str):
        model = AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor(TOKENS), output_router_logits=True)
    k = model.config.num_experts_per_tok
    experts = [torch.topk(torch.softmax(r.float(), -1), k, -1).indices for r in out.router_logits]
    return out.logits.float().numpy(), [e.sort(-1).values.numpy() for e in experts]


def gbmoe_outputs(path, tag):
    logits, experts = os.path.join(TMP, tag + "-logits.npy"), os.path.join(TMP, tag + "-experts.npy")
    ids = ";".join(",".join(map(str, s)) for s in TOKENS)
    out = tool("gbmoe-score", "--model", path, "--tokens", ids, "--logits", logits,
               "--experts", experts)
    loss = json.loads(out.strip().splitlines()[-1])["loss"]
    return np.load(logits), np.sort(np.load(experts), -1), loss


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def compare_family(kind, tag, **overrides):
    hf_dir = os.path.join(TMP, tag)
    model = build(kind, hf_dir, **overrides)
    ref_logits, ref_experts = hf_outputs(model)
    logits, experts, loss = gbmoe_outputs(hf_dir, tag)
    check(logits.shape == ref_logits.shape and rel(logits, ref_logits) <= 1e-5,
          f"{tag} {overrides}: gbmoe logits equal transformers' (relative {rel(logits, ref_logits):.2e})")
    check(len(experts) == len(ref_experts) and all(
        np.array_equal(e, r) for e, r in zip(experts, ref_experts)),
        f"{tag}: top-k experts of all {len(ref_experts)} MoE layers equal transformers'")
    ref_loss = torch.nn.functional.cross_entropy(
        torch.tensor(ref_logits[:, :-1]).reshape(-1, 97), torch.tensor(TOKENS)[:, 1:].reshape(-1))
    check(abs(loss - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()),
          f"{tag}: gbmoe-score loss {loss:.6f} equals transformers' {ref_loss.item():.6f}")

    # HF -> gbmoe checkpoint -> HF: identical tensors, transformers reproduces the logits.
    ckpt, back = os.path.join(TMP, tag + "-ckpt"), os.path.join(TMP, tag + "-back")
    tool("gbmoe-convert", "--input", hf_dir, "--output", ckpt)
    c_logits, _, _ = gbmoe_outputs(ckpt, tag + "-ckpt")
    check(np.array_equal(c_logits, logits), f"{tag}: the gbmoe checkpoint scores identically")
    tool("gbmoe-convert", "--input", ckpt, "--output", back)
    orig, exported = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(
        os.path.join(back, "model.safetensors"))
    check(orig.keys() == exported.keys() and all(torch.equal(orig[k], exported[k]) for k in orig),
          f"{tag}: HF -> gbmoe -> HF gives bit-identical tensors ({len(orig)} tensors)")
    b_logits, b_experts = hf_outputs(back)
    check(np.array_equal(b_logits, ref_logits),
          f"{tag}: transformers loads the export with the same logits")
    return hf_dir


def expect_error(tag, path, pattern):
    out = tool("gbmoe-score", "--model", path, "--tokens", "1,2,3", fail=True)
    check(re.search(pattern, out) is not None, f"{tag}: error matches /{pattern}/: {out.strip()}")


def continued_pretraining():
    """gbmoe-train from an HF model (global-batch balancing), export, transformers loads it."""
    raw = os.path.join(TMP, "raw")
    words = {"animals": "cat dog horse lion mouse owl", "numbers": "one two three seven ninety zero",
             "code": "int x = { } return ( )"}
    for domain, vocab in words.items():
        os.makedirs(os.path.join(raw, domain))
        w = vocab.split()
        for doc in range(5):
            with open(os.path.join(raw, domain, f"doc{doc}.txt"), "w") as f:
                for line in range(60):
                    f.write(" ".join(w[(doc * 7 + line * 5 + i * i) % len(w)] for i in range(8)) + "\n")
    corpus = os.path.join(TMP, "corpus")
    tool("gbmoe-data", "--input", raw, "--output", corpus, "--vocab-size", 400, "--val-fraction",
         0.2, "--threads", 1)

    # The same documents as JSON lines (.gz, other field names, bad records) with the tokenizer
    # of the first build give the same token shards.
    import gzip
    jsonl = os.path.join(TMP, "corpus.jsonl.gz")
    with gzip.open(jsonl, "wt", encoding="utf-8") as f:
        for domain in sorted(words):
            for doc in sorted(os.listdir(os.path.join(raw, domain))):
                text = open(os.path.join(raw, domain, doc)).read()
                f.write(json.dumps({"content": text, "source": domain}) + "\n")
        f.write('{"content": "", "source": "code"}\n{"source": "code"}\nnot json\n')
    from_jsonl = os.path.join(TMP, "corpus-jsonl")
    out = tool("gbmoe-data", "--jsonl", jsonl, "--text-field", "content", "--domain-field",
               "source", "--tokenizer", os.path.join(corpus, "tokenizer.model"), "--output",
               from_jsonl, "--val-fraction", 0.2, "--threads", 1)
    check("1 records with empty text" in out and "1 records that are not a JSON object" in out
          and "1 records without a string field" in out,
          f"gbmoe-data --jsonl counts the bad records: {out.strip()[:200]}")
    for split in ("train", "val"):
        a = open(os.path.join(corpus, split + ".bin"), "rb").read()
        b = open(os.path.join(from_jsonl, split + ".bin"), "rb").read()
        check(a == b, f"gbmoe-data --jsonl with the given tokenizer writes the same {split}.bin")
    hf_tokenizer_corpus(raw, jsonl)
    hf_dir = os.path.join(TMP, "qwen-512")
    build("qwen3_moe", hf_dir, vocab_size=512)
    run_dir = os.path.join(TMP, "run")
    sets = [f"data.dir={corpus}", "data.seq_len=16", "data.micro_batch_size=2", "data.grad_accum=2",
            "train.steps=3", "train.eval_every=0", "train.checkpoint_every=3", "train.log_every=1",
            f"train.run_dir={run_dir}", "balance.scope=global", "optim.lr=1e-2"]
    train = ["gbmoe-train", "--set", f"model.init_from={hf_dir}"]
    for kv in sets:
        train += ["--set", kv]
    out = tool(*train, "--config", os.path.join(ROOT, "configs/tiny.yaml"),
               fail=True)
    check(re.search(rf"model\.dim \(32\) contradicts {re.escape(hf_dir)} \(48\)", out) is not None,
          f"init_from refuses contradicting settings: {out.strip()[:300]}")
    tool(*train)
    ckpt = os.path.join(run_dir, "checkpoints", "step_00000003")
    export, again = os.path.join(TMP, "trained-hf"), os.path.join(TMP, "trained-again")
    tool("gbmoe-convert", "--input", ckpt, "--output", export)
    logits, experts, _ = gbmoe_outputs(ckpt, "trained")
    before, _, _ = gbmoe_outputs(hf_dir, "untrained")
    check(not np.array_equal(logits, before), "training changed the model")
    hf_logits, hf_experts = hf_outputs(export)
    check(rel(hf_logits, logits) <= 1e-5,
          f"transformers reproduces the trained model's logits (relative {rel(hf_logits, logits):.2e})")
    check(all(np.array_equal(e, r) for e, r in zip(experts, hf_experts)),
          "and its top-k experts")
    text_out = tool("gbmoe-score", "--model", ckpt, "--text", "cat dog one two",
                    "--tokenizer", os.path.join(corpus, "tokenizer.model"))
    check(json.loads(text_out.strip().splitlines()[-1])["predicted_tokens"] > 0,
          f"gbmoe-score --text with the dataset's tokenizer: {text_out.strip()}")
    bf16 = os.path.join(TMP, "trained-bf16")
    tool("gbmoe-convert", "--input", ckpt, "--output", bf16, "--dtype", "bfloat16")
    weights = load_file(os.path.join(bf16, "model.safetensors"))
    check(all(t.dtype == torch.bfloat16 for t in weights.values())
          and json.load(open(os.path.join(bf16, "config.json")))["dtype"] == "bfloat16",
          "a bfloat16 export stores bfloat16 tensors")
    bf_logits, _, _ = gbmoe_outputs(bf16, "bf16")
    bf_ref, _ = hf_outputs(bf16)  # loaded as float32: the same rounded weights
    check(rel(bf_logits, bf_ref) <= 1e-5 and not np.array_equal(bf_logits, logits),
          f"gbmoe reads the bfloat16 export as transformers does (relative {rel(bf_logits, bf_ref):.2e})")
    tool("gbmoe-convert", "--input", tool_ckpt(export, again), "--output", again + "-hf")
    a, b = load_file(os.path.join(export, "model.safetensors")), load_file(
        os.path.join(again + "-hf", "model.safetensors"))
    check(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
          "converting the export back and out again gives bit-identical tensors")


def hf_tokenizer_corpus(raw, jsonl):
    """scripts/hf_tokenize.py with a tokenizer.json: the tokens gbmoe-train reads are the
    tokenizer's ids plus its end-of-text id, and the shards pass gbmoe's checks."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    files = [os.path.join(raw, d, f) for d in sorted(os.listdir(raw))
             for f in sorted(os.listdir(os.path.join(raw, d)))]
    tok.train(files, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<|endoftext|>"]))
    tok_path = os.path.join(TMP, "tokenizer.json")
    tok.save(tok_path)
    out_dir = os.path.join(TMP, "corpus-hf-tok")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts/hf_tokenize.py"),
                        "--tokenizer", tok_path, "--jsonl", jsonl, "--text-field", "content",
                        "--domain-field", "source", "--output", out_dir, "--val-fraction", "0.2"],
                       capture_output=True, text=True)
    check(r.returncode == 0 and "skipped 1 records with empty text" in r.stderr,
          f"hf_tokenize.py writes shards and counts bad records: {r.stdout.strip()} {r.stderr.strip()}")
    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    tokens = np.fromfile(os.path.join(out_dir, "train.bin"), dtype="<u2")
    eos = tok.token_to_id("<|endoftext|>")
    docs = np.split(tokens, np.where(tokens == eos)[0] + 1)[:-1]
    first_animal = sorted(os.listdir(os.path.join(raw, "animals")))
    encoded = {tuple(tok.encode(open(os.path.join(raw, "animals", f)).read()).ids + [eos])
               for f in first_animal}
    check(meta["eos_id"] == eos and tuple(docs[0].tolist()) in encoded,
          "hf_tokenize.py's first train document is the tokenizer's ids plus <|endoftext|>")
    run_dir = os.path.join(TMP, "run-hf-tok")
    out = tool("gbmoe-train", "--config", os.path.join(ROOT, "configs/tiny.yaml"), "--set",
               f"data.dir={out_dir}", "--set", "train.steps=1", "--set", "train.eval_every=1",
               "--set", "train.checkpoint_every=0", "--set", f"train.run_dir={run_dir}")
    check("validation loss" in out, "gbmoe-train reads the hf_tokenize.py shards (1 step, eval)")


def tool_ckpt(hf_dir, ckpt):
    tool("gbmoe-convert", "--input", hf_dir, "--output", ckpt)
    return ckpt


def main():
    shutil.rmtree(TMP, ignore_errors=True)
    os.makedirs(TMP)
    qwen = compare_family("qwen3_moe", "qwen")
    compare_family("qwen3_moe", "qwen-variant", norm_topk_prob=False, decoder_sparse_step=2,
                   mlp_only_layers=[], num_key_value_heads=4, head_dim=12,
                   tie_word_embeddings=True)
    compare_family("mixtral", "mixtral")
    compare_family("olmoe", "olmoe")

    # Sharded checkpoints with model.safetensors.index.json.
    sharded = os.path.join(TMP, "qwen-sharded")
    AutoModelForCausalLM.from_pretrained(qwen).save_pretrained(sharded, max_shard_size="60KB")
    check(os.path.exists(os.path.join(sharded, "model.safetensors.index.json")),
          "transformers wrote a sharded checkpoint")
    ref, _, _ = gbmoe_outputs(qwen, "qwen-again")
    s_logits, _, _ = gbmoe_outputs(sharded, "sharded")
    check(np.array_equal(s_logits, ref), "a sharded checkpoint scores as the single file")

    # Errors naming the file and the tensor or key.
    missing = os.path.join(TMP, "missing-shard")
    shutil.copytree(sharded, missing)
    shard = sorted(f for f in os.listdir(missing) if f.endswith(".safetensors"))[-1]
    os.remove(os.path.join(missing, shard))
    expect_error("missing shard", missing, rf"missing shard \S*{shard}.*e\.g\. model\.")

    truncated = os.path.join(TMP, "truncated")
    shutil.copytree(qwen, truncated)
    st = os.path.join(truncated, "model.safetensors")
    os.truncate(st, os.path.getsize(st) - 100)
    expect_error("truncated file", truncated, r"truncated/model\.safetensors, tensor \S+: the file is truncated")

    def edited(tag, **changes):
        path = os.path.join(TMP, tag)
        shutil.copytree(qwen, path)
        cfg_path = os.path.join(path, "config.json")
        cfg = json.load(open(cfg_path))
        cfg.update(changes)
        json.dump(cfg, open(cfg_path, "w"))
        return path

    expect_error("shape contradicting config.json", edited("bad-shape", moe_intermediate_size=96),
                 r"tensor model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight has shape \[80, 48\] "
                 r"but config\.json needs \[96, 48\]")
    expect_error("unsupported model_type", edited("llama", model_type="llama"),
                 r"llama/config\.json: unsupported model_type 'llama'")

    continued_pretraining()

    if failures:
        raise SystemExit(f"{len(failures)} checks failed: {failures}")
    print("PASS: hf interop")


main()
