"""OpenMIC-2018 (Humphrey, Durand, McFee, ISMIR 2018): the reader, as the archive unpacks.

Stands alone (numpy only) and treats the download as hostile until read: the numeric members load with
no pickle, each .npy header checked against its member's size before anything is allocated; sample_key,
an object array of strings in the official file, goes through an unpickler that can rebuild an array of
strings and nothing else, bounded by the file's own size. Everything read is validated before use: types,
shapes, value ranges, unique identities, disjoint partitions. `common.load_dataset` calls `load` for
`--dataset openmic`. Errors are raised as DataError, one line each.
"""

import collections
import json
import math
import os
import pickle
import zipfile

import numpy as np


class DataError(Exception):
    """An OpenMIC-2018 file is missing, unsafe or not as released: one line, exit 2, no traceback."""


def fail(msg):
    raise DataError(msg)


def show(value, width=60):  # a value from the file in a message, cut to `width` characters
    return repr(value) if len(repr(value)) <= width else repr(value)[: width - 5] + " ...'"


def size_of(shape):
    """The element count of a claimed shape, in Python integers (no overflow); None if it is no shape."""
    ok = isinstance(shape, tuple) and all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape
    )
    return math.prod(int(d) for d in shape) if ok else None


MEMORY = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else float("inf")


LAYOUT = """expected layout (the unpacked openmic-2018-v1.0.0.tgz from Zenodo record 1432913,
https://zenodo.org/record/1432913):
  {root}/openmic-2018.npz                  X (N, 10, 128), Y_true (N, 20), Y_mask (N, 20), sample_key (N,)
  {root}/class-map.json                    {{"accordion": 0, ..., "voice": 19}}
  {root}/partitions/split01_train.csv      one sample key per line (or partitions/train01.txt)
  {root}/partitions/split01_test.csv       one sample key per line (or partitions/test01.txt)"""


class _StringArrayUnpickler(pickle._Unpickler):
    """Rebuilds a numpy array of strings and nothing else. Only the three globals a pickled array needs can
    be named, numpy.ndarray only as the type handed to _reconstruct (calling it is refused), and no array
    may claim more elements than the file has bytes: a crafted pickle can neither reach os.system nor ask
    for terabytes. The pure-Python unpickler, so that each array's state is checked before numpy sees it."""

    def __init__(self, fh, limit):
        super().__init__(fh)
        self.limit = limit

    def find_class(self, module, name):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return self.reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY
        if (module, name) == ("numpy", "dtype"):
            return self.dtype
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a plain array of strings never needs")

    def reconstruct(self, cls, shape, typecode):
        if cls is not _NDARRAY or size_of(shape) is None or size_of(shape) > self.limit:
            raise pickle.UnpicklingError(f"an array of shape {show(shape)} does not fit in the file")
        return np.ndarray.__new__(np.ndarray, shape, typecode)

    @staticmethod
    def dtype(spec, align=False, copy=False):
        dt = np.dtype(spec, align, copy)
        if dt.kind not in "OUS":
            raise pickle.UnpicklingError(f"an array of {dt} is not an array of strings")
        return dt

    def load_build(self):  # BUILD: arr.__setstate__((version, shape, dtype, fortran, data)), checked first
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.ndarray):
            size = size_of(state[1]) if isinstance(state, tuple) and len(state) == 5 else None
            if size is None or size > self.limit:
                raise pickle.UnpicklingError(f"an array state {show(state, 40)} that does not fit in the file")
        super().load_build()

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build


class _NDArrayToken:
    """What a pickle gets for numpy.ndarray: the type _reconstruct expects; calling it is refused."""

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError("it calls numpy.ndarray directly, which a plain array of strings never does")


_NDARRAY = _NDArrayToken()


