"""Class-aware selective loss (Ben-Baruch, Ridnik, Ben-Cohen, Zamir, Noy, Friedman & Zelnik-Manor, CVPR 2022).

Each missing label is either ignored or taken as a negative, and the choice is made twice (the paper's
Selective approach, its Fig. 3):
- per class, from an estimated class prior (its class distribution estimation): a temporary model trained
  on the observed labels only (that is B1) scores the training clips; the prior P_c is its mean score for
  class c. In a class with P_c > prior_threshold a missing label is likely enough to be positive to be
  ignored; elsewhere it is a negative;
- per label, from the model's own likelihood: in every batch, the likelihood_topk * B missing
  labels that the model scores highest are ignored as well.
The labels kept enter the partial asymmetric loss (P-ASL), with p the probability:

    positive:            L+ = -(1 - p)^gamma_pos   log(p)
    observed negative:   L- = -p^gamma_neg         log(1 - p)
    missing, kept:       Lu = -p^gamma_unann       log(1 - p)       (a negative, down-weighted when easy)
    J = (1 / BC) sum_{n,c} w_nc L_nc,   w_nc = 0 for an ignored missing label, else 1

The official code sums the loss; the mean over the batch's B * C labels keeps the learning rate and the
weight decay of this protocol in the same ratio as for the other methods. The asymmetric weights p^gamma
carry no gradient, as in the official code.

Two stages, like label enhancement: stage 1 trains the prior model (B1), stage 2 a fresh model with the
selective loss. Differs from B1 in the loss of stage 2 alone.

    python selective.py --dataset openmic --seed 0
"""

import argparse
import time

import torch
import torch.nn.functional as F

import common

# Table I of the paper: the defaults per dataset (synthetic data and .h5 files use the OpenMIC row).
TABLE_I = {"openmic": dict(layers=3, hidden=128, dropout=0.6), "sonyc": dict(layers=1, hidden=512, dropout=0.6)}


# ALGO LOGIC: the selective weights and the partial asymmetric loss (P-ASL)
def selective_weights(p, observed, ignored_class, likelihood_topk):
    """p, observed (B, C); ignored_class (C,) bool. 1 for a label that enters the loss, 0 for an ignored
    missing label: every missing label of an ignored class, and the likelihood_topk * B missing labels of
    the batch with the highest p (whatever their class, as in the official code). Fixed shapes: --fast."""
    missing = ~observed
    keep = observed | ~ignored_class[None, :]  # (B, C) the class prior's choice
    k = min(likelihood_topk * p.shape[0], p.numel())
    candidates = torch.where(missing, p, torch.full_like(p, -1.0)).flatten()
    top = torch.zeros_like(candidates, dtype=torch.bool).scatter(0, candidates.topk(k).indices, True)
    likely = top.view(p.shape) & missing  # (B, C) the model's own likelihood
    return (keep & ~likely).float()


def partial_asymmetric_loss(p, y, observed, weights, gamma_pos, gamma_neg, gamma_unann):
    """P-ASL per label (B, C): positives, observed negatives and missing labels taken as negatives, each
    with its own focusing exponent; the weights (1 - p)^gamma and p^gamma are constants (no gradient)."""
    positive = observed & (y > 0.5)
    log_p, log_not_p = torch.log(p.clamp(min=1e-8)), torch.log((1 - p).clamp(min=1e-8))
    with torch.no_grad():
        gamma = torch.where(positive, gamma_pos, torch.where(observed, gamma_neg, gamma_unann))
        focus = torch.where(positive, 1 - p, p).pow(gamma)
    loss = -torch.where(positive, log_p, log_not_p) * focus
    return loss * weights


def get_parser():
    p = argparse.ArgumentParser(
        description="Class-aware selective loss: each missing label is ignored or a negative, by class prior "
        "and likelihood.",
        allow_abbrev=False,
        epilog=f"Table I, the defaults per dataset (.h5 files use OpenMIC's): {TABLE_I}. The selective loss's "
        "defaults are the official code's README example (Alibaba-MIIL/PartialLabelingCSL).",
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
        "--prior-threshold",
        type=common.float_in(0, 1),
        default=0.5,
        help="a class whose estimated prior is above this has its missing labels ignored (default: 0.5)",
    )
    p.add_argument(
        "--likelihood-topk",
        type=common.positive_int,
        default=5,
        help="missing labels per clip of a batch ignored for their high score (default: 5)",
    )
    p.add_argument("--gamma-pos", type=common.float_in(0, 100), default=0.0, help="focusing of positives (default: 0)")
    p.add_argument(
        "--gamma-neg", type=common.float_in(0, 100), default=1.0, help="focusing of observed negatives (default: 1)"
    )
    p.add_argument(
        "--gamma-unann",
        type=common.float_in(0, 100),
        default=4.0,
        help="focusing of missing labels taken as negatives (default: 4)",
    )
    return common.add_run_args(p)


