#!/usr/bin/env bash
# The MoE layer against the peer (../shared/peers/hf_moe_block.py) at both shapes and 1 and 2
# threads, R rounds alternated so that machine noise hits both alike; then each side's best
# step time per setting and the best-setting against best-setting speed-ups.
# Usage: scripts/bench_layer.sh [rounds]   (needs a built tree: build/benchmarks/gbmoe_bench_layer)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${GBMOE_BUILD_DIR:-$root/build}
rounds=${1:-2}
peer=${GBMOE_PEER:-$root/../shared/peers/hf_moe_block.py}
python=${GBMOE_PYTHON:-$root/.venv/bin/python}
bench=$build/benchmarks/gbmoe_bench_layer
for f in "$bench" "$peer" "$python"; do
  [[ -e $f ]] || { echo "bench_layer.sh: $f not found (build first: scripts/test.sh)" >&2; exit 2; }
done
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for round in $(seq "$rounds"); do
  for threads in 1 2; do
    "$bench" --threads "$threads" --reps 5 --shape both | tee -a "$out"
    for shape in "coarse 4096 512 1024 8 2" "fine 4096 256 128 64 8"; do
      set -- $shape
      echo "$1 $(THREADS=$threads "$python" "$peer" "$2" "$3" "$4" "$5" "$6" 3)" | tee -a "$out"
    done
  done
done
python3 - "$out" <<'PY'
import re, sys
best = {}  # (who, shape, threads) -> best step seconds
for line in open(sys.argv[1]):
    step = float(re.search(r"step_s=([0-9.]+)", line).group(1))
    threads = int(re.search(r"threads=(\d+)", line).group(1))
    if line.startswith("gbmoe_layer"):
        key = ("gbmoe", line.split()[1], threads)
    else:
        key = ("peer", line.split()[0], threads)
    best[key] = min(best.get(key, 1e9), step)
for shape in ("coarse", "fine"):
    ours = min(best[("gbmoe", shape, t)] for t in (1, 2))
    theirs = min(best[("peer", shape, t)] for t in (1, 2))
    cells = " ".join(f"gbmoe_T{t}={best[('gbmoe', shape, t)]:.4f} peer_T{t}={best[('peer', shape, t)]:.4f}"
                     for t in (1, 2))
    print(f"bench_layer {shape}: {cells} best/best speed-up {theirs / ours:.2f}x")
PY
