#!/usr/bin/env bash
# The micro-vs-global experiment in one command: trains each run (same data and seeds), analyzes
# its last checkpoint with gbmoe-analyze and writes a report (markdown + PNGs) comparing them.
#
# Usage: scripts/compare_balance.sh [options] [RUN ...]
#   RUN              LABEL=CONFIG[,section.key=value...] or CONFIG (label = the file's stem);
#                    default: configs/micro.yaml configs/global.yaml
#   --name NAME      runs go to RUNS/NAME/LABEL, the report to REPORTS/NAME (default: compare)
#   --ranks R        mpirun ranks of every run (default 2)
#   --set K=V        a setting for every run (repeatable), e.g. --set train.steps=100
#   --val-batches N  validation batches per domain for gbmoe-analyze (default 32)
#   --seeds N|LIST   repeat every run per seed: N = seeds 1..N (or from --seed-base), or a
#                    comma list like 1,2,3; each seed gets train.seed=S (after every other
#                    setting) and its own directory RUNS/NAME/LABEL/seedS; the report gives
#                    means and standard deviations over seeds and each run's paired difference
#                    against the first run with a 95% t-interval (default: one run with the
#                    config's seed, in RUNS/NAME/LABEL)
#   --seed-base B    first seed of --seeds N (default 1)
#   --fresh          retrain runs that already exist (default: resume them; finished runs are
#                    only analyzed again)
#   --runs DIR, --reports DIR   (defaults: runs, reports)
#   --no-build       use the binaries in $GBMOE_BUILD_DIR (default build/) as they are
# Values may hold commas inside [] or {} (balance.schedule=[{step: 200, scope: global}]).
# Example (a balance group-size sweep on 2 ranks, 3 seeds; g=2 is global):
#   scripts/compare_balance.sh --name sweep --seeds 3 micro=configs/micro.yaml \
#     g1=configs/global.yaml,balance.scope=group,balance.group_size=1 global=configs/global.yaml
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${GBMOE_BUILD_DIR:-$root/build}
source "$root/scripts/quote_args.sh"
command_line=$(quote_args scripts/compare_balance.sh "$@")
name=compare ranks=2 val_batches=32 fresh=0 build_first=1 runs_root=runs reports_root=reports
seeds_arg="" seed_base=1
common=()
specs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --ranks) ranks=$2; shift 2 ;;
    --set) common+=(--set "$2"); shift 2 ;;
    --val-batches) val_batches=$2; shift 2 ;;
    --seeds) seeds_arg=$2; shift 2 ;;
    --seed-base) seed_base=$2; shift 2 ;;
    --fresh) fresh=1; shift ;;
    --runs) runs_root=$2; shift 2 ;;
    --reports) reports_root=$2; shift 2 ;;
    --no-build) build_first=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --*) echo "compare_balance.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) specs+=("$1"); shift ;;
  esac
done
[ ${#specs[@]} -gt 0 ] || specs=(configs/micro.yaml configs/global.yaml)
fail() { echo "compare_balance.sh: $*" >&2; exit 2; }
[[ "$seed_base" =~ ^[0-9]+$ ]] || fail "--seed-base ($seed_base) must be an integer >= 0"
seeds=()  # empty: one run per spec with the config's own seed
if [[ "$seeds_arg" =~ ^[0-9]+$ ]]; then
  [ "$seeds_arg" -ge 1 ] || fail "--seeds ($seeds_arg) must be >= 1"
  seeds=($(seq "$seed_base" $((seed_base + seeds_arg - 1))))
elif [[ "$seeds_arg" =~ ^[0-9]+(,[0-9]+)+$ ]]; then
  IFS=, read -r -a seeds <<< "$seeds_arg"
  [ "$(printf '%s\n' "${seeds[@]}" | sort -u | wc -l)" -eq ${#seeds[@]} ] ||
    fail "--seeds ($seeds_arg) names a seed twice"
elif [ -n "$seeds_arg" ]; then
  fail "--seeds ($seeds_arg) must be a count like 3 or a list like 1,2,3"
fi

# Splits a run spec at the commas outside [] and {} (a value may be a YAML list).
split_spec() {
  local text=$1 part="" depth=0 c i
  parts=()
  for ((i = 0; i < ${#text}; i++)); do
    c=${text:i:1}
    case "$c" in
      "[" | "{") depth=$((depth + 1)) ;;
      "]" | "}") depth=$((depth - 1)) ;;
    esac
    if [ "$c" = , ] && [ $depth -eq 0 ]; then parts+=("$part") part=""; else part+=$c; fi
  done
  parts+=("$part")
}

cd "$root"
if [ "$build_first" = 1 ]; then
  bash scripts/setup.sh
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
  cmake --build "$build" -j2 --target gbmoe-data gbmoe-train gbmoe-analyze
  bash scripts/make_corpus.sh data
  [ -f data/corpus/val.idx ] ||
    "$build/train/gbmoe-data" --input data/raw --output data/corpus --vocab-size 4096
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMP_NUM_THREADS=1

# Trains (or resumes) one run into $1 with the given gbmoe-train arguments, then analyzes it.
train_and_analyze() {
  local run_dir=$1 t0=$SECONDS
  shift
  [ "$fresh" = 1 ] && rm -rf "$run_dir"
  mkdir -p "$run_dir"
  mpirun -np "$ranks" "$build/train/gbmoe-train" "$@" --set train.run_dir="$run_dir" \
    --set train.resume=auto >> "$run_dir/train.log" 2>&1 ||
    { tail -20 "$run_dir/train.log" >&2; exit 1; }
  "$build/train/gbmoe-analyze" --run "$run_dir" --val-batches "$val_batches" |
    tee "$run_dir/analyze.log"
  echo "   $run_dir: $((SECONDS - t0)) s"
}

labelled=()
for spec in "${specs[@]}"; do
  label=${spec%%=*} rest=${spec#*=}
  if [ "$label" = "$spec" ] || [[ "$label" == *[,/]* ]]; then
    label=$(basename "${spec%%,*}" .yaml) rest=$spec
  fi
  split_spec "$rest"
  config=${parts[0]}
  [ -f "$config" ] || fail "run $label: config $config not found"
  overrides=()
  for kv in "${parts[@]:1}"; do overrides+=(--set "$kv"); done
  args=(--config "$config" ${common[@]+"${common[@]}"} ${overrides[@]+"${overrides[@]}"})
  echo "== $label: training ($config${parts[1]:+, ${parts[*]:1}})${seeds[0]:+, seeds ${seeds[*]}}"
  if [ ${#seeds[@]} -eq 0 ]; then
    train_and_analyze "$runs_root/$name/$label" "${args[@]}"
    labelled+=("$label=$runs_root/$name/$label")
    continue
  fi
  dirs=()
  for seed in "${seeds[@]}"; do
    train_and_analyze "$runs_root/$name/$label/seed$seed" "${args[@]}" --set train.seed="$seed"
    dirs+=("$runs_root/$name/$label/seed$seed")
  done
  labelled+=("$label=$(IFS=,; echo "${dirs[*]}")")
done

"$root/.venv/bin/python" scripts/plot_runs.py --output "$reports_root/$name" \
  --title "Balance comparison: $name" --command "$command_line" "${labelled[@]}"
echo "report: $reports_root/$name/report.md ($SECONDS s in all)"
