#!/usr/bin/env python3
"""Tests of scripts/plot_runs.py on synthetic runs: expert sorting, the report's tables, a
heatmap's size and content, statistics over seeds (t quantiles, mean and standard deviation,
paired 95% intervals and the verdicts in words, one seed without intervals), the scope column
of schedules and loss-free runs, and clear errors (compare_balance_test.sh checks every picture
and the statistics of a real report). Usage: plot_runs_test.py WORK_DIR"""
import csv
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


def write_run(run_dir, scope, freq_LME, val_loss, routing=False, seed=None, mi=0.5,
              config_extra="", method="aux_loss"):
    os.makedirs(os.path.join(run_dir, "analysis"))
    if seed is not None:  # the resolved config gbmoe-train writes (a few of its keys)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(f"balance:\n  scope: {scope}  # help\n{config_extra}"
                    f"train:\n  seed: {seed}  # help\n")
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
    analysis = {"step": 40, "balance": {"scope": scope, "group_size": 1, "method": method},
                "domains": DOMAINS,
                "num_experts": 4, "top_k": 2, "val_loss": val_loss,
                "domain_val_loss": {d: val_loss + i for i, d in enumerate(DOMAINS)},
                "layers": layers,
                "mean": {"mutual_information": mi, "normalized_mi": 0.375,
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


def read_stats(path):
    with open(path) as f:
        return {(row["run"], row["metric"]): row for row in csv.DictReader(f)}


def check_seeds(work):
    """Three seeds per run, given in another order for the second run: the statistics equal
    those computed here, the report marks and names the distinguishable differences."""
    uniform = np.full((3, 4), 0.5).tolist()
    micro = {1: (4.0, 0.10), 2: (4.1, 0.20), 3: (3.9, 0.15)}  # seed: (val loss, MI)
    glob = {3: (3.91, 0.33), 1: (3.95, 0.30), 2: (4.02, 0.35)}
    for label, runs in (("micro", micro), ("global", glob)):
        for seed, (loss, mi) in runs.items():
            write_run(f"{work}/{label}{seed}", label, [uniform], loss, seed=seed, mi=mi)
    specs = [f"micro={','.join(f'{work}/micro{s}' for s in micro)}",
             f"global={','.join(f'{work}/global{s}' for s in glob)}"]
    assert run_plot(f"{work}/out", *specs) is None
    stats = read_stats(f"{work}/out/stats.csv")
    t2 = 4.302652730  # t_{0.975} with 2 degrees of freedom, from a printed table
    for metric, column in (("val_loss", 0), ("mi", 1)):
        a = np.array([micro[s][column] for s in (1, 2, 3)])
        b = np.array([glob[s][column] for s in (1, 2, 3)])
        row = stats[("micro", metric)]
        assert abs(float(row["mean"]) - a.mean()) < 1e-12, row
        assert abs(float(row["sd"]) - a.std(ddof=1)) < 1e-12, row
        d = b - a
        half = t2 * d.std(ddof=1) / np.sqrt(3)
        row = stats[("global", metric)]
        assert row["seeds"] == "1 2 3" and row["diff_n"] == "3", row
        assert abs(float(row["diff_mean"]) - d.mean()) < 1e-12, row
        assert abs(float(row["diff_lo"]) - (d.mean() - half)) < 1e-9, row
        assert abs(float(row["diff_hi"]) - (d.mean() + half)) < 1e-9, row
    # val loss: -0.05, -0.08, +0.01 -> the interval holds 0; MI: +0.20, +0.15, +0.18 -> it does not.
    assert stats[("global", "val_loss")]["distinguishable"] == "False"
    assert stats[("global", "mi")]["distinguishable"] == "True"
    report = open(f"{work}/out/report.md").read()
    assert "global: selection frequency per layer (seed 1)" in report, report  # the lowest seed
    assert "| micro | micro | 40 | 4.0000 ± 0.1000 | 4.0000 ± 0.1000 |" in report, report
    assert "Seeds (train.seed): 1, 2, 3 (every run)" in report, report
    assert "| val loss | -0.0400 [-0.1538, +0.0738] |" in report, report
    assert "| MI (bits) | **+0.1767 [+0.1142, +0.2392]** |" in report, report
    assert ("**global vs micro** (3 paired seeds): distinguishable from zero: MI (bits) "
            "+0.1767 [+0.1142, +0.2392]. Not distinguishable: val loss, ") in report, report
    # One seed: differences without intervals, said so (tables only: the pictures are drawn above).
    runs = plot_runs.parse_runs([f"micro={work}/micro1", f"global={work}/global1"])
    report = plot_runs.report(runs, [], "T", "")
    assert "| val loss | -0.0500 [n/a] |" in report, report
    assert "(1 paired seed): no interval (it needs at least 2 seeds)" in report, report
    assert "One seed per run: standard deviations and intervals are not available" in report
    plot_runs.write_stats(runs, f"{work}/one.csv")
    assert read_stats(f"{work}/one.csv")[("global", "val_loss")]["diff_lo"] == ""
    # The scope column names loss-free balancing and schedules.
    write_run(f"{work}/sched", "micro", [uniform], 4.0, seed=1, config_extra=(
        "  schedule: [{step: 20, scope: group, group_size: 1, alpha: 0.02}]  # help\n"))
    write_run(f"{work}/free", "global", [uniform], 4.0, seed=1, method="loss_free")
    report = plot_runs.report(plot_runs.parse_runs([f"s={work}/sched", f"f={work}/free"]), [],
                              "T", "")
    assert "| s | micro, group g=1 alpha 0.02 after step 20 | 40 |" in report, report
    assert "| f | global (loss_free) | 40 |" in report, report
    # Two directories of one run with the same seed: an error naming the run.
    error = run_plot(f"{work}/bad", f"micro={work}/micro1,{work}/sched")
    assert error and "run micro: two directories hold the same train.seed" in error, error
    # t quantiles: the table, and the expansion beyond 30 degrees of freedom (printed tables).
    for df, q in ((1, 12.7062), (2, 4.3027), (10, 2.2281), (30, 2.0423), (40, 2.0211),
                  (60, 2.0003), (120, 1.9799)):
        assert abs(plot_runs.run_stats.t_quantile_975(df) - q) < 1e-4, (df, q)


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
    plot_runs.plot_heatmap(runs[2]["seeds"][0], 1.0, f"{work}/heatmap.png")
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
    check_seeds(f"{work}/seeds")
    print("plot_runs_test: ok")


if __name__ == "__main__":
    main()