def read_member(zf, name, path, allow_strings=False):
    """One .npy member of an open zip file: its header read and checked against the member's size before
    any allocation; numbers without pickle; object arrays (strings) through _StringArrayUnpickler."""
    info = zf.getinfo(name)
    with zf.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        if version not in ((1, 0), (2, 0)):
            fail(f"{path}: {name} is a .npy of format version {version}, not 1.0 or 2.0")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        count = size_of(shape)
        if dtype.hasobject:
            if not allow_strings:
                fail(f"{path}: {name} is an array of Python objects; expected numbers")
            a = _StringArrayUnpickler(fh, min(info.file_size, MEMORY // 64)).load()
        else:
            if count * dtype.itemsize != info.file_size - fh.tell():
                fail(
                    f"{path}: {name} claims {shape} {dtype} but holds {info.file_size - fh.tell()} bytes "
                    f"(a damaged or truncated file)"
                )
            if count * dtype.itemsize > MEMORY:
                fail(f"{path}: {name} needs {count * dtype.itemsize / 2**30:.0f} GiB, more than this machine has")
            data = fh.read(count * dtype.itemsize)
            a = np.frombuffer(data, dtype, count).reshape(shape, order="F" if fortran else "C")
    if not isinstance(a, np.ndarray) or a.shape != tuple(shape):
        fail(f"{path}: {name} should be an array of shape {shape}, found {type(a).__name__}")
    return a


def read_npz(path, names, strings=()):
    """The members `names` of an .npz, each read by read_member; any damage ends in one line."""
    if not zipfile.is_zipfile(path):
        fail(f"cannot read {path}: not a zip archive (a truncated or failed download?); download it again")
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            files = {n.removesuffix(".npy"): n for n in zf.namelist() if n.endswith(".npy")}
            missing = [k for k in names if k not in files]
            if missing:
                fail(f"{path}: missing array(s) {missing}; found {show(sorted(files), 120)}")
            for k in names:
                out[k] = read_member(zf, files[k], path, allow_strings=k in strings)
    except DataError:
        raise
    except pickle.UnpicklingError as e:
        fail(f"{path}: refused to read {k}: {e}")
    except Exception as e:  # damaged zip or .npy structure, unknown compression, CRC errors, ...
        fail(f"cannot read {path}: {type(e).__name__}: {show(str(e), 150)}")
    return out


def as_strings(a, path, name):
    """sample_key as str: every element a str or UTF-8 bytes, none empty, all unique."""
    values = a.ravel().tolist()
    if not all(isinstance(v, (str, bytes)) for v in values):
        fail(f"{path}: {name} should be an array of strings, found {show([type(v).__name__ for v in values[:3]])}")
    try:
        out = [v.decode() if isinstance(v, bytes) else v for v in values]
        "".join(out).encode()  # a pickled str may carry lone surrogates
    except UnicodeError:
        fail(f"{path}: {name} holds bytes that are not UTF-8")
    if len(set(out)) < len(out) or "" in out:
        dup = [k for k, count in collections.Counter(out).items() if count > 1][:3] or [""]
        fail(f"{path}: {name} must be unique and non-empty; found {show(dup)} twice or empty")
    return np.array(out, dtype=str)


def read_class_map(path, n_classes):
    """class-map.json: {name: index}, the indices exactly 0..C-1, the names unique and non-empty."""

    def no_duplicates(pairs):
        names = [k for k, _ in pairs]
        if len(set(names)) < len(names):
            fail(f"{path}: a class named twice")
        return dict(pairs)

    try:
        class_map = json.loads(path.read_bytes().decode("utf-8-sig"), object_pairs_hook=no_duplicates)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        fail(f"cannot read {path}: {type(e).__name__}: {show(str(e), 100)}")
    if not isinstance(class_map, dict) or not all(type(v) is int for v in class_map.values()):
        fail(f'{path}: expected {{"name": index, ...}}, found {show(class_map)}')
    if sorted(class_map.values()) != list(range(n_classes)) or "" in class_map:
        fail(
            f"{path} should name each of the {n_classes} label columns once, indices 0..{n_classes - 1}, with "
            f"non-empty names; found {len(class_map)} names, indices {show(sorted(class_map.values()))}"
        )
    return sorted(class_map, key=class_map.get)


def read_keys(root, kind):
    """One partition file: one sample key per line (a UTF-8 BOM and Windows line ends accepted)."""
    for name in (f"split01_{kind}.csv", f"{kind}01.txt"):
        path = root / "partitions" / name
        if path.is_file():
            try:
                keys = [line.strip() for line in path.read_bytes().decode("utf-8-sig").splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as e:
                fail(f"cannot read {path}: {type(e).__name__}: not a UTF-8 text file ({show(str(e), 80)})")
            if len(set(keys)) < len(keys):
                fail(f"{path}: key {show(collections.Counter(keys).most_common(1)[0][0])} listed twice")
            if not keys:
                fail(f"{path}: no sample key")
            return path, keys
    fail(
        f"missing partitions/split01_{kind}.csv (or partitions/{kind}01.txt) under {root}\n" + LAYOUT.format(root=root)
    )


def load_openmic(root, val_share=0.15, split_seed=0):
    """The official OpenMIC-2018 archive, as downloaded. Validation is a fixed 15% of the official train
    split (at least one clip, and at least one left to train on), drawn with `split_seed`, never with the
    training seed. X is returned as stored (0..255); info's input_scale 1/255 is applied by the model."""
    if not root.is_dir():
        fail(f"no OpenMIC-2018 folder at {root}\n" + LAYOUT.format(root=root))
    npz_path = root / "openmic-2018.npz"
    if not npz_path.is_file():
        fail(f"missing {npz_path}\n" + LAYOUT.format(root=root))
    z = read_npz(npz_path, ("X", "Y_true", "Y_mask", "sample_key"), strings=("sample_key",))
    X, Y_true, Y_mask = z["X"], z["Y_true"], z["Y_mask"]
    keys = as_strings(z["sample_key"], npz_path, "sample_key")
    n = len(keys)
    if X.ndim != 3 or X.shape[0] != n or 0 in X.shape:
        fail(f"{npz_path}: X should be (N, frames, features) with N = {n} keys, found {X.shape}")
    if Y_true.ndim != 2 or Y_mask.shape != Y_true.shape or Y_true.shape[0] != n or Y_true.shape[1] == 0:
        fail(
            f"{npz_path}: Y_true and Y_mask should both be (N, C) with N = {n}, found {Y_true.shape} and {Y_mask.shape}"
        )
    for name, a in (("X", X), ("Y_true", Y_true), ("Y_mask", Y_mask)):
        if a.dtype.kind not in "biuf":
            fail(f"{npz_path}: {name} has dtype {a.dtype}; expected numbers")
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(X).reshape(n, -1).all(1) if X.dtype.kind == "f" else np.zeros(n, bool)
    if bad.any():
        fail(f"{npz_path}: X has NaN or inf in {bad.sum()} of {n} rows")
    if not (np.isfinite(Y_true).all() and (Y_true >= 0).all() and (Y_true <= 1).all()):
        fail(f"{npz_path}: Y_true should be confidences in [0, 1]; found NaN, inf or values outside")
    if Y_mask.dtype.kind != "b" and not np.isin(Y_mask, (0, 1)).all():
        fail(f"{npz_path}: Y_mask should be booleans or 0/1; found {show(np.setdiff1d(Y_mask, (0, 1))[:3].tolist())}")
    names = read_class_map(root / "class-map.json", Y_true.shape[1])

    row_of = {k: i for i, k in enumerate(keys)}
    rows = {}
    for kind in ("train", "test"):
        path, wanted = read_keys(root, kind)
        unknown = [k for k in wanted if k not in row_of]
        if unknown:
            fail(f"{path}: {len(unknown)} key(s) not in {npz_path.name}, first {show(unknown[:3], 100)}")
        rows[kind] = np.array([row_of[k] for k in wanted], dtype=np.int64)
    both = np.intersect1d(rows["train"], rows["test"])
    if len(both):
        fail(f"{root / 'partitions'}: {len(both)} key(s) in both train and test, first {show(str(keys[both[0]]))}")
    if len(rows["train"]) < 2:
        fail(f"{root / 'partitions'}: {len(rows['train'])} train key(s); at least 2 are needed (train and validation)")
    perm = np.random.default_rng(split_seed).permutation(len(rows["train"]))
    n_val = min(max(1, int(round(val_share * len(perm)))), len(perm) - 1)
    rows["val"], rows["train"] = rows["train"][perm[:n_val]], rows["train"][np.sort(perm[n_val:])]

    def take(r):
        obs = Y_mask[r].astype(bool)
        return dict(X=X[r], Y=(Y_true[r] >= 0.5) & obs, observed=obs, keys=[str(keys[i]) for i in r])

    return {s: take(rows[s]) for s in ("train", "val", "test")}, names, dict(input_scale=1 / 255, source=npz_path)


def load(data_dir, options=None, write_atomic=None):
    """What common.load_dataset calls for --dataset openmic: the archive unpacked in data_dir/openmic-2018/."""
    return load_openmic(data_dir / "openmic-2018")
