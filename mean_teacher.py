"""Mean teacher (Tarvainen & Valpola 2017; Gururani & Lerch, Sec. IV-B).

A student is trained with B1's masked BCE plus a consistency cost that pulls its outputs
towards those of a teacher, whose weights are the exponential moving average (EMA) of the
student's. The consistency cost covers every output, so the missing labels teach too:

    J_MT = sum_{n,c} M_nc BCE(p_nc, y_nc) / sum_{n,c} M_nc  +  beta * mean_{n,c} (p_nc - q_nc)^2
    teacher weights:  theta'_t = alpha_t theta'_{t-1} + (1 - alpha_t) theta_t,
                      alpha_t = min(1 - 1 / (t + 1), alpha)

p: student, q: teacher (no gradient). Dropout is the only noise: student and teacher each
draw their own. Differs from B1 only by the consistency term and the EMA teacher.

    python mean_teacher.py --dataset openmic --seed 0
"""
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
    """What the teacher averages: its parameters and its floating-point buffers, the batch-norm
    running statistics among them (the input scaling is the same constant in both networks, so
    averaging leaves it unchanged). In train mode, as during training, BN normalises with each
    batch's own statistics; the averaged running statistics are what BN uses in eval mode, for
    validation, test and prediction, and they match the teacher's averaged weights. (The paper's
    code and CuriousAI's average the parameters only.)"""
    return [p for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]


@torch.no_grad()
def ema_update(teacher, student, step, ema_decay):
    """One EMA step; `step` is a device tensor counting updates (kept on the device: no sync)."""
    step += 1
    alpha = torch.clamp(1 - 1 / (step + 1), max=ema_decay)   # the true average early on
    torch._foreach_lerp_(teacher, student, 1 - alpha)         # teacher = alpha teacher + (1 - alpha) student


def get_args(argv=None):
    parser = common.make_parser("Mean teacher: masked BCE plus consistency with an EMA teacher.", TABLE_I)
    parser.add_argument("--ema-decay", type=common.float_in(0, 1), default=None,
                        help="EMA decay alpha of the teacher (default: Table I, openmic 0.999, sonyc 0.99)")
    parser.add_argument("--consistency-weight", type=common.float_in(0, 1e6), default=None,
                        help="consistency weight beta (default: Table I, openmic 3, sonyc 3)")
    return common.parse_args(parser, TABLE_I, argv)


def main():
    # TRY NOT TO MODIFY: arguments, run folder, seeding, device, data
    args = get_args()
    folder = common.claim_run_dir(args, "mean_teacher", TABLE_I)  # refuses a finished run made with other settings
    started = time.time()
    common.seed_everything(args.seed)
    device = common.get_device(args.device, args.threads)
    data = common.load_dataset(args, device)
    train, val = data.train, data.val
    train_mask, val_mask = train.observed.float(), val.observed.float()  # (N, C) 1 = observed

    # TRY NOT TO MODIFY: model, Adam (weight decay 1e-5), learning rate halved every 30 epochs
    model = common.AttentionMIL(train.X.shape[2], train.Y.shape[1], args.layers, args.hidden, args.dropout,
                                input_offset=data.input_offset, input_scale=data.input_scale).to(device)
    opt = torch.optim.Adam(model.parameters(), weight_decay=1e-5, **common.adam_options(args.lr, device, args.fast))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.5)

    # ALGO LOGIC: the teacher starts as a copy of the student and never gets gradients. It runs in
    # train mode, for its own dropout noise; BN momentum 0 keeps its forward passes from touching
    # its running statistics, which come from the EMA alone.
    teacher = copy.deepcopy(model).requires_grad_(False)
    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = 0.0
    teacher_tensors, student_tensors = ema_tensors(teacher), ema_tensors(model)
    ema_step = torch.zeros((), device=device)

    # ALGO LOGIC: one training step of mean teacher
    def train_step(x, y, observed):            # x (B, T, D); y, observed (B, C)
        p = model(x)                            # (B, C) student probabilities, its own dropout
        with torch.no_grad():
            q = teacher(x)                      # (B, C) teacher probabilities, another dropout draw
        bce = F.binary_cross_entropy(p, y, reduction="none")
        classification = (bce * observed).sum() / observed.sum().clamp(min=1)  # B1's masked BCE
        consistency = F.mse_loss(p, q)          # over all outputs, observed or not
        loss = classification + args.consistency_weight * consistency
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(teacher_tensors, student_tensors, ema_step, args.ema_decay)
        return loss.detach()

    # TRY NOT TO MODIFY: batches drawn on the device with randperm; the last partial batch is dropped
    batch = min(args.batch_size, len(train.X))
    n_batches = len(train.X) // batch
    step = common.fast_step(train_step, (train.X[:batch], train.Y[:batch], train_mask[:batch]),
                            device, args.fast, state=[model, teacher, opt, ema_step])
    history, best = [], {name: (float("inf"), 0, None) for name in ("teacher", "student")}
    with common.stop_on_divergence(history):  # a NaN loss ends the run in one line, exit 2
        for epoch in range(1, args.epochs + 1):
            t0 = time.time()
            model.train()
            teacher.train()
            perm = torch.randperm(len(train.X), device=device)
            total = torch.zeros((), device=device)
            for i in range(n_batches):
                idx = perm[i * batch:(i + 1) * batch]
                total += step(train.X[idx], train.Y[idx], train_mask[idx])  # stays on the device: no sync
            lr = opt.param_groups[0]["lr"]
            scheduler.step()

            # model selection: each network by its own validation BCE over observed labels
            entry = dict(epoch=epoch, train_loss=(total / n_batches).item(), lr=float(lr))  # the epoch's one host sync
            for name, net in (("teacher", teacher), ("student", model)):
                p = common.predict(net, val.X)
                val_bce = F.binary_cross_entropy(p, val.Y, reduction="none")
                entry[f"val_loss_{name}"] = ((val_bce * val_mask).sum() / val_mask.sum().clamp(min=1)).item()
                if entry[f"val_loss_{name}"] < best[name][0]:
                    best[name] = (entry[f"val_loss_{name}"], epoch,
                                  {k: v.detach().clone() for k, v in net.state_dict().items()})
            entry["val_loss"] = entry["val_loss_teacher"]
            entry["seconds"] = time.time() - t0
            history.append(entry)
            common.log_epoch(history, args.epochs)

    # TRY NOT TO MODIFY: test both selected networks (the teacher is the primary result), write the run
    teacher.load_state_dict(best["teacher"][2])
    model.load_state_dict(best["student"][2])
    scores = common.predict(teacher, data.test.X)
    test = common.evaluate(scores, data.test, data)
    test_student = common.evaluate(common.predict(model, data.test.X), data.test, data)
    print(f"best epoch {best['teacher'][1]} | test (teacher) " + " ".join(f"{k} {v:.4f}" for k, v in test.items() if not isinstance(v, dict)))
    print(f"best epoch {best['student'][1]} | test (student) " + " ".join(f"{k} {v:.4f}" for k, v in test_student.items() if not isinstance(v, dict)))
    record = common.run_record(args, device, started, method="mean_teacher", history=history,
                               best_epoch=best["teacher"][1], best_val_loss=best["teacher"][0],
                               best_epoch_student=best["student"][1], test=test, test_student=test_student)
    common.save_run(folder, record, {"teacher": best["teacher"][2], "student": best["student"][2]}, "teacher",
                    model, scores, data)


if __name__ == "__main__":
    common.main_guard(main)
