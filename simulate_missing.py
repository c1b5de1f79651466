"""Sweeps: seeds, label removal (the paper's Fig. 4 at rate 0 and Fig. 5) and any method option on a grid.

Runs every (method, option values, drop rate, seed) without a finished run, `--jobs` at a time, so an
interrupted sweep resumes and a run in progress elsewhere is left alone; then prints mean ± population std
over seeds and writes the summary and, with --plot, the figures (figures.py). --dry-run prints the runs'
commands for a cluster, --collect gathers them without training. docs/runs.md tells the rest.

    python simulate_missing.py --rates 0 0.1 0.2 0.4 0.8 --seeds 0 1 2 3 4 --jobs 2 --plot
    python simulate_missing.py --methods b1 mean_teacher --vary lr=0.001,0.005 --seeds 0 1 2 --plot
"""

import argparse
import concurrent.futures
import contextlib
import importlib
import io
import itertools
import os
import queue
import shlex
import subprocess
import sys
import time
from pathlib import Path

import common
import figures
import runcheck

METHODS = ("b0", "b1", "label_enhance", "mean_teacher", "le_mean_teacher", "large_loss", "selective", "em", "gr_loss")
SET_BY_SWEEP = ("--dataset", "--level", "--seed", "--drop-rate", "--out", "--threads")
HERE = Path(__file__).resolve().parent


def option_groups(tokens):
    """['--epochs', '20', '--fast', '--lr=0.01'] -> [('--epochs', ['--epochs', '20']), ('--fast', ...), ...]"""
    groups = []
    for t in tokens:
        if t.startswith("--"):
            groups.append((t.split("=")[0], [t]))
        elif groups:
            groups[-1][1].append(t)
        else:
            common.fail(f"unexpected argument {t!r}")
    return groups


def method_options(method):
    module = importlib.import_module(method)
    return module, {s for a in module.get_parser()._actions for s in a.option_strings}


def check_options(args, extra, own):
    """Refuse a pass-through or varied option that no chosen method accepts, or that the sweep sets itself."""
    accepted = set().union(*(method_options(m)[1] for m in args.methods))
    set_by_sweep = SET_BY_SWEEP + (("--device",) if args.devices else ())
    for name in [g[0] for g in option_groups(extra)] + [f"--{k}" for k in args.vary]:
        if name in set_by_sweep:
            common.fail(
                f"{name}: the sweep sets this itself (use --rates, --seeds, --vary, --drop-per-seed, "
                f"--threads, --devices, --out, or run the method script directly)"
            )
        if name not in accepted:
            hint = runcheck.did_you_mean(name, own | accepted)
            common.fail(f"{name}: no option of the sweep or of {', '.join(args.methods)}{hint}")
    if args.drop_per_seed and "--drop-seed" in [g[0] for g in option_groups(extra)]:
        common.fail("--drop-per-seed sets each run's --drop-seed to its training seed; give one of the two")
    both = {f"--{k}" for k in args.vary} & {g[0] for g in option_groups(extra)}
    if both:
        common.fail(f"{sorted(both)[0]} is both varied and passed through; give it once")


def parse_vary(items):
    """['lr=0.001,0.005', 'ema_decay=0.99,0.999'] -> {'lr': ['0.001', '0.005'], 'ema-decay': ['0.99', '0.999']}"""
    vary = {}
    for item in items:
        name, _, values = item.partition("=")
        if not name or not values or "" in values.split(","):
            common.fail(f"--vary {item}: expected NAME=V1,V2,... (e.g. --vary lr=0.001,0.005)")
        key = name.strip("-").replace("_", "-")
        if key in vary:
            common.fail(f"--vary {key} is given twice; give all its values in one: --vary {key}=V1,V2,...")
        vary[key] = list(dict.fromkeys(values.split(",")))
    return vary


def plan(args, extra):
    """Every run of the sweep: dict(method, values {option: value}, rate, seed, argv, folder, status, diff),
    status one of finished, stale (finished with other settings), running (by another process), pending."""
    grid, seen = [], set()
    for method in args.methods:
        module, accepted = method_options(method)
        passed = [t for name, tokens in option_groups(extra) if name in accepted for t in tokens]
        axes = {k: v for k, v in args.vary.items() if f"--{k}" in accepted}
        for combo in itertools.product(*axes.values()):
            values = dict(zip(axes, combo))
            for rate, seed in itertools.product(args.rates, args.seeds):
                argv = ["--dataset", args.dataset, "--level", args.level, "--out", args.out]
                argv += ["--seed", str(seed), "--drop-rate", f"{rate:g}"]
                argv += [t for k, v in values.items() for t in (f"--{k}", v)]
                if args.drop_per_seed and rate > 0:
                    argv += ["--drop-seed", str(seed)]
                run_args = parse_method_args(module, method, argv + passed)
                folder = Path(args.out) / common.run_name(run_args, method)
                if folder in seen:
                    continue
                seen.add(folder)
                diff, status = "", "pending"
                if (folder / "metrics.json").is_file():
                    diff = runcheck.finished_run_diff(folder, run_args, common.NOT_IDENTITY)
                    status = "stale" if diff else "finished"
                elif runcheck.run_in_progress(folder):
                    status = "running"
                run = dict(method=method, values=values, rate=rate, seed=seed, argv=argv + passed, folder=folder)
                grid.append(dict(run, status=status, diff=diff))
    return grid


