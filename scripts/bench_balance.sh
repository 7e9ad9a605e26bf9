#!/usr/bin/env bash
# Step time of global vs micro balancing, as paired rounds inside one run per setting: after 5
# warm-up steps, configs/default.yaml trains alternating blocks of --block steps with
# balance.scope micro and global (a balance.schedule), ordered micro-global, global-micro,
# micro-global, ... so that a slow drift of the machine's speed hits both scopes alike. A round is
# one pair of adjacent blocks; its ratio is the mean time per token of the global block over the
# micro block's (the first --skip steps of each block left out: the objective is rebuilt at a
# switch). Per setting (every rank count and data.grad_accum given): the median ratio over the
# rounds with its 95% interval (distribution-free, from the order statistics), their spread
# (min-max) and every round; then the same with each block's median step instead of its mean.
# Why not separate runs: on this machine the speed of a whole run drifts by 5-25% between runs
# minutes apart, far more than the effect measured; adjacent blocks of one run see the same
# machine.
# Usage: scripts/bench_balance.sh [--ranks "2 4"] [--grad-accum "1 4"] [--rounds 5] [--block 12]
#   [--skip 2] [--set K=V]...
#   (needs a built tree, $GBMOE_BUILD_DIR or build/, and data/corpus; --set K=V go to every run)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${GBMOE_BUILD_DIR:-$root/build}
ranks_list="2 4" accum_list="1 4" rounds=5 block=12 skip=2 warmup=5
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --ranks) ranks_list=$2; shift 2 ;;
    --grad-accum) accum_list=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --block) block=$2; shift 2 ;;
    --skip) skip=$2; shift 2 ;;
    --set) extra+=(--set "$2"); shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench_balance.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$rounds" -ge 1 ] || { echo "bench_balance.sh: --rounds ($rounds) must be >= 1" >&2; exit 2; }
[ "$block" -gt "$skip" ] ||
  { echo "bench_balance.sh: --block ($block) must be > --skip ($skip)" >&2; exit 2; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMP_NUM_THREADS=1
cd "$root"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Blocks b = 0 .. 2 rounds - 1 start after warmup + b block steps; round r holds blocks 2r, 2r+1,
# micro first in even rounds: scopes micro global global micro micro global ...
scope_of_block() { local b=$1; if [ $(((b + 1) / 2 % 2)) = 0 ]; then echo micro; else echo global; fi; }
schedule="" previous=micro
for b in $(seq 0 $((2 * rounds - 1))); do
  s=$(scope_of_block "$b")
  if [ "$s" != "$previous" ]; then
    schedule+="${schedule:+, }{step: $((warmup + b * block)), scope: $s}"
    previous=$s
  fi
done
steps=$((warmup + 2 * rounds * block))
for ranks in $ranks_list; do
  for accum in $accum_list; do
    run=$out/run_${ranks}_$accum
    mpirun -np "$ranks" "$build/train/gbmoe-train" --config configs/default.yaml \
      --set balance.scope=micro --set "balance.schedule=[$schedule]" --set data.grad_accum=$accum \
      --set train.steps=$steps --set train.eval_every=0 --set train.checkpoint_every=0 \
      --set train.log_every=$steps --set train.run_dir=$run ${extra[@]+"${extra[@]}"} \
      > "$out/train.log" 2>&1 || { tail -20 "$out/train.log" >&2; exit 1; }
    python3 - "$run/metrics.jsonl" "$ranks" "$accum" "$warmup" "$block" "$skip" <<'PY'
import collections, json, math, statistics, sys
path, ranks, accum, warmup, block, skip = sys.argv[1], *map(int, sys.argv[2:])
seconds = collections.defaultdict(list)  # block -> seconds per token of its measured steps
scope = {}
for line in open(path):
    row = json.loads(line)
    if "tokens_per_s" not in row or row["step"] <= warmup:
        continue
    b, i = divmod(row["step"] - 1 - warmup, block)
    scope.setdefault(b, row["balance_scope"])
    assert scope[b] == row["balance_scope"], f"block {b} mixes scopes"
    if i >= skip:
        seconds[b].append(1.0 / row["tokens_per_s"])
def round_ratios(per_block):
    ratios, micro = [], []
    for r in range(len(per_block) // 2):
        pair = {scope[2 * r]: per_block[2 * r], scope[2 * r + 1]: per_block[2 * r + 1]}
        assert set(pair) == {"micro", "global"}, f"round {r}: scopes {sorted(pair)}"
        ratios.append(pair["global"] / pair["micro"])
        micro.append(pair["micro"])
    return ratios, micro

def median_interval(ratios):
    # A distribution-free 95% interval of the median: the order statistics j and n + 1 - j
    # with j the largest such that P(Binomial(n, 1/2) < j) <= 2.5%; none for fewer than 6.
    n, j, below = len(ratios), 0, 0.0
    while below + math.comb(n, j) / 2 ** n <= 0.025:
        below += math.comb(n, j) / 2 ** n
        j += 1
    s = sorted(ratios)
    return statistics.median(ratios), f"95% interval {s[j - 1]:.4f}-{s[n - j]:.4f}, " if j >= 1 else ""

# Per block: the mean time per token (what a run pays), and the median step's (robust to the
# single slow steps of a machine that is shared with others).
ratios, micro = round_ratios({b: statistics.fmean(v) for b, v in seconds.items()})
med, interval = median_interval(ratios)
print(f"bench_balance ranks={ranks} grad_accum={accum} rounds={len(ratios)} block={block} "
      f"(skip {skip}): global/micro median {med:.4f} ({(med - 1) * 100:+.2f}%), {interval}"
      f"spread {min(ratios):.4f}-{max(ratios):.4f}, micro {1 / statistics.median(micro):,.0f} "
      f"tokens/s; rounds: {' '.join(f'{x:.4f}' for x in ratios)}", flush=True)
robust, _ = round_ratios({b: statistics.median(v) for b, v in seconds.items()})
med, interval = median_interval(robust)
print(f"  by each block's median step: global/micro median {med:.4f} ({(med - 1) * 100:+.2f}%), "
      f"{interval}spread {min(robust):.4f}-{max(robust):.4f}", flush=True)
PY
  done
done
