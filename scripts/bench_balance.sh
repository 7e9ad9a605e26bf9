#!/usr/bin/env bash
# Step time of global vs micro balancing: trains the same small model for a few steps with
# each scope on R ranks (default 4) and prints the ratio of their mean step times.
# Usage: scripts/bench_balance.sh [ranks] [steps]   (needs a built tree and data/corpus)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${GBMOE_BUILD_DIR:-$root/build}
ranks=${1:-4}
steps=${2:-30}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMP_NUM_THREADS=1
cd "$root"
mean_step_s() {  # mean wall time per step after the first 5, from metrics.jsonl tokens/s
  python3 - "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l]
rows = rows[5:]
print(sum(1.0 / r["tokens_per_s"] for r in rows) / len(rows))
PY
}
declare -A per_token
for round in 1 2; do  # alternate the scopes twice so machine noise hits both alike
  for scope in micro global; do
    run=runs/bench_balance_$scope
    rm -rf "$run"
    mpirun -np "$ranks" "$build/train/gbmoe-train" --config configs/default.yaml \
      --set balance.scope=$scope --set train.steps=$steps --set train.eval_every=0 \
      --set train.checkpoint_every=0 --set train.log_every=$steps --set train.run_dir=$run > /dev/null
    t=$(mean_step_s "$run/metrics.jsonl")
    per_token[$scope]=$(python3 -c "print(${per_token[$scope]:-0} + $t)")
  done
done
python3 - "${per_token[micro]}" "${per_token[global]}" "$ranks" "$steps" <<'PY'
import sys
micro, glob, ranks, steps = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
print(f"bench_balance ranks={ranks} steps={steps} (x2 runs each): "
      f"global/micro step-time ratio = {glob / micro:.4f} ({(glob / micro - 1) * 100:+.2f}%)")
PY
