"""The data readers against fixtures in the official layouts and the .h5 layout (docs/data.md): what they
read, what they keep, and every bad input answered in one line, exit 2."""

import csv
import json
import os
import zipfile

import h5py
import numpy as np
import pytest
import torch

import common
import h5guard
from tests.conftest import (
    OPENMIC_CLASSES,
    SONYC_COARSE,
    SONYC_FINE,
    SONYC_ROWS,
    HugeArray,
    Payload,
    call,
    load,
    ok,
    read_openmic_npz,
    refused,
    run,
    write_h5,
    write_openmic,
    write_scaled_h5,
    write_sonyc,
)


def bad(tmp_path, *args):
    """b1.py on bad data: one line naming the problem, exit 2, no traceback, and no run folder."""
    p = call("b1.py", "--epochs", 1, "--out", tmp_path / "out", *args)
    err = refused(p)
    assert len(err.strip().splitlines()) == 1 or "expected layout" in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    return err


#####  OpenMIC-2018  #######################################################################################


@pytest.mark.parametrize("names", [("split01_train.csv", "split01_test.csv"), ("train01.txt", "test01.txt")])
def test_openmic_reads_the_official_layout(tmp_path, names):
    _, raw = write_openmic(tmp_path, partition_names=names)
    d = load("openmic", tmp_path)
    assert d.class_names == OPENMIC_CLASSES
    assert (len(d.train.X), len(d.val.X), len(d.test.X)) == (60 - 9, 9, 20)  # validation: 15% of train
    assert d.test.keys == list(raw["test_keys"])
    assert set(d.train.keys) | set(d.val.keys) == set(raw["train_keys"])
    assert not set(d.train.keys) & set(d.val.keys)
    row = {k: i for i, k in enumerate(raw["keys"])}
    for split in (d.train, d.val, d.test):
        r = [row[k] for k in split.keys]
        assert split.X.dtype == torch.uint8 and torch.equal(split.X, torch.tensor(raw["X"][r]))  # kept as bytes
        assert torch.equal(split.observed, torch.tensor(raw["mask"][r]))
        assert torch.equal(split.Y.bool(), torch.tensor((raw["Y_true"][r] >= 0.5) & raw["mask"][r]))
    assert d.input_scale == pytest.approx(1 / 255)
    assert load("openmic", tmp_path).val.keys == d.val.keys  # the validation split does not move


def test_missing_openmic_folder_names_the_layout_and_the_download(tmp_path):
    err = refused(
        call("b1.py", "--dataset", "openmic", "--data-dir", tmp_path, "--out", tmp_path / "o"),
        "openmic-2018",
        "1432913",
        "class-map.json",
    )
    assert "expected layout" in err


@pytest.fixture
def npz(openmic):
    return openmic[0] / "openmic-2018.npz", openmic[1]


def test_truncated_openmic_download(tmp_path, npz):
    path, _ = npz
    path.write_bytes(path.read_bytes()[:1000])
    assert "not a zip" in bad(tmp_path, "--dataset", "openmic", "--data-dir", tmp_path)


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(Y_mask=None), ["Y_mask", "openmic-2018.npz"]),
        (dict(X="2d"), ["X should be", "(80, 128)"]),
        (dict(Y_true="short"), ["Y_true", "(79, 20)"]),
        (dict(X="nan"), ["NaN or inf", "2 of 80 rows"]),
    ],
)
def test_openmic_npz_with_wrong_members(change, words, tmp_path, npz):
    path, raw = npz
    arrays = dict(X=raw["X"], Y_true=raw["Y_true"], Y_mask=raw["mask"], sample_key=raw["keys"])
    if change.get("X") == "2d":
        arrays["X"] = raw["X"][:, 0]
    if change.get("X") == "nan":
        arrays["X"] = raw["X"].astype(np.float32)
        arrays["X"][3, 0, 0], arrays["X"][7, 1, 1] = np.nan, np.inf
    if change.get("Y_true") == "short":
        arrays["Y_true"] = raw["Y_true"][:-1]
    if "Y_mask" in change:
        del arrays["Y_mask"]
    np.savez(path, **arrays)
    err = bad(tmp_path, "--dataset", "openmic", "--data-dir", tmp_path)
    for w in words:
        assert w in err


def test_openmic_class_map_and_partitions_must_match_the_npz(tmp_path, openmic):
    root = openmic[0]
    (root / "class-map.json").write_text(json.dumps({c: i for i, c in enumerate(OPENMIC_CLASSES[:19])}))
    assert "class-map.json" in bad(tmp_path, "--dataset", "openmic", "--data-dir", tmp_path)
    (root / "class-map.json").write_text(json.dumps({c: i for i, c in enumerate(OPENMIC_CLASSES)}))
    with open(root / "partitions" / "split01_test.csv", "a") as fh:
        fh.write("999999_0\n999998_0\n")
    err = bad(tmp_path, "--dataset", "openmic", "--data-dir", tmp_path)
    assert "split01_test.csv" in err and "2 key(s) not in" in err and "999999_0" in err


