"""SONYC-UST v2 (Cartwright et al., DCASE 2020 Task 5): the reader and the official metric.

Stands alone: numpy and the standard library only, neither torch nor `common`, so it can be copied, or
used to score a DCASE submission without the challenge's pandas/oyaml tool chain:

    python sonyc.py PREDICTIONS.csv ANNOTATIONS.csv --split validate

prints the fine and coarse micro/macro AUPRC and micro-F1 as JSON. `common.load_dataset` calls
`load` for `--dataset sonyc`. Errors are raised as DataError, one line each.
"""

import argparse
import collections
import csv
import hashlib
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np


class DataError(Exception):
    """A SONYC-UST file is missing or not as released: one line, exit status 2, no traceback."""


def fail(msg):
    raise DataError(msg)


LAYOUT = """expected layout (SONYC-UST v2, Zenodo record 3966543, https://zenodo.org/record/3966543):
  {root}/annotations.csv                 one row per (clip, annotator), as released
  {root}/embeddings/<clip>.npz           OpenL3 output per clip: key 'embedding' (11, 512)
make the embeddings with:
  openl3 audio AUDIO_DIR --output-dir {root}/embeddings --input-repr mel256 --content-type env \\
      --audio-embedding-size 512 --audio-hop-size 1.0"""

FINE_COL = re.compile(r"^(\d+)-(\d+|X)_(.+)_presence$")
COARSE_COL = re.compile(r"^(\d+)_(.+)_presence$")


#####################################################################################
#  Annotations: one target per clip, as the DCASE 2020 baseline (and the paper's code)
#####################################################################################


def show(value, width=60):  # a value from the file in a message, cut to `width` characters
    return repr(value) if len(repr(value)) <= width else repr(value)[: width - 5] + " ...'"


def taxonomy(header, csv_path):
    """The fine and coarse tags named by the header, checked: every fine tag's group has its coarse column,
    every coarse group at least one complete fine tag, no tag twice."""
    fine = sorted((int(m[1]), m[2], m[0]) for m in map(FINE_COL.match, header) if m)
    coarse = sorted((int(m[1]), m[0]) for m in map(COARSE_COL.match, header) if m)
    missing = [c for c in ("split", "audio_filename", "annotator_id") if c not in header]
    missing += [] if fine else ["<c>-<f>_<name>_presence (fine tags)"]
    missing += [] if coarse else ["<c>_<name>_presence (coarse tags)"]
    if missing:
        fail(f"{csv_path}: missing required column(s) {missing}")
    twice = sorted(
        {f"{c}-{f}" for c, f, _ in fine if sum(1 for d, g, _ in fine if (d, g) == (c, f)) > 1}
        | {str(c) for c, _ in coarse if sum(1 for d, _ in coarse if d == c) > 1}
    )
    if twice:
        fail(f"{csv_path}: tag(s) {show(twice)} have more than one presence column")
    groups = [c for c, _ in coarse]
    orphans = sorted({c for c, _, _ in fine} - set(groups))
    empty = sorted(set(groups) - {c for c, f, _ in fine if f != "X"})
    if orphans or empty:
        fail(
            f"{csv_path}: the fine tags of group(s) {orphans} have no coarse presence column"
            if orphans
            else f"{csv_path}: coarse group(s) {empty} have no complete fine tag"
        )
    complete = [(c, name) for c, f, name in fine if f != "X"]
    tax = dict(
        coarse_names=[name[: -len("_presence")] for _, name in coarse],
        fine_names=[name[: -len("_presence")] for _, name in complete],
        fine_group=np.array([groups.index(c) for c, _ in complete]),  # (23,) coarse index of each fine tag
        all_fine_names=[name[: -len("_presence")] for _, _, name in fine],
        x_groups=[groups.index(c) for c, f, _ in fine if f == "X"],
    )
    tax["columns"] = (
        [name for _, name in complete] + [name for c, f, name in fine if f == "X"] + [name for _, name in coarse]
    )
    return tax


