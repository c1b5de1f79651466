"""Tests: every script end to end on tiny data, the loaders against fixtures in the official
layouts (see shared/DATA.md), the metrics against scikit-learn and hand-computed cases, the
method pieces on hand-made cases, every bad input, determinism and interruption.

    python -m pytest -q test_all.py
"""
import contextlib
import csv
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import warnings
from argparse import Namespace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import common
import sonyc

HERE = Path(__file__).resolve().parent
METHODS = ["b0", "b1", "label_enhance", "mean_teacher", "le_mean_teacher"]


def run(script, *args, timeout=300):
    """Run a script as a user would; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONWARNINGS="default")
    return subprocess.run([sys.executable, str(HERE / script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=HERE)


def call(script, *args):
    """Run a script's main() in this process, as its command line would (a subprocess costs
    seconds of imports). Returns a CompletedProcess-like (returncode, stdout, stderr)."""
    module = importlib.import_module(script.removesuffix(".py"))
    out, err, argv, code = io.StringIO(), io.StringIO(), sys.argv, 0
    sys.argv = [script, *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("always")
            common.main_guard(module.main)
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(script, code, out.getvalue(), err.getvalue())


def ok(p):
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def metrics_of(out, name):
    return json.loads((Path(out) / name / "metrics.json").read_text())


#####################################################################################
#  Fixtures in the official layouts
#####################################################################################

OPENMIC_CLASSES = ["accordion", "banjo", "bass", "cello", "clarinet", "cymbals", "drums", "flute", "guitar",
                   "mallet_percussion", "mandolin", "organ", "piano", "saxophone", "synthesizer", "trombone",
                   "trumpet", "ukulele", "violin", "voice"]


def write_openmic(root, n=80, n_test=20, partition_names=("split01_train.csv", "split01_test.csv"), seed=0):
    """A tiny openmic-2018/ folder exactly as the archive unpacks."""
    rng = np.random.default_rng(seed)
    root = Path(root) / "openmic-2018"
    (root / "partitions").mkdir(parents=True)
    keys = np.array(sorted(f"{rng.integers(0, 999999):06d}_{i * 960}" for i in range(n)), dtype=object)
    X = rng.integers(0, 256, (n, 10, 128)).astype(np.uint8)
    mask = rng.random((n, 20)) < 0.5
    mask[:, :] |= np.eye(20, dtype=bool)[np.arange(n) % 20]          # every class observed somewhere
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


def write_h5(path, n=60, str_kind="bytes", seed=0, no_train_label_for=None, observed_share=0.5):
    rng = np.random.default_rng(seed)
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4))
    obs = rng.random((n, 5)) < observed_share
    obs |= np.eye(5, dtype=bool)[np.arange(n) % 5]
    if no_train_label_for is not None:
        obs[split == "train", no_train_label_for] = False
    with h5py.File(path, "w") as f:
        f["X"] = rng.standard_normal((n, 4, 16)).astype(np.float32)
        f["Y"] = (rng.random((n, 5)) < 0.4).astype(np.float32)
        f["observed"] = obs
        f["split"] = np.array([s.encode() for s in split]) if str_kind == "bytes" else split.astype(h5py.string_dtype())
        f["keys"] = np.array([f"clip{i}".encode() for i in range(n)])
        f.attrs["class_names"] = [f"tag{c}" for c in range(5)]
    return path


SONYC_COARSE = ["1_engine", "2_machinery-impact", "3_non-machinery-impact", "4_powered-saw", "5_alert-signal",
                "6_music", "7_human-voice", "8_dog"]
SONYC_FINE = ["1-1_small-sounding-engine", "1-2_medium-sounding-engine", "1-3_large-sounding-engine",
              "1-X_engine-of-uncertain-size", "2-1_rock-drill", "2-2_jackhammer", "2-3_hoe-ram", "2-4_pile-driver",
              "2-X_other-unknown-impact-machinery", "3-1_non-machinery-impact", "4-1_chainsaw",
              "4-2_small-medium-rotating-saw", "4-3_large-rotating-saw", "4-X_other-unknown-powered-saw",
              "5-1_car-horn", "5-2_car-alarm", "5-3_siren", "5-4_reverse-beeper", "5-X_other-unknown-alert-signal",
              "6-1_stationary-music", "6-2_mobile-music", "6-3_ice-cream-truck", "6-X_music-from-uncertain-source",
              "7-1_person-or-small-group-talking", "7-2_person-or-small-group-shouting", "7-3_large-crowd",
              "7-4_amplified-speech", "7-X_other-unknown-human-voice", "8-1_dog-barking-whining"]

# (split, audio_filename, annotator_id, {fine tag prefix: value}); coarse columns follow from the fine ones.
SONYC_ROWS = [
    ("train", "00_000001.wav", 10, {"1-1": 1}),
    ("train", "00_000001.wav", 11, {"1-1": 0, "5-3": 1}),
    ("train", "00_000001.wav", -5, {"8-1": 1}),                 # team row: not used for train targets
    ("train", "00_000002.wav", 12, {"1-X": 1, "2-1": -1, "6-1": 1}),
    ("validate", "01_000003.wav", 0, {"7-1": 1, "4-X": 1}),
    ("validate", "01_000003.wav", 13, {"8-1": 1}),              # crowd row: not used for validate targets
    ("validate", "01_000004.wav", 14, {"3-1": 1}),              # no verified row: left out
    ("validate", "01_000005.wav", 0, {"8-1": 1}),
    ("test", "02_000006.wav", 0, {"3-1": 1}),
    ("test", "02_000007.wav", 0, {"1-2": 1, "5-X": 1}),
]


def write_sonyc(root, rows=SONYC_ROWS, drop_column=None, bad_value=None, skip_embedding=None, bad_shape=None):
    root = Path(root) / "sonyc-ust"
    (root / "embeddings").mkdir(parents=True)
    fine_cols = [f"{t}_presence" for t in SONYC_FINE]
    prox_cols = [f"{t}_proximity" for t in SONYC_FINE]
    coarse_cols = [f"{t}_presence" for t in SONYC_COARSE]
    meta = ["split", "sensor_id", "audio_filename", "annotator_id", "year", "week", "day", "hour", "borough",
            "block", "latitude", "longitude"]
    header = coarse_cols[::-1] + meta + fine_cols + prox_cols       # column order is not to be relied on
    if drop_column:
        header.remove(drop_column)
    with open(root / "annotations.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for split, fname, annotator, tags in rows:
            rec = dict(split=split, sensor_id=3, audio_filename=fname, annotator_id=annotator, year=2019, week=3,
                       day=2, hour=11, borough=1, block=547, latitude=40.7, longitude=-73.9)
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
        np.savez(root / "embeddings" / (fname[:-4] + ".npz"), embedding=rng.standard_normal(shape).astype(np.float32),
                 timestamps=np.arange(shape[0], dtype=np.float64))
    return root


@pytest.fixture
def openmic(tmp_path):
    return write_openmic(tmp_path)


#####################################################################################
#  Every script end to end
#####################################################################################

@pytest.mark.parametrize("method", METHODS)
def test_scripts_run_on_synthetic(method, tmp_path):
    ok(run(f"{method}.py", "--epochs", 2, "--out", tmp_path))
    m = metrics_of(tmp_path, f"synthetic__{method}__seed0")
    assert len(m["history"]) == 2 and all(e["seconds"] > 0 and np.isfinite(e["train_loss"]) for e in m["history"])
    assert 0 < m["test"]["f1_macro"] <= 1 and 0 <= m["test"]["f1_pos_macro"] <= 1
    assert 0 < m["test"]["f1_macro_full_truth"] <= 1
    assert m["args"]["seed"] == 0 and m["versions"]["torch"] == torch.__version__ and m["device"]
    assert m["best_epoch"] in (1, 2) and m["seconds"] > 0
    bundle = torch.load(tmp_path / f"synthetic__{method}__seed0" / "model.pt", weights_only=True)
    states = bundle["networks"]
    assert states and all(isinstance(s, dict) for s in states.values()) and bundle["primary"] in states
    assert bundle["method"] == method and bundle["config"]["n_classes"] == 20 and len(bundle["class_names"]) == 20
    pred = np.load(tmp_path / f"synthetic__{method}__seed0" / "test_predictions.npz")
    assert pred["scores"].shape == (1500, 20) and ((pred["scores"] >= 0) & (pred["scores"] <= 1)).all()
    if method in ("mean_teacher", "le_mean_teacher"):
        assert set(states) >= {"teacher", "student"} and "f1_macro" in m["test_student"]
        assert not all(torch.equal(states["teacher"][k], states["student"][k]) for k in states["teacher"])
    if method in ("label_enhance", "le_mean_teacher"):
        e = m["enhancement"]
        assert e["gamma"] == 10 and 0 < e["masked"] < e["missing"]
        assert 0 <= e["masked_precision"] <= 1 and 0 <= e["masked_recall"] <= 1
        assert len(e["per_class"]) == 20


@pytest.mark.parametrize("method", METHODS)
def test_scripts_run_on_openmic_and_h5(method, tmp_path, openmic):
    ok(call(f"{method}.py", "--dataset", "openmic", "--data-dir", tmp_path, "--epochs", 1, "--out", tmp_path / "o"))
    m = metrics_of(tmp_path / "o", f"openmic__{method}__seed0")
    assert np.isfinite(m["test"]["f1_macro"]) and "f1_macro_full_truth" not in m["test"]
    keys = np.load(tmp_path / "o" / f"openmic__{method}__seed0" / "test_predictions.npz")["keys"]
    assert list(keys) == list(openmic[1]["test_keys"])
    h5 = write_h5(tmp_path / "mine.h5")
    ok(call(f"{method}.py", "--dataset", h5, "--epochs", 1, "--out", tmp_path / "o"))
    assert np.isfinite(metrics_of(tmp_path / "o", f"mine__{method}__seed0")["test"]["f1_macro"])


@pytest.mark.parametrize("level", ["fine", "coarse"])
def test_scripts_run_on_sonyc(level, tmp_path):
    write_sonyc(tmp_path)
    for method in METHODS:
        p = ok(call(f"{method}.py", "--dataset", "sonyc", "--data-dir", tmp_path, "--level", level, "--epochs", 1,
                   "--out", tmp_path / "o"))
        folder = tmp_path / "o" / f"{'sonyc' if level == 'fine' else 'sonyc_coarse'}__{method}__seed0"
        test = json.loads((folder / "metrics.json").read_text())["test"]
        for key in ["auprc_macro_masked", "auprc_micro_masked", "dcase_coarse_micro_auprc", "dcase_coarse_macro_auprc",
                    "dcase_micro_f1"] + (["dcase_fine_micro_auprc", "dcase_fine_macro_auprc"] if level == "fine" else []):
            assert key in test, key
        with open(folder / "test_predictions.csv") as fh:
            table = list(csv.reader(fh))
        assert table[0] == ["audio_filename"] + SONYC_FINE + SONYC_COARSE
        assert [r[0] for r in table[1:]] == ["02_000006.wav", "02_000007.wav"]
        assert table[1][1 + SONYC_FINE.index("1-X_engine-of-uncertain-size")] == "0"
        if method == "b1":   # the standalone scorer reads the submission back to the same numbers
            p = ok(run("sonyc.py", folder / "test_predictions.csv", tmp_path / "sonyc-ust" / "annotations.csv", "--split", "test"))
            scored = json.loads(p.stdout)
            keys = [k for k in scored if k in test and (level == "fine" or "coarse" in k)]
            assert len(keys) >= (6 if level == "fine" else 3) and all(scored[k] == pytest.approx(test[k], abs=1e-12) for k in keys)
            (tmp_path / "head.csv").write_text(table and ",".join(table[0]) + "\n")
            p = run("sonyc.py", tmp_path / "head.csv", tmp_path / "sonyc-ust" / "annotations.csv", "--split", "test")
            assert p.returncode == 2 and "no prediction for 2 'test' clip(s)" in p.stderr and "Traceback" not in p.stderr
    assert "observed" in p.stdout


def test_fast_flag_on_cpu_falls_back_to_the_same_eager_run(tmp_path):
    ok(call("b1.py", "--epochs", 2, "--out", tmp_path / "a"))
    b = ok(call("b1.py", "--epochs", 2, "--out", tmp_path / "b", "--fast", "--device", "cpu"))
    assert "no CUDA device" in b.stdout
    assert metrics_of(tmp_path / "a", "synthetic__b1__seed0")["test"] == metrics_of(tmp_path / "b", "synthetic__b1__seed0")["test"]


def test_same_seed_same_metrics_on_cpu(tmp_path):
    def strip(m):
        for e in m["history"]:
            e.pop("seconds")
        m.pop("seconds")
        m["args"].pop("out")
        return m
    ok(run("b1.py", "--epochs", 2, "--out", tmp_path / "a"))
    ok(run("b1.py", "--epochs", 2, "--out", tmp_path / "b"))
    a, b = strip(metrics_of(tmp_path / "a", "synthetic__b1__seed0")), strip(metrics_of(tmp_path / "b", "synthetic__b1__seed0"))
    assert a == b
    ok(call("b1.py", "--epochs", 2, "--out", tmp_path / "c", "--seed", 1))
    assert strip(metrics_of(tmp_path / "c", "synthetic__b1__seed1"))["history"] != a["history"]


def test_kill_mid_run_leaves_no_metrics(tmp_path):
    proc = subprocess.Popen([sys.executable, str(HERE / "b1.py"), "--epochs", "100", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    for line in proc.stdout:  # wait for the first finished epoch
        if line.startswith("epoch"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "no metrics.json" in err
    assert not list(tmp_path.rglob("metrics.json"))
    proc = subprocess.Popen([sys.executable, str(HERE / "b1.py"), "--epochs", "100", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=HERE)
    for line in proc.stdout:
        if line.startswith("epoch"):
            break
    proc.kill()
    proc.wait(timeout=60)
    assert not list(tmp_path.rglob("metrics.json"))


def test_simulate_missing_sweeps_summarizes_and_resumes(tmp_path):
    args = ["--dataset", "synthetic", "--methods", "b1", "label_enhance", "--rates", 0.5, "--seeds", 0, 1,
            "--gammas", 10, 50, "--jobs", 2, "--epochs", 1, "--out", tmp_path]
    p = ok(run("simulate_missing.py", *args))
    assert "6 runs, 0 already finished, 6 to do" in p.stdout
    assert "| f1_macro | drop 0.5 |" in p.stdout and "| label_enhance (gamma 50) |" in p.stdout
    assert "| masked_precision |" in p.stdout and "| f1_macro_full_truth |" in p.stdout
    assert (tmp_path / "synthetic__b1__seed1__drop0.5" / "metrics.json").is_file()
    assert (tmp_path / "synthetic__label_enhance__seed0__drop0.5__gamma50" / "metrics.json").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    row = next(r for r in summary["rows"] if r["method"] == "b1" and r["rate"] == 0.5)
    f1s = [metrics_of(tmp_path, f"synthetic__b1__seed{s}__drop0.5")["test"]["f1_macro"] for s in (0, 1)]
    assert row["seeds"] == 2 and row["f1_macro"] == pytest.approx(np.mean(f1s)) and row["f1_macro_std"] == pytest.approx(np.std(f1s))
    with open(tmp_path / "summary.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3
    p = ok(call("simulate_missing.py", *args))
    assert "6 runs, 6 already finished, 0 to do" in p.stdout


#####################################################################################
#  Loaders, against the official layouts
#####################################################################################

def load(dataset, data_dir=".", level="fine", drop_rate=0.0, drop_seed=common.DROP_SEED):
    return common.load_dataset(Namespace(dataset=str(dataset), data_dir=str(data_dir), level=level, drop_rate=drop_rate,
                                         drop_seed=drop_seed), torch.device("cpu"))


@pytest.mark.parametrize("names", [("split01_train.csv", "split01_test.csv"), ("train01.txt", "test01.txt")])
def test_openmic_loader_reads_the_official_layout(tmp_path, names):
    _, raw = write_openmic(tmp_path, partition_names=names)
    d = load("openmic", tmp_path)
    assert d.class_names == OPENMIC_CLASSES
    assert len(d.val.X) == round(0.15 * 60) and len(d.train.X) == 60 - 9 and d.test.keys == list(raw["test_keys"])
    assert set(d.train.keys) | set(d.val.keys) == set(raw["train_keys"]) and not set(d.train.keys) & set(d.val.keys)
    row = {k: i for i, k in enumerate(raw["keys"])}
    for split in (d.train, d.val, d.test):
        r = [row[k] for k in split.keys]
        assert split.X.dtype == torch.uint8 and torch.equal(split.X, torch.tensor(raw["X"][r]))  # kept as bytes
        assert torch.allclose(split.X.float() * d.input_scale, torch.tensor(raw["X"][r] / 255.0, dtype=torch.float32))
        assert torch.equal(split.observed, torch.tensor(raw["mask"][r]))
        assert torch.equal(split.Y.bool(), torch.tensor((raw["Y_true"][r] >= 0.5) & raw["mask"][r]))
    assert load("openmic", tmp_path).val.keys == d.val.keys  # the validation split does not move


def test_h5_loader_accepts_bytes_and_unicode_splits(tmp_path):
    for kind in ("bytes", "unicode"):
        d = load(write_h5(tmp_path / f"{kind}.h5", str_kind=kind))
        assert (len(d.train.X), len(d.val.X), len(d.test.X)) == (30, 15, 15)
        assert d.class_names == [f"tag{c}" for c in range(5)] and d.train.keys[0] == "clip0"


def test_sonyc_targets_and_mask_by_hand(tmp_path):
    write_sonyc(tmp_path)
    d = load("sonyc", tmp_path)
    fine = [t for t in SONYC_FINE if "-X" not in t]
    assert d.class_names == fine and len(fine) == 23
    col = {t.split("_")[0]: i for i, t in enumerate(fine)}
    assert d.train.keys == ["00_000001.wav", "00_000002.wav"]
    assert d.val.keys == ["01_000003.wav", "01_000005.wav"]          # 01_000004 has no verified row
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
    # z-scored with training statistics, inside the model: (x - input_offset) * input_scale
    z = (d.train.X - torch.as_tensor(d.input_offset)) * torch.as_tensor(d.input_scale)
    assert torch.allclose(z.mean((0, 1)), torch.zeros(512), atol=1e-4) and torch.allclose(z.std((0, 1), correction=0), torch.ones(512), atol=1e-3)
    c = load("sonyc", tmp_path, level="coarse")
    assert c.class_names == SONYC_COARSE
    assert c.train.Y.numpy()[1].tolist() == [1, 0, 0, 0, 0, 1, 0, 0]
    assert c.train.observed.numpy()[1].tolist() == [True, False, True, True, True, True, True, True]  # 2_ is -1
    assert (tmp_path / "sonyc-ust" / "embeddings_cache.h5").is_file()


def test_sonyc_cache_notices_a_changed_annotations_file(tmp_path):
    write_sonyc(tmp_path)
    first = load("sonyc", tmp_path)
    rows = SONYC_ROWS + [("test", "02_000008.wav", 0, {"8-1": 1})]
    np.savez(tmp_path / "sonyc-ust" / "embeddings" / "02_000008.npz", embedding=np.ones((11, 512), np.float32))
    with open(tmp_path / "sonyc-ust" / "annotations.csv") as fh:
        header = next(csv.reader(fh))
    write_sonyc(tmp_path / "again", rows=rows)
    (tmp_path / "again" / "sonyc-ust" / "annotations.csv").replace(tmp_path / "sonyc-ust" / "annotations.csv")
    second = load("sonyc", tmp_path)
    assert len(first.test.X) == 2 and len(second.test.X) == 3 and "8-1_dog-barking-whining_presence" in header


def test_drop_labels_touches_only_observed_training_labels():
    d0, d = load("synthetic"), load("synthetic", drop_rate=0.4)
    before, after = d0.train.observed, d.train.observed
    assert not (after & ~before).any()
    assert after.sum().item() == before.sum().item() - round(0.4 * before.sum().item())
    assert torch.equal(d.val.observed, d0.val.observed) and torch.equal(d.test.observed, d0.test.observed)
    assert torch.equal(load("synthetic", drop_rate=0.4).train.observed, after)


def test_synthetic_data_is_partially_labelled_and_fixed():
    d = load("synthetic")
    share = d.train.observed.float().mean().item()
    assert 0.08 < share < 0.14
    pos_observed = d.train.Y[d.train.observed].mean().item()
    assert pos_observed > 2 * d.train.Y_full.mean().item()          # positives over-represented
    assert torch.equal(load("synthetic").train.X, d.train.X)


#####################################################################################
#  Model
#####################################################################################

def test_attention_mil_shapes_init_and_pooling():
    torch.manual_seed(0)
    model = common.AttentionMIL(128, 20, layers=3, hidden=128, dropout=0.6)
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 60_000
    assert all(m.bias is None for m, _ in model.blocks)
    assert torch.all(model.attention.bias == 0) and torch.all(model.classifier.bias == 0)
    model.eval()
    x = torch.randn(4, 10, 128)
    p = model(x)
    assert p.shape == (4, 20) and ((p > 0) & (p < 1)).all()
    # the output is the attention-weighted mean of the frame classifier: with one frame it is that frame's score
    h = model._bn(model.input_bn, x[:, :1])
    for linear, bn in model.blocks:
        h = torch.relu(model._bn(bn, linear(h)))
    h = h + x[:, :1]
    assert torch.allclose(model(x[:, :1]), torch.sigmoid(model.classifier(h))[:, 0], atol=1e-6)
    sonyc = common.AttentionMIL(512, 23, layers=1, hidden=512)
    assert sonyc(torch.randn(3, 11, 512)).shape == (3, 23)


#####################################################################################
#  Metrics
#####################################################################################

def test_f1_matches_classification_report_macro_avg():
    from sklearn.metrics import classification_report
    rng = np.random.default_rng(0)
    for _ in range(20):
        y, p = rng.integers(0, 2, 30), rng.integers(0, 2, 30)
        rep = classification_report(y, p, output_dict=True, zero_division=0)
        assert common.f1_scores(y, p)[0] == pytest.approx(rep["macro avg"]["f1-score"])
        assert common.f1_scores(y, p)[1] == pytest.approx(rep["1"]["f1-score"])


def test_classwise_f1_by_hand_and_nan_classes():
    scores = np.array([[0.9, 0.2, 0.7], [0.8, 0.6, 0.1], [0.3, 0.4, 0.9], [0.1, 0.1, 0.2]])
    Y = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 1], [0, 0, 0]])
    mask = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 0, 0]], bool)
    out = common.classwise_f1(scores, Y, mask, ["a", "b", "c"], np.array([True, True, True]))
    # class a: perfect -> 1 and 1. class b on 3 entries: y 0,1,1  pred 0,1,0 -> present F1 2/3, absent F1 2/3
    assert out["per_class_f1_macro"]["a"] == 1 and out["per_class_f1_pos"]["b"] == pytest.approx(2 / 3)
    assert out["per_class_f1_macro"]["b"] == pytest.approx(2 / 3)
    assert np.isnan(out["per_class_f1_macro"]["c"])              # no observed entry: NaN, left out of the mean
    assert out["f1_macro"] == pytest.approx((1 + 2 / 3) / 2)


def small_taxonomy():
    return dict(coarse_names=["1_a", "2_b"], fine_group=np.array([0, 0, 1]))


def dcase(scores, fine_truth, x_truth, coarse_truth, level="fine"):
    extra = dict(fine_truth=np.array(fine_truth, bool), x_truth=np.array(x_truth, bool),
                 coarse_truth=np.array(coarse_truth, bool))
    return sonyc.dcase_metrics(np.array(scores, float), extra, small_taxonomy(), level)


def test_dcase_perfect_inverted_and_tied():
    truth = [[1, 0, 1], [0, 1, 0], [0, 0, 1], [1, 1, 0]]
    coarse = [[1, 1], [1, 0], [0, 1], [1, 0]]
    x = [[0, 0]] * 4
    perfect = dcase(truth, truth, x, coarse)
    assert all(v == pytest.approx(1.0) for v in perfect.values())
    inverted = dcase(1 - np.array(truth), truth, x, coarse)
    assert inverted["dcase_fine_macro_auprc"] == 0 and inverted["dcase_fine_micro_auprc"] == 0
    assert inverted["dcase_micro_f1"] == 0
    # every score 0.5: thresholds {1.0, 0.5}; the curve (0,1) (0,0) (1,prevalence) (1,0) has area prevalence / 2
    tied = dcase(np.full((4, 3), 0.5), truth, x, coarse)
    assert tied["dcase_fine_macro_auprc"] == pytest.approx((4 / 8 / 2 + 2 / 4 / 2) / 2)
    assert tied["dcase_coarse_macro_auprc"] == pytest.approx((3 / 4 / 2 + 2 / 4 / 2) / 2)


def test_dcase_incomplete_tag_rules_by_hand():
    # group 1 has fine tags a, b and an X tag; group 2 has one tag c and no X tag.
    # clip 1: a present; clip 2: only the X tag; clip 3: nothing.
    scores = [[0.8, 0.0, 0.9], [0.0, 0.8, 0.3], [0.0, 0.8, 0.0]]
    fine_truth = [[1, 0, 1], [0, 0, 0], [0, 0, 0]]
    x_truth = [[0, 0], [1, 0], [0, 0]]
    coarse_truth = [[1, 1], [1, 0], [0, 0]]
    # group 1, t=1.0: TP 0 FP 0 FN 2 (a on clip 1; clip 2's X judged coarsely) -> P 0, R 0
    #          t=0.8: TP 2 (a; clip 2 coarsely) FP 1 (b on clip 3; not b on clip 2, whose truth has X) -> P 2/3, R 1
    thr, counts = sonyc._group_counts(np.array(scores)[:, :2], np.array(fine_truth, bool)[:, :2],
                                       np.array(x_truth, bool)[:, 0], fine=True)
    assert thr.tolist() == [1.0, 0.8] and counts.tolist() == [[0, 0, 2], [2, 1, 0]]
    # AUPRC group 1: (0,1) (0,0) (1,2/3) (1,0) -> 1/3; group 2: (0,1) (0,0) (1,1) (1,1/2) (1,0) -> 1/2
    m = dcase(scores, fine_truth, x_truth, coarse_truth)
    assert m["dcase_fine_macro_auprc"] == pytest.approx((1 / 3 + 1 / 2) / 2, abs=1e-9)
    # micro over the union {0.3, 0.8, 0.9, 1.0}: (3,2,0) (3,1,0) (1,0,2) (0,0,3) -> area 1/6 + 8/15
    assert m["dcase_fine_micro_auprc"] == pytest.approx(0.7, abs=1e-9)
    assert m["dcase_micro_f1"] == pytest.approx(6 / 7, abs=1e-9)   # at t = 0.8: P 3/4, R 1
    assert m["dcase_coarse_macro_auprc"] == pytest.approx(5 / 12, abs=1e-9)
    # without the X rules clip 2 would count as a false positive and a missed coarse positive
    no_x = dcase(scores, fine_truth, [[0, 0]] * 3, coarse_truth)
    assert no_x["dcase_fine_macro_auprc"] != pytest.approx(m["dcase_fine_macro_auprc"])


def test_masked_auprc_uses_observed_entries_only():
    from sklearn.metrics import average_precision_score
    rng = np.random.default_rng(1)
    scores, Y = rng.random((40, 3)), rng.integers(0, 2, (40, 3))
    mask = rng.random((40, 3)) < 0.6
    out = common.masked_auprc(scores, Y, mask, ["a", "b", "c"], np.ones(3, bool))
    per = [average_precision_score(Y[mask[:, c], c], scores[mask[:, c], c]) for c in range(3)]
    assert out["ap_macro_masked"] == pytest.approx(np.mean(per))        # average precision, under its own name
    assert out["ap_micro_masked"] == pytest.approx(average_precision_score(Y[mask], scores[mask]))
    area = [paper_area(Y[mask[:, c], c], scores[mask[:, c], c]) for c in range(3)]
    assert out["auprc_macro_masked"] == pytest.approx(np.mean(area), abs=1e-12)
    assert out["auprc_micro_masked"] == pytest.approx(paper_area(Y[mask], scores[mask]), abs=1e-12)


def paper_area(y, s):
    """The paper code's AUPRC, computed independently: at each distinct score, descending, the
    precision and recall of 'score >= t'; the curve from (R 0, P 1) through them to (R 1, P 0);
    the trapezoid area."""
    y, s = np.asarray(y, bool), np.asarray(s, float)
    R, P = [0.0], [1.0]
    for t in np.unique(s)[::-1]:
        pred = s >= t
        R.append((y & pred).sum() / y.sum())
        P.append((y & pred).sum() / pred.sum())
    R, P = np.array(R + [1.0]), np.array(P + [0.0])
    return float(np.sum(np.diff(R) * (P[1:] + P[:-1]) / 2))


def test_paper_auprc_by_hand_and_against_an_independent_computation():
    y, s = np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.4, 0.1])
    assert common.pr_area(y, s) == pytest.approx(0.791667, abs=1e-6) and paper_area(y, s) == pytest.approx(0.791667, abs=1e-6)
    from sklearn.metrics import average_precision_score
    assert average_precision_score(y, s) == pytest.approx(0.833333, abs=1e-6)   # not the same number
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = rng.integers(5, 60)
        y = rng.integers(0, 2, n)
        y[0] = 1
        s = rng.integers(0, 6, n) / 5.0      # few distinct values: many ties
        assert common.pr_area(y, s) == pytest.approx(paper_area(y, s), abs=1e-12)


#####################################################################################
#  Method pieces on hand-made cases
#####################################################################################

def test_enhanced_mask_by_hand_with_edge_cases():
    from label_enhance import enhance_mask
    observed = torch.tensor([[1, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 1, 1]], dtype=torch.bool)
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.5, 0.2], [0.1, 0.5, 0.3], [0.4, 0.5, 0.4], [0.6, 0.2, 0.5]])
    enhanced, info = enhance_mask(scores, observed, gamma=50)
    # class 0: missing rows 1-4 scores .8 .1 .4 .6; k = 2 stay masked (.8, .6), tau = .6; .1 and .4 -> negatives
    assert info[0] == dict(tau=pytest.approx(0.6), missing=4, masked=2)
    assert enhanced[:, 0].tolist() == [True, False, True, True, False]
    # class 1: four tied missing scores: k = 2, but ties at tau all stay masked (Eq. 1 reads score >= tau)
    assert info[1]["masked"] == 4 and enhanced[:, 1].tolist() == [False, False, False, False, True]
    # class 2: no missing label: nothing to do
    assert info[2] == dict(tau=None, missing=0, masked=0) and enhanced[:, 2].all()
    # gamma 0 keeps every missing label masked (= B1); gamma 100 turns them all into negatives (= B0)
    assert torch.equal(enhance_mask(scores, observed, 0)[0], observed)
    assert enhance_mask(scores, observed, 100)[0].all()
    # a count that rounds to zero masks none (the paper's code masked all of them)
    one = enhance_mask(scores[:, :1], observed[:, :1], 90)
    assert one[1][0]["masked"] == 0 and one[0].all()
    assert enhance_mask(scores, observed, 10)[1][0]["masked"] == 4   # round(0.9 * 4) = 4


def test_one_ema_update_by_hand():
    from mean_teacher import ema_update
    teacher, student = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 6.0])]
    step = torch.zeros(())
    ema_update(teacher, student, step, ema_decay=0.99)
    # t = 1: alpha = min(1 - 1/2, 0.99) = 0.5 -> the plain average
    assert step.item() == 1 and torch.allclose(teacher[0], torch.tensor([2.0, 4.0]))
    step.fill_(1000)
    ema_update(teacher, student, step, ema_decay=0.99)   # alpha = 0.99 from then on
    assert torch.allclose(teacher[0], 0.99 * torch.tensor([2.0, 4.0]) + 0.01 * torch.tensor([3.0, 6.0]))


#####################################################################################
#  Bad input: one line naming the file, exit 2, no traceback, no run folder
#####################################################################################

def bad(tmp_path, *args, expect=(), runner=call):
    out = tmp_path / "out"
    p = runner("b1.py", "--epochs", 1, "--out", out, *args)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    for e in expect:
        assert e in p.stderr, (e, p.stderr)
    assert not out.exists() or not any(out.iterdir())
    return p.stderr


def test_bad_openmic_inputs(tmp_path):
    bad(tmp_path, "--dataset", "openmic", "--data-dir", tmp_path, expect=["openmic-2018", "1432913", "class-map.json"],
        runner=run)  # once as a real process: exit status 2 and no traceback
    root, raw = write_openmic(tmp_path)
    npz = root / "openmic-2018.npz"
    good = npz.read_bytes()
    npz.write_bytes(good[:1000])
    bad(tmp_path, "--dataset", "openmic", "--data-dir", tmp_path, expect=["cannot read", "openmic-2018.npz", "not a zip"])
    np.savez(npz, X=raw["X"], Y_true=raw["Y_true"], sample_key=raw["keys"])
    bad(tmp_path, "--dataset", "openmic", "--data-dir", tmp_path, expect=["Y_mask", "openmic-2018.npz"])
    np.savez(npz, X=raw["X"][:, 0], Y_true=raw["Y_true"], Y_mask=raw["mask"], sample_key=raw["keys"])
    bad(tmp_path, "--dataset", "openmic", "--data-dir", tmp_path, expect=["X should be", "(80, 128)"])
    np.savez(npz, X=raw["X"], Y_true=raw["Y_true"][:-1], Y_mask=raw["mask"], sample_key=raw["keys"])
    bad(tmp_path, "--dataset", "openmic", "--data-dir", tmp_path, expect=["Y_true", "(79, 20)", "(80, 20)"])
    X = raw["X"].astype(np.float32)
    X[3, 0, 0] = np.nan
    X[7, 1, 1] = np.inf
    np.savez(npz, X=X, Y_true=raw["Y_true"], Y_mask=raw["mask"], sample_key=raw["keys"])
    bad(tmp_path, "--dataset", "openmic", "--data-dir", tmp_path, expect=["NaN or inf in 2 of 80 rows"])
    npz.write_bytes(good)
    (root / "class-map.json").write_text(json.dumps({c: i for i, c in enumerate(OPENMIC_CLASSES[:19])}))
    bad(tmp_path, "--dataset", "openmic", "--data-dir", tmp_path, expect=["class-map.json", "19", "20"])
    (root / "class-map.json").write_text(json.dumps({c: i for i, c in enumerate(OPENMIC_CLASSES)}))
    with open(root / "partitions" / "split01_test.csv", "a") as fh:
        fh.write("999999_0\n999998_0\n")
    bad(tmp_path, "--dataset", "openmic", "--data-dir", tmp_path,
        expect=["split01_test.csv", "2 key(s) not in", "999999_0"])


def test_bad_sonyc_inputs(tmp_path):
    bad(tmp_path, "--dataset", "sonyc", "--data-dir", tmp_path, expect=["annotations.csv", "3966543", "openl3"])
    write_sonyc(tmp_path / "a", drop_column="annotator_id")
    bad(tmp_path, "--dataset", "sonyc", "--data-dir", tmp_path / "a", expect=["annotations.csv", "annotator_id"])
    write_sonyc(tmp_path / "b", bad_value=2)
    bad(tmp_path, "--dataset", "sonyc", "--data-dir", tmp_path / "b", expect=["annotations.csv, line 12", "'2'"])
    write_sonyc(tmp_path / "c", skip_embedding="02_000007.wav")
    bad(tmp_path, "--dataset", "sonyc", "--data-dir", tmp_path / "c", expect=["1 embedding file(s)", "02_000007.npz"])
    write_sonyc(tmp_path / "d", bad_shape=(10, 512))
    bad(tmp_path, "--dataset", "sonyc", "--data-dir", tmp_path / "d", expect=["02_000006.npz (10, 512)"])


def test_bad_h5_inputs(tmp_path):
    path = write_h5(tmp_path / "x.h5")
    with h5py.File(path, "a") as f:
        del f["observed"]
    bad(tmp_path, "--dataset", path, expect=["x.h5", "observed"])
    path = write_h5(tmp_path / "y.h5")
    with h5py.File(path, "a") as f:
        s = f["split"][()]
        s[0] = b"dev"
        del f["split"]
        f["split"] = s
    bad(tmp_path, "--dataset", path, expect=["y.h5", "unknown split name(s) ['dev']"])
    bad(tmp_path, "--dataset", tmp_path / "absent.h5", expect=["absent.h5"])


def test_bad_arguments_and_unwritable_out(tmp_path):
    for args, word in ((["--epochs", 0], "--epochs"), (["--drop-rate", -0.1], "--drop-rate"), (["--dataset", "mnist"], "--dataset")):
        err = bad(tmp_path, *args, expect=["usage:", word])
    p = call("label_enhance.py", "--gamma", 150, "--out", tmp_path / "out")
    assert p.returncode == 2 and "--gamma" in p.stderr and "Traceback" not in p.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    p = call("b1.py", "--out", blocker / "runs")
    assert p.returncode == 2 and str(blocker) in p.stderr and "Traceback" not in p.stderr and "epoch" not in p.stdout


def test_class_without_training_label_warns_and_is_left_out(tmp_path):
    path = write_h5(tmp_path / "gap.h5", no_train_label_for=2)
    p = ok(call("b1.py", "--dataset", path, "--epochs", 1, "--out", tmp_path))
    assert "tag2" in p.stderr and "NaN" in p.stderr
    test = metrics_of(tmp_path, "gap__b1__seed0")["test"]
    assert test["per_class_f1_macro"]["tag2"] is None
    others = [v for k, v in test["per_class_f1_macro"].items() if k != "tag2"]
    assert test["f1_macro"] == pytest.approx(np.mean(others))


def test_batches_without_observed_labels_give_no_nan(tmp_path):
    path = write_h5(tmp_path / "sparse.h5", observed_share=0.0)  # most rows have no observed label
    for method in ("b1", "mean_teacher"):
        ok(call(f"{method}.py", "--dataset", path, "--epochs", 2, "--batch-size", 1, "--out", tmp_path))
        assert all(np.isfinite(e["train_loss"]) for e in metrics_of(tmp_path, f"sparse__{method}__seed0")["history"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["b1", "mean_teacher"])
def test_cuda_smoke_eager_and_fast(method, tmp_path):
    ok(run(f"{method}.py", "--epochs", 10, "--device", "cuda", "--out", tmp_path / "eager"))
    ok(run(f"{method}.py", "--epochs", 10, "--device", "cuda", "--fast", "--out", tmp_path / "fast"))
    a = metrics_of(tmp_path / "eager", f"synthetic__{method}__seed0")["test"]["f1_macro"]
    b = metrics_of(tmp_path / "fast", f"synthetic__{method}__seed0")["test"]["f1_macro"]
    assert abs(a - b) < 0.05


#####################################################################################
#  The data path: no pickle runs, any scale trains, X stays compact
#####################################################################################

class _Payload:
    """Unpickling this runs a shell command: what a crafted download would do."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_or_broken_openmic_npz_is_refused_and_runs_nothing(tmp_path):
    root, raw = write_openmic(tmp_path)
    npz, marker = root / "openmic-2018.npz", tmp_path / "pwned"
    keys = raw["keys"].copy()
    keys[0] = _Payload(marker)
    np.savez(npz, X=raw["X"], Y_true=raw["Y_true"], Y_mask=raw["mask"], sample_key=keys)
    err = bad(tmp_path, "--dataset", "openmic", "--data-dir", tmp_path, expect=["openmic-2018.npz", "refused", "system"],
              runner=run)
    assert not marker.exists() and len(err.strip().splitlines()) == 1
    np.savez(npz, X=raw["X"], Y_true=raw["Y_true"], Y_mask=raw["mask"], sample_key=np.array([{"a": 1}] * 80, dtype=object))
    bad(tmp_path, "--dataset", "openmic", "--data-dir", tmp_path, expect=["sample_key should be an array of strings"])
    for content in (b"<html>Not Found</html>", b"\x80\x04\x95" + os.urandom(200), b""):   # a failed download, raw bytes
        npz.write_bytes(content)
        assert "not a zip" in bad(tmp_path, "--dataset", "openmic", "--data-dir", tmp_path, expect=["openmic-2018.npz"])
    np.savez(npz, X=raw["X"].astype(object), Y_true=raw["Y_true"], Y_mask=raw["mask"], sample_key=raw["keys"])
    bad(tmp_path, "--dataset", "openmic", "--data-dir", tmp_path, expect=["cannot read", "allow_pickle"])
    assert not marker.exists()


