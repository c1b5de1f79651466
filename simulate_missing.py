"""Seed sweeps and label removal: the paper's Fig. 4 (rates 0) and Fig. 5 (rates > 0).

Runs every (method, drop rate, seed[, gamma]) combination that has no finished run yet, so an
interrupted sweep resumes where it stopped, then prints mean ± std over seeds (the population
std, numpy's default) and writes the summary next to the runs. A drop rate removes that share
of the observed training labels (common.drop_labels: uniform, seeded apart from the training
seed unless --drop-seed seed, never touching validation or test).

    python simulate_missing.py --dataset synthetic --rates 0 0.1 0.2 0.4 0.8 --seeds 0 1 2 3 4 \\
        --methods b0 b1 label_enhance mean_teacher --jobs 2 --plot

A finished run is reused only when the settings it recorded equal the ones asked for (the
output folder, device, thread count and --fast aside); otherwise the sweep refuses, naming them.
--dry-run prints one command per pending run instead (for a Slurm array, GNU parallel or another
machine); run the same sweep afterwards to collect them. Options it does not know (--epochs 20,
--data-dir D, --lr 5e-4, --device cuda, ...) pass through to every method script; it refuses
the ones it sets itself.
"""
import argparse
import concurrent.futures
import csv
import hashlib
import importlib
import json
import os
import queue
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import common

METHODS = ("b0", "b1", "label_enhance", "mean_teacher", "le_mean_teacher")
GAMMA_METHODS = ("label_enhance", "le_mean_teacher")
SET_BY_SWEEP = ("--dataset", "--level", "--seed", "--drop-rate", "--drop-seed", "--gamma", "--out")
HERE = Path(__file__).resolve().parent


def plan(args, extra):
    """Every run of the sweep: dict(method, rate, seed, gamma, argv, folder, status, diff)."""
    runs = []
    for method in args.methods:
        module = importlib.import_module(method)
        for gamma in (args.gammas if args.gammas and method in GAMMA_METHODS else [None]):
            for rate in args.rates:
                for seed in args.seeds:
                    argv = ["--dataset", args.dataset, "--level", args.level, "--out", args.out, "--seed", str(seed),
                            "--drop-rate", f"{rate:g}"] + (["--gamma", f"{gamma:g}"] if gamma is not None else [])
                    if args.drop_seed == "seed" and rate > 0:
                        argv += ["--drop-seed", str(seed)]
                    run_args = module.get_args(argv + extra)       # exactly what the script will parse
                    folder = common.run_dir(run_args, method, module.TABLE_I)
                    done = folder / "metrics.json"
                    diff = common.config_diff(common.read_json(done).get("args", {}), vars(run_args)) if done.is_file() else ""
                    status = "pending" if not done.is_file() else ("stale" if diff else "finished")
                    runs.append(dict(method=method, rate=rate, seed=seed, gamma=gamma, argv=argv + extra,
                                     folder=folder, status=status, diff=diff))
    return runs


def launch(run, devices, threads):
    device = devices.get()     # one of the --jobs slots, each pinned to a device
    cmd = [sys.executable, str(HERE / f"{run['method']}.py"), *run["argv"], "--threads", str(threads)]
    cmd += ["--device", device] if device else []
    log = run["folder"].parent / "logs" / (run["folder"].name + ".log")
    t0 = time.time()
    try:
        with open(log, "w") as fh:
            rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=HERE,
                                 env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    finally:
        devices.put(device)
    print(f"{'done' if rc == 0 else f'FAILED ({rc})'}: {run['folder'].name}{f' on {device}' if device else ''} "
          f"in {time.time() - t0:.0f}s" + ("" if rc == 0 else f", see {log}"), flush=True)
    return rc


def mean_std(values):
    v = np.array([x for x in values if x is not None], float)
    return (float(v.mean()), float(v.std()), len(v)) if len(v) else (float("nan"), float("nan"), 0)