def read_annotations(csv_path):
    """Parse annotations.csv by column name, every value checked. Returns (rows, taxonomy), where rows is a
    list of (split, audio_filename, annotator_id, presence vector over taxonomy['columns'])."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:  # a BOM (a spreadsheet's save) is accepted
            reader = csv.reader(fh)
            header = next(reader)
            table = list(reader)
    except (OSError, StopIteration, csv.Error, UnicodeDecodeError) as e:
        fail(f"cannot read {csv_path}: {type(e).__name__}: {show(str(e), 100)}")
    header = [h.strip() for h in header]
    if len(set(header)) < len(header):
        fail(f"{csv_path}: column {show(collections.Counter(header).most_common(1)[0][0])} appears twice")
    tax = taxonomy(header, csv_path)
    col = {name: i for i, name in enumerate(header)}
    rows, split_of, clip_of = [], {}, {}
    for line, r in enumerate(table, start=2):
        if len(r) != len(header):
            fail(f"{csv_path}, line {line}: {len(r)} fields, header has {len(header)}")
        vals = []
        for name in tax["columns"]:
            v = r[col[name]].strip()
            try:
                x = float(v)
            except ValueError:
                x = None
            if x not in (-1.0, 0.0, 1.0):
                fail(f"{csv_path}, line {line}: {name} is {show(v)}; presence must be -1, 0 or 1")
            vals.append(int(x))
        split, fname, annotator = (r[col[k]].strip() for k in ("split", "audio_filename", "annotator_id"))
        try:
            ok = float(annotator).is_integer()
        except (ValueError, OverflowError):
            ok = False
        if not ok:
            fail(f"{csv_path}, line {line}: annotator_id is {show(annotator)}, not an integer")
        if split not in ("train", "validate", "test"):
            fail(f"{csv_path}, line {line}: split is {show(split)}; expected train, validate or test")
        if not fname or fname in (".", "..") or any(c in fname for c in "/\\\0") or len(fname.encode()) > 250:
            fail(f"{csv_path}, line {line}: audio_filename {show(fname)} is not a file name")
        if split_of.setdefault(fname, split) != split:
            fail(f"{csv_path}, line {line}: {show(fname)} is in both {split_of[fname]} and {split}")
        if clip_of.setdefault(Path(fname).stem, fname) != fname:
            fail(
                f"{csv_path}, line {line}: {show(fname)} and {show(clip_of[Path(fname).stem])} would share one "
                f"embedding file, {Path(fname).stem}.npz"
            )
        rows.append((split, fname, int(float(annotator)), vals))
    return rows, tax


def aggregate(rows, tax):
    """Train from crowd rows (present if any annotator said present), validate and test from the
    verified row (annotator 0) alone. Returns {split: (filenames, values (N, n_columns) in {-1, 0, 1})}."""
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
            v = np.array(per_clip[(split, f)])  # (annotators, columns)
            agg.append(np.where((v == 1).any(0), 1, np.where((v == 0).any(0), 0, -1)))
        out[split] = (names, np.array(agg, dtype=np.int64).reshape(len(names), len(tax["columns"])))
    return out


def targets(values, tax, level):
    """Targets (N, C), observed mask (N, C) and the X tags present (N, groups). Fine: a fine tag
    is missing where its value is -1 or where its group's X tag is present (the annotator knew
    the group, not the fine type)."""
    n_fine, n_x = len(tax["fine_names"]), len(tax["x_groups"])
    fine, xtag, coarse = values[:, :n_fine], values[:, n_fine : n_fine + n_x], values[:, n_fine + n_x :]
    x_present = np.zeros((len(values), len(tax["coarse_names"])), bool)  # (N, 8)
    x_present[:, tax["x_groups"]] = xtag == 1
    if level == "coarse":
        return coarse == 1, coarse != -1, x_present
    observed = (fine != -1) & ~x_present[:, tax["fine_group"]]
    return fine == 1, observed, x_present


def truth_of(values, tax):
    """What the official metric needs of one split's aggregated values."""
    _, _, x_present = targets(values, tax, "fine")
    return dict(
        fine_truth=values[:, : len(tax["fine_names"])] == 1,
        x_truth=x_present,
        coarse_truth=values[:, -len(tax["coarse_names"]) :] == 1,
    )


