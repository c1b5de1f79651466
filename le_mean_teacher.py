"""Label enhancement with mean-teacher training in both stages (Gururani & Lerch, Sec. VII).

The paper proposes this combination as future work; this is our implementation of it.

Stage 1 trains mean teacher where the BCE treats every missing label as a negative (as B0):
    J_1 = mean_{n,c} BCE(p_nc, y_nc) + beta * mean_{n,c} (p_nc - q_nc)^2
The stage-1 EMA teacher (selected by its own loss on the validation clips, missing = negative,
as in label_enhance.py; --teacher-selection observed for the paper code's rule) scores the missing training labels,
and Eq. (1) of label enhancement builds the enhanced mask M' (see label_enhance.py).
Stage 2 trains a fresh mean teacher with the masked BCE on M':
    J_2 = sum_{n,c} M'_nc BCE(p_nc, y_nc) / sum_{n,c} M'_nc + beta * mean_{n,c} (p_nc - q_nc)^2

Differs from B1 in both ways at once: LE's mask and MT's consistency with an EMA teacher.
The two pieces are imported from their own scripts, so each is defined once.

    python le_mean_teacher.py --dataset openmic --seed 0
"""
import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from label_enhance import enhance_mask
from mean_teacher import ema_tensors, ema_update

# Table I of the paper: the defaults per dataset (synthetic data and .h5 files use the OpenMIC row).
TABLE_I = {
    "openmic": dict(layers=3, hidden=128, dropout=0.6, gamma=10.0, ema_decay=0.999, consistency_weight=3.0),
    "sonyc": dict(layers=1, hidden=512, dropout=0.6, gamma=95.0, ema_decay=0.99, consistency_weight=3.0),
}


def get_args(argv=None):
    parser = common.make_parser("Label enhancement with mean-teacher training in both stages.", TABLE_I)
    parser.add_argument("--gamma", type=common.float_in(0, 100), default=None,
                        help="percentile gamma of the teacher's scores on missing labels (default: Table I, openmic 10, sonyc 95)")
    parser.add_argument("--ema-decay", type=common.float_in(0, 1), default=None,
                        help="EMA decay alpha of the teacher (default: Table I, openmic 0.999, sonyc 0.99)")
    parser.add_argument("--consistency-weight", type=common.float_in(0, 1e6), default=None,
                        help="consistency weight beta (default: Table I, openmic 3, sonyc 3)")
    parser.add_argument("--teacher-selection", choices=("b0", "observed"), default="b0",
                        help="stage 1's epochs: b0 = lowest validation BCE with missing labels as negatives, the "
                             "loss it trains on; observed = over observed labels only, as the paper's code")
    return common.parse_args(parser, TABLE_I, argv)


