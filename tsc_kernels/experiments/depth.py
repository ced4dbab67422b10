"""depth: plain vs TSC_LSTM at growing depth (paper Fig. 5): CIFAR ResNets (basic blocks) on digits,
1-D ResNets on MNIST-1D; with the controls of issue 24, a fixed Δt = 0.5 (the controller's initial
value: is it the scale, not the controller, that keeps deep networks trainable?) and TSC_indp (a
learned per-block, per-channel Δt without a controller reading the weights), paired by seed at every
depth (stats.COMPARISONS)."""
from __future__ import annotations

from .registry import Subcommand, register
from .stats import comparisons, summary
from .training import model_name

DEPTH_VARIANTS = ("plain", "tsc_lstm", "dt=0.5", "tsc_indp")


def run(ctx) -> dict:
    b = ctx.budget
    variants = [v for v in DEPTH_VARIANTS if v in ctx.args.variants] or list(DEPTH_VARIANTS)
    keys = {(d, v, depth, s): ctx.key(d, v, s, depth=depth, epochs=b.depth_epochs[d])
            for d in ctx.args.datasets for depth in b.depths[d] for v in variants for s in range(b.depth_seeds)}
    runs = dict(zip(keys, ctx.train_all(list(keys.values()), "depth")))
    out = {}
    for d in ctx.args.datasets:
        rows = {}
        for v in variants:
            rows[v] = [{"depth": depth, "model": model_name(d, depth),
                        "test_acc": summary(runs[(d, v, depth, s)].test_acc for s in range(b.depth_seeds)),
                        "test_loss": summary(runs[(d, v, depth, s)].test_loss for s in range(b.depth_seeds)),
                        "train_s": summary(runs[(d, v, depth, s)].train_s for s in range(b.depth_seeds))}
                       for depth in b.depths[d]]
        compared = [comparisons({v: rows[v][i]["test_acc"] for v in variants}) for i in range(len(b.depths[d]))]
        out[d] = {"depths": list(b.depths[d]), "epochs": b.depth_epochs[d], "seeds": b.depth_seeds,
                  "recipe": ctx.recipe, "variants": rows, "comparisons": compared}
    return out


def plot(result: dict, out_dir: str) -> list[str]:
    from .plots import figure, save

    fig, axes = figure(ncols=len(result))
    for col, (dataset, res) in enumerate(result.items()):
        ax = axes[0][col]
        for i, (v, rows) in enumerate(res["variants"].items()):
            ax.errorbar([r["depth"] for r in rows], [r["test_acc"]["mean"] * 100 for r in rows],
                        yerr=[r["test_acc"]["std"] * 100 for r in rows], marker="o", capsize=2, color=f"C{i}", label=v)
        ax.set_xscale("log")
        ax.set_xticks(res["depths"], [str(d) for d in res["depths"]])
        ax.minorticks_off()
        ax.set_xlabel("depth (layers)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{dataset}: {res['epochs']} epochs, {res['seeds']} seed(s)", fontsize=9)
        ax.legend(fontsize=7)
    return [save(fig, out_dir, "depth.png")]


register(Subcommand("depth", "plain, TSC_LSTM, Δt = 0.5 and TSC_indp accuracy at growing depth (paper Fig. 5)",
                    run, plot, order=30))