def test_crafted_openmic_pickle_is_refused_and_runs_nothing(tmp_path, npz):
    path, raw = npz
    marker = tmp_path / "pwned"
    keys = raw["keys"].copy()
    keys[0] = Payload(marker)
    np.savez(path, X=raw["X"], Y_true=raw["Y_true"], Y_mask=raw["mask"], sample_key=keys)
    err = bad(tmp_path, "--dataset", "openmic", "--data-dir", tmp_path)
    assert "refused" in err and "system" in err
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"<html>Not Found</html>", b"\x80\x04\x95" + bytes(range(200)), b""])
def test_failed_openmic_downloads(content, tmp_path, npz):
    npz[0].write_bytes(content)
    assert "not a zip" in bad(tmp_path, "--dataset", "openmic", "--data-dir", tmp_path)


def test_openmic_object_arrays_are_refused(tmp_path, npz):
    path, raw = npz
    np.savez(
        path, X=raw["X"], Y_true=raw["Y_true"], Y_mask=raw["mask"], sample_key=np.array([{"a": 1}] * 80, dtype=object)
    )
    assert "sample_key" in bad(tmp_path, "--dataset", "openmic", "--data-dir", tmp_path)
    np.savez(path, X=raw["X"].astype(object), Y_true=raw["Y_true"], Y_mask=raw["mask"], sample_key=raw["keys"])
    assert "openmic-2018.npz" in bad(tmp_path, "--dataset", "openmic", "--data-dir", tmp_path)


#####  SONYC-UST v2  #######################################################################################


def test_sonyc_targets_and_mask_by_hand(tmp_path, sonyc):
    d = load("sonyc", tmp_path)
    fine = [t for t in SONYC_FINE if "-X" not in t]
    assert d.class_names == fine and len(fine) == 23
    col = {t.split("_")[0]: i for i, t in enumerate(fine)}
    assert d.train.keys == ["00_000001.wav", "00_000002.wav"]
    assert d.val.keys == ["01_000003.wav", "01_000005.wav"]  # 01_000004 has no verified row
    assert d.test.keys == ["02_000006.wav", "02_000007.wav"]
    Y, obs = d.train.Y.numpy(), d.train.observed.numpy()
    # clip 1: crowd annotators 10 and 11; any "present" wins; the team row (8-1) is ignored
    assert set(np.flatnonzero(Y[0])) == {col["1-1"], col["5-3"]} and obs[0].all()
    # clip 2: 1-X present -> the engine fine tags are missing; 2-1 is -1 -> missing
    assert set(np.flatnonzero(~obs[1])) == {col["1-1"], col["1-2"], col["1-3"], col["2-1"]}
    assert set(np.flatnonzero(Y[1])) == {col["6-1"]}
    # validate clip 3: the verified row alone (its crowd row's 8-1 is ignored); 4-X masks the saw tags
    assert set(np.flatnonzero(d.val.Y.numpy()[0])) == {col["7-1"]}
    assert set(np.flatnonzero(~d.val.observed.numpy()[0])) == {col["4-1"], col["4-2"], col["4-3"]}
    assert d.test.extra["x_truth"][1].tolist() == [0, 0, 0, 0, 1, 0, 0, 0]
    assert d.test.extra["coarse_truth"][1].tolist() == [1, 0, 0, 0, 1, 0, 0, 0]


def test_sonyc_inputs_are_z_scored_with_training_statistics_inside_the_model(tmp_path, sonyc):
    d = load("sonyc", tmp_path)
    z = (d.train.X - torch.as_tensor(d.input_offset)) * torch.as_tensor(d.input_scale)
    assert torch.allclose(z.mean((0, 1)), torch.zeros(512), atol=1e-4)
    assert torch.allclose(z.std((0, 1), correction=0), torch.ones(512), atol=1e-3)


def test_sonyc_coarse_level(tmp_path, sonyc):
    c = load("sonyc", tmp_path, level="coarse")
    assert c.class_names == SONYC_COARSE
    assert c.train.Y.numpy()[1].tolist() == [1, 0, 0, 0, 0, 1, 0, 0]
    assert c.train.observed.numpy()[1].tolist() == [True, False, True, True, True, True, True, True]  # 2_ is -1


