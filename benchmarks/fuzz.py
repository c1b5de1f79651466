"""Fuzz the three data readers: seeded random corruptions of small valid datasets in the official layouts.

    python benchmarks/fuzz.py                          # 1,000 cases per reader, seed 0
    python benchmarks/fuzz.py --cases 300 --seed 7 --readers h5

Each case copies a valid dataset (OpenMIC-2018 as the archive unpacks, SONYC-UST v2 as released with
openl3's embeddings, or an .h5 in this project's layout), applies one random corruption (truncation, byte
flips, wrong dtypes and shapes, NaN and inf, out-of-range values, missing and extra members, columns and
files, non-UTF-8 and very long strings, duplicate and overlapping ids, damaged zip and HDF5 structure,
crafted pickles, ...) and loads it as a run does (common.load_dataset). An independent reader written here,
which shares no code with the project's, decides whether the corrupted files are still valid data.
A case passes when the run loads valid data and gets the same arrays as the independent reader, or stops
with the project's one-line error (under 300 characters) on invalid data. It fails on a traceback, a hang
(30 s), invalid data loaded, wrong data loaded, or valid data refused. Prints a table; exit 1 on a failure.
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
import signal
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
from benchmarks.fixtures import HugeArray, Payload, read_openmic_npz, write_h5, write_openmic, write_sonyc  # noqa: E402

READERS = ("openmic", "sonyc", "h5")


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


REFERENCE = dict(openmic=ref_openmic, sonyc=ref_sonyc, h5=ref_h5)


#####  Valid datasets and their corruptions  ###############################################################


def make_valid(reader, folder):
    if reader == "openmic":
        write_openmic(folder, n=40, n_test=10)
    elif reader == "sonyc":
        write_sonyc(folder)
    else:
        write_h5(folder / "mine.h5", n=24)


def files_of(reader, folder):
    return sorted(p for p in folder.rglob("*") if p.is_file())


def byte_mutation(rng, path):
    data = bytearray(path.read_bytes())
    how = rng.choice(["truncate", "flip", "zero", "junk", "random", "empty", "delete"])
    if how == "truncate" and data:
        del data[rng.randrange(len(data)) :]
    elif how == "flip" and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == "zero" and data:
        a, n = rng.randrange(len(data)), rng.randint(1, 4096)
        data[a : a + n] = bytes(len(data[a : a + n]))
    elif how == "junk":
        data += rng.randbytes(rng.randint(1, 500))
    elif how == "random":
        data = bytearray(rng.randbytes(rng.randint(0, 3000)))
    elif how == "empty":
        data = bytearray()
    if how == "delete":
        path.unlink()
        return f"delete {path.name}"
    path.write_bytes(bytes(data))
    return f"{how} {path.name}"


def odd_value(rng):
    return rng.choice([np.nan, np.inf, -np.inf, 2.0, -1.0, 0.5, 1e30, 3e38, 255, -0.0, 1.0, 0.0])


def odd_string(rng):  # as bytes: b"\xff\xfe" is not UTF-8
    return rng.choice(
        [
            b"",
            b"x" * 300,
            b"\xff\xfe",
            "é".encode(),
            b"dev",
            b"Train",
            b"train ",
            b"a/b",
            b"nul\0",
            b"clip0",
            b"val",
            b"test",
        ]
    )


def mutate_h5(rng, folder):
    path = folder / "mine.h5"
    with h5py.File(path, "a") as f:
        key = rng.choice(["X", "Y", "observed", "split", "keys", "class_names", "Y_full", "extra"])
        how = rng.choice(["delete", "group", "dtype", "shape", "value", "strings", "link", "empty"])
        desc = f"{key} {how}"
        if key == "class_names":
            f.attrs["class_names"] = rng.choice(
                [
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
            )
            return desc + " attribute"
        if key == "extra":
            f["notes"] = np.arange(3)
            return "extra dataset (valid)"
        if key == "Y_full" and "Y_full" not in f:
            f["Y_full"] = f["Y"][()] if rng.random() < 0.5 else (np.random.default_rng(0).random(f["Y"].shape) < 0.5)
            return "Y_full added"
        if key not in f:
            return desc + " (absent)"
        old = f[key][()]
        del f[key]
        if how == "delete":
            return desc
        if how == "group":
            f.create_group(key)
        elif how == "link":
            f[key] = h5py.SoftLink("/nowhere") if rng.random() < 0.5 else h5py.ExternalLink("missing.h5", "/X")
        elif how == "empty":
            f[key] = h5py.Empty("f") if rng.random() < 0.5 else np.zeros((0,) + old.shape[1:], old.dtype)
        elif how == "dtype":
            kind = rng.choice(["S", "f8", "i2", "bool", "compound", "U"])
            if kind == "compound":
                f[key] = np.zeros(old.shape, dtype=[("a", "f4"), ("b", "i4")])
            elif kind == "U":
                f[key] = old.astype(str).astype(h5py.string_dtype())
            elif kind == "S":
                f[key] = old.astype("S")
            else:
                f[key] = old.astype(kind) if old.dtype.kind in "biuf" else np.zeros(old.shape, kind)
        elif how == "shape":
            variant = rng.choice(["short", "long", "axis", "scalar", "transpose"])
            f[key] = dict(
                short=old[:-1],
                long=np.concatenate([old, old[:1]]),
                axis=old[..., None],
                scalar=old.reshape(-1)[:1].reshape(()),
                transpose=old.T,
            )[variant]
            desc += f" {variant}"
        elif how == "value":
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
        elif how == "strings":
            a = old.astype("S") if old.dtype.kind in "SO" else old
            if a.dtype.kind == "S" and a.size:
                a = a.astype(object)
                i = rng.randrange(a.size)
                a[i] = a[(i + 1) % a.size] if rng.random() < 0.5 else odd_string(rng)
                a = np.array(a.tolist(), dtype="S")
            f[key] = a
    return desc


def mutate_openmic(rng, folder):
    root = folder / "openmic-2018"
    arrays = read_openmic_npz(root / "openmic-2018.npz")
    what = rng.choice(["npz", "npz", "npz", "class-map", "partitions", "partitions", "files"])
    if what == "npz":
        key = rng.choice(["X", "Y_true", "Y_mask", "sample_key"])
        how = rng.choice(["delete", "rename", "dtype", "shape", "value", "duplicate", "pickle", "extra"])
        a = arrays[key]
        if how == "delete":
            del arrays[key]
        elif how == "rename":
            arrays[key + "_old"] = arrays.pop(key)
        elif how == "dtype":
            kind = rng.choice(["U", "S", "f2", "i8", "bool", "O", "c8"])
            arrays[key] = a.astype(kind) if a.dtype.kind != "O" or kind in "US" else a.astype(str).astype(kind)
        elif how == "shape":
            arrays[key] = rng.choice([a[:-1], a[..., None], a.reshape(-1)[:1].reshape(()), a[:0]])
        elif how == "value" and a.dtype.kind in "biuf":
            b = a.astype(np.float64)
            b.flat[rng.randrange(b.size)] = odd_value(rng)
            arrays[key] = b.astype(a.dtype) if a.dtype.kind == "b" and np.isin(b, (0, 1)).all() else b
        elif how in ("value", "duplicate") and a.dtype.kind == "O":
            b = a.copy()
            i = rng.randrange(len(b))
            odd = odd_string(rng)
            b[i] = b[(i + 1) % len(b)] if how == "duplicate" else rng.choice([odd, odd.decode("latin-1"), 7, None])
            arrays[key] = b
        elif how == "pickle":
            b = arrays["sample_key"].copy()
            b[0] = rng.choice([Payload(folder / "pwned"), HugeArray()])
            arrays["sample_key"] = b
        elif how == "extra":
            arrays["notes"] = np.arange(3)
        np.savez(root / "openmic-2018.npz", **arrays)
        if how == "rename" and rng.random() < 0.5:  # a member without the .npy suffix
            with zipfile.ZipFile(root / "openmic-2018.npz") as zf:
                members = {n: zf.read(n) for n in zf.namelist()}
            with zipfile.ZipFile(root / "openmic-2018.npz", "w") as zf:
                for n, data in members.items():
                    zf.writestr(n.replace(f"{key}_old.npy", key), data)
        return f"npz {key} {how}"
    if what == "class-map":
        path = root / "class-map.json"
        names = json.loads(path.read_text())
        text = rng.choice(
            [
                "null",
                "5",
                "[]",
                '"x"',
                "[" * 100000,
                json.dumps({k: None for k in names}),
                json.dumps({k: {"i": v} for k, v in names.items()}),
                json.dumps({k: 0 for k in names}),
                json.dumps({**{k: v for k, v in list(names.items())[:-1]}, "": 19}),
                json.dumps(names)[:-1] + ', "accordion": 3}',
                "\ufeff" + json.dumps(names),
                json.dumps({k: float(v) for k, v in names.items()}),
                json.dumps({k: v + 1 for k, v in names.items()}),
            ]
        )
        path.write_text(text, encoding="utf-8")
        return "class-map " + text[:30]
    if what == "partitions":
        kind = rng.choice(["train", "test"])
        path = root / "partitions" / f"split01_{kind}.csv"
        keys = path.read_text().split()
        other = (root / "partitions" / f"split01_{'test' if kind == 'train' else 'train'}.csv").read_text().split()
        how = rng.choice(
            [
                "bom",
                "crlf",
                "utf16",
                "badbyte",
                "duplicate",
                "overlap",
                "unknown",
                "empty",
                "one",
                "rename",
                "blank lines",
            ]
        )
        data = {
            "bom": lambda: b"\xef\xbb\xbf" + "\n".join(keys).encode(),
            "crlf": lambda: "\r\n".join(keys).encode(),
            "utf16": lambda: "\n".join(keys).encode("utf-16"),
            "badbyte": lambda: ("\n".join(keys) + "\n").encode() + b"\xff\n",
            "duplicate": lambda: "\n".join(keys + keys[:1]).encode(),
            "overlap": lambda: "\n".join(keys + other[:1]).encode(),
            "unknown": lambda: "\n".join(keys + ["999999_1"]).encode(),
            "empty": lambda: b"",
            "one": lambda: keys[0].encode(),
            "rename": lambda: None,
            "blank lines": lambda: "\n\n".join(keys).encode(),
        }[how]()
        if how == "rename":
            path.rename(root / "partitions" / f"{kind}01.txt")
        else:
            path.write_bytes(data)
        return f"partitions {kind} {how}"
    return byte_mutation(rng, rng.choice(files_of("openmic", folder)))


def mutate_sonyc(rng, folder):
    root = folder / "sonyc-ust"
    what = rng.choice(["csv", "csv", "csv", "embedding", "embedding", "cache", "files"])
    if what == "csv":
        path = root / "annotations.csv"
        with open(path, newline="") as fh:
            table = list(csv.reader(fh))
        header = table[0]
        how = rng.choice(
            [
                "drop column",
                "duplicate column",
                "bom",
                "shuffle",
                "value",
                "annotator",
                "split",
                "filename",
                "two splits",
                "one stem",
                "row length",
                "non-utf8",
            ]
        )
        if how == "drop column":
            j = rng.randrange(len(header))
            table = [r[:j] + r[j + 1 :] for r in table]
        elif how == "duplicate column":
            j = rng.choice([i for i, h in enumerate(header) if h.endswith("_presence")])
            table = [r + [r[j]] for r in table]
        elif how == "shuffle":
            order = list(range(len(header)))
            rng.shuffle(order)
            table = [[r[i] for i in order] for r in table]
        elif how in ("value", "annotator", "split", "filename"):
            i = rng.randrange(1, len(table))
            j = {
                "value": rng.choice([k for k, h in enumerate(header) if h.endswith("_presence")]),
                "annotator": header.index("annotator_id"),
                "split": header.index("split"),
                "filename": header.index("audio_filename"),
            }[how]
            table[i][j] = {
                "value": rng.choice(["2", "0.5", "nan", "", "x", "1.0", "-1"]),
                "annotator": rng.choice(["0.5", "inf", "1e400", "x", "", "-3", "7.0"]),
                "split": rng.choice(["dev", "Train", "", "validate", "test"]),
                "filename": rng.choice(["", "a/b.wav", "nul\0.wav", "..", "x" * 300 + ".wav"]),
            }[how]
        elif how == "two splits":
            a, b = rng.sample(range(1, len(table)), 2)
            table[a][header.index("audio_filename")] = table[b][header.index("audio_filename")]
        elif how == "one stem":
            i = rng.randrange(1, len(table))
            name = table[i][header.index("audio_filename")]
            table.append(list(table[i]))
            table[-1][header.index("audio_filename")] = name[:-4] + ".flac"
        elif how == "row length":
            i = rng.randrange(1, len(table))
            table[i] = table[i][:-1]
        out = io.StringIO()
        csv.writer(out).writerows(table)
        data = out.getvalue().encode("utf-8")
        if how == "bom":
            data = b"\xef\xbb\xbf" + data
        if how == "non-utf8":
            data = data.replace(b"00_000001", b"00_\xff00001", 1)
        path.write_bytes(data)
        return f"csv {how}"
    if what == "embedding":
        path = rng.choice(sorted((root / "embeddings").glob("*.npz")))
        how = rng.choice(["shape", "dtype", "nan", "bare npy", "no suffix", "delete", "object", "extra"])
        e = np.load(path)["embedding"]
        if how == "bare npy":
            np.save(path.with_suffix(""), e)
            path.with_suffix(".npy").replace(path)
        elif how == "no suffix":
            with zipfile.ZipFile(path, "w") as zf:
                zf.writestr("embedding", io.BytesIO().getvalue())
        elif how == "delete":
            path.unlink()
        else:
            e = {
                "shape": lambda: e[:-1],
                "dtype": lambda: e.astype(str),
                "nan": lambda: np.where(e > 2, np.nan, e),
                "object": lambda: e.astype(object),
                "extra": lambda: e,
            }[how]()
            np.savez(path, embedding=e, **({"other": np.zeros(3)} if how == "extra" else {}))
        return f"embedding {path.name} {how}"
    if what == "cache":
        import sonyc

        with contextlib.redirect_stdout(io.StringIO()):
            sonyc.load_sonyc(root, "fine", write_atomic=common.write_atomic)  # writes the cache, then damage it
        return byte_mutation(rng, root / "embeddings_cache.npz") + " (valid: the cache is rebuilt)"
    return byte_mutation(rng, rng.choice(files_of("sonyc", folder)))


def mutate(reader, rng, folder):
    if rng.random() < 0.25:
        return byte_mutation(rng, rng.choice(files_of(reader, folder)))
    return dict(openmic=mutate_openmic, sonyc=mutate_sonyc, h5=mutate_h5)[reader](rng, folder)


#####  One case  #############################################################################################


class Hang(Exception):
    pass


_POOL = []


def reference(reader, folder, timeout=30):
    """The independent reader, in a child process: HDF5 can loop in C on a damaged file, out of reach of
    any Python timeout in the process that runs it. A hang kills the child; the next case starts another."""
    if not _POOL:
        _POOL.append(multiprocessing.get_context("spawn").Pool(1))
    try:
        return _POOL[0].apply_async(REFERENCE[reader], (folder,)).get(timeout)
    except multiprocessing.TimeoutError:
        _POOL.pop().terminate()
        raise


def project_load(reader, folder):
    args = Namespace(
        dataset=str(folder / "mine.h5") if reader == "h5" else reader,
        data_dir=str(folder),
        level="fine",
        drop_rate=0.0,
        drop_seed=common.DROP_SEED,
        positive_only=False,
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return common.load_dataset(args, torch.device("cpu"))


def same(data, ref):
    splits, names = ref
    if list(data.class_names) != list(names):
        return False
    for s in ("train", "val", "test"):
        got, want = getattr(data, s), splits[s]
        if got.X.shape != want["X"].shape or not np.array_equal(got.X.numpy(), want["X"]):
            return False
        if not np.array_equal(got.observed.numpy(), want["observed"]) or not np.array_equal(
            got.Y.numpy().astype(bool), want["Y"]
        ):
            return False
        if want["keys"] is not None and list(got.keys) != list(want["keys"]):
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
        ref, valid = reference(reader, folder), True
    except Invalid:
        ref, valid = None, False
    except Exception as e:  # the independent reader failed to read it (or hung, in HDF5): invalid, and said so
        ref, valid = None, False
        what += f" [reference: {type(e).__name__}]"
    signal.alarm(30)
    try:
        data = project_load(reader, folder)
        outcome = "loaded"
    except common.UserError as e:
        message = str(e)
        long = len(message) >= 300 and "expected layout" not in message
        outcome = "long error" if long else "error"
    except Hang:
        outcome = "hang"
    except Exception as e:
        outcome = f"traceback {type(e).__name__}: {str(e)[:80]}"
    finally:
        signal.alarm(0)
    if (folder / "pwned").exists():
        outcome = "payload ran"
    shutil.rmtree(folder, ignore_errors=True)
    if outcome == "loaded":
        verdict = "loaded" if valid and same(data, ref) else "wrong data loaded" if valid else "invalid data loaded"
    elif outcome == "error":
        verdict = "refused although valid" if valid else "clean error"
    else:
        verdict = outcome
    return verdict, what


def fuzz(reader, cases, seed, work, report=None):
    """Counts of each verdict over `cases` corruptions; `report(verdict, what)` sees every failure."""
    rng = random.Random(f"{reader}-{seed}")
    base = Path(tempfile.mkdtemp(dir=work))
    make_valid(reader, base)
    ref = reference(reader, base)  # the valid dataset is valid, and loads the same
    assert same(project_load(reader, base), ref), "the valid dataset does not load as the reference reads it"
    counts = {}
    for _ in range(cases):
        verdict, what = run_case(reader, rng, base, work)
        counts[verdict] = counts.get(verdict, 0) + 1
        if verdict not in ("loaded", "clean error") and report:
            report(verdict, what)
    return counts


def alarm(signum, frame):
    raise Hang()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=1000, help="corruptions per reader (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corruptions (default: 0)")
    p.add_argument("--readers", nargs="+", choices=READERS, default=list(READERS), help="(default: all three)")
    args = p.parse_args()
    signal.signal(signal.SIGALRM, alarm)
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