def parse_method_args(module, method, argv):
    """The method script's own arguments for `argv`, as it will parse them; its errors in one line."""
    parser = module.get_parser()
    parser.error = lambda message: common.fail(f"{method}.py: {message}")  # one line, not its usage
    with contextlib.redirect_stderr(io.StringIO()):  # its warnings: once, by the sweep
        return common.parse_args(parser, module.TABLE_I, argv)


def command(run, threads, device):
    """The command line of one run, with the sweep's own interpreter, its thread count and its device."""
    cmd = [sys.executable, str(HERE / f"{run['method']}.py"), *run["argv"], "--threads", str(threads)]
    if device:
        cmd += ["--device", device]
    return cmd


def launch(run, devices, threads):
    device = devices.get()  # one of the --jobs slots, each pinned to a device
    log = run["folder"].parent / "logs" / (run["folder"].name + ".log")
    t0 = time.time()
    try:
        with open(log, "w") as fh:  # in the folder the sweep was started from: paths mean the same there
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            rc = subprocess.call(command(run, threads, device), stdout=fh, stderr=subprocess.STDOUT, env=env)
    finally:
        devices.put(device)
    where = f" on {device}" if device else ""
    outcome = "done" if rc == 0 else f"FAILED ({rc})"
    problem = "" if rc == 0 else f", see {log}"
    print(f"{outcome}: {run['folder'].name}{where} in {time.time() - t0:.0f}s{problem}", flush=True)
    return rc


def get_parser():
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        allow_abbrev=False,
        epilog="Any other option of the method scripts passes through to those that accept it.",
    )
    p.add_argument(
        "--dataset", type=common.dataset_arg, default="synthetic", help="as for the method scripts (default: synthetic)"
    )
    p.add_argument("--level", choices=("fine", "coarse"), default="fine", help="SONYC-UST label level (default: fine)")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS[:4]),
        help="method scripts to run (default: b0 b1 label_enhance mean_teacher)",
    )
    p.add_argument(
        "--rates",
        nargs="+",
        type=common.float_in(0, 1, hi_open=True),
        default=[0.0],
        help="shares of the observed training labels to remove; the paper: 0 0.1 0.2 0.4 0.8 (default: 0)",
    )
    p.add_argument(
        "--seeds", nargs="+", type=common.seed_arg, default=[0, 1, 2, 3, 4], help="training seeds (default: 0 1 2 3 4)"
    )
    p.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="an option of the method scripts to put on the grid, e.g. lr=0.001,0.005; repeatable",
    )
    p.add_argument(
        "--drop-per-seed",
        action="store_true",
        help="draw the labels a drop rate removes with each training seed, as the paper's code did, instead of "
        "the same for every seed (the method scripts' --drop-seed, which passes through)",
    )
    p.add_argument("--jobs", type=common.positive_int, default=1, help="runs at once (default: 1)")
    p.add_argument(
        "--threads",
        type=common.positive_int,
        default=common.DEFAULT_THREADS,
        help=f"CPU threads of each run, also in the commands --dry-run prints: the runs of a sweep share the machine, "
        f"where one thread each is fastest (default: {common.DEFAULT_THREADS}; docs/runs.md)",
    )
    p.add_argument(
        "--devices",
        nargs="+",
        help="devices to spread the runs over, e.g. cuda:0 cuda:1, each run pinned to one (default: the scripts' own)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print one command per pending run (this interpreter, --threads, the device from --devices) and run "
        "nothing; on a cluster, run them as jobs, then --collect",
    )
    p.add_argument(
        "--collect",
        action="store_true",
        help="train nothing: write the summary (and --plot's figures) from the finished runs, list those missing "
        "or still running, and exit 1 while any is",
    )
    p.add_argument("--plot", action="store_true", help="also draw Fig. 4 and Fig. 5 (needs matplotlib)")
    p.add_argument(
        "--metric",
        help="the metric of both figures (default: the paper's: Fig. 4 f1_macro, on SONYC-UST auprc_macro_masked; "
        "Fig. 5 auprc_macro_masked)",
    )
    p.add_argument("--out", default="runs", help="folder for the runs, logs, summaries and figures (default: runs)")
    return p