def test_sonyc_cache_notices_changed_annotations_and_embeddings(tmp_path, sonyc):
    first = load("sonyc", tmp_path)
    assert (sonyc / "embeddings_cache.npz").is_file()
    emb = sonyc / "embeddings" / "02_000007.npz"
    np.savez(emb, embedding=np.full((11, 512), 7.0, np.float32))
    os.utime(emb, ns=(emb.stat().st_atime_ns, emb.stat().st_mtime_ns + 10**9))
    second = load("sonyc", tmp_path)
    assert (second.test.X[1] == 7.0).all() and not (first.test.X[1] == 7.0).all()
    rows = SONYC_ROWS + [("test", "02_000008.wav", 0, {"8-1": 1})]
    write_sonyc(tmp_path / "again", rows=rows)
    np.savez(sonyc / "embeddings" / "02_000008.npz", embedding=np.ones((11, 512), np.float32))
    (tmp_path / "again" / "sonyc-ust" / "annotations.csv").replace(sonyc / "annotations.csv")
    assert len(load("sonyc", tmp_path).test.X) == 3


@pytest.mark.parametrize("level", ["fine", "coarse"])
def test_sonyc_runs_write_a_submission_that_the_standalone_scorer_reads_back(level, tmp_path, sonyc):
    ok(
        call(
            "b1.py",
            "--dataset",
            "sonyc",
            "--data-dir",
            tmp_path,
            "--level",
            level,
            "--epochs",
            1,
            "--out",
            tmp_path / "o",
        )
    )
    folder = tmp_path / "o" / f"{'sonyc' if level == 'fine' else 'sonyc_coarse'}__b1__seed0__epochs1"
    test = json.loads((folder / "metrics.json").read_text())["test"]
    for key in ["auprc_macro_masked", "ap_macro_masked", "dcase_coarse_micro_auprc", "dcase_micro_f1"] + (
        ["dcase_fine_micro_auprc", "dcase_fine_macro_auprc"] if level == "fine" else []
    ):
        assert key in test, key
    with open(folder / "test_predictions.csv") as fh:
        table = list(csv.reader(fh))
    assert table[0] == ["audio_filename"] + SONYC_FINE + SONYC_COARSE
    assert [r[0] for r in table[1:]] == ["02_000006.wav", "02_000007.wav"]
    assert table[1][1 + SONYC_FINE.index("1-X_engine-of-uncertain-size")] == "0"
    p = run("sonyc.py", folder / "test_predictions.csv", sonyc / "annotations.csv", "--split", "test")
    scored = json.loads(ok(p).stdout)
    keys = [k for k in scored if k in test and (level == "fine" or "coarse" in k)]
    assert len(keys) >= (6 if level == "fine" else 3)
    assert all(scored[k] == pytest.approx(test[k], abs=1e-12) for k in keys)


@pytest.mark.parametrize(
    "kind, words",
    [
        ("no folder", ["annotations.csv", "3966543", "openl3"]),
        ("no annotator_id", ["annotations.csv", "annotator_id"]),
        ("presence 2", ["annotations.csv, line 12", "'2'"]),
        ("embedding missing", ["1 embedding file(s)", "02_000007.npz"]),
        ("embedding shape", ["02_000006.npz", "(10, 512)"]),
    ],
)
def test_bad_sonyc_inputs(kind, words, tmp_path):
    if kind != "no folder":
        write_sonyc(
            tmp_path,
            **{
                "no annotator_id": dict(drop_column="annotator_id"),
                "presence 2": dict(bad_value=2),
                "embedding missing": dict(skip_embedding="02_000007.wav"),
                "embedding shape": dict(bad_shape=(10, 512)),
            }[kind],
        )
    err = refused(call("b1.py", "--dataset", "sonyc", "--data-dir", tmp_path, "--out", tmp_path / "o"), *words)
    assert not (tmp_path / "o").exists()
    assert err


#####  Your own .h5  #######################################################################################


@pytest.mark.parametrize("kind", ["bytes", "unicode"])
def test_h5_accepts_bytes_and_unicode_strings(kind, tmp_path):
    d = load(write_h5(tmp_path / f"{kind}.h5", str_kind=kind))
    assert (len(d.train.X), len(d.val.X), len(d.test.X)) == (30, 15, 15)
    assert d.class_names == [f"tag{c}" for c in range(5)]
    assert d.train.keys[0] == "clip0"


def test_h5_with_the_complete_truth(tmp_path):
    d = load(write_h5(tmp_path / "full.h5", full_truth=True))
    assert d.train.Y_full is not None
    assert torch.equal(d.train.Y_full.bool() & d.train.observed, d.train.Y.bool())


@pytest.mark.parametrize(
    "dtype, kept",
    [(np.uint8, torch.uint8), (np.float16, torch.float16), (np.float64, torch.float32), (np.int16, torch.float32)],
)
def test_h5_keeps_a_compact_width_and_reads_in_blocks(dtype, kept, tmp_path, monkeypatch):
    path = write_scaled_h5(tmp_path / "x.h5", dtype, 1)
    assert load(path).train.X.dtype == kept
    whole, _, _ = common.load_h5(path)
    monkeypatch.setattr(common, "H5_BLOCK_BYTES", 3000)  # 2 clips a block: many blocks
    blocks, _, _ = common.load_h5(path)
    for s in ("train", "val", "test"):
        assert np.array_equal(whole[s]["X"], blocks[s]["X"])


