"""Shared infrastructure of the method scripts: command line and run setup, data, model, metrics, results.
No loss and no training step: each method script holds its whole method. This file and one method script run
on their own, on any OS (the copy unit); the repository's other modules are imported only when a run asks for
them: openmic.py, sonyc.py and audioset.py (their datasets), fastpath.py (--fast), runcheck.py (run locks,
identity checks and spelling hints, for sweeps and clusters) and h5guard.py (the .h5 reader's guard against damaged
files). A copy without runcheck.py or h5guard.py runs without those, and says so where it matters.

The sections, one concern each:
- Command line and run setup: the options every script shares, seeding, the device and thread count, the
  run folder (its name, and runcheck.py's checks where that file is here), --fast's hook and --tensorboard's writer.
- Data: the Split/Data every method reads; the synthetic generator (its sizes are also set by
  benchmarks/synthetic_h5.py) and the .h5 reader, both needed by the copy unit; the label options every reader
  shares (--drop-rate, --positive-only); the checks every reader shares (X's layout and values, strings, 0/1
  labels). Labels stay compact (bool) on the device: the scripts cast a batch at a time.
- Model: AttentionMIL and batched prediction.
- Metrics: the paper's F1, its AUPRC, AP, calibration shares; the complete truth where known. A dataset's
  own metrics (SONYC-UST's DCASE ones, AudioSet's mAP) come from its reader through Data.info.
- Results: versions, atomic writes, metrics.json, model.pt, the test predictions, the closing lines.
"""

import argparse
import collections
import importlib
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# cuBLAS needs this set before CUDA starts to be deterministic; it costs nothing here.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np
import torch
import torch.nn as nn


class UserError(Exception):
    """Bad input from the user: reported in one line, exit status 2, no traceback."""


def fail(msg):
    raise UserError(msg)


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def show(value, width=60):
    """A user's value in a message, cut to `width` characters."""
    text = repr(value)
    if len(text) <= width:
        return text
    return text[: width - 5] + " ...'"


def main_guard(main):
    """Run `main`: a user error becomes one line and exit status 2, Ctrl-C exit status 130. A run folder this
    process claimed and left without a finished run is removed, if nothing else is in it."""
    try:
        main()
    except UserError as e:
        release_run_dir()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        release_run_dir()
        print("interrupted: no metrics.json was written for this run", file=sys.stderr)
        sys.exit(130)


def optional_module(name, needed_for):
    """openmic, sonyc, audioset or fastpath, imported on first use; a missing file is named in one line."""
    module = extra_module(name)
    if module is None:
        fail(f"{needed_for} needs {name}.py beside common.py; copy it from the missing-labels repository")
    return module


