"""Label enhancement (Fonseca et al. 2020; Gururani & Lerch, Sec. IV-A, Eq. 1).

Stage 1 trains a teacher as B0 does: every missing label is a negative. The teacher then scores
each class's missing training labels; tau_c is the gamma-th percentile of those scores. Eq. (1):
a missing label whose score is >= tau_c is a likely positive and stays masked (M_nc = 0); every
other missing label becomes an observed negative (M_nc = 1, y = 0). Stage 2 trains a fresh
student with B1's masked BCE on that enhanced mask M':

    J_LE = sum_{n,c} M'_nc * BCE(p_nc, y_nc) / sum_{n,c} M'_nc

The teacher's epoch is chosen by its own loss on the validation clips (B0's BCE, missing =
negative); `--teacher-selection observed` uses the validation BCE over observed labels, as the
paper's code does. The student, like every other model here, is chosen by the latter.

Differs from B1 only in the mask: B1 masks every missing label, LE only the share (100 - gamma)%
that the teacher finds most likely positive. gamma = 0 is B1, gamma = 100 is B0. LE needs no
knowledge of which labels are missing: to it, "missing" = "not positive".

    python label_enhance.py --dataset openmic --seed 0
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F

import common

# Table I of the paper: the defaults per dataset (synthetic data and .h5 files use the OpenMIC row).
TABLE_I = {
    "openmic": dict(layers=3, hidden=128, dropout=0.6, gamma=10.0),
    "sonyc": dict(layers=1, hidden=512, dropout=0.6, gamma=95.0),
}


# ALGO LOGIC: Eq. (1), the enhanced mask
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


def percentage(value):
    """gamma is a percentage in [0, 100]: a value in (0, 1) is most likely a share, typed by mistake."""
    v = common.float_in(0, 100)(value)
    if 0 < v < 1:
        common.warn(f"gamma {value} is a percentage: {value} means {v:g}%, not {v:.0%} (type {v * 100:g} for that)")
    return v


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
        description="Label enhancement: a B0 teacher decides which missing labels are negatives.",
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
        "--teacher-selection",
        choices=("b0", "observed"),
        default="b0",
        help="the teacher's epoch: b0 = lowest validation BCE with missing labels as negatives, the loss "
        "it trains on; observed = over observed labels only, as the paper's code (default: b0)",
    )
    return common.add_run_args(p)


def fit(args, data, device, train_mask, stage, selection, board):
    """Train a fresh model with masked BCE under `train_mask` (N, C) bool; return it at its best validation loss
    under `selection` ("observed" or "b0"; both are recorded every epoch), with its state and summary."""
    train, val = data.train, data.val  # Y and observed: (N, C) bool on the device; cast a batch at a time
    # Model selection masks over the validation labels: the observed ones (B1's loss, the paper's choice for
    # every model), or all of them with missing = negative (B0's loss, which LE's teacher trains on).
    val_y = val.Y.float()  # (N_val, C) 1 = present
    val_masks = {"observed": val.observed.float(), "b0": torch.ones_like(val_y)}
    # TRY NOT TO MODIFY: model, Adam with weight decay 1e-5, the learning rate halved every 30 epochs
    model = common.AttentionMIL(
        train.X.shape[2], train.Y.shape[1], args.layers, args.hidden, args.dropout, data.input_offset, data.input_scale
    ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.5)

    # ALGO LOGIC: one training step; stage 1 passes an all-ones mask (that is B0), stage 2 the enhanced mask
    def train_step(x, y, mask):  # x (B, T, D); y, mask (B, C)
        p = model(x)  # (B, C) probabilities
        bce = F.binary_cross_entropy(p, y, reduction="none")
        loss = (bce * mask).sum() / mask.sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    # TRY NOT TO MODIFY: batches drawn on the device with randperm, the last partial batch dropped, their labels
    # cast to float; --fast replays the step as a CUDA graph (fastpath.py: the optimizer is made capturable in place)
    batch = min(args.batch_size, len(train.X))
    n_batches = len(train.X) // batch
    example = (train.X[:batch], train.Y[:batch].float(), train_mask[:batch].float())
    step = common.fast_step(train_step, example, device, args.fast, state=[model, optimizer])
    history, best_val_loss, best_epoch, best_state = [], float("inf"), 0, None
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        model.train()
        perm = torch.randperm(len(train.X), device=device)
        total = torch.zeros((), device=device)
        for i in range(n_batches):
            idx = perm[i * batch : (i + 1) * batch]
            total += step(train.X[idx], train.Y[idx].float(), train_mask[idx].float())  # on the device: no sync
        lr = float(optimizer.param_groups[0]["lr"])  # this epoch's rate, read before the scheduler halves it
        scheduler.step()

        # model selection: the validation BCE under the `selection` mask
        p = common.predict(model, val.X)
        val_bce = F.binary_cross_entropy(p, val_y, reduction="none")
        losses = {f"val_loss_{k}": ((val_bce * m).sum() / m.sum().clamp(min=1)).item() for k, m in val_masks.items()}
        val_loss = losses[f"val_loss_{selection}"]
        train_loss = (total / n_batches).item()  # host syncs: once an epoch
        if val_loss < best_val_loss:
            best_val_loss, best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append(
            dict(epoch=epoch, train_loss=train_loss, val_loss=val_loss, **losses, lr=lr, seconds=time.time() - t0)
        )
        board.log(history[-1], stage)
        print(
            f"epoch {epoch:3d}/{args.epochs} | {stage}_train_loss {train_loss:.4f} val_loss_observed "
            f"{losses['val_loss_observed']:.4f} val_loss_b0 {losses['val_loss_b0']:.4f} | "
            f"{history[-1]['seconds']:.2f}s",
            flush=True,
        )
    model.load_state_dict(best_state)
    at_best = {k: v for k, v in history[best_epoch - 1].items() if k.startswith("val_loss_")}
    return (
        model,
        best_state,
        dict(selection=selection, history=history, best_epoch=best_epoch, best_val_loss=best_val_loss, **at_best),
    )


def main():
    # TRY NOT TO MODIFY: options, run folder, seeding, device, data
    args = common.parse_args(get_parser(), TABLE_I)
    device = common.get_device(args.device, args.threads)  # checked before the run folder is made
    folder = common.claim_run_dir(args, "label_enhance")  # refuses other settings' runs and runs in progress
    board = common.Board(args, folder)  # --tensorboard
    started = time.time()
    common.seed_everything(args.seed)
    data = common.load_dataset(args, device)
    train = data.train

    # ALGO LOGIC: stage 1, the teacher, trained as B0 (every missing label is a negative)
    teacher, teacher_state, stage1 = fit(
        args, data, device, torch.ones_like(train.Y), "teacher", args.teacher_selection, board
    )
    if stage1["best_epoch"] == 1:
        common.warn(
            "the teacher was selected at epoch 1: it has likely learnt nothing, and LE will add random "
            "negatives (see --teacher-selection)"
        )

    # ALGO LOGIC: Eq. (1), enhance the training mask with the teacher's scores on the training clips
    teacher_scores = common.predict(teacher, train.X)  # (N, C)
    enhanced, per_class = enhance_mask(teacher_scores, train.observed, args.gamma)
    enhancement = enhancement_report(enhanced, per_class, train, args.gamma, data.class_names)

    # ALGO LOGIC: stage 2, a fresh student (fresh optimizer, initial learning rate) on the enhanced mask
    student, student_state, stage2 = fit(args, data, device, enhanced, "student", "observed", board)

    # TRY NOT TO MODIFY: test the selected student, write the run
    scores = common.predict(student, data.test.X)
    test = common.evaluate(scores, data.test, data)
    print(f"best epoch {stage2['best_epoch']} | test {common.headline(test)}", flush=True)
    record = common.run_record(
        args,
        device,
        started,
        method="label_enhance",
        history=stage2["history"],
        best_epoch=stage2["best_epoch"],
        best_val_loss=stage2["best_val_loss"],
        stage1=stage1,
        enhancement=enhancement,
        test=test,
    )
    common.save_run(
        folder, record, {"student": student_state, "stage1_teacher": teacher_state}, "student", student, scores, data
    )


if __name__ == "__main__":
    common.main_guard(main)
