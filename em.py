"""EM: entropy maximisation on the missing labels (Zhou, Chen, Wang, Chen & Heng, ECCV 2022, "Acknowledging
the unknown for multi-label learning with single positive labels"; rules from the official code,
Correr-Zhou/SPML-AckTheUnknown: losses.py loss_EM and loss_EM_APL, main.py for the pseudo-labels).

A missing label is neither a positive nor a negative: it is unknown, and the model is asked to stay
uncertain about it, by maximising the entropy of its probability there. With p the probability, y the label and
M = 1 where the label is observed:

    observed label:   BCE(p, y)                                     (the official code: -log p, its positives)
    missing label:    -alpha * H(p),   H(p) = -p log p - (1 - p) log(1 - p)        (the entropy, maximised)
    J = (1 / BC) sum_{n,c} loss_nc                                  (the mean over the batch's labels)

Asymmetric pseudo-labelling (APL, `--apl`): after a warm-up, at the end of every epoch, per class the missing
labels that the model scores lowest become soft negatives: a label picked with score s is then trained with
beta * BCE(p, s) towards that frozen s instead of the entropy term. Each epoch picks neg_proportion / (epochs -
warm-up) of the class's missing labels among those not picked yet, so that by the end neg_proportion of them
are soft negatives. The official code stores the soft targets as negative numbers in its label matrix; here
they have a tensor of their own, which cannot be mistaken for an observed negative.

The schedule: the official warm-up is 5 of 10 epochs (COCO, PASCAL); here it is the same share of the run,
epochs / 2. The defaults alpha 0.1, beta 0.9, neg_proportion 0.9 are the official ones for COCO.

Differs from B1 in the loss of the missing labels: B1 ignores them, EM asks for uncertainty there. Made for
labels that are only positive (AudioSet's kind, `--positive-only`); an observed negative keeps its BCE.

    python em.py --dataset openmic --seed 0
    python em.py --apl --positive-only             # with pseudo-labels, only positives labelled
"""

import argparse
import time

import torch
import torch.nn.functional as F

import common

# Table I of the paper: the defaults per dataset (synthetic data and .h5 files use the OpenMIC row).
TABLE_I = {"openmic": dict(layers=3, hidden=128, dropout=0.6), "sonyc": dict(layers=1, hidden=512, dropout=0.6)}
LOG_EPSILON = 1e-5  # the official code's -log(x + 1e-5) in the entropy


# ALGO LOGIC: the loss of every label: BCE where observed, the entropy term where missing, APL's soft negatives
def em_loss_matrix(p, y, observed, soft, target, entropy_weight, apl_weight):
    """p, y, observed (B, C); soft (B, C) 1 where the label is an APL soft negative, target its frozen score.
    The loss of each label (B, C): observed -> BCE(p, y); missing -> -alpha * H(p); soft negative ->
    beta * BCE(p, target). Soft negatives are missing labels, so the three are disjoint."""
    bce = F.binary_cross_entropy(p, y, reduction="none")
    entropy = -(p * torch.log(p + LOG_EPSILON) + (1 - p) * torch.log(1 - p + LOG_EPSILON))  # H(p), in nats
    soft_bce = F.binary_cross_entropy(p, target, reduction="none")
    unknown = (1 - observed) * (1 - soft)  # missing and not a soft negative
    return observed * bce - entropy_weight * unknown * entropy + apl_weight * soft * soft_bce


@torch.no_grad()
def pick_soft_negatives(scores, observed, soft, target, count):
    """APL, once an epoch: per class c, the count[c] missing labels not picked yet that score lowest become soft
    negatives (soft True), with their score as frozen target. scores (N, C); observed, soft (N, C) bool; target
    (N, C) float16, changed in place. Returns the number picked."""
    picked = 0
    for c in range(scores.shape[1]):
        free = ~observed[:, c] & ~soft[:, c]  # (N,) candidates: missing, not picked yet
        k = min(int(count[c]), int(free.sum()))
        if k == 0:
            continue
        candidates = torch.where(free, scores[:, c], torch.full_like(scores[:, c], float("inf")))
        lowest = candidates.topk(k, largest=False).indices  # (k,) the least likely positives
        soft[lowest, c] = True
        target[lowest, c] = scores[lowest, c].to(target.dtype)
        picked += k
    return picked


def get_parser():
    p = argparse.ArgumentParser(
        description="EM: observed labels by BCE, missing ones by entropy maximisation; APL pseudo-labels as an option.",
        allow_abbrev=False,
        epilog=f"Table I, the defaults per dataset (.h5 files use OpenMIC's): {TABLE_I}. EM's own defaults are the "
        "official code's for COCO (Correr-Zhou/SPML-AckTheUnknown).",
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
        "--entropy-weight",
        type=common.float_in(0, 100),
        default=0.1,
        help="alpha, the weight of the entropy term on the missing labels (default: 0.1)",
    )
    p.add_argument("--apl", action="store_true", help="asymmetric pseudo-labelling: soft negatives after a warm-up")
    p.add_argument(
        "--apl-weight",
        type=common.float_in(0, 100),
        default=0.9,
        help="beta, the weight of the soft negatives' BCE (default: 0.9)",
    )
    p.add_argument(
        "--neg-proportion",
        type=common.float_in(0, 1),
        default=0.9,
        help="share of each class's missing labels that APL makes soft negatives by the end (default: 0.9)",
    )
    return common.add_run_args(p)