def extra_module(name):
    """A module of the repository that a copy of this file may lack (runcheck.py, h5guard.py): it, or None. A
    folder of that name (which Python would import as an empty namespace package) is not it."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        return None
    return module if getattr(module, "__file__", None) else None


#####  Command line and run setup  #################################################################

DATASETS = ("synthetic", "openmic", "sonyc", "audioset")
DROP_SEED = 1234  # --drop-rate's own seed: every method and training seed sees the same reduced labels
MAX_SEED = 2**32 - 1  # numpy's seeds end there
# Options that say where and how a run is made, not what it learns: neither in a run's name nor compared when a
# finished run is found. The device, the thread count and --fast round float sums in another order, so they
# can move a result in its last digits (docs/runs.md); the others change nothing.
NOT_IDENTITY = ("out", "device", "threads", "fast", "data_dir", "tensorboard")
# The CPU threads of a run: one, whose cost idle and gain beside a busy process docs/runs.md measures
# (benchmarks/threads.py).
DEFAULT_THREADS = 1


def dataset_arg(value):
    if value in DATASETS or value.endswith((".h5", ".hdf5")):
        return value
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(DATASETS)} or a path to an .h5 file, got {value!r}")


def positive_int(value):
    if int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return int(value)


def seed_arg(value):
    seed = int(value)
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed is a whole number from 0 to {MAX_SEED}, got {value}")
    return seed


def float_in(lo, hi, hi_open=False):
    """An argparse type: a float in [lo, hi], or [lo, hi) with hi_open."""

    def number(value):
        x = float(value)
        inside = lo <= x < hi if hi_open else lo <= x <= hi
        if not inside:
            closing = ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}{closing}, got {value}")
        return x

    number.__name__ = "float"  # argparse's message: "invalid float value: 'abc'"
    return number


def add_run_args(parser):
    """The options every method script shares: data, seed, where to run and where to write."""
    p = parser
    p.add_argument(
        "--dataset",
        type=dataset_arg,
        default="synthetic",
        help="synthetic (embedded, no download), openmic, sonyc, audioset, or a path to your own .h5 file "
        "(default: synthetic)",
    )
    p.add_argument(
        "--data-dir", default="data", help="folder holding openmic-2018/, sonyc-ust/ or audioset/ (default: data)"
    )
    p.add_argument("--level", choices=("fine", "coarse"), default="fine", help="SONYC-UST label level (default: fine)")
    p.add_argument(
        "--audioset-train",
        choices=("balanced", "unbalanced", "both"),
        default="balanced",
        help="AudioSet's training split: balanced (22 k clips), unbalanced (2 M) or both (default: balanced)",
    )
    p.add_argument(
        "--seed", type=seed_arg, default=0, help="training seed; the data split never depends on it (default: 0)"
    )
    p.add_argument(
        "--drop-rate",
        type=float_in(0, 1, hi_open=True),
        default=0.0,
        help="share of the observed training labels to remove, the paper's Fig. 5 (default: 0)",
    )
    p.add_argument(
        "--drop-seed",
        type=seed_arg,
        default=DROP_SEED,
        help=f"seed of which labels --drop-rate removes (default: {DROP_SEED})",
    )
    p.add_argument(
        "--positive-only",
        action="store_true",
        help="hide every observed negative of the training labels, so that only positives are labelled, as in "
        "AudioSet (validation and test keep theirs, as with --drop-rate)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=DEFAULT_THREADS,
        help=f"CPU threads for torch; more is rarely faster at this model's size and much slower on a busy "
        f"machine (default: {DEFAULT_THREADS}; docs/runs.md)",
    )
    p.add_argument("--fast", action="store_true", help="capture the training step in a CUDA graph (CUDA only)")
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log each epoch to TensorBoard in the run folder (needs: pip install tensorboard)",
    )
    p.add_argument("--out", default="runs", help="folder for run outputs (default: runs)")
    return parser


class RunArgs(argparse.Namespace):
    __slots__ = ("defaults",)  # every option's default for this dataset: a slot, so not in vars(args)


def dataset_file(path):
    """An .h5 file as a setting: its resolved path, size and modification time (a changed file is a new setting)."""
    path = Path(path).resolve()
    if not path.is_file():
        fail(f"no such file: {path}")
    stat = path.stat()
    return str(path), f"{stat.st_size} bytes, modified {stat.st_mtime_ns}"


def parse_args(parser, table, argv=None):
    """Parse; options left at None take the dataset's Table I row (OpenMIC's for .h5 files). An .h5 path is
    resolved, so that the same file reached from another folder is the same setting."""
    args, unknown = parser.parse_known_args(argv, namespace=RunArgs())
    if unknown:
        known = {s for a in parser._actions for s in a.option_strings}
        runcheck = extra_module("runcheck")  # spelling hints, where runcheck.py is beside this file
        hint = runcheck.did_you_mean(unknown[0].split("=")[0], known) if runcheck else ""
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    row = table["sonyc" if args.dataset == "sonyc" else "openmic"]
    args.defaults = {a.dest: row.get(a.dest, a.default) for a in parser._actions}
    for key, value in row.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.dataset not in DATASETS:
        args.dataset, args.dataset_file = dataset_file(args.dataset)
    return args


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too
    torch.backends.cudnn.deterministic = True  # (and cudnn.benchmark stays False, its default)


def device_count(kind):
    """How many devices of a kind ('cpu', 'cuda', 'mps') torch sees, without starting any of them."""
    if kind == "cpu":
        return 1
    if kind == "cuda":
        return torch.cuda.device_count()
    if kind == "mps":
        return int(torch.backends.mps.is_available())
    return 0


def parse_device(name, option="--device"):
    """A device name as a torch.device this machine has, without starting it; else one line."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        fail(f"{option} {name}: {e}")
    count = device_count(device.type)
    if (device.index or 0) >= count:
        fail(f"{option} {name}: this machine has {count} {device.type} device(s) for torch {torch.__version__}")
    return device


def get_device(name=None, threads=DEFAULT_THREADS):
    """The device (cuda if none is named and one is there, else cpu), started and made current before any data
    is read: --fast's graph lives there. Any failure of the device to start is one line."""
    torch.set_num_threads(threads)
    if threads > (os.cpu_count() or 1):
        warn(f"--threads {threads} is more than this machine's {os.cpu_count()} cores: slower, not faster")
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = parse_device(name)
    if device.type == "cuda":
        try:  # a GPU that the driver counts may still fail to start (busy, wrong driver, out of memory)
            torch.cuda.set_device(device)
            torch.zeros(1, device=device)
        except Exception as e:
            first_line = (str(e) or type(e).__name__).strip().splitlines()[0]
            fail(f"--device {name}: CUDA could not start: {show(first_line, 150)}")
    return device


def option_value(value):
    """An option's value in a run's name: numbers as %g, a pair (a schedule's first and last value) as 0,2."""
    if isinstance(value, (list, tuple)):
        return ",".join(option_value(v) for v in value)
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def run_name(args, method):
    """{dataset}__{method}__seed{seed}, then each option that differs from its default and can change the
    result (__drop0.4, __lr0.005, __gamma50, __teacher-observed, __epochs20, ...): settings never share a folder."""
    if args.dataset not in DATASETS:
        dataset = Path(args.dataset).stem
    elif args.dataset == "sonyc" and args.level == "coarse":
        dataset = "sonyc_coarse"
    elif args.dataset == "audioset" and args.audioset_train != "balanced":
        dataset = f"audioset_{args.audioset_train}"
    else:
        dataset = args.dataset
    name = f"{dataset}__{method}__seed{args.seed}"
    short = dict(drop_rate="drop", drop_seed="dropseed", teacher_selection="teacher-")
    in_name_already = NOT_IDENTITY + ("dataset", "dataset_file", "level", "audioset_train", "seed")
    keys = ["drop_rate", "drop_seed"] + [k for k in vars(args) if k not in ("drop_rate", "drop_seed")]
    for key in keys:
        value = getattr(args, key)
        if key in in_name_already or value == args.defaults.get(key):
            continue
        if key == "drop_seed" and args.drop_rate == 0:  # no label is dropped: its seed changes nothing
            continue
        label = short.get(key, key.replace("_", "-"))
        if isinstance(value, bool):  # a flag: its name alone
            name += f"__{label}"
        else:
            name += f"__{label}{option_value(value)}"
    return name


