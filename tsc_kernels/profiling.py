"""Kernel counting, the GPU-launch proxy of docs/performance.md.

``count_kernels(fn)`` runs ``fn()`` once under torch.profiler (CPU activity) and counts its leaf
compute ops: operator events (``aten::*``, ``tsc::*``, any ``namespace::op``) with no compute op
beneath them. Allocation, view and metadata ops never count (they launch nothing on a GPU); a
copy hidden inside ``to``/``contiguous``/``reshape`` still counts, as the ``aten::copy_`` leaf it
calls. A fused C++ op counts once; a Python function over ten aten calls counts ten.
"""
from __future__ import annotations

from typing import Callable

from torch.profiler import ProfilerActivity, profile

# Ops that only allocate, alias or describe tensors (docs/performance.md's list and their close relatives).
METADATA_OPS = frozenset(
    "aten::" + n
    for n in (
        "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_",
        "view", "_unsafe_view", "view_as", "reshape", "_reshape_alias", "as_strided", "expand", "expand_as",
        "t", "transpose", "permute", "select", "slice", "narrow", "split", "split_with_sizes", "unbind",
        "chunk", "squeeze", "unsqueeze", "flatten", "unflatten", "movedim", "alias", "detach", "detach_",
        "contiguous", "to", "_to_copy", "lift_fresh", "resolve_conj", "resolve_neg", "numpy_T", "matrix_H",
        "set_", "_has_compatible_shallow_copy_type", "is_same_size", "result_type",
    )
)


def _is_op(name: str) -> bool:
    # Operator events are "namespace::name"; profiler, autograd-node and Python-function events
    # ("autograd::engine::evaluate_function: ...", "torch::autograd::GraphRoot", "MmBackward0",
    # "[memory]") are not.
    if "::" not in name or " " in name or name.startswith(("autograd::", "torch::autograd::", "profiler::", "ProfilerStep")):
        return False
    return True


def _is_compute(name: str) -> bool:
    return _is_op(name) and name not in METADATA_OPS


def _has_compute_below(event) -> bool:
    return any(_is_compute(c.name) or _has_compute_below(c) for c in event.cpu_children)


def count_kernels(fn: Callable[[], object]) -> int:
    """Leaf compute ops of one call of ``fn()`` (forward and, if fn runs it, backward).

    Call fn once before counting so that one-time work (lazy initialisation, compilation) is not
    counted; this function itself runs fn exactly once.
    """
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if _is_compute(e.name) and not _has_compute_below(e))


def kernel_names(fn: Callable[[], object]) -> dict[str, int]:
    """The counted leaf ops of one call of ``fn()`` by name (for reports and debugging)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names: dict[str, int] = {}
    for e in prof.events():
        if _is_compute(e.name) and not _has_compute_below(e):
            names[e.name] = names.get(e.name, 0) + 1
    return names