def test_saturated_classifier_keeps_the_output_in_0_1():
    torch.manual_seed(0)
    model = common.AttentionMIL(16, 5, layers=1, hidden=16, dropout=0.0).eval()
    with torch.no_grad():
        model.classifier.bias.fill_(60.0)                 # sigmoid = 1.0 exactly
        model.attention.weight.normal_(0, 3)              # uneven weights: their sum is 1 + eps
    x = torch.randn(256, 10, 16) * 100
    p = model(x)
    assert ((p >= 0) & (p <= 1)).all() and (p == 1).any()
    assert torch.isfinite(torch.nn.functional.binary_cross_entropy(p, torch.zeros_like(p)))


def write_scaled_h5(path, dtype, scale, n=64):
    rng = np.random.default_rng(1)
    X = rng.integers(0, 256, (n, 10, 128)) if dtype == np.uint8 else rng.standard_normal((n, 10, 128)) * scale
    with h5py.File(path, "w") as f:
        f["X"] = X.astype(dtype)
        f["Y"] = (rng.random((n, 4)) < 0.4).astype(np.uint8)
        f["observed"] = rng.random((n, 4)) < 0.6
        f["split"] = np.array([b"train"] * 40 + [b"val"] * 12 + [b"test"] * 12)
        f.attrs["class_names"] = ["a", "b", "c", "d"]
    return path


