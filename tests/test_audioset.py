"""AudioSet's released embeddings (audioset.py): TFRecord files written by the project's own writer
(benchmarks/fixtures.py) in the exact layout, read back; short clips; every corruption of the issue as one line
naming the file and the record; the cache; AudioSet's metrics; the methods, predict.py and the sweep on it."""

import csv
import json
import math

import numpy as np
import pytest
import torch

import audioset
from benchmarks.fixtures import (
    AUDIOSET_CLASSES,
    crc32c_bitwise,
    pb_feature,
    pb_field,
    pb_map,
    sequence_example,
    tfrecord,
    write_audioset,
    write_tfrecord,
)
from tests.conftest import METHODS, call, in_parallel, load, ok, refused, run, run_dirs


@pytest.fixture
def aset(tmp_path):
    """(data_dir, {split: clips}): a tiny audioset/ folder under tmp_path."""
    root, clips = write_audioset(tmp_path)
    return tmp_path, clips


def bad(tmp_path, *args):
    """b0.py on bad AudioSet data: one line naming the problem (or the layout), exit 2, no traceback, no run."""
    p = call("b0.py", "--dataset", "audioset", "--epochs", 1, "--out", tmp_path / "out", *args)
    err = refused(p)
    assert len(err.strip().splitlines()) == 1 or "expected layout" in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    return err


def first_file(data_dir, split="bal_train"):
    return sorted((data_dir / "audioset" / "audioset_v1_embeddings" / split).glob("*.tfrecord"))[0]


#####  CRC-32C and the wire format  ##########################################################################


def test_crc32c_matches_the_standard_check_value_and_the_bitwise_writer():
    assert audioset.crc32c(b"123456789") == crc32c_bitwise(b"123456789") == 0xE3069283
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, (5, 31), dtype=np.uint8)
    lengths = np.array([0, 1, 2, 30, 31])
    expected = [crc32c_bitwise(bytes(r[:n])) for r, n in zip(rows, lengths)]
    assert audioset.crc32c_rows(rows, lengths).tolist() == expected  # odd and even lengths, many rows at once


def test_a_record_parses_to_what_was_written():
    frames = [bytes(range(128)), bytes(128)]
    clip = audioset.parse_clip(sequence_example("abcdefghijk", 30.0, 40.0, [5, 0], frames), 6)
    assert clip == ("abcdefghijk", 30.0, 40.0, [5, 0], frames)


#####  The layout, read back  ##############################################################################


def test_audioset_loads_train_val_and_test_as_released(aset):
    data_dir, clips = aset
    d = load("audioset", data_dir)
    assert d.class_names == [name for _, name in AUDIOSET_CLASSES]  # a quoted name with a comma kept whole
    assert len(d.train.X) + len(d.val.X) == len(clips["bal_train"]) and len(d.test.X) == len(clips["eval"])
    assert d.train.X.dtype == torch.uint8 and tuple(d.train.X.shape[1:]) == (10, 128)
    # eval as written, in file order: X, and its labels complete by convention (unlisted = absent)
    for i, (video_id, start, labels, X) in enumerate(clips["eval"]):
        assert d.test.keys[i] == f"{video_id}_{start:g}"
        assert torch.equal(d.test.X[i], torch.from_numpy(np.resize(X, (10, 128))))
        assert set(np.flatnonzero(d.test.Y[i].numpy())) == set(labels)
    assert d.test.observed.all() and d.val.observed.all()


def test_training_labels_are_the_released_positives_and_nothing_else(aset):
    data_dir, clips = aset
    d = load("audioset", data_dir)
    assert d.train.Y is d.train.observed  # positive-only: one tensor serves both
    assert d.train.Y.sum().item() + d.val.Y.sum().item() == sum(len(c[2]) for c in clips["bal_train"])


def test_a_short_clip_repeats_its_frames_and_is_counted(aset, tmp_path):
    data_dir, clips = aset
    ok(call("b0.py", "--dataset", "audioset", "--data-dir", data_dir, "--epochs", 1, "--out", tmp_path / "o"))
    m = json.loads(next((tmp_path / "o").glob("*/metrics.json")).read_text())
    assert sum(m["data"]["padded_clips"].values()) == 1  # clip 3 of bal_train has 7 frames
    short = clips["bal_train"][3][3]
    assert np.array_equal(np.resize(short, (10, 128))[7:], short[:3])  # frames 1-3 again


