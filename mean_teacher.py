"""Mean teacher (Tarvainen & Valpola 2017; Gururani & Lerch, Sec. IV-B).

A student is trained with B1's masked BCE plus a consistency cost that pulls its outputs towards
those of a teacher, whose weights are the exponential moving average (EMA) of the student's. The
consistency cost covers every output, so the missing labels teach too:

    J_MT = sum_{n,c} M_nc BCE(p_nc, y_nc) / sum_{n,c} M_nc  +  beta * mean_{n,c} (p_nc - q_nc)^2
    teacher weights:  theta'_t = alpha_t theta'_{t-1} + (1 - alpha_t) theta_t,
                      alpha_t = min(1 - 1 / (t + 1), alpha)

p: student, q: teacher (no gradient). Dropout is the only noise: student and teacher each draw
their own. Differs from B1 only by the consistency term and the EMA teacher.

    python mean_teacher.py --dataset openmic --seed 0
"""

import argparse
import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# Table I of the paper: the defaults per dataset (synthetic data and .h5 files use the OpenMIC row).
TABLE_I = {
    "openmic": dict(layers=3, hidden=128, dropout=0.6, ema_decay=0.999, consistency_weight=3.0),
    "sonyc": dict(layers=1, hidden=512, dropout=0.6, ema_decay=0.99, consistency_weight=3.0),
}


# ALGO LOGIC: the EMA teacher
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


def get_parser():
    p = argparse.ArgumentParser(
        description="Mean teacher: masked BCE plus consistency with an EMA teacher.",
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
        "--ema-decay", type=common.float_in(0, 1), help="EMA decay alpha of the teacher (default: Table I, below)"
    )
    p.add_argument(
        "--consistency-weight", type=common.float_in(0, 1e6), help="consistency weight beta (default: Table I, below)"
    )
    return common.add_run_args(p)