def main():
    # TRY NOT TO MODIFY: arguments, run folder, seeding, device, data
    args = get_args()
    folder = common.claim_run_dir(args, "le_mean_teacher", TABLE_I)  # refuses a finished run made with other settings
    started = time.time()
    common.seed_everything(args.seed)
    device = common.get_device(args.device, args.threads)
    data = common.load_dataset(args, device)
    train, val = data.train, data.val
    # Model selection masks over the validation labels (see label_enhance.py): observed only, or B0's.
    val_masks = {"observed": val.observed.float(), "b0": torch.ones_like(val.Y)}

    def fit(train_mask, stage, selection):
        """Mean teacher with masked BCE under `train_mask`; returns both networks, each at its best
        validation loss under `selection` ("observed" or "b0")."""
        # TRY NOT TO MODIFY: model, Adam (weight decay 1e-5), learning rate halved every 30 epochs
        model = common.AttentionMIL(train.X.shape[2], train.Y.shape[1], args.layers, args.hidden, args.dropout,
                                    input_offset=data.input_offset, input_scale=data.input_scale).to(device)
        opt = torch.optim.Adam(model.parameters(), weight_decay=1e-5, **common.adam_options(args.lr, device, args.fast))
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.5)

        # ALGO LOGIC: the EMA teacher (BN momentum 0: its running statistics come from the EMA alone)
        teacher = copy.deepcopy(model).requires_grad_(False)
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.momentum = 0.0
        teacher_tensors, student_tensors = ema_tensors(teacher), ema_tensors(model)
        ema_step = torch.zeros((), device=device)

        # ALGO LOGIC: one mean-teacher step under `mask` (all ones in stage 1: B0's BCE)
        def train_step(x, y, mask):                # x (B, T, D); y, mask (B, C)
            p = model(x)                            # (B, C) student, its own dropout
            with torch.no_grad():
                q = teacher(x)                      # (B, C) teacher, another dropout draw
            bce = F.binary_cross_entropy(p, y, reduction="none")
            loss = (bce * mask).sum() / mask.sum().clamp(min=1) + args.consistency_weight * F.mse_loss(p, q)
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

                # model selection: each network by its own validation BCE under the `selection` mask
                entry = dict(epoch=epoch, train_loss=(total / n_batches).item(), lr=float(lr))  # the epoch's one host sync
                for name, net in (("teacher", teacher), ("student", model)):
                    p = common.predict(net, val.X)
                    val_bce = F.binary_cross_entropy(p, val.Y, reduction="none")
                    for k, m in val_masks.items():
                        entry[f"val_loss_{name}_{k}"] = ((val_bce * m).sum() / m.sum().clamp(min=1)).item()
                    if entry[f"val_loss_{name}_{selection}"] < best[name][0]:
                        best[name] = (entry[f"val_loss_{name}_{selection}"], epoch,
                                      {k: v.detach().clone() for k, v in net.state_dict().items()})
                entry["val_loss"] = entry[f"val_loss_teacher_{selection}"]
                entry["seconds"] = time.time() - t0
                history.append(entry)
                common.log_epoch(history, args.epochs, prefix=f"{stage}_")
        teacher.load_state_dict(best["teacher"][2])
        model.load_state_dict(best["student"][2])
        return teacher, model, dict(selection=selection, history=history, best_epoch=best["teacher"][1],
                                    best_val_loss=best["teacher"][0], best_epoch_student=best["student"][1],
                                    **{k: v for k, v in history[best["teacher"][1] - 1].items() if k.startswith("val_loss_teacher_")})

    # ALGO LOGIC: stage 1, mean teacher with every missing label as a negative
    teacher1, _, stage1 = fit(torch.ones_like(train.Y), "stage1", args.teacher_selection)
    if stage1["best_epoch"] == 1:
        common.warn("the stage-1 teacher was selected at epoch 1: it has likely learnt nothing, and LE will add "
                    "random negatives (see --teacher-selection)")

    # ALGO LOGIC: Eq. (1) with the stage-1 EMA teacher's scores on the training clips
    enhanced, per_class = enhance_mask(common.predict(teacher1, train.X), train.observed, args.gamma)
    kept = int(sum(c["masked"] for c in per_class))
    n_missing = int(sum(c["missing"] for c in per_class))
    print(f"gamma {args.gamma:g}: {kept} of {n_missing} missing labels stay masked", flush=True)
    enhancement = dict(gamma=args.gamma, missing=n_missing, masked=kept, per_class=dict(zip(data.class_names, per_class)))
    if train.Y_full is not None:  # synthetic data: how well does the masked set find the missing positives?
        masked = ~enhanced & ~train.observed
        positive = (train.Y_full > 0.5) & ~train.observed
        hits = (masked & positive).sum().item()
        enhancement["masked_precision"] = hits / max(masked.sum().item(), 1)
        enhancement["masked_recall"] = hits / max(positive.sum().item(), 1)

    # ALGO LOGIC: stage 2, a fresh mean teacher on the enhanced mask
    teacher, student, stage2 = fit(enhanced.float(), "stage2", "observed")

    # TRY NOT TO MODIFY: test both networks (the teacher is the primary result), write the run
    scores = common.predict(teacher, data.test.X)
    test = common.evaluate(scores, data.test, data)
    test_student = common.evaluate(common.predict(student, data.test.X), data.test, data)
    print(f"best epoch {stage2['best_epoch']} | test (teacher) " + " ".join(f"{k} {v:.4f}" for k, v in test.items() if not isinstance(v, dict)))
    record = common.run_record(args, device, started, method="le_mean_teacher", history=stage2["history"],
                               best_epoch=stage2["best_epoch"], best_val_loss=stage2["best_val_loss"],
                               best_epoch_student=stage2["best_epoch_student"], stage1=stage1,
                               enhancement=enhancement, test=test, test_student=test_student)
    common.save_run(folder, record, {"teacher": teacher.state_dict(), "student": student.state_dict(),
                                     "stage1_teacher": teacher1.state_dict()}, "teacher", teacher, scores, data)


if __name__ == "__main__":
    common.main_guard(main)
