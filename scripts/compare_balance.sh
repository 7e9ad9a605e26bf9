#!/usr/bin/env bash
# The micro-vs-global experiment in one command: trains each run (same seed and data), analyzes
# its last checkpoint with gbmoe-analyze and writes a report (markdown + PNGs) comparing them.
#
# Usage: scripts/compare_balance.sh [options] [RUN ...]
#   RUN              LABEL=CONFIG[,section.key=value...] or CONFIG (label = the file's stem);
#                    default: configs/micro.yaml configs/global.yaml
#   --name NAME      runs go to RUNS/NAME/LABEL, the report to REPORTS/NAME (default: compare)
#   --ranks R        mpirun ranks of every run (default 2)
#   --set K=V        a setting for every run (repeatable), e.g. --set train.steps=100
#   --val-batches N  validation batches per domain for gbmoe-analyze (default 32)
#   --fresh          retrain runs that already exist (default: resume them; finished runs are
#                    only analyzed again)
#   --runs DIR, --reports DIR   (defaults: runs, reports)
#   --no-build       use the binaries in $GBMOE_BUILD_DIR (default build/) as they are
# Example (a balance group-size sweep on 2 ranks; g=2 is global):
#   scripts/compare_balance.sh --name sweep micro=configs/micro.yaml \
#     g1=configs/global.yaml,balance.scope=group,balance.group_size=1 global=configs/global.yaml
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${GBMOE_BUILD_DIR:-$root/build}
command_line=scripts/compare_balance.sh
for arg in "$@"; do  # quoted only where the shell needs it, for the report
  if [[ "$arg" =~ ^[A-Za-z0-9_./=,:+-]+$ ]]; then
    command_line+=" $arg"
  else
    command_line+=" $(printf %q "$arg")"
  fi
done
name=compare ranks=2 val_batches=32 fresh=0 build_first=1 runs_root=runs reports_root=reports
common=()
specs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --ranks) ranks=$2; shift 2 ;;
    --set) common+=(--set "$2"); shift 2 ;;
    --val-batches) val_batches=$2; shift 2 ;;
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

labelled=()
for spec in "${specs[@]}"; do
  label=${spec%%=*} rest=${spec#*=}
  if [ "$label" = "$spec" ]; then label=$(basename "${spec%%,*}" .yaml) rest=$spec; fi
  IFS=, read -r -a parts <<< "$rest"
  config=${parts[0]}
  if [ ! -f "$config" ]; then
    echo "compare_balance.sh: run $label: config $config not found" >&2
    exit 2
  fi
  overrides=()
  for kv in "${parts[@]:1}"; do overrides+=(--set "$kv"); done
  run_dir=$runs_root/$name/$label
  [ "$fresh" = 1 ] && rm -rf "$run_dir"
  mkdir -p "$run_dir"
  echo "== $label: training ($config${parts[1]:+, ${parts[*]:1}}) -> $run_dir"
  mpirun -np "$ranks" "$build/train/gbmoe-train" --config "$config" ${common[@]+"${common[@]}"} \
    ${overrides[@]+"${overrides[@]}"} --set train.run_dir="$run_dir" --set train.resume=auto \
    >> "$run_dir/train.log" 2>&1 || { tail -20 "$run_dir/train.log" >&2; exit 1; }
  "$build/train/gbmoe-analyze" --run "$run_dir" --val-batches "$val_batches" |
    tee "$run_dir/analyze.log"
  labelled+=("$label=$run_dir")
done

"$root/.venv/bin/python" scripts/plot_runs.py --output "$reports_root/$name" \
  --title "Balance comparison: $name" --command "$command_line" "${labelled[@]}"
echo "report: $reports_root/$name/report.md"