def fit(args, data, device, stage, ignored_class, board):
    """A fresh model trained with stage 1's loss (`ignored_class` None: B1's, for the prior model) or stage 2's
    (the selective P-ASL, the missing labels of the classes `ignored_class` ignored), at its best validation BCE
    over the observed labels; returns (model, state_dict, summary)."""
    train, val = data.train, data.val  # Y and observed: (N, C) bool on the device; cast a batch at a time
    val_y, val_mask = val.Y.float(), val.observed.float()  # (N_val, C) 1 = present, 1 = observed
    # TRY NOT TO MODIFY: model, Adam with weight decay 1e-5, the learning rate halved every 30 epochs
    model = common.AttentionMIL(
        train.X.shape[2], train.Y.shape[1], args.layers, args.hidden, args.dropout, data.input_offset, data.input_scale
    ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.5)

    # ALGO LOGIC: one training step; stage 1 (the prior model) is B1, stage 2 the selective loss
    def train_step(x, y, observed):  # x (B, T, D); y, observed (B, C)
        p = model(x)  # (B, C) probabilities
        if ignored_class is None:  # stage 1: B1's masked BCE over the observed labels (the paper's Ignore mode)
            bce = F.binary_cross_entropy(p, y, reduction="none")
            loss = (bce * observed).sum() / observed.sum().clamp(min=1)
        else:  # stage 2: P-ASL on the labels that the class prior and the likelihood keep
            known = observed > 0.5
            weights = selective_weights(p.detach(), known, ignored_class, args.likelihood_topk)
            loss_matrix = partial_asymmetric_loss(
                p, y, known, weights, args.gamma_pos, args.gamma_neg, args.gamma_unann
            )
            loss = loss_matrix.mean()  # over all B * C labels
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
        history.append(dict(epoch=epoch, train_loss=train_loss, val_loss=val_loss, lr=lr, seconds=time.time() - t0))
        board.log(history[-1], stage)
        print(
            f"epoch {epoch:3d}/{args.epochs} | {stage}_train_loss {train_loss:.4f} val_loss {val_loss:.4f} | "
            f"{history[-1]['seconds']:.2f}s",
            flush=True,
        )
    model.load_state_dict(best_state)
    return model, best_state, dict(history=history, best_epoch=best_epoch, best_val_loss=best_val_loss)


def main():
    # TRY NOT TO MODIFY: options, run folder, seeding, device, data
    args = common.parse_args(get_parser(), TABLE_I)
    device = common.get_device(args.device, args.threads)  # checked before the run folder is made
    folder = common.claim_run_dir(args, "selective")  # refuses other settings' runs and runs in progress
    board = common.Board(args, folder)  # --tensorboard
    started = time.time()
    common.seed_everything(args.seed)
    data = common.load_dataset(args, device)
    # ALGO LOGIC: the class prior comes from a B1 model, which without observed negatives (positive-only labels,
    # as AudioSet's) calls every class present: every class would be ignored, and stage 2 learn the positives
    # alone. Refuse rather than train that.
    if not common.has_observed_negative(data.train):
        common.fail(
            "selective.py needs observed negatives, and these training labels have none (positive-only): its B1 "
            "prior model would call every class present and every missing label be ignored; "
            "b0, label_enhance, large_loss, em or gr_loss learn from the missing labels (docs/results.md)"
        )

    # ALGO LOGIC: stage 1, the prior model: B1 over the observed labels (the paper's Ignore mode)
    prior_model, prior_state, stage1 = fit(args, data, device, "prior", None, board)
    if stage1["best_epoch"] == 1:
        common.warn("the prior model was selected at epoch 1: it has likely learnt little, and so has its class prior")

    # ALGO LOGIC: the class prior, the prior model's mean score on the training clips; the classes it ignores
    prior = common.predict(prior_model, data.train.X).mean(0)  # (C,)
    ignored_class = prior > args.prior_threshold  # (C,) bool
    names = [n for n, ignored in zip(data.class_names, ignored_class.tolist()) if ignored]
    print(
        f"class prior: {len(names)} of {len(prior)} classes above {args.prior_threshold:g}, their missing labels "
        f"ignored{': ' + common.show(names, 100) if names else ''}",
        flush=True,
    )
    selection = dict(
        prior=dict(zip(data.class_names, prior.tolist())), ignored_classes=names, prior_threshold=args.prior_threshold
    )
    if data.train.Y_full is not None:  # complete truth known: how close is the estimated prior?
        true_prior = data.train.Y_full.float().mean(0)
        selection["prior_mean_abs_error"] = float((prior - true_prior).abs().mean())
        print(f"estimated prior vs the truth: mean absolute error {selection['prior_mean_abs_error']:.3f}", flush=True)

    # ALGO LOGIC: stage 2, a fresh model with the selective partial asymmetric loss
    model, state, stage2 = fit(args, data, device, "selective", ignored_class, board)

    # TRY NOT TO MODIFY: test the selected model, write the run
    scores = common.predict(model, data.test.X)
    test = common.evaluate(scores, data.test, data)
    print(f"best epoch {stage2['best_epoch']} | test {common.headline(test)}", flush=True)
    record = common.run_record(
        args,
        device,
        started,
        method="selective",
        history=stage2["history"],
        best_epoch=stage2["best_epoch"],
        best_val_loss=stage2["best_val_loss"],
        stage1=stage1,
        selection=selection,
        test=test,
    )
    common.save_run(folder, record, {"model": state, "stage1_prior": prior_state}, "model", model, scores, data)


if __name__ == "__main__":
    common.main_guard(main)
