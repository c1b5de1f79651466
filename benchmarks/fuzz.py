"""Fuzz the four data readers: seeded random corruptions of small valid datasets in the official layouts.

    python benchmarks/fuzz.py                          # 1,000 cases per reader, seed 0
    python benchmarks/fuzz.py --cases 300 --seed 7 --readers h5 audioset

Each case copies a valid dataset (OpenMIC-2018 as the archive unpacks, SONYC-UST v2 as released with openl3's
embeddings, an .h5 in this project's layout, AudioSet's embeddings as the features archive unpacks), applies
one random corruption drawn from the tables below (truncation, byte flips, wrong dtypes and shapes, NaN and
inf, out-of-range values, missing and extra members, columns, fields and files, non-UTF-8 and very long
strings, duplicate and overlapping ids, damaged zip, HDF5 and TFRecord structure, crafted pickles, ...) and
loads it as a run does (common.load_dataset). An independent reader written here, which shares no code with
the project's, decides whether the corrupted files are still valid data. A case passes when the run loads
valid data and gets the same arrays as the independent reader, or stops with the project's one-line error
(under 300 characters) on invalid data. It fails on a traceback, a hang (60 s), invalid data loaded, wrong
data loaded, or valid data refused. Prints a table; exit 1 on a failure.

Both readers of a case run in one child process, each under the same timeout: HDF5 can loop in C on a damaged
file, out of reach of anything in the process that runs it.
"""

import argparse
import contextlib
import csv
import io
import json
import math
import multiprocessing
import pickle
import random
import re
import shutil
import struct
import sys
import tempfile
import time
import zipfile
from argparse import Namespace
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import h5guard  # noqa: E402
from benchmarks.fixtures import (  # noqa: E402
    HugeArray,
    Payload,
    crc32c_bitwise,
    pb_field,
    read_openmic_npz,
    sequence_example,
    write_audioset,
    write_h5,
    write_openmic,
    write_sonyc,
    write_tfrecord,
)

READERS = ("openmic", "sonyc", "h5", "audioset")
TIMEOUT = 60  # seconds a reader may take on one case; h5guard's CPU budget is set below it


class Invalid(Exception):
    """The independent reader's verdict: these files are not valid data."""


def need(condition, why="invalid"):
    if not condition:
        raise Invalid(why)


#####  Independent readers: what a valid dataset is, written apart from the project's code  ##################


def ref_strings(values, n=None, unique=False):
    need(isinstance(values, np.ndarray) and values.ndim == 1, "not a 1-D array")
    out = []
    for v in values.tolist():
        need(isinstance(v, (str, bytes)), "not a string")
        try:
            out.append(v.decode("utf-8") if isinstance(v, bytes) else v)
            out[-1].encode("utf-8")
        except UnicodeError:
            raise Invalid("not UTF-8")
    need(n is None or len(out) == n, "length")
    need(not unique or (len(set(out)) == len(out) and "" not in out), "not unique")
    return out


def ref_x(X):
    need(isinstance(X, np.ndarray) and X.ndim == 3 and X.shape[0] >= 1 and X.shape[1] >= 1 and X.shape[2] >= 1)
    need(X.dtype.kind in "biuf", "X dtype")
    kept = X if X.dtype in (np.uint8, np.float16) else X.astype(np.float32)
    need(X.dtype == np.uint8 or bool(np.all(np.abs(kept.astype(np.float64)) <= 1e15)), "X not finite or too large")
    return kept


def ref_zero_one(a, shape):
    need(isinstance(a, np.ndarray) and a.shape == shape and a.dtype.kind in "biuf", "not (N, C) numbers")
    need(a.dtype.kind == "b" or bool(np.all((a == 0) | (a == 1))), "not 0/1")
    return a.astype(bool)


def ref_h5(folder):
    with h5py.File(folder / "mine.h5", "r") as f:  # any exception here: not valid data (run_case)
        parts = {}
        for k in ("X", "Y", "observed", "split", "keys", "Y_full"):
            if k in f:
                need(isinstance(f[k], h5py.Dataset), "not a dataset")
                parts[k] = f[k][()]
        names = f.attrs["class_names"]
    need(all(k in parts for k in ("X", "Y", "observed", "split")), "missing")
    split = ref_strings(parts["split"])
    n = len(split)
    names = ref_strings(np.asarray(names) if np.ndim(names) == 1 else None, unique=True)
    need(
        len(names) >= 1
        and n >= 1
        and set(split) <= {"train", "val", "test"}
        and {"train", "val", "test"} <= set(split),
        "splits",
    )
    obs = ref_zero_one(parts["observed"], (n, len(names)))
    Y = parts["Y"]
    need(isinstance(Y, np.ndarray) and Y.shape == (n, len(names)) and Y.dtype.kind in "biuf", "Y")
    need(bool(np.all((Y[obs] == 0) | (Y[obs] == 1))), "Y where observed")
    full = ref_zero_one(parts["Y_full"], (n, len(names))) if "Y_full" in parts else None
    need(full is None or bool(np.all(full[obs] == (Y[obs] == 1))), "Y_full")
    keys = ref_strings(parts["keys"], n, unique=True) if "keys" in parts else None
    X = ref_x(parts["X"])
    need(len(X) == n, "X rows")
    rows = {s: [i for i, v in enumerate(split) if v == s] for s in ("train", "val", "test")}
    return {
        s: dict(X=X[r], Y=(Y[r] == 1) & obs[r], observed=obs[r], keys=None if keys is None else [keys[i] for i in r])
        for s, r in rows.items()
    }, names


class RefUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        need(module.split(".")[0] == "numpy" and name in ("_reconstruct", "ndarray", "dtype"), "pickle global")
        return super().find_class(module, name)


