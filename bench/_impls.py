"""The implementations every op benchmark compares, by name: the fused op ("fused"), the eager
reference ("eager") and torch.compile of the reference ("compile", compiled once per function)."""
import torch

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
