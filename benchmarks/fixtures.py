"""Small datasets written in the official layouts (OpenMIC-2018 as its archive unpacks, SONYC-UST v2 as
released plus openl3's embeddings; docs/data.md) and in this project's .h5 layout, and crafted pickles: what
the tests and the readers' fuzz benchmark (benchmarks/fuzz.py) start from. No pytest: both import it."""

import csv
import json
import os
from pathlib import Path

import h5py
import numpy as np

#####  OpenMIC-2018, as the archive unpacks  ##################################################################

OPENMIC_CLASSES = [
    "accordion",
    "banjo",
    "bass",
    "cello",
    "clarinet",
    "cymbals",
    "drums",
    "flute",
    "guitar",
    "mallet_percussion",
    "mandolin",
    "organ",
    "piano",
    "saxophone",
    "synthesizer",
    "trombone",
    "trumpet",
    "ukulele",
    "violin",
    "voice",
]


def write_openmic(root, n=80, n_test=20, partition_names=("split01_train.csv", "split01_test.csv"), seed=0):
    """A tiny openmic-2018/ folder exactly as the archive unpacks; returns (folder, raw arrays)."""
    rng = np.random.default_rng(seed)
    root = Path(root) / "openmic-2018"
    (root / "partitions").mkdir(parents=True)
    keys = np.array(sorted(f"{rng.integers(0, 999999):06d}_{i * 960}" for i in range(n)), dtype=object)
    X = rng.integers(0, 256, (n, 10, 128)).astype(np.uint8)
    mask = rng.random((n, 20)) < 0.5
    mask[:, :] |= np.eye(20, dtype=bool)[np.arange(n) % 20]  # every class observed somewhere
    conf = rng.uniform(0.2, 1.0, (n, 20))
    sign = np.where(rng.random((n, 20)) < 0.5, 1.0, -1.0)
    Y_true = np.where(mask, 0.5 + sign * conf / 2, 0.5)
    np.savez(root / "openmic-2018.npz", X=X, Y_true=Y_true, Y_mask=mask, sample_key=keys)
    (root / "class-map.json").write_text(json.dumps({c: i for i, c in enumerate(OPENMIC_CLASSES)}))
    order = rng.permutation(n)
    test_keys, train_keys = keys[order[:n_test]], keys[order[n_test:]]
    (root / "partitions" / partition_names[0]).write_text("".join(k + "\n" for k in train_keys))
    (root / "partitions" / partition_names[1]).write_text("".join(k + "\n" for k in test_keys))
    return root, dict(X=X, Y_true=Y_true, mask=mask, keys=keys, train_keys=train_keys, test_keys=test_keys)


def read_openmic_npz(path):
    """The arrays of an openmic-2018.npz this file wrote, read without unpickling anything (openmic.py's own
    reader); sample_key comes back as the official file has it, an object array of str."""
    import openmic

    arrays = openmic.read_npz(path, ("X", "Y_true", "Y_mask", "sample_key"), strings=("sample_key",))
    return dict(arrays, sample_key=arrays["sample_key"].astype(object))


class Payload:
    """Unpickling this runs a shell command: what a crafted download would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class HugeArray:
    """Unpickles as numpy.ndarray((10**12,), object): terabytes, from a file of a few hundred bytes."""

    def __reduce__(self):
        return np.ndarray, ((10**12,), np.dtype("O"))


#####  Your own .h5  #######################################################################################


def write_h5(path, n=60, str_kind="bytes", seed=0, no_train_label_for=None, observed_share=0.5, full_truth=False):
    """A small .h5 in the project's layout: 5 classes, bags of 4 frames x 16 features, half train."""
    rng = np.random.default_rng(seed)
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4))
    obs = rng.random((n, 5)) < observed_share
    obs |= np.eye(5, dtype=bool)[np.arange(n) % 5]
    if no_train_label_for is not None:
        obs[split == "train", no_train_label_for] = False
    truth = rng.random((n, 5)) < 0.4
    with h5py.File(path, "w") as f:
        f["X"] = rng.standard_normal((n, 4, 16)).astype(np.float32)
        f["Y"] = (truth & obs).astype(np.float32) if full_truth else truth.astype(np.float32)
        f["observed"] = obs
        f["split"] = np.array([s.encode() for s in split]) if str_kind == "bytes" else split.astype(h5py.string_dtype())
        f["keys"] = np.array([f"clip{i}".encode() for i in range(n)])
        f.attrs["class_names"] = [f"tag{c}" for c in range(5)]
        if full_truth:
            f["Y_full"] = truth
    return path


def write_scaled_h5(path, dtype, scale, n=64):
    """An .h5 of OpenMIC's shapes (4 classes): raw bytes 0..255 for uint8, else normal values times `scale`."""
    rng = np.random.default_rng(1)
    X = rng.integers(0, 256, (n, 10, 128)) if dtype == np.uint8 else rng.standard_normal((n, 10, 128)) * scale
    with h5py.File(path, "w") as f:
        f["X"] = X.astype(dtype)
        f["Y"] = (rng.random((n, 4)) < 0.4).astype(np.uint8)
        f["observed"] = rng.random((n, 4)) < 0.6
        f["split"] = np.array([b"train"] * 40 + [b"val"] * 12 + [b"test"] * 12)
        f.attrs["class_names"] = ["a", "b", "c", "d"]
    return path


