"""AudioSet at its size: the first read of its TFRecord files, then one B0 epoch from the cache.

    python benchmarks/audioset_size.py --dir /big/disk             # 2,041,789 unbalanced-train clips
    python benchmarks/audioset_size.py --dir /tmp --unbal 100000   # a quick look

Writes a synthetic AudioSet in the released layout (random bytes, 527 classes, 1 to 3 labels a clip, one clip in
200 of 5 to 9 frames; eval 20,371 and bal_train 22,160 clips; files named by the first two characters of the
video id, as released), about 3 GB at full size. Then, each in a child process whose peak resident set size is
measured (ru_maxrss): (1) the first read (audioset.load with --audioset-train unbalanced), which checks every
record and writes the caches; (2) `b0.py --dataset audioset --audioset-train unbalanced --epochs 1`, which
starts from the caches. Prints a table; no test asserts on it. The records' CRCs are computed with audioset.py's
own vectorised CRC-32C (the tests' writer, benchmarks/fixtures.py, computes them bit by bit, far too slowly here).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import audioset  # noqa: E402
from benchmarks.fixtures import pb_feature, pb_field, pb_map  # noqa: E402

WRAPPER = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print('PEAK_RSS_MIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, flush=True); sys.exit(rc)"
)
ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", np.uint8)
N_CLASSES = 527


def records(n, rng, prefix):
    """n serialised SequenceExamples, sorted by video id; (video ids, records)."""
    ids = ALPHABET[rng.integers(0, 64, (n, 11))]
    ids[:, 0] = ord(prefix)  # each split's ids apart
    ids = np.sort(ids.view("S11").ravel())
    frames = np.where(rng.random(n) < 1 / 200, rng.integers(5, 10, n), 10)
    X = rng.integers(0, 256, (n, 10, 128), dtype=np.uint8)
    out = []
    for i in range(n):
        labels = rng.choice(N_CLASSES, size=rng.integers(1, 4), replace=False)
        context = pb_map(
            {
                "video_id": pb_feature("bytes", [bytes(ids[i])]),
                "start_time_seconds": pb_feature("float", [30.0]),
                "end_time_seconds": pb_feature("float", [40.0]),
                "labels": pb_feature("int64", labels.tolist()),
            }
        )
        embedding = b"".join(pb_field(1, pb_feature("bytes", [row.tobytes()])) for row in X[i, : frames[i]])
        out.append(pb_field(1, context) + pb_field(2, pb_map({"audio_embedding": embedding})))
    return ids, out


def write_split(folder, n, rng, prefix, chunk=200_000):
    """A split's files, named by the first two characters of the video id; returns their bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    size = 0
    for first in range(0, n, chunk):
        ids, data = records(min(chunk, n - first), rng, prefix)
        lengths = np.array([len(d) for d in data])
        rows = np.zeros((len(data), lengths.max()), np.uint8)
        for i, d in enumerate(data):
            rows[i, : len(d)] = np.frombuffer(d, np.uint8)
        crcs = audioset.masked(audioset.crc32c_rows(rows, lengths))
        names = np.array([bytes(v[:2]).decode() for v in ids])
        for name in np.unique(names):
            blob = bytearray()
            for i in np.flatnonzero(names == name):
                length = len(data[i]).to_bytes(8, "little")
                blob += length + int(audioset.masked(audioset.crc32c(length))).to_bytes(4, "little")
                blob += data[i] + int(crcs[i]).to_bytes(4, "little")
            with open(folder / f"{name}.tfrecord", "ab") as fh:
                fh.write(blob)
            size += len(blob)
    return size


def measured(cmd):
    """Run `cmd` in a child: (peak RSS MiB, wall seconds, seconds until its 'data:' line, stdout, return code)."""
    t0, data_at, lines = time.time(), None, []
    child = subprocess.Popen([sys.executable, "-c", WRAPPER, *cmd], stdout=subprocess.PIPE, text=True)
    for line in child.stdout:
        lines.append(line)
        print("    " + line.rstrip(), flush=True)
        if line.startswith("data:") and data_at is None:
            data_at = time.time() - t0
    child.wait()
    peak = next((float(x.split()[1]) for x in lines if x.startswith("PEAK_RSS_MIB")), float("nan"))
    return peak, time.time() - t0, data_at, "".join(lines), child.returncode


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="folder for the data (about 6 GB at full size, caches included)")
    p.add_argument("--unbal", type=int, default=2_041_789, help="unbalanced-train clips (default: 2,041,789)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the B0 run (default: 1)")
    args = p.parse_args()
    root = Path(args.dir) / "audioset"
    emb = root / "audioset_v1_embeddings"
    if not emb.is_dir():
        rng = np.random.default_rng(0)
        t0 = time.time()
        sizes = {
            s: write_split(emb / s, n, rng, s[0])
            for s, n in (("eval", 20_371), ("bal_train", 22_160), ("unbal_train", args.unbal))
        }
        with open(root / "class_labels_indices.csv", "w") as fh:
            fh.write("index,mid,display_name\n" + "".join(f'{i},/m/c{i},"class {i}"\n' for i in range(N_CLASSES)))
        print(f"wrote {sum(sizes.values()) / 2**30:.2f} GiB of TFRecords in {time.time() - t0:.0f} s", flush=True)
    load = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import audioset, pathlib\n"
    load += f"class O: audioset_train = 'unbalanced'\naudioset.load(pathlib.Path({str(args.dir)!r}), O())"
    first = measured([sys.executable, "-c", load])
    out = Path(args.dir) / "runs"
    cmd = [sys.executable, str(ROOT / "b0.py"), "--dataset", "audioset", "--data-dir", args.dir, "--audioset-train"]
    cmd += ["unbalanced", "--epochs", "1", "--threads", str(args.threads), "--device", "cpu", "--out", str(out)]
    epoch = measured(cmd)
    m = (
        json.loads(next(out.glob("audioset_unbalanced__b0__seed0*/metrics.json")).read_text())
        if epoch[4] == 0
        else None
    )
    print(f"\nclips: unbal_train {args.unbal:,}, eval 20,371; 527 classes; b0.py, 1 epoch, {args.threads} thread(s)")
    print("| step | peak RSS MiB | wall s | data loaded after s | epoch s |\n|---|---|---|---|---|")
    print(f"| first read: check every record, write the caches | {first[0]:,.0f} | {first[1]:.0f} | | |")
    epoch_s = f"{m['history'][0]['seconds']:.0f}" if m else f"failed ({epoch[4]})"
    print(f"| B0, from the caches | {epoch[0]:,.0f} | {epoch[1]:.0f} | {epoch[2] or float('nan'):.1f} | {epoch_s} |")


if __name__ == "__main__":
    main()
