"""What tsc-train's command line (cli) and its run (loop) share: ``cli`` imports ``loop`` when it
starts a run, so ``loop`` must not import ``cli`` back.
"""
from __future__ import annotations

import os

RESUME_KEYS = ("dataset", "model", "tsc", "dt", "epochs", "batch", "lr", "momentum", "nesterov", "wd", "milestones",
               "gamma", "seed", "amp", "image_size")  # a resumed run must agree on these with its checkpoint


class UsageError(Exception):
    """Bad command-line input: reported as ``tsc-train: error: <message>``, exit status 2."""


def world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment; (0, 0, 1) without torchrun."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1"))
