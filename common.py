"""Shared infrastructure for the method scripts: data, model, metrics and plumbing.

It holds no loss and no training step: every method script keeps its whole method inline,
so that reading one script teaches one method. Here is what every method needs the same way:

    #####  Command line and run setup   (seeding, device, run folders, errors)
    #####  Data                          (synthetic, your own .h5; OpenMIC-2018 and SONYC-UST in their own modules)
    #####  Model                         (the attention-pooling MIL network of the paper)
    #####  Metrics                       (paper F1, the paper's masked AUPRC; DCASE in sonyc.py)
    #####  Results                       (atomic writes of metrics.json, model.pt, predictions)
    #####  Fast path                     (optional CUDA graph capture of a training step)
"""
import argparse
import contextlib
import json
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

import openmic
import sonyc
import synthetic
from fastpath import fast_step  # noqa: F401  (the --fast CUDA graph; the scripts call common.fast_step)


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
DROP_SEED = 1234        # --drop-rate's own seed: every method and training seed sees the same reduced labels
# Options that cannot change a run's result: left out when a finished run is compared with a request.
NOT_IDENTITY = ("out", "device", "threads", "fast")


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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" unless the help names its default itself."""
    def _get_help_string(self, action):
        plain = action.default is None or action.default is False or "default:" in action.help  # flags, self-described
        return action.help if plain else super()._get_help_string(action)


def make_parser(description, table):
    """The command line shared by every method script. `table` is the script's Table I:
    None-valued options take their default from it, per dataset."""
    tdef = lambda key: ", ".join(f"{d} {row[key]}" for d, row in table.items())  # noqa: E731
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--dataset", type=_dataset_arg, default="synthetic",
                   help="synthetic (embedded, no download), openmic, sonyc, or a path to your own .h5 file")
    p.add_argument("--data-dir", default="data", help="folder holding openmic-2018/ or sonyc-ust/")
    p.add_argument("--level", choices=("fine", "coarse"), default="fine", help="SONYC-UST label level")
    p.add_argument("--seed", type=int, default=0, help="training seed (the data split never depends on it)")
    p.add_argument("--epochs", type=positive_int, default=100, help="training epochs")
    p.add_argument("--batch-size", type=positive_int, default=64, help="input batch size")
    p.add_argument("--lr", type=float_in(1e-12, 10), default=1e-3,
                   help="Adam learning rate, halved every 30 epochs (the paper's run scripts: 5e-4 for OpenMIC B0/B1 and SONYC MT)")
    p.add_argument("--layers", type=positive_int, default=None, help=f"hidden layers L (default: Table I, {tdef('layers')})")
    p.add_argument("--hidden", type=positive_int, default=None, help=f"hidden width H (default: Table I, {tdef('hidden')})")
    p.add_argument("--dropout", type=float_in(0, 1, hi_open=True), default=None,
                   help=f"dropout (default: Table I, {tdef('dropout')}; the paper's run scripts: OpenMIC LE 0.3, MT 0.8)")
    p.add_argument("--drop-rate", type=float_in(0, 1, hi_open=True), default=0.0,
                   help="share of the observed training labels to remove (the paper's Fig. 5)")
    p.add_argument("--drop-seed", type=int, default=DROP_SEED, help="seed of which labels --drop-rate removes")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: torch's own choice; 1 on a busy shared machine)")
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


def get_device(name=None, threads=None):
    """The device by name (default: cuda if available), and torch's CPU thread count."""
    if threads:
        torch.set_num_threads(threads)
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        fail(f"--device {name}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: CUDA is not available on this machine")
    return device


def run_dir(args, method, table):
    """{out}/{dataset}__{method}__seed{seed}, plus the sweep's other axes where they are not the
    default: __drop{r}, __dropseed{s}, __gamma{g}, and LE's __teacher-observed."""
    name = Path(args.dataset).stem if args.dataset.endswith((".h5", ".hdf5")) else (
        "sonyc_coarse" if args.dataset == "sonyc" and args.level == "coarse" else args.dataset)
    name += f"__{method}__seed{args.seed}"
    if args.drop_rate > 0:
        name += f"__drop{args.drop_rate:g}" + (f"__dropseed{args.drop_seed}" if args.drop_seed != DROP_SEED else "")
    gamma = table["sonyc" if args.dataset == "sonyc" else "openmic"].get("gamma")
    if getattr(args, "gamma", None) is not None and args.gamma != gamma:
        name += f"__gamma{args.gamma:g}"
    if getattr(args, "teacher_selection", "b0") != "b0":
        name += f"__teacher-{args.teacher_selection}"
    return Path(args.out) / name


