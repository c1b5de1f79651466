"""--fast against the eager run, measured: the worst relative difference of the per-epoch losses, per method.

    python benchmarks/fast_vs_eager.py                    # every method, on CUDA (benchmarks/gpu_check.sh)
    python benchmarks/fast_vs_eager.py --methods b1 mean_teacher

Two comparisons, each printed as a table with its tolerance; exit 1 when a difference passes it.
- The RNG path: eager against --fast at the default dropout, 3 epochs. --fast restores the CUDA random
  number generator after its warm-up, so both draw the same dropout masks; fused, capturable Adam rounds
  differently from the default Adam, which moves the first epochs' losses by less than 1e-7 relative. A
  generator left one draw off moves the epoch-1 loss by about 3e-2 at dropout 0.6. The tolerance, 1e-4,
  sits three orders of magnitude above the rounding and more than two below a shifted generator.
- The schedule path: --fast against an eager run that uses the same fused, capturable Adam with a tensor
  learning rate, over 32 epochs, past the halving at epoch 31. The two do the same arithmetic, so they agree
  to about float32 rounding; tolerance 1e-5. A graph that ignored the learning-rate tensor would keep the
  first rate and move the epoch-31 losses by about 5e-3.
The same comparison runs on the CPU in the test suite with stand-ins for both faults (tests/test_methods.py).
"""

import argparse
import contextlib
import importlib
import io
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository's modules
import common  # noqa: E402

METHODS = ("b0", "b1", "label_enhance", "mean_teacher", "le_mean_teacher", "large_loss", "selective", "em", "gr_loss")
RNG_TOLERANCE = 1e-4
SCHEDULE_TOLERANCE = 1e-5


def histories(metrics):
    """Every epoch of every stage: the final stage's history, then a first stage's (teacher, prior)."""
    first = metrics.get("stage1") or {}
    return metrics["history"] + first.get("history", [])


def worst_difference(a, b, keys=("train_loss", "val_loss")):
    """(worst relative difference, its epoch, its key) between two runs' histories, epoch by epoch."""
    worst = (0.0, None, None)
    if len(a) != len(b):
        return (float("inf"), None, "number of epochs")
    for x, y in zip(a, b):
        for key in keys:
            difference = abs(x[key] - y[key]) / max(abs(x[key]), 1e-12)
            if difference > worst[0]:
                worst = (difference, x["epoch"], key)
    return worst


def capturable_eager(step, example_batch, device, enabled, state=()):
    """In place of common.fast_step: the eager step, with the optimizer --fast would use (fused, capturable,
    a tensor learning rate), so that only the graph itself differs from --fast."""
    fastpath = importlib.import_module("fastpath")
    for s in state:
        if isinstance(s, common.torch.optim.Optimizer):
            fastpath.make_capturable(s, device)
    return step


def train(method, argv, out, fast_step=None):
    """Run a method script's main() in this process (fast_step: a stand-in for common.fast_step); returns
    its metrics.json."""
    module = importlib.import_module(method)
    saved_argv, saved_step = sys.argv, common.fast_step
    sys.argv = [f"{method}.py", *map(str, argv), "--out", str(out)]
    if fast_step is not None:
        common.fast_step = fast_step
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            module.main()
    finally:
        sys.argv, common.fast_step = saved_argv, saved_step
    return json.loads(next(Path(out).glob("*/metrics.json")).read_text())


def compare(methods, device, dataset):
    rows, failed = [], False
    base = ["--device", device, "--dataset", dataset]
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            rng_args = base + ["--epochs", 3]
            eager = train(method, rng_args, Path(tmp) / method / "eager")
            fast = train(method, rng_args + ["--fast"], Path(tmp) / method / "fast")
            rng = worst_difference(histories(eager), histories(fast))
            sched_args = base + ["--epochs", 32]
            same_adam = train(method, sched_args, Path(tmp) / method / "capturable", fast_step=capturable_eager)
            fast32 = train(method, sched_args + ["--fast"], Path(tmp) / method / "fast32")
            schedule = worst_difference(histories(same_adam), histories(fast32))
            failed |= rng[0] > RNG_TOLERANCE or schedule[0] > SCHEDULE_TOLERANCE
            rows.append((method, rng, schedule))
    return rows, failed


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="(default: all)")
    p.add_argument("--device", default="cuda", help="(default: cuda)")
    p.add_argument("--dataset", default="synthetic", help="(default: synthetic)")
    args = p.parse_args()
    rows, failed = compare(args.methods, args.device, args.dataset)
    print(
        f"\n| method | RNG path: eager vs --fast, 3 epochs (tol {RNG_TOLERANCE:g}) | schedule path: same Adam vs "
        f"--fast, 32 epochs (tol {SCHEDULE_TOLERANCE:g}) |"
    )
    print("|---|---|---|")
    for method, rng, schedule in rows:
        cells = [f"{d:.2e} (epoch {e}, {k})" for d, e, k in (rng, schedule)]
        print(f"| {method} | {cells[0]} | {cells[1]} |")
    print("\nfast_vs_eager: " + ("a difference passed its tolerance" if failed else "every difference within"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
