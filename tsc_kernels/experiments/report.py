"""Markdown tables from a tsc-experiment JSON report (docs/experiments.md's tables are made this way),
and optionally the report's plots drawn again (no training).

    python -m tsc_kernels.experiments.report docs/results/full.json [--plots DIR]
    python -m tsc_kernels.experiments.report a.json b.json --merged both.json   # e.g. one run per data set
"""
from __future__ import annotations

import json
import sys

from .stats import fmt, fmt_paired


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


PAIRED_HEADER = ["Δ points", "95 % CI (t)", "p (paired t)", "95 % CI (bootstrap)", "seeds a > b"]


def comparison_table(compared: dict, first: list[str] | None = None) -> list[list[str]]:
    """Rows of paired comparisons {"a - b": stats.paired(...)}, optionally after leading cells."""
    return [(first or []) + [f"`{pair}`"] + fmt_paired(c) for pair, c in compared.items()]


def _data_line(r: dict) -> str:
    """The data set's generator arguments / split, as the accuracy JSON records them (older JSON: none)."""
    d = r.get("data")
    if not d:
        return ""
    sizes = f"{r['train_size']} train / {r['test_size']} test; " if "train_size" in r else ""
    args = d.get("args") or {k: v for k, v in d.items() if k != "source"}
    text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in args.items())
    return f" ({sizes}`{d['source']}`: {text})"


def accuracy(res: dict) -> str:
    out = []
    for dataset, r in res.items():
        rows = [[f"`{v}`", fmt(row["test_acc"]), fmt(row["test_loss"], 1, 3), f"{row['params']:,}",
                 f"{row['train_s']['mean']:.0f}"] for v, row in r["variants"].items()]
        recipe = f", recipe {r['recipe']}" if r.get("recipe", "paper") != "paper" else ""
        out.append(f"**{dataset}**: {r['model']}, {r['epochs']} epochs, {r['seeds']} seeds{recipe}{_data_line(r)}\n\n"
                   + _table(["variant", "test accuracy %", "test loss", "params (training)", "train s / run"], rows))
        compared = r.get("comparisons", {}).get("test_acc")
        if compared:
            out.append(f"**{dataset}**, test accuracy, paired by seed (a − b)\n\n"
                       + _table(["a − b"] + PAIRED_HEADER, comparison_table(compared)))
    return "\n\n".join(out)


def noise(res: dict) -> str:
    out = []
    for dataset, r in res.items():
        header = ["variant"] + [f"σ={s:g}" for s in r["sigmas"]]
        acc = [[f"`{v}`"] + [f"{a['mean'] * 100:.1f} ± {a['std'] * 100:.1f}" for a in row["test_acc"]]
               for v, row in r["variants"].items()]
        loss = [[f"`{v}`"] + [f"{a['mean']:.3f}" for a in row["test_loss"]] for v, row in r["variants"].items()]
        out.append(f"**{dataset}**, test accuracy % (mean ± std over seeds)\n\n" + _table(header, acc)
                   + f"\n\n**{dataset}**, test loss (mean over seeds)\n\n" + _table(header, loss))
        if r.get("comparisons"):
            rows = [row for s, c in zip(r["sigmas"], r["comparisons"]) for row in comparison_table(c, [f"{s:g}"])]
            out.append(f"**{dataset}**, test accuracy under noise, paired by seed (a − b)\n\n"
                       + _table(["σ", "a − b"] + PAIRED_HEADER, rows))
    return "\n\n".join(out)


def depth(res: dict) -> str:
    out = []
    for dataset, r in res.items():
        header = ["variant"] + [str(d) for d in r["depths"]]
        rows = [[f"`{v}`"] + [fmt(x["test_acc"]) for x in row] for v, row in r["variants"].items()]
        out.append(f"**{dataset}**, test accuracy % by depth ({r['epochs']} epochs, {r['seeds']} seed(s))\n\n"
                   + _table(header, rows))
        if r.get("comparisons"):
            rows = [row for d, c in zip(r["depths"], r["comparisons"]) for row in comparison_table(c, [str(d)])]
            out.append(f"**{dataset}**, test accuracy by depth, paired by seed (a − b)\n\n"
                       + _table(["depth", "a − b"] + PAIRED_HEADER, rows))
    return "\n\n".join(out)


