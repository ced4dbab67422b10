"""noise: the accuracy experiment's models under Gaussian input noise of growing σ (paper Fig. 4), with
the paired comparisons of stats.COMPARISONS at every σ.

σ is in units of the data's standard deviation (inputs are standardised). The noise is drawn from a
generator seeded per σ, so every model sees the same noisy test set.
"""
from __future__ import annotations

import torch

from . import data as data_mod
from .registry import Subcommand, register
from .stats import comparisons, summary
from .training import evaluate


def run(ctx) -> dict:
    runs = ctx.accuracy_runs(ctx.args.variants)
    out = {}
    for dataset, by_variant in runs.items():
        ds = data_mod.load(dataset)
        noisy = []
        for i, sigma in enumerate(ctx.budget.noise_sigmas):
            gen = torch.Generator().manual_seed(1000 + i)
            noisy.append(ds.x_test + sigma * torch.randn(ds.x_test.shape, generator=gen))
        rows = {}
        for variant, rs in by_variant.items():
            accs, losses = [], []
            for x in noisy:
                scores = [evaluate(r.model, x, ds.y_test) for r in rs]
                accs.append(summary(a for a, _ in scores))
                losses.append(summary(loss for _, loss in scores))
            rows[variant] = {"test_acc": accs, "test_loss": losses}
        # paired by seed at every σ (the same noisy test set for every model)
        compared = [comparisons({v: row["test_acc"][i] for v, row in rows.items()})
                    for i in range(len(ctx.budget.noise_sigmas))]
        out[dataset] = {"sigmas": list(ctx.budget.noise_sigmas), "variants": rows, "comparisons": compared}
    return out


def plot(result: dict, out_dir: str) -> list[str]:
    from .plots import figure, line_style, save

    fig, axes = figure(ncols=len(result), nrows=2)
    for col, (dataset, res) in enumerate(result.items()):
        sig = res["sigmas"]
        for i, (v, row) in enumerate(res["variants"].items()):
            for r, what in enumerate(("test_acc", "test_loss")):
                scale = 100 if what == "test_acc" else 1
                mean = [s["mean"] * scale for s in row[what]]
                std = [s["std"] * scale for s in row[what]]
                ax = axes[r][col]
                ax.errorbar(sig, mean, yerr=std, marker="o", markersize=3, capsize=2, label=v, **line_style(i, v))
        axes[0][col].set_title(f"{dataset}: Gaussian input noise", fontsize=9)
        axes[0][col].set_ylabel("test accuracy (%)")
        axes[1][col].set_ylabel("test loss")
        axes[1][col].set_yscale("log")
        axes[1][col].set_xlabel("noise σ (units of the data's std)")
        axes[0][col].legend(fontsize=7)
    return [save(fig, out_dir, "noise.png")]


register(Subcommand("noise", "accuracy and loss of the trained models under Gaussian input noise (paper Fig. 4)",
                    run, plot, order=20))
