"""Command line of tsc-experiment: options shared by every subcommand, the JSON report, the plots."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import sys
import time

import torch

from . import budget as budget_mod
from .data import DATASETS
from .registry import SUBCOMMANDS
from .data import family
from .training import ARCHS, RECIPES, VARIANTS, Context
from .._info import package_version as _version


def discover() -> dict:
    """Import every module of this package, so each one that registers a subcommand is known."""
    package = sys.modules[__package__]
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__package__}.{info.name}")
    return dict(sorted(SUBCOMMANDS.items(), key=lambda kv: (kv[1].order, kv[0])))


def _name_list(allowed, what):
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, bad)) or '(empty list)'}; choose from {', '.join(allowed)}")
        return list(dict.fromkeys(names))
    return parse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser(subcommands: dict) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quick", action="store_true",
                        help="tiny budget: the whole suite in < 3 minutes (CI, first look)")
    common.add_argument("--json", metavar="PATH", help="write results, budget, machine and versions as JSON")
    common.add_argument("--out", metavar="DIR", help="write PNG plots into DIR")
    common.add_argument("--datasets", type=_name_list(DATASETS, "dataset"), default=list(DATASETS),
                        help=f"comma-separated, from {', '.join(DATASETS)} (default: all; digits_small and "
                             "mnist1d_hard are the harder settings, docs/experiments.md)")
    common.add_argument("--variants", type=_name_list(list(VARIANTS), "variant"), default=list(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)} (default: all)")
    common.add_argument("--arch", choices=ARCHS, default="resnet",
                        help="architecture of the accuracy, noise and stepsizes runs on digits (depth and ode study "
                             "ResNets): resnet (cifar_resnet), lm_resnet (cifar_lm_resnet, stochastic depth), "
                             "densenet (cifar_densenet40, k=12)")
    common.add_argument("--recipe", choices=list(RECIPES), default="paper",
                        help="training recipe of every run (default paper: weight decay 1e-4 on every parameter); "
                             "ctrl_nowd: no weight decay on the Δt controller's parameters. The trajectory "
                             "subcommand trains both whatever this says")
    common.add_argument("--seeds", type=_positive, help="number of seeds (overrides the budget)")
    common.add_argument("--epochs", type=_positive, help="epochs of every training run (overrides the budget)")
    common.add_argument("--threads", type=_positive, default=1,
                        help="torch intra-op threads (default 1: these models are tiny; "
                             "on shared cores more threads are slower)")
    common.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser = argparse.ArgumentParser(prog="tsc-experiment", description=sys.modules[__package__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join([*subcommands, "all"]) + "}", required=True)
    for name, s in subcommands.items():
        p = sub.add_parser(name, parents=[common], help=s.help)
        if s.add_arguments is not None:
            s.add_arguments(p)
    all_parser = sub.add_parser("all", parents=[common],
                                help="every subcommand above, in order, sharing trained models")
    all_parser.add_argument("--skip", type=_name_list(list(subcommands), "subcommand"), default=[],
                            help=f"comma-separated subcommands to leave out of all (from {', '.join(subcommands)})")
    return parser


def environment() -> dict:
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version()},
        "versions": {d: _version(d) for d in ("torch", "tsc-kernels", "numpy", "scikit-learn", "mnist1d",
                                               "matplotlib", "tqdm")},
    }


def main(argv=None) -> int:
    subcommands = discover()
    parser = build_parser(subcommands)
    args = parser.parse_args(argv)
    if args.arch != "resnet" and any(family(d) != "digits" for d in args.datasets):
        parser.error(f"--arch {args.arch} needs --datasets digits or digits_small (mnist1d trains 1-D ResNets)")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, subcommands, argv)
    finally:
        torch.set_num_threads(threads)


def _run(args, subcommands: dict, argv) -> int:
    from .. import backend

    budget = (budget_mod.QUICK if args.quick else budget_mod.FULL).with_overrides(args.seeds, args.epochs)
    ctx = Context(args, budget, progress=not args.no_progress)
    skip = getattr(args, "skip", [])
    chosen = [n for n in subcommands if n not in skip] if args.command == "all" else [args.command]
    report = {"command": ["tsc-experiment", *(sys.argv[1:] if argv is None else argv)], "quick": args.quick,
              **environment(), "backend": backend.get_backend(), "datasets": args.datasets, "arch": args.arch,
              "variants": args.variants, "recipe": args.recipe, "budget": budget.to_json(), "results": {}, "plots": [],
              "wall_s": {}}
    for name in chosen:
        start = time.perf_counter()
        result = subcommands[name].run(ctx)
        report["wall_s"][name] = time.perf_counter() - start
        report["results"][name] = result
        if args.out and subcommands[name].plot is not None:
            report["plots"] += subcommands[name].plot(result, args.out)
        lines = subcommands[name].summary
        print(summary_text(name, result) if lines is None else "\n".join([f"== {name}", *lines(result)]), flush=True)
        if args.json:  # after every subcommand, so a long run that is stopped keeps what it finished
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1, allow_nan=True)
    return 0


def summary_text(name: str, result: dict) -> str:
    """A few human-readable lines per subcommand (the JSON has everything)."""
    from .stats import fmt, fmt_paired

    lines = [f"== {name}"]
    for dataset, res in result.items():
        compared = res.get("comparisons", {})
        if name == "accuracy":
            compared = {"": compared["test_acc"]}
        elif name in ("noise", "depth"):  # one set per σ / depth
            labels = res["sigmas"] if name == "noise" else res["depths"]
            compared = {f"{'σ=' if name == 'noise' else 'depth '}{x:g} ": c for x, c in zip(labels, compared)}
        for where, cs in compared.items():
            for pair, c in cs.items():
                diff, ci, p, _, wins = fmt_paired(c)
                lines.append(f"{dataset:12s} {where}{pair}: {diff} points, 95% CI {ci}, p {p}, wins {wins}")
        for v, row in res.get("variants", {}).items():
            if name == "accuracy":
                lines.append(f"{dataset:8s} {v:9s} acc {fmt(row['test_acc'])} %  loss {fmt(row['test_loss'], 1, 3)}")
            elif name == "noise":
                accs = "  ".join(f"σ={s:g}: {a['mean'] * 100:.1f}" for s, a in zip(res["sigmas"], row["test_acc"]))
                lines.append(f"{dataset:8s} {v:9s} {accs}")
            elif name == "depth":
                accs = "  ".join(f"{r['depth']}: {fmt(r['test_acc'])}" for r in row)
                lines.append(f"{dataset:8s} {v:9s} {accs}")
            elif name == "stepsizes":
                t = "  ".join(f"{st} T={s['mean']:.2f}" for st, s in row["evolution_time"].items())
                lines.append(f"{dataset:8s} {v:9s} {t}")
    return "\n".join(lines)