def test_h5_values_the_model_cannot_take_are_refused_by_row(tmp_path):
    path = write_scaled_h5(tmp_path / "x.h5", np.float64, 1)
    with h5py.File(path, "a") as f:
        f["X"][50, 0, 0] = 1e300  # finite as float64, inf as float32
        f["X"][51, 0, 0] = 3e38  # finite, but beyond what batch statistics square
    err = bad(tmp_path, "--dataset", path)
    assert "x.h5" in err and "in row 50 (2 bad row(s) here, of 64" in err and "rescale X" in err


@pytest.mark.parametrize(
    "edit, words",
    [
        ("no observed", ["x.h5", "observed"]),
        ("split dev", ["unknown split name(s) ['dev']"]),
        ("flat X", ["X[:, None, :]", "(60, 16)"]),
        ("4 class names", ["Y has 5 columns but class_names names 4 classes"]),
        ("2-D split", ["split should be a 1-D array of strings, found shape (30, 2)"]),
        ("2-D keys", ["keys should be a 1-D array of strings, found shape (30, 2)"]),
        ("float16 inf", ["x.h5", "X has NaN, inf", "in row 7 (1 bad row(s) here, of 60; stored as float16)"]),
        ("nan in the first row", ["in row 0 (1 bad row(s) here, of 60"]),
    ],
)
def test_bad_h5_inputs(edit, words, tmp_path):
    path = write_h5(tmp_path / "x.h5")
    with h5py.File(path, "a") as f:
        if edit == "no observed":
            del f["observed"]
        if edit == "4 class names":
            f.attrs["class_names"] = ["a", "b", "c", "d"]
        if edit in ("2-D split", "2-D keys"):
            name = edit.split()[1]
            values = f[name][()]
            del f[name]
            f[name] = values.reshape(30, 2)
        if edit == "float16 inf":
            X = f["X"][()].astype(np.float16)
            X[7, 1, 2] = np.inf
            del f["X"]
            f["X"] = X
        if edit == "nan in the first row":
            f["X"][0, 0, 0] = np.nan
        if edit == "split dev":
            s = f["split"][()]
            s[0] = b"dev"
            del f["split"]
            f["split"] = s
        if edit == "flat X":
            del f["X"]
            f["X"] = np.zeros((60, 16), np.float32)
    err = bad(tmp_path, "--dataset", path)
    for w in words:
        assert w in err


def test_absent_and_random_h5_files(tmp_path):
    assert "absent.h5" in bad(tmp_path, "--dataset", tmp_path / "absent.h5")
    (tmp_path / "raw.h5").write_bytes(os.urandom(500))
    assert "cannot read" in bad(tmp_path, "--dataset", tmp_path / "raw.h5")


def test_a_class_without_training_label_warns_and_is_left_out(tmp_path):
    path = write_h5(tmp_path / "gap.h5", no_train_label_for=2)
    p = ok(call("b1.py", "--dataset", path, "--epochs", 1, "--out", tmp_path))
    assert "tag2" in p.stderr and "NaN" in p.stderr
    test = json.loads(next(tmp_path.glob("gap__b1*/metrics.json")).read_text())["test"]
    assert test["per_class_f1_macro"]["tag2"] is None
    others = [v for k, v in test["per_class_f1_macro"].items() if k != "tag2"]
    assert test["f1_macro"] == pytest.approx(np.mean(others))


#####  Label removal and the synthetic data  ################################################################


def test_drop_labels_touches_only_observed_training_labels():
    d0, d = load("synthetic"), load("synthetic", drop_rate=0.4)
    before, after = d0.train.observed, d.train.observed
    assert not (after & ~before).any()
    assert after.sum().item() == before.sum().item() - round(0.4 * before.sum().item())
    assert torch.equal(d.val.observed, d0.val.observed) and torch.equal(d.test.observed, d0.test.observed)
    assert torch.equal(load("synthetic", drop_rate=0.4).train.observed, after)


def test_labels_stay_one_byte_each_on_the_device():
    d = load("synthetic")
    assert d.train.Y.dtype == d.train.observed.dtype == d.train.Y_full.dtype == torch.bool


def test_positive_only_hides_every_observed_negative_of_the_training_labels_and_no_other():
    d0, d = load("synthetic"), load("synthetic", positive_only=True)
    assert torch.equal(d.train.observed, d0.train.Y & d0.train.observed)  # the observed positives, all of them
    assert torch.equal(d.train.Y, d0.train.Y)
    assert not (d.train.observed & ~d.train.Y).any()
    assert d.train.Y is d.train.observed  # one tensor serves both
    assert torch.equal(d.val.observed, d0.val.observed) and torch.equal(d.test.observed, d0.test.observed)


