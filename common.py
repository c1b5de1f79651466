"""Shared infrastructure for the method scripts: data, model, metrics and plumbing.

This file holds no loss and no training step: every method script keeps its whole
method inline, so that reading one script teaches one method. What lives here is what
every method needs in exactly the same form:

    #####  Command line and run setup   (seeding, device, output folder, errors)
    #####  Data                          (synthetic, OpenMIC-2018, SONYC-UST v2, your own .h5)
    #####  Model                         (the attention-pooling MIL network of the paper)
    #####  Metrics                       (paper F1, masked AUPRC, official DCASE 2020 Task 5)
    #####  Results                       (atomic writes of metrics.json, model.pt, predictions)
    #####  Fast path                     (optional CUDA graph capture of a training step)
"""
import argparse
import csv
import hashlib
import json
import os
import platform
import random
import re
import sys
import tempfile
import time
import zipfile
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


#####################################################################################
#  Command line and run setup
#####################################################################################

DATASETS = ("synthetic", "openmic", "sonyc")


def _dataset_arg(value):
    if value in DATASETS or value.endswith((".h5", ".hdf5")):
        return value
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(DATASETS)} or a path to an .h5 file, got {value!r}")


def positive_int(value):
    v = int(value)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return v


def float_in(lo, hi, hi_open=False):
    def check(value):
        v = float(value)
        if not (lo <= v < hi if hi_open else lo <= v <= hi):
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}{')' if hi_open else ']'}, got {value}")
        return v
    return check


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" except for options whose help already names a per-dataset default."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def make_parser(description, table):
    """The command line shared by every method script. `table` is the script's Table I:
    None-valued options take their default from it, per dataset."""
    def tdef(key):
        return ", ".join(f"{d} {row[key]}" for d, row in table.items())
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    p.add_argument("--dataset", type=_dataset_arg, default="synthetic",
                   help="synthetic (embedded, no download), openmic, sonyc, or a path to your own .h5 file")
    p.add_argument("--data-dir", default="data", help="folder holding openmic-2018/ or sonyc-ust/")
    p.add_argument("--level", choices=("fine", "coarse"), default="fine", help="SONYC-UST label level")
    p.add_argument("--seed", type=int, default=0, help="training seed (the data split never depends on it)")
    p.add_argument("--epochs", type=positive_int, default=100, help="training epochs")
    p.add_argument("--batch-size", type=positive_int, default=64, help="input batch size")
    p.add_argument("--lr", type=float_in(1e-12, 10), default=1e-3, help="Adam learning rate, halved every 30 epochs")
    p.add_argument("--layers", type=positive_int, default=None, help=f"hidden layers L (default: Table I, {tdef('layers')})")
    p.add_argument("--hidden", type=positive_int, default=None, help=f"hidden width H (default: Table I, {tdef('hidden')})")
    p.add_argument("--dropout", type=float_in(0, 1, hi_open=True), default=None,
                   help=f"dropout (default: Table I, {tdef('dropout')})")
    p.add_argument("--drop-rate", type=float_in(0, 1, hi_open=True), default=0.0,
                   help="share of the observed training labels to remove (the paper's Fig. 5)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--fast", action="store_true", help="capture the training step in a CUDA graph (CUDA only)")
    p.add_argument("--out", default="runs", help="folder for run outputs")
    return p


def parse_args(parser, table, argv=None):
    args = parser.parse_args(argv)
    row = table["sonyc" if args.dataset == "sonyc" else "openmic"]  # synthetic and .h5 use the OpenMIC row
    for key, value in row.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def get_device(name=None):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        fail(f"--device {name}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: CUDA is not available on this machine")
    return device


def dataset_tag(args):
    if args.dataset.endswith((".h5", ".hdf5")):
        return Path(args.dataset).stem
    if args.dataset == "sonyc" and args.level == "coarse":
        return "sonyc_coarse"
    return args.dataset


def run_dir(args, method, *suffixes):
    name = f"{dataset_tag(args)}__{method}__seed{args.seed}"
    if args.drop_rate > 0:
        name += f"__drop{args.drop_rate:g}"
    for s in suffixes:
        name += f"__{s}"
    return Path(args.out) / name


def check_writable(path):
    """Fail before any training if `path` cannot be created or written; creates nothing."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK):
        fail(f"--out {path}: cannot write there ({p} is {'not a folder' if not p.is_dir() else 'read-only'})")


def main_guard(main):
    """Run main(); user errors become one line and exit status 2, Ctrl-C exit status 130."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: no metrics.json was written for this run", file=sys.stderr)
        sys.exit(130)


def log_epoch(epoch, epochs, seconds, **values):
    parts = " ".join(f"{k} {v:.4f}" for k, v in values.items())
    print(f"epoch {epoch:3d}/{epochs} | {parts} | {seconds:.2f}s", flush=True)


