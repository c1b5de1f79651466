"""Metrics: the paper's F1 and AUPRC, average precision, calibration and the official DCASE metric, each
against scikit-learn, a hand-computed case or an independent computation."""

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

import common
import sonyc
from tests.conftest import call, ok, run_dirs, write_h5


def paper_area(y, s):
    """The paper code's AUPRC, computed independently: at each distinct score, descending, the precision and
    recall of 'score >= t'; the curve from (R 0, P 1) through them to (R 1, P 0); the trapezoid area."""
    y, s = np.asarray(y, bool), np.asarray(s, float)
    R, P = [0.0], [1.0]
    for t in np.unique(s)[::-1]:
        pred = s >= t
        R.append((y & pred).sum() / y.sum())
        P.append((y & pred).sum() / pred.sum())
    R, P = np.array(R + [1.0]), np.array(P + [0.0])
    return float(np.sum(np.diff(R) * (P[1:] + P[:-1]) / 2))


def test_f1_is_the_mean_of_present_and_absent_f1_by_hand():
    y = np.array([[1], [1], [0], [0], [1]])
    p = np.array([[0.9], [0.2], [0.6], [0.1], [0.7]])  # predicted present: clips 0, 2, 4
    out = common.classwise_f1(p, y, np.ones_like(y, bool), ["a"], np.ones(1, bool))
    # present: TP 2, FP 1, FN 1 -> F1 2/3; absent: TP 1 (clip 3), FP 1 (clip 1), FN 1 (clip 2) -> F1 1/2
    assert out["f1_pos_macro"] == pytest.approx(2 / 3)
    assert out["f1_macro"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_classwise_f1_by_hand_with_a_class_without_labels():
    scores = np.array([[0.9, 0.2, 0.7], [0.8, 0.6, 0.1], [0.3, 0.4, 0.9], [0.1, 0.1, 0.2]])
    Y = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 1], [0, 0, 0]])
    mask = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 0, 0]], bool)
    out = common.classwise_f1(scores, Y, mask, ["a", "b", "c"], np.array([True, True, True]))
    assert out["per_class_f1_macro"]["a"] == 1
    # class b on 3 entries: y 0,1,1  pred 0,1,0 -> present F1 2/3, absent F1 2/3
    assert out["per_class_f1_pos"]["b"] == pytest.approx(2 / 3)
    assert out["per_class_f1_macro"]["b"] == pytest.approx(2 / 3)
    assert np.isnan(out["per_class_f1_macro"]["c"])  # no observed entry: NaN
    assert out["f1_macro"] == pytest.approx((1 + 2 / 3) / 2)  # and left out of the mean


def test_paper_auprc_is_not_average_precision():
    y, s = np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.4, 0.1])
    assert common.pr_area(y, s) == pytest.approx(0.791667, abs=1e-6)
    assert paper_area(y, s) == pytest.approx(0.791667, abs=1e-6)
    assert average_precision_score(y, s) == pytest.approx(0.833333, abs=1e-6)


def test_paper_auprc_matches_an_independent_computation_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = rng.integers(5, 60)
        y = rng.integers(0, 2, n)
        y[0] = 1
        s = rng.integers(0, 6, n) / 5.0  # few distinct values: many ties
        assert common.pr_area(y, s) == pytest.approx(paper_area(y, s), abs=1e-12)


def test_ranking_metrics_use_the_observed_entries_only():
    rng = np.random.default_rng(1)
    scores, Y = rng.random((40, 3)), rng.integers(0, 2, (40, 3))
    mask = rng.random((40, 3)) < 0.6
    out = common.ranking_metrics(scores, Y, mask, ["a", "b", "c"], np.ones(3, bool))
    per_ap = [average_precision_score(Y[mask[:, c], c], scores[mask[:, c], c]) for c in range(3)]
    per_area = [paper_area(Y[mask[:, c], c], scores[mask[:, c], c]) for c in range(3)]
    assert out["ap_macro_masked"] == pytest.approx(np.mean(per_ap))
    assert out["ap_micro_masked"] == pytest.approx(average_precision_score(Y[mask], scores[mask]))
    assert out["auprc_macro_masked"] == pytest.approx(np.mean(per_area), abs=1e-12)
    assert out["auprc_micro_masked"] == pytest.approx(paper_area(Y[mask], scores[mask]), abs=1e-12)