def test_positive_only_after_a_drop_keeps_the_positives_the_drop_left():
    dropped, both = load("synthetic", drop_rate=0.4), load("synthetic", drop_rate=0.4, positive_only=True)
    assert torch.equal(both.train.observed, dropped.train.observed & dropped.train.Y)


def test_positive_only_works_on_h5_and_openmic(tmp_path, openmic):
    for d in (load(write_h5(tmp_path / "x.h5"), positive_only=True), load("openmic", tmp_path, positive_only=True)):
        assert d.train.observed.any() and not (d.train.observed & ~d.train.Y).any()
        assert (d.val.observed & ~d.val.Y).any()  # validation keeps its negatives


def test_drop_seed_changes_which_labels_not_how_many():
    a, b = load("synthetic", drop_rate=0.4), load("synthetic", drop_rate=0.4, drop_seed=7)
    assert a.train.observed.sum() == b.train.observed.sum()
    assert not torch.equal(a.train.observed, b.train.observed)


def test_synthetic_data_is_partially_labelled_and_fixed():
    d = load("synthetic")
    assert 0.08 < d.train.observed.float().mean().item() < 0.14
    positives_observed = d.train.Y[d.train.observed].float().mean().item()
    assert positives_observed > 2 * d.train.Y_full.float().mean().item()  # positives over-represented
    assert torch.equal(load("synthetic").train.X, d.train.X)


#####  Every corruption that once escaped: one line, exit 2, or it loads as it should  ######################


def rewrite_npz(path, **changes):
    arrays = read_openmic_npz(path)
    arrays.update(changes)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


def rewrite_member(path, name, edit):
    """Rewrite one member of an .npz (bytes -> bytes), or rename it when `edit` is a str."""
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    with zipfile.ZipFile(path, "w") as zf:
        for n, data in members.items():
            if n == name:
                n, data = (edit, data) if isinstance(edit, str) else (n, edit(data))
            zf.writestr(n, data)


OPENMIC_CASES = {
    "partition with a non-UTF-8 byte": (
        lambda r, raw: (r / "partitions/split01_train.csv").write_bytes(
            (r / "partitions/split01_train.csv").read_bytes() + b"\xff\n"
        ),
        ["split01_train.csv", "UTF-8"],
    ),
    "partition saved as UTF-16": (
        lambda r, raw: (r / "partitions/split01_test.csv").write_bytes(
            (r / "partitions/split01_test.csv").read_text().encode("utf-16")
        ),
        ["split01_test.csv"],
    ),
    "Y_true as strings": (
        lambda r, raw: rewrite_npz(r / "openmic-2018.npz", Y_true=raw["Y_true"].astype(str)),
        ["Y_true", "expected numbers"],
    ),
    "Y_true NaN": (
        lambda r, raw: rewrite_npz(r / "openmic-2018.npz", Y_true=np.where(raw["mask"], np.nan, 0.5)),
        ["Y_true should be confidences in [0, 1]"],
    ),
    "Y_true above 1": (lambda r, raw: rewrite_npz(r / "openmic-2018.npz", Y_true=raw["Y_true"] * 3), ["Y_true"]),
    "Y_true complex": (
        lambda r, raw: rewrite_npz(r / "openmic-2018.npz", Y_true=raw["Y_true"].astype(complex)),
        ["Y_true"],
    ),
    "Y_mask 0.5": (lambda r, raw: rewrite_npz(r / "openmic-2018.npz", Y_mask=raw["mask"] * 0.5), ["Y_mask"]),
    "Y_mask as 'True'/'False'": (
        lambda r, raw: rewrite_npz(r / "openmic-2018.npz", Y_mask=raw["mask"].astype(str)),
        ["Y_mask"],
    ),
    "class-map null": (lambda r, raw: (r / "class-map.json").write_text("null"), ["class-map.json"]),
    "class-map a list": (lambda r, raw: (r / "class-map.json").write_text("[1, 2]"), ["class-map.json"]),
    "class-map 100,000 nested [": (lambda r, raw: (r / "class-map.json").write_text("[" * 100000), ["class-map.json"]),
    "class-map null values": (
        lambda r, raw: (r / "class-map.json").write_text(json.dumps({c: None for c in OPENMIC_CLASSES})),
        ["class-map.json"],
    ),
    "class-map indices all 0": (
        lambda r, raw: (r / "class-map.json").write_text(json.dumps({c: 0 for c in OPENMIC_CLASSES})),
        ["class-map.json"],
    ),
    "class-map a name twice": (
        lambda r, raw: (r / "class-map.json").write_text(
            json.dumps({c: i for i, c in enumerate(OPENMIC_CLASSES)})[:-1] + ', "bass": 7}'
        ),
        ["named twice"],
    ),
    "member without .npy": (
        lambda r, raw: rewrite_member(r / "openmic-2018.npz", "X.npy", "X"),
        ["missing array(s) ['X']"],
    ),
    "npy header without its }": (
        lambda r, raw: rewrite_member(r / "openmic-2018.npz", "Y_true.npy", lambda d: d.replace(b"}", b" ", 1)),
        ["cannot read"],
    ),
    "compression method 99": (None, ["cannot read", "NotImplementedError"]),
    "sample_key asking for terabytes": (
        lambda r, raw: rewrite_npz(
            r / "openmic-2018.npz", sample_key=np.array([HugeArray()] + list(raw["keys"][1:]), dtype=object)
        ),
        ["refused", "sample_key"],
    ),
    "a sample key twice": (
        lambda r, raw: rewrite_npz(
            r / "openmic-2018.npz", sample_key=np.array([raw["keys"][1]] + list(raw["keys"][1:]), dtype=object)
        ),
        ["sample_key must be unique"],
    ),
    "a key in train and test": (
        lambda r, raw: (r / "partitions/split01_test.csv").write_text(
            "".join(k + "\n" for k in list(raw["test_keys"]) + [raw["train_keys"][0]])
        ),
        ["in both train and test"],
    ),
    "a key twice in a partition": (
        lambda r, raw: (r / "partitions/split01_test.csv").write_text(
            "".join(k + "\n" for k in list(raw["test_keys"]) * 2)
        ),
        ["listed twice"],
    ),
    "one train key": (
        lambda r, raw: (r / "partitions/split01_train.csv").write_text(raw["train_keys"][0]),
        ["1 train key(s)"],
    ),
    "no frames": (lambda r, raw: rewrite_npz(r / "openmic-2018.npz", X=raw["X"][:, :0]), ["X should be"]),
}