def ref_npz_member(zf, name):
    need(name in zf.namelist(), "member missing")
    with zf.open(name) as fh:
        version = np.lib.format.read_magic(fh)
        need(version in ((1, 0), (2, 0)), "npy version")
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = header(fh)
        size = math.prod(shape)
        need(size * max(dtype.itemsize, 1) <= 1 << 28, "too large")
        if dtype.hasobject:
            a = RefUnpickler(fh).load()
            need(isinstance(a, np.ndarray) and a.shape == shape, "object member")
            return a
        data = fh.read()
        need(len(data) == size * dtype.itemsize, "size")
        return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")


def ref_openmic(folder):
    root = folder / "openmic-2018"  # any exception here: not valid data (run_case)
    with zipfile.ZipFile(root / "openmic-2018.npz") as zf:
        X, Y_true, Y_mask, keys = (ref_npz_member(zf, f"{k}.npy") for k in ("X", "Y_true", "Y_mask", "sample_key"))
    class_map = json.loads(
        (root / "class-map.json").read_bytes().decode("utf-8-sig"), object_pairs_hook=lambda pairs: pairs
    )
    parts = {}
    for kind in ("train", "test"):
        files = [root / "partitions" / f"split01_{kind}.csv", root / "partitions" / f"{kind}01.txt"]
        text = next(p for p in files if p.is_file()).read_bytes().decode("utf-8-sig")
        parts[kind] = [line.strip() for line in text.splitlines() if line.strip()]
    need(X.dtype.kind != "O" and Y_true.dtype.kind != "O" and Y_mask.dtype.kind != "O", "objects")
    keys = ref_strings(keys.ravel() if isinstance(keys, np.ndarray) else None, unique=True)
    n = len(keys)
    X = ref_x(X)
    need(len(X) == n, "X rows")
    need(Y_true.ndim == 2 and Y_true.shape[0] == n and Y_true.shape[1] >= 1 and Y_true.dtype.kind in "biuf", "Y_true")
    need(bool(np.all(np.isfinite(Y_true) & (Y_true >= 0) & (Y_true <= 1))), "Y_true range")
    obs = ref_zero_one(Y_mask, Y_true.shape)
    need(isinstance(class_map, list) and all(isinstance(k, str) and type(v) is int for k, v in class_map), "map")
    names = [k for k, _ in class_map]
    need(len(set(names)) == len(names) and "" not in names, "map names")
    need(sorted(v for _, v in class_map) == list(range(Y_true.shape[1])), "map indices")
    names = [k for k, _ in sorted(class_map, key=lambda kv: kv[1])]
    row = {k: i for i, k in enumerate(keys)}
    for kind in ("train", "test"):
        need(len(set(parts[kind])) == len(parts[kind]) and all(k in row for k in parts[kind]), "partition keys")
    need(not set(parts["train"]) & set(parts["test"]) and len(parts["train"]) >= 2 and parts["test"], "partitions")
    train = np.array([row[k] for k in parts["train"]])
    perm = np.random.default_rng(0).permutation(len(train))
    n_val = min(max(1, int(round(0.15 * len(train)))), len(train) - 1)
    rows = dict(
        train=train[np.sort(perm[n_val:])], val=train[perm[:n_val]], test=np.array([row[k] for k in parts["test"]])
    )
    return {
        s: dict(X=X[r], Y=(Y_true[r] >= 0.5) & obs[r], observed=obs[r], keys=[keys[i] for i in r])
        for s, r in rows.items()
    }, names


PRESENCE = re.compile(r"^(\d+)(?:-(\d+|X))?_.+_presence$")


def ref_sonyc(folder):
    root = folder / "sonyc-ust"  # any exception here: not valid data (run_case)
    with open(root / "annotations.csv", newline="", encoding="utf-8-sig") as fh:
        table = list(csv.reader(fh))
    need(len(table) >= 1, "empty")
    header = [h.strip() for h in table[0]]
    need(len(set(header)) == len(header), "duplicate column")
    need({"split", "audio_filename", "annotator_id"} <= set(header), "columns")
    tags = [(h, PRESENCE.match(h)) for h in header]
    fine = sorted((int(m[1]), m[2], h) for h, m in tags if m and m[2])
    coarse = sorted((int(m[1]), h) for h, m in tags if m and not m[2])
    need(len({(c, f) for c, f, _ in fine}) == len(fine) and len({c for c, _ in coarse}) == len(coarse), "tag twice")
    need({c for c, _, _ in fine} <= {c for c, _ in coarse}, "orphan fine tags")
    need({c for c, _ in coarse} <= {c for c, f, _ in fine if f != "X"}, "group without fine tags")
    complete = [h for c, f, h in fine if f != "X"]
    x_tags = {c: h for c, f, h in fine if f == "X"}
    col = {h: i for i, h in enumerate(header)}
    clips, split_of, stem_of = {}, {}, {}
    for r in table[1:]:
        need(len(r) == len(header), "row length")
        values = {}
        for h, _ in tags:
            if h in col and PRESENCE.match(h):
                try:
                    v = float(r[col[h]].strip())
                except ValueError:
                    raise Invalid("presence")
                need(v in (-1, 0, 1), "presence")
                values[h] = int(v)
        split, fname, who = (r[col[k]].strip() for k in ("split", "audio_filename", "annotator_id"))
        try:
            who = float(who)
        except ValueError:
            raise Invalid("annotator")
        need(math.isfinite(who) and who == int(who), "annotator")
        need(split in ("train", "validate", "test"), "split")
        need(
            bool(fname)
            and fname not in (".", "..")
            and not any(c in fname for c in "/\\\0")
            and len(fname.encode()) <= 250,
            "file name",
        )
        need(split_of.setdefault(fname, split) == split, "two splits")
        need(stem_of.setdefault(Path(fname).stem, fname) == fname, "one embedding for two clips")
        if (who > 0) if split == "train" else (who == 0):
            clips.setdefault((split, fname), []).append(values)
    out = {}
    for split, name in (("train", "train"), ("validate", "val"), ("test", "test")):
        files = sorted(f for s, f in clips if s == split)
        need(len(files) >= 1, "empty split")
        Y, obs, X = [], [], []
        for f in files:
            rows = clips[(split, f)]
            agg = {h: 1 if any(v[h] == 1 for v in rows) else 0 if any(v[h] == 0 for v in rows) else -1 for h in rows[0]}
            y, o = [], []
            for c, fi, h in [(c, f2, h) for c, f2, h in fine if f2 != "X"]:
                x_present = c in x_tags and agg[x_tags[c]] == 1
                y.append(agg[h] == 1)
                o.append(agg[h] != -1 and not x_present)
            Y.append(y)
            obs.append(o)
            with zipfile.ZipFile(root / "embeddings" / (Path(f).stem + ".npz")) as zf:
                e = ref_npz_member(zf, "embedding.npy")
            need(e.shape == (11, 512) and e.dtype.kind in "fiu" and bool(np.all(np.isfinite(e))), "embedding")
            X.append(e.astype(np.float32))
        out[name] = dict(
            X=ref_x(np.array(X)), Y=np.array(Y, bool) & np.array(obs, bool), observed=np.array(obs, bool), keys=files
        )
    return out, [h[: -len("_presence")] for h in complete]