def load_sonyc(root, level, write_atomic=None):
    """SONYC-UST v2 as released plus the OpenL3 embeddings. Returns ({split: arrays}, class names,
    info). X keeps its float32 embeddings as stored: info's input_offset / input_scale are the
    training split's z-score (mean, 1 / std over clips and frames), which the model applies; info's
    metrics and files add the official DCASE metrics and the submission CSV to every run."""
    csv_path = root / "annotations.csv"
    if not csv_path.is_file():
        fail(f"missing {csv_path}\n" + LAYOUT.format(root=root))
    rows, tax = read_annotations(csv_path)
    per_split = aggregate(rows, tax)
    clips = [f for s in per_split.values() for f in s[0]]
    emb = load_embeddings(root, clips, hashlib.sha256(csv_path.read_bytes()).hexdigest(), write_atomic=write_atomic)
    out, start = {}, 0
    for split, name in (("train", "train"), ("validate", "val"), ("test", "test")):
        files, values = per_split[split]
        if not files:
            fail(f"{csv_path}: no usable '{split}' clips (train needs crowd rows, validate/test a verified row)")
        Y, observed, _ = targets(values, tax, level)
        out[name] = dict(
            X=emb[start : start + len(files)], Y=Y, observed=observed, keys=files, extra=truth_of(values, tax)
        )
        start += len(files)
    total, squares, count = 0.0, 0.0, 0
    for i in range(0, len(out["train"]["X"]), 1024):  # float64 sums, 1,024 clips at a time
        x = out["train"]["X"][i : i + 1024].reshape(-1, emb.shape[-1]).astype(np.float64)
        total, squares, count = total + x.sum(0), squares + (x * x).sum(0), count + len(x)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0)) + 1e-8
    names = tax["coarse_names"] if level == "coarse" else tax["fine_names"]
    return (
        out,
        names,
        dict(
            input_offset=mean.astype(np.float32),
            input_scale=(1 / std).astype(np.float32),
            metrics=lambda scores, labels, truth: dcase_metrics(scores, truth, tax, level),  # common.evaluate
            files={  # common.save_run
                "test_predictions.csv": (
                    lambda path, scores, split, test: write_submission(path, scores, split.keys, tax, level),
                    "DCASE submission",
                )
            },
        ),
    )


def load(data_dir, options=None, write_atomic=None):
    """What common.load_dataset calls for --dataset sonyc: data_dir/sonyc-ust/ (annotations.csv, embeddings/),
    at options.level (fine or coarse)."""
    return load_sonyc(data_dir / "sonyc-ust", getattr(options, "level", "fine"), write_atomic=write_atomic)


def _cache_key(root, clips, csv_hash):
    """The annotations' hash, the clip list, and the size and modification time of every
    embedding file: recomputed embeddings rebuild the cache, not only a changed annotations.csv."""
    h = hashlib.sha256(csv_hash.encode())
    for clip in clips:
        path = root / "embeddings" / (Path(clip).stem + ".npz")
        try:
            st = path.stat()
            h.update(f"{clip}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{clip}:absent\n".encode())
    return h.hexdigest()


def read_npy(zf, name, shape, kinds):
    """A member of an open .npz, without pickle: its header must claim `shape` and a dtype of `kinds` before
    anything is read, and the data is read to the member's end, so that its CRC is checked."""
    with zf.open(name) as fh:
        version = np.lib.format.read_magic(fh)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        got, fortran, dtype = read_header[version](fh)
        if got != shape or dtype.kind not in kinds:
            raise ValueError(f"{got} {dtype}")
        n = int(np.prod(shape)) * dtype.itemsize
        data = fh.read(n + 1)
        if len(data) != n:
            raise ValueError("damaged: its size does not match its header")
        return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")


def read_embedding(path, shape):
    """`embedding` of one openl3 .npz, or what is wrong with it."""
    try:
        with zipfile.ZipFile(path) as zf:
            e = read_npy(zf, "embedding.npy", shape, "fiu")
    except ValueError as e:
        return None, str(e)
    except Exception as e:  # not a zip, no embedding member, a damaged header, zip or CRC
        return None, f"unreadable ({type(e).__name__})"
    return (e, None) if np.isfinite(e).all() else (None, "NaN or inf")


