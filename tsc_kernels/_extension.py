"""Loads the compiled extension tsc_kernels._C, if it was built.

`import tsc_kernels` works without it: the cpu/cuda backends are then simply unavailable.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers the tsc::* schemas and their CPU/CUDA kernels)

    LOAD_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = str(exc)


def has_cpp_ops() -> bool:
    return _C is not None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the built extension registered a kernel for `tsc::<op>` under dispatch_key (CPU/CUDA)."""
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"tsc::{op}", dispatch_key)


# Fixed once the extension is loaded; read on every op call (backend.resolve), so not re-queried.
_HAS_CUDA_KERNELS = has_kernel("residual_update", "CUDA")


def has_cuda_kernels() -> bool:
    return _HAS_CUDA_KERNELS
