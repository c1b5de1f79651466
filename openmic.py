"""OpenMIC-2018 (Humphrey, Durand, McFee, ISMIR 2018): the reader, as the archive unpacks.

Stands alone (numpy only) and never runs a pickle from the download: the numeric members load
with allow_pickle=False, and sample_key, an object array of strings in the official file, goes
through an unpickler that can rebuild a numpy array and nothing else. `common.load_dataset`
calls `load` for `--dataset openmic`. Errors are raised as DataError, one line each.
"""
import json
import pickle
import zipfile
import zlib

import numpy as np


class DataError(Exception):
    """An OpenMIC-2018 file is missing, unsafe or not as released: one line, exit 2, no traceback."""


def fail(msg):
    raise DataError(msg)


LAYOUT = """expected layout (the unpacked openmic-2018-v1.0.0.tgz from Zenodo record 1432913,
https://zenodo.org/record/1432913):
  {root}/openmic-2018.npz                  X (N, 10, 128), Y_true (N, 20), Y_mask (N, 20), sample_key (N,)
  {root}/class-map.json                    {{"accordion": 0, ..., "voice": 19}}
  {root}/partitions/split01_train.csv      one sample key per line (or partitions/train01.txt)
  {root}/partitions/split01_test.csv       one sample key per line (or partitions/test01.txt)"""


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Rebuilds a numpy object array and nothing else: no other global can be named, so a
    crafted pickle cannot reach os.system or any other callable."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a plain array of strings never needs")
        return super().find_class(module, name)


def read_npz(path, names, strings=()):
    """The members `names` of an .npz: numeric ones with allow_pickle=False, the `strings` ones
    (arrays of str, pickled as object arrays or not) through _ArrayOnlyUnpickler."""
    if not zipfile.is_zipfile(path):
        fail(f"cannot read {path}: not a zip archive (a truncated or failed download?); download it again")
    out, k = {}, None
    try:
        with zipfile.ZipFile(path) as zf, np.load(path, allow_pickle=False) as z:
            missing = [k for k in names if k not in z.files]
            if missing:
                fail(f"{path}: missing key(s) {missing}; found {z.files}")
            for k in names:
                if k not in strings:
                    out[k] = z[k]
                    continue
                with zf.open(k + ".npy") as fh:
                    version = np.lib.format.read_magic(fh)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    a = _ArrayOnlyUnpickler(fh).load() if read_header(fh)[2].hasobject else z[k]
                if not isinstance(a, np.ndarray) or not all(isinstance(v, (str, bytes)) for v in a.ravel().tolist()):
                    fail(f"{path}: {k} should be an array of strings")
                out[k] = np.array([v.decode() if isinstance(v, bytes) else v for v in a.ravel().tolist()], dtype=str)
    except pickle.UnpicklingError as e:
        fail(f"{path}: refused to read {k}: {e}")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error, TypeError, AttributeError) as e:
        fail(f"cannot read {path}: {e}")
    return out


def load_openmic(root, val_share=0.15, split_seed=0):
    """The official OpenMIC-2018 archive, as downloaded. Validation is a fixed 15% of the
    official train split, drawn with `split_seed`, never with the training seed. X is returned
    as stored (0..255); info's input_scale 1/255 is applied by the model, one batch at a time."""
    if not root.is_dir():
        fail(f"no OpenMIC-2018 folder at {root}\n" + LAYOUT.format(root=root))
    npz_path = root / "openmic-2018.npz"
    if not npz_path.is_file():
        fail(f"missing {npz_path}\n" + LAYOUT.format(root=root))
    z = read_npz(npz_path, ("X", "Y_true", "Y_mask", "sample_key"), strings=("sample_key",))
    X, Y_true, Y_mask, keys = z["X"], z["Y_true"], z["Y_mask"], z["sample_key"]
    n = len(keys)
    if X.ndim != 3 or X.shape[0] != n:
        fail(f"{npz_path}: X should be (N, frames, features) with N = {n} keys, found {X.shape}")
    if Y_true.ndim != 2 or Y_mask.shape != Y_true.shape or Y_true.shape[0] != n:
        fail(f"{npz_path}: Y_true and Y_mask should both be (N, C) with N = {n}, found {Y_true.shape} and {Y_mask.shape}")
    if X.dtype.kind not in "biuf":
        fail(f"{npz_path}: X has dtype {X.dtype}; expected integers or floats")
    bad = ~np.isfinite(X).reshape(n, -1).all(1) if X.dtype.kind == "f" else np.zeros(n, bool)
    if bad.any():
        fail(f"{npz_path}: X has NaN or inf in {bad.sum()} of {n} rows")
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
                return path, [line.strip() for line in path.read_text().splitlines() if line.strip()]
        fail(f"missing partitions/split01_{kind}.csv (or partitions/{kind}01.txt) under {root}\n"
             + LAYOUT.format(root=root))

    row_of = {k: i for i, k in enumerate(keys)}
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
        return dict(X=X[r], Y=(Y_true[r] >= 0.5) & obs, observed=obs, keys=[str(keys[i]) for i in r])
    return {s: take(rows[s]) for s in ("train", "val", "test")}, names, dict(input_scale=1 / 255, source=npz_path)


def load(data_dir, level=None, write_atomic=None):
    """What common.load_dataset calls for --dataset openmic: the archive unpacked in data_dir/openmic-2018/."""
    return load_openmic(data_dir / "openmic-2018")
