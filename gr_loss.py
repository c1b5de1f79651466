"""GR loss: the generalized robust loss (Chen, Zhao, Ye & Tang, IJCAI 2024, "Boosting single positive
multi-label classification with generalized robust loss"; rules from the official code, yan4xi1/GRLoss:
losses.py GR_loss, models.py KFunction and VFunction, train.py for the schedules).

A missing label is given a soft pseudo-label K, the chance that it is in truth positive, and a weight V; it
is then trained as a positive with weight K and as a negative with weight 1 - K, each with a loss robust to
wrong labels. With p the probability (K and V see it without gradient), y the label and M = 1 where observed:

    observed label:   BCE(p, y)                           (the official code: -log p on its single positives)
    missing label:    V(p) * [K(p) * L1(p) + (1 - K(p)) * L2(p)]
        K(p) = sigmoid(w * p + b)                           the soft pseudo-label
        V(p) = exp(-(p - mu)^2 / (2 sigma^2))               the weight: labels scored near mu count most
        L1(p) = (1 - p^q2) / q2                             a positive's loss (-log p as q2 -> 0)
        L2(p) = (1 - (1 - p)^q3) / q3                       a negative's loss (q3 = 1: p, the mean absolute error)
    J = (1 / BC) sum_{n,c} loss_nc                          (the mean over the batch's labels)

The schedules: w, b, mu and sigma move linearly over training, from their first to their last value. The
official code trains 8 epochs and sets, at epoch e of E, w_e = w_0 + (w_E - w_0)(e - 1)/E (b alike) and
mu_e = mu_0 + (mu_E - mu_0) e/E (sigma alike). Here E is --epochs: every share of training gets the official
value, with the official offsets of (e - 1)/E and e/E kept. Defaults, the official code's: w 0 -> 2,
b -2 -> -2, mu 0.5 -> 0.8, sigma 2 -> 0.5, q2 0.01, q3 1. So K starts at 0.12 for every label and ends rising
with p (0.12 at p = 0, 0.5 at p = 1), and V starts flat and ends favouring labels scored near 0.8.

Differs from B1 in the loss of the missing labels: B1 ignores them, GR takes each as part positive, part
negative. Made for labels that are only positive (AudioSet's kind, `--positive-only`); an observed negative
keeps its BCE.

    python gr_loss.py --dataset openmic --seed 0
"""

import argparse
import time

import torch
import torch.nn.functional as F

import common

# Table I of the paper: the defaults per dataset (synthetic data and .h5 files use the OpenMIC row).
TABLE_I = {"openmic": dict(layers=3, hidden=128, dropout=0.6), "sonyc": dict(layers=1, hidden=512, dropout=0.6)}
LOG_EPSILON = 1e-7  # the official code's epsilon in -log(p + eps); here it keeps p^q2 differentiable at 0


# ALGO LOGIC: the schedules, the pseudo-label K, the weight V, and the loss of every label
def schedule(epoch, epochs, first, last, offset):
    """The official linear schedule: first + (last - first) * (epoch - offset) / epochs, offset 1 for w and b,
    0 for mu and sigma."""
    return first + (last - first) * max(epoch - offset, 0) / epochs


def gr_loss_matrix(p, y, observed, w, b, mu, sigma, q2, q3):
    """p, y, observed (B, C); w, b, mu, sigma this epoch's values (0-dim tensors). The loss of each label (B, C):
    observed -> BCE(p, y); missing -> V(p) [K(p) L1(p) + (1 - K(p)) L2(p)], K and V without gradient."""
    bce = F.binary_cross_entropy(p, y, reduction="none")
    with torch.no_grad():
        k = torch.sigmoid(w * p + b)  # (B, C) K: how likely a missing label is positive
        v = torch.exp(-0.5 * ((p - mu) / sigma) ** 2)  # (B, C) V: its weight
    as_positive = (1 - (p + LOG_EPSILON).pow(q2)) / q2  # L1
    as_negative = (1 - (1 - p).pow(q3)) / q3  # L2
    missing_loss = v * (k * as_positive + (1 - k) * as_negative)
    return observed * bce + (1 - observed) * missing_loss


def pair(lo=-100.0, hi=100.0):
    """An argparse type: 'FIRST,LAST', a schedule's first and last value, each in [lo, hi]; one number is both.
    A value that starts with a minus sign is given as --k-bias=-2,-2 (argparse would take -2,-2 for an option)."""

    def parse(value):
        parts = value.split(",")
        try:
            numbers = [float(v) for v in parts] if len(parts) in (1, 2) else []
        except ValueError:
            numbers = []
        if not numbers or not all(lo <= v <= hi for v in numbers):  # NaN fails both comparisons
            raise argparse.ArgumentTypeError(
                f"expected FIRST,LAST (two numbers in [{lo:g}, {hi:g}], e.g. 0,2) or one number, got {value!r}"
            )
        return (numbers[0], numbers[-1])

    return parse


