"""stepsizes: the learned Δt of every block (channel mean and spread, paper Table 4), and per stage the
evolution time T = Σ mean Δt and the perturbation bound ∏ (1 + ‖W‖₂ mean Δt) (paper Eq. 7), from
the accuracy experiment's models (tsc_kernels.diagnostics).

Mean and spread are taken per model over the block's channels, then averaged over seeds. The fixed
Δt models are listed for their evolution time and bound (their Δt is the constant itself).
"""
from __future__ import annotations

import statistics

from .. import diagnostics
from .registry import Subcommand, register
from .stats import summary
from .training import TSC_VARIANTS

BOUND_VARIANTS = TSC_VARIANTS + ("dt=1", "dt=0.5", "dt=0.01")


def run(ctx) -> dict:
    variants = [v for v in BOUND_VARIANTS if v in ctx.args.variants]
    if not variants:
        raise ValueError(f"stepsizes needs at least one of the variants {', '.join(BOUND_VARIANTS)}")
    runs = ctx.accuracy_runs(variants)
    out = {}
    for dataset, by_variant in runs.items():
        rows = {}
        for variant, rs in by_variant.items():
            per_seed = [diagnostics.step_sizes(r.model) for r in rs]
            blocks = [{"block": name,
                       "mean": summary(float(dts[name].mean()) for dts in per_seed),
                       "channel_std": statistics.fmean(float(dts[name].std()) if dts[name].numel() > 1 else 0.0
                                                       for dts in per_seed),
                       "min": min(float(dts[name].min()) for dts in per_seed),
                       "max": max(float(dts[name].max()) for dts in per_seed)}
                      for name in per_seed[0]]
            times = [diagnostics.evolution_time(r.model) for r in rs]
            bounds = [diagnostics.stage_stability_bounds(r.model) for r in rs]
            stages = list(times[0])
            rows[variant] = {
                "blocks": blocks,
                "evolution_time": {st: summary(t[st] for t in times) for st in stages},
                "stability_bound": {st: summary(b[st] for b in bounds) for st in stages},
            }
        out[dataset] = {"variants": rows}
    return out


def plot(result: dict, out_dir: str) -> list[str]:
    from .plots import figure, save

    fig, axes = figure(ncols=len(result), width=5.0)
    for col, (dataset, res) in enumerate(result.items()):
        ax = axes[0][col]
        learned = {v: row for v, row in res["variants"].items() if v in TSC_VARIANTS}
        names = []
        for i, (v, row) in enumerate(learned.items()):
            names = [b["block"] for b in row["blocks"]]
            x = range(len(names))
            mean = [b["mean"]["mean"] for b in row["blocks"]]
            ax.fill_between(x, [b["min"] for b in row["blocks"]], [b["max"] for b in row["blocks"]],
                            color=f"C{i}", alpha=0.15)
            ax.plot(x, mean, marker="o", markersize=3, color=f"C{i}", label=f"{v} (mean; band: min–max)")
        stages = [n.rsplit(".", 1)[0] for n in names]
        for i in range(1, len(names)):
            if stages[i] != stages[i - 1]:
                ax.axvline(i - 0.5, color="gray", linestyle=":", linewidth=1)
        ax.axhline(0.5, color="gray", linewidth=0.5)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("learned Δt")
        ax.set_title(f"{dataset}: step sizes per block", fontsize=9)
        ax.legend(fontsize=7)
    return [save(fig, out_dir, "stepsizes.png")]


register(Subcommand("stepsizes", "learned Δt per block, evolution time and stability bound per stage (paper Table 4)",
                    run, plot, order=40))