@pytest.mark.parametrize("case", OPENMIC_CASES)
def test_openmic_corruption(case, tmp_path):
    root, raw = write_openmic(tmp_path)
    edit, words = OPENMIC_CASES[case]
    if case == "compression method 99":  # a method zipfile cannot decompress
        data = bytearray((root / "openmic-2018.npz").read_bytes())
        for sig, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # local and central headers
            at = data.find(sig)
            while at >= 0:
                data[at + offset : at + offset + 2] = (99).to_bytes(2, "little")
                at = data.find(sig, at + 4)
        (root / "openmic-2018.npz").write_bytes(bytes(data))
    else:
        edit(root, raw)
    err = bad(tmp_path, "--dataset", "openmic", "--data-dir", tmp_path)
    assert len(err) < 300
    for w in words:
        assert w in err


@pytest.mark.parametrize("variant", ["BOM and CRLF", "2 train keys"])
def test_openmic_variants_that_load(variant, tmp_path):
    root, raw = write_openmic(tmp_path)
    path = root / "partitions" / "split01_train.csv"
    if variant == "BOM and CRLF":
        path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(raw["train_keys"]).encode())
        assert len(load("openmic", tmp_path).train.X) == 51
    else:
        path.write_text("\n".join(raw["train_keys"][:2]))
        d = load("openmic", tmp_path)
        assert (len(d.train.X), len(d.val.X)) == (1, 1)


def edit_csv(root, edit):
    path = root / "annotations.csv"
    with open(path, newline="") as fh:
        table = list(csv.reader(fh))
    table = edit(table) or table
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(table)


def set_cell(row, column, value):
    def edit(table):
        table[row][table[0].index(column)] = value

    return edit


def drop_column(name):
    return lambda table: [r[: table[0].index(name)] + r[table[0].index(name) + 1 :] for r in table]


SONYC_CASES = {
    "coarse column removed, fine ones kept": (
        drop_column("3_non-machinery-impact_presence"),
        ["group(s) [3] have no coarse presence column"],
    ),
    "a fine tag twice": (
        lambda t: [t[0] + ["1-1_small-sounding-engine-again_presence"]] + [r + ["0"] for r in t[1:]],
        ["more than one presence column"],
    ),
    "annotator_id inf": (set_cell(1, "annotator_id", "inf"), ["annotator_id is 'inf'"]),
    "annotator_id 1e400": (set_cell(1, "annotator_id", "1e400"), ["annotator_id"]),
    "annotator_id 0.5": (set_cell(1, "annotator_id", "0.5"), ["not an integer"]),
    "split dev": (set_cell(1, "split", "dev"), ["split is 'dev'"]),
    "split Train": (set_cell(1, "split", "Train"), ["split is 'Train'"]),
    "split empty": (set_cell(1, "split", ""), ["split is ''"]),
    "NUL in a file name": (set_cell(1, "audio_filename", "00_00\0001.wav"), ["audio_filename"]),
    "a clip in two splits": (set_cell(9, "audio_filename", "00_000001.wav"), ["in both train and test"]),
    "two file names, one embedding": (set_cell(2, "audio_filename", "00_000001.flac"), ["share one embedding"]),
}


