"""`tsc_kernels.info()`: what this install can run and why not (the `tsc-info` command prints it).

The first thing to paste into a bug report, and the place a degraded install explains itself: the
versions running, the torch the extension was built for, and for each backend either None (usable)
or the reason it is not.
"""
from __future__ import annotations

import importlib.metadata
import json
import platform
import sys

import torch

from . import _extension, backend


def package_version(dist: str) -> str | None:
    """The installed version of distribution `dist`, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def info() -> dict:
    """A JSON-serialisable report of this install:

    - ``versions``: tsc_kernels, python, torch, torch's CUDA, triton (None when absent);
    - ``extension``: whether ``tsc_kernels._C`` loaded, the torch it was built for, its load error,
      and ``problem``: why the install is degraded (None when it is not);
    - ``backends``: every concrete backend -> None when it can run on this machine, else the reason
      (for each device this machine has: ``cpu``, and ``cuda`` when a GPU is visible);
    - ``default``: the current selection (TSC_BACKEND / set_backend) and what it resolves to per device.
    """
    from ._version import __version__

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    reasons = {}
    for name in backend.BACKENDS[1:]:
        why = [backend._usable(name, d) for d in devices]
        reasons[name] = None if any(w is None for w in why) else "; ".join(dict.fromkeys(why))
    resolved = {}
    for d in devices:
        try:
            resolved[d.type] = backend.resolve(d)
        except backend.BackendUnavailableError as exc:
            resolved[d.type] = f"unavailable: {exc}"
    return {
        "versions": {
            "tsc_kernels": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "triton": package_version("triton"),
        },
        "extension": {
            "loaded": _extension.has_cpp_ops(),
            "cuda_kernels": _extension.has_cuda_kernels(),
            "built_for_torch": _extension.BUILT_FOR_TORCH,
            "load_error": _extension.LOAD_ERROR,
            "problem": _extension.problem(),
        },
        "backends": reasons,
        "default": {"selected": backend.get_backend(), **resolved},
        "triton_interpret": backend.TRITON_INTERPRET,
    }


def main() -> int:
    report = info()
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
