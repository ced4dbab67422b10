"""Loads the compiled extension tsc_kernels._C, and says so loudly when it cannot.

`import tsc_kernels` works without it: the cpu/cuda backends are then unavailable and `auto` runs
the pure-PyTorch reference. That is a degraded install, never a silent one:

- `_C` missing (never built) or present but failing to load (typically built against another
  torch: a C++ extension links against one torch's exact ABI) warns once at import, naming the
  torch it was built for (tsc_kernels/_build_info.py, written by setup.py at build time), the torch
  running, and the command that rebuilds it;
- `_C` loaded but built for another torch version warns too (it may crash later, where a changed
  symbol is first used);
- TSC_REQUIRE_EXTENSION=1 turns each of these into an ImportError;
- TSC_BACKEND=torch (the user chose the reference) keeps the import quiet.

`tsc_kernels.info()` (and the `tsc-info` command) report the same facts (tsc_kernels/_info.py).
"""
from __future__ import annotations

import glob
import os
import warnings

import torch

REBUILD = ("pip install --no-build-isolation -e .  "
           "(in the source tree; or `pip install --no-build-isolation tsc-kernels`)")
_DIR = os.path.dirname(__file__)

try:  # written by setup.py at build time; absent in a source tree that was never built
    from . import _build_info

    BUILT_FOR_TORCH: str | None = _build_info.TORCH_VERSION
except ImportError:
    BUILT_FOR_TORCH = None


def _candidates() -> list[str]:
    return sorted(glob.glob(os.path.join(_DIR, "_C*.so")) + glob.glob(os.path.join(_DIR, "_C*.pyd")))


try:
    from . import _C  # noqa: F401  (registers the tsc::* schemas and their CPU/CUDA kernels)

    LOAD_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = str(exc)


def problem() -> str | None:
    """Why this install is degraded (one paragraph), or None when _C is loaded and matches torch."""
    built = f"torch {BUILT_FOR_TORCH}" if BUILT_FOR_TORCH else "an unknown torch"
    running = f"torch {torch.__version__}"
    if _C is None and not _candidates():
        return (f"the C++/CUDA extension tsc_kernels._C is not built ({LOAD_ERROR}); only the pure-PyTorch "
                f"reference (and Triton, where installed) can run. Build it against the running {running}: {REBUILD}")
    if _C is None:
        return (f"tsc_kernels._C ({os.path.basename(_candidates()[0])}) was built for {built} but failed to load under "
                f"the running {running}: {LOAD_ERROR}. The cpu/cuda backends are unavailable and `auto` runs the "
                f"pure-PyTorch reference. Rebuild it against the running torch: {REBUILD}")
    if BUILT_FOR_TORCH is not None and BUILT_FOR_TORCH != torch.__version__:
        return (f"tsc_kernels._C was built for torch {BUILT_FOR_TORCH} but {running} is running: a C++ extension "
                f"is tied to the torch it was built against and may fail or crash where the two differ. "
                f"Rebuild it: {REBUILD}")
    return None


def _announce() -> None:
    message = problem()
    if message is None:
        return
    if os.environ.get("TSC_REQUIRE_EXTENSION", "0") == "1":
        raise ImportError(f"tsc_kernels (TSC_REQUIRE_EXTENSION=1): {message}")
    if os.environ.get("TSC_BACKEND", "auto").lower() != "torch":
        warnings.warn(f"tsc_kernels: {message}", RuntimeWarning, stacklevel=2)


_announce()


def has_cpp_ops() -> bool:
    return _C is not None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the built extension registered a kernel for `tsc::<op>` under dispatch_key (CPU/CUDA)."""
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"tsc::{op}", dispatch_key)


# Fixed once the extension is loaded; read on every op call (backend.resolve), so not re-queried.
_HAS_CUDA_KERNELS = has_kernel("residual_update", "CUDA")


def has_cuda_kernels() -> bool:
    return _HAS_CUDA_KERNELS