#####  SONYC-UST v2, as released, plus openl3's embeddings  ###############################################

SONYC_COARSE = [
    "1_engine",
    "2_machinery-impact",
    "3_non-machinery-impact",
    "4_powered-saw",
    "5_alert-signal",
    "6_music",
    "7_human-voice",
    "8_dog",
]
SONYC_FINE = [
    "1-1_small-sounding-engine",
    "1-2_medium-sounding-engine",
    "1-3_large-sounding-engine",
    "1-X_engine-of-uncertain-size",
    "2-1_rock-drill",
    "2-2_jackhammer",
    "2-3_hoe-ram",
    "2-4_pile-driver",
    "2-X_other-unknown-impact-machinery",
    "3-1_non-machinery-impact",
    "4-1_chainsaw",
    "4-2_small-medium-rotating-saw",
    "4-3_large-rotating-saw",
    "4-X_other-unknown-powered-saw",
    "5-1_car-horn",
    "5-2_car-alarm",
    "5-3_siren",
    "5-4_reverse-beeper",
    "5-X_other-unknown-alert-signal",
    "6-1_stationary-music",
    "6-2_mobile-music",
    "6-3_ice-cream-truck",
    "6-X_music-from-uncertain-source",
    "7-1_person-or-small-group-talking",
    "7-2_person-or-small-group-shouting",
    "7-3_large-crowd",
    "7-4_amplified-speech",
    "7-X_other-unknown-human-voice",
    "8-1_dog-barking-whining",
]

# (split, audio_filename, annotator_id, {fine tag prefix: value}); coarse columns follow from the fine ones.
SONYC_ROWS = [
    ("train", "00_000001.wav", 10, {"1-1": 1}),
    ("train", "00_000001.wav", 11, {"1-1": 0, "5-3": 1}),
    ("train", "00_000001.wav", -5, {"8-1": 1}),  # team row: not used for train targets
    ("train", "00_000002.wav", 12, {"1-X": 1, "2-1": -1, "6-1": 1}),
    ("validate", "01_000003.wav", 0, {"7-1": 1, "4-X": 1}),
    ("validate", "01_000003.wav", 13, {"8-1": 1}),  # crowd row: not used for validate targets
    ("validate", "01_000004.wav", 14, {"3-1": 1}),  # no verified row: left out
    ("validate", "01_000005.wav", 0, {"8-1": 1}),
    ("test", "02_000006.wav", 0, {"3-1": 1}),
    ("test", "02_000007.wav", 0, {"1-2": 1, "5-X": 1}),
]


