"""Label enhancement's gamma against the share of missing labels: tables and one figure from finished runs.

    python simulate_missing.py --methods label_enhance --vary gamma=0,2,5,10,20,50 --rates 0 0.4 0.8 --seeds 0 1 2
    python benchmarks/gamma_study.py runs --out docs/gamma.png

Reads every finished label_enhance run under the folder (its default settings but gamma and the drop
rate), prints per drop rate and gamma the mean and std over seeds of the paper's AUPRC and F1 on the
observed test labels, AP and F1 against the complete truth, and the masked set's precision and recall,
with the number of new negatives per observed training label. Then the rule that the paper's future work
asks for: read at drop rate 0 the gamma that ranks best (the paper's AUPRC), the ratio k of the new
negatives it makes to the observed labels, and keep k at every drop rate:
gamma(r) = 100 k * observed(r) / missing(r). The figure draws each metric against gamma, one line per drop
rate, and marks the rule's gamma. Needs matplotlib for --out.
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

KEYS = dict(
    auprc_macro_masked="AUPRC, observed labels (paper's)",
    f1_macro="F1, observed labels (paper's)",
    ap_macro_full_truth="AP, complete truth",
    f1_macro_full_truth="F1, complete truth",
)


def collect(folder):
    """{(rate, gamma): [metrics of each seed]} of the label_enhance runs with default settings otherwise."""
    runs = defaultdict(list)
    for path in sorted(Path(folder).rglob("metrics.json")):
        m = json.loads(path.read_text())
        a = m["args"]
        if (
            m.get("method") != "label_enhance"
            or a["teacher_selection"] != "b0"
            or a["epochs"] != 100
            or a["lr"] != 1e-3
            or a["dropout"] != 0.6
            or a["drop_seed"] != 1234
            or a["dataset"] != "synthetic"
        ):
            continue
        e = m["enhancement"]
        observed = 1280 * 20 - e["missing"]
        runs[(a["drop_rate"], a["gamma"])].append(
            dict(
                **{k: m["test"][k] for k in KEYS},
                masked_precision=e["masked_precision"],
                masked_recall=e["masked_recall"],
                negatives_per_observed=(e["missing"] - e["masked"]) / observed,
                observed=observed,
                missing=e["missing"],
                seed=a["seed"],
            )
        )
    return runs


def rule(runs, rates):
    """k from drop rate 0's best gamma (by the paper's AUPRC); gamma(r) keeps k new negatives per observed label."""
    at0 = {g: ms for (r, g), ms in runs.items() if r == 0}
    best = max(at0, key=lambda g: np.mean([m["auprc_macro_masked"] for m in at0[g]]))
    k = np.mean([m["negatives_per_observed"] for m in at0[best]])
    gammas = {}
    for r in rates:
        ms = next(ms for (rr, _), ms in runs.items() if rr == r)
        gammas[r] = 100 * k * ms[0]["observed"] / ms[0]["missing"]
    return best, k, gammas


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="a folder holding finished runs (searched recursively)")
    p.add_argument("--out", type=Path, help="the figure to write (PNG)")
    args = p.parse_args()
    runs = collect(args.folder)
    rates = sorted({r for r, _ in runs})
    best, k, gammas = rule(runs, rates)
    print(
        f"drop 0: best gamma by the paper's AUPRC {best:g}, {k:.3f} new negatives per observed label; the rule "
        f"gamma(r) = 100 k observed(r) / missing(r): " + ", ".join(f"drop {r:g}: {g:.2f}" for r, g in gammas.items())
    )
    cols = list(KEYS) + ["masked_precision", "masked_recall", "negatives_per_observed"]
    print("\n| drop | gamma | seeds | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 3))
    for r, g in sorted(runs):
        ms = runs[(r, g)]
        print(
            f"| {r:g} | {g:g} | {len(ms)} | "
            + " | ".join(f"{np.mean([m[c] for m in ms]):.3f} ± {np.std([m[c] for m in ms]):.3f}" for c in cols)
            + " |"
        )
    for key in KEYS:  # which gamma is best at each rate, by each metric
        best_at = {
            r: max((g for rr, g in runs if rr == r), key=lambda g: np.mean([m[key] for m in runs[(r, g)]]))
            for r in rates
        }
        print(f"\nbest gamma by {key}: " + ", ".join(f"drop {r:g}: {g:g}" for r, g in best_at.items()))
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
        shown = [r for r in rates if len({g for rr, g in runs if rr == r}) > 1]  # rates with a gamma curve
        color = dict(zip(shown, plt.get_cmap("viridis")(np.linspace(0, 0.9, len(shown)))))
        panels = list(KEYS.items()) + [
            ("masked_precision", "masked set: precision (solid), recall (dashed)"),
            ("negatives_per_observed", "new negatives per observed training label"),
        ]
        for ax, (key, title) in zip(axes.flat, panels):
            for r in shown:
                gs = sorted(g for rr, g in runs if rr == r)
                for k2, style in ((key, "-"), ("masked_recall", "--")) if key == "masked_precision" else ((key, "-"),):
                    means = [np.mean([m[k2] for m in runs[(r, g)]]) for g in gs]
                    stds = [np.std([m[k2] for m in runs[(r, g)]]) for g in gs]
                    ax.errorbar(
                        gs,
                        means,
                        yerr=stds,
                        marker="o",
                        ms=3,
                        capsize=2,
                        ls=style,
                        color=color[r],
                        label=f"drop {r:g}" if style == "-" else None,
                    )
                ax.axvline(gammas[r], color=color[r], ls=":", lw=1)
            if key == "negatives_per_observed":
                ax.axhline(k, color="k", ls=":", lw=1)
                ax.set_yscale("log")
                ax.set_title(f"{title} (dotted: k = {k:.2f})", fontsize=9)
            else:
                ax.set_title(title, fontsize=9)
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xticks([0, 2, 5, 10, 20, 50], ["0", "2", "5", "10", "20", "50"])
            ax.set_xlabel("gamma (%); dotted: the rule's gamma")
            ax.set_xlim(-0.3, 60)
        axes.flat[0].legend(fontsize=8)
        n = sorted({len(ms) for ms in runs.values()})
        fig.suptitle(
            f"label enhancement on the synthetic data: gamma against the share of missing labels "
            f"(mean ± std over {'–'.join(map(str, n[:: len(n) - 1 or 1]))} seeds, 100 epochs)",
            fontsize=10,
        )
        fig.tight_layout()
        fig.savefig(args.out, dpi=110)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
