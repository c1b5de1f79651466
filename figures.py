"""A sweep's tables and figures, and a run's curves:
- the summary of a sweep (simulate_missing.py): per method, option values and drop rate, the mean and
  population std over seeds of every metric, as Markdown tables and as summary-<id>.csv / .json;
- the paper's Fig. 4 and Fig. 5 from that summary (simulate_missing.py --plot);
- the training curves of finished runs, from their metrics.json, without TensorBoard:

    python figures.py curves runs/synthetic__b1__seed0 runs/synthetic__mean_teacher__seed0 --out curves.png

Figures need matplotlib, which is optional; it is imported only where a figure is drawn.
"""

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

import common

PAPER_NAMES = dict(
    b0="B0", b1="B1", label_enhance="LE", mean_teacher="MT", le_mean_teacher="LE + MT", large_loss="LL", selective="CSL"
)


# The summary's metrics, each a mean and a std over seeds, and the tables printed at the end.
TABLE_KEYS = (
    "f1_macro",
    "auprc_macro_masked",
    "ap_macro_masked",
    "scored_present_share",
    "present_share_masked",
    "f1_macro_full_truth",
    "ap_macro_full_truth",
    "present_share_full_truth",
    "dcase_fine_macro_auprc",
    "dcase_coarse_macro_auprc",
    "masked_precision",
    "masked_recall",
    "best_epoch",
    "teacher_epoch",
    "prior_mean_abs_error",
)


def metric_of(m, key):
    """A summary's metric of one run: a test metric, or what a method records of its own stages."""
    if key == "best_epoch":
        return m["best_epoch"]
    if key in m["test"]:
        return m["test"][key]
    if key in m.get("enhancement", {}):
        return m["enhancement"][key]
    if key in m.get("selection", {}):
        return m["selection"][key]
    part = m.get("teacher", m.get("stage1"))
    return part["best_epoch"] if key == "teacher_epoch" and part else None


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        common.fail(f"cannot read {path}: {e}")


def summarize(runs):
    """Per (method, option values, rate): the seeds, the mean and population std of every metric, and
    `per_seed`, each scalar test metric of every seed (for the figures)."""
    groups = {}
    for r in runs:
        if (r["folder"] / "metrics.json").is_file():
            key = (r["method"], tuple(r["values"].items()), r["rate"])
            groups.setdefault(key, []).append(read_json(r["folder"] / "metrics.json"))
    rows = []
    for (method, values, rate), ms in groups.items():
        row = dict(method=method, **dict(values), rate=rate, seeds=len(ms))
        scalar = [k for k, v in ms[0]["test"].items() if isinstance(v, (int, float)) or v is None]
        row["per_seed"] = {
            k: [metric_of(m, k) for m in ms] for k in scalar + ["teacher_epoch"] if metric_of(ms[0], k) is not None
        }
        for key in TABLE_KEYS:
            v = np.array([metric_of(m, key) for m in ms if metric_of(m, key) is not None], float)
            if len(v):
                row[key], row[key + "_std"] = float(v.mean()), float(v.std())
                if key in ("teacher_epoch", "best_epoch"):
                    row[f"{key}_min"], row[f"{key}_max"] = int(v.min()), int(v.max())
        row["seconds"] = float(np.mean([m["seconds"] for m in ms]))
        rows.append(row)
    return rows


def markdown(rows, key, rates, vary):
    rows = [r for r in rows if key in r]
    if not rows:
        return ""
    cell = {(label(r, vary), r["rate"]): r for r in rows}
    lines = [f"| {key} | " + " | ".join(f"drop {r:g}" for r in rates) + " |", "|---" * (len(rates) + 1) + "|"]
    for name in dict.fromkeys(label(r, vary) for r in rows):
        vals = []
        for rate in rates:
            r = cell.get((name, rate))
            if r is None:
                vals.append("–")
            elif key in ("teacher_epoch", "best_epoch"):  # a count: its range over seeds
                vals.append(f"{r[key + '_min']}–{r[key + '_max']} (n={r['seeds']})")
            else:
                vals.append(f"{r[key]:.3f} ± {r[key + '_std']:.3f} (n={r['seeds']})")
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def write_summary(args, extra, rows, wall, failed):
    """Print the tables; write this grid's summary-<id>.csv/.json and the latest as summary.csv/.json.
    The id hashes the grid, with the dataset file by its resolved path: the same from any folder."""
    for key in [k for k in TABLE_KEYS if not k.startswith("present_share")]:
        table = markdown(rows, key, args.rates, args.vary)
        if table:
            print("\n" + table)
    shares = [
        f"{k} {rows[0][k]:.3f}" for k in ("present_share_masked", "present_share_full_truth") if rows and k in rows[0]
    ]
    if shares:  # what scored_present_share compares with: the test labels' own share of positives
        print(f"\ntest labels: {', '.join(shares)}")
    dataset = args.dataset if args.dataset in common.DATASETS else str(Path(args.dataset).resolve())
    grid = dict(dataset=dataset, level=args.level, methods=args.methods, rates=args.rates, seeds=args.seeds)
    grid.update(vary=args.vary, drop_seed=args.drop_seed, passed_through=extra)
    summary = dict(**grid, std="population (ddof 0)", wall_seconds=wall, failed=failed, rows=rows)
    summary["versions"] = common.versions()
    name = "summary-" + hashlib.sha256(json.dumps(grid, sort_keys=True).encode()).hexdigest()[:8]
    fixed = ["method", *args.vary, "rate", "seeds"]
    columns = fixed + sorted({k for r in rows for k in r} - set(fixed) - {"per_seed"})

    def write_csv(p):
        with open(p, "w", newline="") as fh:
            w = csv.DictWriter(fh, columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def write_json(p):
        Path(p).write_text(json.dumps(common.jsonable(summary), indent=1))

    out = Path(args.out)
    for stem in (name, "summary"):  # this grid's own summary, and a copy as the latest one
        common.write_atomic(out / f"{stem}.json", write_json)
        common.write_atomic(out / f"{stem}.csv", write_csv)
    ran = "" if wall is None else f" | sweep wall time {wall:.0f}s"
    print(f"\nwrote {out}/{name}.csv and .json (also as summary.csv and .json, the latest){ran}", flush=True)
    return summary, name


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


def plot_sweep(args, summary, name):
    """--plot: Fig. 4 and Fig. 5 of this sweep, and copies as the latest; without matplotlib, one line."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        common.fail(
            "--plot needs matplotlib, which is optional: pip install matplotlib "
            "(the runs and the summary are written; rerun the same sweep to plot)"
        )
    tag = name.removeprefix("summary") + (f"-{args.metric}" if args.metric else "")
    out = Path(args.out)
    for suffix in (tag, ""):  # this sweep's figures, and a copy as the latest ones
        plot(common.jsonable(summary), out, args.metric, suffix)
    print(f"wrote {out}/fig4{tag}.png and fig5{tag}.png (also as fig4.png and fig5.png, the latest)", flush=True)


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
            history = json.loads(path.read_text())["history"]
            if not isinstance(history, list) or not all(isinstance(e, dict) and "epoch" in e for e in history):
                raise ValueError("'history' is not a list of epochs")
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: cannot read the history in {path}: {common.show(str(e), 150)}", file=sys.stderr)
            sys.exit(2)
        runs[Path(folder).name] = history
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
