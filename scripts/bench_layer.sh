#!/usr/bin/env bash
# The MoE layer against the peer (../shared/peers/hf_moe_block.py) at both shapes and 1 and 2
# threads, R rounds alternated so that machine noise hits both alike; then each side's best
# step time per setting and the best-setting against best-setting speed-ups: against the peer as
# it is, and against the peer with glibc set the way our buffer cache works (freed memory kept,
# transparent huge pages: GLIBC_TUNABLES), which speeds it up too.
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
peer_tunables=glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=1073741824
peer_tunables+=:glibc.malloc.trim_threshold=1073741824
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for round in $(seq "$rounds"); do
  for threads in 1 2; do
    "$bench" --threads "$threads" --reps 5 --shape both | tee -a "$out"
    for shape in "coarse 4096 512 1024 8 2" "fine 4096 256 128 64 8"; do
      set -- $shape
      for tunables in "" "$peer_tunables"; do
        echo "$1 $(GLIBC_TUNABLES=$tunables THREADS=$threads "$python" "$peer" "$2" "$3" "$4" "$5" "$6" 3) tunables=$tunables" |
          tee -a "$out"
      done
    done
  done
done
python3 - "$out" <<'PY'
import re, sys
best = {}  # (who, shape, threads) -> best step seconds; who: gbmoe, peer, peer_glibc
for line in open(sys.argv[1]):
    step = float(re.search(r"step_s=([0-9.]+)", line).group(1))
    threads = int(re.search(r"threads=(\d+)", line).group(1))
    if line.startswith("gbmoe_layer"):
        key = ("gbmoe", line.split()[1], threads)
    else:
        who = "peer" if line.rstrip().endswith("tunables=") else "peer_glibc"
        key = (who, line.split()[0], threads)
    best[key] = min(best.get(key, 1e9), step)
for shape in ("coarse", "fine"):
    top = {who: min(best[(who, shape, t)] for t in (1, 2)) for who in ("gbmoe", "peer", "peer_glibc")}
    cells = " ".join(f"{who}_T{t}={best[(who, shape, t)]:.4f}"
                     for t in (1, 2) for who in ("gbmoe", "peer", "peer_glibc"))
    print(f"bench_layer {shape}: {cells} speed-up best/best {top['peer'] / top['gbmoe']:.2f}x "
          f"(peer with glibc tuned: {top['peer_glibc'] / top['gbmoe']:.2f}x)")
PY