def independent(npz):
    """The threshold-free and calibration metrics of a run, from its test_predictions.npz alone."""
    s, y, obs = npz["scores"], npz["labels"], npz["observed"]
    cols = [c for c in range(s.shape[1]) if y[obs[:, c], c].any()]
    out = dict(
        auprc_macro_masked=np.mean([paper_area(y[obs[:, c], c], s[obs[:, c], c]) for c in cols]),
        ap_macro_masked=np.mean([average_precision_score(y[obs[:, c], c], s[obs[:, c], c]) for c in cols]),
        scored_present_share=(s >= 0.5).mean(),
        present_share_masked=y[obs].mean(),
    )
    if "labels_full_truth" in npz.files:
        full = npz["labels_full_truth"]
        out["ap_macro_full_truth"] = np.mean(
            [average_precision_score(full[:, c], s[:, c]) for c in range(s.shape[1]) if full[:, c].any()]
        )
        out["present_share_full_truth"] = full.mean()
    return out


@pytest.mark.parametrize("dataset", ["synthetic", "openmic", "h5", "h5 with Y_full"])
def test_run_metrics_equal_an_independent_computation_from_the_predictions(dataset, tmp_path, openmic):
    args = dict(
        synthetic=[],
        openmic=["--dataset", "openmic", "--data-dir", tmp_path],
        h5=["--dataset", write_h5(tmp_path / "a.h5")],
        **{"h5 with Y_full": ["--dataset", write_h5(tmp_path / "b.h5", full_truth=True)]},
    )[dataset]
    ok(call("b1.py", *args, "--epochs", 1, "--out", tmp_path / "o"))
    folder = run_dirs(tmp_path / "o")[0]
    test = json.loads((folder / "metrics.json").read_text())["test"]
    expected = independent(np.load(folder / "test_predictions.npz"))
    assert ("ap_macro_full_truth" in expected) == (dataset in ("synthetic", "h5 with Y_full"))
    for key, value in expected.items():
        assert test[key] == pytest.approx(value, abs=1e-9), key


#####  The official DCASE 2020 Task 5 metric (sonyc.py)  ##################################################


def dcase(scores, fine_truth, x_truth, coarse_truth, level="fine"):
    extra = dict(
        fine_truth=np.array(fine_truth, bool),
        x_truth=np.array(x_truth, bool),
        coarse_truth=np.array(coarse_truth, bool),
    )
    taxonomy = dict(coarse_names=["1_a", "2_b"], fine_group=np.array([0, 0, 1]))
    return sonyc.dcase_metrics(np.array(scores, float), extra, taxonomy, level)


def test_dcase_perfect_inverted_and_tied_scores():
    truth = [[1, 0, 1], [0, 1, 0], [0, 0, 1], [1, 1, 0]]
    coarse = [[1, 1], [1, 0], [0, 1], [1, 0]]
    x = [[0, 0]] * 4
    assert all(v == pytest.approx(1.0) for v in dcase(truth, truth, x, coarse).values())
    inverted = dcase(1 - np.array(truth), truth, x, coarse)
    assert inverted["dcase_fine_macro_auprc"] == 0
    assert inverted["dcase_fine_micro_auprc"] == 0
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
    thr, counts = sonyc._group_counts(
        np.array(scores)[:, :2], np.array(fine_truth, bool)[:, :2], np.array(x_truth, bool)[:, 0], fine=True
    )
    assert thr.tolist() == [1.0, 0.8]
    assert counts.tolist() == [[0, 0, 2], [2, 1, 0]]
    # AUPRC group 1: (0,1) (0,0) (1,2/3) (1,0) -> 1/3; group 2: (0,1) (0,0) (1,1) (1,1/2) (1,0) -> 1/2
    m = dcase(scores, fine_truth, x_truth, coarse_truth)
    assert m["dcase_fine_macro_auprc"] == pytest.approx((1 / 3 + 1 / 2) / 2, abs=1e-9)
    # micro over the union {0.3, 0.8, 0.9, 1.0}: (3,2,0) (3,1,0) (1,0,2) (0,0,3) -> area 1/6 + 8/15
    assert m["dcase_fine_micro_auprc"] == pytest.approx(0.7, abs=1e-9)
    assert m["dcase_micro_f1"] == pytest.approx(6 / 7, abs=1e-9)  # at t = 0.8: P 3/4, R 1
    assert m["dcase_coarse_macro_auprc"] == pytest.approx(5 / 12, abs=1e-9)
    # without the X rules clip 2 would count as a false positive and a missed coarse positive
    no_x = dcase(scores, fine_truth, [[0, 0]] * 3, coarse_truth)
    assert no_x["dcase_fine_macro_auprc"] != pytest.approx(m["dcase_fine_macro_auprc"])