#####################################################################################
#  Data
#####################################################################################

@dataclass
class Split:
    X: torch.Tensor            # (N, T, D) float32, on the device
    Y: torch.Tensor            # (N, C) float32 in {0, 1}; 0 where the label is missing
    observed: torch.Tensor     # (N, C) bool: True where the label is known
    keys: list = None          # clip names, where the dataset has them
    Y_full: torch.Tensor = None  # synthetic only: every label, missing ones included
    extra: dict = field(default_factory=dict)  # SONYC: truth for the official metric


@dataclass
class Data:
    name: str
    train: Split
    val: Split
    test: Split
    class_names: list
    scored: np.ndarray         # (C,) bool: classes with observed labels in every split
    info: dict = field(default_factory=dict)


def load_dataset(args, device):
    """Returns a Data with train / val / test on `device`, chosen by args.dataset."""
    if args.dataset == "synthetic":
        arrays, names, info = make_synthetic(), [f"class{c:02d}" for c in range(20)], {}
    elif args.dataset == "openmic":
        arrays, names, info = load_openmic(Path(args.data_dir) / "openmic-2018")
    elif args.dataset == "sonyc":
        arrays, names, info = load_sonyc(Path(args.data_dir) / "sonyc-ust", args.level)
    else:
        arrays, names, info = load_h5(Path(args.dataset))
    if args.drop_rate > 0:
        arrays["train"]["observed"] = drop_labels(arrays["train"]["observed"], args.drop_rate)

    def to_split(a):
        t = lambda v, dt: torch.as_tensor(np.ascontiguousarray(v), dtype=dt, device=device)
        obs = t(a["observed"], torch.bool)
        return Split(X=t(a["X"], torch.float32), Y=t(a["Y"], torch.float32) * obs, observed=obs,
                     keys=a.get("keys"), extra=a.get("extra", {}),
                     Y_full=t(a["Y_full"], torch.float32) if "Y_full" in a else None)

    splits = {s: to_split(arrays[s]) for s in ("train", "val", "test")}
    scored = np.ones(len(names), bool)
    for s, sp in splits.items():
        empty = ~sp.observed.any(0).cpu().numpy()
        if empty.any():
            bad = [names[c] for c in np.flatnonzero(empty)]
            warn(f"no observed {s} label for class(es) {bad}: their metrics are NaN and left out of the means")
            scored &= ~empty
    tr = splits["train"]
    print(f"data: {args.dataset} | train {len(tr.X)} val {len(splits['val'].X)} test {len(splits['test'].X)} clips"
          f" | {tuple(tr.X.shape[1:])} frames x features | {len(names)} classes"
          f" | {tr.observed.float().mean().item():.1%} of train labels observed", flush=True)
    return Data(args.dataset, splits["train"], splits["val"], splits["test"], list(names), scored, info)


def drop_labels(observed, rate, seed=1234):
    """Remove `rate` of the observed training labels uniformly at random (the paper's Fig. 5).
    Seeded on its own, so every method and training seed sees the same reduced labels."""
    observed = np.array(observed, bool)
    idx = np.flatnonzero(observed)
    rng = np.random.default_rng(seed)
    drop = rng.choice(idx, size=int(round(rate * len(idx))), replace=False)
    observed.flat[drop] = False
    return observed


