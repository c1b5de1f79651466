"""Speed benchmark: seconds per epoch and clips per second of each method script, eager and --fast.

It times the real scripts, run as a user runs them, on synthetic data of a real dataset's size
written to a temporary .h5 file:
  openmic: 12,678 train and 2,237 val clips of 10 x 128, 20 classes (Table I: L 3, H 128)
  sonyc:   13,538 train and 4,308 val clips of 11 x 512, 23 classes (Table I: L 1, H 512)
One epoch = one pass over the training clips plus one validation pass, as in training. The
first epoch (warm-up, graph capture) is left out of the median. With --e2e it also times the
default synthetic run of each method end to end (python METHOD.py, 100 epochs).

    python benchmarks/bench.py                      # CPU or the default CUDA device
    python benchmarks/bench.py --device cuda --fast --shape openmic sonyc --e2e

It prints a table and the estimated wall time of the paper's whole sweep; it exits 1 when a run failed.
No test asserts on its timings.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

SHAPES = {  # n_train, n_val, frames, features, classes, Table I row
    "openmic": (12678, 2237, 10, 128, 20, []),
    "sonyc": (13538, 4308, 11, 512, 23, ["--layers", "1", "--hidden", "512"]),
}
STAGES = {
    "b0": 1,
    "b1": 1,
    "label_enhance": 2,
    "mean_teacher": 1,
    "le_mean_teacher": 2,
    "large_loss": 1,
    "selective": 2,
    "em": 1,
    "gr_loss": 1,
}


def write_h5(path, shape, seed=0):
    n_train, n_val, frames, features, classes, _ = SHAPES[shape]
    n_test = 500
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    with h5py.File(path, "w") as f:
        f["X"] = rng.standard_normal((n, frames, features), dtype=np.float32)
        f["Y"] = (rng.random((n, classes)) < 0.15).astype(np.float32)
        f["observed"] = rng.random((n, classes)) < 0.1
        f["split"] = np.array([b"train"] * n_train + [b"val"] * n_val + [b"test"] * n_test)
        f.attrs["class_names"] = [f"c{i}" for i in range(classes)]


def time_script(method, data, extra, epochs, device, fast, out, threads):
    out = Path(tempfile.mkdtemp(dir=out))  # one run per folder, whatever its name
    cmd = (
        [
            sys.executable,
            str(ROOT / f"{method}.py"),
            "--dataset",
            str(data),
            "--epochs",
            str(epochs),
            "--out",
            str(out),
            "--device",
            device,
            "--threads",
            str(threads),
        ]
        + extra
        + (["--fast"] if fast else [])
    )
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode != 0:
        return None, wall, p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"
    m = json.loads(next(out.glob("*/metrics.json")).read_text())
    seconds = [e["seconds"] for e in m["history"][1:]] or [m["history"][0]["seconds"]]
    if "stage1" in m:  # two-stage methods: both stages' epochs
        seconds += [e["seconds"] for e in m["stage1"]["history"][1:]]
    return float(np.median(seconds)), wall, m["device"]


def main():
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--methods", nargs="+", default=list(STAGES), choices=list(STAGES), help="scripts to time")
    p.add_argument("--shape", nargs="+", default=["openmic"], choices=list(SHAPES), help="dataset sizes")
    p.add_argument("--epochs", type=int, default=4, help="epochs per timing run (the first is left out)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device")
    p.add_argument("--fast", action="store_true", help="also time --fast (CUDA graph)")
    p.add_argument("--threads", type=int, default=common.DEFAULT_THREADS, help="CPU threads of each run")
    p.add_argument("--e2e", action="store_true", help="also time each default synthetic run end to end")
    args = p.parse_args()

    device = torch.device(args.device)
    python = sys.version.split()[0]
    print(f"device: {device}, {args.threads} thread(s) a run | torch {torch.__version__} | python {python}")
    rows, per_epoch, failures = [], {}, 0
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shape:
            data = Path(tmp) / f"bench_{shape}.h5"
            write_h5(data, shape)
            for method in args.methods:
                for fast in [False, True] if args.fast else [False]:
                    s, wall, note = time_script(
                        method, data, SHAPES[shape][5], args.epochs, args.device, fast, tmp, args.threads
                    )
                    mode = "fast" if fast else "eager"
                    if s is None:
                        rows.append(f"| {shape} | {method} | {mode} | failed: {note} | | |")
                        failures += 1
                        continue
                    per_epoch[(shape, method, mode)] = s
                    rows.append(f"| {shape} | {method} | {mode} | {s:.3f} | {SHAPES[shape][0] / s:,.0f} | {wall:.1f} |")
        print("\n| size | method | mode | s / epoch | train clips / s | wall s |\n|---|---|---|---|---|---|")
        print("\n".join(rows))
        if args.e2e:
            print("\n| default synthetic run (100 epochs) | wall s |\n|---|---|")
            for method in args.methods:
                t0 = time.time()
                r = subprocess.run(
                    [
                        sys.executable,
                        str(ROOT / f"{method}.py"),
                        "--out",
                        tempfile.mkdtemp(dir=tmp),
                        "--device",
                        args.device,
                        "--threads",
                        str(args.threads),
                    ],
                    capture_output=True,
                    text=True,
                )
                failures += r.returncode != 0
                print(f"| {method} | {time.time() - t0:.1f}{'' if r.returncode == 0 else ' (failed)'} |", flush=True)
    # the paper's sweep: every method, 5 seeds x 5 drop rates, 100 epochs, each size timed here
    for mode in ("eager", "fast"):
        total = [per_epoch.get((shape, m, mode)) for shape in args.shape for m in args.methods]
        if all(t is not None for t in total) and total:
            est = sum(per_epoch[(shape, m, mode)] * 100 * STAGES[m] * 25 for shape in args.shape for m in args.methods)
            print(
                f"\nestimated sweep ({mode}, {', '.join(args.shape)}, {len(args.methods)} methods, "
                f"5 seeds x 5 rates, "
                f"100 epochs, one run at a time): {est / 60:.0f} min; divide by the runs that fit at once (--jobs)"
            )
    if failures:
        print(f"\n{failures} timing run(s) FAILED (see the table)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
