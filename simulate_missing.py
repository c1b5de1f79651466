"""Seed sweeps and label removal: the paper's Fig. 4 (rates 0) and Fig. 5 (rates > 0) as tables.

Runs every (method, drop rate, seed[, gamma]) combination that has no finished metrics.json
yet, so an interrupted sweep resumes where it stopped, then prints mean +- std over seeds and
writes summary.csv and summary.json next to the runs. A drop rate removes that share of the
observed training labels (common.drop_labels: uniform, seeded apart from the training seed,
never touching validation or test).

    python simulate_missing.py --dataset synthetic --rates 0 0.1 0.2 0.4 0.8 --seeds 0 1 2 3 4 \\
        --methods b0 b1 label_enhance mean_teacher --jobs 2

Arguments it does not know (e.g. --epochs 20, --data-dir D, --level coarse, --device cuda)
pass through to every method script.
"""
import argparse
import concurrent.futures
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import common
from label_enhance import TABLE_I as LE_TABLE

METHODS = ("b0", "b1", "label_enhance", "mean_teacher", "le_mean_teacher")
GAMMA_METHODS = ("label_enhance", "le_mean_teacher")
HERE = Path(__file__).resolve().parent


def plan(args):
    """Every run of the sweep: (method, rate, seed, gamma or None, run folder)."""
    default_gamma = LE_TABLE["sonyc" if args.dataset == "sonyc" else "openmic"]["gamma"]
    runs = []
    for method in args.methods:
        gammas = args.gammas if (args.gammas and method in GAMMA_METHODS) else [None]
        for gamma in gammas:
            for rate in args.rates:
                for seed in args.seeds:
                    ns = argparse.Namespace(dataset=args.dataset, level=args.level, out=args.out, seed=seed, drop_rate=rate)
                    suffix = [f"gamma{gamma:g}"] if gamma is not None and gamma != default_gamma else []
                    runs.append((method, rate, seed, gamma, common.run_dir(ns, method, *suffix)))
    return runs


def launch(run, args, extra, threads):
    method, rate, seed, gamma, folder = run
    cmd = [sys.executable, str(HERE / f"{method}.py"), "--dataset", args.dataset, "--level", args.level,
           "--out", args.out, "--seed", str(seed), "--drop-rate", str(rate)] + extra
    if gamma is not None:
        cmd += ["--gamma", str(gamma)]
    log = Path(args.out) / "logs" / (folder.name + ".log")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    print(f"{'done' if rc == 0 else f'FAILED ({rc})'}: {folder.name} in {time.time() - t0:.0f}s"
          + ("" if rc == 0 else f", see {log}"), flush=True)
    return rc


def mean_std(values):
    v = np.array([x for x in values if x is not None], float)
    return (float(v.mean()), float(v.std()), len(v)) if len(v) else (float("nan"), float("nan"), 0)


def summarize(args, runs):
    """Mean and std over seeds of each metric, per method (and gamma) and rate."""
    headline = "auprc_macro_masked" if args.dataset == "sonyc" else "f1_macro"
    groups = {}
    for method, rate, seed, gamma, folder in runs:
        path = folder / "metrics.json"
        if path.is_file():
            groups.setdefault((method, gamma, rate), []).append(json.loads(path.read_text()))
    rows = []
    for (method, gamma, rate), ms in sorted(groups.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1] or -1, kv[0][2])):
        row = dict(method=method, gamma=gamma, rate=rate, seeds=len(ms))
        for key in (headline, "f1_pos_macro", "f1_macro_full_truth", "f1_pos_macro_full_truth",
                    "dcase_fine_macro_auprc", "dcase_coarse_macro_auprc"):
            if key in ms[0]["test"]:
                row[key], row[key + "_std"], _ = mean_std(m["test"][key] for m in ms)
        for key in ("masked_precision", "masked_recall"):
            if "enhancement" in ms[0] and key in ms[0]["enhancement"]:
                row[key], row[key + "_std"], _ = mean_std(m["enhancement"][key] for m in ms)
        row["seconds"] = float(np.mean([m["seconds"] for m in ms]))
        rows.append(row)
    return headline, rows


def markdown(rows, key, rates):
    names = sorted({(r["method"], r["gamma"]) for r in rows if key in r}, key=lambda k: (METHODS.index(k[0]), k[1] or -1))
    if not names:
        return ""
    cell = {(r["method"], r["gamma"], r["rate"]): r for r in rows}
    lines = [f"| {key} | " + " | ".join(f"drop {r:g}" for r in rates) + " |", "|---" * (len(rates) + 1) + "|"]
    for method, gamma in names:
        label = method + (f" (gamma {gamma:g})" if gamma is not None else "")
        vals = []
        for rate in rates:
            r = cell.get((method, gamma, rate))
            vals.append(f"{r[key]:.3f} ± {r[key + '_std']:.3f} (n={r['seeds']})" if r and key in r else "–")
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", type=common._dataset_arg, default="synthetic", help="as for the method scripts")
    parser.add_argument("--level", choices=("fine", "coarse"), default="fine", help="SONYC-UST label level")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS[:4]), help="method scripts to run")
    parser.add_argument("--rates", nargs="+", type=common.float_in(0, 1, hi_open=True), default=[0.0],
                        help="shares of the observed training labels to remove (paper: 0 0.1 0.2 0.4 0.8)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="training seeds")
    parser.add_argument("--gammas", nargs="+", type=common.float_in(0, 100), default=None,
                        help="gamma values to sweep for label_enhance and le_mean_teacher (default: Table I only)")
    parser.add_argument("--jobs", type=common.positive_int, default=1, help="runs at once")
    parser.add_argument("--out", default="runs", help="folder for the runs and the summary files")
    args, extra = parser.parse_known_args()
    common.check_writable(args.out)
    Path(args.out, "logs").mkdir(parents=True, exist_ok=True)

    runs = plan(args)
    todo = [r for r in runs if not (r[4] / "metrics.json").is_file()]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to do, {args.jobs} at a time", flush=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        failed = sum(rc != 0 for rc in pool.map(lambda r: launch(r, args, extra, threads), todo))
    wall = time.time() - t0

    headline, rows = summarize(args, runs)
    keys = [headline, "f1_macro_full_truth", "masked_precision", "masked_recall"]
    if args.dataset == "sonyc":
        keys += ["dcase_fine_macro_auprc" if args.level == "fine" else "dcase_coarse_macro_auprc"]
    for key in keys:
        table = markdown(rows, key, args.rates)
        if table:
            print("\n" + table)
    out = Path(args.out)
    summary = dict(dataset=args.dataset, level=args.level, headline=headline, rates=args.rates, seeds=args.seeds,
                   methods=args.methods, gammas=args.gammas, passed_through=extra, wall_seconds=wall,
                   failed=failed, rows=rows, versions=common.versions())
    common._atomic(out / "summary.json", lambda p: Path(p).write_text(json.dumps(common._jsonable(summary), indent=1)))
    columns = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("method", "gamma", "rate", "seeds"), k))

    def write_csv(p):
        with open(p, "w", newline="") as fh:
            w = csv.DictWriter(fh, columns)
            w.writeheader()
            w.writerows(rows)
    common._atomic(out / "summary.csv", write_csv)
    print(f"\nwrote {out}/summary.csv and summary.json | sweep wall time {wall:.0f}s", flush=True)
    if failed:
        common.fail(f"{failed} run(s) failed; their logs are in {out / 'logs'}")


if __name__ == "__main__":
    common.main_guard(main)