@pytest.mark.parametrize("choice, splits", [("unbalanced", ["unbal_train"]), ("both", ["bal_train", "unbal_train"])])
def test_the_training_split_is_chosen_by_option(choice, splits, aset):
    data_dir, clips = aset
    d = load("audioset", data_dir, audioset_train=choice)
    assert len(d.train.X) + len(d.val.X) == sum(len(clips[s]) for s in splits)


def test_validation_is_a_fixed_share_of_the_training_clips(aset):
    data_dir, _ = aset
    a, b = load("audioset", data_dir), load("audioset", data_dir)
    assert len(a.val.X) == round(0.1 * 24)
    assert a.val.keys == b.val.keys  # drawn with its own seed: the same every run


#####  Damage: one line naming the file and the record, nothing half-loaded  #################################


def damage(data_dir, how):
    path = first_file(data_dir)
    data = bytearray(path.read_bytes())
    if how == "truncated":
        del data[len(data) // 2 :]
    elif how == "flipped bit":
        data[len(data) // 3] ^= 0x10
    elif how == "empty":
        data = bytearray()
    elif how == "length bit":
        data[2] ^= 0x01  # the first record's length
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "how, words",
    [
        ("truncated", ["record", "past the end of the file", "truncated download"]),
        ("flipped bit", ["record", "fails its CRC-32C check"]),
        ("empty", ["an empty file"]),
        ("length bit", ["record 0: its length fails its CRC-32C check"]),
    ],
)
def test_a_damaged_file_is_one_line_naming_the_file_and_the_record(how, words, aset, tmp_path):
    data_dir, _ = aset
    path = damage(data_dir, how)
    err = bad(tmp_path, "--data-dir", data_dir)
    for w in [str(path), *words]:
        assert w in err, (w, err)


def rewrite_first_record(data_dir, **change):
    """The first file's first record rewritten with `change` (labels, frames), CRCs made valid."""
    path = first_file(data_dir)
    clip = dict(video_id="zzzzzzzzzzz", start=0.0, end=10.0, labels=[0], frames=[bytes(128)] * 10)
    clip.update(change)
    records = audioset.read_records(path)
    records[0] = sequence_example(clip["video_id"], clip["start"], clip["end"], clip["labels"], clip["frames"])
    write_tfrecord(path, records)
    return path


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(labels=[0, 6]), ["label index 6 is outside class_labels_indices.csv's 6 classes"]),
        (dict(labels=[-1]), ["label index -1 is outside"]),
        (dict(frames=[bytes(128)] * 4 + [bytes(127)]), ["embedding 4 holds [127] bytes, not one value of 128"]),
        (dict(frames=[]), ["audio_embedding holds no frame"]),
    ],
)
def test_a_record_that_breaks_the_layout_is_one_line_naming_it(change, words, aset, tmp_path):
    data_dir, _ = aset
    path = rewrite_first_record(data_dir, **change)
    err = bad(tmp_path, "--data-dir", data_dir)
    for w in [f"{path}: record 0:", *words]:
        assert w in err, (w, err)


def test_a_record_that_is_no_sequence_example_is_refused(aset, tmp_path):
    data_dir, _ = aset
    path = first_file(data_dir)
    junk = [pb_field(1, pb_map({"video_id": pb_feature("int64", [7])})) + pb_field(2, b"")]
    write_tfrecord(path, junk + audioset.read_records(path)[1:])
    assert f"{path}: record 0:" in bad(tmp_path, "--data-dir", data_dir)
    path.write_bytes(tfrecord(b"\x0f\x01\x02") + path.read_bytes())  # a field of wire type 7
    assert "wire type 7" in bad(tmp_path, "--data-dir", data_dir)


def test_a_clip_in_two_splits_is_refused(aset, tmp_path):
    data_dir, clips = aset
    video_id, start, labels, X = clips["eval"][0]
    rewrite_first_record(data_dir, video_id=video_id, start=start, labels=labels)
    assert "is listed twice, in bal_train and in eval" in bad(tmp_path, "--data-dir", data_dir)