def load_embeddings(root, clips, csv_hash, shape=(11, 512), write_atomic=None):
    """Read embeddings/<clip>.npz for every clip through a cache file next to the data,
    embeddings_cache.npz, keyed by _cache_key; a cache damaged in any way is rebuilt."""
    key = _cache_key(root, clips, csv_hash)
    cache = root / "embeddings_cache.npz"
    try:
        with zipfile.ZipFile(cache) as zf:
            if str(read_npy(zf, "key.npy", (), "U")) == key:
                X = read_npy(zf, "X.npy", (len(clips),) + shape, "f").astype(np.float32)
                if np.isfinite(X).all():
                    return X
    except Exception:
        pass  # no cache, an old one, or a damaged one: (re)build it
    X = np.zeros((len(clips),) + shape, np.float32)
    absent, bad = [], []
    for i, clip in enumerate(clips):
        path = root / "embeddings" / (Path(clip).stem + ".npz")
        if not path.is_file():
            absent.append(path.name)
            continue
        e, problem = read_embedding(path, shape)
        if problem:
            bad.append(f"{path.name}: {problem}")
            continue
        X[i] = e
    if absent:
        fail(
            f"{root / 'embeddings'}: {len(absent)} embedding file(s) absent, first {show(absent[:3], 100)}\n"
            + LAYOUT.format(root=root)
        )
    if bad:
        fail(f"{root / 'embeddings'}: {len(bad)} embedding(s) not {shape} finite numbers, first {show(bad[:2], 150)}")
    if write_atomic is not None:
        try:
            write_atomic(cache, lambda p: np.savez(p, X=X, key=np.array(key)))
        except OSError as e:  # a read-only data folder only costs the cache
            print(f"warning: could not write the embedding cache {cache}: {e}", file=sys.stderr)
    return X


#####################################################################################
#  The official DCASE 2020 Task 5 metric
#  Written from a reading of src/metrics.py in sonyc-project/dcase2020task5-uststc-baseline:
#  the same thresholds, counts, precision/recall floors and curve end points.
#####################################################################################


def _pr(tp, fp, fn):
    return tp / np.maximum(tp + fp, 0.5), tp / np.maximum(tp + fn, 0.5)


def _auprc(P, R):
    """Area under the curve (0, 1) -> the points sorted by recall -> (1, 0), by the trapezoid rule.
    Points that share a recall keep their row order (descending thresholds per group, ascending
    for the micro curve). The official code sorts with np.argsort's default, which is not stable:
    where tied recalls carry different precisions its value depends on the numpy version and the
    CPU; numpy 1.x sorted small arrays stably, as we do everywhere."""
    order = np.argsort(R, kind="stable")
    x, y = np.r_[0.0, R[order], 1.0], np.r_[1.0, P[order], 0.0]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def _group_counts(scores, truth, x_truth, fine):
    """TP/FP/FN of one coarse group at each of its thresholds (descending).
    scores, truth: (N, K) for the group's complete fine tags, or (N, 1) for a coarse tag.
    x_truth: (N,) its X tag in the ground truth. X tags are never predicted here (their score
    is 0), and every threshold is >= 0.01, so the predicted X tag is always absent."""
    thr = np.sort(scores.ravel())
    thr = np.unique(np.append(thr[np.searchsorted(thr, 0.01) :], 1.0))[::-1]
    counts = []
    for t in thr:
        pred = scores >= t
        if not fine:
            y, p = truth[:, 0], pred[:, 0]
            counts.append((np.sum(y & p), np.sum(~y & p), np.sum(y & ~p)))
            continue
        tp_c = truth & pred  # complete truth, complete prediction
        fp_c = ~truth & pred & ~x_truth[:, None]  # FPs only where the truth has no X tag
        fn_c = truth & ~pred
        any_pred = pred.any(1)
        tp_x = x_truth & any_pred & ~tp_c.any(1)  # X in truth: judged coarsely
        fn_x = x_truth & ~truth.any(1) & ~any_pred
        counts.append((tp_c.sum() + tp_x.sum(), fp_c.sum(), fn_c.sum() + fn_x.sum()))
    return thr, np.array(counts, dtype=np.int64).reshape(-1, 3)


def dcase_level(scores_by_group, truth_by_group, x_truth, fine):
    """Macro- and micro-AUPRC and micro-F1 at 0.5 over the coarse groups, as the official code."""
    curves = [_group_counts(s, t, x_truth[:, g], fine) for g, (s, t) in enumerate(zip(scores_by_group, truth_by_group))]
    macro = float(np.mean([_auprc(*_pr(*c.T)) for _, c in curves]))
    union = np.unique(np.concatenate([thr for thr, _ in curves]))  # ascending
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


