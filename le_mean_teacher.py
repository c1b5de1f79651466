"""Label enhancement with mean-teacher training in both stages (Gururani & Lerch, Sec. VII).

The paper proposes this combination as future work; this is our implementation of it.

Stage 1 trains mean teacher where the BCE treats every missing label as a negative (as B0):
    J_1 = mean_{n,c} BCE(p_nc, y_nc) + beta * mean_{n,c} (p_nc - q_nc)^2
The stage-1 EMA teacher (selected by its own loss on the validation clips, missing = negative, as in
label_enhance.py; --teacher-selection observed for the paper code's rule) scores the missing training
labels, and Eq. (1) of label enhancement builds the enhanced mask M' (see label_enhance.py).
Stage 2 trains a fresh mean teacher with the masked BCE on M':
    J_2 = sum_{n,c} M'_nc BCE(p_nc, y_nc) / sum_{n,c} M'_nc + beta * mean_{n,c} (p_nc - q_nc)^2

Differs from B1 in both ways at once: LE's mask and MT's consistency with an EMA teacher. The three
pieces it shares with its parents are copies of label_enhance.py's and mean_teacher.py's, so this file
runs beside common.py alone; a test fails if a copy drifts from its original.

    python le_mean_teacher.py --dataset openmic --seed 0
"""

import argparse
import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# Table I of the paper: the defaults per dataset (synthetic data and .h5 files use the OpenMIC row).
TABLE_I = {
    "openmic": dict(layers=3, hidden=128, dropout=0.6, gamma=10.0, ema_decay=0.999, consistency_weight=3.0),
    "sonyc": dict(layers=1, hidden=512, dropout=0.6, gamma=95.0, ema_decay=0.99, consistency_weight=3.0),
}


# ALGO LOGIC: Eq. (1), the enhanced mask (a copy of label_enhance.py's)
def enhance_mask(scores, observed, gamma):
    """scores, observed: (N, C). Returns the enhanced observed mask (N, C) and per-class info.

    For each class, k = round((100 - gamma)% of its missing labels) stay masked: those scoring
    >= tau_c, the k-th highest score (ties at tau_c are all kept masked, as Eq. 1 reads).
    k = 0 masks none; the paper's code masked them all then (a [-0:] slice), which is wrong.
    """
    enhanced = observed.clone()
    info = []
    for c in range(observed.shape[1]):
        missing = (~observed[:, c]).nonzero().squeeze(1)  # (n_missing,)
        s = scores[missing, c]
        k = math.floor((100.0 - gamma) / 100.0 * len(s) + 0.5)  # labels to keep masked
        tau = s.topk(k).values[-1] if k > 0 else torch.tensor(math.inf, device=s.device)
        stays_masked = s >= tau  # Eq. (1): likely positive
        enhanced[missing[~stays_masked], c] = True  # now an observed negative
        info.append(dict(tau=float(tau) if k > 0 else None, missing=len(s), masked=int(stays_masked.sum())))
    return enhanced, info


# ALGO LOGIC: the EMA teacher (copies of mean_teacher.py's)
def ema_tensors(model):
    """What the teacher averages: its parameters and its floating-point buffers, the batch-norm running
    statistics among them (the input scaling is the same constant in both networks, so averaging leaves
    it unchanged). In train mode BN normalises with each batch's own statistics; the averaged running
    statistics are what BN uses in eval mode, for validation, test and prediction, and they match the
    teacher's averaged weights. (The paper's code and CuriousAI's average the parameters only.)"""
    return [p for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]


def make_teacher(model):
    """A copy of the student that never gets gradients. It runs in train mode, for its own dropout noise; BN
    momentum 0 keeps its forward passes from touching its running statistics, which come from the EMA alone."""
    teacher = copy.deepcopy(model).requires_grad_(False)
    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = 0.0
    return teacher


@torch.no_grad()
def ema_update(teacher, student, step, ema_decay):
    """One EMA step; `step` is a device tensor counting updates. Everything stays on the device: no
    .item(), no host sync, so the step can be captured in a CUDA graph (--fast)."""
    step += 1
    alpha = torch.clamp(1 - 1 / (step + 1), max=ema_decay)  # the true average early on
    weight = 1 - alpha
    for t, s in zip(teacher, student):
        t.lerp_(s, weight)  # t = alpha t + (1 - alpha) s


# ALGO LOGIC: the enhancement report (a copy of label_enhance.py's)
def enhancement_report(enhanced, per_class, train, gamma, class_names):
    """How many missing labels Eq. (1) kept masked, printed and returned; where the complete truth is known
    (synthetic data), how precisely the masked set finds the missing positives."""
    kept = int(sum(c["masked"] for c in per_class))
    n_missing = int(sum(c["missing"] for c in per_class))
    print(
        f"gamma {gamma:g}: {kept} of {n_missing} missing labels stay masked, {n_missing - kept} become negatives",
        flush=True,
    )
    report = dict(gamma=gamma, missing=n_missing, masked=kept, per_class=dict(zip(class_names, per_class)))
    if train.Y_full is not None:
        masked = ~enhanced & ~train.observed
        positive = train.Y_full & ~train.observed
        hits = (masked & positive).sum().item()
        report["masked_precision"] = hits / max(masked.sum().item(), 1)
        report["masked_recall"] = hits / max(positive.sum().item(), 1)
        print(
            f"masked set vs the truth: precision {report['masked_precision']:.3f} "
            f"recall {report['masked_recall']:.3f} of the missing positives",
            flush=True,
        )
    return report


