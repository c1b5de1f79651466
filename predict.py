"""Tag new clips with a trained run: one row of per-class probabilities per clip, as CSV.

    python predict.py runs/synthetic__mean_teacher__seed0 new.h5 --out tags.csv

RUN_DIR is a finished run's folder; its model.pt holds the reported network (for mean teacher, the EMA
teacher; for label enhancement, the student), the class names and the input scaling. INPUT is an .h5
with a dataset X (N, T, D), or an .npz with X (N, T, D) or embedding (one clip, (T, D), as openl3 writes
it, or (N, T, D)); optional keys (N,) name the clips. Or an AudioSet .tfrecord file, as released (audioset.py
reads it; its clips are named <video_id>_<start>). Give the embeddings as the run's data stored them
(OpenMIC's 0..255 bytes, raw OpenL3 floats): the model applies the run's own scaling. From Python:

    from predict import load_run
    model, meta = load_run("runs/synthetic__mean_teacher__seed0")
    scores = common.predict(model, torch.from_numpy(X))          # (N, C), columns meta["class_names"]
"""

import argparse
import csv
import zipfile
from pathlib import Path

import numpy as np
import torch

import common


def load_run(folder, device="cpu"):
    """The reported network of a finished run, rebuilt in eval mode, and its model.pt's metadata.
    model.pt is read with weights_only=True: a crafted file cannot run code."""
    path = Path(folder) / "model.pt"
    if not path.is_file():
        common.fail(f"no model.pt in {folder}: not a finished run")
    try:
        bundle = torch.load(path, map_location=device, weights_only=True)
        model = common.AttentionMIL(**bundle["config"]).to(device)
        model.load_state_dict(bundle["networks"][bundle["primary"]])
    except Exception as e:  # a corrupt or foreign file fails in many ways
        common.fail(
            f"cannot load {path} (a run written by this version of missing-labels?): "
            f"{common.show((str(e) or type(e).__name__).splitlines()[0], 150)}"
        )
    return model.eval(), {k: v for k, v in bundle.items() if k != "networks"}


def read_input(path):
    """(X (N, T, D), keys or None) from an .npz (no pickle) or an .h5 file."""
    if not path.is_file():
        common.fail(f"no such file: {path}")
    if path.suffix == ".tfrecord":  # AudioSet's own files; audioset.py checks every record
        audioset = common.optional_module("audioset", "a .tfrecord input")
        try:
            return audioset.read_clips(path)
        except audioset.DataError as e:
            common.fail(str(e))
    if path.suffix not in (".h5", ".hdf5", ".npz"):
        common.fail(f"{path}: expected an .h5, .npz or .tfrecord file")
    if path.suffix == ".npz" and not zipfile.is_zipfile(path):
        common.fail(f"cannot read {path}: not an .npz (zip) archive; truncated or not written by numpy.savez?")
    try:
        if path.suffix in (".h5", ".hdf5"):
            import h5py

            guard = common.extra_module("h5guard")  # a damaged file may hang HDF5: read it in a child first
            refusal = guard.probe(path) if guard is not None else None
            if refusal:
                common.fail(refusal)
            with h5py.File(path, "r") as f:
                if not isinstance(f.get("X"), h5py.Dataset):
                    common.fail(f"{path}: no dataset X (N, T, D); found {common.show(list(f), 100)}")
                X = f["X"][()]
                keys = common.strings(f["keys"][()], path, "keys") if "keys" in f else None
        else:
            with np.load(path, allow_pickle=False) as z:
                name = "X" if "X" in z.files else "embedding" if "embedding" in z.files else None
                if name is None:
                    common.fail(f"{path}: no array X or embedding; found {common.show(z.files, 100)}")
                X = z[name]
                X = X[None] if name == "embedding" and X.ndim == 2 else X  # one openl3 clip
                keys = common.strings(z["keys"], path, "keys") if "keys" in z.files else None
    except common.UserError:
        raise
    except Exception as e:  # damaged zip, .npy or HDF5 structure, pickled members
        common.fail(f"cannot read {path}: {type(e).__name__}: {common.show(str(e), 150)}")
    if keys is not None and len(keys) != len(X):
        common.fail(f"{path}: {len(keys)} keys for {len(X)} clips")
    return common.compact(X, path), keys


def main():
    p = argparse.ArgumentParser(description="Tag new clips with a trained run.", allow_abbrev=False)
    p.add_argument("run_dir", type=Path, help="a finished run's folder (it holds model.pt)")
    p.add_argument("input", type=Path, help=".h5 with X, .npz with X or embedding, or an AudioSet .tfrecord")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("tags.csv"),
        help="CSV to write: clip, then one column per class (default: tags.csv)",
    )
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    args = p.parse_args()
    device = common.get_device(args.device)
    model, meta = load_run(args.run_dir, device)
    X, keys = read_input(args.input)
    if X.shape[2] != model.config["n_features"]:
        common.fail(
            f"{args.input}: {X.shape[2]} features per frame, but the run was trained on {model.config['n_features']}"
        )
    scores = common.predict(model, torch.from_numpy(X).to(device)).cpu().numpy()  # (N, C)

    def write(path):
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["clip"] + meta["class_names"])
            for i, row in enumerate(scores):
                w.writerow([keys[i] if keys else i] + [f"{v:.9g}" for v in row])

    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        common.write_atomic(args.out, write)
    except OSError as e:
        common.fail(f"--out {args.out}: cannot write this file ({e.strerror or e})")
    print(
        f"wrote {args.out}: {len(scores)} clips x {scores.shape[1]} classes ({meta['method']}, "
        f"network '{meta['primary']}')"
    )


if __name__ == "__main__":
    common.main_guard(main)