def check_writable(out):
    """Fail before any training unless a file can be made in `out`'s nearest existing folder."""
    p = Path(out).absolute()
    while not p.exists():
        p = p.parent
    try:
        tempfile.TemporaryFile(dir=p).close()
    except OSError as e:
        fail(f"--out {out}: cannot write there ({e})")


_claimed = {}  # the run folder this process is making, and the folders it created for it


def claim_run_dir(args, method):
    """The run's folder, made before training: writable, and with runcheck.py beside this file (the repository)
    checked and locked: a finished run is replaced only with its own settings, and a run that another process
    is making now is never started twice. A copy of this file without runcheck.py makes the folder alone."""
    folder = Path(args.out) / run_name(args, method)
    check_writable(args.out)
    runcheck = extra_module("runcheck")
    refused = runcheck.RunError if runcheck is not None else ()  # runcheck.py's refusals, one line each
    try:
        if runcheck is not None:
            runcheck.check_identity(folder, args, NOT_IDENTITY)
        created = [p for p in [folder, *folder.parents] if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        _claimed.update(folder=folder, created=created)
        if runcheck is not None:
            runcheck.lock(folder)
    except refused as e:
        fail(str(e))
    except OSError as e:
        fail(f"--out {args.out}: cannot make the run folder {folder} ({e})")
    if (folder / "metrics.json").is_file():
        print(f"note: {folder} holds a finished run with these settings; this run replaces it when it ends", flush=True)
    return folder


def release_run_dir():
    """Unlock the claimed run folder; remove it, and the folders made for it, where nothing else is in them."""
    if not _claimed:
        return
    if "runcheck" in sys.modules:
        sys.modules["runcheck"].unlock()
    created = _claimed["created"]
    _claimed.clear()
    for p in created:  # the run folder first, then the parents this run made
        try:
            p.rmdir()
        except OSError:  # not empty (a finished run, logs, other runs): kept
            break


def fast_step(step, example_batch, device, enabled, state=()):
    """`step` itself, or with --fast a replay of it captured in a CUDA graph (fastpath.py)."""
    if not enabled:
        return step
    return optional_module("fastpath", "--fast").capture(step, example_batch, device, state)


class Board:
    """--tensorboard: each epoch's numbers (losses, learning rate, seconds) as TensorBoard scalars in the run
    folder; without the flag, nothing. TensorBoard is optional: missing, it is named in one line."""

    def __init__(self, args, folder):
        self.writer = None
        if args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                fail("--tensorboard needs the tensorboard package, which is optional: pip install tensorboard")
            self.writer = SummaryWriter(log_dir=str(folder))

    def log(self, entry, stage=""):
        if self.writer is None:
            return
        for key, value in entry.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{stage}/{key}" if stage else key, value, entry["epoch"])
        self.writer.flush()


#####  Data  #######################################################################################


@dataclass
class Split:
    """One split on the device. Labels stay compact, one byte each (AudioSet's 2 M clips x 527 classes would
    take 4.2 GB a float32 array): the scripts cast a batch at a time."""

    X: torch.Tensor  # (N, T, D) as stored: uint8 and float16 stay so, else float32; on the device
    Y: torch.Tensor  # (N, C) bool: True where the label is present; False where it is absent or missing
    observed: torch.Tensor  # (N, C) bool: True where the label is known
    keys: list = None  # clip names, where the dataset has them
    Y_full: torch.Tensor = None  # (N, C) bool, every label, missing ones included: synthetic data, .h5 with Y_full
    extra: dict = field(default_factory=dict)  # SONYC: truth for the official metric


@dataclass
class Data:
    train: Split
    val: Split
    test: Split
    class_names: list
    scored: np.ndarray  # (C,) bool: classes with observed labels in every split
    input_offset: object = 0.0  # the model's input scaling, (x - input_offset) * input_scale:
    input_scale: object = 1.0  # OpenMIC 0 and 1/255; SONYC-UST the training z-score; else 0 and 1
    info: dict = field(default_factory=dict)


def load_dataset(args, device):
    """A Data with train / val / test on `device`, chosen by args.dataset."""
    if args.dataset == "synthetic":
        arrays, names, info = make_synthetic(), [f"class{c:02d}" for c in range(20)], {}
    elif args.dataset in ("openmic", "sonyc", "audioset"):
        module = optional_module(args.dataset, f"--dataset {args.dataset}")
        try:  # reads data_dir/openmic-2018/, data_dir/sonyc-ust/ or data_dir/audioset/
            arrays, names, info = module.load(Path(args.data_dir), args, write_atomic=write_atomic)
        except module.DataError as e:
            fail(str(e))
    else:
        arrays, names, info = load_h5(Path(args.dataset))
    train = arrays["train"]  # the label options change the training labels only; validation and test keep theirs
    if args.drop_rate > 0:
        train["observed"] = drop_labels(train["observed"], args.drop_rate, args.drop_seed)
    if args.positive_only:  # AudioSet's regime on any data: of the observed labels, only the positives stay
        if info.get("positive_only"):
            fail(f"--positive-only: the training labels of --dataset {args.dataset} are positive-only already")
        train["observed"] = train["Y"] = train["Y"] & train["observed"]  # one array serves both (to_split)

    if args.dataset in DATASETS:  # load_h5 compacts its blocks itself
        for a in arrays.values():
            a["X"] = compact(a["X"], info.get("source", args.dataset))  # uint8, float16 stay so; others float32

    splits = {s: to_split(arrays[s], device) for s in ("train", "val", "test")}
    scored = np.ones(len(names), bool)
    for s, sp in splits.items():
        empty = ~sp.observed.any(0).cpu().numpy()
        scored &= ~empty
        if empty.any():
            warn(
                f"no observed {s} label for class(es) {show([names[c] for c in np.flatnonzero(empty)], 120)}: "
                f"their metrics are NaN, left out of the means"
            )
    tr, va, te = splits.values()
    n_observed = torch.count_nonzero(tr.observed).item()  # not .sum(): that makes an int64 copy first
    print(
        f"data: {args.dataset} | train {len(tr.X)} val {len(va.X)} test {len(te.X)} clips | {tuple(tr.X.shape[1:])}"
        f" frames x features, {str(tr.X.dtype).removeprefix('torch.')} | {len(names)} classes | "
        f"{n_observed / tr.observed.numel():.1%} of train labels observed, "
        f"{torch.count_nonzero(tr.Y).item() / max(n_observed, 1):.0%} of them positive",
        flush=True,
    )
    return Data(tr, va, te, list(names), scored, info.pop("input_offset", 0.0), info.pop("input_scale", 1.0), info)


def count_per_class(mask, rows=65536):
    """(C,) int64: the True entries of each column of a bool (N, C) tensor, a block of rows at a time. torch's
    sum over a bool tensor first makes an int64 copy of it: 8.5 GB for AudioSet's training labels."""
    counts = torch.zeros(mask.shape[1], dtype=torch.int64, device=mask.device)
    for first in range(0, len(mask), rows):
        counts += mask[first : first + rows].sum(0)
    return counts


def has_observed_negative(split):
    """Whether any observed label is a negative; False for positive-only labels (AudioSet's, --positive-only).
    Y is True only where observed, so that is observed != Y (compared without a temporary copy)."""
    return split.Y is not split.observed and not torch.equal(split.Y, split.observed)


def on_device(values, dtype, device):
    return torch.as_tensor(np.ascontiguousarray(values), dtype=dtype).to(device)


def to_split(arrays, device):
    """One split's numpy arrays as a Split of tensors on `device`; X keeps its stored width, labels are bool.
    Where Y and observed are one array (positive-only labels: every observed label is a positive), one tensor
    serves both."""
    observed = on_device(arrays["observed"], torch.bool, device)
    Y = observed if arrays["Y"] is arrays["observed"] else on_device(arrays["Y"], torch.bool, device) & observed
    Y_full = None
    if arrays.get("Y_full") is not None:
        Y_full = on_device(arrays["Y_full"], torch.bool, device)
    return Split(
        X=torch.from_numpy(np.ascontiguousarray(arrays["X"])).to(device),
        Y=Y,
        observed=observed,
        keys=arrays.get("keys"),
        extra=arrays.get("extra", {}),
        Y_full=Y_full,
    )


def make_synthetic(
    n_train=1280, n_val=500, n_test=1500, n_classes=20, frames=10, features=128, seed=2018, strength=(1.5, 4.0)
):
    """OpenMIC-shaped partially labelled data whose complete truth is known (Y_full). Each class has a
    direction in feature space, added with a random strength to a run of 2-6 frames over Gaussian noise;
    classes come in pairs of correlated directions. About 11% of labels are observed, positives about four
    times as often as negatives (as in OpenMIC's annotation). Fixed by its own seed, never by --seed."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    prior = rng.uniform(0.05, 0.25, n_classes)
    base = rng.standard_normal((n_classes // 2, features))
    protos = 0.7 * np.repeat(base, 2, axis=0) + 0.7 * rng.standard_normal((n_classes, features))
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    Y = rng.random((n, n_classes)) < prior  # (N, C)
    length = rng.integers(2, 7, (n, n_classes))
    start = rng.integers(0, frames - length + 1)
    t = np.arange(frames)
    active = Y[:, :, None] & (t >= start[:, :, None]) & (t < (start + length)[:, :, None])  # (N, C, T)
    strength = rng.uniform(*strength, (n, n_classes)).astype(np.float32)
    X = rng.standard_normal((n, frames, features)).astype(np.float32)
    X += np.einsum("nct,nc,cd->ntd", active.astype(np.float32), strength, protos.astype(np.float32))
    observed = rng.random((n, n_classes)) < np.where(Y, 0.30, 0.08)
    cuts = {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val), "test": slice(n_train + n_val, n)}
    return {s: dict(X=X[c], Y=Y[c] & observed[c], observed=observed[c], Y_full=Y[c]) for s, c in cuts.items()}


def drop_labels(observed, rate, seed=DROP_SEED):
    """Remove exactly `rate` of the observed training labels at random (Fig. 5), seeded apart (--drop-seed)."""
    observed = np.array(observed, bool)
    idx = np.flatnonzero(observed)
    drop = np.random.default_rng(seed).choice(idx, size=int(round(rate * len(idx))), replace=False)
    observed.flat[drop] = False
    return observed


MAX_INPUT = 1e15  # the model's batch statistics square its inputs in float32, which ends at 3.4e38
H5_BLOCK_BYTES = 64 << 20  # X of an .h5 file is read in blocks of about this size


def check_x_layout(shape, dtype, path):
    """X's rank, sizes and dtype, before any of it is read."""
    if len(shape) != 3 or 0 in shape[1:]:
        hint = "; for one vector per clip, store X[:, None, :]" if len(shape) == 2 else ""
        fail(f"{path}: X should be (N, T, D) with T, D >= 1, found {tuple(shape)}{hint}")
    if dtype.kind not in "biuf":
        fail(f"{path}: X has dtype {dtype}; expected integers or floats")


def bad_rows(X):
    """Indices of the rows of float X with NaN, inf or |x| > MAX_INPUT, 4,096 rows at a time (no full-size
    temporary), compared in float64 whatever X's width: a float16 inf is caught too."""
    bad = []
    for start in range(0, len(X), 4096):
        block = np.asarray(X[start : start + 4096], dtype=np.float64).reshape(min(4096, len(X) - start), -1)
        with np.errstate(invalid="ignore"):
            ok = (np.abs(block) <= MAX_INPUT).all(axis=1)  # False for NaN and inf
        bad.extend(start + np.flatnonzero(~ok))
    return bad


def compact(X, path, first_row=0, total_rows=None):
    """X checked (rank, dtype, sizes, finite and not huge), in the width it keeps: uint8, float16 or float32.
    A refusal names the file, the dataset and the first bad row (numbered from first_row, of total_rows)."""
    check_x_layout(X.shape, X.dtype, path)
    bad = [] if X.dtype == np.uint8 else bad_rows(X)  # checked before the cast, in float64
    if bad:
        total = len(X) if total_rows is None else total_rows
        fail(
            f"{path}: X has NaN, inf or values beyond ±{MAX_INPUT:g} in row {first_row + bad[0]} "
            f"({len(bad)} bad row(s) here, of {total}; stored as {X.dtype}); rescale X or drop those clips"
        )
    if X.dtype in (np.uint8, np.float16):
        return X
    return X.astype(np.float32, copy=False)


def strings(values, path, name, unique=False):
    """A 1-D array of HDF5 strings (bytes or str, as written) as a list of str; anything else is refused."""
    if not isinstance(values, np.ndarray) or values.ndim != 1 or values.dtype.kind not in "SUO":
        found = f"shape {values.shape} of {values.dtype}" if isinstance(values, np.ndarray) else show(values)
        fail(f"{path}: {name} should be a 1-D array of strings, found {found}")
    out = []
    for v in values.tolist():
        if isinstance(v, bytes):
            try:
                v = v.decode()
            except UnicodeError:
                fail(f"{path}: {name} holds a string that is not UTF-8 ({show(v[:40])})")
        if not isinstance(v, str):
            fail(f"{path}: {name} holds {type(v).__name__} {show(v)}, not a string")
        try:
            v.encode()  # h5py may hand back undecodable bytes as surrogates
        except UnicodeError:
            fail(f"{path}: {name} holds a string that is not UTF-8 ({show(v[:40])})")
        out.append(v)
    if unique and (len(set(out)) < len(out) or "" in out):
        dup = [k for k, count in collections.Counter(out).items() if count > 1][:3] or [""]
        fail(f"{path}: {name} must be unique and non-empty; found {show(dup)} more than once or empty")
    return out


def labels01(values, path, name, shape):
    """A numeric or boolean (N, C) array whose values are all 0 or 1, as bool."""
    if not isinstance(values, np.ndarray) or values.dtype.kind not in "biuf" or values.shape != shape:
        found_shape = getattr(values, "shape", None)
        found_type = getattr(values, "dtype", type(values).__name__)
        fail(f"{path}: {name} should be {shape} numbers or booleans, found {found_shape} of {found_type}")
    if values.dtype.kind != "b" and not np.isin(values, (0, 1)).all():
        others = np.setdiff1d(values, (0, 1))[:3].tolist()
        fail(f"{path}: {name} should hold only 0 and 1 (or booleans); found {show(others)}")
    return values.astype(bool)


def load_h5(path):
    """Your own .h5 (docs/data.md), every part checked before use; X is read in blocks straight into each split
    in its compact width, with no float32 copy. A file it cannot read or that breaks the layout: one line."""
    import h5py

    if not path.is_file():
        fail(f"no such file: {path}")
    guard = extra_module("h5guard")  # HDF5 may loop or crash on a damaged file: read it in a child first
    if guard is not None:
        refusal = guard.probe(path)
        if refusal:
            fail(refusal)
    else:
        print(f"note: h5guard.py is not beside common.py: {path} is read without its guard against damaged files")
    try:
        with h5py.File(path, "r") as f:
            return read_h5_layout(f, path, h5py)
    except UserError:
        raise
    except Exception as e:  # damaged HDF5 structure, dangling or external links, unreadable types
        first_line = str(e).splitlines()[0] if str(e) else ""
        fail(f"cannot read {path}: {type(e).__name__}: {show(first_line, 150)}")


def read_h5_layout(f, path, h5py):
    """The arrays of an open .h5 file in docs/data.md's layout, split into train / val / test."""
    missing = [k for k in ("X", "Y", "observed", "split") if k not in f]
    if "class_names" not in f.attrs:
        missing.append("attribute class_names")
    if missing:
        fail(f"{path}: missing dataset(s) {missing}; expected X, Y, observed, split and attribute class_names")
    d = {k: f[k] for k in ("X", "Y", "observed", "split", "keys", "Y_full") if k in f}
    for k, v in d.items():
        if not isinstance(v, h5py.Dataset):
            fail(f"{path}: {k} should be a dataset, found a {type(v).__name__}")
    need = sum((v.size or 0) * v.dtype.itemsize for v in d.values())  # before anything is read
    if hasattr(os, "sysconf") and need > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"):
        fail(f"{path}: its arrays need {need / 2**30:.0f} GiB, more than this machine's memory")

    split = np.array(strings(d["split"][()], path, "split"))
    n = len(split)
    names = strings(np.asarray(f.attrs["class_names"]), path, "attribute class_names", unique=True)
    if not names:
        fail(f"{path}: class_names is empty: no class to learn")
    unknown = sorted(set(split.tolist()) - {"train", "val", "test"})
    if unknown:
        fail(f"{path}: unknown split name(s) {show(unknown[:3])}; expected train, val, test")
    rows = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    for s, r in rows.items():
        if len(r) == 0:
            fail(f"{path}: no rows with split '{s}'")
    for k in ("Y", "observed", "Y_full"):  # the labels' columns are the classes: say so before their values
        if k in d and d[k].ndim == 2 and d[k].shape[1] != len(names):
            fail(f"{path}: {k} has {d[k].shape[1]} columns but class_names names {len(names)} classes")

    shape = (n, len(names))
    obs = labels01(d["observed"][()], path, "observed", shape)
    Y = d["Y"][()]
    if not isinstance(Y, np.ndarray) or Y.dtype.kind not in "biuf" or Y.shape != shape:
        fail(f"{path}: Y should be {shape} numbers, found {getattr(Y, 'shape', None)} {getattr(Y, 'dtype', '')}")
    labels01(Y[obs], path, "Y where observed", (int(obs.sum()),))  # unobserved entries are ignored
    Y_full = None
    if "Y_full" in d:
        Y_full = labels01(d["Y_full"][()], path, "Y_full", shape)
        if (Y_full[obs] != (Y[obs] == 1)).any():
            fail(f"{path}: Y_full differs from Y where the label is observed")
    keys = None
    if "keys" in d:
        keys = strings(d["keys"][()], path, "keys", unique=True)
        if len(keys) != n:
            fail(f"{path}: keys has {len(keys)} entries for {n} rows")

    dset = d["X"]
    check_x_layout(dset.shape, dset.dtype, path)  # before anything large is read
    if dset.shape[0] != n:
        fail(f"{path}: X has {dset.shape[0]} rows but split has {n} entries")
    width = np.dtype(np.float32) if dset.dtype not in (np.uint8, np.float16) else dset.dtype
    X = {s: np.empty((len(r),) + dset.shape[1:], width) for s, r in rows.items()}
    step = max(1, H5_BLOCK_BYTES // max(1, width.itemsize * dset.shape[1] * dset.shape[2]))
    for a in range(0, n, step):
        block = compact(dset[a : a + step], path, first_row=a, total_rows=n)
        for s, r in rows.items():
            lo, hi = np.searchsorted(r, [a, a + step])
            X[s][lo:hi] = block[r[lo:hi] - a]

    arrays = {}
    for s, r in rows.items():
        arrays[s] = dict(
            X=X[s],
            Y=(Y[r] == 1) & obs[r],
            observed=obs[r],
            keys=[keys[i] for i in r] if keys else None,
            Y_full=None if Y_full is None else Y_full[r],
        )
    return arrays, names, {}


#####  Model  ######################################################################################


def per_feature(value, n_features):
    """A number or a (D,) array as a float32 (D,) tensor: the model's input scaling."""
    return torch.as_tensor(np.asarray(value, np.float32)).expand(n_features).clone()


class AttentionMIL(nn.Module):
    """Attention-pooling multiple-instance network shared by every method (paper Sec. III).

    (B, T, D) -> float32, (x - input_offset) * input_scale -> input BN -> L x [1x1 linear (no bias) -> BN ->
    ReLU -> dropout] -> + residual from the raw input -> per-class attention and classifier heads ->
    attention-weighted mean of the classifier over time, clamped to [0, 1] -> (B, C). A 1x1 convolution over
    time is a Linear on the last axis; BN normalises each feature over batch and frames together. The input
    scaling is buffers in the state_dict: OpenMIC's X / 255 and SONYC-UST's z-score travel with a saved model.
    `positive_boost` > 1 scales the positive frame-level class logits before pooling, in training and at test
    (BoostLU, large_loss.py --boost); it is part of the model, so config carries it to predict.py.
    """

    def __init__(
        self,
        n_features,
        n_classes,
        layers=3,
        hidden=128,
        dropout=0.6,
        input_offset=0.0,
        input_scale=1.0,
        positive_boost=1.0,
    ):
        super().__init__()
        self.config = dict(n_features=n_features, n_classes=n_classes, layers=layers, hidden=hidden, dropout=dropout)
        if positive_boost != 1:
            self.config["positive_boost"] = positive_boost
        self.positive_boost = positive_boost
        self.register_buffer("input_offset", per_feature(input_offset, n_features))  # (D,)
        self.register_buffer("input_scale", per_feature(input_scale, n_features))  # (D,)
        self.input_bn = nn.BatchNorm1d(n_features)
        self.blocks = nn.ModuleList(
            nn.ModuleList([nn.Linear(hidden if i else n_features, hidden, bias=False), nn.BatchNorm1d(hidden)])
            for i in range(layers)
        )
        self.dropout = dropout
        # The residual needs matching widths; project the input only where they differ.
        self.shortcut = nn.Identity() if n_features == hidden else nn.Linear(n_features, hidden, bias=False)
        self.attention = nn.Linear(hidden, n_classes)
        self.classifier = nn.Linear(hidden, n_classes)
        for m in self.modules():  # the paper's init: He-uniform weights, zero biases
            if isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @staticmethod
    def _bn(bn, x):  # (B, T, F) -> BN over B*T -> (B, T, F)
        return bn(x.reshape(-1, x.shape[-1])).view(x.shape)

    def _drop(self, h):  # inverted dropout: on CPU 3x faster than nn.Dropout's bernoulli_ kernel
        if not self.training or self.dropout == 0:
            return h
        return h * (torch.rand_like(h) >= self.dropout) / (1 - self.dropout)

    def forward(self, x):  # x: (B, T, D), any numeric dtype
        x = (x.float() - self.input_offset) * self.input_scale
        h = self._bn(self.input_bn, x)
        for linear, bn in self.blocks:
            h = self._drop(torch.relu(self._bn(bn, linear(h))))  # (B, T, H)
        h = h + self.shortcut(x)  # residual from the raw input
        att = torch.sigmoid(self.attention(h)).clamp(1e-7, 1 - 1e-7)  # (B, T, C)
        att = att / att.sum(dim=1, keepdim=True)  # normalised over time
        logits = self.classifier(h)  # (B, T, C) frame-level class scores
        if self.positive_boost != 1:  # BoostLU (Kim et al. 2023): the positive scores boosted, the negative kept
            logits = torch.where(logits > 0, self.positive_boost * logits, logits)
        cla = torch.sigmoid(logits)  # (B, T, C)
        # a saturated classifier can give 1 + eps: clamp, as the paper's code does with hardtanh(0, 1)
        return (att * cla).sum(dim=1).clamp(0.0, 1.0)  # (B, C)


@torch.no_grad()
def predict(model, X, batch=4096):
    """Scores (N, C) for X (N, T, D) in eval mode, in batches of float32 made one at a time, on X's device."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(X[i : i + batch]) for i in range(0, len(X), batch)])
    model.train(was_training)
    return out


#####  Metrics  ####################################################################################


def _nanmean(values):
    v = np.asarray(values, float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def classwise_f1(scores, Y, mask, names, scored, threshold=0.5):
    """The paper's F1 (Gururani et al. 2019) per class on the entries where mask is True, thresholded at 0.5:
    the unweighted mean of the F1 of 'absent' and 'present' (classification_report's 'macro avg'), and the
    plain positive-class F1; then their mean over classes. Classes not `scored` are NaN."""
    from sklearn.metrics import f1_score

    macro, pos = [], []
    for c in range(Y.shape[1]):
        m = mask[:, c]
        y, pred = Y[m, c].astype(int), (scores[m, c] >= threshold).astype(int)
        ok = scored[c] and m.any()
        macro.append(float(f1_score(y, pred, average="macro", zero_division=0)) if ok else np.nan)
        pos.append(float(f1_score(y, pred, pos_label=1, average="binary", zero_division=0)) if ok else np.nan)
    return dict(
        f1_macro=_nanmean(macro),
        f1_pos_macro=_nanmean(pos),
        per_class_f1_macro=dict(zip(names, macro)),
        per_class_f1_pos=dict(zip(names, pos)),
    )


def pr_area(y, scores):
    """The paper code's AUPRC: precision_recall_curve with (recall 1, precision 0) and (recall 0, precision 1)
    added, and the trapezoid area (`auc`). Not AP: y [1, 0, 1, 0], scores [.9, .8, .4, .1]: 0.791667, AP 0.833333."""
    from sklearn.metrics import auc, precision_recall_curve

    P, R, _ = precision_recall_curve(y, scores)
    return float(auc(np.r_[1.0, R, 0.0], np.r_[0.0, P, 1.0]))


def ranking_metrics(scores, Y, mask, names, scored, suffix="masked"):
    """Threshold-free metrics on the entries where mask is True: the paper's AUPRC (auprc_*) and average
    precision (ap_*), per class, their nan-mean over classes (macro), and all entries pooled (micro)."""
    from sklearn.metrics import average_precision_score

    out = {}
    for name, f in (("auprc", pr_area), ("ap", average_precision_score)):
        per = []
        for c in range(Y.shape[1]):
            m = mask[:, c]
            per.append(float(f(Y[m, c], scores[m, c])) if scored[c] and Y[m, c].any() else float("nan"))
        m = mask & scored[None, :]
        out[f"{name}_macro_{suffix}"] = _nanmean(per)
        out[f"{name}_micro_{suffix}"] = float(f(Y[m], scores[m])) if Y[m].any() else float("nan")
        out[f"per_class_{name}_{suffix}"] = dict(zip(names, per))
    return out


def evaluate(scores, split, data):
    """Test metrics of scores (N, C): F1 at 0.5, AUPRC and AP on the observed labels; calibration, the share of
    all entries scored >= 0.5 against that of positives among observed labels; the same against the complete
    truth where it is known; and the dataset's own metrics, if its reader gives any."""
    scores = scores.float().cpu().numpy() if torch.is_tensor(scores) else scores
    Y, obs = split.Y.cpu().numpy(), split.observed.cpu().numpy()
    out = classwise_f1(scores, Y, obs, data.class_names, data.scored)
    out.update(ranking_metrics(scores, Y, obs, data.class_names, data.scored))
    out["scored_present_share"] = float((scores >= 0.5).mean())
    out["present_share_masked"] = float(Y[obs].mean()) if obs.any() else float("nan")
    if split.Y_full is not None:
        full, everything = split.Y_full.cpu().numpy(), np.ones_like(obs)
        out.update(
            {
                f"{k}_full_truth": v
                for k, v in classwise_f1(scores, full, everything, data.class_names, data.scored).items()
            }
        )
        out.update(ranking_metrics(scores, full, everything, data.class_names, data.scored, "full_truth"))
        out["present_share_full_truth"] = float(full.mean())
    if "metrics" in data.info:  # a dataset's own metrics: SONYC-UST's official DCASE ones, AudioSet's mAP
        out.update(data.info["metrics"](scores, Y, split.extra))
    return out


# The end-of-run line: how well the scores rank (every run's; the complete-truth ones where the truth is
# known), a dataset's own metrics where its reader gives them, then where the scores sit.
HEADLINE = ("f1_macro", "auprc_macro_masked", "ap_macro_masked", "f1_macro_full_truth", "ap_macro_full_truth")
DATASET_HEADLINE = ("dcase_fine_macro_auprc", "dcase_coarse_macro_auprc", "map", "mean_auc", "d_prime")
SHARES = ("scored_present_share", "present_share_masked", "present_share_full_truth")


def headline(test):
    return " ".join(f"{k} {test[k]:.4f}" for k in HEADLINE + DATASET_HEADLINE + SHARES if k in test)


#####  Results  ####################################################################################


def versions():
    import sklearn

    return dict(
        python=platform.python_version(),
        torch=torch.__version__,
        numpy=np.__version__,
        sklearn=sklearn.__version__,
        platform=platform.platform(),
    )


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def file_mode():
    """0666 less the process's umask, the mode open() would give a new file (the umask has no getter: it is
    read by setting it, and set back at once)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path, write):
    """Write through a temp file in the same folder, then rename: never a half-written file; 0666 less umask."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def jsonable(x):
    """Plain JSON values: NaN and inf become null; numpy scalars and arrays, Python ones."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return x


def run_record(args, device, started, **parts):
    record = dict(
        args=vars(args), **parts, seconds=time.time() - started, device=device_name(device), versions=versions()
    )
    if device.type == "cuda":
        record["peak_device_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return record


def save_run(folder, record, networks, primary, model, test_scores, data):
    """Write model.pt, the test predictions and, last, metrics.json, each atomically: a run whose metrics.json
    exists is complete. model.pt (torch.load(..., weights_only=True)) holds CPU tensors: method, primary (the
    reported network), networks (name -> state_dict), config (AttentionMIL's arguments), class_names, input_dtype."""
    networks = {name: {k: v.detach().cpu() for k, v in state.items()} for name, state in networks.items()}
    bundle = dict(
        format="missing-labels model 1",
        method=record["method"],
        primary=primary,
        networks=networks,
        config=model.config,
        class_names=list(data.class_names),
        input_dtype=str(data.train.X.dtype).removeprefix("torch."),
    )
    scores = test_scores.float().cpu().numpy() if torch.is_tensor(test_scores) else test_scores
    test = data.test
    arrays = dict(
        scores=scores,
        observed=test.observed.cpu().numpy(),
        labels=test.Y.cpu().numpy(),
        class_names=np.array(data.class_names),
    )
    if test.Y_full is not None:
        arrays["labels_full_truth"] = test.Y_full.cpu().numpy()
    if test.keys is not None:
        arrays["keys"] = np.array(test.keys)
    if "facts" in data.info:  # what a reader records of its data (AudioSet: padded clips, the validation split)
        record["data"] = data.info["facts"]
    files = data.info.get("files", {})  # a dataset's own files: SONYC-UST's DCASE submission, AudioSet's per class
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "model.pt", lambda p: torch.save(bundle, p))
        write_atomic(folder / "test_predictions.npz", lambda p: np.savez(p, **arrays))
        for name, (write, _) in files.items():
            write_atomic(folder / name, lambda p: write(p, scores, test, record["test"]))
        write_atomic(folder / "metrics.json", lambda p: Path(p).write_text(json.dumps(jsonable(record), indent=1)))
    except OSError as e:
        fail(f"cannot write the run to {folder}: {e}")
    release_run_dir()
    print_closing_lines(folder, record, primary, {name: about for name, (_, about) in files.items()})


ABOUT_HEADLINE = (
    "f1_macro: the paper's F1 at 0.5 on the observed test labels; auprc_/ap_macro_masked: threshold-free, the same "
    "labels; *_full_truth: against every label (synthetic data); map, mean_auc, d_prime: AudioSet's; "
    "scored_present_share: entries scored >= 0.5 (docs/metrics.md)"
)


def print_closing_lines(folder, record, primary, dataset_files):
    """What a run leaves: which network is the result, where its files are, what the headline metrics mean,
    and a warning when the selected epoch is the last (the run may want more epochs) or the first (the network
    has hardly trained)."""
    epochs, best = record["args"]["epochs"], record["best_epoch"]
    print(f"result: network '{primary}' of epoch {best} of {epochs}, selected by its validation loss", flush=True)
    files = "metrics.json (arguments, history, test metrics), model.pt (the networks), test_predictions.npz"
    for name, about in dataset_files.items():
        files += f", {name} ({about})"
    print(f"wrote {folder}/: {files}", flush=True)
    print(f"metrics: {ABOUT_HEADLINE}", flush=True)
    if best == epochs and epochs > 1:
        warn(f"the selected epoch is the last ({best}): the validation loss was still falling; try more --epochs")
    if best == 1 and epochs > 1:  # B0 and others that take missing labels as negatives (docs/results.md)
        warn(
            f"the result is the network of epoch 1 of {epochs}: its validation loss was lowest after one epoch, so "
            f"it has hardly trained; docs/results.md says when this happens (observed labels that over-represent "
            f"positives, a model that learns missing = absent) and what helps"
        )