def get_parser():
    p = argparse.ArgumentParser(
        description="Label enhancement with mean-teacher training in both stages.",
        allow_abbrev=False,
        epilog=f"Table I, the defaults per dataset (.h5 files use OpenMIC's): {TABLE_I}",
    )
    p.add_argument("--epochs", type=common.positive_int, default=100, help="training epochs (default: 100)")
    p.add_argument("--batch-size", type=common.positive_int, default=64, help="input batch size (default: 64)")
    p.add_argument(
        "--lr",
        type=common.float_in(1e-12, 10),
        default=1e-3,
        help="Adam learning rate, halved every 30 epochs (default: 0.001)",
    )
    p.add_argument("--layers", type=common.positive_int, help="hidden layers L (default: Table I, below)")
    p.add_argument("--hidden", type=common.positive_int, help="hidden width H (default: Table I, below)")
    p.add_argument("--dropout", type=common.float_in(0, 1, hi_open=True), help="dropout (default: Table I, below)")
    p.add_argument(
        "--gamma",
        type=percentage,
        help="percentile gamma, in %%, of the teacher's scores on missing labels (default: Table I, below)",
    )
    p.add_argument(
        "--ema-decay", type=common.float_in(0, 1), help="EMA decay alpha of the teacher (default: Table I, below)"
    )
    p.add_argument(
        "--consistency-weight", type=common.float_in(0, 1e6), help="consistency weight beta (default: Table I, below)"
    )
    p.add_argument(
        "--teacher-selection",
        choices=("b0", "observed"),
        default="b0",
        help="stage 1's epochs: b0 = lowest validation BCE with missing labels as negatives, the loss "
        "it trains on; observed = over observed labels only, as the paper's code (default: b0)",
    )
    return common.add_run_args(p)


def fit(args, data, device, train_mask, stage, selection, board):
    """Mean teacher with masked BCE under `train_mask` (N, C) bool; returns both networks, each at its best
    validation loss under `selection` ("observed" or "b0"), and the stage's summary."""
    train, val = data.train, data.val  # Y and observed: (N, C) bool on the device; cast a batch at a time
    # Model selection masks over the validation labels (see label_enhance.py): observed only, or B0's.
    val_y = val.Y.float()  # (N_val, C) 1 = present
    val_masks = {"observed": val.observed.float(), "b0": torch.ones_like(val_y)}
    # TRY NOT TO MODIFY: model, Adam with weight decay 1e-5, the learning rate halved every 30 epochs
    model = common.AttentionMIL(
        train.X.shape[2], train.Y.shape[1], args.layers, args.hidden, args.dropout, data.input_offset, data.input_scale
    ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.5)

    # ALGO LOGIC: the EMA teacher
    teacher = make_teacher(model)
    teacher_tensors, student_tensors = ema_tensors(teacher), ema_tensors(model)
    ema_step = torch.zeros((), device=device)

    # ALGO LOGIC: one mean-teacher step under `mask` (all ones in stage 1: B0's BCE)
    def train_step(x, y, mask):  # x (B, T, D); y, mask (B, C)
        p = model(x)  # (B, C) student, its own dropout
        with torch.no_grad():
            q = teacher(x)  # (B, C) teacher, another dropout draw
        bce = F.binary_cross_entropy(p, y, reduction="none")
        loss = (bce * mask).sum() / mask.sum().clamp(min=1) + args.consistency_weight * F.mse_loss(p, q)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema_update(teacher_tensors, student_tensors, ema_step, args.ema_decay)
        return loss.detach()

    # TRY NOT TO MODIFY: batches drawn on the device with randperm, the last partial batch dropped, their labels
    # cast to float; --fast replays the step as a CUDA graph (fastpath.py: the optimizer is made capturable in place)
    batch = min(args.batch_size, len(train.X))
    n_batches = len(train.X) // batch
    example = (train.X[:batch], train.Y[:batch].float(), train_mask[:batch].float())
    step = common.fast_step(train_step, example, device, args.fast, state=[model, teacher, optimizer, ema_step])
    history = []
    best_teacher = dict(val_loss=float("inf"), epoch=0, state=None)  # each network selected by its own
    best_student = dict(val_loss=float("inf"), epoch=0, state=None)  # validation loss under `selection`
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        model.train()
        teacher.train()
        perm = torch.randperm(len(train.X), device=device)
        total = torch.zeros((), device=device)
        for i in range(n_batches):
            idx = perm[i * batch : (i + 1) * batch]
            total += step(train.X[idx], train.Y[idx].float(), train_mask[idx].float())  # on the device: no sync
        lr = float(optimizer.param_groups[0]["lr"])  # this epoch's rate, read before the scheduler halves it
        scheduler.step()

        # model selection: each network by its own validation BCE under the `selection` mask
        entry = dict(epoch=epoch, train_loss=(total / n_batches).item(), lr=lr)  # host syncs: once an epoch
        for name, net, best in (("teacher", teacher, best_teacher), ("student", model, best_student)):
            p = common.predict(net, val.X)
            val_bce = F.binary_cross_entropy(p, val_y, reduction="none")
            for k, m in val_masks.items():
                entry[f"val_loss_{name}_{k}"] = ((val_bce * m).sum() / m.sum().clamp(min=1)).item()
            if entry[f"val_loss_{name}_{selection}"] < best["val_loss"]:
                state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                best.update(val_loss=entry[f"val_loss_{name}_{selection}"], epoch=epoch, state=state)
        entry.update(val_loss=entry[f"val_loss_teacher_{selection}"], seconds=time.time() - t0)
        history.append(entry)
        board.log(entry, stage)
        print(
            f"epoch {epoch:3d}/{args.epochs} | {stage}_train_loss {entry['train_loss']:.4f} val_loss_teacher "
            f"{entry['val_loss']:.4f} val_loss_student {entry[f'val_loss_student_{selection}']:.4f} | "
            f"{entry['seconds']:.2f}s",
            flush=True,
        )
    teacher.load_state_dict(best_teacher["state"])
    model.load_state_dict(best_student["state"])
    at_best = {k: v for k, v in history[best_teacher["epoch"] - 1].items() if k.startswith("val_loss_teacher_")}
    return (
        teacher,
        model,
        dict(
            selection=selection,
            history=history,
            best_epoch=best_teacher["epoch"],
            best_val_loss=best_teacher["val_loss"],
            best_epoch_student=best_student["epoch"],
            **at_best,
        ),
    )


