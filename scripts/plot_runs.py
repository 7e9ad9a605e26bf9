#!/usr/bin/env python3
"""Pictures and a markdown report comparing gbmoe runs (micro vs global balancing, or a sweep).

Each run is LABEL=RUN_DIR, where RUN_DIR holds gbmoe-train's metrics.jsonl and gbmoe-analyze's
analysis/analysis.json. Writes into --output: heatmap_<label>.png (per MoE layer: domains x
experts, selection frequency, experts sorted by the domain that uses them most), loss.png
(training and validation loss), maxvio.png (MaxVio of the global batch and of micro-batches),
compare.png (the runs side by side), routing.png (the bounded per-layer routing metrics: median
over MoE layers with the min-max band, for runs whose metrics.jsonl has them) and report.md.

Example: plot_runs.py --output reports/pair micro=runs/compare/micro global=runs/compare/global
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402  (comes with matplotlib)

DPI = 100
CURVE_SIZE = (12.0, 4.5)  # loss.png, maxvio.png: 1200 x 450 pixels
COMPARE_SIZE = (15.0, 4.5)  # compare.png: 1500 x 450 pixels
SMOOTH = 10  # steps in the moving average of training curves


def heatmap_size(layers, domains, experts):
    """Figure inches of a heatmap file: layers in a grid of at most 2 columns."""
    cols = min(layers, 2)
    rows = (layers + cols - 1) // cols
    return (cols * (0.55 * experts + 1.6) + 1.0, rows * (0.45 * domains + 1.2) + 0.4)


def fail(message):
    sys.exit("plot_runs.py: " + message)


def read_run(label, run_dir):
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    analysis_path = os.path.join(run_dir, "analysis", "analysis.json")
    for path, what in ((metrics_path, "gbmoe-train"), (analysis_path, "gbmoe-analyze")):
        if not os.path.isfile(path):
            fail(f"run {label}: {path} is missing (run {what} first)")
    train, evals = [], []
    with open(metrics_path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                (evals if "eval" in record else train).append(record)
    with open(analysis_path) as f:
        analysis = json.load(f)
    if not train:
        fail(f"run {label}: {metrics_path} has no training steps")
    return {"label": label, "dir": run_dir, "train": train, "evals": evals, "analysis": analysis}


def smooth(values, window=SMOOTH):
    values = np.asarray(values, dtype=float)
    if len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.cumsum(values[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def late_mean(run, key):
    """Mean over layers and over the last quarter of the steps of a per-layer training metric."""
    rows = [np.mean(r[key]) for r in run["train"] if r.get(key)]
    tail = rows[len(rows) - max(1, len(rows) // 4):]
    return float(np.mean(tail)) if tail else float("nan")


def expert_order(freq_ME):
    """Experts grouped by the domain that selects them most, strongest first within a domain."""
    top = freq_ME.argmax(axis=0)
    return sorted(range(freq_ME.shape[1]), key=lambda i: (top[i], -freq_ME[top[i], i]))


def save(fig, path):
    """Saves with a 256-colour palette: a third of the bytes, no visible change on these plots."""
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(256)
    small.save(path, optimize=True)
    return path


def plot_heatmap(run, vmax, path):
    a = run["analysis"]
    layers, domains, E = a["layers"], a["domains"], a["num_experts"]
    cols = min(len(layers), 2)
    rows = (len(layers) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=heatmap_size(len(layers), len(domains), E),
                             squeeze=False, layout="constrained")
    image = None
    for ax, layer in zip(axes.flat, layers):
        freq = np.asarray(layer["selection_frequency"], dtype=float)
        order = expert_order(freq)
        image = ax.imshow(freq[:, order], cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        for d in range(len(domains)):
            for j, i in enumerate(order):
                value = freq[d, i]
                ax.text(j, d, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if value > 0.6 * vmax else "white")
        ax.set_xticks(range(E), [str(i) for i in order], fontsize=9)
        ax.set_yticks(range(len(domains)), domains, fontsize=10)
        ax.set_xlabel("expert (sorted by the domain using it most)", fontsize=9)
        ax.set_title(f"block {layer['block']}: MI {layer['mutual_information']:.3f} bits "
                     f"({layer['normalized_mi']:.3f} of H)", fontsize=10)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    bar = fig.colorbar(image, ax=axes, shrink=0.9)
    bar.set_label("share of the domain's tokens whose top-k holds the expert", fontsize=9)
    scope = a["balance"]["scope"]
    fig.suptitle(f"{run['label']} ({scope} balancing): expert selection frequency, "
                 f"top-{a['top_k']} of {E}, step {a['step']}", fontsize=12)
    return save(fig, path)


def plot_losses(runs, path):
    fig, (left, right) = plt.subplots(1, 2, figsize=CURVE_SIZE, layout="constrained")
    for run in runs:
        steps = [r["step"] for r in run["train"]]
        left.plot(steps, smooth([r["ce"] for r in run["train"]]), label=run["label"])
        ev = run["evals"]
        right.plot([r["step"] for r in ev], [r["eval"]["val_loss"] for r in ev], marker="o",
                   markersize=3, label=run["label"])
    left.set_title(f"training cross-entropy ({SMOOTH}-step moving mean)")
    right.set_title("validation loss (all domains)")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend()
    return save(fig, path)


def plot_maxvio(runs, path):
    fig, axes = plt.subplots(1, 2, figsize=CURVE_SIZE, sharey=True, layout="constrained")
    titles = {"maxvio_global": "global batch", "maxvio_micro": "micro-batches (mean over them)"}
    for ax, key in zip(axes, titles):
        for run in runs:
            rows = [r for r in run["train"] if r.get(key)]
            ax.plot([r["step"] for r in rows], smooth([np.mean(r[key]) for r in rows]),
                    label=run["label"])
        ax.set_title(titles[key])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("(max load - mean) / mean")
    fig.suptitle(f"Training MaxVio, mean over MoE layers, {SMOOTH}-step moving mean")
    return save(fig, path)


ROUTING_METRICS = {"maxvio_global": "MaxVio, global batch", "maxvio_micro": "MaxVio, micro-batches",
                   "load_cv": "load coefficient of variation", "dead_experts": "dead experts",
                   "routing_entropy": "routing entropy (nats)",
                   "topk_score_sum": "top-k score sum"}
ROUTING_SIZE = (15.0, 7.5)  # routing.png: 1500 x 750 pixels


def has_routing_metrics(run):
    return any("across_layers" in r for r in run["train"])


def plot_routing(runs, path):
    """Per metric: the median over layers (smoothed) and the band from the min to the max."""
    fig, axes = plt.subplots(2, 3, figsize=ROUTING_SIZE, layout="constrained")
    for ax, (key, title) in zip(axes.flat, ROUTING_METRICS.items()):
        for run in runs:
            rows = [r for r in run["train"] if key in r.get("across_layers", {})]
            steps = [r["step"] for r in rows]
            spread = {s: smooth([r["across_layers"][key][s] for r in rows])
                      for s in ("min", "median", "max")}
            line, = ax.plot(steps, spread["median"], label=run["label"])
            ax.fill_between(steps, spread["min"], spread["max"], color=line.get_color(),
                            alpha=0.2, linewidth=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(f"Routing per MoE layer: median over layers, band from min to max, "
                 f"{SMOOTH}-step moving mean")
    return save(fig, path)


def grouped_bars(ax, groups, runs, values, ylabel):
    width = 0.8 / len(runs)
    x = np.arange(len(groups))
    for k, run in enumerate(runs):
        ax.bar(x + (k - (len(runs) - 1) / 2) * width, values[k], width, label=run["label"])
    ax.set_xticks(x, groups, fontsize=9)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def plot_compare(runs, path):
    fig, axes = plt.subplots(1, 3, figsize=COMPARE_SIZE, layout="constrained")
    base = runs[0]["analysis"]
    domains = base["domains"]
    loss = [[r["analysis"]["domain_val_loss"][d] - base["domain_val_loss"][d] for d in domains]
            for r in runs]
    grouped_bars(axes[0], domains, runs, loss, f"val loss - {runs[0]['label']}'s (nats)")
    axes[0].axhline(0, color="black", linewidth=0.8)
    axes[0].set_title("validation loss per domain, relative")
    blocks = [f"block {layer['block']}" for layer in base["layers"]]
    nmi = [[layer["normalized_mi"] for layer in r["analysis"]["layers"]] for r in runs]
    grouped_bars(axes[1], blocks, runs, nmi, "I(domain; expert) / H(domain)")
    axes[1].set_title("specialization: normalized mutual information")
    kinds = ["train global", "train micro", "val whole set", "val per domain"]
    mv = [[late_mean(r, "maxvio_global"), late_mean(r, "maxvio_micro"),
           r["analysis"]["mean"]["max_violation"], r["analysis"]["mean"]["domain_max_violation"]]
          for r in runs]
    grouped_bars(axes[2], kinds, runs, mv, "MaxVio, mean over layers")
    axes[2].set_title("load imbalance (train: last quarter of steps)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=len(runs))
    return save(fig, path)


def fmt(value, digits=4):
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def report(runs, images, title, command):
    domains = runs[0]["analysis"]["domains"]
    out = [f"# {title}", ""]
    if command:
        out += ["Made by:", "", "```sh", command, "```", ""]
    out += ["Validation figures come from `gbmoe-analyze` on each run's last checkpoint; training "
            "MaxVio is the mean over MoE layers and over the last quarter of the steps "
            "(`metrics.jsonl`).", "",
            "## Validation loss per domain (nats / token)", "",
            "| run | scope | step | all | " + " | ".join(domains) + " |",
            "|---|---|---|---|" + "---|" * len(domains)]
    for r in runs:
        a = r["analysis"]
        out.append(f"| {r['label']} | {scope_name(a)} | {a['step']} | {fmt(a['val_loss'])} | "
                   + " | ".join(fmt(a["domain_val_loss"][d]) for d in domains) + " |")
    out += ["", "## Specialization and balance (means over MoE layers)", "",
            "| run | MI (bits) | MI / H(domain) | top-k score sum | val MaxVio "
            "| val MaxVio per domain "
            "| train MaxVio global batch | train MaxVio micro-batch |",
            "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        m = r["analysis"]["mean"]
        out.append(f"| {r['label']} | {fmt(m['mutual_information'])} | {fmt(m['normalized_mi'])} | "
                   f"{fmt(m['mean_topk_score_sum'])} | {fmt(m['max_violation'], 3)} | "
                   f"{fmt(m['domain_max_violation'], 3)} | "
                   f"{fmt(late_mean(r, 'maxvio_global'), 3)} | "
                   f"{fmt(late_mean(r, 'maxvio_micro'), 3)} |")
    blocks = [layer["block"] for layer in runs[0]["analysis"]["layers"]]
    out += ["", "## Mutual information per layer (bits)", "",
            "| run | " + " | ".join(f"block {b}" for b in blocks) + " |",
            "|---|" + "---|" * len(blocks)]
    for r in runs:
        values = [fmt(layer["mutual_information"]) for layer in r["analysis"]["layers"]]
        out.append(f"| {r['label']} | " + " | ".join(values) + " |")
    out += ["", "## Pictures", ""]
    for caption, name in images:
        out += [f"**{caption}**", "", f"![{caption}]({name})", ""]
    return "\n".join(out)


def scope_name(analysis):
    b = analysis["balance"]
    return f"group g={b['group_size']}" if b["scope"] == "group" else b["scope"]


def parse_runs(specs):
    runs = []
    for spec in specs:
        label, sep, run_dir = spec.partition("=")
        if not sep or not label or not run_dir:
            fail(f"run '{spec}' must be LABEL=RUN_DIR")
        if any(r["label"] == label for r in runs):
            fail(f"run label '{label}' is given twice")
        runs.append(read_run(label, run_dir))
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="directory for the PNGs and report.md")
    parser.add_argument("--title", default="Balance comparison", help="report title")
    parser.add_argument("--command", default="",
                        help="the command that made the runs, for the report")
    parser.add_argument("runs", nargs="+",
                        help="LABEL=RUN_DIR, in table order (the first is the reference)")
    args = parser.parse_args()
    runs = parse_runs(args.runs)
    shapes = {(a["num_experts"], len(a["layers"]), tuple(a["domains"]))
              for a in (r["analysis"] for r in runs)}
    if len(shapes) > 1:
        fail(f"runs differ in experts, MoE layers or domains: {sorted(shapes)}")
    os.makedirs(args.output, exist_ok=True)
    # One colour scale for every run's heatmaps, so that they compare.
    vmax = max([1e-9] + [max(row) for r in runs for layer in r["analysis"]["layers"]
                         for row in layer["selection_frequency"]])
    images = []
    for r in runs:
        name = f"heatmap_{r['label']}.png"
        plot_heatmap(r, vmax, os.path.join(args.output, name))
        images.append((f"{r['label']}: selection frequency per layer", name))
    images.insert(0, ("Runs side by side", "compare.png"))
    plot_compare(runs, os.path.join(args.output, "compare.png"))
    plot_losses(runs, os.path.join(args.output, "loss.png"))
    images.append(("Loss curves", "loss.png"))
    plot_maxvio(runs, os.path.join(args.output, "maxvio.png"))
    images.append(("MaxVio curves", "maxvio.png"))
    with_routing = [r for r in runs if has_routing_metrics(r)]
    if with_routing:
        plot_routing(with_routing, os.path.join(args.output, "routing.png"))
        images.append(("Routing metrics per layer", "routing.png"))
    with open(os.path.join(args.output, "report.md"), "w") as f:
        f.write(report(runs, images, args.title, args.command) + "\n")
    print(f"plot_runs.py: wrote {args.output}/report.md and {len(images)} pictures")


if __name__ == "__main__":
    main()
