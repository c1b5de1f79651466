"""The model and the methods: their pieces on hand-made cases, their training steps (no host sync, so
--fast can capture them), the learning-rate history, label enhancement's teacher selection, inputs at
odd scales, le_mean_teacher.py's copies, and, where CUDA is present, --fast against the eager run."""

import argparse
import inspect
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import common
import em
import gr_loss
import label_enhance
import large_loss
import le_mean_teacher
import mean_teacher
import selective
from benchmarks import fast_vs_eager
from tests.conftest import METHODS, ROOT, call, metrics_of, ok, run_dirs, write_h5, write_scaled_h5

#####  The model  ###########################################################################################


@pytest.fixture
def model():
    torch.manual_seed(0)
    return common.AttentionMIL(128, 20, layers=3, hidden=128, dropout=0.6).eval()


def test_model_has_the_papers_size_and_init(model):
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 60_000
    assert all(linear.bias is None for linear, _ in model.blocks)
    assert torch.all(model.attention.bias == 0)
    assert torch.all(model.classifier.bias == 0)


def test_model_gives_one_probability_per_clip_and_class(model):
    p = model(torch.randn(4, 10, 128))
    assert p.shape == (4, 20)
    assert ((p > 0) & (p < 1)).all()
    assert common.AttentionMIL(512, 23, layers=1, hidden=512)(torch.randn(3, 11, 512)).shape == (3, 23)


def test_attention_pooling_of_one_frame_is_that_frames_score(model):
    x = torch.randn(4, 1, 128)
    h = model._bn(model.input_bn, x)
    for linear, bn in model.blocks:
        h = torch.relu(model._bn(bn, linear(h)))
    h = h + x
    assert torch.allclose(model(x), torch.sigmoid(model.classifier(h))[:, 0], atol=1e-6)


def test_saturated_classifier_keeps_the_output_in_0_1():
    torch.manual_seed(0)
    model = common.AttentionMIL(16, 5, layers=1, hidden=16, dropout=0.0).eval()
    with torch.no_grad():
        model.classifier.bias.fill_(60.0)  # sigmoid = 1.0 exactly
        model.attention.weight.normal_(0, 3)  # uneven weights: their sum is 1 + eps
    p = model(torch.randn(256, 10, 16) * 100)
    assert ((p >= 0) & (p <= 1)).all()
    assert (p == 1).any()


#####  Method pieces by hand  ###############################################################################


def test_enhanced_mask_by_hand():
    observed = torch.tensor([[1, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 1, 1]], dtype=torch.bool)
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.5, 0.2], [0.1, 0.5, 0.3], [0.4, 0.5, 0.4], [0.6, 0.2, 0.5]])
    enhanced, info = label_enhance.enhance_mask(scores, observed, gamma=50)
    # class 0: missing rows 1-4 score .8 .1 .4 .6; k = 2 stay masked (.8, .6), tau = .6; .1 and .4 -> negatives
    assert info[0] == dict(tau=pytest.approx(0.6), missing=4, masked=2)
    assert enhanced[:, 0].tolist() == [True, False, True, True, False]
    # class 1: four tied missing scores: k = 2, but ties at tau all stay masked (Eq. 1 reads score >= tau)
    assert info[1]["masked"] == 4
    assert enhanced[:, 1].tolist() == [False, False, False, False, True]
    # class 2: no missing label: nothing to do
    assert info[2] == dict(tau=None, missing=0, masked=0)


def test_enhanced_mask_edge_cases():
    observed = torch.tensor([[1], [0], [0], [0], [0]], dtype=torch.bool)
    scores = torch.tensor([[0.9], [0.8], [0.1], [0.4], [0.6]])
    assert torch.equal(label_enhance.enhance_mask(scores, observed, 0)[0], observed)  # gamma 0 = B1
    assert label_enhance.enhance_mask(scores, observed, 100)[0].all()  # gamma 100 = B0
    assert label_enhance.enhance_mask(scores, observed, 10)[1][0]["masked"] == 4  # round(0.9 * 4) = 4
    one = label_enhance.enhance_mask(scores[:2], observed[:2], 90)  # round(0.1 * 1) = 0: masks none
    assert one[1][0]["masked"] == 0  # (the paper's code masked them all)
    assert one[0].all()


