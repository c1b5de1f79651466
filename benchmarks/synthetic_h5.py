"""Write the synthetic data to an .h5 file, at the default size or at OpenMIC-2018's, with its complete truth.

    python benchmarks/synthetic_h5.py --size openmic --out data/synthetic_openmic.h5
    python simulate_missing.py --dataset data/synthetic_openmic.h5 --methods b1 label_enhance mean_teacher \\
        --rates 0 0.8 --seeds 0 1 2 --jobs 2

The same generator as --dataset synthetic (common.make_synthetic, its own seed), in the .h5 layout of
docs/data.md, with Y_full, so every run on it also reports its metrics against the complete truth.
  default: 1,280 train, 500 validation, 1,500 test clips (what --dataset synthetic generates)
  openmic: 12,678 train, 2,237 validation, 5,085 test clips: OpenMIC-2018's split sizes, so an epoch
           has the ~200 steps of 64 clips that Table I's EMA decay of 0.999 was set for (the default has 20)
"""

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

SIZES = dict(default=(1280, 500, 1500), openmic=(12678, 2237, 5085))


def write(path, size):
    n_train, n_val, n_test = SIZES[size]
    parts = common.make_synthetic(n_train=n_train, n_val=n_val, n_test=n_test)
    splits = ("train", "val", "test")
    with h5py.File(path, "w") as f:
        f["X"] = np.concatenate([parts[s]["X"] for s in splits])
        f["Y"] = np.concatenate([parts[s]["Y"] for s in splits]).astype(np.uint8)
        f["observed"] = np.concatenate([parts[s]["observed"] for s in splits])
        f["Y_full"] = np.concatenate([parts[s]["Y_full"] for s in splits])
        f["split"] = np.array([s.encode() for s in splits for _ in range(len(parts[s]["X"]))])
        f.attrs["class_names"] = [f"class{c:02d}" for c in range(20)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(SIZES), default="openmic", help="split sizes (default: openmic)")
    p.add_argument("--out", type=Path, required=True, help="the .h5 file to write")
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    common.write_atomic(args.out, lambda tmp: write(tmp, args.size))
    n = sum(SIZES[args.size])
    print(f"wrote {args.out}: {n:,} clips ({', '.join(f'{k:,}' for k in SIZES[args.size])}), 10 x 128, 20 classes")


if __name__ == "__main__":
    main()