@pytest.mark.parametrize("case", SONYC_CASES)
def test_sonyc_annotation_corruption(case, tmp_path, sonyc):
    edit, words = SONYC_CASES[case]
    edit_csv(sonyc, edit)
    err = refused(call("b1.py", "--dataset", "sonyc", "--data-dir", tmp_path, "--out", tmp_path / "o"), *words)
    assert len(err) < 300


@pytest.mark.parametrize("case", ["bare .npy", "member without .npy", "header without its }"])
def test_sonyc_embedding_corruption(case, tmp_path, sonyc):
    path = sonyc / "embeddings" / "02_000007.npz"
    if case == "bare .npy":
        np.save(tmp_path / "e.npy", np.zeros((11, 512), np.float32))
        (tmp_path / "e.npy").replace(path)
    else:
        rewrite_member(
            path, "embedding.npy", "embedding" if case == "member without .npy" else lambda d: d.replace(b"}", b" ", 1)
        )
    refused(
        call("b1.py", "--dataset", "sonyc", "--data-dir", tmp_path, "--out", tmp_path / "o"),
        "02_000007.npz",
        "unreadable",
    )


def test_sonyc_header_with_a_bom_loads(tmp_path, sonyc):
    path = sonyc / "annotations.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # the first column is a coarse one
    assert load("sonyc", tmp_path).class_names[0] == "1-1_small-sounding-engine"