def test_one_ema_update_by_hand():
    teacher, student = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 6.0])]
    step = torch.zeros(())
    mean_teacher.ema_update(teacher, student, step, ema_decay=0.99)
    assert step.item() == 1
    assert torch.allclose(teacher[0], torch.tensor([2.0, 4.0]))  # t = 1: alpha = min(1 - 1/2, 0.99) = 0.5
    step.fill_(1000)
    mean_teacher.ema_update(teacher, student, step, ema_decay=0.99)  # alpha = 0.99 from then on
    assert torch.allclose(teacher[0], 0.99 * torch.tensor([2.0, 4.0]) + 0.01 * torch.tensor([3.0, 6.0]))


@pytest.mark.parametrize(
    "name, origin",
    [
        ("enhance_mask", label_enhance),
        ("percentage", label_enhance),
        ("enhancement_report", label_enhance),
        ("ema_tensors", mean_teacher),
        ("make_teacher", mean_teacher),
        ("ema_update", mean_teacher),
    ],
)
def test_le_mean_teachers_copies_match_their_originals(name, origin):
    assert inspect.getsource(getattr(le_mean_teacher, name)) == inspect.getsource(getattr(origin, name))


#####  The later methods: which labels their losses reject, flip or ignore  ####################################


def test_large_loss_rejects_the_missing_labels_with_the_largest_loss():
    loss = torch.tensor([[0.9, 0.1, 2.0, 0.3], [1.5, 0.2, 0.05, 0.8]])
    missing = torch.tensor([[True, True, False, True], [True, False, True, True]])
    # rate 0.25 of 8 labels: 2 rejected, the two largest missing losses (2.0 is observed: never rejected)
    large = large_loss.large_loss_labels(loss, missing, torch.tensor(0.25))
    assert large.tolist() == [[True, False, False, False], [True, False, False, False]]


def test_large_loss_rejects_none_at_rate_0_and_never_an_observed_label():
    loss = torch.rand(4, 5)
    missing = torch.rand(4, 5) < 0.5
    assert not large_loss.large_loss_labels(loss, missing, torch.tensor(0.0)).any()
    assert torch.equal(large_loss.large_loss_labels(loss, missing, torch.tensor(1.0)), missing)


def test_large_loss_ties_at_the_threshold_are_all_rejected():
    loss = torch.tensor([[0.5, 0.5, 0.5, 0.1]])
    missing = torch.ones(1, 4, dtype=torch.bool)
    large = large_loss.large_loss_labels(loss, missing, torch.tensor(0.25))  # k = 1, three tie at 0.5
    assert large.tolist() == [[True, True, True, False]]


@pytest.mark.parametrize("correction", [False, True])
def test_large_loss_changes_the_rejected_labels_and_nothing_else(correction):
    p = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.7, 0.3]])
    y = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    missing = torch.tensor([[True, True, False], [True, True, True]])
    bce = torch.nn.functional.binary_cross_entropy(p, y, reduction="none")
    loss, large = large_loss.large_loss_matrix(p, bce, missing, torch.tensor(2 / 6), correction)
    assert large.tolist() == [[True, False, False], [False, True, False]]  # p 0.9 and 0.7: the largest BCE(p, 0)
    replaced = -torch.log(p[large]) if correction else torch.zeros(2)  # LL-Ct: taken as positive
    assert torch.allclose(loss[large], replaced)
    assert torch.equal(loss[~large], bce[~large])


def test_large_loss_schedule_is_the_papers_stretched_to_the_run():
    assert large_loss.rejection_rate(1, 100, 0.2) == 0
    assert large_loss.rejection_rate(11, 100, 0.2) == pytest.approx(0.002)  # 10% of training: one paper epoch
    assert large_loss.rejection_rate(2, 10, 0.2) == pytest.approx(0.002)  # 10 epochs: the paper's own rule


def test_selective_weights_ignore_prior_classes_and_the_likeliest_missing_labels():
    p = torch.tensor([[0.9, 0.2, 0.6, 0.1], [0.3, 0.95, 0.4, 0.05]])
    observed = torch.tensor([[True, False, False, False], [False, True, False, False]])
    ignored_class = torch.tensor([False, False, False, True])  # class 3: its missing labels are ignored
    w = selective.selective_weights(p, observed, ignored_class, likelihood_topk=1)
    # top 1 x 2 clips = 2 likeliest missing labels: (0, 2) p 0.6 and (1, 2) p 0.4; observed labels count
    assert w.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]