def stepsizes(res: dict) -> str:
    out = []
    for dataset, r in res.items():
        learned = {v: row for v, row in r["variants"].items() if not v.startswith("dt=")}
        blocks = [b["block"] for b in next(iter(learned.values()))["blocks"]] if learned else []
        rows = [[b] + [f"{row['blocks'][i]['mean']['mean']:.3f} (±{row['blocks'][i]['channel_std']:.3f})"
                       for row in learned.values()] for i, b in enumerate(blocks)]
        out.append(f"**{dataset}**, learned Δt per block: channel mean (channel std), averaged over seeds\n\n"
                   + _table(["block"] + [f"`{v}`" for v in learned], rows))
        stages = list(next(iter(r["variants"].values()))["evolution_time"])
        rows = [[f"`{v}`"] + [f"{row['evolution_time'][s]['mean']:.2f}" for s in stages]
                + [f"{row['stability_bound'][s]['mean']:.3g}" for s in stages] for v, row in r["variants"].items()]
        out.append(f"**{dataset}**, evolution time T and stability bound per stage (mean over seeds)\n\n"
                   + _table(["variant"] + [f"T {s}" for s in stages] + [f"bound {s}" for s in stages], rows))
    return "\n\n".join(out)


def ode(res: dict) -> str:
    x = res["xor"]
    steps = x["eval_steps"]
    rows = [[f"{n} Euler steps", fmt(r["train_acc"])] + [fmt(r["euler"][str(s)]) for s in steps]
            + [fmt(r["rk4_own"]), fmt(r["rk4_fine"])] for n, r in x["models"].items()]
    out = [f"**XOR toy**, test accuracy % when solved with Euler at each number of steps over [0, 1] "
           f"({x['iters']} Adam iterations, {x['seeds']} seeds)\n\n"
           + _table(["trained with", "train acc"] + [str(s) for s in steps]
                    + ["RK4, own steps", f"RK4, {steps[-1]} steps"], rows)]
    for d, r in res["adaptation"].items():
        steps = r["eval_steps"]
        rows = [[f"`{v}`", ", ".join(map(str, row["final_steps"])), fmt(row["gap_vs_rk4"])]
                + [fmt(row["euler"][str(s)]) for s in steps] for v, row in r["variants"].items()]
        out.append(f"**{d}**, {r['model']}, {r['epochs']} epochs, {r['seeds']} seeds: steps per block at the end, "
                   f"test accuracy gap (train solver − RK4, %), test accuracy % with Euler at each number of steps\n\n"
                   + _table(["training", "final steps", "gap vs RK4"] + [str(s) for s in steps], rows))
    for d, res_d in res["consistency"].items():
        rows = [[f"`{v}`", str(r["depth"]), str(r["epochs"])] + [fmt(a) for a in row]
                for r in res_d["runs"] for v, row in r["variants"].items()]
        out.append(f"**{d}**, {res_d['seeds']} seeds: test accuracy % with every block taken as k sub-steps "
                   "(`refine`)\n\n"
                   + _table(["variant", "depth", "epochs"] + [f"k={f}" for f in res_d["factors"]], rows))
    return "\n\n".join(out)


