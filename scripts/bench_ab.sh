#!/usr/bin/env bash
# Training speed of gbmoe-train on configs/default.yaml under two environments, A and B, in one
# window: rounds alternate A, B and reverse the order every other round (A B, B A, A B, ...), so
# a slow drift of the machine hits both alike. Per round: tokens/s of each run (the harmonic mean
# over its steps after --skip) and the ratio B/A; at the end the median ratio with its spread and
# every round. For a change that a switch turns on and off, e.g. the node shared-memory
# collectives:
#   scripts/bench_ab.sh --ranks 4 --a GBMOE_NODE_SHARED_MEMORY=0 --b GBMOE_NODE_SHARED_MEMORY=1
# or, for a config setting, --a-set / --b-set (config overrides of one side only):
#   scripts/bench_ab.sh --a-set train.forward_ahead=false --b-set train.forward_ahead=true
# Usage: scripts/bench_ab.sh [--a "K=V ..."] [--b "K=V ..."] [--a-set K=V]... [--b-set K=V]...
#   [--ranks 2] [--rounds 5] [--steps 30] [--skip 5] [--set K=V]...
#   (needs a built tree, $GBMOE_BUILD_DIR or build/, and data/corpus; --set K=V go to every run)
set -euo pipefail
cd "$(dirname "$0")/.."
ranks=2 rounds=5 steps=30 skip=5 env_a="" env_b=""
extra=() set_a=() set_b=()
while [ $# -gt 0 ]; do
  case "$1" in
    --a) env_a=$2; shift 2 ;;
    --b) env_b=$2; shift 2 ;;
    --a-set) set_a+=(--set "$2"); shift 2 ;;
    --b-set) set_b+=(--set "$2"); shift 2 ;;
    --ranks) ranks=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --skip) skip=$2; shift 2 ;;
    --set) extra+=(--set "$2"); shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench_ab.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$steps" -gt "$skip" ] || { echo "bench_ab.sh: --steps ($steps) must be > --skip ($skip)" >&2; exit 2; }
build=${GBMOE_BUILD_DIR:-build}
[ -x "$build/train/gbmoe-train" ] || { echo "bench_ab.sh: no $build/train/gbmoe-train; build first" >&2; exit 1; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMP_NUM_THREADS=1
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# tokens/s of one run under the environment assignments $1 and the config overrides after it
run_once() {
  local run=$out/run environment=$1
  shift
  rm -rf "$run"
  # shellcheck disable=SC2086  # $environment is a list of K=V words
  env $environment mpirun -np "$ranks" "$build/train/gbmoe-train" --config configs/default.yaml \
    --set train.steps="$steps" --set train.eval_every=0 --set train.checkpoint_every=0 \
    --set train.log_every="$steps" --set train.run_dir="$run" ${extra[@]+"${extra[@]}"} "$@" \
    > "$out/train.log" 2>&1 || { tail -20 "$out/train.log" >&2; exit 1; }
  python3 - "$run/metrics.jsonl" "$skip" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l]
rows = [r for r in rows if r["step"] > int(sys.argv[2])]
print(f"{len(rows) / sum(1.0 / r['tokens_per_s'] for r in rows):.1f}")
PY
}

ratios=()
echo "bench_ab: ranks=$ranks rounds=$rounds steps=$steps (skip $skip);" \
  "A: ${env_a:-(no environment)} ${set_a[*]-}; B: ${env_b:-(no environment)} ${set_b[*]-}"
for ((r = 0; r < rounds; r++)); do
  if ((r % 2 == 0)); then
    a=$(run_once "$env_a" ${set_a[@]+"${set_a[@]}"}); b=$(run_once "$env_b" ${set_b[@]+"${set_b[@]}"})
  else
    b=$(run_once "$env_b" ${set_b[@]+"${set_b[@]}"}); a=$(run_once "$env_a" ${set_a[@]+"${set_a[@]}"})
  fi
  ratio=$(python3 -c "print(f'{$b / $a:.4f}')")
  ratios+=("$ratio")
  echo "round $((r + 1)): A $a tokens/s, B $b tokens/s, B/A $ratio"
done
python3 - "${ratios[@]}" <<'PY'
import statistics, sys
x = sorted(map(float, sys.argv[1:]))
print(f"bench_ab: B/A median {statistics.median(x):.4f}, spread {x[0]:.4f}-{x[-1]:.4f} over {len(x)} rounds")
PY