def test_partial_asymmetric_loss_by_hand():
    p = torch.tensor([[0.8, 0.3, 0.5]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 0.0]])
    observed = torch.tensor([[True, True, False]])
    loss = selective.partial_asymmetric_loss(p, y, observed, torch.ones(1, 3), 0.0, 1.0, 4.0)
    expected = [-np.log(0.8), -(0.3**1) * np.log(0.7), -(0.5**4) * np.log(0.5)]
    assert loss.detach()[0].tolist() == pytest.approx(expected, rel=1e-6)
    loss.sum().backward()  # the focusing weights are constants: d/dp of -(0.3) log(1 - p) is 0.3 / 0.7
    assert p.grad[0, 1].item() == pytest.approx(0.3 / 0.7, rel=1e-5)


def test_partial_asymmetric_loss_leaves_ignored_labels_out():
    p = torch.full((2, 3), 0.4)
    observed = torch.zeros(2, 3, dtype=torch.bool)
    weights = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    loss = selective.partial_asymmetric_loss(p, torch.zeros(2, 3), observed, weights, 0.0, 1.0, 4.0)
    assert (loss[weights == 0] == 0).all() and (loss[weights == 1] > 0).all()


def em_case():
    p = torch.tensor([[0.8, 0.3, 0.5, 0.1]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    observed = torch.tensor([[1.0, 1.0, 0.0, 0.0]])  # a positive, an observed negative, two missing labels
    return p, y, observed


def test_em_trains_observed_labels_by_bce_and_missing_ones_towards_uncertainty():
    p, y, observed = em_case()
    none = torch.zeros(1, 4)
    loss = em.em_loss_matrix(p, y, observed, none, none, entropy_weight=0.1, apl_weight=0.9)
    entropy = [-(q * np.log(q + 1e-5) + (1 - q) * np.log(1 - q + 1e-5)) for q in (0.5, 0.1)]
    expected = [-np.log(0.8), -np.log(0.7), -0.1 * entropy[0], -0.1 * entropy[1]]
    assert loss.detach()[0].tolist() == pytest.approx(expected, rel=1e-5)
    loss.sum().backward()  # entropy maximised: a missing label at 0.5 gets no push, one at 0.1 is pulled up
    assert p.grad[0, 2].item() == pytest.approx(0.0, abs=1e-5)
    assert p.grad[0, 3].item() < 0


def test_em_apl_soft_negatives_replace_the_entropy_term_and_nothing_else():
    p, y, observed = em_case()
    soft = torch.tensor([[0.0, 0.0, 0.0, 1.0]])  # the last missing label is a soft negative, target 0.05
    target = torch.tensor([[0.0, 0.0, 0.0, 0.05]])
    plain = em.em_loss_matrix(p, y, observed, torch.zeros(1, 4), torch.zeros(1, 4), 0.1, 0.9)
    loss = em.em_loss_matrix(p, y, observed, soft, target, 0.1, 0.9)
    assert loss[0, 3].item() == pytest.approx(0.9 * -(0.05 * np.log(0.1) + 0.95 * np.log(0.9)), rel=1e-5)
    assert torch.equal(loss[0, :3], plain[0, :3])


def test_apl_picks_the_lowest_scored_missing_labels_of_each_class_once():
    scores = torch.tensor([[0.1, 0.9], [0.2, 0.05], [0.3, 0.5], [0.05, 0.6]])
    observed = torch.tensor([[False, False], [False, False], [False, True], [True, False]])
    soft = torch.zeros(4, 2, dtype=torch.bool)
    target = torch.zeros(4, 2, dtype=torch.float16)
    assert em.pick_soft_negatives(scores, observed, soft, target, torch.tensor([1.0, 2.0])) == 3
    # class 0: the lowest missing one is 0.1 (0.05 is observed); class 1: 0.05 and 0.6
    assert soft.tolist() == [[True, False], [False, True], [False, False], [False, True]]
    assert target[1, 1].item() == pytest.approx(0.05, rel=1e-3)
    # the next ones, never one twice: class 0's 0.2, and class 1's one left (0.9), though 2 were asked for
    assert em.pick_soft_negatives(scores, observed, soft, target, torch.tensor([1.0, 2.0])) == 2
    assert soft.tolist() == [[True, True], [True, True], [False, False], [False, True]]


def test_gr_loss_by_hand():
    p = torch.tensor([[0.8, 0.3, 0.6]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 0.0]])
    observed = torch.tensor([[1.0, 1.0, 0.0]])
    w, b, mu, sigma = (torch.tensor(v) for v in (2.0, -2.0, 0.8, 0.5))
    loss = gr_loss.gr_loss_matrix(p, y, observed, w, b, mu, sigma, q2=0.01, q3=1.0)
    k = 1 / (1 + np.exp(-(2 * 0.6 - 2)))
    v = np.exp(-0.5 * ((0.6 - 0.8) / 0.5) ** 2)
    missing = v * (k * (1 - (0.6 + 1e-7) ** 0.01) / 0.01 + (1 - k) * 0.6)
    assert loss.detach()[0].tolist() == pytest.approx([-np.log(0.8), -np.log(0.7), missing], rel=1e-5)
    loss.sum().backward()  # K and V are constants: d/dp of v (k L1 + (1 - k) p) only
    grad = v * (k * -((0.6 + 1e-7) ** (0.01 - 1)) + (1 - k))
    assert p.grad[0, 2].item() == pytest.approx(grad, rel=1e-4)


def test_gr_schedules_at_their_ends_are_the_official_ones():
    assert gr_loss.schedule(1, 100, 0.0, 2.0, offset=1) == 0.0  # w at the first epoch
    assert gr_loss.schedule(100, 100, 0.0, 2.0, offset=1) == pytest.approx(1.98)  # (E - 1) / E of the way
    assert gr_loss.schedule(1, 100, 0.5, 0.8, offset=0) == pytest.approx(0.503)  # mu: 1 / E of the way at once
    assert gr_loss.schedule(100, 100, 0.5, 0.8, offset=0) == pytest.approx(0.8)
    assert gr_loss.schedule(4, 8, 0.5, 0.8, offset=0) == gr_loss.schedule(50, 100, 0.5, 0.8, offset=0)  # same share


@pytest.mark.parametrize("text, expected", [("0,2", (0.0, 2.0)), ("-2,-1", (-2.0, -1.0)), ("3", (3.0, 3.0))])
def test_gr_schedule_pairs_read_first_and_last(text, expected):
    assert gr_loss.pair()(text) == expected


@pytest.mark.parametrize("text", ["", "1,2,3", "a,1", "nan,1", "1,inf", "0,1e9", ","])
def test_gr_schedule_pairs_refuse_what_is_not_two_finite_numbers(text):
    with pytest.raises(argparse.ArgumentTypeError, match="FIRST,LAST"):
        gr_loss.pair()(text)
    with pytest.raises(argparse.ArgumentTypeError):  # sigma must stay positive: V divides by it
        gr_loss.pair(1e-3)("0,1")


def test_boost_scales_the_positive_frame_scores_only_and_is_saved_with_the_model():
    torch.manual_seed(0)
    plain = common.AttentionMIL(16, 3, layers=1, hidden=16).eval()
    boosted = common.AttentionMIL(16, 3, layers=1, hidden=16, positive_boost=5.0).eval()
    boosted.load_state_dict(plain.state_dict())
    x = torch.randn(4, 6, 16)
    h = plain.input_bn(x.reshape(-1, 16)).view(x.shape)  # the head's frame logits, recomputed by hand
    for linear, bn in plain.blocks:
        h = torch.relu(plain._bn(bn, linear(h)))
    h = h + plain.shortcut(x)
    att = torch.sigmoid(plain.attention(h)).clamp(1e-7, 1 - 1e-7)
    att = att / att.sum(dim=1, keepdim=True)
    logits = plain.classifier(h)
    expected = (att * torch.sigmoid(torch.where(logits > 0, 5 * logits, logits))).sum(1).clamp(0, 1)
    assert torch.allclose(boosted(x), expected, atol=1e-6)
    assert torch.allclose(plain(x), (att * torch.sigmoid(logits)).sum(1).clamp(0, 1), atol=1e-6)
    assert boosted.config["positive_boost"] == 5.0 and "positive_boost" not in plain.config


#####  The training step: no host sync, so a CUDA graph can capture it  ######################################


def untraced(f, *args, **kwargs):
    with _disable_current_modes():
        return f(*args, **kwargs)


SYNCS = {
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::is_nonzero",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::equal",
}


HOST_DATA = {"aten::lift_fresh", "aten::lift_fresh_copy"}  # a tensor made from Python data: on CUDA, a copy


def bool_index(args):
    """A boolean mask among an index operator's indices: its output size is the mask's count (a sync)."""
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else []
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in indices)


