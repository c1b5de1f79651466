"""The figures of a sweep (simulate_missing.py --plot): the paper's Fig. 4 and Fig. 5, from a summary.

Needs matplotlib, which is optional; imported only where a figure is drawn.
"""

from pathlib import Path

import numpy as np

PAPER_NAMES = dict(
    b0="B0", b1="B1", label_enhance="LE", mean_teacher="MT", le_mean_teacher="LE + MT", large_loss="LL", selective="CSL"
)


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
    ax.boxplot(list(fig4.values()), showfliers=False, widths=0.5)
    for i, values in enumerate(fig4.values(), start=1):
        ax.plot(i + rng.uniform(-0.12, 0.12, len(values)), values, "o", ms=4, color="k", alpha=0.6)
    ax.set_xticks(range(1, len(fig4) + 1), list(fig4), rotation=15, ha="right")
    ax.set_ylabel(metrics["fig4"])
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
    ax.set_ylabel(f"{metrics['fig5']} (mean ± std over seeds)")
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