def config_diff(recorded, requested):
    """What differs between two runs' arguments, ignoring NOT_IDENTITY; '' when they match."""
    a, b = (json.loads(json.dumps(_jsonable(dict(c)))) for c in (recorded, requested))
    keys = sorted((set(a) | set(b)) - set(NOT_IDENTITY))
    return ", ".join(f"--{k.replace('_', '-')} {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}"
                     for k in keys if a.get(k, "(unset)") != b.get(k, "(unset)"))


def check_writable(out):
    """Fail before any training if `out` cannot be created and written: a file is made and removed
    in its nearest existing folder (a permission check alone would pass /proc/x)."""
    p = Path(out).absolute()
    while not p.exists():
        p = p.parent
    try:
        if not p.is_dir():
            raise OSError(f"{p} is not a folder")
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        fail(f"--out {out}: cannot write there ({e})")


def claim_run_dir(args, method, table):
    """The run's folder, checked before any training: its place can be written, and it holds no
    finished run made with other settings (refused, naming them; the same settings are rerun)."""
    folder = run_dir(args, method, table)
    check_writable(args.out)
    if (folder / "metrics.json").is_file():
        diff = config_diff(read_json(folder / "metrics.json").get("args", {}), vars(args))
        if diff:
            fail(f"{folder} holds a finished run made with other settings ({diff}); "
                 f"use another --out, or delete that folder to replace it")
    return folder


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        fail(f"cannot read {path}: {e}")