class SyncTrap(TorchDispatchMode):
    """Records every operator that reads a device value on the host, whose output size depends on one (boolean
    mask indexing among them), or that brings host data into the step (a host-to-device copy on CUDA)."""

    def __init__(self):
        super().__init__()
        self.syncs, self.ops = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = func._schema.name
        if name in SYNCS or name in HOST_DATA:
            self.syncs.append(name)
        elif name in ("aten::index", "aten::index_put", "aten::index_put_") and bool_index(args):
            self.syncs.append(f"{name} with a boolean mask")
        elif name == "aten::_to_copy" and kwargs and kwargs.get("device") not in (None, args[0].device):
            self.syncs.append("aten::_to_copy to another device")
        return func(*args, **(kwargs or {}))


def test_the_trap_sees_item_and_float():
    with SyncTrap() as trap:
        t = torch.ones(3).sum()
        float(t)
        t.item()
    assert trap.syncs == ["aten::_local_scalar_dense"] * 2


def test_the_trap_sees_data_dependent_shapes_and_host_data():
    x = torch.arange(6.0)
    with SyncTrap() as trap:
        x[x > 2]  # boolean mask: its size is known only after a sync
        x.nonzero()
        x + torch.tensor([1.0])  # host data: a host-to-device copy on CUDA
    assert trap.syncs == ["aten::index with a boolean mask", "aten::nonzero", "aten::lift_fresh"]


