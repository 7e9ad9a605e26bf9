#!/usr/bin/env python3
"""Pictures and a markdown report comparing gbmoe runs (micro vs global balancing, or a sweep).

Each run is LABEL=RUN_DIR[,RUN_DIR...], one directory per seed, where RUN_DIR holds gbmoe-train's
config.yaml and metrics.jsonl and gbmoe-analyze's analysis/analysis.json. Every figure is the mean
over the run's seeds with its standard deviation; each run is compared with the first one seed by
seed (same train.seed paired): the mean difference and its 95% t-interval over seeds
(run_stats.py), and report.md says which differences are distinguishable from zero. Writes into
--output: heatmap_<label>.png (per MoE layer: domains x experts, selection frequency of the
run's first seed, experts sorted by the domain that uses them most), loss.png (training and
validation loss), maxvio.png (MaxVio of the global batch and of micro-batches), compare.png (the
runs side by side), routing.png (the bounded per-layer routing metrics: median over MoE layers
with the min-max band, for runs whose metrics.jsonl has them), report.md and stats.csv (every
metric's mean, standard deviation and paired difference, unrounded). Curves are means over
seeds with a band of +- one standard deviation, bars carry error bars.

Example: plot_runs.py --output reports/pair micro=runs/compare/micro global=runs/compare/global
         plot_runs.py --output reports/seeds micro=runs/s/micro/seed1,runs/s/micro/seed2 \
             global=runs/s/global/seed1,runs/s/global/seed2
"""
import argparse
import csv
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402  (PyYAML: scripts/setup.sh installs it with transformers)
from PIL import Image  # noqa: E402  (comes with matplotlib)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_stats  # noqa: E402

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
    """One seed of a run: its training metrics, evaluations, analysis and resolved config."""
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
    config = {}
    config_path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = yaml.safe_load(f) or {}
    return {"label": label, "dir": run_dir, "train": train, "evals": evals, "analysis": analysis,
            "seed": config.get("train", {}).get("seed"),
            "schedule": config.get("balance", {}).get("schedule") or []}


def read_group(label, dirs):
    """A run over seeds: LABEL's seed directories, keyed by train.seed (by position when a
    directory has no config.yaml), in the order of their seeds."""
    seeds = [read_run(label, d) for d in dirs]
    keys = [s["seed"] for s in seeds]
    if None in keys:
        keys = list(range(1, len(seeds) + 1))
    if len(set(keys)) != len(keys):
        fail(f"run {label}: two directories hold the same train.seed ({keys})")
    for key, s in zip(keys, seeds):
        s["seed"] = key
    seeds.sort(key=lambda s: s["seed"])
    return {"label": label, "seeds": seeds, "analysis": seeds[0]["analysis"]}


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


def metric_list(analysis):
    """(key, name, digits) of every metric the report gives, in table order."""
    out = [("val_loss", "val loss", 4)]
    out += [(f"val_loss:{d}", f"val loss {d}", 4) for d in analysis["domains"]]
    out += [("mi", "MI (bits)", 4), ("nmi", "MI / H(domain)", 4),
            ("topk", "top-k score sum", 4), ("val_maxvio", "val MaxVio", 3),
            ("val_maxvio_domain", "val MaxVio per domain", 3),
            ("train_maxvio_global", "train MaxVio global batch", 3),
            ("train_maxvio_micro", "train MaxVio micro-batch", 3)]
    out += [(f"mi:{layer['block']}", f"MI block {layer['block']} (bits)", 4)
            for layer in analysis["layers"]]
    return out


def metric_values(run):
    """{key: value} of one seed, for the keys of metric_list."""
    a = run["analysis"]
    m = a["mean"]
    out = {"val_loss": a["val_loss"], "mi": m["mutual_information"], "nmi": m["normalized_mi"],
           "topk": m["mean_topk_score_sum"], "val_maxvio": m["max_violation"],
           "val_maxvio_domain": m["domain_max_violation"],
           "train_maxvio_global": late_mean(run, "maxvio_global"),
           "train_maxvio_micro": late_mean(run, "maxvio_micro")}
    out.update({f"val_loss:{d}": v for d, v in a["domain_val_loss"].items()})
    for layer in a["layers"]:
        out[f"mi:{layer['block']}"] = layer["mutual_information"]
        out[f"nmi:{layer['block']}"] = layer["normalized_mi"]  # compare.png and stats.csv only
    return out


