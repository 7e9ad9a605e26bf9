#!/usr/bin/env bash
# scripts/paper_report.sh end to end, cut down to seconds: one seed, 2 steps, most runs skipped
# (--skip), over a generated 3-domain corpus. Checks the coarse report (micro and the micro then
# global schedule), the fine one (32 experts) and the index with its token budget.
# Usage: paper_report_test.sh BUILD_DIR WORK_DIR
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=$1 work=$2
bash "$root/tests/scripts/make_tiny_corpus.sh" "$build" "$work"
GBMOE_BUILD_DIR=$build "$root/scripts/paper_report.sh" --no-build --seeds 1 --steps 2 \
  --runs "$work/runs" --reports "$work/reports" --val-batches 1 \
  --set data.dir="$work/corpus" --set data.seq_len=32 --set data.val_batches_per_domain=1 \
  --skip group1 --skip global --skip loss_free --skip quantile --skip shuffle --skip global_then_micro

fail() { echo "FAIL: $*" >&2; exit 1; }
reports=$work/reports/paper
grep -q "^| micro | micro | 2 | " "$reports/coarse/report.md" || fail "coarse: no micro row"
grep -q "^| micro_then_global | micro, global after step 1 | 2 | " "$reports/coarse/report.md" ||
  fail "coarse: no schedule row"
grep -q "^| micro | micro | 2 | " "$reports/fine/report.md" || fail "fine: no micro row"

grep -q "^  num_experts: 32 " "$work/runs/paper/fine/micro/seed1/config.yaml" ||
  fail "the fine runs do not use configs/fine.yaml"
grep -q "^  num_experts: 8 " "$work/runs/paper/coarse/micro/seed1/config.yaml" ||
  fail "the coarse runs do not use the coarse configs"
index=$reports/README.md
grep -q "2 steps x 2 ranks x 2 micro-batches x 4 sequences x 32 tokens = 1024 training tokens" \
  "$index" || fail "index: token budget"
grep -q "Left out: group1 global loss_free quantile shuffle global_then_micro." "$index" ||
  fail "index: the skipped runs"
grep -q "(coarse/report.md)" "$index" && grep -q "(fine/report.md)" "$index" || fail "index: links"
echo "paper_report_test: ok"