@pytest.mark.parametrize("damage", ["truncated", "a flipped byte", "another key", "X misshaped"])
def test_a_damaged_sonyc_cache_is_rebuilt(damage, tmp_path, sonyc):
    first = load("sonyc", tmp_path)
    cache = sonyc / "embeddings_cache.npz"
    data = bytearray(cache.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "a flipped byte":  # in X's data: only the zip's CRC tells
        data[data.find(np.float32(first.train.X[0, 0, 1]).tobytes())] ^= 1
    else:
        with np.load(cache) as z:
            X, key = z["X"], str(z["key"])
        np.savez(
            tmp_path / "c.npz",
            X=X if damage == "another key" else X[:, :5],
            key=np.array("0" * 64 if damage == "another key" else key),
        )
        data = (tmp_path / "c.npz").read_bytes()
    cache.write_bytes(bytes(data))
    assert torch.equal(load("sonyc", tmp_path).train.X, first.train.X)
    assert cache.read_bytes() != bytes(data) or damage == "another key"


def edit_h5(path, key, value):
    with h5py.File(path, "a") as f:
        if key == "class_names":
            f.attrs["class_names"] = value
            return
        del f[key]
        if isinstance(value, str) and value == "group":
            f.create_group(key)
        elif value is not None:
            f[key] = value


H5_CASES = {
    "a key not UTF-8": ("keys", np.array([b"\xff\xfe"] + [f"clip{i}".encode() for i in range(1, 60)]), ["not UTF-8"]),
    "a split not UTF-8": (
        "split",
        np.array([b"\xff"] + [b"train"] * 29 + [b"val"] * 15 + [b"test"] * 15),
        ["not UTF-8"],
    ),
    "class_names not UTF-8": ("class_names", [b"\xff", b"b", b"c", b"d", b"e"], ["not UTF-8"]),
    "keys empty": ("keys", h5py.Empty("S5"), ["keys should be a 1-D array of strings"]),
    "split empty": ("split", h5py.Empty("S5"), ["split should be a 1-D array of strings"]),
    "class_names a number": ("class_names", 5, ["class_names should be a 1-D array of strings"]),
    "class_names one string": ("class_names", "tag", ["class_names should be a 1-D array of strings"]),
    "class_names none": ("class_names", np.array([], dtype="S1"), ["class_names is empty"]),
    "class_names twice": ("class_names", ["a", "a", "b", "c", "d"], ["class_names must be unique"]),
    "X a dangling link": ("X", h5py.SoftLink("/nowhere"), ["X"]),
    "Y an external link to a missing file": ("Y", h5py.ExternalLink("missing.h5", "/Y"), ["Y"]),
    "Y strings": ("Y", np.full((60, 5), b"1"), ["Y should be (60, 5) numbers"]),
    "Y compound": ("Y", np.zeros((60, 5), dtype=[("a", "f4"), ("b", "i4")]), ["Y should be"]),
    "Y opaque": ("Y", np.void(b"\x00" * 8), ["Y should be"]),
    "Y 2 where observed": ("Y", np.full((60, 5), 2.0), ["Y where observed should hold only 0 and 1"]),
    "observed a group": ("observed", "group", ["observed should be a dataset"]),
    "observed empty": ("observed", np.zeros((0, 5), bool), ["observed should be (60, 5)"]),
    "observed compound": ("observed", np.zeros((60, 5), dtype=[("a", "f4")]), ["observed should be"]),
    "observed 'True'/'False'": ("observed", np.full((60, 5), b"True"), ["observed should be"]),
    "observed 0.5": ("observed", np.full((60, 5), 0.5), ["observed should hold only 0 and 1"]),
    "X 0-d": ("X", np.float32(1), ["X should be"]),
    "X empty": ("X", np.zeros((0, 4, 16), np.float32), ["X has 0 rows but split has 60 entries"]),
    "X without frames": ("X", np.zeros((60, 0, 16), np.float32), ["X should be (N, T, D) with T, D >= 1"]),
    "keys one short": ("keys", np.array([f"clip{i}".encode() for i in range(59)]), ["keys has 59 entries"]),
    "keys one long": ("keys", np.array([f"clip{i}".encode() for i in range(61)]), ["keys has 61 entries"]),
    "a key twice": (
        "keys",
        np.array([b"clip1"] + [f"clip{i}".encode() for i in range(1, 60)]),
        ["keys must be unique"],
    ),
    "Y_full against Y": ("Y_full", np.zeros((60, 5), bool), ["Y_full differs from Y"]),
}


@pytest.mark.parametrize("case", H5_CASES)
def test_h5_corruption(case, tmp_path):
    key, value, words = H5_CASES[case]
    path = write_h5(tmp_path / "x.h5", full_truth=case == "Y_full against Y")
    if case == "Y_full against Y":
        with h5py.File(path, "a") as f:
            value = ~f["Y_full"][()]
    edit_h5(path, key, value)
    err = bad(tmp_path, "--dataset", path)
    assert len(err) < 300
    for w in words:
        assert w in err


def test_h5_with_its_first_4_kib_zeroed(tmp_path):
    path = write_h5(tmp_path / "x.h5")
    data = bytearray(path.read_bytes())
    data[:4096] = bytes(4096)
    path.write_bytes(bytes(data))
    assert "cannot read" in bad(tmp_path, "--dataset", path)


def test_unobserved_labels_may_hold_anything_numeric(tmp_path):
    path = write_h5(tmp_path / "x.h5")
    with h5py.File(path, "a") as f:
        Y = f["Y"][()]
        Y[~f["observed"][()]] = np.nan  # documented: ignored where not observed
        del f["Y"]
        f["Y"] = Y
    assert len(load(path).train.X) == 30


@pytest.mark.parametrize("how", ["loops", "crashes"])
def test_an_h5_on_which_the_hdf5_library_loops_or_crashes_is_refused(how, tmp_path, monkeypatch):
    """A flipped bit in a variable-length string attribute made HDF5 loop forever in C, beyond any Python
    timeout (benchmarks/fuzz.py, seed 0): every .h5 is read in a child process first, with a CPU budget. Here
    the child is made to loop or crash on purpose."""
    path = write_h5(tmp_path / "x.h5")
    monkeypatch.setattr(h5guard, "read_every_byte", loop if how == "loops" else crash)
    monkeypatch.setattr(h5guard, "CPU_SECONDS", 1)
    assert "the HDF5 library hung or crashed reading it" in h5guard.probe(path)


def test_a_slow_file_is_not_refused_by_the_guard(tmp_path, monkeypatch):
    """The budget is CPU time: a child that waits (slow storage) far longer than its budget still passes."""
    path = write_h5(tmp_path / "x.h5")
    monkeypatch.setattr(h5guard, "read_every_byte", wait)
    monkeypatch.setattr(h5guard, "CPU_SECONDS", 1)
    assert h5guard.probe(path) is None  # about 3 s of waiting, on a budget of 1 s of CPU


def loop(path, cpu_limit):  # run in the child from its source, as h5guard.read_every_byte is
    import resource

    resource.setrlimit(resource.RLIMIT_CPU, (cpu_limit, cpu_limit + 5))
    while True:
        pass


def wait(path, cpu_limit):
    import resource
    import time

    resource.setrlimit(resource.RLIMIT_CPU, (cpu_limit, cpu_limit + 5))
    time.sleep(3)


def crash(path, cpu_limit):
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)


def test_an_h5_declaring_more_than_the_memory_is_refused_before_it_is_read(tmp_path):
    """HDF5 stores a dataset that was never written as fill values: a small file may declare 480 GiB."""
    path = tmp_path / "claim.h5"
    n = 10**8
    with h5py.File(path, "w") as f:
        f.create_dataset("X", shape=(n, 10, 128), dtype="f4", chunks=(1000, 10, 128))
        f.create_dataset("Y", shape=(n, 2), dtype="f4", chunks=(10000, 2))
        f.create_dataset("observed", shape=(n, 2), dtype=bool, chunks=(10000, 2))
        f.create_dataset("split", shape=(n,), dtype="S5", chunks=(10000,))
        f.attrs["class_names"] = ["a", "b"]
    assert "more than this machine's memory" in bad(tmp_path, "--dataset", path)
