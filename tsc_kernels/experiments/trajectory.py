"""trajectory: does Δt learn? (issue 24) Δt per block after every epoch of the learned variants
(TSC_LSTM, TSC_indp) under the paper's recipe and under recipe "ctrl_nowd" (no weight decay on the
controller's parameters, training.RECIPES), on the accuracy experiment's setting.

The obvious explanation of a Δt that stays at its initial 0.5: the controllers end in a sigmoid that
outputs exactly 0.5 when their weights (indp: θ) are 0, and weight decay pulls them there at the same
rate as the convs. Without it, does Δt move, and does accuracy change? Per variant and data set:
the mean trajectory over seeds, how far Δt moved from its initial value (mean over blocks of
|Δt_final − Δt_0|, channel means), and the paired accuracy difference ctrl_nowd − paper.

The paper-recipe runs are the accuracy experiment's (shared through the cache when ``--recipe paper``).
"""
from __future__ import annotations

import statistics

from .registry import Subcommand, register
from .stats import paired, summary
from .training import RECIPES

TRAJECTORY_VARIANTS = ("tsc_lstm", "tsc_indp")
RECIPE_ORDER = ("paper", "ctrl_nowd")  # the baseline first: comparisons read as variant − paper


def moved(traj: dict) -> tuple[float, float]:
    """(mean, max) over blocks of |Δt after the last epoch − Δt at initialisation| (channel means)."""
    first, last = traj["mean"][0], traj["mean"][-1]
    deltas = [abs(b - a) for a, b in zip(first, last)]
    return statistics.fmean(deltas), max(deltas)


def mean_trajectory(trajs: list[dict]) -> list[list[float]]:
    """[epoch][block] mean over seeds of the channel-mean Δt."""
    return [[statistics.fmean(t["mean"][e][b] for t in trajs) for b in range(len(trajs[0]["blocks"]))]
            for e in range(len(trajs[0]["mean"]))]


def run(ctx) -> dict:
    assert set(RECIPE_ORDER) == set(RECIPES)  # a new recipe belongs in this comparison too
    variants = [v for v in TRAJECTORY_VARIANTS if v in ctx.args.variants] or ["tsc_lstm"]
    runs = {r: ctx.accuracy_runs(variants, recipe=r) for r in RECIPE_ORDER}
    out = {}
    for d in ctx.args.datasets:
        rows, compared = {}, {}
        for v in variants:
            rows[v] = {}
            for r in RECIPE_ORDER:
                rs = runs[r][d][v]
                trajs = [x.dt_trajectory for x in rs]
                moves = [moved(t) for t in trajs]
                rows[v][r] = {"blocks": trajs[0]["blocks"], "mean": mean_trajectory(trajs), "per_seed": trajs,
                              "moved_mean": summary(m for m, _ in moves), "moved_max": summary(m for _, m in moves),
                              "test_acc": summary(x.test_acc for x in rs)}
            base = rows[v][RECIPE_ORDER[0]]
            compared[v] = {f"{r} - {RECIPE_ORDER[0]}": {
                               "test_acc": paired(rows[v][r]["test_acc"], base["test_acc"]),
                               "moved_mean": paired(rows[v][r]["moved_mean"], base["moved_mean"])}
                           for r in RECIPE_ORDER[1:]}
        out[d] = {"epochs": ctx.budget.epochs[d], "seeds": ctx.budget.seeds, "recipes": list(RECIPE_ORDER),
                  "variants": rows, "comparisons": compared}
    return out


def summary_lines(result: dict) -> list[str]:
    lines = []
    for d, res in result.items():
        for v, by_recipe in res["variants"].items():
            parts = [f"{r}: |ΔΔt| {row['moved_mean']['mean']:.3f} acc {row['test_acc']['mean'] * 100:.1f}"
                     for r, row in by_recipe.items()]
            lines.append(f"{d:12s} {v:9s} " + "  ".join(parts))
    return lines


def plot(result: dict, out_dir: str) -> list[str]:
    from .plots import figure, save

    variants = list(dict.fromkeys(v for res in result.values() for v in res["variants"]))
    fig, axes = figure(ncols=len(result), nrows=len(variants), width=4.0, height=2.8)
    styles = {"paper": "-", "ctrl_nowd": "--"}
    for col, (d, res) in enumerate(result.items()):
        for row_i, v in enumerate(variants):
            ax = axes[row_i][col]
            for r, row in res["variants"].get(v, {}).items():
                stages = [b.rsplit(".", 1)[0] for b in row["blocks"]]
                colour = {s: f"C{i}" for i, s in enumerate(dict.fromkeys(stages))}
                for b, name in enumerate(row["blocks"]):
                    ys = [epoch[b] for epoch in row["mean"]]
                    ax.plot(range(len(ys)), ys, linestyle=styles.get(r, ":"), color=colour[stages[b]], linewidth=1,
                            label=f"{stages[b]} ({r})" if name.endswith(".0") else None)
            ax.axhline(0.5, color="gray", linewidth=0.5)
            ax.set_title(f"{d}: {v}, Δt per block (mean over {res['seeds']} seeds)", fontsize=8)
            ax.set_xlabel("epoch")
            ax.set_ylabel("Δt (channel mean)")
            ax.legend(fontsize=6, ncol=2)
    return [save(fig, out_dir, "trajectory.png")]


register(Subcommand("trajectory", "learned Δt per block after every epoch, paper recipe vs no weight decay on the "
                    "controller (issue 24)", run, plot, summary=summary_lines, order=45))