@pytest.mark.parametrize("method", ["b1", "label_enhance", "mean_teacher"])
def test_raw_bytes_and_huge_floats_train(method, tmp_path):
    for name, dtype, scale in (("bytes", np.uint8, 1), ("huge", np.float32, 1e4)):
        path = write_scaled_h5(tmp_path / f"{name}.h5", dtype, scale)
        ok(call(f"{method}.py", "--dataset", path, "--epochs", 3, "--batch-size", 8, "--out", tmp_path))
        pred = np.load(tmp_path / f"{name}__{method}__seed0" / "test_predictions.npz")["scores"]
        assert ((pred >= 0) & (pred <= 1)).all()


def test_h5_keeps_the_stored_width_and_reads_in_blocks(tmp_path):
    for dtype, kept in ((np.uint8, torch.uint8), (np.float16, torch.float16), (np.float64, torch.float32),
                        (np.int16, torch.float32)):
        path = write_scaled_h5(tmp_path / f"{np.dtype(dtype).name}.h5", dtype, 1)
        d = load(path)
        assert d.train.X.dtype == kept and d.input_scale == 1.0
        whole, _, _ = common.load_h5(path)
        blocks, _, _ = common.load_h5(path, block_bytes=3000)      # 2 clips a block: many blocks
        for s in ("train", "val", "test"):
            assert np.array_equal(whole[s]["X"], blocks[s]["X"])
    path = tmp_path / "float64.h5"
    with h5py.File(path, "a") as f:
        f["X"][50, 0, 0] = 1e300                             # finite as float64, inf as float32
    bad(tmp_path, "--dataset", path, expect=["float64.h5", "NaN or inf in 1 of 64 rows 0..63", "float32"])
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f["X"] = np.zeros((64, 128), np.float32)
    bad(tmp_path, "--dataset", tmp_path / "flat.h5", expect=["flat.h5", "missing dataset(s) ['Y', 'observed', 'split', 'attribute class_names']"])
    with h5py.File(tmp_path / "flat.h5", "a") as f, h5py.File(path, "r") as g:
        for k in ("Y", "observed", "split"):
            f[k] = g[k][()]
        f.attrs["class_names"] = ["a", "b", "c", "d"]
    bad(tmp_path, "--dataset", tmp_path / "flat.h5", expect=["X[:, None, :]"])


