"""accuracy: test accuracy of plain, TSC_LSTM, TSC_2fc, TSC_indp and fixed Δt = 1 / 0.01 (paper Table 2's
ablation and Fig. 4's baselines) and Δt = 0.5 (the controllers' initial value, issue 24), mean ± std over
seeds, on every data set; paired comparisons by seed (stats.COMPARISONS: difference, paired t-test,
t and bootstrap intervals)."""
from __future__ import annotations

from .registry import Subcommand, register
from .data import load, spec
from .stats import comparisons, summary
from .training import model_name


def run(ctx) -> dict:
    runs = ctx.accuracy_runs(ctx.args.variants)
    out = {}
    for dataset, by_variant in runs.items():
        rows = {}
        for variant, rs in by_variant.items():
            rows[variant] = {
                "test_acc": summary(r.test_acc for r in rs),
                "test_loss": summary(r.test_loss for r in rs),
                "final_train_loss": summary(r.train_loss[-1] for r in rs),
                "train_s": summary(r.train_s for r in rs),
                "params": sum(p.numel() for p in rs[0].model.parameters()),
                "train_loss_curves": [r.train_loss for r in rs],
            }
            if rs[0].dt_trajectory is not None:
                rows[variant]["dt_trajectories"] = [r.dt_trajectory for r in rs]
        depth = ctx.key(dataset, "plain", 0).depth
        out[dataset] = {"model": model_name(dataset, depth, ctx.arch), "epochs": ctx.budget.epochs[dataset],
                        "seeds": ctx.budget.seeds, "recipe": ctx.recipe, "data": spec(dataset),
                        "train_size": len(load(dataset).x_train[:ctx.budget.train_subset[dataset]]),
                        "test_size": len(load(dataset).x_test),
                        "variants": rows,
                        "comparisons": {"test_acc": comparisons({v: row["test_acc"] for v, row in rows.items()}),
                                        "test_loss": comparisons({v: row["test_loss"] for v, row in rows.items()})}}
    return out


def plot(result: dict, out_dir: str) -> list[str]:
    from .plots import figure, line_style, save

    fig, axes = figure(ncols=len(result), nrows=2)
    for col, (dataset, res) in enumerate(result.items()):
        names = list(res["variants"])
        means = [res["variants"][v]["test_acc"]["mean"] * 100 for v in names]
        stds = [res["variants"][v]["test_acc"]["std"] * 100 for v in names]
        ax = axes[0][col]
        ax.bar(range(len(names)), means, yerr=stds, capsize=3, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        low = min(m - s for m, s in zip(means, stds))
        ax.set_ylim(max(0.0, low - 5), 100)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{dataset}: {res['model']}, {res['epochs']} epochs, {res['seeds']} seeds", fontsize=9)
        ax = axes[1][col]
        for i, v in enumerate(names):
            curves = res["variants"][v]["train_loss_curves"]
            mean = [sum(c[e] for c in curves) / len(curves) for e in range(len(curves[0]))]
            ax.plot(range(1, len(mean) + 1), mean, label=v, **line_style(i, v))
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss (mean over seeds)")
        ax.legend(fontsize=7)
    return [save(fig, out_dir, "accuracy.png")]


register(Subcommand("accuracy", "test accuracy of plain / TSC / fixed-Δt models, mean ± std over seeds",
                    run, plot, order=10))