def write_sonyc(root, rows=SONYC_ROWS, drop_column=None, bad_value=None, skip_embedding=None, bad_shape=None):
    """A tiny sonyc-ust/ folder: annotations.csv as released (columns in an unusual order) and embeddings/."""
    root = Path(root) / "sonyc-ust"
    (root / "embeddings").mkdir(parents=True)
    fine_cols = [f"{t}_presence" for t in SONYC_FINE]
    prox_cols = [f"{t}_proximity" for t in SONYC_FINE]
    coarse_cols = [f"{t}_presence" for t in SONYC_COARSE]
    meta = [
        "split",
        "sensor_id",
        "audio_filename",
        "annotator_id",
        "year",
        "week",
        "day",
        "hour",
        "borough",
        "block",
        "latitude",
        "longitude",
    ]
    header = coarse_cols[::-1] + meta + fine_cols + prox_cols  # column order is not to be relied on
    if drop_column:
        header.remove(drop_column)
    with open(root / "annotations.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for split, fname, annotator, tags in rows:
            rec = dict(
                split=split,
                sensor_id=3,
                audio_filename=fname,
                annotator_id=annotator,
                year=2019,
                week=3,
                day=2,
                hour=11,
                borough=1,
                block=547,
                latitude=40.7,
                longitude=-73.9,
            )
            for t in SONYC_FINE:
                rec[f"{t}_presence"] = tags.get(t.split("_")[0], 0)
                rec[f"{t}_proximity"] = "-1"
            for c in SONYC_COARSE:
                vals = [v for k, v in tags.items() if k.split("-")[0] == c.split("_")[0]]
                rec[f"{c}_presence"] = 1 if 1 in vals else (-1 if vals and all(v == -1 for v in vals) else 0)
            w.writerow([rec[h] for h in header])
        if bad_value is not None:
            rec[header[0]] = bad_value
            w.writerow([rec[h] for h in header])
    rng = np.random.default_rng(0)
    for fname in sorted({r[1] for r in rows}):
        if fname == skip_embedding:
            continue
        shape = bad_shape if fname == "02_000006.wav" and bad_shape else (11, 512)
        np.savez(
            root / "embeddings" / (fname[:-4] + ".npz"),
            embedding=rng.standard_normal(shape).astype(np.float32),
            timestamps=np.arange(shape[0], dtype=np.float64),
        )
    return root


#####  AudioSet, as the features archive unpacks: TFRecord files of SequenceExamples  #########################
# The project's own TFRecord writer: the protobuf wire format and the masked CRC-32C written here from the format's
# description (DATA.md), sharing no code with audioset.py's reader, so that a mistake in one is not mirrored in
# the other.

AUDIOSET_CLASSES = [
    ("/m/09x0r", "Speech"),
    ("/m/04rlf", "Music"),
    ("/m/0jbk", "Animal"),
    ("/m/07yv9", "Vehicle"),
    ("/m/0ytgt", "Child speech, kid speaking"),  # a name with a comma: quoted in the CSV
    ("/m/03m9d0z", "Wind"),
]


def crc32c_bitwise(data):
    """CRC-32C (Castagnoli), one bit at a time: slow and plain."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
    c = crc32c_bitwise(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def pb_varint(n):
    n &= (1 << 64) - 1  # a negative int64 as protobuf writes it: ten bytes
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb_field(number, payload, wire=2):
    """One field: its key, then a varint (wire 0) or a length and bytes (wire 2)."""
    key = pb_varint(number << 3 | wire)
    return key + (pb_varint(payload) if wire == 0 else pb_varint(len(payload)) + payload)


def pb_feature(kind, values):
    """A tf.train.Feature: kind 'bytes' (BytesList), 'float' (FloatList, packed) or 'int64' (Int64List, packed)."""
    if kind == "bytes":
        inner = b"".join(pb_field(1, v) for v in values)
        return pb_field(1, inner)
    if kind == "float":
        return pb_field(2, pb_field(1, np.asarray(values, "<f4").tobytes()))
    return pb_field(3, pb_field(1, b"".join(pb_varint(int(v)) for v in values)))


def pb_map(entries):
    """A Features or FeatureLists message: map<string, value>."""
    return b"".join(pb_field(1, pb_field(1, name.encode()) + pb_field(2, value)) for name, value in entries.items())


def sequence_example(video_id, start, end, labels, frames):
    """A tf.train.SequenceExample as AudioSet's records are: context video_id, start/end times, labels; feature
    list audio_embedding, one 128-byte BytesList per second (`frames`: a list of bytes)."""
    context = pb_map(
        {
            "video_id": pb_feature("bytes", [video_id.encode()]),
            "start_time_seconds": pb_feature("float", [start]),
            "end_time_seconds": pb_feature("float", [end]),
            "labels": pb_feature("int64", labels),
        }
    )
    embedding = b"".join(pb_field(1, pb_feature("bytes", [f])) for f in frames)  # a FeatureList
    return pb_field(1, context) + pb_field(2, pb_map({"audio_embedding": embedding}))


def tfrecord(data):
    """One TFRecord: length, its masked CRC-32C, the data, its masked CRC-32C."""
    length = len(data).to_bytes(8, "little")
    return length + masked_crc32c(length).to_bytes(4, "little") + data + masked_crc32c(data).to_bytes(4, "little")


def write_tfrecord(path, records):
    Path(path).write_bytes(b"".join(tfrecord(r) for r in records))


def audioset_clips(n, rng, n_classes, prefix, short=()):
    """n clips: (video_id, start, labels, X (frames, 128) uint8); the clips numbered in `short` have 7 frames."""
    clips = []
    for i in range(n):
        labels = sorted(rng.choice(n_classes, size=rng.integers(1, 3), replace=False).tolist())
        frames = 7 if i in short else 10
        X = rng.integers(0, 256, (frames, 128), dtype=np.uint8)
        clips.append((f"{prefix}{i:07d}"[-11:], float(30 * (i % 5)), labels, X))
    return clips


def write_audioset(root, n_bal=24, n_eval=12, n_unbal=16, short=(3,), per_file=5, seed=0):
    """A tiny audioset/ folder as the features archive unpacks, with class_labels_indices.csv; files named by the
    first two characters of the video id and holding per_file clips each. Returns (folder, {split: clips})."""
    rng = np.random.default_rng(seed)
    root = Path(root) / "audioset"
    clips = dict(
        bal_train=audioset_clips(n_bal, rng, len(AUDIOSET_CLASSES), "b", short),
        eval=audioset_clips(n_eval, rng, len(AUDIOSET_CLASSES), "e"),
        unbal_train=audioset_clips(n_unbal, rng, len(AUDIOSET_CLASSES), "u"),
    )
    for split, items in clips.items():
        folder = root / "audioset_v1_embeddings" / split
        folder.mkdir(parents=True)
        for f in range(0, len(items), per_file):
            records = [
                sequence_example(v, s, s + len(X), labels, [bytes(row) for row in X])
                for v, s, labels, X in items[f : f + per_file]
            ]
            write_tfrecord(folder / f"{split[0]}{f // per_file:01d}.tfrecord", records)
    with open(root / "class_labels_indices.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "mid", "display_name"])
        for i, (mid, name) in enumerate(AUDIOSET_CLASSES):
            w.writerow([i, mid, name])
    return root, clips