def get_parser():
    p = argparse.ArgumentParser(
        description="GR loss: missing labels as soft pseudo-labels, each with a robust positive and negative loss.",
        allow_abbrev=False,
        epilog=f"Table I, the defaults per dataset (.h5 files use OpenMIC's): {TABLE_I}. GR's own defaults are the "
        "official code's (yan4xi1/GRLoss).",
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
    p.add_argument("--k-weight", type=pair(), default=(0.0, 2.0), help="w of K, FIRST,LAST (default: 0,2)")
    p.add_argument(
        "--k-bias", type=pair(), default=(-2.0, -2.0), help="b of K, as --k-bias=FIRST,LAST (default: -2,-2)"
    )
    p.add_argument("--v-mean", type=pair(), default=(0.5, 0.8), help="mu of V, FIRST,LAST (default: 0.5,0.8)")
    p.add_argument("--v-width", type=pair(1e-3), default=(2.0, 0.5), help="sigma of V, FIRST,LAST (default: 2,0.5)")
    p.add_argument("--q2", type=common.float_in(1e-6, 10), default=0.01, help="q2 of L1, positives (default: 0.01)")
    p.add_argument("--q3", type=common.float_in(1e-6, 10), default=1.0, help="q3 of L2, negatives (default: 1)")
    return common.add_run_args(p)


def main():
    # TRY NOT TO MODIFY: options, run folder, seeding, device, data
    args = common.parse_args(get_parser(), TABLE_I)
    device = common.get_device(args.device, args.threads)  # checked before the run folder is made
    folder = common.claim_run_dir(args, "gr_loss")  # refuses other settings' runs and runs in progress
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

    # ALGO LOGIC: this epoch's w, b, mu and sigma live on the device, filled in place each epoch (like a tensor lr)
    w, b, mu, sigma = (torch.zeros((), device=device) for _ in range(4))

    # ALGO LOGIC: one training step of the GR loss
    def train_step(x, y, observed):  # x (B, T, D); y, observed (B, C)
        p = model(x)  # (B, C) probabilities
        loss_matrix = gr_loss_matrix(p, y, observed, w, b, mu, sigma, args.q2, args.q3)
        loss = loss_matrix.mean()  # over all B * C labels, as the official code divides
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    # TRY NOT TO MODIFY: batches drawn on the device with randperm, the last partial batch dropped, their labels
    # cast to float; --fast replays the step as a CUDA graph (fastpath.py: the optimizer is made capturable in place)
    batch = min(args.batch_size, len(train.X))
    n_batches = len(train.X) // batch
    example = (train.X[:batch], train.Y[:batch].float(), train.observed[:batch].float())
    step = common.fast_step(train_step, example, device, args.fast, state=[model, optimizer])
    history, best_val_loss, best_epoch, best_state = [], float("inf"), 0, None
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        model.train()
        values = dict(
            w=schedule(epoch, args.epochs, *args.k_weight, offset=1),
            b=schedule(epoch, args.epochs, *args.k_bias, offset=1),
            mu=schedule(epoch, args.epochs, *args.v_mean, offset=0),
            sigma=schedule(epoch, args.epochs, *args.v_width, offset=0),
        )
        for tensor, value in zip((w, b, mu, sigma), values.values()):
            tensor.fill_(value)
        perm = torch.randperm(len(train.X), device=device)
        total = torch.zeros((), device=device)
        for i in range(n_batches):
            idx = perm[i * batch : (i + 1) * batch]
            total += step(train.X[idx], train.Y[idx].float(), train.observed[idx].float())  # on the device: no sync
        lr = float(optimizer.param_groups[0]["lr"])  # this epoch's rate, read before the scheduler halves it
        scheduler.step()

        # model selection: the validation BCE over observed labels
        p = common.predict(model, val.X)
        val_bce = F.binary_cross_entropy(p, val_y, reduction="none")
        val_loss = ((val_bce * val_mask).sum() / val_mask.sum().clamp(min=1)).item()
        train_loss = (total / n_batches).item()  # host syncs: once an epoch
        if val_loss < best_val_loss:
            best_val_loss, best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append(dict(epoch=epoch, train_loss=train_loss, val_loss=val_loss, lr=lr, **values))
        history[-1]["seconds"] = time.time() - t0
        board.log(history[-1])
        print(
            f"epoch {epoch:3d}/{args.epochs} | train_loss {train_loss:.4f} val_loss {val_loss:.4f} | "
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
        method="gr_loss",
        history=history,
        best_epoch=best_epoch,
        best_val_loss=best_val_loss,
        test=test,
    )
    common.save_run(folder, record, {"model": best_state}, "model", model, scores, data)


if __name__ == "__main__":
    common.main_guard(main)