def add_statistics(groups):
    """Per run and metric: values by seed, their summary, and the paired difference against the
    first run (None for the first itself)."""
    keys = list(metric_values(groups[0]["seeds"][0]))
    for g in groups:
        per_seed = {s["seed"]: metric_values(s) for s in g["seeds"]}
        g["values"] = {k: {seed: v[k] for seed, v in per_seed.items()} for k in keys}
        g["stats"] = {k: run_stats.summary(list(g["values"][k].values())) for k in keys}
    for g in groups:
        g["diff"] = {k: None if g is groups[0] else
                     run_stats.paired(groups[0]["values"][k], g["values"][k]) for k in keys}


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


def plot_heatmap(run, vmax, path, seeds=1):
    """The selection frequencies of one seed (expert ids differ from seed to seed, so a mean
    over seeds would blur them)."""
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
    which = f", seed {run['seed']} of {seeds}" if seeds > 1 else ""
    fig.suptitle(f"{run['label']} ({scope_name(run)} balancing): expert selection frequency, "
                 f"top-{a['top_k']} of {E}, step {a['step']}{which}", fontsize=12)
    return save(fig, path)


def seed_curves(group, rows_of, value_of, smoothed):
    """The steps every seed has and the (seeds, steps) values there, each seed's smoothed first
    when asked."""
    per_seed = [{r["step"]: value_of(r) for r in rows_of(s)} for s in group["seeds"]]
    steps = sorted(set.intersection(*(set(p) for p in per_seed)))
    values = [[p[step] for step in steps] for p in per_seed]
    return steps, np.array([smooth(v) if smoothed else v for v in values], dtype=float)


def curve_with_band(ax, steps, values_SN, label, **style):
    """The mean over seeds, with a band of +- one standard deviation when there are several."""
    mean = values_SN.mean(axis=0)
    line, = ax.plot(steps, mean, label=label, **style)
    if len(values_SN) >= 2:
        sd = values_SN.std(axis=0, ddof=1)
        ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.2,
                        linewidth=0)
    return line


def seeds_note(groups):
    n = max(len(g["seeds"]) for g in groups)
    return f", mean over {n} seeds +- sd" if n > 1 else ""


def plot_losses(groups, path):
    fig, (left, right) = plt.subplots(1, 2, figsize=CURVE_SIZE, layout="constrained")
    for g in groups:
        steps, ce = seed_curves(g, lambda s: s["train"], lambda r: r["ce"], smoothed=True)
        curve_with_band(left, steps, ce, g["label"])
        steps, val = seed_curves(g, lambda s: s["evals"], lambda r: r["eval"]["val_loss"],
                                 smoothed=False)
        sd = val.std(axis=0, ddof=1) if len(val) >= 2 else None
        right.errorbar(steps, val.mean(axis=0), yerr=sd, marker="o", markersize=3, capsize=3,
                       label=g["label"])
    left.set_title(f"training cross-entropy ({SMOOTH}-step moving mean{seeds_note(groups)})")
    right.set_title(f"validation loss (all domains{seeds_note(groups)})")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend()
    return save(fig, path)


def plot_maxvio(groups, path):
    fig, axes = plt.subplots(1, 2, figsize=CURVE_SIZE, sharey=True, layout="constrained")
    titles = {"maxvio_global": "global batch", "maxvio_micro": "micro-batches (mean over them)"}
    for ax, key in zip(axes, titles):
        for g in groups:
            steps, values = seed_curves(g, lambda s: [r for r in s["train"] if r.get(key)],
                                        lambda r: np.mean(r[key]), smoothed=True)
            curve_with_band(ax, steps, values, g["label"])
        ax.set_title(titles[key])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("(max load - mean) / mean")
    fig.suptitle(f"Training MaxVio, mean over MoE layers, {SMOOTH}-step moving mean"
                 f"{seeds_note(groups)}")
    return save(fig, path)


ROUTING_METRICS = {"maxvio_global": "MaxVio, global batch", "maxvio_micro": "MaxVio, micro-batches",
                   "load_cv": "load coefficient of variation", "dead_experts": "dead experts",
                   "routing_entropy": "routing entropy (nats)",
                   "topk_score_sum": "top-k score sum"}
ROUTING_SIZE = (15.0, 7.5)  # routing.png: 1500 x 750 pixels


def has_routing_metrics(group):
    return all(any("across_layers" in r for r in s["train"]) for s in group["seeds"])