def percentage(value):
    """gamma is a percentage in [0, 100]: a value in (0, 1) is most likely a share, typed by mistake."""
    v = common.float_in(0, 100)(value)
    if 0 < v < 1:
        common.warn(f"gamma {value} is a percentage: {value} means {v:g}%, not {v:.0%} (type {v * 100:g} for that)")
    return v


def main():
    # TRY NOT TO MODIFY: options, run folder, seeding, device, data
    args = common.parse_args(get_parser(), TABLE_I)
    device = common.get_device(args.device, args.threads)  # checked before the run folder is made
    folder = common.claim_run_dir(args, "le_mean_teacher")  # refuses other settings' runs and runs in progress
    board = common.Board(args, folder)  # --tensorboard
    started = time.time()
    common.seed_everything(args.seed)
    data = common.load_dataset(args, device)
    train = data.train

    # ALGO LOGIC: stage 1, mean teacher with every missing label as a negative
    teacher1, _, stage1 = fit(args, data, device, torch.ones_like(train.Y), "stage1", args.teacher_selection, board)
    if stage1["best_epoch"] == 1:
        common.warn(
            "the stage-1 teacher was selected at epoch 1: it has likely learnt nothing, and LE will add "
            "random negatives (see --teacher-selection)"
        )

    # ALGO LOGIC: Eq. (1) with the stage-1 EMA teacher's scores on the training clips
    enhanced, per_class = enhance_mask(common.predict(teacher1, train.X), train.observed, args.gamma)
    enhancement = enhancement_report(enhanced, per_class, train, args.gamma, data.class_names)

    # ALGO LOGIC: stage 2, a fresh mean teacher on the enhanced mask
    teacher, student, stage2 = fit(args, data, device, enhanced, "stage2", "observed", board)

    # TRY NOT TO MODIFY: test both networks (the teacher is the primary result), write the run
    scores = common.predict(teacher, data.test.X)
    test = common.evaluate(scores, data.test, data)
    test_student = common.evaluate(common.predict(student, data.test.X), data.test, data)
    print(f"best epoch {stage2['best_epoch']} | test (teacher) {common.headline(test)}", flush=True)
    record = common.run_record(
        args,
        device,
        started,
        method="le_mean_teacher",
        history=stage2["history"],
        best_epoch=stage2["best_epoch"],
        best_val_loss=stage2["best_val_loss"],
        best_epoch_student=stage2["best_epoch_student"],
        stage1=stage1,
        enhancement=enhancement,
        test=test,
        test_student=test_student,
    )
    common.save_run(
        folder,
        record,
        {"teacher": teacher.state_dict(), "student": student.state_dict(), "stage1_teacher": teacher1.state_dict()},
        "teacher",
        teacher,
        scores,
        data,
    )


if __name__ == "__main__":
    common.main_guard(main)