def summarize(args, runs):
    """Mean and population std over seeds of each metric, per method (and gamma) and rate; `values`
    keeps the headline metric of every seed."""
    headline = "auprc_macro_masked" if args.dataset == "sonyc" else "f1_macro"
    groups = {}
    for r in runs:
        if (r["folder"] / "metrics.json").is_file():
            m = common.read_json(r["folder"] / "metrics.json")
            groups.setdefault((r["method"], r["gamma"], r["rate"]), []).append(m)
    rows = []
    for (method, gamma, rate), ms in sorted(groups.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1] or -1, kv[0][2])):
        row = dict(method=method, gamma=gamma, rate=rate, seeds=len(ms), values=[m["test"].get(headline) for m in ms])
        for key in (headline, "f1_pos_macro", "f1_macro_full_truth", "f1_pos_macro_full_truth",
                    "dcase_fine_macro_auprc", "dcase_coarse_macro_auprc"):
            if key in ms[0]["test"]:
                row[key], row[key + "_std"], _ = mean_std(m["test"][key] for m in ms)
        for key in ("masked_precision", "masked_recall"):
            if key in ms[0].get("enhancement", {}):
                row[key], row[key + "_std"], _ = mean_std(m["enhancement"][key] for m in ms)
        for part in ("teacher", "stage1"):
            if part in ms[0]:
                row["teacher_epoch"], row["teacher_epoch_std"], _ = mean_std(m[part]["best_epoch"] for m in ms)
        row["seconds"] = float(np.mean([m["seconds"] for m in ms]))
        rows.append(row)
    return headline, rows


def label(method, gamma):
    return method + (f" (gamma {gamma:g})" if gamma is not None else "")


