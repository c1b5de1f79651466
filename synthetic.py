"""The embedded default dataset: OpenMIC-shaped, partially labelled, and its complete truth known.

Because the generator knows every label, the method scripts can measure what the paper cannot:
F1 against the complete truth, and how precisely label enhancement finds the missing positives.
numpy only; `common.load_dataset` calls `make_synthetic` for `--dataset synthetic`.
"""
import numpy as np


def make_synthetic(n_train=1280, n_val=500, n_test=1500, n_classes=20, frames=10, features=128, seed=2018, strength=(1.5, 4.0)):
    """OpenMIC-shaped partially labelled data whose complete truth is known.

    Each class has a direction in feature space; a present class adds it, with a random
    strength, to a random run of 2-6 consecutive frames over Gaussian noise. Classes come
    in pairs whose directions are correlated, so some of them are easy to confuse. About 10%
    of labels are observed, positives about four times as often as negatives (as in OpenMIC's
    annotation), so B0's "missing = negative" is wrong for most positives.
    Fixed by its own seed: every method and training seed sees the same data.
    """
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    prior = rng.uniform(0.05, 0.25, n_classes)
    base = rng.standard_normal((n_classes // 2, features))
    protos = 0.7 * np.repeat(base, 2, axis=0) + 0.7 * rng.standard_normal((n_classes, features))
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    Y = rng.random((n, n_classes)) < prior                                      # (N, C)
    length = rng.integers(2, 7, (n, n_classes))
    start = rng.integers(0, frames - length + 1)
    t = np.arange(frames)
    active = Y[:, :, None] & (t >= start[:, :, None]) & (t < (start + length)[:, :, None])  # (N, C, T)
    strength = rng.uniform(*strength, (n, n_classes)).astype(np.float32)
    X = rng.standard_normal((n, frames, features)).astype(np.float32)
    X += np.einsum("nct,nc,cd->ntd", active.astype(np.float32), strength, protos.astype(np.float32))
    observed = rng.random((n, n_classes)) < np.where(Y, 0.30, 0.08)
    cuts = {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val), "test": slice(n_train + n_val, n)}
    return {s: dict(X=X[c], Y=Y[c] & observed[c], observed=observed[c], Y_full=Y[c]) for s, c in cuts.items()}