def trajectory(res: dict) -> str:
    out = []
    for dataset, r in res.items():
        rows = []
        for v, by_recipe in r["variants"].items():
            for recipe, row in by_recipe.items():
                first, last = row["mean"][0], row["mean"][-1]
                rows.append([f"`{v}`", recipe, f"{min(first):.3f}–{max(first):.3f}", f"{min(last):.3f}–{max(last):.3f}",
                             fmt(row["moved_mean"], 1, 3), fmt(row["moved_max"], 1, 3), fmt(row["test_acc"])])
        out.append(f"**{dataset}**, Δt per block (channel mean; range over blocks, mean over seeds) at initialisation "
                   f"and after {r['epochs']} epochs; |Δt_final − Δt_0| mean / max over blocks; {r['seeds']} seeds\n\n"
                   + _table(["variant", "recipe", "Δt at init", "Δt at end", "moved (mean)", "moved (max)",
                             "test accuracy %"], rows))
        rows = [row for v, cs in r["comparisons"].items() for pair, c in cs.items()
                for row in ([[f"`{v}`", f"`{pair}`", "test accuracy"] + fmt_paired(c["test_acc"])]
                            + [[f"`{v}`", f"`{pair}`", "Δt moved (mean)"] + fmt_paired(c["moved_mean"], 1, 3)])]
        out.append(f"**{dataset}**, recipe variant against the paper's, paired by seed\n\n"
                   + _table(["variant", "a − b", "what"] + PAIRED_HEADER, rows))
    return "\n\n".join(out)


SECTIONS = {"accuracy": accuracy, "noise": noise, "depth": depth, "stepsizes": stepsizes, "trajectory": trajectory,
            "ode": ode}


def markdown(report: dict) -> str:
    parts = []
    for name, res in report["results"].items():
        if name in SECTIONS:
            parts.append(f"### {name}\n\n{SECTIONS[name](res)}")
    return "\n\n".join(parts) + "\n"


def replot(report: dict, out_dir: str) -> list[str]:
    """Every subcommand's plots from the report's results (the same functions the run used)."""
    from .cli import discover

    subs = discover()
    return [p for name, res in report["results"].items() if name in subs and subs[name].plot is not None
            for p in subs[name].plot(res, out_dir)]


def merge(reports: list[dict]) -> dict:
    """One report from several runs that never repeat a subcommand on a data set (``--datasets
    digits`` and ``--datasets mnist1d`` run as two processes, or ``ode`` run after ``all`` without
    it): results joined per subcommand and data set; each run's command, machine, versions and wall
    times kept under ``runs``."""
    merged = {"results": {}, "datasets": [], "runs": []}
    seen: dict[str, set] = {}  # subcommand -> data sets already merged
    for r in reports:
        for name in r["results"]:
            overlap = seen.setdefault(name, set()) & set(r["datasets"])
            if overlap:
                raise ValueError(f"the reports to merge must cover different data sets for each subcommand: "
                                 f"{name} on {sorted(overlap)} appears twice")
            seen[name] |= set(r["datasets"])
        merged["datasets"] += [d for d in r["datasets"] if d not in merged["datasets"]]
        merged["runs"].append({k: v for k, v in r.items() if k != "results"})
        _merge_into(merged["results"], r["results"])
    return merged


def _merge_into(dst: dict, src: dict) -> None:
    """Recursive union; where both have a non-dict value the first report's is kept (e.g. the ode
    experiment's XOR toy, which both runs repeat: it does not depend on the data set)."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge_into(dst[k], v)
        else:
            dst.setdefault(k, v)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tsc_kernels.experiments.report", description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", help="tsc-experiment --json reports (several: merged, see merge())")
    p.add_argument("--plots", metavar="DIR", help="also draw the report's plots into DIR")
    p.add_argument("--merged", metavar="PATH", help="write the merged report as JSON")
    args = p.parse_args(argv)
    reports = []
    for path in args.json:
        with open(path) as f:
            reports.append(json.load(f))
    report = reports[0] if len(reports) == 1 else merge(reports)
    if args.merged:
        with open(args.merged, "w") as f:
            json.dump(report, f, indent=1)
    print(markdown(report))
    if args.plots:
        replot(report, args.plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
