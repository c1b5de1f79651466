"""Check a finished run's learning-rate history against the schedule: halved every 30 epochs.

    python benchmarks/check_lr.py runs/synthetic__mean_teacher__seed0

The rate recorded for epoch e must be lr * 0.5 ** ((e - 1) // 30): on a 100-epoch run, halvings at
epochs 31, 61 and 91. Under --fast the rate is a float32 tensor on the device (the CUDA graph reads it),
so the history holds float32 values: float32(1e-3) reads back as 0.0010000000475, 4.7e-8 off. The
tolerance is 1e-6 relative: float32 rounding passes, a rate one halving off (50%) does not.
Exit 0 when the schedule holds, 1 with the first mismatches when it does not, 2 on an unreadable run.
"""

import argparse
import json
import sys
from pathlib import Path

RTOL = 1e-6  # float32 holds 24 bits: its rounding is at most 6e-8 relative


def check(history, lr, step=30, factor=0.5, rtol=RTOL):
    """Mismatches as (epoch, expected, recorded); empty when the schedule holds."""
    bad = []
    for e in history:
        expected = lr * factor ** ((e["epoch"] - 1) // step)
        if not abs(e["lr"] - expected) <= rtol * expected:
            bad.append((e["epoch"], expected, e["lr"]))
    return bad


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="a finished run's folder")
    args = p.parse_args()
    try:
        m = json.loads((args.run_dir / "metrics.json").read_text())
        history, lr = m["history"], m["args"]["lr"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: cannot read {args.run_dir / 'metrics.json'}: {e}", file=sys.stderr)
        sys.exit(2)
    bad = check(history, lr)
    halvings = [e["epoch"] for prev, e in zip(history, history[1:]) if e["lr"] < prev["lr"]]
    if bad:
        print(f"learning rate NOT as scheduled in {args.run_dir}: first (epoch, expected, recorded) {bad[:3]}")
        sys.exit(1)
    print(
        f"learning rate as scheduled over {len(history)} epochs ({m['device']}): halved at epochs "
        f"{', '.join(map(str, halvings)) or 'none'}"
    )


if __name__ == "__main__":
    main()
