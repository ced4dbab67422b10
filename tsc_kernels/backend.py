"""Backend selection: which implementation runs an op.

Names: "cuda" (C++/CUDA kernels), "triton", "cpu" (C++ CPU kernels), "torch" (the pure-PyTorch
reference), and "auto", which picks per tensor device: CUDA tensors -> cuda, else triton, else
torch; CPU tensors -> cpu, else torch. The default comes from the environment variable TSC_BACKEND
(read at import); `set_backend` changes it and `use_backend` changes it for a `with` block.
With TRITON_INTERPRET=1 (set before tsc_kernels is imported) the triton backend also runs CPU tensors.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from typing import Iterator

import torch

from . import _extension

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine or for these tensors."""


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name.lower()


_current = _check_name(os.environ.get("TSC_BACKEND", "auto"), "TSC_BACKEND")
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def get_backend() -> str:
    return _current


def set_backend(name: str) -> None:
    """Select the backend for every following op call ("auto", "cuda", "triton", "cpu", "torch")."""
    global _current
    _current = _check_name(name, "backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """`with use_backend("triton"): ...` runs the block's ops on that backend, then restores the previous one."""
    previous = _current
    set_backend(name)
    try:
        yield _current
    finally:
        set_backend(previous)


def _usable(name: str, device: torch.device) -> str | None:
    """None when `name` can run tensors on `device`, else the reason it cannot."""
    if name == "torch":
        return None
    if name == "cpu":
        if not _extension.has_cpp_ops():
            return f"the C++ extension tsc_kernels._C is not built ({_extension.LOAD_ERROR})"
        return None if device.type == "cpu" else f"it runs CPU tensors only, got {device.type} tensors"
    if name == "cuda":
        if not _extension.has_cuda_kernels():
            return ("tsc_kernels._C was built without CUDA kernels "
                    "(no CUDA torch or nvcc at build time, or TSC_BUILD_CUDA=0)")
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None if device.type == "cuda" else f"it runs CUDA tensors only, got {device.type} tensors"
    if name == "triton":
        if not _HAS_TRITON:
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and TRITON_INTERPRET):
            return None
        return (f"it runs CUDA tensors (CPU tensors only with TRITON_INTERPRET=1 set before import), "
                f"got {device.type} tensors")
    raise AssertionError(name)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on this machine; with `device`, those that can run tensors on it."""
    if device is not None:
        devices = [torch.device(device)]
    else:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [n for n in BACKENDS[1:] if any(_usable(n, d) is None for d in devices)]


def resolve(device: torch.device) -> str:
    """The concrete backend that runs tensors on `device` under the current selection."""
    if _current != "auto":
        reason = _usable(_current, device)
        if reason is not None:
            raise BackendUnavailableError(f"tsc_kernels backend {_current!r} is unavailable: {reason}")
        return _current
    order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
    name = next(n for n in order if _usable(n, device) is None)
    if name == "torch" and device.type == "cuda":
        _warn_reference_on_cuda()
    return name


_WARNED_REFERENCE_ON_CUDA = False


def _warn_reference_on_cuda() -> None:
    """Once per process: `auto` found neither the CUDA kernels nor Triton for CUDA tensors, so every
    op runs the pure-PyTorch reference (correct, but none of the fused kernels this package is for)."""
    global _WARNED_REFERENCE_ON_CUDA
    if _WARNED_REFERENCE_ON_CUDA:
        return
    _WARNED_REFERENCE_ON_CUDA = True
    warnings.warn(
        "tsc_kernels: backend 'auto' runs the pure-PyTorch reference on CUDA tensors: "
        f"cuda is unavailable ({_usable('cuda', torch.device('cuda'))}) and triton is unavailable "
        f"({_usable('triton', torch.device('cuda'))}). See tsc_kernels.info().",
        RuntimeWarning, stacklevel=3)
