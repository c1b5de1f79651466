"""Check a finished run's learning-rate history against the schedule: halved every 30 epochs.

    python benchmarks/check_lr.py runs/synthetic__mean_teacher__seed0

The rate recorded for epoch e must be lr * 0.5 ** ((e - 1) // 30): on a 100-epoch run, halvings
at epochs 31, 61 and 91. Under --fast the recorded rate is the optimizer's tensor that the CUDA
graph reads, so a scheduler that replaced it instead of updating it in place (torch < 2.4) shows
here only through the version check in common.fast_step; this script checks the schedule itself.
Exit 0 when it holds, 1 with the first mismatches when it does not.
"""
import argparse
import json
import sys
from pathlib import Path


def check(history, lr, step=30, factor=0.5):
    """Mismatches as (epoch, expected, recorded); empty when the schedule holds."""
    bad = []
    for e in history:
        expected = lr * factor ** ((e["epoch"] - 1) // step)
        if abs(e["lr"] - expected) > 1e-9 * expected:
            bad.append((e["epoch"], expected, e["lr"]))
    return bad


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="a finished run's folder")
    args = p.parse_args()
    m = json.loads((args.run_dir / "metrics.json").read_text())
    history = m["history"]
    bad = check(history, m["args"]["lr"])
    halvings = [e["epoch"] for prev, e in zip(history, history[1:]) if e["lr"] < prev["lr"]]
    if bad:
        print(f"learning rate NOT as scheduled in {args.run_dir}: first (epoch, expected, recorded) {bad[:3]}")
        sys.exit(1)
    print(f"learning rate as scheduled over {len(history)} epochs ({m['device']}): halved at epochs "
          f"{', '.join(map(str, halvings)) or 'none'}")


if __name__ == "__main__":
    main()