def main():
    # TRY NOT TO MODIFY: options, run folder, seeding, device, data
    args = common.parse_args(get_parser(), TABLE_I)
    device = common.get_device(args.device, args.threads)  # checked before the run folder is made
    folder = common.claim_run_dir(args, "mean_teacher")  # refuses other settings' runs and runs in progress
    board = common.Board(args, folder)  # --tensorboard
    started = time.time()
    common.seed_everything(args.seed)
    data = common.load_dataset(args, device)
    train, val = data.train, data.val  # Y and observed: (N, C) bool on the device; cast a batch at a time
    val_y, val_mask = val.Y.float(), val.observed.float()  # (N_val, C) 1 = present, 1 = observed
    # ALGO LOGIC: B1's loss learns "absent" from observed negatives only, and the consistency term cannot stand
    # in for them. With none (positive-only labels, as AudioSet's) every class would be called present: refuse.
    if not common.has_observed_negative(train):
        common.fail(
            "mean_teacher.py needs observed negatives, and these training labels have none (positive-only): its "
            "masked BCE would teach that every class is present, and the teacher with it; "
            "b0, label_enhance, large_loss, em or gr_loss learn from the missing labels (docs/results.md)"
        )

    # TRY NOT TO MODIFY: model, Adam with weight decay 1e-5, the learning rate halved every 30 epochs
    model = common.AttentionMIL(
        train.X.shape[2], train.Y.shape[1], args.layers, args.hidden, args.dropout, data.input_offset, data.input_scale
    ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.5)

    # ALGO LOGIC: the teacher starts as a copy of the student
    teacher = make_teacher(model)
    teacher_tensors, student_tensors = ema_tensors(teacher), ema_tensors(model)
    ema_step = torch.zeros((), device=device)

    # ALGO LOGIC: one training step of mean teacher
    def train_step(x, y, observed):  # x (B, T, D); y, observed (B, C)
        p = model(x)  # (B, C) student probabilities, its own dropout
        with torch.no_grad():
            q = teacher(x)  # (B, C) teacher probabilities, another dropout draw
        bce = F.binary_cross_entropy(p, y, reduction="none")
        classification = (bce * observed).sum() / observed.sum().clamp(min=1)  # B1's masked BCE
        consistency = F.mse_loss(p, q)  # over all outputs, observed or not
        loss = classification + args.consistency_weight * consistency
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema_update(teacher_tensors, student_tensors, ema_step, args.ema_decay)
        return loss.detach()

    # TRY NOT TO MODIFY: batches drawn on the device with randperm, the last partial batch dropped, their labels
    # cast to float; --fast replays the step as a CUDA graph (fastpath.py: the optimizer is made capturable in place)
    batch = min(args.batch_size, len(train.X))
    n_batches = len(train.X) // batch
    example = (train.X[:batch], train.Y[:batch].float(), train.observed[:batch].float())
    step = common.fast_step(train_step, example, device, args.fast, state=[model, teacher, optimizer, ema_step])
    history = []
    best_teacher = dict(val_loss=float("inf"), epoch=0, state=None)  # each network selected by its own
    best_student = dict(val_loss=float("inf"), epoch=0, state=None)  # validation loss
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        model.train()
        teacher.train()
        perm = torch.randperm(len(train.X), device=device)
        total = torch.zeros((), device=device)
        for i in range(n_batches):
            idx = perm[i * batch : (i + 1) * batch]
            total += step(train.X[idx], train.Y[idx].float(), train.observed[idx].float())  # on the device: no sync
        lr = float(optimizer.param_groups[0]["lr"])  # this epoch's rate, read before the scheduler halves it
        scheduler.step()

        # model selection: each network by its own validation BCE over observed labels
        entry = dict(epoch=epoch, train_loss=(total / n_batches).item(), lr=lr)  # host syncs: once an epoch
        for name, net, best in (("teacher", teacher, best_teacher), ("student", model, best_student)):
            p = common.predict(net, val.X)
            val_bce = F.binary_cross_entropy(p, val_y, reduction="none")
            entry[f"val_loss_{name}"] = ((val_bce * val_mask).sum() / val_mask.sum().clamp(min=1)).item()
            if entry[f"val_loss_{name}"] < best["val_loss"]:
                state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                best.update(val_loss=entry[f"val_loss_{name}"], epoch=epoch, state=state)
        entry.update(val_loss=entry["val_loss_teacher"], seconds=time.time() - t0)
        history.append(entry)
        board.log(history[-1])
        print(
            f"epoch {epoch:3d}/{args.epochs} | train_loss {entry['train_loss']:.4f} val_loss_teacher "
            f"{entry['val_loss_teacher']:.4f} val_loss_student {entry['val_loss_student']:.4f} | "
            f"{entry['seconds']:.2f}s",
            flush=True,
        )

    # TRY NOT TO MODIFY: test both selected networks (the teacher is the primary result), write the run
    teacher.load_state_dict(best_teacher["state"])
    model.load_state_dict(best_student["state"])
    scores = common.predict(teacher, data.test.X)
    test = common.evaluate(scores, data.test, data)
    test_student = common.evaluate(common.predict(model, data.test.X), data.test, data)
    print(f"best epoch {best_teacher['epoch']} | test (teacher) {common.headline(test)}", flush=True)
    print(f"best epoch {best_student['epoch']} | test (student) {common.headline(test_student)}", flush=True)
    record = common.run_record(
        args,
        device,
        started,
        method="mean_teacher",
        history=history,
        best_epoch=best_teacher["epoch"],
        best_val_loss=best_teacher["val_loss"],
        best_epoch_student=best_student["epoch"],
        test=test,
        test_student=test_student,
    )
    networks = {"teacher": best_teacher["state"], "student": best_student["state"]}
    common.save_run(folder, record, networks, "teacher", model, scores, data)


if __name__ == "__main__":
    common.main_guard(main)