def test_sonyc_cache_notices_recomputed_embeddings(tmp_path):
    write_sonyc(tmp_path)
    first = load("sonyc", tmp_path)
    emb = tmp_path / "sonyc-ust" / "embeddings" / "02_000007.npz"
    np.savez(emb, embedding=np.full((11, 512), 7.0, np.float32))
    st = emb.stat()
    os.utime(emb, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = load("sonyc", tmp_path)
    assert (second.test.X[1] == 7.0).all() and not (first.test.X[1] == 7.0).all()
    assert torch.equal(second.test.X[0], first.test.X[0])


#####################################################################################
#  Label enhancement's teacher selection
#####################################################################################

def test_le_teacher_is_selected_by_its_own_loss_unless_asked(tmp_path):
    ok(call("label_enhance.py", "--epochs", 4, "--out", tmp_path))
    p = ok(call("label_enhance.py", "--epochs", 4, "--out", tmp_path, "--teacher-selection", "observed"))
    own = metrics_of(tmp_path, "synthetic__label_enhance__seed0")["teacher"]
    paper = metrics_of(tmp_path, "synthetic__label_enhance__seed0__teacher-observed")["teacher"]
    for t, rule in ((own, "b0"), (paper, "observed")):
        losses = [e[f"val_loss_{rule}"] for e in t["history"]]
        assert t["selection"] == rule and t["best_epoch"] == 1 + int(np.argmin(losses))
        assert t[f"val_loss_{rule}"] == min(losses) and "val_loss_b0" in t and "val_loss_observed" in t
    assert own["best_epoch"] > 1 and paper["best_epoch"] == 1        # on this data the two rules disagree
    assert "selected at epoch 1" in p.stderr


#####################################################################################
#  Module boundaries: sonyc.py and openmic.py stand alone, imports run one way
#####################################################################################

def test_dataset_modules_stand_alone_and_imports_run_one_way():
    code = "import sys; sys.modules['torch'] = sys.modules['sklearn'] = sys.modules['common'] = None; import sonyc, openmic, synthetic"
    ok(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE))
    import ast
    local = {p.stem for p in HERE.glob("*.py")}
    graph = {}
    for p in HERE.glob("*.py"):
        tree = ast.parse(p.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        graph[p.stem] = names & local
    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, seen + (n,))) for n in graph.get(a, ()))
    assert not [m for m in graph if reaches(m, m)], graph
    assert graph["sonyc"] == set() and graph["openmic"] == set() and "common" in graph["b1"]


