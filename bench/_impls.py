"""The implementations every op benchmark compares, by name: the fused op ("fused"), the eager
reference ("eager") and torch.compile of the reference ("compile", compiled once per function).

Importing this module also stops glibc from handing freed memory back to the OS (keep_freed_memory):
with its default settings a loop of fwd+bwd steps over (8,256,56,56) tensors re-faults 25-56 MB of
outputs per step, or not, depending only on the order in which the variant frees its buffers
(measured: fused and eager 14,400 page faults a step, compile 3,100). That is allocator luck, not
kernel speed, so every variant runs with the same memory-keeping settings.
"""
import ctypes
import ctypes.util

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>


def keep_freed_memory() -> bool:
    """Serve allocations up to 32 MB from the heap and never trim it (glibc only; True if applied)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl): leave the allocator alone
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


KEEPS_FREED_MEMORY = keep_freed_memory()

_COMPILED = {}


def implementation(impl: str, fused, ref):
    if impl == "fused":
        return fused
    if impl == "eager":
        return ref
    if impl != "compile":
        raise ValueError(f"impl must be 'fused', 'eager' or 'compile', got {impl!r}")
    if ref not in _COMPILED:
        _COMPILED[ref] = torch.compile(ref, dynamic=False)
    return _COMPILED[ref]
