"""The smoke test: every script end to end, as a user runs it, on the embedded synthetic data.

    python -m pytest -q                 # this file and tests/ (readers, metrics, methods, runs and sweeps)
    python -m pytest -q test_all.py     # this file alone, about a minute on 2 CPU cores

Each method script trains 2 epochs in its own process and must leave a complete run: metrics.json with the
arguments, history, test metrics and versions; model.pt that loads with weights_only=True; the test
predictions. predict.py and the sweep run end to end in tests/test_runs.py.
"""

import json

import numpy as np
import pytest
import torch

import common
from tests.conftest import METHODS, in_parallel, ok, run

PRIMARY = dict(
    b0="model",
    b1="model",
    label_enhance="student",
    mean_teacher="teacher",
    le_mean_teacher="teacher",
    large_loss="model",
    selective="model",
    em="model",
    gr_loss="model",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every method, 2 epochs, in its own process; returns {method: (process, run folder)}."""
    out = tmp_path_factory.mktemp("runs")
    processes = in_parallel(lambda method: ok(run(f"{method}.py", "--epochs", 2, "--out", out / method)), METHODS)
    return {m: (p, out / m / f"synthetic__{m}__seed0__epochs2") for m, p in zip(METHODS, processes)}


@pytest.mark.parametrize("method", METHODS)
def test_run_folder_is_named_by_dataset_method_seed_and_non_defaults(method, runs):
    folders = [p.name for p in runs[method][1].parent.iterdir() if p.is_dir()]
    assert folders == [f"synthetic__{method}__seed0__epochs2"]


@pytest.mark.parametrize("method", METHODS)
def test_console_shows_every_epoch_and_the_test_line(method, runs):
    out = runs[method][0].stdout
    assert "data: synthetic | train 1280 val 500 test 1500 clips" in out
    assert out.count("epoch   2/2 |") == (2 if method in ("label_enhance", "le_mean_teacher", "selective") else 1)
    assert "| test " in out and "f1_macro " in out and "auprc_macro_masked " in out


@pytest.mark.parametrize("method", METHODS)
def test_metrics_json_records_the_run(method, runs):
    m = json.loads((runs[method][1] / "metrics.json").read_text())
    assert m["method"] == method
    assert m["args"]["seed"] == 0
    assert m["args"]["epochs"] == 2
    assert m["versions"]["torch"] == torch.__version__
    assert m["device"].startswith("cpu")
    assert [e["epoch"] for e in m["history"]] == [1, 2]
    assert all(np.isfinite(e["train_loss"]) and e["seconds"] > 0 for e in m["history"])
    assert m["best_epoch"] in (1, 2)


@pytest.mark.parametrize("method", METHODS)
def test_every_headline_metric_is_reported(method, runs):
    test = json.loads((runs[method][1] / "metrics.json").read_text())["test"]
    assert [k for k in common.HEADLINE + common.SHARES if not np.isfinite(test.get(k, np.nan))] == []


@pytest.mark.parametrize("method", METHODS)
def test_model_pt_holds_the_reported_network_on_the_cpu(method, runs):
    bundle = torch.load(runs[method][1] / "model.pt", weights_only=True)
    assert bundle["method"] == method
    assert bundle["primary"] == PRIMARY[method]
    assert bundle["config"]["n_classes"] == 20
    assert len(bundle["class_names"]) == 20
    assert all(t.device.type == "cpu" for state in bundle["networks"].values() for t in state.values())


@pytest.mark.parametrize("method", METHODS)
def test_test_predictions_are_probabilities_with_their_labels(method, runs):
    pred = np.load(runs[method][1] / "test_predictions.npz")
    assert pred["scores"].shape == (1500, 20)
    assert ((pred["scores"] >= 0) & (pred["scores"] <= 1)).all()
    assert pred["observed"].shape == pred["labels"].shape == pred["labels_full_truth"].shape == (1500, 20)


@pytest.mark.parametrize("method", ["mean_teacher", "le_mean_teacher"])
def test_two_network_methods_report_teacher_and_student(method, runs):
    m = json.loads((runs[method][1] / "metrics.json").read_text())
    states = torch.load(runs[method][1] / "model.pt", weights_only=True)["networks"]
    assert "f1_macro" in m["test_student"]
    assert not all(torch.equal(states["teacher"][k], states["student"][k]) for k in states["teacher"])


@pytest.mark.parametrize("method", ["label_enhance", "le_mean_teacher"])
def test_label_enhancement_records_its_mask(method, runs):
    e = json.loads((runs[method][1] / "metrics.json").read_text())["enhancement"]
    assert e["gamma"] == 10
    assert 0 < e["masked"] < e["missing"]
    assert 0 <= e["masked_precision"] <= 1 and 0 <= e["masked_recall"] <= 1
    assert len(e["per_class"]) == 20