@pytest.mark.parametrize(
    "table, words",
    [
        ("index,mid,name\n0,/m/a,A\n", ["expected the header index,mid,display_name"]),
        ("index,mid,display_name\n1,/m/a,A\n", ["row 2 should be 0,<mid>,<name>"]),
        ("index,mid,display_name\n0,/m/a,A\n1,/m/a,B\n", ["a mid is listed twice"]),
        (b"index,mid,display_name\n0,/m/a,\xff\n", ["cannot read", "UnicodeDecodeError"]),
    ],
)
def test_a_bad_class_table_is_one_line(table, words, aset, tmp_path):
    data_dir, _ = aset
    path = data_dir / "audioset" / "class_labels_indices.csv"
    path.write_bytes(table if isinstance(table, bytes) else table.encode())
    err = bad(tmp_path, "--data-dir", data_dir)
    for w in words:
        assert w in err


def test_a_missing_folder_names_the_layout_and_the_download_page(tmp_path):
    err = bad(tmp_path, "--data-dir", tmp_path)
    assert "no AudioSet folder" in err and "audioset_v1_embeddings/bal_train/*.tfrecord" in err
    assert "research.google.com/audioset/download.html" in err


def test_positive_only_is_refused_on_audioset_whose_labels_are_so_already(aset, tmp_path):
    data_dir, _ = aset
    assert "positive-only already" in bad(tmp_path, "--data-dir", data_dir, "--positive-only")


#####  The cache  ##########################################################################################


def test_a_second_run_reads_the_cache_and_no_tfrecord(aset, monkeypatch):
    data_dir, _ = aset
    first = load("audioset", data_dir)
    assert sorted(p.name for p in (data_dir / "audioset").glob("cache-*.bin")) == [
        "cache-bal_train.bin",
        "cache-eval.bin",
    ]
    monkeypatch.setattr(audioset, "frame_records", lambda path: pytest.fail(f"read {path}"))
    second = load("audioset", data_dir)
    for s in ("train", "val", "test"):
        assert torch.equal(getattr(first, s).X, getattr(second, s).X)
        assert torch.equal(getattr(first, s).Y, getattr(second, s).Y)


