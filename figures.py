"""Figures: a sweep's Fig. 4 and Fig. 5 of the paper (simulate_missing.py --plot), and the training curves of
finished runs, drawn from their metrics.json without TensorBoard:

    python figures.py curves runs/synthetic__b1__seed0 runs/synthetic__mean_teacher__seed0 --out curves.png

Needs matplotlib, which is optional; imported only where a figure is drawn.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PAPER_NAMES = dict(
    b0="B0", b1="B1", label_enhance="LE", mean_teacher="MT", le_mean_teacher="LE + MT", large_loss="LL", selective="CSL"
)


# The axes say what a metric is in the paper's words; the key stays in small print.
METRIC_NAMES = dict(
    f1_macro="F1 (paper), observed test labels",
    f1_pos_macro="F1 of the positive class, observed test labels",
    auprc_macro_masked="AUPRC (paper), observed test labels",
    ap_macro_masked="average precision, observed test labels",
    f1_macro_full_truth="F1 (paper), every test label",
    ap_macro_full_truth="average precision, every test label",
    dcase_fine_macro_auprc="DCASE macro-AUPRC, fine",
    dcase_coarse_macro_auprc="DCASE macro-AUPRC, coarse",
    scored_present_share="share of entries scored >= 0.5",
)


def axis_label(key):
    return f"{METRIC_NAMES[key]}\n({key})" if key in METRIC_NAMES else key


def label(row, vary):
    extra = ", ".join(f"{k} {row[k]}" for k in vary if k in row)
    return PAPER_NAMES[row["method"]] + (f" ({extra})" if extra else "")


def plot(summary, out, metric=None, suffix=""):
    """Fig. 4: per method, `metric` of every seed at the lowest drop rate (a box without outlier markers,
    the seeds as jittered dots). Fig. 5: its mean ± std against the drop rate, one line per method, each
    method's points shifted a little so none hides another. Returns what was plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, vary = summary["rows"], summary["vary"]
    paper_f4 = "auprc_macro_masked" if summary["dataset"] == "sonyc" else "f1_macro"
    metrics = dict(fig4=metric or paper_f4, fig5=metric or "auprc_macro_masked")
    n_seeds = max(r["seeds"] for r in rows)
    setting = " ".join(summary["passed_through"]) or "every other option at its default"
    caption = f"{Path(summary['dataset']).name}, {n_seeds} seed(s); {setting}"
    plotted, rng = {}, np.random.default_rng(0)
    first = min(r["rate"] for r in rows)
    fig4 = {
        label(r, vary): [v for v in r["per_seed"].get(metrics["fig4"], []) if v is not None]
        for r in rows
        if r["rate"] == first
    }
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(fig4) + 2), 4.2))
    if n_seeds >= 5:  # a box says little about fewer seeds: then the seeds alone, as points
        ax.boxplot(list(fig4.values()), showfliers=False, widths=0.5)
    for i, values in enumerate(fig4.values(), start=1):
        ax.plot(i + rng.uniform(-0.12, 0.12, len(values)), values, "o", ms=4, color="k", alpha=0.6)
    ax.set_xticks(range(1, len(fig4) + 1), list(fig4), rotation=15, ha="right")
    ax.set_ylabel(axis_label(metrics["fig4"]), fontsize=9)
    ax.set_title(f"{metrics['fig4']} over seeds, drop rate {first:g} (paper Fig. 4)\n{caption}", fontsize=9)
    fig.tight_layout()
    plotted["fig4"] = fig4
    fig.savefig(Path(out) / f"fig4{suffix}.png", dpi=120)
    plt.close(fig)
    lines = {}
    for r in rows:
        values = [v for v in r["per_seed"].get(metrics["fig5"], []) if v is not None]
        if values:
            point = (r["rate"], float(np.mean(values)), float(np.std(values)), values)
            lines.setdefault(label(r, vary), []).append(point)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    spread = 0.012 * (max(summary["rates"]) - min(summary["rates"]) or 1)
    for i, (name, points) in enumerate(lines.items()):
        points.sort()
        dx = (i - (len(lines) - 1) / 2) * spread
        rates = [p[0] + dx for p in points]
        ax.errorbar(rates, [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3, label=name)
        for x, p in zip(rates, points):
            ax.plot([x] * len(p[3]), p[3], ".", color="gray", alpha=0.5, ms=3)
    ax.set_xlabel("share of observed training labels removed")
    ax.set_ylabel(axis_label(metrics["fig5"]) + ", mean ± std over seeds", fontsize=9)
    ax.set_title(f"{metrics['fig5']} against missing labels (paper Fig. 5)\n{caption}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plotted["fig5"] = {
        name: [[p[i] for p in pts] for i in range(3)]  # rates, means, stds
        for name, pts in lines.items()
    }
    fig.savefig(Path(out) / f"fig5{suffix}.png", dpi=120)
    plt.close(fig)
    return plotted


CURVES = ("train_loss", "val_loss", "lr")  # each run's history holds these every epoch (and a method's own)


def curves(folders, out):
    """The training loss, validation loss and learning rate of finished runs against the epoch, one panel
    each, every run a line (the last stage of a two-stage method). Returns the runs' names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for folder in folders:
        path = Path(folder) / "metrics.json"
        try:
            runs[Path(folder).name] = json.loads(path.read_text())["history"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: cannot read the history in {path}: {e}", file=sys.stderr)
            sys.exit(2)
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.6))
    for ax, key in zip(axes, CURVES):
        for name, history in runs.items():
            ax.plot([e["epoch"] for e in history], [e.get(key) for e in history], label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.set_yscale("log" if key == "lr" else "linear")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return list(runs)


def main():
    p = argparse.ArgumentParser(description="Draw finished runs' training curves from their metrics.json.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("curves", help="train and validation loss and learning rate against the epoch")
    c.add_argument("runs", nargs="+", type=Path, help="finished run folders (each holds metrics.json)")
    c.add_argument("--out", type=Path, default=Path("curves.png"), help="PNG to write (default: curves.png)")
    args = p.parse_args()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: figures need matplotlib, which is optional: pip install matplotlib", file=sys.stderr)
        sys.exit(2)
    names = curves(args.runs, args.out)
    print(f"wrote {args.out}: {len(names)} run(s)")


if __name__ == "__main__":
    main()
