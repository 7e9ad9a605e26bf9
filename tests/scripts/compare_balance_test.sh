#!/usr/bin/env bash
# End to end: scripts/compare_balance.sh trains two tiny runs (micro, global) on 2 ranks over a
# generated 3-domain corpus, analyzes them and writes the report with its pictures (reports of
# more runs: plot_runs_test.py).
# Usage: compare_balance_test.sh BUILD_DIR WORK_DIR
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=$1 work=$2
rm -rf "$work"
for spec in "animals:cat dog horse lion mouse owl" "numbers:one two three seven ninety zero" \
            "code:int x = { } return ( )"; do
  domain=${spec%%:*} words=(${spec#*:})
  mkdir -p "$work/raw/$domain"
  for doc in 0 1 2 3 4; do
    for line in $(seq 60); do
      for w in 1 2 3 4 5 6 7 8; do
        printf '%s ' "${words[$(((doc * 7 + line * 5 + w * w) % ${#words[@]}))]}"
      done
      echo
    done > "$work/raw/$domain/doc$doc.txt"
  done
done
"$build/train/gbmoe-data" --input "$work/raw" --output "$work/corpus" --vocab-size 400 \
  --val-fraction 0.2 --threads 1 > /dev/null
GBMOE_BUILD_DIR=$build "$root/scripts/compare_balance.sh" --no-build --name tiny \
  --runs "$work/runs" --reports "$work/reports" --val-batches 2 \
  --set data.dir="$work/corpus" --set train.log_every=100 \
  micro=configs/tiny.yaml,balance.scope=micro global=configs/tiny.yaml

report=$work/reports/tiny/report.md
fail() { echo "FAIL: $*" >&2; exit 1; }
for label in micro global; do
  grep -q "^| $label | " "$report" || fail "report lacks a row for $label"
  for f in analysis.json selection.csv layers.csv; do
    [ -s "$work/runs/tiny/$label/analysis/$f" ] || fail "$label/analysis/$f missing"
  done
done
grep -q "^| micro | micro | 6 | " "$report" || fail "the micro row does not name its scope and step"
# 2 MoE layers x 3 domains x 4 experts + header
[ "$(wc -l < "$work/runs/tiny/global/analysis/selection.csv")" -eq 25 ] || fail "selection.csv rows"
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