def dcase_metrics(scores, extra, tax, level, coarse_scores=None):
    """The official DCASE 2020 Task 5 metrics. At the fine level the scores are the 23 fine tags;
    a coarse score is the maximum over its fine scores unless `coarse_scores` are given. At the
    coarse level the scores are the 8 coarse tags and only coarse metrics are computed."""
    n_groups = len(tax["coarse_names"])
    x_truth, coarse_truth = extra["x_truth"], extra["coarse_truth"]
    out = {}
    if level == "fine":
        g = tax["fine_group"]
        fs = [scores[:, g == k] for k in range(n_groups)]
        ft = [extra["fine_truth"][:, g == k] for k in range(n_groups)]
        out["dcase_fine_macro_auprc"], out["dcase_fine_micro_auprc"], out["dcase_micro_f1"] = dcase_level(
            fs, ft, x_truth, fine=True
        )
        if coarse_scores is None:
            coarse_scores = np.stack([s.max(1) for s in fs], 1)
    else:
        coarse_scores = scores
    cs = [coarse_scores[:, [k]] for k in range(n_groups)]
    ct = [coarse_truth[:, [k]] for k in range(n_groups)]
    macro, micro, f1 = dcase_level(cs, ct, x_truth, fine=False)
    out.update(dcase_coarse_macro_auprc=macro, dcase_coarse_micro_auprc=micro, dcase_coarse_micro_f1=f1)
    if level == "coarse":
        out["dcase_micro_f1"] = f1
    return out


#####################################################################################
#  The submission CSV: written by every run on SONYC-UST, read back by the scorer below
#####################################################################################


def write_submission(path, scores, files, tax, level):
    """Predictions in the DCASE 2020 Task 5 submission layout: audio_filename, every fine tag
    (X tags as 0), every coarse tag (the max over its fine tags at the fine level). Scores are
    written with 9 significant digits, so a float32 score reads back exactly."""
    n_groups = len(tax["coarse_names"])
    if level == "fine":
        fine = dict(zip(tax["fine_names"], scores.T))
        coarse = np.stack([scores[:, tax["fine_group"] == k].max(1) for k in range(n_groups)], 1)
    else:
        fine, coarse = {}, scores
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["audio_filename"] + tax["all_fine_names"] + tax["coarse_names"])
        for i, name in enumerate(files):
            w.writerow(
                [name]
                + [f"{fine[f][i]:.9g}" if f in fine else 0 for f in tax["all_fine_names"]]
                + [f"{v:.9g}" for v in coarse[i]]
            )


def score_submission(pred_path, annotations_path, split="validate"):
    """The official metrics of a submission CSV against the verified rows of `split`. X-tag
    columns are not scored (this project never predicts them; see _group_counts)."""
    rows, tax = read_annotations(annotations_path)
    files, values = aggregate(rows, tax)[split]
    if not files:
        fail(f"{annotations_path}: no '{split}' clip with a verified row")
    try:
        with open(pred_path, newline="") as fh:
            table = list(csv.reader(fh))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        fail(f"cannot read {pred_path}: {e}")
    if not table:
        fail(f"{pred_path}: empty file")
    col = {name: i for i, name in enumerate(table[0])}
    wanted = ["audio_filename"] + tax["fine_names"] + tax["coarse_names"]
    missing = [c for c in wanted if c not in col]
    if missing:
        fail(f"{pred_path}: missing column(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    row_of = {r[col["audio_filename"]]: r for r in table[1:] if len(r) == len(table[0])}
    absent = [f for f in files if f not in row_of]
    if absent:
        fail(f"{pred_path}: no prediction for {len(absent)} '{split}' clip(s), first {absent[:5]}")
    try:
        scores = np.array([[float(row_of[f][col[c]]) for c in wanted[1:]] for f in files], np.float32)
    except ValueError as e:
        fail(f"{pred_path}: {e}")
    if not np.isfinite(scores).all():
        fail(f"{pred_path}: scores must be finite numbers")
    n_fine = len(tax["fine_names"])
    return dcase_metrics(scores[:, :n_fine], truth_of(values, tax), tax, "fine", coarse_scores=scores[:, n_fine:])


def main(argv=None):
    p = argparse.ArgumentParser(description="Score a DCASE 2020 Task 5 submission CSV with the official metrics.")
    p.add_argument("predictions", type=Path, help="submission CSV (audio_filename, fine tags, coarse tags)")
    p.add_argument("annotations", type=Path, help="SONYC-UST v2 annotations.csv")
    p.add_argument(
        "--split",
        choices=("validate", "test"),
        default="validate",
        help="split whose verified rows are the truth (default: validate)",
    )
    args = p.parse_args(argv)
    try:
        print(json.dumps(score_submission(args.predictions, args.annotations, args.split), indent=1))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