def main_guard(main):
    """Run main(); user errors become one line and exit status 2, Ctrl-C exit status 130."""
    try:
        main()
    except (UserError, openmic.OpenMICError, sonyc.SonycError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: no metrics.json was written for this run", file=sys.stderr)
        sys.exit(130)


def _diverged(epoch, history):
    last = next(((e["epoch"], e["train_loss"]) for e in reversed(history) if np.isfinite(e["train_loss"])), None)
    fail(f"training diverged at epoch {epoch}: the loss is not finite (last finite training loss: "
         f"{f'{last[1]:.4g} at epoch {last[0]}' if last else 'none'}); try a lower --lr, or check the scale of the inputs")


def log_epoch(history, epochs, prefix=""):
    """One line for the epoch just appended to `history`; a non-finite loss stops the run (exit 2)."""
    e = history[-1]
    if not all(np.isfinite(v) for k, v in e.items() if "loss" in k):
        _diverged(e["epoch"], history[:-1])
    detail = any(k.startswith("val_loss_") for k in e)       # then val_loss repeats one of them
    parts = " ".join(f"{prefix if k == 'train_loss' else ''}{k} {v:.4f}" for k, v in e.items()
                     if k not in ("epoch", "lr", "seconds") and not (detail and k == "val_loss"))
    print(f"epoch {e['epoch']:3d}/{epochs} | {parts} | {e['seconds']:.2f}s", flush=True)


@contextlib.contextmanager
def stop_on_divergence(history):
    """Around the epoch loop: NaN probabilities make the BCE kernels raise (a device assert on
    CUDA); report that as a diverged run in one line, exit 2, no metrics.json."""
    try:
        yield
    except RuntimeError as e:
        if "between 0 and 1" not in str(e) and "device-side assert" not in str(e):
            raise
        _diverged(len(history) + 1, history)


#####################################################################################
#  Data
#####################################################################################

@dataclass
class Split:
    X: torch.Tensor            # (N, T, D) as stored: uint8 and float16 stay so, else float32; on the device
    Y: torch.Tensor            # (N, C) float32 in {0, 1}; 0 where the label is missing
    observed: torch.Tensor     # (N, C) bool: True where the label is known
    keys: list = None          # clip names, where the dataset has them
    Y_full: torch.Tensor = None  # synthetic only: every label, missing ones included
    extra: dict = field(default_factory=dict)  # SONYC: truth for the official metric


@dataclass
class Data:
    train: Split
    val: Split
    test: Split
    class_names: list
    scored: np.ndarray         # (C,) bool: classes with observed labels in every split
    input_offset: object = 0.0  # the model's input scaling, (x - input_offset) * input_scale:
    input_scale: object = 1.0   # OpenMIC 0 and 1/255; SONYC-UST the training z-score; else 0 and 1
    info: dict = field(default_factory=dict)


def load_dataset(args, device):
    """Returns a Data with train / val / test on `device`, chosen by args.dataset."""
    if args.dataset == "synthetic":
        arrays, names, info = synthetic.make_synthetic(), [f"class{c:02d}" for c in range(20)], {}
    elif args.dataset == "openmic":
        arrays, names, info = openmic.load_openmic(Path(args.data_dir) / "openmic-2018")
    elif args.dataset == "sonyc":
        arrays, names, info = sonyc.load_sonyc(Path(args.data_dir) / "sonyc-ust", args.level, write_atomic=_atomic)
    else:
        arrays, names, info = load_h5(Path(args.dataset))
    if args.drop_rate > 0:
        arrays["train"]["observed"] = drop_labels(arrays["train"]["observed"], args.drop_rate, args.drop_seed)

    source = info.pop("source", args.dataset)
    for a in arrays.values() if not args.dataset.endswith((".h5", ".hdf5")) else ():  # load_h5 compacts its blocks
        a["X"] = compact(a["X"], source)   # uint8 and float16 stay so, anything else becomes float32

    def to_split(a):
        t = lambda v, dt: torch.as_tensor(np.ascontiguousarray(v), dtype=dt).to(device)  # no copy of X on CPU
        obs = t(a["observed"], torch.bool)
        return Split(X=torch.from_numpy(np.ascontiguousarray(a["X"])).to(device), Y=t(a["Y"], torch.float32) * obs,
                     observed=obs, keys=a.get("keys"), extra=a.get("extra", {}),
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
          f" | {tuple(tr.X.shape[1:])} frames x features, {str(tr.X.dtype).removeprefix('torch.')} | {len(names)} classes"
          f" | {tr.observed.float().mean().item():.1%} of train labels observed", flush=True)
    return Data(splits["train"], splits["val"], splits["test"], list(names), scored,
                info.pop("input_offset", 0.0), info.pop("input_scale", 1.0), info)


def drop_labels(observed, rate, seed=DROP_SEED):
    """Remove exactly `rate` of the observed training labels, uniformly at random (the paper's Fig. 5).
    Seeded on its own (--drop-seed), so every method and training seed sees the same reduced labels."""
    observed = np.array(observed, bool)
    idx = np.flatnonzero(observed)
    drop = np.random.default_rng(seed).choice(idx, size=int(round(rate * len(idx))), replace=False)
    observed.flat[drop] = False
    return observed


def compact(X, path, where=""):
    """X in the width it keeps on the device: uint8 and float16 stay so, anything else numeric
    becomes float32. Float32 batches are made inside the model, one batch at a time."""
    if X.ndim == 2:
        fail(f"{path}: X is (N, D) = {X.shape}, one vector per clip; the model wants frames, (N, T, D): "
             f"store X[:, None, :] for clip-level embeddings")
    if X.ndim != 3:
        fail(f"{path}: X should be (N, T, D), found {X.shape}")
    if X.dtype.kind not in "biuf":
        fail(f"{path}: X has dtype {X.dtype}; expected integers or floats")
    with np.errstate(over="ignore"):
        out = X if X.dtype in (np.uint8, np.float16) else X.astype(np.float32, copy=False)
    # finite, checked 4,096 rows at a time: no full-size temporary
    bad = sum(int((~np.isfinite(out[i:i + 4096].reshape(len(out[i:i + 4096]), -1)).all(1)).sum())
              for i in range(0, len(out), 4096)) if out.dtype.kind == "f" else 0
    if bad:
        fail(f"{path}: X has NaN or inf in {bad} of {len(X)} rows{where} (as {out.dtype})")
    return out


def _strings(values):
    """HDF5 strings come back as bytes or str, depending on how they were written."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def load_h5(path, block_bytes=64 << 20):
    """Bring your own embeddings: one .h5 with X (N, T, D), Y (N, C) in {0, 1}, observed (N, C) bool,
    split (N,) strings train/val/test, optional keys (N,) strings, and the attribute class_names.
    X is read in blocks of rows straight into each split's array, in its compact width: no float32 copy."""
    import h5py
    if not path.is_file():
        fail(f"no such file: {path}")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("X", "Y", "observed", "split") if k not in f]
            missing += [] if "class_names" in f.attrs else ["attribute class_names"]
            if missing:
                fail(f"{path}: missing dataset(s) {missing}; expected X, Y, observed, split and attribute class_names")
            Y, obs = f["Y"][()], f["observed"][()].astype(bool)
            split = np.array(_strings(f["split"][()]))
            keys = _strings(f["keys"][()]) if "keys" in f else None
            names = _strings(f.attrs["class_names"])
            n, dset = len(split), f["X"]
            first = compact(dset[:1], path)   # checks rank and dtype before anything large is read
            if dset.shape[0] != n:
                fail(f"{path}: X should be (N, T, D) with N = {n} split entries, found {dset.shape}")
            if Y.shape != obs.shape or Y.ndim != 2 or Y.shape[0] != n or Y.shape[1] != len(names):
                fail(f"{path}: Y and observed should both be (N, C) = ({n}, {len(names)}), found {Y.shape} and {obs.shape}")
            unknown = sorted(set(split.tolist()) - {"train", "val", "test"})
            if unknown:
                fail(f"{path}: unknown split name(s) {unknown}; expected train, val, test")
            rows = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
            for s in [s for s, r in rows.items() if len(r) == 0]:
                fail(f"{path}: no rows with split '{s}'")
            X = {s: np.empty((len(r),) + dset.shape[1:], first.dtype) for s, r in rows.items()}
            step = max(1, block_bytes // max(1, first.nbytes))
            for a in range(0, n, step):
                block = compact(dset[a:a + step], path, f" {a}..{min(a + step, n) - 1}")
                for s, r in rows.items():
                    lo, hi = np.searchsorted(r, [a, a + step])
                    X[s][lo:hi] = block[r[lo:hi] - a]
    except OSError as e:
        fail(f"cannot read {path}: {e}")
    out = {s: dict(X=X[s], Y=(Y[r] > 0.5) & obs[r], observed=obs[r], keys=[keys[i] for i in r] if keys else None)
           for s, r in rows.items()}
    return out, names, {}


#####################################################################################
#  Model
#####################################################################################

class AttentionMIL(nn.Module):
    """Attention-pooling multiple-instance network shared by every method (paper Sec. III).

    (B, T, D) -> float32, (x - input_offset) * input_scale -> input BN
              -> L x [1x1 linear (no bias) -> BN -> ReLU -> dropout]
              -> + residual from the raw input -> per-class attention and classifier heads
              -> attention-weighted mean of the classifier over time, clamped to [0, 1] -> (B, C).
    A 1x1 convolution over time is a Linear on the last axis; BN normalises each feature over
    the batch and the frames together. The input scaling is buffers in the state_dict: OpenMIC's
    X / 255 and SONYC-UST's z-score travel with a saved model, and X may stay uint8 until here.
    """

    def __init__(self, n_features, n_classes, layers=3, hidden=128, dropout=0.6, input_offset=0.0, input_scale=1.0):
        super().__init__()
        self.config = dict(n_features=n_features, n_classes=n_classes, layers=layers, hidden=hidden, dropout=dropout)
        vector = lambda v: torch.as_tensor(np.asarray(v, np.float32)).expand(n_features).clone()
        self.register_buffer("input_offset", vector(input_offset))   # (D,)
        self.register_buffer("input_scale", vector(input_scale))     # (D,)
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

    def forward(self, x):                                    # x: (B, T, D), any numeric dtype
        x = (x.float() - self.input_offset) * self.input_scale
        h = self._bn(self.input_bn, x)
        for linear, bn in self.blocks:
            h = self._drop(torch.relu(self._bn(bn, linear(h))))  # (B, T, H)
        h = h + self.shortcut(x)                             # residual from the raw input
        att = torch.sigmoid(self.attention(h)).clamp(1e-7, 1 - 1e-7)  # (B, T, C)
        att = att / att.sum(dim=1, keepdim=True)             # normalised over time
        cla = torch.sigmoid(self.classifier(h))              # (B, T, C)
        # A saturated classifier (sigmoid = 1.0) and weights summing to 1 + eps can give 1 + eps:
        # clamp, as the paper's code does with hardtanh(0, 1); inside [0, 1] values and gradients pass unchanged.
        return (att * cla).sum(dim=1).clamp(0.0, 1.0)        # (B, C)


@torch.no_grad()
def predict(model, X, batch=4096):
    """Scores (N, C) for X (N, T, D) in eval mode, in batches of float32 made one at a time, on X's device."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(X[i:i + batch]) for i in range(0, len(X), batch)])
    model.train(was_training)
    return out


#####################################################################################
#  Metrics
#####################################################################################

def f1_scores(y_true, y_pred):
    """The paper's per-class F1 (Gururani et al. 2019): the unweighted mean of the F1 of 'absent' and
    'present' (classification_report's 'macro avg'); and the plain positive-class F1."""
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
        a, b = f1_scores(Y[m, c].astype(int), pred[m, c].astype(int)) if scored[c] and m.any() else (np.nan, np.nan)
        macro.append(a); pos.append(b)
    return dict(f1_macro=_nanmean(macro), f1_pos_macro=_nanmean(pos),
                per_class_f1_macro=dict(zip(names, macro)), per_class_f1_pos=dict(zip(names, pos)))


def pr_area(y, scores):
    """The paper code's AUPRC: scikit-learn's precision_recall_curve with the points (recall 1,
    precision 0) and (recall 0, precision 1) added, and the trapezoid area under it (`auc`).
    Not average precision: y [1, 0, 1, 0], scores [.9, .8, .4, .1] give 0.791667, AP 0.833333."""
    from sklearn.metrics import auc, precision_recall_curve
    P, R, _ = precision_recall_curve(y, scores)
    return float(auc(np.r_[1.0, R, 0.0], np.r_[0.0, P, 1.0]))


def masked_auprc(scores, Y, mask, names, scored):
    """The paper's SONYC-UST metric over the observed entries only: per class, the nan-mean over
    classes (macro), and all observed entries pooled (micro); also average precision (ap_*)."""
    from sklearn.metrics import average_precision_score
    out = {}
    for name, f in (("auprc", pr_area), ("ap", average_precision_score)):
        per = []
        for c in range(Y.shape[1]):
            m = mask[:, c]
            per.append(float(f(Y[m, c], scores[m, c])) if scored[c] and Y[m, c].any() else float("nan"))
        m = mask & scored[None, :]
        out[f"{name}_macro_masked"] = _nanmean(per)
        out[f"{name}_micro_masked"] = float(f(Y[m], scores[m])) if Y[m].any() else float("nan")
        out[f"per_class_{name}_masked"] = dict(zip(names, per))
    return out


def evaluate(scores, split, data):
    """Test metrics for scores (N, C) on `split`: masked F1 always; against the complete
    truth on synthetic data; masked AUPRC and the official DCASE metrics on SONYC-UST."""
    scores = scores.float().cpu().numpy() if torch.is_tensor(scores) else scores
    Y, obs = split.Y.cpu().numpy(), split.observed.cpu().numpy()
    out = classwise_f1(scores, Y, obs, data.class_names, data.scored)
    if split.Y_full is not None:
        full = classwise_f1(scores, split.Y_full.cpu().numpy(), np.ones_like(obs), data.class_names, data.scored)
        out.update({f"{k}_full_truth": v for k, v in full.items()})
    if "sonyc" in data.info:
        out.update(masked_auprc(scores, Y, obs, data.class_names, data.scored))
        out.update(sonyc.dcase_metrics(scores, split.extra, data.info["sonyc"], data.info["level"]))
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


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _atomic(path, write):
    """Write through a temp file in the same folder, then rename: never a half-written file.
    The file gets the permissions of any new file (0666 less the umask), not mkstemp's 0600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _jsonable(x):
    """Plain JSON values: NaN and inf become null; numpy scalars and arrays, Python ones."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    return int(x) if isinstance(x, np.integer) else str(x) if isinstance(x, Path) else x


def run_record(args, device, started, **parts):
    record = dict(args=vars(args), **parts, seconds=time.time() - started, device=device_name(device),
                  versions=versions())
    if device.type == "cuda":
        record["peak_device_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return record


def save_run(folder, record, networks, primary, model, test_scores, data):
    """Write model.pt, the test predictions and, last, metrics.json, each atomically: a run whose
    metrics.json exists is complete. model.pt (torch.load(..., weights_only=True)) has the same
    keys in every script: method, primary (the reported network's name), networks (name ->
    state_dict, input scaling included), config (AttentionMIL's arguments), class_names, input_dtype."""
    folder = Path(folder)
    bundle = dict(format="missing-labels model 1", method=record["method"], primary=primary, networks=networks,
                  config=model.config, class_names=list(data.class_names),
                  input_dtype=str(data.train.X.dtype).removeprefix("torch."))
    scores = test_scores.float().cpu().numpy() if torch.is_tensor(test_scores) else test_scores
    test = data.test
    arrays = dict(scores=scores, observed=test.observed.cpu().numpy(), labels=test.Y.cpu().numpy(),
                  class_names=np.array(data.class_names))
    if test.keys is not None:
        arrays["keys"] = np.array(test.keys)

    def write_npz(p):
        with open(p, "wb") as fh:
            np.savez(fh, **arrays)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _atomic(folder / "model.pt", lambda p: torch.save(bundle, p))
        _atomic(folder / "test_predictions.npz", write_npz)
        if "sonyc" in data.info:
            _atomic(folder / "test_predictions.csv", lambda p: sonyc.write_submission(
                p, scores, test.keys, data.info["sonyc"], data.info["level"]))
        _atomic(folder / "metrics.json", lambda p: Path(p).write_text(json.dumps(_jsonable(record), indent=1)))
    except OSError as e:
        fail(f"cannot write the run to {folder}: {e}")
    print(f"wrote {folder}/metrics.json", flush=True)


def load_run(folder, device="cpu"):
    """The reported network of a finished run, rebuilt in eval mode, and its model.pt's metadata:
    model, meta = common.load_run("runs/synthetic__b1__seed0"); scores = common.predict(model, X)."""
    path = Path(folder) / "model.pt"
    try:
        bundle = torch.load(path, map_location=device, weights_only=True)
        model = AttentionMIL(**bundle["config"]).to(device)
        model.load_state_dict(bundle["networks"][bundle["primary"]])
    except FileNotFoundError:
        fail(f"no model.pt in {folder}: not a finished run")
    except Exception as e:  # a corrupt or foreign file fails in many ways; weights_only=True runs nothing
        fail(f"cannot load {path} (a run written by this version of missing-labels?): {(str(e) or type(e).__name__).splitlines()[0]}")
    return model.eval(), {k: v for k, v in bundle.items() if k != "networks"}


#####################################################################################
#  Fast path (fast_step, the --fast CUDA graph capture, lives in fastpath.py)
#####################################################################################

def adam_options(lr, device, fast):
    """Adam's speed options: fused on CUDA, foreach on CPU; the --fast CUDA graph also needs
    a capturable optimizer whose learning rate is a tensor (the scheduler updates it in place,
    from torch 2.4 on: older ones would leave the captured graph at the first rate)."""
    if fast and tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 4):
        fail(f"--fast needs torch >= 2.4; this is torch {torch.__version__}")
    if device.type == "cuda":
        if fast:
            return dict(lr=torch.tensor(lr, device=device), fused=True, capturable=True)
        return dict(lr=lr, fused=True)
    return dict(lr=lr, foreach=True)
