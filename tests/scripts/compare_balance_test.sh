#!/usr/bin/env bash
# End to end: scripts/compare_balance.sh trains three tiny runs (micro, global, and micro then
# global by balance.schedule, a value with commas) for 2 seeds each on 2 ranks over a generated
# 3-domain corpus, analyzes them and writes the report with its pictures; the statistics over
# seeds are checked against values computed here from the per-seed analyses (synthetic reports,
# one seed: plot_runs_test.py).
# Usage: compare_balance_test.sh BUILD_DIR WORK_DIR
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=$1 work=$2
bash "$root/tests/scripts/make_tiny_corpus.sh" "$build" "$work"
GBMOE_BUILD_DIR=$build "$root/scripts/compare_balance.sh" --no-build --name tiny --seeds 2 \
  --runs "$work/runs" --reports "$work/reports" --val-batches 2 \
  --set data.dir="$work/corpus" --set train.log_every=100 \
  micro=configs/tiny.yaml,balance.scope=micro global=configs/tiny.yaml \
  "sched=configs/tiny.yaml,balance.scope=micro,balance.schedule=[{step: 3, scope: global},
    {step: 5, scope: group, group_size: 1}]"

report=$work/reports/tiny/report.md
fail() { echo "FAIL: $*" >&2; exit 1; }
for label in micro global; do
  grep -q "^| $label | " "$report" || fail "report lacks a row for $label"
  for seed in 1 2; do
    for f in analysis.json selection.csv layers.csv; do
      [ -s "$work/runs/tiny/$label/seed$seed/analysis/$f" ] ||
        fail "$label/seed$seed/analysis/$f missing"
    done
    grep -q "^  seed: $seed " "$work/runs/tiny/$label/seed$seed/config.yaml" ||
      fail "$label/seed$seed was not trained with train.seed=$seed"
  done
done
grep -q "^| micro | micro | 6 | " "$report" || fail "the micro row does not name its scope and step"
grep -q "^| sched | micro, global after step 3, group g=1 after step 5 | 6 | " "$report" ||
  fail "the schedule row does not name its changes"
scopes=$(grep -o '"balance_scope":"[a-z]*"' "$work/runs/tiny/sched/seed2/metrics.jsonl" |
  cut -d'"' -f4)
[ "$(echo $scopes)" = "micro micro micro global global group" ] || fail "scopes by step: $scopes"
# 2 MoE layers x 3 domains x 4 experts + header
[ "$(wc -l < "$work/runs/tiny/global/seed1/analysis/selection.csv")" -eq 25 ] ||
  fail "selection.csv rows"
# Mean, standard deviation and the paired 95% interval over the 2 seeds, from the analyses.
"$root/.venv/bin/python" - "$work" <<'PY'
import csv, json, math, sys
work = sys.argv[1]
def analysis(label, seed):
    with open(f"{work}/runs/tiny/{label}/seed{seed}/analysis/analysis.json") as f:
        return json.load(f)
with open(f"{work}/reports/tiny/stats.csv") as f:
    stats = {(r["run"], r["metric"]): r for r in csv.DictReader(f)}
report = open(f"{work}/reports/tiny/report.md").read()
t1 = 12.706204736  # t_{0.975} with 1 degree of freedom
for metric, get, digits in (("val_loss", lambda a: a["val_loss"], 4),
                            ("val_loss:numbers", lambda a: a["domain_val_loss"]["numbers"], 4),
                            ("mi", lambda a: a["mean"]["mutual_information"], 4),
                            ("val_maxvio", lambda a: a["mean"]["max_violation"], 3)):
    m = [get(analysis("micro", s)) for s in (1, 2)]
    g = [get(analysis("global", s)) for s in (1, 2)]
    mean, sd = (m[0] + m[1]) / 2, abs(m[0] - m[1]) / math.sqrt(2)
    row = stats[("micro", metric)]
    assert row["n"] == "2" and abs(float(row["mean"]) - mean) < 1e-9, (metric, row, m)
    assert abs(float(row["sd"]) - sd) < 1e-9, (metric, row, m)
    d = [g[0] - m[0], g[1] - m[1]]
    d_mean, d_sd = (d[0] + d[1]) / 2, abs(d[0] - d[1]) / math.sqrt(2)
    lo, hi = d_mean - t1 * d_sd / math.sqrt(2), d_mean + t1 * d_sd / math.sqrt(2)
    row = stats[("global", metric)]
    assert abs(float(row["diff_mean"]) - d_mean) < 1e-9, (metric, row, d)
    assert abs(float(row["diff_lo"]) - lo) < 1e-9 and abs(float(row["diff_hi"]) - hi) < 1e-9, row
    assert row["distinguishable"] == str(lo > 0 or hi < 0), (metric, row)
    text = f"{d_mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
    assert text in report, (metric, text)
    if metric == "val_loss":
        assert f"| micro | micro | 6 | {mean:.4f} ± {sd:.4f} |" in report, (mean, sd)
assert "Seeds (train.seed): 1, 2 (every run)" in report
assert "**global vs micro** (2 paired seeds): " in report
PY
"$root/.venv/bin/python" - "$work/reports/tiny" <<'PY'
import struct, sys
import numpy as np
from PIL import Image
sizes = {"loss.png": (1200, 450), "maxvio.png": (1200, 450), "compare.png": (1500, 450)}
sizes.update({f"heatmap_{label}.png": (860, 295) for label in ("micro", "global")})
for name, expected in sizes.items():
    with open(f"{sys.argv[1]}/{name}", "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", name
    got = struct.unpack(">II", head[16:24])
    assert got == expected, f"{name}: {got} != {expected}"
    with Image.open(f"{sys.argv[1]}/{name}") as image:  # drawn: many colours, not a blank page
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 20, name
    assert f"]({name})" in open(f"{sys.argv[1]}/report.md").read(), f"report lacks {name}"
PY
echo "compare_balance_test: ok"