#####################################################################################
#  Sweeps: leave the process, plot, never table stale runs
#####################################################################################

def sweep_grid(tmp_path):
    h5 = write_h5(tmp_path / "mine.h5")
    return ["--dataset", h5, "--methods", "b0", "b1", "--rates", 0, 0.5, "--seeds", 0, 1, "--epochs", 1, "--out", tmp_path / "o"]


def test_sweep_dry_run_then_collect(tmp_path):
    grid = sweep_grid(tmp_path)
    p = ok(call("simulate_missing.py", *grid, "--dry-run"))
    commands = p.stdout.strip().splitlines()
    assert len(commands) == 8 and all(c.startswith("python b") for c in commands) and not (tmp_path / "o").exists()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    ok(subprocess.run(["bash", "-c", " && ".join(commands)], capture_output=True, text=True, cwd=HERE, env=env))
    p = ok(call("simulate_missing.py", *grid))
    assert "8 runs, 8 already finished, 0 to do" in p.stdout and "| f1_macro | drop 0 | drop 0.5 |" in p.stdout
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    for r in summary["rows"]:
        runs = [metrics_of(tmp_path / "o", f"mine__{r['method']}__seed{s}" + ("__drop0.5" if r["rate"] else ""))["test"]["f1_macro"]
                for s in (0, 1)]
        assert r["values"] == runs and r["f1_macro"] == pytest.approx(np.mean(runs))
    # a second grid into the same folder keeps the first one's summary
    first = sorted((tmp_path / "o").glob("summary-*.json"))
    before = first[0].read_text()
    ok(call("simulate_missing.py", *grid[:-8], "--rates", 0, "--seeds", 0, "--epochs", 1, "--out", tmp_path / "o"))
    assert len(list((tmp_path / "o").glob("summary-*.json"))) == 2 and first[0].read_text() == before
    assert len(json.loads((tmp_path / "o" / "summary.json").read_text())["rows"]) == 2
    # --plot without matplotlib: one line naming the install, exit 2, the summary still written
    (tmp_path / "o" / "summary.json").unlink()
    saved = sys.modules.get("matplotlib")
    sys.modules["matplotlib"] = None
    try:
        p = call("simulate_missing.py", *grid, "--plot")
    finally:
        sys.modules.pop("matplotlib")
        if saved is not None:
            sys.modules["matplotlib"] = saved
    assert p.returncode == 2 and "pip install matplotlib" in p.stderr and (tmp_path / "o" / "summary.json").is_file()