@pytest.mark.parametrize("method", METHODS)
def test_training_step_makes_no_host_sync(method, tmp_path, h5, monkeypatch):
    """Every step of every stage, traced once: forward, loss, backward and EMA; the optimizer's own step is
    left out (CPU Adam is not capturable; --fast swaps in fused, capturable Adam)."""
    traced = []

    def trace_first_call(step, example_batch, device, enabled, state=()):
        optimizers = [s for s in state if isinstance(s, torch.optim.Optimizer)]
        done = []

        def traced_step(*batch):
            if done:
                return step(*batch)
            done.append(True)
            reals = [opt.step for opt in optimizers]
            for opt, real in zip(optimizers, reals):  # the optimizer's own step runs untraced
                opt.step = lambda *a, real=real, **k: untraced(real, *a, **k)
            with SyncTrap() as trap:
                loss = step(*batch)
            for opt, real in zip(optimizers, reals):
                opt.step = real
            traced.append(trap)
            return loss

        return traced_step

    monkeypatch.setattr(common, "fast_step", trace_first_call)
    ok(call(f"{method}.py", "--dataset", h5, "--epochs", 1, "--out", tmp_path))
    assert len(traced) == (2 if method in ("label_enhance", "le_mean_teacher", "selective") else 1)
    for trap in traced:
        assert trap.ops > 50  # the whole step was traced
        assert trap.syncs == []


def test_ema_update_makes_no_host_sync():
    net = common.AttentionMIL(16, 5, layers=1, hidden=16)
    teacher, student = mean_teacher.ema_tensors(net), mean_teacher.ema_tensors(common.AttentionMIL(16, 5, 1, 16))
    with SyncTrap() as trap:
        mean_teacher.ema_update(teacher, student, torch.zeros(()), 0.999)
    assert trap.syncs == []
    assert trap.ops > len(teacher)


#####  The learning rate: halved every 30 epochs, recorded before the scheduler halves it  ###################


def check_lr(folder):
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "check_lr.py"), str(folder)], capture_output=True, text=True
    )