def make_synthetic(n_train=1280, n_val=500, n_test=1500, n_classes=20, frames=10, features=128, seed=2018, strength=(1.5, 4.0)):
    """OpenMIC-shaped partially labelled data whose complete truth is known.

    Each class has a direction in feature space; a present class adds it, with a random
    strength, to a random run of 2-6 consecutive frames over Gaussian noise. Classes come
    in pairs whose directions are correlated, so some of them are easy to confuse. About 10%
    of labels are observed, positives about four times as often as negatives (as in OpenMIC's
    annotation), so B0's "missing = negative" is wrong for most positives.
    Fixed by its own seed: every method and training seed sees the same data.
    """
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    prior = rng.uniform(0.05, 0.25, n_classes)
    base = rng.standard_normal((n_classes // 2, features))
    protos = 0.7 * np.repeat(base, 2, axis=0) + 0.7 * rng.standard_normal((n_classes, features))
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    Y = rng.random((n, n_classes)) < prior                                      # (N, C)
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


def _finite_float32(X, path):
    """X as float32, or a clear error naming how many rows hold NaN or inf."""
    X = X.astype(np.float32)
    bad = ~np.isfinite(X).reshape(len(X), -1).all(1)
    if bad.any():
        fail(f"{path}: X has NaN or inf in {bad.sum()} of {len(X)} rows")
    return X


def _strings(values):
    """HDF5 strings come back as bytes or str, depending on how they were written."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


OPENMIC_LAYOUT = """expected layout (the unpacked openmic-2018-v1.0.0.tgz from Zenodo record 1432913,
https://zenodo.org/record/1432913):
  {root}/openmic-2018.npz                  X (N, 10, 128), Y_true (N, 20), Y_mask (N, 20), sample_key (N,)
  {root}/class-map.json                    {{"accordion": 0, ..., "voice": 19}}
  {root}/partitions/split01_train.csv      one sample key per line (or partitions/train01.txt)
  {root}/partitions/split01_test.csv       one sample key per line (or partitions/test01.txt)"""


def load_openmic(root, val_share=0.15, split_seed=0):
    """The official OpenMIC-2018 archive, as downloaded. Validation is a fixed 15% of the
    official train split, drawn with `split_seed`, never with the training seed."""
    if not root.is_dir():
        fail(f"no OpenMIC-2018 folder at {root}\n" + OPENMIC_LAYOUT.format(root=root))
    npz_path = root / "openmic-2018.npz"
    if not npz_path.is_file():
        fail(f"missing {npz_path}\n" + OPENMIC_LAYOUT.format(root=root))
    try:
        # allow_pickle=True only because sample_key is stored as an object array of strings.
        with np.load(npz_path, allow_pickle=True) as z:
            missing = [k for k in ("X", "Y_true", "Y_mask", "sample_key") if k not in z.files]
            if missing:
                fail(f"{npz_path}: missing key(s) {missing}; found {z.files}")
            X, Y_true, Y_mask, keys = (z[k] for k in ("X", "Y_true", "Y_mask", "sample_key"))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        fail(f"cannot read {npz_path}: {e}")
    n = len(keys)
    if X.ndim != 3 or X.shape[0] != n:
        fail(f"{npz_path}: X should be (N, frames, features) with N = {n} keys, found {X.shape}")
    if Y_true.ndim != 2 or Y_mask.shape != Y_true.shape or Y_true.shape[0] != n:
        fail(f"{npz_path}: Y_true and Y_mask should both be (N, C) with N = {n}, found {Y_true.shape} and {Y_mask.shape}")
    X = _finite_float32(X, npz_path)
    map_path = root / "class-map.json"
    try:
        class_map = json.loads(map_path.read_text())
    except (OSError, ValueError) as e:
        fail(f"cannot read {map_path}: {e}")
    if len(class_map) != Y_true.shape[1]:
        fail(f"{map_path} names {len(class_map)} classes but {npz_path} has {Y_true.shape[1]} label columns")
    names = sorted(class_map, key=class_map.get)

    def read_keys(kind):
        for name in (f"split01_{kind}.csv", f"{kind}01.txt"):
            path = root / "partitions" / name
            if path.is_file():
                wanted = [line.strip() for line in path.read_text().splitlines() if line.strip()]
                return path, wanted
        fail(f"missing partitions/split01_{kind}.csv (or partitions/{kind}01.txt) under {root}\n"
             + OPENMIC_LAYOUT.format(root=root))

    row_of = {str(k): i for i, k in enumerate(keys)}
    rows = {}
    for kind in ("train", "test"):
        path, wanted = read_keys(kind)
        unknown = [k for k in wanted if k not in row_of]
        if unknown:
            fail(f"{path}: {len(unknown)} key(s) not in {npz_path.name}, first {unknown[:5]}")
        rows[kind] = np.array([row_of[k] for k in wanted], dtype=np.int64)
    perm = np.random.default_rng(split_seed).permutation(len(rows["train"]))
    n_val = int(round(val_share * len(perm)))
    rows["val"], rows["train"] = rows["train"][perm[:n_val]], rows["train"][np.sort(perm[n_val:])]

    def take(r):
        obs = Y_mask[r].astype(bool)
        return dict(X=X[r] / 255.0, Y=(Y_true[r] >= 0.5) & obs, observed=obs, keys=[str(keys[i]) for i in r])
    return {s: take(rows[s]) for s in ("train", "val", "test")}, names, {}


def load_h5(path):
    """Bring your own embeddings: one .h5 file with datasets X (N, T, D), Y (N, C) in {0, 1},
    observed (N, C) bool, split (N,) strings train/val/test, optional keys (N,) strings, and
    the attribute class_names."""
    import h5py
    if not path.is_file():
        fail(f"no such file: {path}")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("X", "Y", "observed", "split") if k not in f]
            if missing:
                fail(f"{path}: missing dataset(s) {missing}; expected X, Y, observed, split (and attribute class_names)")
            if "class_names" not in f.attrs:
                fail(f"{path}: missing attribute class_names")
            X, Y, obs = f["X"][()], f["Y"][()], f["observed"][()].astype(bool)
            split = np.array(_strings(f["split"][()]))
            keys = _strings(f["keys"][()]) if "keys" in f else None
            names = _strings(f.attrs["class_names"])
    except OSError as e:
        fail(f"cannot read {path}: {e}")
    n = len(split)
    if X.ndim != 3 or X.shape[0] != n:
        fail(f"{path}: X should be (N, T, D) with N = {n} split entries, found {X.shape}")
    if Y.shape != obs.shape or Y.ndim != 2 or Y.shape[0] != n or Y.shape[1] != len(names):
        fail(f"{path}: Y and observed should both be (N, C) = ({n}, {len(names)}), found {Y.shape} and {obs.shape}")
    X = _finite_float32(X, path)
    unknown = sorted(set(split.tolist()) - {"train", "val", "test"})
    if unknown:
        fail(f"{path}: unknown split name(s) {unknown}; expected train, val, test")
    out = {}
    for s in ("train", "val", "test"):
        r = np.flatnonzero(split == s)
        if len(r) == 0:
            fail(f"{path}: no rows with split '{s}'")
        out[s] = dict(X=X[r], Y=(Y[r] > 0.5) & obs[r], observed=obs[r], keys=[keys[i] for i in r] if keys else None)
    return out, names, {}


# ---- SONYC-UST v2 ------------------------------------------------------------------

SONYC_LAYOUT = """expected layout (SONYC-UST v2, Zenodo record 3966543, https://zenodo.org/record/3966543):
  {root}/annotations.csv                 one row per (clip, annotator), as released
  {root}/embeddings/<clip>.npz           OpenL3 output per clip: key 'embedding' (11, 512)
make the embeddings with:
  openl3 audio AUDIO_DIR --output-dir {root}/embeddings --input-repr mel256 --content-type env \\
      --audio-embedding-size 512 --audio-hop-size 1.0"""

FINE_COL = re.compile(r"^(\d+)-(\d+|X)_(.+)_presence$")
COARSE_COL = re.compile(r"^(\d+)_(.+)_presence$")


def read_sonyc_annotations(csv_path):
    """Parse annotations.csv by column name. Returns (rows, taxonomy), where rows is a list of
    (split, audio_filename, annotator_id, presence vector over taxonomy['columns'])."""
    try:
        with open(csv_path, newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader)
            table = list(reader)
    except (OSError, StopIteration, csv.Error) as e:
        fail(f"cannot read {csv_path}: {e}")
    col = {name: i for i, name in enumerate(header)}
    missing = [c for c in ("split", "audio_filename", "annotator_id") if c not in col]
    fine = sorted((int(m[1]), m[2], m[0]) for m in map(FINE_COL.match, header) if m)
    coarse = sorted((int(m[1]), m[0]) for m in map(COARSE_COL.match, header) if m)
    if not fine:
        missing.append("<c>-<f>_<name>_presence (fine tags)")
    if not coarse:
        missing.append("<c>_<name>_presence (coarse tags)")
    if missing:
        fail(f"{csv_path}: missing required column(s) {missing}")
    groups = [c for c, _ in coarse]
    complete = [(c, name) for c, f, name in fine if f != "X"]
    tax = dict(
        coarse_names=[name[:-len("_presence")] for _, name in coarse],
        fine_names=[name[:-len("_presence")] for _, name in complete],
        fine_group=np.array([groups.index(c) for c, _ in complete]),           # (23,) coarse index of each fine tag
        all_fine_names=[name[:-len("_presence")] for _, _, name in fine],
    )
    cols = [name for _, name in complete] + [name for c, f, name in fine if f == "X"] + [name for _, name in coarse]
    tax["x_groups"] = [groups.index(c) for c, f, _ in fine if f == "X"]
    tax["columns"] = cols
    rows = []
    for line, r in enumerate(table, start=2):
        if len(r) != len(header):
            fail(f"{csv_path}, line {line}: {len(r)} fields, header has {len(header)}")
        vals = []
        for name in cols:
            v = r[col[name]].strip()
            try:
                x = float(v)
            except ValueError:
                x = None
            if x not in (-1.0, 0.0, 1.0):
                fail(f"{csv_path}, line {line}: {name} is {v!r}; presence must be -1, 0 or 1")
            vals.append(int(x))
        try:
            annotator = int(float(r[col["annotator_id"]]))
        except ValueError:
            fail(f"{csv_path}, line {line}: annotator_id is {r[col['annotator_id']]!r}, not a number")
        rows.append((r[col["split"]].strip(), r[col["audio_filename"]].strip(), annotator, vals))
    return rows, tax


def aggregate_sonyc(rows, tax):
    """One target per clip, as the DCASE 2020 baseline: train from crowd rows (present if any
    annotator said present), validate and test from the verified row (annotator 0) alone.
    Returns {split: (filenames, values (N, n_columns) in {-1, 0, 1})}."""
    per_clip = {}
    for split, fname, annotator, vals in rows:
        use = annotator > 0 if split == "train" else annotator == 0
        if use and split in ("train", "validate", "test"):
            per_clip.setdefault((split, fname), []).append(vals)
    out = {}
    for split in ("train", "validate", "test"):
        names = sorted(f for s, f in per_clip if s == split)
        agg = []
        for f in names:
            v = np.array(per_clip[(split, f)])                         # (annotators, columns)
            agg.append(np.where((v == 1).any(0), 1, np.where((v == 0).any(0), 0, -1)))
        out[split] = (names, np.array(agg, dtype=np.int64).reshape(len(names), len(tax["columns"])))
    return out


def sonyc_targets(values, tax, level):
    """Targets (N, C), observed mask (N, C) and the X tags present (N, groups). Fine: a fine tag
    is missing where its value is -1 or where its group's X tag is present (the annotator knew
    the group, not the fine type)."""
    n_fine, n_x = len(tax["fine_names"]), len(tax["x_groups"])
    fine, xtag, coarse = values[:, :n_fine], values[:, n_fine:n_fine + n_x], values[:, n_fine + n_x:]
    x_present = np.zeros((len(values), len(tax["coarse_names"])), bool)   # (N, 8)
    x_present[:, tax["x_groups"]] = xtag == 1
    if level == "coarse":
        return coarse == 1, coarse != -1, x_present
    observed = (fine != -1) & ~x_present[:, tax["fine_group"]]
    return fine == 1, observed, x_present


def load_sonyc(root, level):
    csv_path = root / "annotations.csv"
    if not csv_path.is_file():
        fail(f"missing {csv_path}\n" + SONYC_LAYOUT.format(root=root))
    rows, tax = read_sonyc_annotations(csv_path)
    per_split = aggregate_sonyc(rows, tax)
    clips = [f for s in per_split.values() for f in s[0]]
    emb = load_sonyc_embeddings(root, clips, hashlib.sha256(csv_path.read_bytes()).hexdigest())
    out, start = {}, 0
    for split, name in (("train", "train"), ("validate", "val"), ("test", "test")):
        files, values = per_split[split]
        if not files:
            fail(f"{csv_path}: no usable '{split}' clips (train needs crowd rows, validate/test a verified row)")
        Y, observed, x_present = sonyc_targets(values, tax, level)
        truth = dict(fine_truth=values[:, :len(tax["fine_names"])] == 1, x_truth=x_present,  # for the DCASE metric
                     coarse_truth=values[:, -len(tax["coarse_names"]):] == 1)
        out[name] = dict(X=emb[start:start + len(files)], Y=Y, observed=observed, keys=files, extra=truth)
        start += len(files)
    mean = out["train"]["X"].mean((0, 1))
    std = out["train"]["X"].std((0, 1)) + 1e-8
    for s in out.values():
        s["X"] = (s["X"] - mean) / std
    names = tax["coarse_names"] if level == "coarse" else tax["fine_names"]
    return out, names, dict(sonyc=tax, level=level)


def load_sonyc_embeddings(root, clips, csv_hash, shape=(11, 512)):
    """Read embeddings/<clip>.npz for every clip, through a cache file next to the data that is
    keyed on the annotations' hash and the clip list, so a changed annotations.csv is noticed."""
    import h5py
    key = hashlib.sha256((csv_hash + "\n".join(clips)).encode()).hexdigest()
    cache = root / "embeddings_cache.h5"
    if cache.is_file():
        try:
            with h5py.File(cache, "r") as f:
                if f.attrs.get("key") == key:
                    return f["X"][()]
        except OSError:
            pass  # unreadable cache: rebuild it
    X = np.zeros((len(clips),) + shape, np.float32)
    absent, misshaped = [], []
    for i, clip in enumerate(clips):
        path = root / "embeddings" / (Path(clip).stem + ".npz")
        try:
            with np.load(path) as z:
                e = z["embedding"]
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            absent.append(path.name)
            continue
        if e.shape != shape or not np.isfinite(e).all():
            misshaped.append(f"{path.name} {e.shape}")
            continue
        X[i] = e
    if absent:
        fail(f"{root / 'embeddings'}: {len(absent)} embedding file(s) absent or unreadable, first {absent[:5]}\n"
             + SONYC_LAYOUT.format(root=root))
    if misshaped:
        fail(f"{root / 'embeddings'}: {len(misshaped)} embedding(s) not {shape} or not finite, first {misshaped[:5]}")
    def write(p):
        with h5py.File(p, "w") as f:
            f.create_dataset("X", data=X)
            f.attrs["key"] = key
    try:
        _atomic(cache, write)
    except OSError as e:  # a read-only data folder only costs the cache
        warn(f"could not write the embedding cache {cache}: {e}")
    return X


#####################################################################################
#  Model
#####################################################################################

class AttentionMIL(nn.Module):
    """Attention-pooling multiple-instance network shared by every method (paper Sec. III).

    (B, T, D) -> input BN -> L x [1x1 linear (no bias) -> BN -> ReLU -> dropout]
              -> + residual from the raw input -> per-class attention and classifier heads
              -> attention-weighted mean of the classifier over time -> (B, C) probabilities.
    A 1x1 convolution over time is a Linear on the last axis; BN normalises each feature
    over the batch and the frames together.
    """

    def __init__(self, n_features, n_classes, layers=3, hidden=128, dropout=0.6):
        super().__init__()
        self.input_bn = nn.BatchNorm1d(n_features)
        blocks, d = [], n_features
        for _ in range(layers):
            blocks.append(nn.ModuleList([nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden)]))
            d = hidden
        self.blocks = blocks = nn.ModuleList(blocks)
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

    def _drop(self, h):
        # Plain inverted dropout. A uniform draw and a compare is 3x faster on CPU than the
        # bernoulli_ kernel behind nn.Dropout, which took 60% of the forward pass there.
        if not self.training or self.dropout == 0:
            return h
        return h * (torch.rand_like(h) >= self.dropout) / (1 - self.dropout)

    def forward(self, x):                                    # x: (B, T, D)
        h = self._bn(self.input_bn, x)
        for linear, bn in self.blocks:
            h = self._drop(torch.relu(self._bn(bn, linear(h))))  # (B, T, H)
        h = h + self.shortcut(x)                             # residual from the raw input
        att = torch.sigmoid(self.attention(h)).clamp(1e-7, 1 - 1e-7)  # (B, T, C)
        att = att / att.sum(dim=1, keepdim=True)             # normalised over time
        cla = torch.sigmoid(self.classifier(h))              # (B, T, C)
        return (att * cla).sum(dim=1)                        # (B, C)


@torch.no_grad()
def predict(model, X, batch=4096):
    """Scores (N, C) for X (N, T, D) in eval mode, in a few large batches, on X's device."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(X[i:i + batch]) for i in range(0, len(X), batch)])
    model.train(was_training)
    return out


#####################################################################################
#  Metrics
#####################################################################################

def f1_scores(y_true, y_pred):
    """The paper's per-class F1 (Gururani et al. 2019): the unweighted mean of the F1 of
    'absent' and 'present', as scikit-learn's classification_report 'macro avg' computes
    it; and the plain positive-class F1."""
    from sklearn.metrics import f1_score
    macro = f1_score(y_true, y_pred, average="macro", zero_division=0)
    pos = f1_score(y_true, y_pred, pos_label=1, average="binary", zero_division=0)
    return float(macro), float(pos)


def _nanmean(values):
    v = np.asarray(values, float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def classwise_f1(scores, Y, mask, names, scored, threshold=0.5):
    """Per-class F1 on the entries where mask is True; classes not `scored` are NaN."""
    pred = scores >= threshold
    macro, pos = [], []
    for c in range(Y.shape[1]):
        m = mask[:, c]
        if not scored[c] or not m.any():
            macro.append(float("nan")); pos.append(float("nan"))
            continue
        a, b = f1_scores(Y[m, c].astype(int), pred[m, c].astype(int))
        macro.append(a); pos.append(b)
    return dict(f1_macro=_nanmean(macro), f1_pos_macro=_nanmean(pos),
                per_class_f1_macro=dict(zip(names, macro)), per_class_f1_pos=dict(zip(names, pos)))


def masked_auprc(scores, Y, mask, names, scored):
    """The paper's SONYC metric: average precision per class over the observed entries only,
    its mean over classes (macro) and over all observed entries together (micro)."""
    from sklearn.metrics import average_precision_score
    per = []
    for c in range(Y.shape[1]):
        m = mask[:, c]
        ok = scored[c] and m.any() and Y[m, c].any()
        per.append(float(average_precision_score(Y[m, c], scores[m, c])) if ok else float("nan"))
    m = mask & scored[None, :]
    micro = float(average_precision_score(Y[m], scores[m])) if Y[m].any() else float("nan")
    return dict(auprc_macro_masked=_nanmean(per), auprc_micro_masked=micro, per_class_auprc_masked=dict(zip(names, per)))


def evaluate(scores, split, data):
    """Test metrics for scores (N, C) on `split`: masked F1 always; against the complete
    truth on synthetic data; masked AUPRC and the official DCASE metrics on SONYC-UST."""
    if torch.is_tensor(scores):
        scores = scores.float().cpu().numpy()
    Y, obs = split.Y.cpu().numpy(), split.observed.cpu().numpy()
    out = classwise_f1(scores, Y, obs, data.class_names, data.scored)
    if split.Y_full is not None:
        full = classwise_f1(scores, split.Y_full.cpu().numpy(), np.ones_like(obs), data.class_names, data.scored)
        out.update({f"{k}_full_truth": v for k, v in full.items()})
    if "sonyc" in data.info:
        out.update(masked_auprc(scores, Y, obs, data.class_names, data.scored))
        out.update(dcase_metrics(scores, split.extra, data.info["sonyc"], data.info["level"]))
    return out


# ---- The official DCASE 2020 Task 5 metric ------------------------------------------
# Written from a reading of src/metrics.py in sonyc-project/dcase2020task5-uststc-baseline:
# the same thresholds, counts, precision/recall floors and curve end points.

def _pr(tp, fp, fn):
    return tp / np.maximum(tp + fp, 0.5), tp / np.maximum(tp + fn, 0.5)


def _auprc(P, R):
    """Area under the curve (0, 1) -> the points sorted by recall -> (1, 0), by the trapezoid rule.
    Points that share a recall keep their row order (descending thresholds per group, ascending
    for the micro curve). The official code sorts with np.argsort's default, which is not stable:
    where tied recalls carry different precisions its value depends on the numpy version and the
    CPU; numpy 1.x sorted small arrays stably, as we do everywhere."""
    from sklearn.metrics import auc
    order = np.argsort(R, kind="stable")
    return float(auc(np.r_[0.0, R[order], 1.0], np.r_[1.0, P[order], 0.0]))


def _group_counts(scores, truth, x_truth, fine):
    """TP/FP/FN of one coarse group at each of its thresholds (descending).
    scores, truth: (N, K) for the group's complete fine tags, or (N, 1) for a coarse tag.
    x_truth: (N,) its X tag in the ground truth. We never predict X tags (their score is 0),
    and every threshold is >= 0.01, so the predicted X tag is always absent."""
    thr = np.sort(scores.ravel())
    thr = np.unique(np.append(thr[np.searchsorted(thr, 0.01):], 1.0))[::-1]
    counts = []
    for t in thr:
        pred = scores >= t
        if not fine:
            y, p = truth[:, 0], pred[:, 0]
            counts.append((np.sum(y & p), np.sum(~y & p), np.sum(y & ~p)))
            continue
        tp_c = truth & pred                                   # complete truth, complete prediction
        fp_c = ~truth & pred & ~x_truth[:, None]              # FPs only where the truth has no X tag
        fn_c = truth & ~pred
        any_pred = pred.any(1)
        tp_x = x_truth & any_pred & ~tp_c.any(1)              # X in truth: judged coarsely
        fn_x = x_truth & ~truth.any(1) & ~any_pred
        counts.append((tp_c.sum() + tp_x.sum(), fp_c.sum(), fn_c.sum() + fn_x.sum()))
    return thr, np.array(counts, dtype=np.int64).reshape(-1, 3)


def dcase_level(scores_by_group, truth_by_group, x_truth, fine):
    """Macro- and micro-AUPRC and micro-F1 at 0.5 over the coarse groups, as the official code."""
    curves = [_group_counts(s, t, x_truth[:, g], fine)
              for g, (s, t) in enumerate(zip(scores_by_group, truth_by_group))]
    macro = float(np.mean([_auprc(*_pr(*c.T)) for _, c in curves]))
    union = np.unique(np.concatenate([thr for thr, _ in curves]))    # ascending
    total = np.zeros((len(union), 3), np.int64)
    for thr, c in curves:
        # the row of the smallest group threshold >= t (thr is descending, ends at 1.0)
        idx = len(thr) - 1 - np.searchsorted(thr[::-1], union, side="left")
        total += c[idx]
    P, R = _pr(*total.T)
    i = np.flatnonzero(union >= 0.5)[0]
    with np.errstate(divide="ignore"):
        f1 = float(2 / (1 / P[i] + 1 / R[i]))
    return macro, _auprc(P, R), f1


def dcase_metrics(scores, extra, tax, level):
    """The official DCASE 2020 Task 5 metrics. At the fine level the scores are the 23 fine tags;
    a coarse score is the maximum over its fine scores. At the coarse level only coarse metrics."""
    n_groups = len(tax["coarse_names"])
    x_truth, coarse_truth = extra["x_truth"], extra["coarse_truth"]
    out = {}
    if level == "fine":
        g = tax["fine_group"]
        fs = [scores[:, g == k] for k in range(n_groups)]
        ft = [extra["fine_truth"][:, g == k] for k in range(n_groups)]
        out["dcase_fine_macro_auprc"], out["dcase_fine_micro_auprc"], out["dcase_micro_f1"] = \
            dcase_level(fs, ft, x_truth, fine=True)
        coarse_scores = np.stack([s.max(1) for s in fs], 1)
    else:
        coarse_scores = scores
    cs = [coarse_scores[:, [k]] for k in range(n_groups)]
    ct = [coarse_truth[:, [k]] for k in range(n_groups)]
    macro, micro, f1 = dcase_level(cs, ct, x_truth, fine=False)
    out.update(dcase_coarse_macro_auprc=macro, dcase_coarse_micro_auprc=micro)
    out["dcase_coarse_micro_f1"] = f1
    if level == "coarse":
        out["dcase_micro_f1"] = f1
    return out


#####################################################################################
#  Results
#####################################################################################

def versions():
    import sklearn
    return dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
                sklearn=sklearn.__version__, platform=platform.platform())


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def _atomic(path, write):
    """Write through a temp file in the same folder, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, Path):
        return str(x)
    return x


def save_run(folder, metrics, states, test_scores, data):
    """Write model.pt, the test predictions and, last, metrics.json, each atomically. A run
    whose metrics.json exists is complete; the sweep reruns any other."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic(folder / "model.pt", lambda p: torch.save(states, p))
    scores = test_scores.float().cpu().numpy() if torch.is_tensor(test_scores) else test_scores
    test = data.test
    arrays = dict(scores=scores, observed=test.observed.cpu().numpy(), labels=test.Y.cpu().numpy(),
                  class_names=np.array(data.class_names))
    if test.keys is not None:
        arrays["keys"] = np.array(test.keys)

    def write_npz(p):
        with open(p, "wb") as fh:
            np.savez(fh, **arrays)
    _atomic(folder / "test_predictions.npz", write_npz)
    if "sonyc" in data.info:
        _atomic(folder / "test_predictions.csv", lambda p: write_dcase_csv(p, scores, test.keys, data.info))
    _atomic(folder / "metrics.json", lambda p: Path(p).write_text(json.dumps(_jsonable(metrics), indent=1)))
    print(f"wrote {folder}/metrics.json", flush=True)


def write_dcase_csv(path, scores, files, info):
    """Predictions in the DCASE 2020 Task 5 submission layout: audio_filename, every fine tag
    (X tags as 0), every coarse tag (the max over its fine tags at the fine level)."""
    tax, n_groups = info["sonyc"], len(info["sonyc"]["coarse_names"])
    if info["level"] == "fine":
        fine = dict(zip(tax["fine_names"], scores.T))
        coarse = np.stack([scores[:, tax["fine_group"] == k].max(1) for k in range(n_groups)], 1)
    else:
        fine, coarse = {}, scores
    n = len(files)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["audio_filename"] + tax["all_fine_names"] + tax["coarse_names"])
        for i in range(n):
            w.writerow([files[i]] + [f"{fine[f][i]:.6f}" if f in fine else 0 for f in tax["all_fine_names"]]
                       + [f"{v:.6f}" for v in coarse[i]])


def run_record(args, device, started, **parts):
    return dict(args=vars(args), **parts, seconds=time.time() - started,
                device=device_name(device), versions=versions())


#####################################################################################
#  Fast path
#####################################################################################

def adam_options(lr, device, fast):
    """Adam's speed options: fused on CUDA, foreach on CPU; the --fast CUDA graph also needs
    a capturable optimizer whose learning rate is a tensor (the scheduler updates it in place)."""
    if device.type == "cuda":
        if fast:
            return dict(lr=torch.tensor(lr, device=device), fused=True, capturable=True)
        return dict(lr=lr, fused=True)
    return dict(lr=lr, foreach=True)


def fast_step(step, example_batch, device, enabled, state=()):
    """Return `step` unchanged, or on CUDA with --fast a replay of one captured CUDA graph.

    `step(*batch)` must do a whole training step (forward, backward, optimizer step, any EMA)
    on fixed-shape tensors, without host syncs, and return the loss tensor. The optimizer
    comes from adam_options(..., fast=True). `state` lists what a step changes (modules,
    optimizers, tensors): the warm-up steps that capture needs are undone in place, so the
    run starts from the same weights as the eager one. Replays then cost no Python overhead.
    """
    if not enabled:
        return step
    if device.type != "cuda":
        print("--fast: no CUDA device, so this runs the eager step (the fast path is CUDA-only)", flush=True)
        return step
    tensors = [t for s in state if not isinstance(s, torch.optim.Optimizer)
               for t in (s.state_dict().values() if isinstance(s, nn.Module) else [s])]
    saved = [t.detach().clone() for t in tensors]
    static = [b.clone() for b in example_batch]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture: allocates grads and optimizer state
        for _ in range(3):
            step(*static)
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():          # undo the warm-up in place; the graph keeps these addresses
        for t, v in zip(tensors, saved):
            t.copy_(v)
        for opt in (s for s in state if isinstance(s, torch.optim.Optimizer)):
            for st in opt.state.values():
                for v in st.values():
                    if torch.is_tensor(v):
                        v.zero_()  # a fresh Adam: zero moments, step 0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(*static)

    def replay(*batch):
        for buf, b in zip(static, batch):
            buf.copy_(b)
        graph.replay()
        return static_loss.clone()
    return replay