def test_sweep_plots_fig4_and_fig5_from_its_summary(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is optional; .ci/run installs it so this runs in CI")
    import simulate_missing
    grid = sweep_grid(tmp_path)
    grid.remove("b0")                              # one method, two rates, two seeds: 4 runs, 2 at a time
    ok(call("simulate_missing.py", *grid, "--jobs", 2, "--plot"))
    for fig in ("fig4.png", "fig5.png"):
        assert (tmp_path / "o" / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    plotted = simulate_missing.plot(summary, tmp_path)
    for r in summary["rows"]:
        if r["rate"] == 0:
            assert plotted["fig4"][r["method"]] == r["values"]
        rates, means, stds = plotted["fig5"][r["method"]]
        assert means[rates.index(r["rate"])] == r["f1_macro"] and stds[rates.index(r["rate"])] == r["f1_macro_std"]
    assert list(plotted["fig4"]) == ["b1"] and len(plotted["fig4"]["b1"]) == 2 and plotted["fig5"]["b1"][0] == [0, 0.5]


def test_stale_runs_and_options_the_sweep_sets_are_refused(tmp_path):
    grid = ["--methods", "b1", "--rates", 0, "--seeds", 0, "--out", tmp_path]
    p = ok(call("simulate_missing.py", *grid, "--epochs", 1, "--devices", "cpu"))   # each run pinned to a device
    assert "synthetic__b1__seed0 on cpu" in p.stdout
    p = call("simulate_missing.py", *grid, "--epochs", 1, "--devices", "cpu", "--device", "cpu")
    assert p.returncode == 2 and "--device cpu: the sweep sets this itself" in p.stderr
    p = call("simulate_missing.py", *grid, "--epochs", 2)
    assert p.returncode == 2 and "1 finished run(s)" in p.stderr and "--epochs 1 -> 2" in p.stderr
    for option in (["--drop-rate", 0.4], ["--seed", 1], ["--gamma", 50], ["--gamma=50"]):
        p = call("simulate_missing.py", *grid, *option)
        assert p.returncode == 2 and "the sweep sets this itself" in p.stderr, option
    # a method script never overwrites a finished run made with other settings; the same settings rerun
    p = call("b1.py", "--out", tmp_path, "--epochs", 2, "--lr", 0.01)
    assert p.returncode == 2 and "--epochs 1 -> 2" in p.stderr and "--lr 0.001 -> 0.01" in p.stderr and "epoch" not in p.stdout
    ok(call("b1.py", "--out", tmp_path, "--epochs", 1, "--threads", 1, "--device", "cpu"))


def test_gpu_check_arguments_and_the_learning_rate_check(tmp_path):
    sh = lambda *a: subprocess.run(["bash", str(HERE / "benchmarks" / "gpu_check.sh"), *a], capture_output=True, text=True)
    assert sh("--help").returncode == 0 and "8 minutes" in sh("--help").stdout
    assert sh("--bogus").returncode == 2 and "unknown argument" in sh("--bogus").stderr
    if not torch.cuda.is_available():
        p = sh("--python", sys.executable)
        assert p.returncode == 2 and "no CUDA device" in p.stderr
    h5 = write_h5(tmp_path / "lr.h5")
    ok(call("b1.py", "--dataset", h5, "--epochs", 62, "--out", tmp_path))
    check = lambda: subprocess.run([sys.executable, str(HERE / "benchmarks" / "check_lr.py"), str(tmp_path / "lr__b1__seed0")],
                                   capture_output=True, text=True)
    p = ok(check())
    assert "halved at epochs 31, 61" in p.stdout
    path = tmp_path / "lr__b1__seed0" / "metrics.json"
    m = json.loads(path.read_text())
    m["history"][40]["lr"] = m["history"][20]["lr"]        # a schedule that kept the first rate too long
    path.write_text(json.dumps(m))
    assert check().returncode == 1


#####################################################################################
#  Runs you can share and reuse
#####################################################################################

def test_drop_seed_changes_which_labels_not_how_many():
    a, b = load("synthetic", drop_rate=0.4), load("synthetic", drop_rate=0.4, drop_seed=7)
    assert a.train.observed.sum() == b.train.observed.sum() and not torch.equal(a.train.observed, b.train.observed)
    args = Namespace(dataset="synthetic", level="fine", seed=3, drop_rate=0.4, drop_seed=7, out="r")
    assert common.run_dir(args, "b1", {"openmic": {}}).name == "synthetic__b1__seed3__drop0.4__dropseed7"


def test_predict_applies_a_trained_run_and_files_are_readable(tmp_path):
    h5 = write_h5(tmp_path / "mine.h5")
    ok(call("mean_teacher.py", "--dataset", h5, "--epochs", 2, "--out", tmp_path))
    folder = tmp_path / "mine__mean_teacher__seed0"
    mode = 0o666 & ~common._UMASK
    assert all((folder / f).stat().st_mode & 0o777 == mode for f in ("metrics.json", "model.pt", "test_predictions.npz"))
    saved = np.load(folder / "test_predictions.npz")
    p = ok(run("predict.py", folder, h5, "--out", tmp_path / "tags" / "tags.csv"))
    assert "mean_teacher" in p.stdout and "teacher" in p.stdout
    with open(tmp_path / "tags" / "tags.csv") as fh:
        table = list(csv.reader(fh))
    assert table[0] == ["clip"] + [f"tag{c}" for c in range(5)] and len(table) == 61
    row = {r[0]: np.array(r[1:], float) for r in table[1:]}
    assert np.allclose([row[k] for k in saved["keys"]], saved["scores"], atol=1e-6)
    model, meta = common.load_run(folder)                       # the same from Python
    X = load(h5).test.X
    np.savez(tmp_path / "test.npz", X=X.numpy())
    assert np.allclose(common.predict(model, X).numpy(), saved["scores"], atol=1e-6) and meta["primary"] == "teacher"
    ok(call("predict.py", folder, tmp_path / "test.npz", "--out", tmp_path / "t.csv"))
    with open(tmp_path / "t.csv") as fh:
        assert np.allclose([list(map(float, r[1:])) for r in list(csv.reader(fh))[1:]], saved["scores"], atol=1e-6)
    p = call("predict.py", tmp_path, h5, "--out", tmp_path / "x.csv")
    assert p.returncode == 2 and "no model.pt" in p.stderr
    # hostile inputs: one line, exit 2, no traceback
    good = (tmp_path / "test.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(good[:len(good) // 2])
    (tmp_path / "raw.h5").write_bytes(os.urandom(500))
    np.savez(tmp_path / "obj.npz", X=np.zeros((2, 4, 16)), keys=np.array([{"a": 1}] * 2, dtype=object))
    for bad_input, words in (("trunc.npz", "not an .npz"), ("raw.h5", "cannot read"), ("obj.npz", "allow_pickle"),
                             ("metrics.json", "expected an .h5 or .npz")):
        p = call("predict.py", folder, tmp_path / bad_input if bad_input != "metrics.json" else folder / bad_input,
                 "--out", tmp_path / "x.csv")
        assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, (bad_input, p.stderr)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.pt").write_bytes(os.urandom(300))
    p = call("predict.py", broken, h5, "--out", tmp_path / "x.csv")
    assert p.returncode == 2 and "cannot load" in p.stderr
    (tmp_path / "raw_data.h5").write_bytes(os.urandom(500))
    bad(tmp_path, "--dataset", tmp_path / "raw_data.h5", expect=["cannot read", "raw_data.h5"])


def test_diverging_run_stops_in_one_line_without_metrics(tmp_path):
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "huge.h5", "w") as f:            # finite, but its batch variance overflows
        f["X"] = (rng.choice([-1, 1], (60, 4, 16)) * 3e38).astype(np.float32)
        f["Y"] = (rng.random((60, 5)) < 0.4).astype(np.float32)
        f["observed"] = np.ones((60, 5), bool)
        f["split"] = np.array([b"train"] * 30 + [b"val"] * 15 + [b"test"] * 15)
        f.attrs["class_names"] = [f"t{i}" for i in range(5)]
    err = bad(tmp_path, "--dataset", tmp_path / "huge.h5", expect=["diverged at epoch 1", "lower --lr"])
    assert len(err.strip().splitlines()) == 1
    history = [dict(epoch=1, train_loss=0.5, val_loss=0.6, lr=1e-3, seconds=1.0),
               dict(epoch=2, train_loss=float("nan"), val_loss=0.6, lr=1e-3, seconds=1.0)]
    with pytest.raises(common.UserError, match="epoch 2: .*0.5 at epoch 1"):
        common.log_epoch(history, 10)


def test_out_that_cannot_be_written_fails_before_training(tmp_path):
    p = call("b1.py", "--out", "/proc/missing-labels-test")
    assert p.returncode == 2 and "cannot write there" in p.stderr and "epoch" not in p.stdout