def plot_routing(groups, path):
    """Per metric: the median over layers (smoothed) and the band from the min to the max,
    each the mean over seeds."""
    fig, axes = plt.subplots(2, 3, figsize=ROUTING_SIZE, layout="constrained")
    for ax, (key, title) in zip(axes.flat, ROUTING_METRICS.items()):
        for g in groups:
            spread = {}
            for stat in ("min", "median", "max"):
                steps, values = seed_curves(
                    g, lambda s: [r for r in s["train"] if key in r.get("across_layers", {})],
                    lambda r: r["across_layers"][key][stat], smoothed=True)
                spread[stat] = values.mean(axis=0)
            line, = ax.plot(steps, spread["median"], label=g["label"])
            ax.fill_between(steps, spread["min"], spread["max"], color=line.get_color(),
                            alpha=0.2, linewidth=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(f"Routing per MoE layer: median over layers, band from min to max, "
                 f"{SMOOTH}-step moving mean{seeds_note(groups).replace(' +- sd', '')}")
    return save(fig, path)


def grouped_bars(ax, names, groups, values, errors, ylabel):
    """Bars per name and run; errors (same shape as values, None entries allowed) as error bars."""
    width = 0.8 / len(groups)
    x = np.arange(len(names))
    for k, g in enumerate(groups):
        yerr = None
        if errors is not None and any(e is not None for e in errors[k]):
            yerr = [0.0 if e is None else e for e in errors[k]]
        ax.bar(x + (k - (len(groups) - 1) / 2) * width, values[k], width, yerr=yerr, capsize=3,
               label=g["label"])
    ax.set_xticks(x, names, fontsize=9)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def half_width(diff):
    return None if diff is None or diff["hi"] is None else diff["hi"] - diff["mean"]


def plot_compare(groups, path):
    """Validation loss per domain relative to the first run (mean paired difference, error bars
    the 95% t-interval), normalized MI per block and MaxVio (means, error bars +- sd)."""
    fig, axes = plt.subplots(1, 3, figsize=COMPARE_SIZE, layout="constrained")
    base = groups[0]["analysis"]
    domains = base["domains"]
    keys = [f"val_loss:{d}" for d in domains]
    loss = [[0.0 if g["diff"][k] is None else g["diff"][k]["mean"] for k in keys] for g in groups]
    ci = [[half_width(g["diff"][k]) for k in keys] for g in groups]
    grouped_bars(axes[0], domains, groups, loss, ci, f"val loss - {groups[0]['label']}'s (nats)")
    axes[0].axhline(0, color="black", linewidth=0.8)
    paired = any(e is not None for row in ci for e in row)
    axes[0].set_title(f"validation loss per domain, relative"
                      + ("\n(mean paired difference over seeds, 95% interval)" if paired else ""),
                      fontsize=10)
    blocks = [layer["block"] for layer in base["layers"]]

    def mean_sd(keys):
        return ([[g["stats"][k]["mean"] for k in keys] for g in groups],
                [[g["stats"][k]["sd"] for k in keys] for g in groups])

    nmi, nmi_sd = mean_sd([f"nmi:{b}" for b in blocks])
    grouped_bars(axes[1], [f"block {b}" for b in blocks], groups, nmi, nmi_sd,
                 "I(domain; expert) / H(domain)")
    n = max(len(g["seeds"]) for g in groups)
    spread = f"\n(mean over {n} seeds +- sd)" if n > 1 else ""
    axes[1].set_title("specialization: normalized mutual information" + spread, fontsize=10)
    kinds = ["train global", "train micro", "val whole set", "val per domain"]
    mv, mv_sd = mean_sd(["train_maxvio_global", "train_maxvio_micro", "val_maxvio",
                         "val_maxvio_domain"])
    grouped_bars(axes[2], kinds, groups, mv, mv_sd, "MaxVio, mean over layers")
    axes[2].set_title("load imbalance (train: last quarter of steps)" + spread, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=len(groups))
    return save(fig, path)


def fmt(value, digits=4):
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def cell(stat, digits=4):
    """mean +- standard deviation over seeds; the plain value for one seed."""
    if stat["sd"] is None:
        return fmt(stat["mean"], digits)
    return f"{fmt(stat['mean'], digits)} ± {fmt(stat['sd'], digits)}"


def diff_text(diff, digits):
    """+0.0123 [-0.0010, +0.0256]: the mean paired difference and its 95% t-interval."""
    if diff["n"] == 0:
        return "n/a"
    text = f"{diff['mean']:+.{digits}f}"
    if diff["lo"] is None:
        return text + " [n/a]"
    return text + f" [{diff['lo']:+.{digits}f}, {diff['hi']:+.{digits}f}]"


def one_scope(scope, group_size):
    return f"group g={group_size}" if scope == "group" else scope


def scope_name(run):
    """The balancing of one seed: scope, method and balance.schedule changes."""
    b = run["analysis"]["balance"]
    name = one_scope(b["scope"], b.get("group_size", 0))
    if b.get("method", "aux_loss") != "aux_loss":
        name += f" ({b['method']})"
    for change in run.get("schedule", []):
        alpha = f" alpha {change['alpha']}" if "alpha" in change else ""
        name += (f", {one_scope(change['scope'], change.get('group_size', 0))}{alpha} "
                 f"after step {change['step']}")
    return name


def seeds_text(groups):
    seeds = {g["label"]: sorted(s["seed"] for s in g["seeds"]) for g in groups}
    counts = {len(v) for v in seeds.values()}
    if counts == {1}:
        return ("One seed per run: standard deviations and intervals are not available (they "
                "need at least 2 seeds); a difference of one seed cannot be told from seed noise.")
    listed = "; ".join(f"{label}: {', '.join(map(str, v))}" for label, v in seeds.items())
    if len({tuple(v) for v in seeds.values()}) == 1:
        listed = ", ".join(map(str, next(iter(seeds.values())))) + " (every run)"
    return (f"Seeds (train.seed): {listed}. Each cell is the mean over seeds ± the standard "
            "deviation over seeds.")


def difference_table(groups):
    """Rows: metrics; columns: each later run minus the first, paired by seed."""
    ref = groups[0]["label"]
    out = [f"## Differences against {ref} (paired by seed, 95% t-interval over seeds)", "",
           f"Each cell: the mean over seeds of (run - {ref}) on the same seed, and in brackets the "
           "95% t-interval of that mean (Student's t, n - 1 degrees of freedom). **Bold**: the "
           "interval excludes 0. Each interval is on its own: among many metrics and runs about "
           "1 in 20 intervals excludes 0 by chance alone, so one bold cell is weak evidence.", "",
           "| metric | " + " | ".join(f"{g['label']} - {ref}" for g in groups[1:]) + " |",
           "|---|" + "---|" * (len(groups) - 1)]
    for key, name, digits in metric_list(groups[0]["analysis"]):
        cells = []
        for g in groups[1:]:
            d = g["diff"][key]
            cells.append(f"**{diff_text(d, digits)}**" if d["distinguishable"]
                         else diff_text(d, digits))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def verdicts(groups):
    """In words: per later run, which differences from the first are distinguishable from 0."""
    ref = groups[0]["label"]
    out = [f"## Which differences from {ref} are distinguishable from zero", ""]
    metrics = metric_list(groups[0]["analysis"])
    for g in groups[1:]:
        diffs = [(name, digits, g["diff"][key]) for key, name, digits in metrics]
        n = max(d["n"] for _, _, d in diffs)
        head = f"- **{g['label']} vs {ref}** ({n} paired seed{'s' if n != 1 else ''})"
        if n < 2:
            out.append(head + ": no interval (it needs at least 2 seeds), so no difference can "
                       "be told from seed noise.")
            continue
        yes = [f"{name} {diff_text(d, digits)}" for name, digits, d in diffs
               if d["distinguishable"]]
        no = [name for name, _, d in diffs if not d["distinguishable"]]
        if not yes:
            out.append(head + f": no difference is distinguishable from zero (all {len(no)} "
                       "intervals hold 0).")
            continue
        out.append(head + ": distinguishable from zero: " + "; ".join(yes)
                   + (f". Not distinguishable: {', '.join(no)}." if no else "."))
    return out


def report(groups, images, title, command):
    domains = groups[0]["analysis"]["domains"]
    out = [f"# {title}", ""]
    if command:
        out += ["Made by:", "", "```sh", command, "```", ""]
    out += ["Validation figures come from `gbmoe-analyze` on each run's last checkpoint; training "
            "MaxVio is the mean over MoE layers and over the last quarter of the steps "
            "(`metrics.jsonl`). " + seeds_text(groups), "",
            "## Validation loss per domain (nats / token)", "",
            "| run | scope | step | all | " + " | ".join(domains) + " |",
            "|---|---|---|---|" + "---|" * len(domains)]
    for g in groups:
        st = g["stats"]
        out.append(f"| {g['label']} | {scope_name(g['seeds'][0])} | {g['analysis']['step']} | "
                   f"{cell(st['val_loss'])} | "
                   + " | ".join(cell(st[f"val_loss:{d}"]) for d in domains) + " |")
    out += ["", "## Specialization and balance (means over MoE layers)", "",
            "| run | MI (bits) | MI / H(domain) | top-k score sum | val MaxVio "
            "| val MaxVio per domain "
            "| train MaxVio global batch | train MaxVio micro-batch |",
            "|---|---|---|---|---|---|---|---|"]
    for g in groups:
        st = g["stats"]
        out.append(f"| {g['label']} | {cell(st['mi'])} | {cell(st['nmi'])} | {cell(st['topk'])} | "
                   f"{cell(st['val_maxvio'], 3)} | {cell(st['val_maxvio_domain'], 3)} | "
                   f"{cell(st['train_maxvio_global'], 3)} | {cell(st['train_maxvio_micro'], 3)} |")
    blocks = [layer["block"] for layer in groups[0]["analysis"]["layers"]]
    out += ["", "## Mutual information per layer (bits)", "",
            "| run | " + " | ".join(f"block {b}" for b in blocks) + " |",
            "|---|" + "---|" * len(blocks)]
    for g in groups:
        out.append(f"| {g['label']} | " + " | ".join(cell(g["stats"][f"mi:{b}"]) for b in blocks)
                   + " |")
    if len(groups) > 1:
        out += [""] + difference_table(groups) + [""] + verdicts(groups)
    out += ["", "## Pictures", ""]
    for caption, name in images:
        out += [f"**{caption}**", "", f"![{caption}]({name})", ""]
    return "\n".join(out)


def write_stats(groups, path):
    """Every metric of every run, unrounded: summary over seeds and paired difference."""
    columns = ["run", "metric", "seeds", "n", "mean", "sd", "diff_n", "diff_mean", "diff_sd",
               "diff_lo", "diff_hi", "distinguishable"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for g in groups:
            for key, st in g["stats"].items():
                d = g["diff"][key] or {}
                seeds = " ".join(str(s) for s in sorted(g["values"][key]))
                w.writerow([g["label"], key, seeds, st["n"], st["mean"], st["sd"], d.get("n"),
                            d.get("mean"), d.get("sd"), d.get("lo"), d.get("hi"),
                            d.get("distinguishable")])


def parse_runs(specs):
    """LABEL=DIR[,DIR...] each (one directory per seed) -> runs over seeds, in order."""
    groups = []
    for spec in specs:
        label, sep, dirs = spec.partition("=")
        if not sep or not label or not dirs or "" in dirs.split(","):
            fail(f"run '{spec}' must be LABEL=RUN_DIR[,RUN_DIR...]")
        if any(g["label"] == label for g in groups):
            fail(f"run label '{label}' is given twice")
        groups.append(read_group(label, dirs.split(",")))
    shapes = {(a["num_experts"], len(a["layers"]), tuple(a["domains"]))
              for a in (s["analysis"] for g in groups for s in g["seeds"])}
    if len(shapes) > 1:
        fail(f"runs differ in experts, MoE layers or domains: {sorted(shapes)}")
    add_statistics(groups)
    return groups


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="directory for the PNGs and report.md")
    parser.add_argument("--title", default="Balance comparison", help="report title")
    parser.add_argument("--command", default="",
                        help="the command that made the runs, for the report")
    parser.add_argument("runs", nargs="+",
                        help="LABEL=RUN_DIR[,RUN_DIR...] (one directory per seed), in table "
                             "order (the first is the reference)")
    args = parser.parse_args()
    groups = parse_runs(args.runs)
    os.makedirs(args.output, exist_ok=True)
    # One colour scale for every run's heatmaps, so that they compare.
    vmax = max([1e-9] + [max(row) for g in groups for layer in g["analysis"]["layers"]
                         for row in layer["selection_frequency"]])
    images = []
    for g in groups:
        name = f"heatmap_{g['label']}.png"
        plot_heatmap(g["seeds"][0], vmax, os.path.join(args.output, name), len(g["seeds"]))
        which = f" (seed {g['seeds'][0]['seed']})" if len(g["seeds"]) > 1 else ""
        images.append((f"{g['label']}: selection frequency per layer{which}", name))
    images.insert(0, ("Runs side by side", "compare.png"))
    plot_compare(groups, os.path.join(args.output, "compare.png"))
    plot_losses(groups, os.path.join(args.output, "loss.png"))
    images.append(("Loss curves", "loss.png"))
    plot_maxvio(groups, os.path.join(args.output, "maxvio.png"))
    images.append(("MaxVio curves", "maxvio.png"))
    with_routing = [g for g in groups if has_routing_metrics(g)]
    if with_routing:
        plot_routing(with_routing, os.path.join(args.output, "routing.png"))
        images.append(("Routing metrics per layer", "routing.png"))
    with open(os.path.join(args.output, "report.md"), "w") as f:
        f.write(report(groups, images, args.title, args.command) + "\n")
    write_stats(groups, os.path.join(args.output, "stats.csv"))
    print(f"plot_runs.py: wrote {args.output}/report.md, stats.csv and {len(images)} pictures")


if __name__ == "__main__":
    main()
