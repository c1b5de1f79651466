"""AudioSet (Gemmeke et al., ICASSP 2017): the released embeddings, read as downloaded, and AudioSet's metrics.

The features archive unpacks into TFRecord files of tf.train.SequenceExample records: per clip a YouTube id,
start and end times, the indices of its positive labels, and one 128-byte VGGish embedding per second. Every
label not listed is unknown, not absent: only positives are labelled. By the AudioSet papers' convention the
evaluation scores every unlisted label as absent; this reader does the same for validation and test, and keeps
the training labels as released, positive-only (Y and observed one array).

Stands alone (numpy and the standard library; no TensorFlow, no protobuf package) and treats every file as
hostile until read: each record's length and data are checked against their masked CRC-32C before use (the
CRC in numpy over thousands of records at once), the length against the file's size before anything is
allocated, and the SequenceExample is parsed by a small reader of the protobuf wire format that bounds every
field by its record. A truncated download, a flipped bit, a label outside class_labels_indices.csv, an
embedding that is not 128 bytes or an empty file is one line naming the file and the record, and nothing is
half-loaded. docs/data.md says why this reader rather than the `tfrecord` package.

The first read of a split writes a cache beside the data (`cache-<split>.bin`: the embeddings, the labels in
compressed rows, the clip ids; CRC-32 checked, keyed on every file's name, size and modification time and on
the class table), so later runs start in seconds. `common.load_dataset` calls `load` for --dataset audioset;
`audioset_metrics` gives mAP, mean ROC AUC and d'. Errors are raised as DataError, one line each.
"""

import csv
import hashlib
import io
import json
import math
import os
import statistics
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np


class DataError(Exception):
    """An AudioSet file is missing, damaged or not as released: one line, exit status 2, no traceback."""


def fail(msg):
    raise DataError(msg)


def show(value, width=60):  # a value from a file in a message, cut to `width` characters
    return repr(value) if len(repr(value)) <= width else repr(value)[: width - 5] + " ...'"


LAYOUT = """expected layout (AudioSet's embeddings, https://research.google.com/audioset/download.html: features.tar.gz,
unpacked, and class_labels_indices.csv):
  {root}/audioset_v1_embeddings/bal_train/*.tfrecord     balanced train, about 22 k clips
  {root}/audioset_v1_embeddings/eval/*.tfrecord          eval, about 20 k clips: the test split
  {root}/audioset_v1_embeddings/unbal_train/*.tfrecord   unbalanced train, about 2 M clips (--audioset-train)
  {root}/class_labels_indices.csv                        index,mid,display_name: 527 classes"""

SOURCES = dict(balanced=("bal_train",), unbalanced=("unbal_train",), both=("bal_train", "unbal_train"))
FRAMES, WIDTH = 10, 128  # a clip: ten one-second VGGish embeddings of 128 bytes
VAL_SHARE, VAL_MAX, SPLIT_SEED = 0.1, 20000, 0  # validation: 10% of the training clips, at most 20,000
MAX_RECORD = 1 << 20  # a clip's record is about 1.4 kB; a length beyond 1 MiB is damage, not data
READER_VERSION = "audioset.py 1"
KINDS = (
    "",
    "bytes",
    "float",
    "int64",
)  # a Feature's lists, by field number  # part of the cache's key: a changed reader rebuilds its caches


#####  TFRecord framing and the masked CRC-32C  ###################################################


