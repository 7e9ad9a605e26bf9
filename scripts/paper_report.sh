#!/usr/bin/env bash
# Issue 18's report in one command: micro vs group (g=1) vs global vs loss-free vs quantile
# balancing, on the coarse configuration (configs/micro.yaml / global.yaml: 8 experts, top-2) and
# the fine-grained one (configs/fine.yaml: 32 experts, top-7, 1 shared expert; same active
# parameters per token and token budget), every run repeated per seed, plus two balance
# schedules on the coarse one (micro then global, global then micro, switching halfway).
# Writes REPORTS/paper/{coarse,fine}/report.md (means and standard deviations over seeds, each
# run's paired difference against micro with a 95% t-interval, heatmaps, curves) and
# REPORTS/paper/README.md (what ran, the token budget, how long it took).
#
# Usage: scripts/paper_report.sh [options]
#   --seeds N        seeds 1..N of every run (default 3)
#   --steps S        optimizer steps of every run (default 400); the schedules switch after S/2
#   --skip LABEL     leave out the runs labelled LABEL (repeatable): micro group1 global
#                    loss_free quantile shuffle micro_then_global global_then_micro
#   --set K=V        a setting for every run (repeatable)
#   --val-batches N, --fresh, --no-build, --runs DIR, --reports DIR: as compare_balance.sh
# Run labels and settings (loss-free and quantile balance the global batch's counts):
#   micro=CONFIG,balance.scope=micro   group1=...,balance.scope=group,balance.group_size=1
#   global   loss_free=...,balance.method=loss_free   quantile=...,balance.method=quantile
#   shuffle=...,balance.scope=shuffle (coarse only: the Shuffle ablation, paper Table 2)
#   micro_then_global=micro,balance.schedule=[{step: S/2, scope: global}], global_then_micro
# Example: scripts/paper_report.sh                                  # the whole report
#          scripts/paper_report.sh --steps 20 --skip quantile --runs /tmp/r --reports /tmp/r
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${GBMOE_BUILD_DIR:-$root/build}
source "$root/scripts/quote_args.sh"
command_line=$(quote_args scripts/paper_report.sh "$@")
seeds=3 steps=400 runs_root=runs reports_root=reports
skips=() pass=() sets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) seeds=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --skip) skips+=("$2"); shift 2 ;;
    --set) sets+=(--set "$2"); shift 2 ;;
    --val-batches) pass+=(--val-batches "$2"); shift 2 ;;
    --fresh | --no-build) pass+=("$1"); shift ;;
    --runs) runs_root=$2; shift 2 ;;
    --reports) reports_root=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "paper_report.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$steps" =~ ^[0-9]+$ ]] && [ "$steps" -ge 2 ] ||
  { echo "paper_report.sh: --steps ($steps) must be an integer >= 2" >&2; exit 2; }
half=$((steps / 2))

# LABEL=CONFIG[,settings] of each configuration; the first (micro) is the reference.
runs_of() {
  local micro=$1 global=$2
  echo "micro=$micro,balance.scope=micro"
  echo "group1=$global,balance.scope=group,balance.group_size=1"
  echo "global=$global,balance.scope=global"
  echo "loss_free=$global,balance.scope=global,balance.method=loss_free"
  echo "quantile=$global,balance.scope=global,balance.method=quantile"
}
kept() {  # the run specs on stdin whose label is not skipped
  local spec skip
  while IFS= read -r spec; do
    for skip in ${skips[@]+"${skips[@]}"}; do [ "${spec%%=*}" = "$skip" ] && continue 2; done
    echo "$spec"
  done
}
mapfile -t coarse < <({
  runs_of configs/micro.yaml configs/global.yaml
  echo "shuffle=configs/global.yaml,balance.scope=shuffle"
  echo "micro_then_global=configs/micro.yaml,balance.schedule=[{step: $half, scope: global}]"
  echo "global_then_micro=configs/global.yaml,balance.schedule=[{step: $half, scope: micro}]"
} | kept)
mapfile -t fine < <(runs_of configs/fine.yaml configs/fine.yaml | kept)

cd "$root"
common=(--seeds "$seeds" --runs "$runs_root" --reports "$reports_root" --set train.steps="$steps"
  --set train.eval_every=50 ${sets[@]+"${sets[@]}"} ${pass[@]+"${pass[@]}"})
t0=$SECONDS
scripts/compare_balance.sh "${common[@]}" --name paper/coarse "${coarse[@]}"
scripts/compare_balance.sh "${common[@]}" --no-build --name paper/fine "${fine[@]}"
took=$((SECONDS - t0))

# The token budget of one run, from the resolved config (every run has the same).
setting() {
  "$build/train/gbmoe-train" --config configs/global.yaml --set train.steps="$steps" \
    ${sets[@]+"${sets[@]}"} --print-config | awk -v key="$1" '$1 == key ":" { print $2 }'
}
ranks=2 accum=$(setting grad_accum) batch=$(setting micro_batch_size) seq=$(setting seq_len)
budget="$steps steps x $ranks ranks x $accum micro-batches x $batch sequences x $seq tokens"
cat > "$reports_root/paper/README.md" <<EOF
# Balancing methods over seeds: coarse and fine-grained experts

Made by \`$command_line\` on $(date -u +%Y-%m-%d) ($(nproc --all) cores); training, analysis and
reports took $((took / 60)) min $((took % 60)) s.

Token budget of every run: $budget = $((steps * ranks * accum * batch * seq)) training tokens.

Seeds (train.seed): $(seq -s ', ' 1 "$seeds"), every run. Every difference is against micro,
seed by seed, with a 95% t-interval over the seeds.

- [Coarse: 8 experts, top-2](coarse/report.md) (configs/micro.yaml, configs/global.yaml):
  ${coarse[*]%%=*}
- [Fine-grained: 32 experts, top-7, 1 shared expert](fine/report.md) (configs/fine.yaml):
  ${fine[*]%%=*}

Loss-free and quantile balancing count the global batch (balance.scope global); shuffle is the
global LBL over a random micro-batch-sized subset of each step's global batch; the schedules
switch after step $half. ${skips[0]:+Left out: ${skips[*]}.}
EOF
echo "paper report: $reports_root/paper/README.md ($took s)"