def print_dry_run(args, todo):
    """One command per pending run, each with its device (round robin over --devices); a reader that stops
    early (| head) ends the listing quietly."""
    try:
        for i, run in enumerate(todo):
            device = args.devices[i % len(args.devices)] if args.devices else None
            print(shlex.join(command(run, args.threads, device)))
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit


def run_pending(args, todo):
    """Run `todo`, --jobs at a time; returns (failed, wall seconds)."""
    common.check_writable(args.out)
    Path(args.out, "logs").mkdir(parents=True, exist_ok=True)
    devices = queue.Queue()
    for i in range(args.jobs):
        devices.put(args.devices[i % len(args.devices)] if args.devices else None)
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        failed = sum(rc != 0 for rc in pool.map(lambda r: launch(r, devices, args.threads), todo))
    wall = time.time() - t0
    if todo and failed == len(todo):
        log = Path(args.out) / "logs" / (todo[0]["folder"].name + ".log")
        common.fail(
            f"all {failed} run(s) of this sweep failed (first log: {log}); no summary written, "
            f"earlier ones left as they were"
        )
    return failed, wall


def main():
    parser = get_parser()
    args, extra = parser.parse_known_args()
    own = {s for a in parser._actions for s in a.option_strings}
    args.methods = [m for m in METHODS if m in args.methods]  # each once, in the paper's order
    args.vary = parse_vary(args.vary)
    for g in args.vary.get("gamma", []):
        if g.replace(".", "", 1).isdigit() and 0 < float(g) < 1:
            common.warn(f"gamma {g} is a percentage: {g} means {float(g):g}%, not {float(g):.0%}")
    check_options(args, extra, own)
    if not (args.dry_run or args.collect):  # elsewhere, each run checks its device where it starts
        passed = [tokens[-1].split("=")[-1] for name, tokens in option_groups(extra) if name == "--device"]
        for device in args.devices or passed:
            common.parse_device(device, "--devices" if args.devices else "--device")  # CUDA starts in each run
        if args.threads * args.jobs > (os.cpu_count() or 1):
            common.warn(
                f"--threads {args.threads} x --jobs {args.jobs} is more than this machine's {os.cpu_count()} "
                f"cores: slower, not faster"
            )

    grid = plan(args, extra)
    stale = [r for r in grid if r["status"] == "stale"]
    if stale:
        common.fail(
            f"{len(stale)} finished run(s) in {args.out} were made with other settings, first "
            f"{stale[0]['folder'].name} ({stale[0]['diff']}); use another --out, or delete them to rerun"
        )
    todo = [r for r in grid if r["status"] == "pending"]
    running = [r for r in grid if r["status"] == "running"]
    if args.dry_run:
        return print_dry_run(args, todo)
    finished = len(grid) - len(todo) - len(running)
    print(f"{len(grid)} runs: {finished} finished, {len(running)} running elsewhere, {len(todo)} to do", flush=True)
    failed, wall = 0, None
    if not args.collect and todo:
        print(f"running {len(todo)}, {args.jobs} at a time, {args.threads} thread(s) each", flush=True)
        failed, wall = run_pending(args, todo)
        todo = [r for r in todo if not (r["folder"] / "metrics.json").is_file()]

    rows = figures.summarize(grid)
    if args.plot and args.metric and not any(args.metric in r["per_seed"] for r in rows):
        common.fail(
            f"--metric {args.metric}: no run of this sweep has it; choose from "
            f"{common.show(sorted({k for r in rows for k in r['per_seed']}), 200)}"
        )
    if rows:
        summary, name = figures.write_summary(args, extra, rows, wall, failed)
        if args.plot:
            figures.plot_sweep(args, summary, name)
    for r in running:
        print(f"running elsewhere: {r['folder']} ({runcheck.run_in_progress(r['folder']) or 'it has just ended'})")
    for r in todo:
        print(f"missing: {r['folder']}{'' if args.collect else ' (failed: see its log)'}")
    if failed:
        common.fail(f"{failed} run(s) failed; their logs are in {Path(args.out) / 'logs'}")
    if todo or running:
        held = f"the summary holds the {len(rows)} finished group(s)" if rows else "no run has finished: no summary"
        print(f"incomplete: {len(todo)} missing, {len(running)} still running; {held}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    common.main_guard(main)
