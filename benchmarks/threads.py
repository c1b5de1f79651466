"""How many CPU threads a run should use: wall time of one short run per setting, on an idle machine and
beside a competing process, printed as a Markdown table (docs/runs.md keeps the one that set --threads).

    python benchmarks/threads.py                       # mean_teacher.py, 10 epochs, threads 1 and all cores
    python benchmarks/threads.py --threads 1 2 4 --epochs 20

Each setting runs the method script in its own process on the synthetic data, pinned to the CPU, with
OpenMP's default wait policy and with OMP_WAIT_POLICY=PASSIVE (threads sleep instead of spinning while
they wait). "busy" adds one process that keeps one core busy in pure Python, as a second job or a
colleague's process on a shared machine does.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parent.parent


def timed_run(method, epochs, threads, passive, out):
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        env.pop("OMP_WAIT_POLICY", None)
    cmd = [sys.executable, str(ROOT / f"{method}.py"), "--epochs", str(epochs), "--device", "cpu"]
    cmd += ["--threads", str(threads), "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env=env)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="mean_teacher", help="method script to time (default: mean_teacher)")
    p.add_argument("--epochs", type=int, default=10, help="epochs of each run (default: 10)")
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=sorted({1, os.cpu_count() or 1}),
        help="thread counts to try (default: 1 and this machine's cores, torch's own default)",
    )
    args = p.parse_args()
    rows = []
    with TemporaryDirectory() as tmp:
        for load in ("idle", "busy"):
            hog = None
            if load == "busy":
                hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                for threads in args.threads:
                    for passive in (False, True):
                        seconds = timed_run(args.method, args.epochs, threads, passive, Path(tmp) / "runs")
                        rows.append((load, threads, passive, seconds))
                        print(f"{load} threads {threads} passive {passive}: {seconds:.1f}s", file=sys.stderr)
            finally:
                if hog:
                    hog.kill()
    print(f"\n{args.method}.py, {args.epochs} epochs, synthetic data, {os.cpu_count()} cores; wall seconds\n")
    print("| threads | OpenMP wait | idle | beside one busy process |")
    print("|---|---|---|---|")
    for threads in args.threads:
        for passive in (False, True):
            cells = [f"{s:.1f}" for load, t, pa, s in rows if t == threads and pa == passive]
            print(f"| {threads} | {'passive' if passive else 'default'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
