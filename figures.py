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
from pathlib import Path

import numpy as np

import common

PAPER_NAMES = dict(
    b0="B0",
    b1="B1",
    label_enhance="LE",
    mean_teacher="MT",
    le_mean_teacher="LE + MT",
    large_loss="LL",
    selective="CSL",
    em="EM",
    gr_loss="GR",
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
    "map",
    "mean_auc",
    "d_prime",
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
    part = m.get("stage1")
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
    grid.update(vary=args.vary, drop_per_seed=args.drop_per_seed, passed_through=extra)
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
    map="mAP, AudioSet's eval (unlisted labels absent)",
    mean_auc="mean ROC AUC, AudioSet's eval",
    d_prime="d', AudioSet's eval",
    scored_present_share="share of entries scored >= 0.5",
)


def axis_label(key):
    return f"{METRIC_NAMES[key]}\n({key})" if key in METRIC_NAMES else key


def label(row, vary):
    extra = ", ".join(f"{k} {row[k]}" for k in vary if k in row)
    return PAPER_NAMES[row["method"]] + (f" ({extra})" if extra else "")


def pyplot(hint=""):
    """matplotlib's pyplot on a file backend; without matplotlib (optional), one line, with `hint`."""
    try:
        import matplotlib
    except ImportError:
        common.fail(f"figures need matplotlib, which is optional: pip install matplotlib {hint}".rstrip())
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path, dpi=120):
    """A figure written atomically, as every result is; an unwritable path is one line."""
    try:
        common.write_atomic(Path(path), lambda p: fig.savefig(p, dpi=dpi, format="png"))
    except OSError as e:
        common.fail(f"cannot write {path}: {e.strerror or e}")


def paper_metrics(summary, metric=None):
    """The metric of each figure: `metric`, else the paper's (Fig. 4 F1, on SONYC-UST AUPRC; Fig. 5 AUPRC), and
    on AudioSet its own mAP in both."""
    if summary["dataset"] == "audioset":
        return dict(fig4=metric or "map", fig5=metric or "map")
    paper_f4 = "auprc_macro_masked" if summary["dataset"] == "sonyc" else "f1_macro"
    return dict(fig4=metric or paper_f4, fig5=metric or "auprc_macro_masked")


def caption(summary):
    n_seeds = max(r["seeds"] for r in summary["rows"])
    setting = " ".join(summary["passed_through"]) or "every other option at its default"
    return f"{Path(summary['dataset']).name}, {n_seeds} seed(s); {setting}"


def fig4(summary, path, metric):
    """The paper's Fig. 4: per method, `metric` of every seed at the lowest drop rate (a box without outlier
    markers when there are 5 seeds or more, the seeds as jittered dots). Returns {method: values}."""
    plt = pyplot()
    rows, vary = summary["rows"], summary["vary"]
    first = min(r["rate"] for r in rows)
    plotted = {
        label(r, vary): [v for v in r["per_seed"].get(metric, []) if v is not None] for r in rows if r["rate"] == first
    }
    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(plotted) + 2), 4.2))
    if max(r["seeds"] for r in rows) >= 5:  # a box says little about fewer seeds: then the seeds alone, as points
        ax.boxplot(list(plotted.values()), showfliers=False, widths=0.5)
    for i, values in enumerate(plotted.values(), start=1):
        ax.plot(i + rng.uniform(-0.12, 0.12, len(values)), values, "o", ms=4, color="k", alpha=0.6)
    ax.set_xticks(range(1, len(plotted) + 1), list(plotted), rotation=15, ha="right")
    ax.set_ylabel(axis_label(metric), fontsize=9)
    ax.set_title(f"{metric} over seeds, drop rate {first:g} (paper Fig. 4)\n{caption(summary)}", fontsize=9)
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)
    return plotted


def fig5(summary, path, metric):
    """The paper's Fig. 5: `metric`'s mean ± std over seeds against the drop rate, one line per method, each
    method's points shifted a little so none hides another, the seeds as grey dots. Returns {method: [rates,
    means, stds]}."""
    plt = pyplot()
    lines = {}
    for r in summary["rows"]:
        values = [v for v in r["per_seed"].get(metric, []) if v is not None]
        if values:
            point = (r["rate"], float(np.mean(values)), float(np.std(values)), values)
            lines.setdefault(label(r, summary["vary"]), []).append(point)
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
    ax.set_ylabel(axis_label(metric) + ", mean ± std over seeds", fontsize=9)
    ax.set_title(f"{metric} against missing labels (paper Fig. 5)\n{caption(summary)}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)
    return {name: [[p[i] for p in points] for i in range(3)] for name, points in lines.items()}


def plot_sweep(args, summary, name):
    """--plot: Fig. 4 and Fig. 5 of this sweep, and copies as the latest; without matplotlib, one line."""
    pyplot("(the runs and the summary are written; rerun the same sweep to plot)")
    summary = common.jsonable(summary)
    tag = name.removeprefix("summary") + (f"-{args.metric}" if args.metric else "")
    out, metrics = Path(args.out), paper_metrics(summary, args.metric)
    for suffix in (tag, ""):  # this sweep's figures, and a copy as the latest ones
        fig4(summary, out / f"fig4{suffix}.png", metrics["fig4"])
        fig5(summary, out / f"fig5{suffix}.png", metrics["fig5"])
    print(f"wrote {out}/fig4{tag}.png and fig5{tag}.png (also as fig4.png and fig5.png, the latest)", flush=True)


CURVES = ("train_loss", "val_loss", "lr")  # each run's history holds these every epoch (and a method's own)


def read_history(folder):
    """A finished run's per-epoch history from its metrics.json; anything else is one line."""
    path = Path(folder) / "metrics.json"
    try:
        history = json.loads(path.read_text())["history"]
        if not isinstance(history, list) or not all(isinstance(e, dict) and "epoch" in e for e in history):
            raise ValueError("'history' is not a list of epochs")
    except (OSError, ValueError, KeyError, TypeError) as e:
        common.fail(f"cannot read the history in {path}: {common.show(str(e), 150)}")
    return history


def curves(folders, path):
    """The training loss, validation loss and learning rate of finished runs against the epoch, one panel
    each, every run a line (the last stage of a two-stage method). Returns the runs' names."""
    runs = {Path(folder).name: read_history(folder) for folder in folders}  # every file read before drawing
    plt = pyplot()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.6))
    for ax, key in zip(axes, CURVES):
        for name, history in runs.items():
            ax.plot([e["epoch"] for e in history], [e.get(key) for e in history], label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.set_yscale("log" if key == "lr" else "linear")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save(fig, path, dpi=110)
    plt.close(fig)
    return list(runs)


def main():
    p = argparse.ArgumentParser(description="Draw finished runs' training curves from their metrics.json.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("curves", help="train and validation loss and learning rate against the epoch")
    c.add_argument("runs", nargs="+", type=Path, help="finished run folders (each holds metrics.json)")
    c.add_argument("--out", type=Path, default=Path("curves.png"), help="PNG to write (default: curves.png)")
    args = p.parse_args()
    names = curves(args.runs, args.out)
    print(f"wrote {args.out}: {len(names)} run(s)")


if __name__ == "__main__":
    common.main_guard(main)