def main():
    # TRY NOT TO MODIFY: options, run folder, seeding, device, data
    args = common.parse_args(get_parser(), TABLE_I)
    device = common.get_device(args.device, args.threads)  # checked before the run folder is made
    folder = common.claim_run_dir(args, "em")  # refuses other settings' runs and runs in progress
    board = common.Board(args, folder)  # --tensorboard
    started = time.time()
    common.seed_everything(args.seed)
    data = common.load_dataset(args, device)
    train, val = data.train, data.val  # Y and observed: (N, C) bool on the device; cast a batch at a time
    val_y, val_mask = val.Y.float(), val.observed.float()  # (N_val, C) 1 = present, 1 = observed

    # TRY NOT TO MODIFY: model, Adam with weight decay 1e-5, the learning rate halved every 30 epochs
    model = common.AttentionMIL(
        train.X.shape[2], train.Y.shape[1], args.layers, args.hidden, args.dropout, data.input_offset, data.input_scale
    ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.5)

    # ALGO LOGIC: APL's soft negatives and their frozen targets, in tensors of their own. Without --apl no label
    # is one: a zero row seen as (N, C), which takes no memory.
    n, n_classes = train.Y.shape
    if args.apl:
        soft = torch.zeros((n, n_classes), dtype=torch.bool, device=device)
        target = torch.zeros((n, n_classes), dtype=torch.float16, device=device)  # 2 bytes a label
    else:
        soft = torch.zeros(n_classes, dtype=torch.bool, device=device).expand(n, n_classes)
        target = torch.zeros(n_classes, dtype=torch.float16, device=device).expand(n, n_classes)
    warmup = args.epochs // 2  # the official 5 of 10 epochs: pseudo-labels from the end of epoch `warmup` on
    missing = n - common.count_per_class(train.observed)  # (C,) missing labels per class
    per_epoch = args.neg_proportion * missing / max(args.epochs - warmup, 1)  # (C,) soft negatives an epoch

    # ALGO LOGIC: one training step of EM (and APL)
    def train_step(x, y, observed, soft, target):  # x (B, T, D); y, observed, soft, target (B, C)
        p = model(x)  # (B, C) probabilities
        loss_matrix = em_loss_matrix(p, y, observed, soft, target, args.entropy_weight, args.apl_weight)
        loss = loss_matrix.mean()  # over all B * C labels, as the official code divides
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    # TRY NOT TO MODIFY: batches drawn on the device with randperm, the last partial batch dropped, their labels
    # cast to float; --fast replays the step as a CUDA graph (fastpath.py: the optimizer is made capturable in place)
    batch = min(args.batch_size, len(train.X))
    n_batches = len(train.X) // batch
    example = (
        train.X[:batch],
        train.Y[:batch].float(),
        train.observed[:batch].float(),
        soft[:batch].float(),
        target[:batch].float(),
    )
    step = common.fast_step(train_step, example, device, args.fast, state=[model, optimizer])
    history, best_val_loss, best_epoch, best_state = [], float("inf"), 0, None
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        model.train()
        perm = torch.randperm(len(train.X), device=device)
        total = torch.zeros((), device=device)
        for i in range(n_batches):
            idx = perm[i * batch : (i + 1) * batch]
            labels = (train.Y[idx].float(), train.observed[idx].float(), soft[idx].float(), target[idx].float())
            total += step(train.X[idx], *labels)  # stays on the device: no sync
        lr = float(optimizer.param_groups[0]["lr"])  # this epoch's rate, read before the scheduler halves it
        scheduler.step()

        # ALGO LOGIC: APL, after the warm-up: the training clips scored in eval mode, soft negatives picked
        entry = {}
        if args.apl and epoch >= warmup:
            picked = pick_soft_negatives(common.predict(model, train.X), train.observed, soft, target, per_epoch)
            entry["soft_negative_share"] = torch.count_nonzero(soft).item() / max(missing.sum().item(), 1)
            entry["picked"] = picked

        # model selection: the validation BCE over observed labels
        p = common.predict(model, val.X)
        val_bce = F.binary_cross_entropy(p, val_y, reduction="none")
        val_loss = ((val_bce * val_mask).sum() / val_mask.sum().clamp(min=1)).item()
        train_loss = (total / n_batches).item()  # host syncs: once an epoch
        if val_loss < best_val_loss:
            best_val_loss, best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append(dict(epoch=epoch, train_loss=train_loss, val_loss=val_loss, lr=lr, **entry))
        history[-1]["seconds"] = time.time() - t0
        board.log(history[-1])
        soft_share = f" | soft negatives {entry['soft_negative_share']:.1%}" if entry else ""
        print(
            f"epoch {epoch:3d}/{args.epochs} | train_loss {train_loss:.4f} val_loss {val_loss:.4f}{soft_share} | "
            f"{history[-1]['seconds']:.2f}s",
            flush=True,
        )

    # TRY NOT TO MODIFY: test the selected model, write the run
    model.load_state_dict(best_state)
    scores = common.predict(model, data.test.X)
    test = common.evaluate(scores, data.test, data)
    print(f"best epoch {best_epoch} | test {common.headline(test)}", flush=True)
    record = common.run_record(
        args,
        device,
        started,
        method="em",
        scheme="EM + APL" if args.apl else "EM",
        history=history,
        best_epoch=best_epoch,
        best_val_loss=best_val_loss,
        test=test,
    )
    common.save_run(folder, record, {"model": best_state}, "model", model, scores, data)


if __name__ == "__main__":
    common.main_guard(main)