def test_tensor_learning_rate_is_recorded_for_its_own_epoch(tmp_path, h5, monkeypatch):
    """--fast makes the learning rate a float32 tensor that the scheduler updates in place; on the CPU the
    same happens with a tensor learning rate and foreach off."""
    adam = torch.optim.Adam
    monkeypatch.setattr(
        torch.optim, "Adam", lambda params, lr, **kw: adam(params, lr=torch.tensor(lr), foreach=False, **kw)
    )
    ok(call("b1.py", "--dataset", h5, "--epochs", 32, "--out", tmp_path))
    lrs = [e["lr"] for e in metrics_of(tmp_path)["history"]]
    assert lrs[29] == pytest.approx(1e-3, rel=1e-6)  # epoch 30
    assert lrs[30] == pytest.approx(5e-4, rel=1e-6)  # epoch 31
    assert lrs[29] != 1e-3  # it was float32 indeed
    p = ok(check_lr(run_dirs(tmp_path)[0]))
    assert "halved at epochs 31" in p.stdout


def test_check_lr_refuses_a_wrong_schedule(tmp_path, h5):
    ok(call("b1.py", "--dataset", h5, "--epochs", 62, "--out", tmp_path))
    folder = run_dirs(tmp_path)[0]
    assert "halved at epochs 31, 61" in ok(check_lr(folder)).stdout
    m = json.loads((folder / "metrics.json").read_text())
    m["history"][40]["lr"] = m["history"][20]["lr"]  # a schedule that kept the first rate too long
    (folder / "metrics.json").write_text(json.dumps(m))
    assert check_lr(folder).returncode == 1
    (folder / "metrics.json").write_text("{")
    assert check_lr(folder).returncode == 2


#####  Label enhancement's teacher selection  ###############################################################


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    out = tmp_path_factory.mktemp("le")
    b0 = ok(call("label_enhance.py", "--epochs", 4, "--out", out))
    observed = ok(call("label_enhance.py", "--epochs", 4, "--out", out, "--teacher-selection", "observed"))
    return (
        metrics_of(out, "synthetic__label_enhance__seed0__epochs4")["stage1"],
        metrics_of(out, "synthetic__label_enhance__seed0__epochs4__teacher-observed")["stage1"],
        observed.stderr,
        b0.stderr,
    )


@pytest.mark.parametrize("rule", ["b0", "observed"])
def test_le_teacher_is_the_epoch_with_the_lowest_loss_of_its_rule(rule, teachers):
    t = teachers[0] if rule == "b0" else teachers[1]
    losses = [e[f"val_loss_{rule}"] for e in t["history"]]
    assert t["selection"] == rule
    assert t["best_epoch"] == 1 + int(np.argmin(losses))
    assert t[f"val_loss_{rule}"] == min(losses)


def test_a_teacher_selected_at_epoch_1_warns_and_no_other(teachers):
    for teacher, warned in ((teachers[0], teachers[3]), (teachers[1], teachers[2])):
        assert ("selected at epoch 1" in warned) == (teacher["best_epoch"] == 1)


#####  Odd inputs that must still train  ####################################################################


def test_batches_without_observed_labels_give_no_nan(tmp_path):
    path = write_h5(tmp_path / "sparse.h5", observed_share=0.0)  # most rows have no observed label
    for method in ("b1", "mean_teacher"):
        ok(call(f"{method}.py", "--dataset", path, "--epochs", 2, "--batch-size", 1, "--out", tmp_path / method))
        assert all(np.isfinite(e["train_loss"]) for e in metrics_of(tmp_path / method)["history"])


@pytest.mark.parametrize("method", ["b1", "label_enhance", "mean_teacher"])
@pytest.mark.parametrize("kind", ["raw bytes", "floats x 1e4"])
def test_raw_bytes_and_large_floats_train(method, kind, tmp_path):
    path = write_scaled_h5(tmp_path / "x.h5", *((np.uint8, 1) if kind == "raw bytes" else (np.float32, 1e4)))
    ok(call(f"{method}.py", "--dataset", path, "--epochs", 3, "--batch-size", 8, "--out", tmp_path))
    pred = np.load(run_dirs(tmp_path)[0] / "test_predictions.npz")["scores"]
    assert ((pred >= 0) & (pred <= 1)).all()


#####  --fast against the eager run: the comparison, with CPU stand-ins for the faults it must catch  #######


def shifted_generator(step, example_batch, device, enabled, state=()):
    """In place of common.fast_step: one random draw too many, as a graph that did not restore the generator."""
    torch.rand(1, device=device)
    return step


