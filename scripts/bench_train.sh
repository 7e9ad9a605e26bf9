#!/usr/bin/env bash
# End-to-end training speed of gbmoe-train against the transformers peer (benchmarks/
# hf_train_peer.py: Qwen3-MoE of the same shape in a plain PyTorch loop) on the same cores, in one
# window, rounds alternated (the order of the runs reverses every round):
#   1x1: gbmoe-train 1 rank x 1 thread        vs the peer, 1 thread
#   2x2: gbmoe-train 2 ranks x 1 thread (MPI) vs the peer, 2 threads, and vs torch DDP over gloo,
#        2 processes x 1 thread
# Per setting: the median tokens/s over the rounds with its spread (min-max), the median of the
# per-round ratios gbmoe/peer, and each side's model FLOPs utilization (MFU) against the sgemm
# rate measured in the same round (a 1024^3 fp32 matmul on 1 thread; for 2x2 twice the rate each
# of two concurrent processes gets).
# FLOPs per token = 6 x (active matmul parameters: q/k/v and output projections, router, top-k
# experts' gate/up and down, output head) + 6 L S D (causal attention: half of the S^2 scores and
# values, forward and backward). Embedding lookups, norms and element-wise work count nothing.
# Usage: scripts/bench_train.sh [--shape default|wide|wide-fine|fine] [--rounds 3] [--steps 30]
#          [--only 1x1|2x2]
#   default:   configs/default.yaml (dim 128, 4 layers, 8 experts top-2, expert hidden 256)
#   wide:      dim 512, 8 heads, 8 experts top-2, expert hidden 1024 (default.yaml with --set)
#   wide-fine: dim 512, 8 heads, 32 experts top-8, expert hidden 256 (the same active expert
#              parameters as wide, in experts a quarter the size)
#   fine:      dim 256, 4 heads, 64 experts top-8, expert hidden 128 (fine-grained experts as in
#              OLMoE and Qwen3-MoE; the MoE layer benchmark's fine shape)
#   (needs a built tree, $GBMOE_BUILD_DIR or build/, data/corpus and the project venv)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${GBMOE_BUILD_DIR:-$root/build}
python=${GBMOE_PYTHON:-$root/.venv/bin/python}
shape=default rounds=3 steps=30 only="1x1 2x2" warmup=5
while [ $# -gt 0 ]; do
  case "$1" in
    --shape) shape=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench_train.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
experts=8 topk=2
case "$shape" in
  default) dim=128 heads=4 hidden=256 ;;
  wide) dim=512 heads=8 hidden=1024 ;;
  wide-fine) dim=512 heads=8 hidden=256 experts=32 topk=8 ;;
  fine) dim=256 heads=4 hidden=128 experts=64 topk=8 ;;
  *) echo "bench_train.sh: --shape ($shape) must be default, wide, wide-fine or fine" >&2; exit 2 ;;
esac
layers=4 vocab=4096 seq=128 mb=4 accum=2
for f in "$build/train/gbmoe-train" "$python" "$root/data/corpus/meta.json"; do
  [[ -e $f ]] || { echo "bench_train.sh: $f not found (scripts/setup.sh, build, make_corpus)" >&2; exit 2; }
done
corpus_vocab=$(python3 -c "import json; print(json.load(open('$root/data/corpus/meta.json'))['vocab_size'])")
[ "$corpus_vocab" = "$vocab" ] ||
  echo "bench_train.sh: note: data/corpus has vocab $corpus_vocab, the peer $vocab" >&2
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMP_NUM_THREADS=1
cd "$root"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
results=$out/results.txt
shape_args=(--dim $dim --layers $layers --heads $heads --experts $experts --top-k $topk
  --expert-hidden $hidden --vocab $vocab --seq $seq --micro-batch $mb --accum $accum)
sgemm() {  # GFLOP/s of a 1024^3 fp32 matmul on one thread, median of 5
  THREADS=1 "$python" - <<'PY'
import statistics, time, torch
torch.set_num_threads(1)
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
for _ in range(3): a @ b
rates = []
for _ in range(5):
    t0 = time.perf_counter(); [a @ b for _ in range(4)]; dt = time.perf_counter() - t0
    rates.append(4 * 2 * 1024 ** 3 / dt / 1e9)
print(f"{statistics.median(rates):.2f}")
PY
}
gbmoe() {  # ranks -> tokens/s of the steps after the warm-up
  local run=$out/run_$1
  rm -rf "$run"
  mpirun -np "$1" "$build/train/gbmoe-train" --config configs/default.yaml \
    --set model.dim=$dim --set model.num_heads=$heads --set model.expert_hidden=$hidden \
    --set model.num_layers=$layers --set model.num_experts=$experts --set model.top_k=$topk \
    --set data.seq_len=$seq --set data.micro_batch_size=$mb --set data.grad_accum=$accum \
    --set train.steps=$((warmup + steps)) --set train.eval_every=0 \
    --set train.checkpoint_every=0 --set train.log_every=1000 --set train.threads=1 \
    --set train.tensorboard=false --set train.run_dir="$run" > "$out/train.log" 2>&1 ||
    { tail -20 "$out/train.log" >&2; exit 1; }
  python3 - "$run/metrics.jsonl" "$warmup" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l][int(sys.argv[2]):]