def _crc_tables():
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): the byte table, and the table for two bytes at
    once (the byte step applied twice), which halves the steps of crc32c_rows."""
    t8 = np.zeros(256, np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t8[i] = c
    i = np.arange(65536, dtype=np.uint32)
    r = t8[i & 0xFF] ^ (i >> 8)
    return t8, t8[r & 0xFF] ^ (r >> 8)


T8, T16 = _crc_tables()
T8_LIST = T8.tolist()


def crc32c(data):
    """CRC-32C of a short bytes object, byte by byte (a record's 8-byte length)."""
    c = 0xFFFFFFFF
    for b in data:
        c = T8_LIST[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def crc32c_rows(rows, lengths):
    """CRC-32C of each row's first lengths[i] bytes: rows (n, L) uint8, many records at once, two bytes a step
    (about 200 MB/s here, where a Python loop makes 5)."""
    n, width = rows.shape
    crc = np.full(n, 0xFFFFFFFF, np.uint32)
    words = np.ascontiguousarray(rows[:, : width - width % 2]).view("<u2")  # (n, L // 2) little-endian pairs
    pairs = lengths // 2
    for j in range(words.shape[1]):
        crc = np.where(j < pairs, T16[(crc ^ words[:, j]) & 0xFFFF] ^ (crc >> 16), crc)
    last = rows[np.arange(n), np.maximum(lengths - 1, 0)]  # an odd length's last byte
    crc = np.where(lengths % 2 == 1, T8[(crc ^ last) & 0xFF] ^ (crc >> 8), crc)
    return crc ^ np.uint32(0xFFFFFFFF)


def masked(crc):
    """TFRecord's masked CRC: ((c >> 15 | c << 17) + 0xa282ead8) mod 2**32, for an int or a uint32 array."""
    crc = np.asarray(crc, np.uint64)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_records(path):
    """One TFRecord file's records, framed: (file bytes, starts, lengths, stored data CRCs). Each length is
    checked against its masked CRC-32C before it is used, and against the file's end; the data CRCs are checked
    by check_records, many files at once."""
    try:
        blob = path.read_bytes()
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror or e}")
    if not blob:
        fail(f"{path}: an empty file (a failed download?); download the archive again")
    starts, lengths, stored, pos = [], [], [], 0
    while pos < len(blob):
        n = len(starts)
        if len(blob) - pos < 12:
            fail(f"{path}: record {n} is cut off after {len(blob) - pos} bytes of its header (a truncated download?)")
        length_bytes = blob[pos : pos + 8]
        if struct.unpack_from("<I", blob, pos + 8)[0] != int(masked(crc32c(length_bytes))):
            fail(f"{path}: record {n}: its length fails its CRC-32C check (a damaged file)")
        length = struct.unpack("<Q", length_bytes)[0]
        if length > MAX_RECORD or pos + 12 + length + 4 > len(blob):
            fail(f"{path}: record {n} claims {length} bytes, past the end of the file (a truncated download?)")
        starts.append(pos + 12)
        lengths.append(length)
        stored.append(struct.unpack_from("<I", blob, pos + 12 + length)[0])
        pos += 12 + length + 4
    return blob, starts, lengths, stored


def check_records(framed):
    """The data CRC of every record of several framed files at once [(path, (blob, starts, lengths, stored))];
    the first record that fails is one line. Returns each file's records as a list of bytes."""
    lengths = np.array([n for _, f in framed for n in f[2]], np.int64)
    rows = np.zeros((len(lengths), int(lengths.max()) if len(lengths) else 0), np.uint8)
    i = 0
    for _, (blob, starts, sizes, _) in framed:
        buffer = np.frombuffer(blob, np.uint8)
        for s, n in zip(starts, sizes):
            rows[i, :n] = buffer[s : s + n]
            i += 1
    stored = np.array([c for _, f in framed for c in f[3]], np.uint64)
    bad = np.flatnonzero(masked(crc32c_rows(rows, lengths)) != stored)
    if len(bad):
        first = int(bad[0])
        for path, (_, starts, _, _) in framed:
            if first < len(starts):
                fail(f"{path}: record {first}: its data fails its CRC-32C check (a damaged file)")
            first -= len(starts)
    return [[blob[s : s + n] for s, n in zip(starts, sizes)] for _, (blob, starts, sizes, _) in framed]


def read_records(path):
    """The data of every record of one TFRecord file, every CRC checked: a list of bytes."""
    return check_records([(path, frame_records(path))])[0]


#####  The protobuf wire format, for tf.train.SequenceExample  ####################################


class Damaged(Exception):
    """A record whose CRC is right but whose content breaks the SequenceExample layout."""


def varint(buf, pos, end):
    """(value, next position) of the base-128 varint at pos; at most 10 bytes, inside [pos, end)."""
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise Damaged("a varint runs past its field")
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        shift += 7
        if b < 0x80:
            return value, pos


def fields(buf, start, end):
    """Each (field number, wire type, value) of the message buf[start:end]: an int for a varint, a (start, end)
    pair for a length-delimited field, bytes for a fixed-width one. Groups and unknown wire types are damage."""
    pos = start
    while pos < end:
        key, pos = varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = varint(buf, pos, end)
        elif wire == 2:
            size, pos = varint(buf, pos, end)
            if size > end - pos:
                raise Damaged(f"field {number} claims {size} bytes, more than its message holds")
            value, pos = (pos, pos + size), pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if size > end - pos:
                raise Damaged(f"field {number} is cut off")
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise Damaged(f"field {number} has wire type {wire}, which a SequenceExample never uses")
        yield number, wire, value


def feature_map(buf, start, end):
    """A Features or FeatureLists message: {name: (start, end) of its value}; a name twice is damage."""
    out = {}
    for number, wire, value in fields(buf, start, end):
        if number != 1 or wire != 2:
            continue
        name, entry = None, None
        for n, w, v in fields(buf, *value):
            if n == 1 and w == 2:
                name = bytes(buf[v[0] : v[1]])
            elif n == 2 and w == 2:
                entry = v
        if name is None or entry is None:
            raise Damaged("a feature without a name or a value")
        try:
            name = name.decode()
        except UnicodeError:
            raise Damaged("a feature name that is not UTF-8")
        if name in out:
            raise Damaged(f"feature {name!r} twice")
        out[name] = entry
    return out


def feature_values(buf, span, kind):
    """The values of one Feature: kind 1 bytes_list (a list of bytes), 2 float_list, 3 int64_list (packed or
    not). A Feature of another kind is damage."""
    values, found = [], None
    for number, wire, value in fields(buf, *span):
        if number in (1, 2, 3) and wire == 2:
            found = number
            if number == kind:
                for n, w, v in fields(buf, *value):
                    if n != 1:
                        continue
                    if kind == 1 and w == 2:
                        values.append(bytes(buf[v[0] : v[1]]))
                    elif kind == 2 and w == 5:
                        values.append(struct.unpack("<f", v)[0])
                    elif kind == 2 and w == 2 and (v[1] - v[0]) % 4 == 0:
                        values.extend(struct.unpack(f"<{(v[1] - v[0]) // 4}f", buf[v[0] : v[1]]))
                    elif kind == 3 and w == 0:
                        values.append(v)
                    elif kind == 3 and w == 2:
                        pos = v[0]
                        while pos < v[1]:
                            x, pos = varint(buf, pos, v[1])
                            values.append(x)
                    else:
                        raise Damaged(f"a {KINDS[kind]} list holds a field of wire type {w}")
    if found is not None and found != kind:
        raise Damaged(f"a {KINDS[found]} list where a {KINDS[kind]} list belongs")
    return values


def parse_clip(data, n_classes):
    """One record's SequenceExample: (video_id, start, end, labels (list of ints), frames (list of 128-byte
    bytes)), every part checked; raises Damaged naming what is wrong."""
    buf = memoryview(data)
    context = feature_lists = None
    for number, wire, value in fields(buf, 0, len(buf)):
        if number == 1 and wire == 2:
            context = feature_map(buf, *value)
        elif number == 2 and wire == 2:
            feature_lists = feature_map(buf, *value)
    if context is None or feature_lists is None:
        raise Damaged("no context or no feature_lists: not a SequenceExample")
    missing = [k for k in ("video_id", "start_time_seconds", "end_time_seconds", "labels") if k not in context]
    if missing or "audio_embedding" not in feature_lists:
        raise Damaged(f"missing {missing or ['audio_embedding']}")
    video_id = feature_values(buf, context["video_id"], 1)
    start, end = (
        feature_values(buf, context["start_time_seconds"], 2),
        feature_values(buf, context["end_time_seconds"], 2),
    )
    if len(video_id) != 1 or not 1 <= len(video_id[0]) <= 64 or len(start) != 1 or len(end) != 1:
        raise Damaged("video_id, start_time_seconds and end_time_seconds should hold one value each")
    try:
        video_id = video_id[0].decode("ascii")
    except UnicodeError:
        raise Damaged(f"video_id {show(video_id[0])} is not ASCII")
    if not (math.isfinite(start[0]) and math.isfinite(end[0])):
        raise Damaged("start or end time is not finite")
    labels = feature_values(buf, context["labels"], 3)
    outside = [v for v in labels if not 0 <= v < n_classes]
    if outside:
        v = outside[0] - (1 << 64) if outside[0] >= 1 << 63 else outside[0]
        raise Damaged(f"label index {v} is outside class_labels_indices.csv's {n_classes} classes")
    frames = []
    for number, wire, value in fields(buf, *feature_lists["audio_embedding"]):  # a FeatureList: Features
        if number == 1 and wire == 2:
            frame = feature_values(buf, value, 1)
            if len(frame) != 1 or len(frame[0]) != WIDTH:
                sizes = [len(f) for f in frame]
                raise Damaged(f"embedding {len(frames)} holds {sizes} bytes, not one value of {WIDTH}")
            frames.append(frame[0])
    if not frames:
        raise Damaged("audio_embedding holds no frame")
    return video_id, start[0], end[0], labels, frames


#####  One split (bal_train, eval, unbal_train): read once into a cache, then from the cache  ########


def read_classes(root):
    """class_labels_indices.csv: index,mid,display_name; indices 0..C-1 in order, mids unique, names present.
    Returns (path, rows [(mid, name)])."""
    for path in (root / "class_labels_indices.csv", root / "audioset_v1_embeddings" / "class_labels_indices.csv"):
        if path.is_file():
            break
    else:
        fail(f"missing class_labels_indices.csv in {root}\n" + LAYOUT.format(root=root))
    try:
        table = list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8-sig"), newline="")))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        fail(f"cannot read {path}: {type(e).__name__}: {show(str(e), 100)}")
    table = [r for r in table if r]
    if not table or [h.strip() for h in table[0]] != ["index", "mid", "display_name"]:
        fail(f"{path}: expected the header index,mid,display_name, found {show(table[0] if table else '')}")
    rows = []
    for i, r in enumerate(table[1:]):
        if len(r) != 3 or r[0].strip() != str(i) or not r[1].strip() or not r[2].strip():
            fail(f"{path}: row {i + 2} should be {i},<mid>,<name>; found {show(r)}")
        rows.append((r[1].strip(), r[2].strip()))
    if not rows:
        fail(f"{path}: no class")
    if len({m for m, _ in rows}) < len(rows):
        fail(f"{path}: a mid is listed twice")
    return path, rows


def split_files(root, split):
    folder = root / "audioset_v1_embeddings" / split
    files = sorted(folder.glob("*.tfrecord")) if folder.is_dir() else []
    if not files:
        fail(f"no .tfrecord file in {folder}\n" + LAYOUT.format(root=root))
    return files


def cache_key(files, classes_path):
    """Every file's name, size and modification time, the class table's bytes and the reader's version."""
    h = hashlib.sha256(READER_VERSION.encode())
    h.update(hashlib.sha256(classes_path.read_bytes()).digest())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


ARRAYS = ("X", "label_offsets", "labels", "video_ids", "starts", "frames")  # a cache's sections, in order


def grouped(files, records=20000):
    """The files in groups of about `records` records, each framed: so that the data CRCs of many small files
    (bal_train has about 5 clips a file) are checked in one pass."""
    group, count = [], 0
    for f in files:
        framed = frame_records(f)
        group.append((f, framed))
        count += len(framed[1])
        if count >= records:
            yield group
            group, count = [], 0
    if group:
        yield group


def build_cache(files, n_classes, key, path):
    """Read every record of a split's files, checked, and write the cache at `path`: X (N, 10, 128) uint8 as it
    is read, then the labels as compressed rows (offsets (N + 1,), class indices), the ids, start times and
    each clip's frame count, then a JSON footer (shapes, dtypes, CRC-32 of each section, the key) and its
    length. Written to a temporary file and renamed: a cache on disk is whole."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    offsets, labels, ids, starts, frame_counts = [0], [], [], [], []
    try:
        with os.fdopen(fd, "wb") as out:
            crc_x = 0
            for group in grouped(files):
                block = []
                for (f, _), records in zip(group, check_records(group)):
                    for i, data in enumerate(records):
                        try:
                            video_id, start, _, clip_labels, frames = parse_clip(data, n_classes)
                        except Damaged as e:
                            fail(f"{f}: record {i}: {e}")
                        x = np.frombuffer(b"".join(frames), np.uint8).reshape(-1, WIDTH)
                        block.append(np.resize(x, (FRAMES, WIDTH)))  # a short clip repeated to fill 10 frames
                        labels.extend(sorted(set(clip_labels)))
                        offsets.append(len(labels))
                        ids.append(video_id)
                        starts.append(start)
                        frame_counts.append(len(frames))
                if block:
                    data = np.stack(block).tobytes()
                    crc_x = zlib.crc32(data, crc_x)
                    out.write(data)
            sections = dict(
                label_offsets=np.array(offsets, np.int64),
                labels=np.array(labels, np.int16),
                video_ids=np.array(ids, "S64"),
                starts=np.array(starts, np.float32),
                frames=np.array(frame_counts, np.int16),
            )
            footer = dict(key=key, n=len(ids), crc=dict(X=crc_x), shapes={}, dtypes={})
            for name, a in sections.items():
                data = a.tobytes()
                out.write(data)
                footer["crc"][name] = zlib.crc32(data)
                footer["shapes"][name] = list(a.shape)
                footer["dtypes"][name] = a.dtype.str
            data = json.dumps(footer).encode()
            out.write(data + struct.pack("<Q", len(data)))
        umask = os.umask(0o022)  # the mode open() would give a new file: 0666 less the umask (read by setting it)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_footer(path, key):
    """The cache's footer if it is whole and made for `key`, else None (it is then rebuilt)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            if size < 8:
                return None
            fh.seek(size - 8)
            n = struct.unpack("<Q", fh.read(8))[0]
            if n > min(size - 8, 1 << 20):
                return None
            fh.seek(size - 8 - n)
            footer = json.loads(fh.read(n))
        if not isinstance(footer, dict) or footer.get("key") != key:
            return None
        total = FRAMES * WIDTH * int(footer["n"])
        for name in ARRAYS[1:]:
            total += math.prod(footer["shapes"][name]) * np.dtype(footer["dtypes"][name]).itemsize
        return footer if total + n + 8 == size else None
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def read_cache(path, footer, targets):
    """A cache's arrays, each CRC-checked, or None if a check fails. X is read in blocks and its rows scattered
    into `targets`, [(destination array, rows of this cache, sorted)], so that no second copy of AudioSet's
    2.6 GB is made; the small arrays are returned."""
    n, out = int(footer["n"]), {}
    with open(path, "rb") as fh:
        crc = 0
        for first in range(0, n, 65536):
            k = min(65536, n - first)
            data = fh.read(k * FRAMES * WIDTH)
            crc = zlib.crc32(data, crc)
            block = np.frombuffer(data, np.uint8).reshape(k, FRAMES, WIDTH)
            for target, rows in targets:
                lo, hi = np.searchsorted(rows, [first, first + k])
                target[lo:hi] = block[rows[lo:hi] - first]
        if crc != footer["crc"]["X"]:
            return None
        for name in ARRAYS[1:]:
            dtype = np.dtype(footer["dtypes"][name])
            data = fh.read(math.prod(footer["shapes"][name]) * dtype.itemsize)
            if zlib.crc32(data) != footer["crc"][name]:
                return None
            out[name] = np.frombuffer(data, dtype).reshape(footer["shapes"][name])
    return out


def cached_split(root, split, classes_path, n_classes, rebuild=False):
    """(path, footer) of a split's cache, built first if it is missing, stale or damaged (`rebuild`). A data
    folder that cannot be written keeps the cache in the temporary folder for this run."""
    files = split_files(root, split)
    key = cache_key(files, classes_path)
    path = root / f"cache-{split}.bin"
    footer = None if rebuild else read_footer(path, key)
    if footer is None:
        print(f"audioset: reading the {len(files)} file(s) of {split} (once: later runs read {path.name})", flush=True)
        try:
            build_cache(files, n_classes, key, path)
        except OSError as e:  # a read-only data folder only costs the cache
            print(
                f"warning: cannot write the cache {path} ({e.strerror or e}); it is kept in the temporary folder "
                f"for this run, and the next run reads the .tfrecord files again",
                file=sys.stderr,
            )
            path = Path(tempfile.gettempdir()) / f"missing-labels-audioset-{split}-{key[:16]}.bin"
            try:
                build_cache(files, n_classes, key, path)
            except OSError as e:
                fail(f"cannot write the AudioSet cache {path}: {e.strerror or e}")
        footer = read_footer(path, key)
        if footer is None:
            fail(f"{path}: the cache just written fails its own check (a full or failing disk?)")
    return path, footer


#####  The splits as the methods read them  #######################################################


def dense(offsets, indices, rows, out):
    """Set out[i, c] where clip rows[i] has label c, from compressed rows (offsets (N + 1,), class indices)."""
    counts = offsets[rows + 1] - offsets[rows]
    first = np.cumsum(counts) - counts  # where each clip's labels start in the gathered list
    gather = np.repeat(offsets[rows] - first, counts) + np.arange(int(counts.sum()))
    out[np.repeat(np.arange(len(rows)), counts), indices[gather].astype(np.int64)] = True


def first_duplicate(arrays):
    """A clip listed twice (the same video and start time), within a split or across them: {split: arrays}.
    Its description, or None."""
    ids = np.concatenate([a["video_ids"] for a in arrays.values()])
    starts = np.concatenate([a["starts"] for a in arrays.values()])
    split = np.repeat(list(arrays), [len(a["video_ids"]) for a in arrays.values()])
    order = np.lexsort((starts, ids))
    same = np.flatnonzero((ids[order][1:] == ids[order][:-1]) & (starts[order][1:] == starts[order][:-1]))
    if not len(same):
        return None
    i, j = order[same[0]], order[same[0] + 1]
    return f"clip {ids[i].decode()} at {starts[i]:g} s is listed twice, in {split[i]} and in {split[j]}"


def load_audioset(root, train="balanced"):
    """Train and validation from the --audioset-train split(s), test from eval. Validation: VAL_SHARE of the
    training clips (at most VAL_MAX), drawn with SPLIT_SEED, never with the training seed. Training labels are
    the released positives and nothing else (Y and observed one array); validation and test labels are
    complete by AudioSet's convention (every unlisted label absent). X stays uint8 (the model divides by 255).
    Returns ({split: arrays}, classes [(mid, name)], facts about the data for the run's record)."""
    if not (root / "audioset_v1_embeddings").is_dir():
        fail(f"no AudioSet folder at {root}\n" + LAYOUT.format(root=root))
    classes_path, classes = read_classes(root)
    n_classes = len(classes)
    sources = (*SOURCES[train], "eval")
    caches = {s: cached_split(root, s, classes_path, n_classes) for s in sources}
    sizes = {s: int(footer["n"]) for s, (_, footer) in caches.items()}
    n_train = sum(sizes[s] for s in SOURCES[train])
    if n_train < 2:
        fail(f"{root}: {n_train} training clip(s) in {', '.join(SOURCES[train])}; at least 2 are needed")
    perm = np.random.default_rng(SPLIT_SEED).permutation(n_train)
    n_val = min(max(1, int(round(VAL_SHARE * n_train))), VAL_MAX, n_train - 1)
    rows = dict(train=np.sort(perm[n_val:]), val=np.sort(perm[:n_val]), test=np.arange(sizes["eval"]))

    # Each cache is read once and its rows of X scattered straight into their split: no second copy is made.
    X = {s: np.empty((len(r), FRAMES, WIDTH), np.uint8) for s, r in rows.items()}
    arrays, taken, offset = {}, {s: [] for s in rows}, 0  # taken[split]: (source, rows of that source)
    for source in sources:
        splits = ("test",) if source == "eval" else ("train", "val")
        targets = []
        for s in splits:
            r = rows[s] if source == "eval" else rows[s][(rows[s] >= offset) & (rows[s] < offset + sizes[source])]
            at = sum(len(t) for _, t in taken[s])  # where this source's rows start in the split
            taken[s].append((source, r - (0 if source == "eval" else offset)))
            targets.append((X[s][at : at + len(r)], taken[s][-1][1]))
        arrays[source] = read_cache(*caches[source], targets)
        if arrays[source] is None:  # damaged since its footer was read: rebuilt, and read again
            caches[source] = cached_split(root, source, classes_path, n_classes, rebuild=True)
            arrays[source] = read_cache(*caches[source], targets)
            if arrays[source] is None:
                fail(f"{caches[source][0]}: the cache fails its CRC-32 check again (a failing disk?)")
        offset += 0 if source == "eval" else sizes[source]
    duplicate = first_duplicate(arrays)
    if duplicate:
        fail(f"{root / 'audioset_v1_embeddings'}: {duplicate}; each clip belongs to one split, once")

    out, facts = {}, dict(train_splits=list(SOURCES[train]), padded_clips={}, truncated_clips={})
    for s, parts in taken.items():
        Y, at = np.zeros((len(rows[s]), n_classes), bool), 0  # filled in place: no copy of 1 GB of labels
        for src, r in parts:
            dense(arrays[src]["label_offsets"], arrays[src]["labels"], r, Y[at : at + len(r)])
            at += len(r)
        frames = np.concatenate([arrays[src]["frames"][r] for src, r in parts])
        facts["padded_clips"][s] = int((frames < FRAMES).sum())
        facts["truncated_clips"][s] = int((frames > FRAMES).sum())
        keys = None
        if s != "train":  # clip names where a run keeps them (the test predictions)
            keys = [
                f"{v.decode()}_{t:g}"
                for src, r in parts
                for v, t in zip(arrays[src]["video_ids"][r], arrays[src]["starts"][r])
            ]
        observed = Y if s == "train" else np.ones_like(Y)  # positive-only, or complete by convention
        out[s] = dict(X=X[s], Y=Y, observed=observed, keys=keys)
    facts["validation"] = (
        f"{len(rows['val'])} of the training clips ({VAL_SHARE:.0%}, at most {VAL_MAX}), seed {SPLIT_SEED}"
    )
    padded = sum(facts["padded_clips"].values())
    if padded:
        print(f"audioset: {padded} clip(s) shorter than {FRAMES} s repeat their frames to fill {FRAMES}", flush=True)
    return out, classes, facts


def load(data_dir, options=None, write_atomic=None):
    """What common.load_dataset calls for --dataset audioset: data_dir/audioset/ (or data_dir itself, where it
    holds audioset_v1_embeddings/), options.audioset_train naming the training split(s). Returns ({split:
    arrays}, class names, info) as every reader does; info adds AudioSet's metrics, its per-class file and the
    facts of the data (padded clips, the validation split) for metrics.json."""
    root = data_dir if (data_dir / "audioset_v1_embeddings").is_dir() else data_dir / "audioset"
    splits, classes, facts = load_audioset(root, getattr(options, "audioset_train", "balanced"))
    names = unique_names(classes)
    info = dict(
        input_scale=1 / 255,
        source=root / "audioset_v1_embeddings",
        positive_only=True,
        facts=facts,
        metrics=lambda scores, truth, extra: audioset_metrics(scores, truth, names),
        files={
            "per_class_ap.csv": (
                lambda path, scores, split, test: write_per_class(path, test, classes, names),
                "AudioSet's AP and AUC per class",
            )
        },
    )
    return splits, names, info


def unique_names(classes):
    """The display names as class names, a name that two classes share followed by its mid."""
    counts = {}
    for _, name in classes:
        counts[name] = counts.get(name, 0) + 1
    return [name if counts[name] == 1 else f"{name} ({mid})" for mid, name in classes]


#####  AudioSet's metrics  ########################################################################


def audioset_metrics(scores, truth, names):
    """As the AudioSet papers report them on eval, every unlisted label absent: mAP, the mean over classes of
    average precision; the mean ROC AUC; d' = sqrt(2) * Phi^-1(mean AUC). A class without a positive (or a
    negative) in `truth` has no AP or AUC and is left out of the means. Per class in per_class_ap/auc."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    truth = np.asarray(truth, bool)
    ap, auc = [], []
    for c in range(truth.shape[1]):
        y = truth[:, c]
        both = bool(y.any()) and not bool(y.all())
        ap.append(float(average_precision_score(y, scores[:, c])) if both else float("nan"))
        auc.append(float(roc_auc_score(y, scores[:, c])) if both else float("nan"))
    kept = [a for a in auc if math.isfinite(a)]
    mean_auc = float(np.mean(kept)) if kept else float("nan")
    return dict(
        map=float(np.nanmean(ap)) if kept else float("nan"),
        mean_auc=mean_auc,
        d_prime=math.sqrt(2) * statistics.NormalDist().inv_cdf(mean_auc) if 0 < mean_auc < 1 else float("nan"),
        per_class_ap=dict(zip(names, ap)),
        per_class_auc=dict(zip(names, auc)),
    )


def write_per_class(path, test, classes, names):
    """Each class's eval AP and AUC (empty where a class has none), with its index, mid and name, as CSV."""

    def cell(value):
        return "" if value is None or not math.isfinite(value) else f"{value:.6f}"

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "mid", "display_name", "ap", "auc"])
        for i, ((mid, display), name) in enumerate(zip(classes, names)):
            w.writerow([i, mid, display, cell(test["per_class_ap"][name]), cell(test["per_class_auc"][name])])


#####  Reading clips for predict.py  ###############################################################


def read_clips(path, n_classes=1 << 31):
    """X (N, 10, 128) uint8 and keys ('<video_id>_<start>') of one .tfrecord file, for tagging new clips."""
    X, keys = [], []
    for i, data in enumerate(read_records(path)):
        try:
            video_id, start, _, _, frames = parse_clip(data, n_classes)
        except Damaged as e:
            fail(f"{path}: record {i}: {e}")
        X.append(np.resize(np.frombuffer(b"".join(frames), np.uint8).reshape(-1, WIDTH), (FRAMES, WIDTH)))
        keys.append(f"{video_id}_{start:g}")
    return np.stack(X), keys
