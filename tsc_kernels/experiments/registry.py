"""The subcommand registry of tsc-experiment.

A subcommand is a ``Subcommand``: ``run(ctx)`` returns a JSON-able dict of results (it trains what it
needs through ``ctx.trained``, which caches models so ``all`` trains each one once), and
``plot(result, out_dir)`` writes PNGs and returns their paths. ``order`` sorts subcommands in ``all``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable

SUBCOMMANDS: dict[str, "Subcommand"] = {}


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    run: Callable[[Any], dict]
    plot: Callable[[dict, str], list[str]] | None = None
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None  # options of this subcommand only
    summary: Callable[[dict], list[str]] | None = None  # console lines of a result (default: cli.summary_text)
    order: int = 100


def register(sub: Subcommand) -> Subcommand:
    if not isinstance(sub, Subcommand):
        raise TypeError(f"register expects a Subcommand, got {type(sub).__name__}")
    if sub.name in SUBCOMMANDS or sub.name == "all":
        raise ValueError(f"subcommand {sub.name!r} is already registered (or reserved)")
    SUBCOMMANDS[sub.name] = sub
    return sub