print(f"{len(rows) / sum(1.0 / r['tokens_per_s'] for r in rows):.1f}")
PY
}
peer() {  # threads processes -> tokens/s
  local cmd=("$python") ddp=()
  if [ "$2" -gt 1 ]; then
    cmd+=(-m torch.distributed.run --nproc_per_node "$2" --master_port 29517)
    ddp=(--ddp)
  fi
  THREADS=$1 "${cmd[@]}" benchmarks/hf_train_peer.py --steps "$steps" ${ddp[@]+"${ddp[@]}"} \
    "${shape_args[@]}" 2> "$out/peer.log" | sed -n 's/.*tok_s=\([0-9.]*\).*/\1/p' | grep . ||
    { tail -20 "$out/peer.log" >&2; exit 1; }
}
for round in $(seq "$rounds"); do
  s1=$(sgemm)
  s2=$( (sgemm > "$out/s_a" & sgemm > "$out/s_b"; wait) ; python3 -c \
    "print(float(open('$out/s_a').read()) + float(open('$out/s_b').read()))")
  runs=()
  [[ " $only " == *" 1x1 "* ]] && runs+=("1x1 gbmoe 1" "1x1 peer 1 1")
  [[ " $only " == *" 2x2 "* ]] && runs+=("2x2 gbmoe 2" "2x2 peer 2 1" "2x2 ddp 1 2")
  if [ $((round % 2)) = 0 ]; then
    reversed=()
    for ((i = ${#runs[@]} - 1; i >= 0; i--)); do reversed+=("${runs[i]}"); done
    runs=("${reversed[@]}")
  fi
  for r in "${runs[@]}"; do
    set -- $r
    case "$2" in
      gbmoe) tps=$(gbmoe "$3") ;;
      *) tps=$(peer "$3" "$4") ;;
    esac
    echo "$round $1 $2 $tps $s1 $s2" | tee -a "$results" >&2
  done
done
python3 - "$results" "$shape" "$dim" "$layers" "$experts" "$topk" "$hidden" "$vocab" "$seq" <<'PY'
import collections, statistics, sys
path, shape = sys.argv[1], sys.argv[2]
D, L, E, K, F, V, S = map(int, sys.argv[3:])
active = L * (3 * D * D + D * D + D * E + K * (2 * D * F + F * D)) + D * V
flops = 6 * active + 6 * L * S * D
print(f"bench_train shape={shape}: dim {D}, {L} layers, {E} experts top-{K}, expert hidden {F}, "
      f"vocab {V}, seq {S}; {active / 1e6:.3f}M active matmul parameters, "
      f"{flops / 1e6:.2f} MFLOP per token")
tps = collections.defaultdict(dict)  # (setting, who) -> round -> tokens/s
peak = collections.defaultdict(dict)  # setting -> round -> sgemm GFLOP/s of the cores used
for line in open(path):
    rnd, setting, who, t, s1, s2 = line.split()
    tps[(setting, who)][int(rnd)] = float(t)
    peak[setting][int(rnd)] = float(s1) if setting == "1x1" else float(s2)
def spread(xs, fmt):
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"
for setting in ("1x1", "2x2"):
    if (setting, "gbmoe") not in tps:
        continue
    g = tps[(setting, "gbmoe")]
    line = [f"  {setting}: sgemm {spread(list(peak[setting].values()), '{:.1f}')} GFLOP/s;"]
    for who in ("gbmoe", "peer", "ddp"):
        if (setting, who) not in tps:
            continue
        v = tps[(setting, who)]
        mfu = [v[r] * flops / 1e9 / peak[setting][r] for r in v]
        label = {"gbmoe": "gbmoe", "peer": "peer (threads)", "ddp": "peer DDP"}[who]
        line.append(f"{label} {spread(list(v.values()), '{:,.0f}')} tok/s, "
                    f"MFU {spread(mfu, '{:.1%}')}")
        if who != "gbmoe":
            ratios = [g[r] / v[r] for r in v if r in g]
            line[-1] += f", gbmoe/{label} {spread(ratios, '{:.2f}')}x"
    print(" ".join(line[:1]) + "\n    " + ";\n    ".join(line[1:]))
print(f"  {len(tps[next(iter(tps))])} rounds; tokens/s over the steps after the warm-up; "
      "(spread) = min-max over the rounds")
PY
