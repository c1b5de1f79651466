"""Memory benchmark: peak host memory (and peak device memory on CUDA) of one B1 epoch on a
uint8 .h5 of raw VGGish-like embeddings (N clips x 10 x 128, 20 classes), as a user runs it.

    python benchmarks/memory.py                          # 300,000 clips
    python benchmarks/memory.py --clips 300000 2000000   # and AudioSet's size (2.6 GB of bytes)

Each size is written once to a temporary .h5 (90% train, 5% val, 5% test; 10% of labels
observed), then `b1.py --dataset FILE --epochs 1` runs in a child process; its peak resident
set size is the child's ru_maxrss. It prints a table. No test asserts on it.
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

ROOT = Path(__file__).resolve().parent.parent
# Runs the command given and prints its peak resident set size in MiB (Linux reports KiB).
WRAPPER = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print('PEAK_RSS_MIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); sys.exit(rc)"
)


def write_h5(path, n, frames=10, features=128, classes=20, block=100_000, seed=0):
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        X = f.create_dataset("X", (n, frames, features), dtype=np.uint8, chunks=(1024, frames, features))
        for a in range(0, n, block):
            X[a : a + block] = rng.integers(0, 256, (min(block, n - a), frames, features), dtype=np.uint8)
        f["Y"] = (rng.random((n, classes)) < 0.15).astype(np.uint8)
        f["observed"] = rng.random((n, classes)) < 0.1
        cut = rng.random(n)
        f["split"] = np.where(cut < 0.9, b"train", np.where(cut < 0.95, b"val", b"test"))
        f.attrs["class_names"] = [f"c{i}" for i in range(classes)]


def main():
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--clips", nargs="+", type=int, default=[300_000], help="dataset sizes to measure")
    p.add_argument("--device", default="cpu", help="device for b1.py")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for b1.py (default: torch's)")
    p.add_argument("--dir", default=None, help="folder for the temporary .h5 files (default: the system's temp)")
    args = p.parse_args()
    rows = []
    for n in args.clips:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            data = Path(tmp) / f"uint8_{n}.h5"
            t0 = time.time()
            write_h5(data, n)
            size = data.stat().st_size / 2**20
            print(f"wrote {data.name}: {size:,.0f} MiB in {time.time() - t0:.0f}s", flush=True)
            cmd = [
                sys.executable,
                str(ROOT / "b1.py"),
                "--dataset",
                str(data),
                "--epochs",
                "1",
                "--out",
                tmp,
                "--device",
                args.device,
            ] + (["--threads", str(args.threads)] if args.threads else [])
            t0 = time.time()
            r = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True)
            wall = time.time() - t0
            peak = next(
                (float(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("PEAK_RSS_MIB")), None
            )
            if r.returncode != 0:
                why = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode
                rows.append(f"| {n:,} | {size:,.0f} | failed: {why} | | |")
                continue
            m = json.loads(next(Path(tmp).glob(f"{data.stem}__b1__seed0*/metrics.json")).read_text())
            device_peak = m.get("peak_device_memory_mb")
            rows.append(
                f"| {n:,} | {size:,.0f} | {peak:,.0f} | {f'{device_peak:,.0f}' if device_peak else '–'} "
                f"| {m['history'][0]['seconds']:.0f} | {wall:.0f} |"
            )
    print(f"\ndevice: {args.device} | b1.py, 1 epoch, uint8 X kept as bytes on the device")
    print("| clips | .h5 MiB | peak host RSS MiB | peak device MiB | epoch s | wall s |\n|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