def ref_masked_crc(data):
    c = crc32c_bitwise(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def ref_decode(buf):
    """A protobuf message as {field number: [values]}: an int for a varint, bytes otherwise."""
    out, pos = {}, 0
    while pos < len(buf):
        key, pos = ref_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = ref_varint(buf, pos)
        elif wire == 2:
            size, pos = ref_varint(buf, pos)
            need(pos + size <= len(buf), "field past its message")
            value, pos = buf[pos : pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            need(pos + size <= len(buf), "fixed field past its message")
            value, pos = (buf[pos : pos + size], wire), pos + size
        else:
            raise Invalid("wire type")
        out.setdefault(number, []).append(value)
    return out


def ref_varint(buf, pos):
    value = shift = 0
    while True:
        need(pos < len(buf) and shift <= 63, "varint")
        value |= (buf[pos] & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if buf[pos - 1] < 0x80:
            return value, pos


def ref_features(buf):
    """A Features/FeatureLists message as {name: value bytes}."""
    out = {}
    for entry in ref_decode(buf).get(1, []):
        need(isinstance(entry, bytes), "map entry")
        fields = ref_decode(entry)
        need(1 in fields and 2 in fields, "map entry parts")
        name = fields[1][-1].decode()
        need(name not in out, "name twice")
        out[name] = fields[2][-1]
    return out


def ref_list(feature, kind):
    """The values of a Feature of kind 1 (bytes), 2 (float) or 3 (int64)."""
    fields = ref_decode(feature)
    present = [k for k in (1, 2, 3) if k in fields]
    need(not present or present == [kind], "feature kind")
    values = []
    for inner in fields.get(kind, []):
        for v in ref_decode(inner).get(1, []):
            if kind == 1:
                values.append(v)
            elif kind == 2:
                if isinstance(v, tuple):
                    need(v[1] == 5, "float width")
                    values.append(struct.unpack("<f", v[0])[0])
                else:
                    need(len(v) % 4 == 0, "packed floats")
                    values.extend(struct.unpack(f"<{len(v) // 4}f", v))
            elif isinstance(v, int):
                values.append(v)
            else:
                need(isinstance(v, bytes), "int64 list")
                pos = 0
                while pos < len(v):
                    x, pos = ref_varint(v, pos)
                    values.append(x)
    return values


def ref_clip(data, n_classes):
    top = ref_decode(data)
    need(1 in top and 2 in top, "not a SequenceExample")
    context, lists = ref_features(top[1][-1]), ref_features(top[2][-1])
    need({"video_id", "start_time_seconds", "end_time_seconds", "labels"} <= set(context), "context")
    vid = ref_list(context["video_id"], 1)
    start, end = ref_list(context["start_time_seconds"], 2), ref_list(context["end_time_seconds"], 2)
    need(len(vid) == 1 and 1 <= len(vid[0]) <= 64 and len(start) == 1 and len(end) == 1, "one value each")
    vid = vid[0].decode("ascii")
    need(math.isfinite(start[0]) and math.isfinite(end[0]), "times")
    labels = ref_list(context["labels"], 3)
    need(all(0 <= v < n_classes for v in labels), "label index")
    need("audio_embedding" in lists, "audio_embedding")
    frames = []
    for feature in ref_decode(lists["audio_embedding"]).get(1, []):
        f = ref_list(feature, 1)
        need(len(f) == 1 and len(f[0]) == 128, "frame size")
        frames.append(f[0])
    need(frames, "no frame")
    return vid, start[0], labels, frames


def ref_tfrecords(path, n_classes):
    blob, pos, clips = path.read_bytes(), 0, []
    need(blob, "empty file")
    while pos < len(blob):
        need(len(blob) - pos >= 12, "header")
        length = int.from_bytes(blob[pos : pos + 8], "little")
        need(int.from_bytes(blob[pos + 8 : pos + 12], "little") == ref_masked_crc(blob[pos : pos + 8]), "length crc")
        need(length <= 1 << 20 and pos + 16 + length <= len(blob), "length")
        data = blob[pos + 12 : pos + 12 + length]
        need(int.from_bytes(blob[pos + 12 + length : pos + 16 + length], "little") == ref_masked_crc(data), "crc")
        clips.append(ref_clip(data, n_classes))
        pos += 16 + length
    return clips


def ref_audioset(folder):
    root = folder / "audioset"  # any exception here: not valid data (run_case)
    with open(root / "class_labels_indices.csv", newline="", encoding="utf-8-sig") as fh:
        table = [r for r in csv.reader(fh) if r]
    need([h.strip() for h in table[0]] == ["index", "mid", "display_name"], "header")
    classes = table[1:]
    need(
        classes
        and all(
            len(r) == 3 and r[0].strip() == str(i) and r[1].strip() and r[2].strip() for i, r in enumerate(classes)
        ),
        "rows",
    )
    need(len({r[1].strip() for r in classes}) == len(classes), "mids")
    split = {}
    for name in ("bal_train", "eval"):
        files = sorted((root / "audioset_v1_embeddings" / name).glob("*.tfrecord"))
        need(files, "no files")
        split[name] = [c for f in files for c in ref_tfrecords(f, len(classes))]
    everything = [(v, s) for name in split for v, s, _, _ in split[name]]
    need(len(set(everything)) == len(everything), "a clip twice")
    n = len(split["bal_train"])
    need(n >= 2, "training clips")
    perm = np.random.default_rng(0).permutation(n)
    n_val = min(max(1, int(round(0.1 * n))), 20000, n - 1)
    rows = dict(train=np.sort(perm[n_val:]), val=np.sort(perm[:n_val]))

    def arrays(clips, complete):
        X = np.stack([np.resize(np.frombuffer(b"".join(f), np.uint8).reshape(-1, 128), (10, 128)) for *_, f in clips])
        Y = np.zeros((len(clips), len(classes)), bool)
        for i, (_, _, labels, _) in enumerate(clips):
            Y[i, labels] = True
        keys = [f"{v}_{s:g}" for v, s, _, _ in clips]
        return dict(X=X, Y=Y, observed=np.ones_like(Y) if complete else Y, keys=keys if complete else None)

    out = {s: arrays([split["bal_train"][i] for i in r], complete=s == "val") for s, r in rows.items()}
    out["test"] = arrays(split["eval"], complete=True)
    names = [r[2].strip() for r in classes]
    return out, [n if names.count(n) == 1 else f"{n} ({r[1].strip()})" for n, r in zip(names, classes)]


REFERENCE = dict(openmic=ref_openmic, sonyc=ref_sonyc, h5=ref_h5, audioset=ref_audioset)


#####  Valid datasets  #####################################################################################


def make_valid(reader, folder):
    if reader == "openmic":
        write_openmic(folder, n=40, n_test=10)
    elif reader == "sonyc":
        write_sonyc(folder)
    elif reader == "audioset":
        write_audioset(folder, n_bal=20, n_eval=8, n_unbal=0, per_file=4)
        shutil.rmtree(folder / "audioset" / "audioset_v1_embeddings" / "unbal_train")
    else:
        write_h5(folder / "mine.h5", n=24)


def files_of(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file())


def odd_value(rng):
    return rng.choice([np.nan, np.inf, -np.inf, 2.0, -1.0, 0.5, 1e30, 3e38, 255, -0.0, 1.0, 0.0])


def odd_string(rng):  # as bytes: b"\xff\xfe" is not UTF-8
    strings = [b"", b"x" * 300, b"\xff\xfe", "é".encode(), b"dev", b"Train", b"train ", b"a/b", b"nul\0", b"clip0"]
    return rng.choice(strings + [b"val", b"test"])


#####  Corruptions of any file's bytes  ######################################################################
# Each takes (rng, data) and returns the new bytes.


def truncate(rng, data):
    return data[: rng.randrange(len(data))] if data else data


def flip_bits(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 8) if data else 0):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def zero_run(rng, data):
    if not data:
        return data
    a, n = rng.randrange(len(data)), rng.randint(1, 4096)
    return data[:a] + bytes(len(data[a : a + n])) + data[a + n :]


BYTES = dict(
    truncate=truncate,
    flip=flip_bits,
    zero=zero_run,
    junk=lambda rng, data: data + rng.randbytes(rng.randint(1, 500)),
    random=lambda rng, data: rng.randbytes(rng.randint(0, 3000)),
    empty=lambda rng, data: b"",
)


def byte_mutation(rng, path):
    how = rng.choice([*BYTES, "delete"])
    if how == "delete":
        path.unlink()
    else:
        path.write_bytes(BYTES[how](rng, path.read_bytes()))
    return f"{how} {path.name}"


#####  .h5: the datasets and the attribute  #################################################################
# Each change takes (rng, f, key, old) after f[key] was deleted, writes the new f[key] (or not), and may return a
# word more for the case's description.


def h5_dtype(rng, f, key, old):
    kind = rng.choice(["S", "f8", "i2", "bool", "compound", "U"])
    if kind == "compound":
        f[key] = np.zeros(old.shape, dtype=[("a", "f4"), ("b", "i4")])
    elif kind == "U":
        f[key] = old.astype(str).astype(h5py.string_dtype())
    elif kind == "S":
        f[key] = old.astype("S")
    else:
        f[key] = old.astype(kind) if old.dtype.kind in "biuf" else np.zeros(old.shape, kind)


def h5_shape(rng, f, key, old):
    variant = rng.choice(["short", "long", "axis", "scalar", "transpose"])
    new = dict(
        short=lambda: old[:-1],
        long=lambda: np.concatenate([old, old[:1]]),
        axis=lambda: old[..., None],
        scalar=lambda: old.reshape(-1)[:1].reshape(()),
        transpose=lambda: old.T,
    )[variant]()
    f[key] = new
    return variant


def h5_value(rng, f, key, old):
    a = old.copy()
    if a.dtype.kind in "biuf" and a.size:
        a = a.astype(np.float64)
        a.flat[rng.randrange(a.size)] = odd_value(rng)
        if old.dtype.kind in "biu" and np.isfinite(a).all() and (a == a.astype(np.int64)).all():
            a = a.astype(old.dtype if np.abs(a).max() < 127 else np.int64)
    elif a.size:
        a = a.astype(object)
        a[rng.randrange(a.size)] = odd_string(rng)
        a = a.astype("S")
    f[key] = a


def h5_strings(rng, f, key, old):
    a = old.astype("S") if old.dtype.kind in "SO" else old
    if a.dtype.kind == "S" and a.size:
        a = a.astype(object)
        i = rng.randrange(a.size)
        a[i] = a[(i + 1) % a.size] if rng.random() < 0.5 else odd_string(rng)
        a = np.array(a.tolist(), dtype="S")
    f[key] = a


H5_CHANGES = dict(
    delete=lambda rng, f, key, old: None,
    group=lambda rng, f, key, old: f.create_group(key) and None,
    link=lambda rng, f, key, old: f.__setitem__(
        key, h5py.SoftLink("/nowhere") if rng.random() < 0.5 else h5py.ExternalLink("missing.h5", "/X")
    ),
    empty=lambda rng, f, key, old: f.__setitem__(
        key, h5py.Empty("f") if rng.random() < 0.5 else np.zeros((0,) + old.shape[1:], old.dtype)
    ),
    dtype=h5_dtype,
    shape=h5_shape,
    value=h5_value,
    strings=h5_strings,
)
H5_CLASS_NAMES = [
    ["a", "a", "b", "c", "d"],
    ["", "b", "c", "d", "e"],
    "tag",
    5,
    [b"\xff\xfe", b"b", b"c", b"d", b"e"],
    ["t"] * 4,
    ["x" * 500, "b", "c", "d", "e"],
    [1, 2, 3, 4, 5],
    ["a", "b", "c", "d", "e", "f"],
]


def mutate_h5(rng, folder):
    with h5py.File(folder / "mine.h5", "a") as f:
        key = rng.choice(["X", "Y", "observed", "split", "keys", "class_names", "Y_full", "extra"])
        how = rng.choice(list(H5_CHANGES))
        if key == "class_names":
            f.attrs["class_names"] = rng.choice(H5_CLASS_NAMES)
            return "class_names attribute"
        if key == "extra":
            f["notes"] = np.arange(3)
            return "extra dataset (valid)"
        if key == "Y_full" and "Y_full" not in f:
            f["Y_full"] = f["Y"][()] if rng.random() < 0.5 else (np.random.default_rng(0).random(f["Y"].shape) < 0.5)
            return "Y_full added"
        if key not in f:
            return f"{key} {how} (absent)"
        old = f[key][()]
        del f[key]
        more = H5_CHANGES[how](rng, f, key, old)
        return f"{key} {how}" + (f" {more}" if more else "")


#####  OpenMIC-2018: the npz's members, the class map, the partitions  ######################################
# An npz change takes (rng, arrays, key) and changes `arrays` in place.


def npz_value(rng, arrays, key):
    a = arrays[key]
    if a.dtype.kind in "biuf":
        b = a.astype(np.float64)
        b.flat[rng.randrange(b.size)] = odd_value(rng)
        arrays[key] = b.astype(a.dtype) if a.dtype.kind == "b" and np.isin(b, (0, 1)).all() else b
    elif a.dtype.kind == "O":
        b = a.copy()
        odd = odd_string(rng)
        b[rng.randrange(len(b))] = rng.choice([odd, odd.decode("latin-1"), 7, None])
        arrays[key] = b


def npz_duplicate(rng, arrays, key):
    if arrays[key].dtype.kind == "O":
        b = arrays[key].copy()
        i = rng.randrange(len(b))
        b[i] = b[(i + 1) % len(b)]
        arrays[key] = b


def npz_dtype(rng, arrays, key):
    a, kind = arrays[key], rng.choice(["U", "S", "f2", "i8", "bool", "O", "c8"])
    with np.errstate(over="ignore", invalid="ignore"):  # a value past float16's range is part of the mutation
        arrays[key] = a.astype(kind) if a.dtype.kind != "O" or kind in "US" else a.astype(str).astype(kind)


def npz_pickle(rng, arrays, key):
    b = arrays["sample_key"].copy()
    b[0] = rng.choice([Payload(arrays.pop("_folder") / "pwned"), HugeArray()])
    arrays["sample_key"] = b


NPZ_CHANGES = dict(
    delete=lambda rng, arrays, key: arrays.pop(key),
    rename=lambda rng, arrays, key: arrays.__setitem__(key + "_old", arrays.pop(key)),
    dtype=npz_dtype,
    shape=lambda rng, arrays, key: arrays.__setitem__(
        key,
        rng.choice(
            [arrays[key][:-1], arrays[key][..., None], arrays[key].reshape(-1)[:1].reshape(()), arrays[key][:0]]
        ),
    ),
    value=npz_value,
    duplicate=npz_duplicate,
    pickle=npz_pickle,
    extra=lambda rng, arrays, key: arrays.__setitem__("notes", np.arange(3)),
)


def openmic_npz(rng, root):
    arrays = read_openmic_npz(root / "openmic-2018.npz")
    key, how = rng.choice(["X", "Y_true", "Y_mask", "sample_key"]), rng.choice(list(NPZ_CHANGES))
    arrays["_folder"] = root.parent
    NPZ_CHANGES[how](rng, arrays, key)
    arrays.pop("_folder", None)
    np.savez(root / "openmic-2018.npz", **arrays)
    if how == "rename" and rng.random() < 0.5:  # a member without the .npy suffix
        with zipfile.ZipFile(root / "openmic-2018.npz") as zf:
            members = {n: zf.read(n) for n in zf.namelist()}
        with zipfile.ZipFile(root / "openmic-2018.npz", "w") as zf:
            for n, data in members.items():
                zf.writestr(n.replace(f"{key}_old.npy", key), data)
    return f"npz {key} {how}"


CLASS_MAP_TEXTS = [
    lambda names: "null",
    lambda names: "5",
    lambda names: "[]",
    lambda names: '"x"',
    lambda names: "[" * 100000,
    lambda names: json.dumps({k: None for k in names}),
    lambda names: json.dumps({k: {"i": v} for k, v in names.items()}),
    lambda names: json.dumps({k: 0 for k in names}),
    lambda names: json.dumps({**{k: v for k, v in list(names.items())[:-1]}, "": 19}),
    lambda names: json.dumps(names)[:-1] + ', "accordion": 3}',
    lambda names: "\ufeff" + json.dumps(names),
    lambda names: json.dumps({k: float(v) for k, v in names.items()}),
    lambda names: json.dumps({k: v + 1 for k, v in names.items()}),
]


def openmic_class_map(rng, root):
    path = root / "class-map.json"
    text = rng.choice(CLASS_MAP_TEXTS)(json.loads(path.read_text()))
    path.write_text(text, encoding="utf-8")
    return "class-map " + text[:30]


# A partition change takes (keys, the other partition's keys) and returns the file's new bytes.
PARTITION_CHANGES = dict(
    bom=lambda keys, other: b"\xef\xbb\xbf" + "\n".join(keys).encode(),
    crlf=lambda keys, other: "\r\n".join(keys).encode(),
    utf16=lambda keys, other: "\n".join(keys).encode("utf-16"),
    badbyte=lambda keys, other: ("\n".join(keys) + "\n").encode() + b"\xff\n",
    duplicate=lambda keys, other: "\n".join(keys + keys[:1]).encode(),
    overlap=lambda keys, other: "\n".join(keys + other[:1]).encode(),
    unknown=lambda keys, other: "\n".join(keys + ["999999_1"]).encode(),
    empty=lambda keys, other: b"",
    one=lambda keys, other: keys[0].encode(),
    blank_lines=lambda keys, other: "\n\n".join(keys).encode(),
)


def openmic_partitions(rng, root):
    kind = rng.choice(["train", "test"])
    path = root / "partitions" / f"split01_{kind}.csv"
    other = (root / "partitions" / f"split01_{'test' if kind == 'train' else 'train'}.csv").read_text().split()
    how = rng.choice([*PARTITION_CHANGES, "rename"])
    if how == "rename":
        path.rename(root / "partitions" / f"{kind}01.txt")
    else:
        path.write_bytes(PARTITION_CHANGES[how](path.read_text().split(), other))
    return f"partitions {kind} {how}"


OPENMIC = [openmic_npz, openmic_npz, openmic_npz, openmic_class_map, openmic_partitions, openmic_partitions]


#####  SONYC-UST: the annotations, the embeddings, the cache  ################################################
# A CSV change takes (rng, table) and returns the new table.


def csv_set(column, values):
    def change(rng, table):
        j = table[0].index(column) if isinstance(column, str) else rng.choice(column(table[0]))
        table[rng.randrange(1, len(table))][j] = rng.choice(values)
        return table

    return change


def presence_columns(header):
    return [k for k, h in enumerate(header) if h.endswith("_presence")]


def csv_drop_column(rng, table):
    j = rng.randrange(len(table[0]))
    return [r[:j] + r[j + 1 :] for r in table]


def csv_shuffle(rng, table):
    order = list(range(len(table[0])))
    rng.shuffle(order)
    return [[r[i] for i in order] for r in table]


def csv_two_splits(rng, table):
    a, b = rng.sample(range(1, len(table)), 2)
    j = table[0].index("audio_filename")
    table[a][j] = table[b][j]
    return table


def csv_one_stem(rng, table):
    i, j = rng.randrange(1, len(table)), table[0].index("audio_filename")
    table.append(list(table[i]))
    table[-1][j] = table[i][j][:-4] + ".flac"
    return table


CSV_CHANGES = dict(
    drop_column=csv_drop_column,
    duplicate_column=lambda rng, table: [r + [r[j]] for j in [rng.choice(presence_columns(table[0]))] for r in table],
    shuffle=csv_shuffle,
    value=csv_set(presence_columns, ["2", "0.5", "nan", "", "x", "1.0", "-1"]),
    annotator=csv_set("annotator_id", ["0.5", "inf", "1e400", "x", "", "-3", "7.0"]),
    split=csv_set("split", ["dev", "Train", "", "validate", "test"]),
    filename=csv_set("audio_filename", ["", "a/b.wav", "nul\0.wav", "..", "x" * 300 + ".wav"]),
    two_splits=csv_two_splits,
    one_stem=csv_one_stem,
    row_length=lambda rng, table: table[:1] + [r[:-1] if i == 0 else r for i, r in enumerate(table[1:])],
    bom=lambda rng, table: table,  # the bytes get a BOM below
    non_utf8=lambda rng, table: table,  # a name gets a bad byte below
)


def sonyc_csv(rng, root):
    path = root / "annotations.csv"
    with open(path, newline="") as fh:
        table = list(csv.reader(fh))
    how = rng.choice(list(CSV_CHANGES))
    out = io.StringIO()
    csv.writer(out).writerows(CSV_CHANGES[how](rng, table))
    data = out.getvalue().encode("utf-8")
    if how == "bom":
        data = b"\xef\xbb\xbf" + data
    if how == "non_utf8":
        data = data.replace(b"00_000001", b"00_\xff00001", 1)
    path.write_bytes(data)
    return f"csv {how}"


def embedding_bare_npy(path, e):
    np.save(path.with_suffix(""), e)
    path.with_suffix(".npy").replace(path)


def embedding_no_suffix(path, e):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("embedding", b"")


EMBEDDING_CHANGES = dict(
    shape=lambda path, e: np.savez(path, embedding=e[:-1]),
    dtype=lambda path, e: np.savez(path, embedding=e.astype(str)),
    nan=lambda path, e: np.savez(path, embedding=np.where(e > 2, np.nan, e)),
    object=lambda path, e: np.savez(path, embedding=e.astype(object)),
    extra=lambda path, e: np.savez(path, embedding=e, other=np.zeros(3)),
    bare_npy=embedding_bare_npy,
    no_suffix=embedding_no_suffix,
    delete=lambda path, e: path.unlink(),
)


def sonyc_embedding(rng, root):
    path = rng.choice(sorted((root / "embeddings").glob("*.npz")))
    how = rng.choice(list(EMBEDDING_CHANGES))
    EMBEDDING_CHANGES[how](path, np.load(path)["embedding"])
    return f"embedding {path.name} {how}"


def sonyc_cache(rng, root):
    import sonyc

    with contextlib.redirect_stdout(io.StringIO()):
        sonyc.load_sonyc(root, "fine", write_atomic=common.write_atomic)  # writes the cache, then damage it
    return byte_mutation(rng, root / "embeddings_cache.npz") + " (valid: the cache is rebuilt)"


SONYC = [sonyc_csv, sonyc_csv, sonyc_csv, sonyc_embedding, sonyc_embedding, sonyc_cache]


#####  AudioSet: records, the class table, the cache  #######################################################
# A record change takes (rng, clip dict) and changes it; the record is then written again with valid CRCs.


def record_labels(rng, clip):
    clip["labels"] = clip["labels"] + [rng.choice([6, 7, 100, -1, 2**40])]


def record_frames(rng, clip):
    frames = clip["frames"]
    i = rng.randrange(len(frames))
    variant = rng.choice(["short", "long", "none", "fewer"])
    if variant == "short":
        frames[i] = frames[i][:-1]
    elif variant == "long":
        frames[i] = frames[i] + b"\0"
    elif variant == "none":
        frames.clear()
    else:
        del frames[rng.randint(1, len(frames)) :]  # 1 to 9 frames: valid, repeated to fill 10


RECORD_CHANGES = dict(
    labels=record_labels,
    frames=record_frames,
    duplicate_labels=lambda rng, clip: clip.__setitem__("labels", clip["labels"] * 2),  # valid
    no_labels=lambda rng, clip: clip.__setitem__("labels", []),  # valid: a clip with no positive
    start=lambda rng, clip: clip.__setitem__("start", rng.choice([float("nan"), float("inf"), -30.0])),
    video_id=lambda rng, clip: clip.__setitem__("video_id", rng.choice(["", "x" * 65, "é", "b0000001"])),
)


def parse_our_record(data):
    """A fixture record back into its parts, with the independent reader."""
    vid, start, labels, frames = ref_clip(data, 1 << 62)
    return dict(video_id=vid, start=start, labels=labels, frames=frames)


def audioset_record(rng, root):
    files = sorted((root / "audioset_v1_embeddings").rglob("*.tfrecord"))
    path = rng.choice(files)
    blob, records, pos = path.read_bytes(), [], 0
    while pos < len(blob):
        length = int.from_bytes(blob[pos : pos + 8], "little")
        records.append(blob[pos + 12 : pos + 12 + length])
        pos += 16 + length
    i, how = rng.randrange(len(records)), rng.choice([*RECORD_CHANGES, "field", "raw"])
    if how == "field":  # an unknown field beside the known ones: valid, skipped
        records[i] = records[i] + pb_field(9, b"extra")
    elif how == "raw":  # a record with valid CRCs whose content is junk
        records[i] = rng.randbytes(rng.randint(0, 200))
    else:
        clip = parse_our_record(records[i])
        RECORD_CHANGES[how](rng, clip)
        end = clip["start"] + 10
        records[i] = sequence_example(clip["video_id"], clip["start"], end, clip["labels"], clip["frames"])
    write_tfrecord(path, records)
    return f"record {i} of {path.name} {how}"


def audioset_classes(rng, root):
    path = root / "class_labels_indices.csv"
    lines = path.read_text().splitlines()
    how = rng.choice(["header", "index", "mid twice", "empty name", "one less", "bom", "quoted", "crlf"])
    if how == "header":
        lines[0] = "index,mid,name"
    elif how == "index":
        lines[2] = "7" + lines[2][1:]
    elif how == "mid twice":
        lines[2] = lines[2].replace(lines[2].split(",")[1], lines[1].split(",")[1])
    elif how == "empty name":
        lines[3] = lines[3].rsplit(",", 1)[0] + ","
    elif how == "one less":
        lines = lines[:-1]  # a label index of the data may now be outside the table
    elif how == "bom":
        lines[0] = "\ufeff" + lines[0]
    elif how == "quoted":
        lines[1] = lines[1].rsplit(",", 1)[0] + ',"Speech, and talk"'
    path.write_bytes(("\r\n" if how == "crlf" else "\n").join(lines).encode() + b"\n")
    return f"classes {how}"


def audioset_cross_split(rng, root):
    """A clip of eval copied into bal_train: invalid, a clip in two splits."""
    src = sorted((root / "audioset_v1_embeddings" / "eval").glob("*.tfrecord"))[0]
    dst = sorted((root / "audioset_v1_embeddings" / "bal_train").glob("*.tfrecord"))[0]
    dst.write_bytes(dst.read_bytes() + src.read_bytes()[: 16 + int.from_bytes(src.read_bytes()[:8], "little")])
    return "a clip in two splits"


def audioset_cache(rng, root):
    import audioset

    with contextlib.redirect_stdout(io.StringIO()):
        audioset.load_audioset(root)  # writes the caches, then damage one
    return byte_mutation(rng, rng.choice(sorted(root.glob("cache-*.bin")))) + " (valid: the cache is rebuilt)"


AUDIOSET = [audioset_record, audioset_record, audioset_record, audioset_classes, audioset_cross_split, audioset_cache]


MUTATIONS = dict(
    h5=[lambda rng, folder: mutate_h5(rng, folder)],
    openmic=[lambda rng, folder, m=m: m(rng, folder / "openmic-2018") for m in OPENMIC],
    sonyc=[lambda rng, folder, m=m: m(rng, folder / "sonyc-ust") for m in SONYC],
    audioset=[lambda rng, folder, m=m: m(rng, folder / "audioset") for m in AUDIOSET],
)


def mutate(reader, rng, folder):
    """One corruption: a quarter of the cases change any file's bytes, the rest draw from the reader's table."""
    if rng.random() < 0.25:
        return byte_mutation(rng, rng.choice(files_of(folder)))
    return rng.choice(MUTATIONS[reader])(rng, folder)


#####  One case: both readers in a child process, under one timeout  ##########################################


class Hang(Exception):
    pass


_POOL = []


def in_child(function, *args):
    """function(*args) in the case's child process, within TIMEOUT seconds; a hang kills the child (the next
    call starts another) and raises Hang."""
    if not _POOL:
        _POOL.append(multiprocessing.get_context("spawn").Pool(1))
    try:
        return _POOL[0].apply_async(function, args).get(TIMEOUT)
    except multiprocessing.TimeoutError:
        _POOL.pop().terminate()
        raise Hang()


def reference(reader, folder):
    """The independent reader: ('valid', arrays) or ('invalid', why)."""
    try:
        return "valid", REFERENCE[reader](folder)
    except Invalid as e:
        return "invalid", str(e)
    except Exception as e:  # the independent reader failed to read it: invalid, and said so
        return "invalid", f"[reference: {type(e).__name__}]"


def project(reader, folder):
    """The run's reader, common.load_dataset: ('loaded', arrays, names), ('error', message) or ('traceback',
    what); the .h5 guard's CPU budget below the case's timeout."""
    h5guard.CPU_SECONDS = TIMEOUT // 3
    args = Namespace(
        dataset=str(folder / "mine.h5") if reader == "h5" else reader,
        data_dir=str(folder),
        level="fine",
        audioset_train="balanced",
        drop_rate=0.0,
        drop_seed=common.DROP_SEED,
        positive_only=False,
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            data = common.load_dataset(args, torch.device("cpu"))
    except common.UserError as e:
        return "error", str(e)
    except Exception as e:
        return "traceback", f"{type(e).__name__}: {str(e)[:80]}"
    arrays = {
        s: dict(X=sp.X.numpy(), Y=sp.Y.numpy(), observed=sp.observed.numpy(), keys=sp.keys)
        for s, sp in (("train", data.train), ("val", data.val), ("test", data.test))
    }
    return "loaded", arrays, list(data.class_names)


def same(got, ref):
    (splits, names), (arrays, got_names) = ref, got
    if list(got_names) != list(names):
        return False
    for s in ("train", "val", "test"):
        a, b = arrays[s], splits[s]
        if a["X"].shape != b["X"].shape or not np.array_equal(a["X"], b["X"]):
            return False
        if not np.array_equal(a["observed"], b["observed"]) or not np.array_equal(a["Y"].astype(bool), b["Y"]):
            return False
        if b["keys"] is not None and list(a["keys"]) != list(b["keys"]):
            return False
    return True


def run_case(reader, rng, base, work):
    folder = Path(tempfile.mkdtemp(dir=work))
    shutil.copytree(base, folder, dirs_exist_ok=True)
    try:
        what = mutate(reader, rng, folder)
    except Exception as e:  # a corruption that numpy or h5py would not write: the case tests the data as it is
        what = f"(no change: {type(e).__name__})"
    try:
        verdict, ref = in_child(reference, reader, folder)
    except Hang:
        verdict, ref = "invalid", "[reference: hang]"
    if verdict == "invalid" and ref.startswith("[reference"):
        what += f" {ref}"
    try:
        outcome = in_child(project, reader, folder)
    except Hang:
        outcome = ("hang",)
    if (folder / "pwned").exists():
        outcome = ("payload ran",)
    shutil.rmtree(folder, ignore_errors=True)
    valid = verdict == "valid"
    if outcome[0] == "loaded":
        return ("loaded" if same(outcome[1:], ref) else "wrong data loaded") if valid else "invalid data loaded", what
    if outcome[0] == "error":
        long = len(outcome[1]) >= 300 and "expected layout" not in outcome[1]
        return "long error" if long else "refused although valid" if valid else "clean error", what
    return " ".join(outcome), what


def fuzz(reader, cases, seed, work, report=None):
    """Counts of each verdict over `cases` corruptions; `report(verdict, what)` sees every failure."""
    rng = random.Random(f"{reader}-{seed}")
    base = Path(tempfile.mkdtemp(dir=work))
    make_valid(reader, base)
    verdict, ref = in_child(reference, reader, base)  # the valid dataset is valid, and loads the same
    outcome = in_child(project, reader, base)
    assert verdict == "valid" and outcome[0] == "loaded" and same(outcome[1:], ref), (verdict, outcome[:2])
    counts = {}
    for _ in range(cases):
        verdict, what = run_case(reader, rng, base, work)
        counts[verdict] = counts.get(verdict, 0) + 1
        if verdict not in ("loaded", "clean error") and report:
            report(verdict, what)
    return counts


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=1000, help="corruptions per reader (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corruptions (default: 0)")
    p.add_argument("--readers", nargs="+", choices=READERS, default=list(READERS), help="(default: all four)")
    args = p.parse_args()
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as work:
        for reader in args.readers:
            t0 = time.time()
            counts = fuzz(
                reader,
                args.cases,
                args.seed,
                Path(work),
                report=lambda v, w, r=reader: print(f"FAIL {r}: {v} <- {w}", flush=True),
            )
            bad = sum(n for v, n in counts.items() if v not in ("loaded", "clean error"))
            failed += bad
            rows.append(
                f"| {reader} | {args.cases:,} | {counts.get('loaded', 0):,} | "
                f"{counts.get('clean error', 0):,} | {bad} | {time.time() - t0:.0f} |"
            )
    print(f"\nseed {args.seed} | torch {torch.__version__} | numpy {np.__version__} | h5py {h5py.__version__}")
    print("| reader | cases | loaded valid data | clean one-line error | failures | seconds |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
