"""Checkpoints of tsc-train: atomic writes, corruption reported, every RNG state.

A checkpoint is written to a temporary file in the same folder, flushed and fsync'ed, then renamed
over its target and the folder fsync'ed: a crash at any moment leaves either the previous complete
file or the new complete one, never a truncated one. Files are read with ``weights_only=True``
(tensors, numbers, strings, lists and dicts only), so a checkpoint cannot run code when loaded.
"""
from __future__ import annotations

import os
import random
import re

import numpy as np
import torch

WRITTEN: set[str] = set()  # every file this process wrote (the torchrun test checks that rank 1 wrote none)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (corrupt, truncated, not a tsc-train checkpoint)."""


def atomic_write(path: str, write) -> None:
    """``write(fileobj)`` into ``path`` atomically (module docstring)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        WRITTEN.add(os.path.abspath(path))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fd = os.open(folder, os.O_RDONLY)
    try:  # the rename itself is durable only once the folder's entry is on disk
        os.fsync(fd)
    finally:
        os.close(fd)


def save(obj, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temporaries(folder: str) -> None:
    """Temporary files left by a process killed while writing (their targets are intact)."""
    for name in os.listdir(folder):
        if re.fullmatch(r"\..+\.tmp\d+", name):
            os.unlink(os.path.join(folder, name))


def load(path: str) -> dict:
    """The checkpoint at ``path``; CheckpointError naming the file when it cannot be read."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip reader, unpickler and EOF errors all mean the same to the user
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(blob, dict) or blob.get("format") != "tsc-train/1":
        raise CheckpointError(f"checkpoint {path} was not written by tsc-train")
    return blob


def rng_state() -> dict:
    """Every RNG state this process draws from: Python, NumPy, torch CPU and each CUDA device."""
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