def markdown(rows, key, rates):
    names = sorted({(r["method"], r["gamma"]) for r in rows if key in r}, key=lambda k: (METHODS.index(k[0]), k[1] or -1))
    if not names:
        return ""
    cell = {(r["method"], r["gamma"], r["rate"]): r for r in rows}
    lines = [f"| {key} | " + " | ".join(f"drop {r:g}" for r in rates) + " |", "|---" * (len(rates) + 1) + "|"]
    for method, gamma in names:
        vals = []
        for rate in rates:
            r = cell.get((method, gamma, rate))
            vals.append(f"{r[key]:.3f} ± {r[key + '_std']:.3f} (n={r['seeds']})" if r and key in r else "–")
        lines.append(f"| {label(method, gamma)} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot(summary, out):
    """fig4.png: per method, the headline metric of every seed at the lowest drop rate (box plots);
    fig5.png: its mean ± std against the drop rate, one line per method. Returns what was plotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key, rows = summary["headline"], summary["rows"]
    first = min(r["rate"] for r in rows)
    fig4 = {label(r["method"], r["gamma"]): [v for v in r["values"] if v is not None] for r in rows if r["rate"] == first}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(fig4) + 2), 4))
    ax.boxplot(list(fig4.values()))
    for i, values in enumerate(fig4.values(), start=1):      # every seed as a dot, too
        ax.plot([i] * len(values), values, ".", color="gray", alpha=0.7)
    ax.set_xticks(range(1, len(fig4) + 1), list(fig4), rotation=20, ha="right")
    ax.set_ylabel(key)
    ax.set_title(f"{summary['dataset']}: {key} over seeds, drop rate {first:g} (paper Fig. 4)", fontsize=10)
    fig.tight_layout()
    fig.savefig(Path(out) / "fig4.png", dpi=120)
    plt.close(fig)
    fig5 = {}
    for r in rows:
        rates, means, stds = fig5.setdefault(label(r["method"], r["gamma"]), ([], [], []))
        rates.append(r["rate"]); means.append(r[key]); stds.append(r[key + "_std"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (rates, means, stds) in fig5.items():
        ax.errorbar(rates, means, yerr=stds, marker="o", capsize=3, label=name)
    ax.set_xlabel("share of observed training labels removed")
    ax.set_ylabel(f"{key} (mean ± std over seeds)")
    ax.set_title(f"{summary['dataset']}: robustness to missing labels (paper Fig. 5)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(out) / "fig5.png", dpi=120)
    plt.close(fig)
    return dict(fig4=fig4, fig5=fig5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=common.HelpFormatter,
                                     allow_abbrev=False, epilog="Passed through to every method script: any other "
                                     "option of theirs, e.g. --epochs, --lr, --data-dir, --dropout, --device, --fast, "
                                     "--teacher-selection. Set here, so refused as pass-through: " + " ".join(SET_BY_SWEEP))
    parser.add_argument("--dataset", type=common._dataset_arg, default="synthetic", help="as for the method scripts")
    parser.add_argument("--level", choices=("fine", "coarse"), default="fine", help="SONYC-UST label level")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS[:4]), help="method scripts to run")
    parser.add_argument("--rates", nargs="+", type=common.float_in(0, 1, hi_open=True), default=[0.0],
                        help="shares of the observed training labels to remove (paper: 0 0.1 0.2 0.4 0.8)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="training seeds")
    parser.add_argument("--gammas", nargs="+", type=common.float_in(0, 100), default=None,
                        help="gamma values to sweep for label_enhance and le_mean_teacher (default: Table I's only)")
    parser.add_argument("--drop-seed", choices=("fixed", "seed"), default="fixed",
                        help="which labels a drop rate removes: the same for every seed (fixed), or drawn with "
                             "each training seed (seed), as the paper's code did")
    parser.add_argument("--jobs", type=common.positive_int, default=1, help="runs at once")
    parser.add_argument("--devices", nargs="+", default=None,
                        help="devices to spread the runs over, e.g. cuda:0 cuda:1; each run is pinned to one "
                             "(default: each script's own choice)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print one command per pending run, run nothing; run the same sweep afterwards to collect")
    parser.add_argument("--plot", action="store_true", help="also write fig4.png and fig5.png (needs matplotlib)")
    parser.add_argument("--out", default="runs", help="folder for the runs and the summary files")
    args, extra = parser.parse_known_args()
    args.methods = list(dict.fromkeys(args.methods))     # each method once
    controlled = SET_BY_SWEEP + (("--device",) if args.devices else ())
    taken = [t + ("" if "=" in t or i + 1 == len(extra) or extra[i + 1].startswith("-") else f" {extra[i + 1]}")
             for i, t in enumerate(extra) if t.split("=")[0] in controlled]
    if taken:
        common.fail(f"{', '.join(taken)}: the sweep sets this itself (use --rates, --seeds, --gammas, --drop-seed, "
                    f"--devices, or run the method script directly)")

    runs = plan(args, extra)
    stale = [r for r in runs if r["status"] == "stale"]
    if stale:
        common.fail(f"{len(stale)} finished run(s) in {args.out} were made with other settings, first "
                    f"{stale[0]['folder'].name} ({stale[0]['diff']}); use another --out, or delete them to rerun")
    todo = [r for r in runs if r["status"] == "pending"]
    if args.dry_run:
        for r in todo:
            print(shlex.join(["python", f"{r['method']}.py", *r["argv"]]))
        return
    common.check_writable(args.out)
    Path(args.out, "logs").mkdir(parents=True, exist_ok=True)
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to do, {args.jobs} at a time", flush=True)
    devices = queue.Queue()
    for i in range(args.jobs):
        devices.put(args.devices[i % len(args.devices)] if args.devices else None)
    per_device = -(-args.jobs // len(args.devices)) if args.devices else args.jobs
    threads = max(1, (os.cpu_count() or 1) // per_device)
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        failed = sum(rc != 0 for rc in pool.map(lambda r: launch(r, devices, threads), todo))
    wall = time.time() - t0

    headline, rows = summarize(args, runs)
    keys = [headline, "f1_macro_full_truth", "masked_precision", "masked_recall", "teacher_epoch"]
    if args.dataset == "sonyc":
        keys += ["dcase_fine_macro_auprc" if args.level == "fine" else "dcase_coarse_macro_auprc"]
    for key in keys:
        table = markdown(rows, key, args.rates)
        if table:
            print("\n" + table)
    grid = dict(dataset=args.dataset, level=args.level, methods=args.methods, rates=args.rates, seeds=args.seeds,
                gammas=args.gammas, drop_seed=args.drop_seed, passed_through=extra)
    summary = dict(**grid, headline=headline, std="population (ddof 0)", wall_seconds=wall, failed=failed, rows=rows,
                   versions=common.versions())
    name = "summary-" + hashlib.sha256(json.dumps(grid, sort_keys=True).encode()).hexdigest()[:8]
    columns = sorted({k for r in rows for k in r if k != "values"}, key=lambda k: (k not in ("method", "gamma", "rate", "seeds"), k))

    def write_csv(p):
        with open(p, "w", newline="") as fh:
            w = csv.DictWriter(fh, columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    out = Path(args.out)
    for stem in (name, "summary"):   # this grid's own summary, and a copy as the latest one
        common._atomic(out / f"{stem}.json", lambda p: Path(p).write_text(json.dumps(common._jsonable(summary), indent=1)))
        common._atomic(out / f"{stem}.csv", write_csv)
    print(f"\nwrote {out}/{name}.csv and .json (also as summary.csv and .json, the latest) | sweep wall time {wall:.0f}s",
          flush=True)
    if failed:
        common.fail(f"{failed} run(s) failed; their logs are in {out / 'logs'}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            common.fail("--plot needs matplotlib, which is optional: pip install matplotlib "
                        "(the runs and the summary are written; rerun the same sweep to plot)")
        plot(common._jsonable(summary), out)
        print(f"wrote {out}/fig4.png and {out}/fig5.png", flush=True)


if __name__ == "__main__":
    common.main_guard(main)