def frozen_learning_rate(step, example_batch, device, enabled, state=()):
    """In place of common.fast_step: every step trains at the first rate while the scheduler's halvings are
    still recorded, as a graph that captured the rate as a number would."""
    optimizer = next(s for s in state if isinstance(s, torch.optim.Optimizer))
    first = [group["lr"] for group in optimizer.param_groups]

    def stale_step(*batch):
        scheduled = [group["lr"] for group in optimizer.param_groups]
        for group, lr in zip(optimizer.param_groups, first):
            group["lr"] = lr
        loss = step(*batch)
        for group, lr in zip(optimizer.param_groups, scheduled):
            group["lr"] = lr
        return loss

    return stale_step


@pytest.mark.parametrize("method", ["b1", "mean_teacher", "selective"])
def test_the_fast_comparison_catches_a_shifted_generator(method, tmp_path, h5):
    argv = ["--dataset", h5, "--epochs", 3, "--device", "cpu"]
    reference = fast_vs_eager.histories(fast_vs_eager.train(method, argv, tmp_path / "a"))
    same = fast_vs_eager.histories(fast_vs_eager.train(method, argv, tmp_path / "b"))
    shifted = fast_vs_eager.train(method, argv, tmp_path / "c", fast_step=shifted_generator)
    assert fast_vs_eager.worst_difference(reference, same)[0] == 0
    assert fast_vs_eager.worst_difference(reference, fast_vs_eager.histories(shifted))[0] > fast_vs_eager.RNG_TOLERANCE


def test_the_fast_comparison_catches_a_frozen_learning_rate(tmp_path, h5):
    argv = ["--dataset", h5, "--epochs", 32, "--device", "cpu"]
    reference = fast_vs_eager.train("b1", argv, tmp_path / "a")
    frozen = fast_vs_eager.train("b1", argv, tmp_path / "b", fast_step=frozen_learning_rate)
    assert [e["lr"] for e in frozen["history"]] == [e["lr"] for e in reference["history"]]  # the record hides it
    assert fast_vs_eager.worst_difference(reference["history"][:30], frozen["history"][:30])[0] == 0
    difference, epoch, _ = fast_vs_eager.worst_difference(reference["history"], frozen["history"])
    assert difference > fast_vs_eager.SCHEDULE_TOLERANCE and epoch >= 31


#####  CUDA: --fast against the eager run (skipped, and said so, without a GPU; benchmarks/gpu_check.sh)  ##


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["b1", "mean_teacher"])
def test_cuda_fast_draws_the_eager_dropout_masks(method, tmp_path):
    """The RNG path at the default dropout (the tolerance's reasons: benchmarks/fast_vs_eager.py)."""
    argv = ["--epochs", 3, "--device", "cuda"]
    eager = fast_vs_eager.histories(fast_vs_eager.train(method, argv, tmp_path / "eager"))
    fast = fast_vs_eager.histories(fast_vs_eager.train(method, argv + ["--fast"], tmp_path / "fast"))
    difference, epoch, key = fast_vs_eager.worst_difference(eager, fast)
    print(f"{method}: worst relative difference {difference:.2e} (epoch {epoch}, {key})")
    assert difference <= fast_vs_eager.RNG_TOLERANCE


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["b1", "mean_teacher"])
def test_cuda_fast_follows_the_schedule_of_the_same_adam(method, tmp_path):
    """The schedule path past the halving at epoch 31, against an eager run with the same fused, capturable
    Adam and tensor learning rate; then the learning-rate history and model.pt on the CPU."""
    argv = ["--epochs", 32, "--device", "cuda"]
    same_adam = fast_vs_eager.train(method, argv, tmp_path / "eager", fast_step=fast_vs_eager.capturable_eager)
    fast = fast_vs_eager.train(method, argv + ["--fast"], tmp_path / "fast")
    difference, epoch, key = fast_vs_eager.worst_difference(same_adam["history"], fast["history"])
    print(f"{method}: worst relative difference {difference:.2e} (epoch {epoch}, {key})")
    assert difference <= fast_vs_eager.SCHEDULE_TOLERANCE
    folder = run_dirs(tmp_path / "fast")[0]
    ok(check_lr(folder))
    states = torch.load(folder / "model.pt", weights_only=True)["networks"]
    assert all(t.device.type == "cpu" for s in states.values() for t in s.values())
