"""B1: missing labels are masked out of the binary cross-entropy (Gururani & Lerch, Sec. V).

Only the observed labels teach the model. With M the observed-label mask (1 = known):

    J_B1 = sum_{n,c} M_nc * BCE(p_nc, y_nc) / sum_{n,c} M_nc

    python b1.py --dataset openmic --seed 0

Reads top to bottom: options, setup, model and optimizer, the training step (the method), the epoch
loop with model selection on the validation loss over observed labels, the test. Outside "ALGO LOGIC"
b0.py and b1.py are the same; the two-network scripts add their second network.
"""

import argparse
import time

import torch
import torch.nn.functional as F

import common

# Table I of the paper: the defaults per dataset (synthetic data and .h5 files use the OpenMIC row).
TABLE_I = {"openmic": dict(layers=3, hidden=128, dropout=0.6), "sonyc": dict(layers=1, hidden=512, dropout=0.6)}


def get_parser():
    p = argparse.ArgumentParser(
        description="B1: masked binary cross-entropy over the observed labels.",
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
    return common.add_run_args(p)


def main():
    # TRY NOT TO MODIFY: options, run folder, seeding, device, data
    args = common.parse_args(get_parser(), TABLE_I)
    device = common.get_device(args.device, args.threads)  # checked before the run folder is made
    folder = common.claim_run_dir(args, "b1")  # refuses other settings' runs and runs in progress
    board = common.Board(args, folder)  # --tensorboard
    started = time.time()
    common.seed_everything(args.seed)
    data = common.load_dataset(args, device)
    train, val = data.train, data.val  # Y and observed: (N, C) bool on the device; cast a batch at a time
    val_y, val_mask = val.Y.float(), val.observed.float()  # (N_val, C) 1 = present, 1 = observed
    # ALGO LOGIC: B1 learns "absent" from observed negatives only. With none (positive-only labels, as AudioSet's)
    # its loss is lowest when every class is called present: refuse rather than train that.
    if not common.has_observed_negative(train):
        common.fail(
            "b1.py needs observed negatives, and these training labels have none (positive-only): its masked loss "
            "would teach that every class is present; "
            "b0, label_enhance, large_loss, em or gr_loss learn from the missing labels (docs/results.md)"
        )

    # TRY NOT TO MODIFY: model, Adam with weight decay 1e-5, the learning rate halved every 30 epochs
    model = common.AttentionMIL(
        train.X.shape[2], train.Y.shape[1], args.layers, args.hidden, args.dropout, data.input_offset, data.input_scale
    ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.5)

    # ALGO LOGIC: one training step of B1
    def train_step(x, y, observed):  # x (B, T, D); y, observed (B, C)
        p = model(x)  # (B, C) probabilities
        bce = F.binary_cross_entropy(p, y, reduction="none")
        loss = (bce * observed).sum() / observed.sum().clamp(min=1)  # masked mean; a batch with none gives 0
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
        method="b1",
        history=history,
        best_epoch=best_epoch,
        best_val_loss=best_val_loss,
        test=test,
    )
    common.save_run(folder, record, {"model": best_state}, "model", model, scores, data)


if __name__ == "__main__":
    common.main_guard(main)