@pytest.mark.parametrize("where", ["X", "footer", "labels", "truncated"])
def test_a_damaged_cache_is_rebuilt(where, aset):
    data_dir, _ = aset
    first = load("audioset", data_dir)
    path = data_dir / "audioset" / "cache-bal_train.bin"
    data = bytearray(path.read_bytes())
    if where == "X":
        data[100] ^= 0xFF
    elif where == "footer":
        data[-20] ^= 0xFF
    elif where == "labels":
        data[24 * 1280 + 3] ^= 0xFF  # just past X: the label offsets
    else:
        del data[len(data) // 2 :]
    path.write_bytes(bytes(data))
    again = load("audioset", data_dir)
    assert torch.equal(first.train.X, again.train.X) and torch.equal(first.train.Y, again.train.Y)


def test_a_changed_file_rebuilds_the_cache(aset):
    data_dir, _ = aset
    load("audioset", data_dir)
    rewrite_first_record(data_dir, labels=[5])
    d = load("audioset", data_dir)
    assert "zzzzzzzzzzz_0" in d.val.keys or d.train.Y[:, 5].sum() + d.val.Y[:, 5].sum() > 0


def test_a_read_only_folder_costs_only_the_cache(aset, monkeypatch, capsys):
    data_dir, _ = aset
    real = audioset.build_cache

    def refuse_the_data_folder(files, n_classes, key, path):
        if path.parent == data_dir / "audioset":
            raise PermissionError(13, "Permission denied")
        return real(files, n_classes, key, path)

    monkeypatch.setattr(audioset, "build_cache", refuse_the_data_folder)
    d = load("audioset", data_dir)
    assert len(d.test.X) == 12
    assert "cannot write the cache" in capsys.readouterr().err


#####  AudioSet's metrics  #################################################################################


def test_map_auc_and_d_prime_by_hand():
    truth = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 1, 1]], bool)  # class c has no negative: left out
    scores = np.array([[0.9, 0.2, 0.5], [0.6, 0.4, 0.6], [0.3, 0.8, 0.7], [0.1, 0.3, 0.1]])
    m = audioset.audioset_metrics(scores, truth, ["a", "b", "c"])
    # a: positives 0.9, 0.3 over negatives 0.6, 0.1 win 3 of 4 pairs; b likewise (0.8, 0.3 over 0.2, 0.4)
    assert m["per_class_auc"]["a"] == m["per_class_auc"]["b"] == m["mean_auc"] == 0.75
    assert m["per_class_ap"]["a"] == pytest.approx((1 + 2 / 3) / 2)  # positives ranked 1st and 3rd
    assert m["per_class_ap"]["b"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["map"] == pytest.approx(5 / 6)
    assert m["d_prime"] == pytest.approx(math.sqrt(2) * 0.6744897501960817)  # Phi^-1(0.75)
    assert math.isnan(m["per_class_ap"]["c"]) and math.isnan(m["per_class_auc"]["c"])


@pytest.mark.parametrize("auc, d_prime", [(0.959, 2.452), (0.964, 2.536), (0.968, 2.612), (0.968, 2.621)])
def test_d_prime_agrees_with_the_published_pairs(auc, d_prime):
    """The AudioSet papers' (AUC, d') pairs (DATA.md): sqrt(2) Phi^-1 of an AUC within its printed rounding."""
    from statistics import NormalDist

    low, high = (math.sqrt(2) * NormalDist().inv_cdf(auc + delta) for delta in (-0.0005, 0.0005))
    assert low <= d_prime <= high


#####  The methods, predict.py and the sweep on it  ##########################################################

REFUSING = ("b1", "mean_teacher", "selective")  # they need observed negatives


@pytest.fixture(scope="module")
def runs_on_audioset(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    write_audioset(data_dir)
    out = tmp_path_factory.mktemp("runs")
    load("audioset", data_dir)  # the caches, once, before the runs

    def train(method):
        args = ("--dataset", "audioset", "--data-dir", data_dir, "--epochs", 2, "--out", out / method)
        return run(f"{method}.py", *args)

    return data_dir, out, dict(zip(METHODS, in_parallel(train, METHODS)))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_audioset_or_refuses_saying_why(method, runs_on_audioset):
    _, out, processes = runs_on_audioset
    p = processes[method]
    if method in REFUSING:
        refused(p, f"{method}.py needs observed negatives", "positive-only")
        return
    ok(p)
    folder = out / method / f"audioset__{method}__seed0__epochs2"
    test = json.loads((folder / "metrics.json").read_text())["test"]
    assert 0 <= test["map"] <= 1 and 0 <= test["mean_auc"] <= 1 and np.isfinite(test["d_prime"])
    assert test["map"] == pytest.approx(test["ap_macro_masked"])  # eval complete by convention: the same number
    with open(folder / "per_class_ap.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["display_name"] for r in rows] == [name for _, name in AUDIOSET_CLASSES]
    assert "map " in p.stdout and "per_class_ap.csv" in p.stdout


def test_predict_tags_audioset_tfrecord_files(runs_on_audioset, tmp_path):
    data_dir, out, _ = runs_on_audioset
    folder = out / "b0" / "audioset__b0__seed0__epochs2"
    path = first_file(data_dir, "eval")
    ok(call("predict.py", folder, path, "--out", tmp_path / "tags.csv"))
    with open(tmp_path / "tags.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["clip"] + [name for _, name in AUDIOSET_CLASSES]
    assert len(rows) == 1 + len(audioset.read_records(path))
    damaged = tmp_path / "cut.tfrecord"
    damaged.write_bytes(path.read_bytes()[:-7])
    refused(call("predict.py", folder, damaged, "--out", tmp_path / "x.csv"), str(damaged), "record")


def test_a_sweep_on_audioset_tables_its_map(runs_on_audioset, tmp_path):
    data_dir, _, _ = runs_on_audioset
    grid = ["--dataset", "audioset", "--data-dir", data_dir, "--methods", "b0", "em", "--seeds", 0, 1]
    p = ok(call("simulate_missing.py", *grid, "--epochs", 1, "--jobs", 2, "--out", tmp_path / "o"))
    assert "| map |" in p.stdout and "| mean_auc |" in p.stdout and "| d_prime |" in p.stdout
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert {r["method"] for r in summary["rows"]} == {"b0", "em"} and all("map" in r for r in summary["rows"])
    assert len(run_dirs(tmp_path / "o")) == 4


@pytest.mark.optional
def test_the_figures_of_an_audioset_sweep_plot_its_map(aset, tmp_path):
    from tests.conftest import optional_package

    optional_package("matplotlib")
    import figures

    data_dir, _ = aset
    grid = ["--dataset", "audioset", "--data-dir", data_dir, "--methods", "b0", "--seeds", 0, "--epochs", 1]
    ok(call("simulate_missing.py", *grid, "--plot", "--out", tmp_path / "o"))
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert figures.paper_metrics(summary) == dict(fig4="map", fig5="map")
    assert (tmp_path / "o" / "fig4.png").read_bytes()[:4] == b"\x89PNG"
