"""B1: missing labels are masked out of the binary cross-entropy (Gururani & Lerch, Sec. V).

Only the observed labels teach the model. With M the observed-label mask (1 = known):

    J_B1 = sum_{n,c} M_nc * BCE(p_nc, y_nc) / sum_{n,c} M_nc

    python b1.py --dataset openmic --seed 0

Reads top to bottom: setup, model, the training step (the method), the epoch loop with
model selection on the validation loss over observed labels, the test. Everything outside
"ALGO LOGIC" is the same in b0.py and b1.py; the two-network scripts add their second network.
"""
import time

import torch
import torch.nn.functional as F

import common

# Table I of the paper: the defaults per dataset (synthetic data and .h5 files use the OpenMIC row).
TABLE_I = {
    "openmic": dict(layers=3, hidden=128, dropout=0.6),
    "sonyc": dict(layers=1, hidden=512, dropout=0.6),
}


def get_args(argv=None):
    parser = common.make_parser("B1: masked binary cross-entropy over the observed labels.", TABLE_I)
    return common.parse_args(parser, TABLE_I, argv)


def main():
    # TRY NOT TO MODIFY: arguments, run folder, seeding, device, data
    args = get_args()
    folder = common.claim_run_dir(args, "b1", TABLE_I)  # refuses a finished run made with other settings
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

    # ALGO LOGIC: one training step of B1
    def train_step(x, y, observed):            # x (B, T, D); y, observed (B, C)
        p = model(x)                            # (B, C) probabilities
        bce = F.binary_cross_entropy(p, y, reduction="none")
        # masked mean over the observed labels; a batch with none gives 0, not NaN
        loss = (bce * observed).sum() / observed.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    # TRY NOT TO MODIFY: batches drawn on the device with randperm; the last partial batch is dropped
    batch = min(args.batch_size, len(train.X))
    n_batches = len(train.X) // batch
    step = common.fast_step(train_step, (train.X[:batch], train.Y[:batch], train_mask[:batch]),
                            device, args.fast, state=[model, opt])
    history, best_loss, best_epoch, best_state = [], float("inf"), 0, None
    with common.stop_on_divergence(history):  # a NaN loss ends the run in one line, exit 2
        for epoch in range(1, args.epochs + 1):
            t0 = time.time()
            model.train()
            perm = torch.randperm(len(train.X), device=device)
            total = torch.zeros((), device=device)
            for i in range(n_batches):
                idx = perm[i * batch:(i + 1) * batch]
                total += step(train.X[idx], train.Y[idx], train_mask[idx])  # stays on the device: no sync
            lr = opt.param_groups[0]["lr"]
            scheduler.step()

            # model selection: the validation BCE over observed labels
            p = common.predict(model, val.X)
            val_bce = F.binary_cross_entropy(p, val.Y, reduction="none")
            val_loss = ((val_bce * val_mask).sum() / val_mask.sum().clamp(min=1)).item()
            train_loss = (total / n_batches).item()  # the epoch's one host sync
            if val_loss < best_loss:
                best_loss, best_epoch = val_loss, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            history.append(dict(epoch=epoch, train_loss=train_loss, val_loss=val_loss, lr=float(lr),
                                seconds=time.time() - t0))
            common.log_epoch(history, args.epochs)

    # TRY NOT TO MODIFY: test the selected model, write the run
    model.load_state_dict(best_state)
    scores = common.predict(model, data.test.X)
    test = common.evaluate(scores, data.test, data)
    print(f"best epoch {best_epoch} | test " + " ".join(f"{k} {v:.4f}" for k, v in test.items() if not isinstance(v, dict)))
    record = common.run_record(args, device, started, method="b1", history=history, best_epoch=best_epoch,
                               best_val_loss=best_loss, test=test)
    common.save_run(folder, record, {"model": best_state}, "model", model, scores, data)


if __name__ == "__main__":
    common.main_guard(main)
