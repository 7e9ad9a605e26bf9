#!/usr/bin/env python3
"""Tests of scripts/plot_runs.py on synthetic runs: expert sorting, the report's tables, a
heatmap's size and content, and clear errors (compare_balance_test.sh checks every picture of a
real report). Usage: plot_runs_test.py WORK_DIR"""
import json
import os
import shutil
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import plot_runs  # noqa: E402

DOMAINS = ["code", "math", "prose"]


def write_run(run_dir, scope, freq_LME, val_loss, routing=False):
    os.makedirs(os.path.join(run_dir, "analysis"))
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step in range(1, 41):
            record = {"step": step, "ce": 5 - step / 20, "maxvio_global": [0.2, 0.4],
                      "maxvio_micro": [0.5, 0.7]}
            if routing:  # the bounded per-layer metrics of newer runs
                record["across_layers"] = {
                    key: {"min": 0.1 * step, "median": 0.2 * step, "max": 0.3 * step}
                    for key in plot_runs.ROUTING_METRICS}
            f.write(json.dumps(record) + "\n")
            if step % 20 == 0:
                evaluation = {"val_loss": val_loss + 1 / step}
                f.write(json.dumps({"step": step, "eval": evaluation}) + "\n")
    layers = [{"block": b, "mutual_information": 0.5, "normalized_mi": 0.25 * (b + 1),
               "mean_topk_score_sum": 0.6, "max_violation": 0.1, "selection_frequency": f}
              for b, f in enumerate(freq_LME)]
    analysis = {"step": 40, "balance": {"scope": scope, "group_size": 1}, "domains": DOMAINS,
                "num_experts": 4, "top_k": 2, "val_loss": val_loss,
                "domain_val_loss": {d: val_loss + i for i, d in enumerate(DOMAINS)},
                "layers": layers,
                "mean": {"mutual_information": 0.5, "normalized_mi": 0.375,
                         "mean_topk_score_sum": 0.6, "max_violation": 0.1,
                         "domain_max_violation": 0.9}}
    with open(os.path.join(run_dir, "analysis", "analysis.json"), "w") as f:
        json.dump(analysis, f)


def run_plot(out, *runs):
    """plot_runs.py's main in this process; returns its error message, or None on success."""
    sys.argv = ["plot_runs.py", "--output", out, *runs]
    try:
        plot_runs.main()
    except SystemExit as e:
        return str(e.code)
    return None


def main():
    work = sys.argv[1]
    shutil.rmtree(work, ignore_errors=True)
    # Experts sorted by the domain using them most: a permuted separated routing becomes blocks.
    freq = np.array([[0.0, 1.0, 0.0, 1.0], [0.9, 0.0, 0.2, 0.0], [0.1, 0.0, 0.8, 0.0]])
    assert plot_runs.expert_order(freq) == [1, 3, 0, 2], plot_runs.expert_order(freq)
    separated = freq.tolist()
    uniform = np.full((3, 4), 0.5).tolist()
    write_run(f"{work}/a", "micro", [uniform, uniform], 4.0)
    write_run(f"{work}/b", "group", [separated, uniform], 3.5)
    write_run(f"{work}/c", "global", [separated, separated], 3.0, routing=True)
    runs = plot_runs.parse_runs([f"a={work}/a", f"b={work}/b", f"c={work}/c"])
    report = plot_runs.report(runs, [("Loss curves", "loss.png")], "T", "cmd")
    assert "| b | group g=1 | 40 | 3.5000 | 3.5000 | 4.5000 | 5.5000 |" in report, report
    # Training MaxVio: mean over layers (0.3, 0.6) of the last quarter of the steps.
    assert "| c | 0.5000 | 0.3750 | 0.6000 | 0.100 | 0.900 | 0.300 | 0.600 |" in report, report
    assert "![Loss curves](loss.png)" in report and "```sh\ncmd\n```" in report
    # Pictures: exact size, and drawn (many colours: the heatmap's scale, lines, text).
    plot_runs.plot_heatmap(runs[2], 1.0, f"{work}/heatmap.png")
    with Image.open(f"{work}/heatmap.png") as image:
        assert image.size == (860, 295), image.size
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 20
    # Routing metrics: drawn for the runs that have them, listed in the report.
    assert not plot_runs.has_routing_metrics(runs[0]) and plot_runs.has_routing_metrics(runs[2])
    assert run_plot(f"{work}/out1", f"a={work}/a", f"c={work}/c") is None
    with Image.open(f"{work}/out1/routing.png") as image:
        assert image.size == (1500, 750), image.size
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 20
    assert "](routing.png)" in open(f"{work}/out1/report.md").read()
    assert run_plot(f"{work}/out3", f"a={work}/a") is None
    assert not os.path.exists(f"{work}/out3/routing.png")
    # Clear errors: a run without analysis, a malformed spec.
    os.remove(f"{work}/b/analysis/analysis.json")
    error = run_plot(f"{work}/out2", f"a={work}/a", f"b={work}/b")
    assert error and "run b:" in error and "gbmoe-analyze" in error, error
    error = run_plot(f"{work}/out2", f"{work}/a")
    assert error and "must be LABEL=RUN_DIR" in error, error
    print("plot_runs_test: ok")


if __name__ == "__main__":
    main()
