#!/usr/bin/env bash
# Step time of global vs micro balancing: trains configs/default.yaml for a few steps with each
# scope, the two alternated (micro first in odd rounds, global first in even ones) so that machine
# noise hits both alike, at every rank count and data.grad_accum given. Per round the ratio of
# the mean time per token (after the first 5 steps; both scopes train the same tokens per step)
# global/micro; per setting the median ratio over the rounds and their spread (min-max).
# Usage: scripts/bench_balance.sh [--ranks "2 4"] [--grad-accum "1 4"] [--rounds 3] [--steps 40]
#   (needs a built tree, $GBMOE_BUILD_DIR or build/, and data/corpus; extra --set K=V go to
#   every run)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${GBMOE_BUILD_DIR:-$root/build}
ranks_list="2 4" accum_list="1 4" rounds=3 steps=40
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --ranks) ranks_list=$2; shift 2 ;;
    --grad-accum) accum_list=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --set) extra+=(--set "$2"); shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench_balance.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$steps" -gt 5 ] || { echo "bench_balance.sh: --steps ($steps) must be > 5" >&2; exit 2; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMP_NUM_THREADS=1
cd "$root"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
token_seconds() {  # mean seconds per token of the steps after the first 5, from metrics.jsonl
  python3 - "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l][5:]
print(sum(1.0 / r["tokens_per_s"] for r in rows) / len(rows))
PY
}
results=$out/results.txt
for ranks in $ranks_list; do
  for accum in $accum_list; do
    for round in $(seq "$rounds"); do
      order="micro global"
      [ $((round % 2)) = 0 ] && order="global micro"
      for scope in $order; do
        run=$out/run_$scope
        rm -rf "$run"
        mpirun -np "$ranks" "$build/train/gbmoe-train" --config configs/default.yaml \
          --set balance.scope=$scope --set data.grad_accum=$accum --set train.steps=$steps \
          --set train.eval_every=0 --set train.checkpoint_every=0 --set train.log_every=$steps \
          --set train.run_dir=$run ${extra[@]+"${extra[@]}"} > "$out/train.log" 2>&1 ||
          { tail -20 "$out/train.log" >&2; exit 1; }
        echo "$ranks $accum $round $scope $(token_seconds "$run/metrics.jsonl")" >> "$results"
      done
    done
  done
done
python3 - "$results" "$steps" <<'PY'
import collections, statistics, sys
times = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    ranks, accum, rnd, scope, t = line.split()
    times[(int(ranks), int(accum))].setdefault(int(rnd), {})[scope] = float(t)
for (ranks, accum), rounds in sorted(times.items()):
    ratios = [r["global"] / r["micro"] for _, r in sorted(rounds.items())]
    med = statistics.median(ratios)
    micro_tps = 1 / statistics.median(r["micro"] for r in rounds.values())
    print(f"bench_balance ranks={ranks} grad_accum={accum} steps={sys.argv[2]} "
          f"rounds={len(ratios)}: global/micro median {med:.4f} ({(med - 1) * 100:+.2f}%), "
          f"spread {min(ratios):.4f}-{max(ratios):.4f}, micro {micro_tps:,.0f} tokens/s; "
          f"rounds: {' '.join(f'{x:.4f}' for x in ratios)}")
PY
