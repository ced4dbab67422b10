"""Kernel counting, the GPU-launch proxy of docs/performance.md.

``count_kernels(fn)`` runs ``fn()`` once under torch.profiler (CPU activity) and counts its leaf
compute ops: operator events (``aten::*``, ``tsc::*``, any ``namespace::op``) with no compute op
beneath them. Allocation, view and metadata ops never count (they launch nothing on a GPU); a
copy hidden inside ``to``/``contiguous``/``reshape`` still counts, as the ``aten::copy_`` leaf it
calls. A fused C++ op counts once; a Python function over ten aten calls counts ten.

Multi-tensor ops (``aten::_foreach_*``, what ``torch.optim`` runs with ``foreach=True``) count the
launches they make on a GPU, not the per-tensor ops of the CPU's loop: on a GPU one launch of
``multi_tensor_apply`` covers up to ``_MAX_TENSORS[depth]`` tensors and 320 blocks of 65,536
elements; on a CPU the same op loops over the tensors, one ``add_`` (and for a scalar operand one
scalar-wrapping ``copy_``) per tensor, which would count every parameter of the model three times
per optimizer step.

``launch_plan(op, *args, backend, sms=132)`` (tsc_kernels/_launch_plan.py, docs/gpu.md) is the
other half of the GPU proxy: the grids, chains and request sizes of the kernels an op launches on a
GPU, from the launchers' own planning code.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
from typing import Callable, Iterator

from torch.profiler import ProfilerActivity, profile

from ._launch_plan import launch_plan  # noqa: F401  (public: tsc_kernels.profiling.launch_plan)

# Kineto's own log lines ("USDT:2026-12-06 03:49:05 7862:7862 SyncActivityProfilerHandler.cpp:39]
# profiler_start", "ERROR:... DeviceProperties.cpp:56] gpuGetDeviceCount failed" on a machine
# without a GPU): written by C++ straight to file descriptor 2, two or three per profiled call.
_KINETO_LINE = re.compile(rb"^(USDT|INFO|WARNING|ERROR):\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \S+\.cpp:\d+\]")


@contextlib.contextmanager
def quiet_profiler() -> Iterator[None]:
    """Silence kineto's log lines while torch.profiler runs (``make bench`` profiles every variant:
    hundreds of ``USDT: ... profiler_start/stop`` lines scrolled past before). File descriptor 2 goes
    to a temporary file for the block; afterwards every line that is not a kineto log line (a
    Python warning, an error message) is written back to stderr, so nothing else is lost."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a descriptor (pytest capture)
        fd = 2
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().splitlines(keepends=True) if not _KINETO_LINE.match(line)]
            if kept:
                os.write(fd, b"".join(kept))

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
    internal = ("autograd::", "torch::autograd::", "profiler::", "ProfilerStep")
    if "::" not in name or " " in name or name.startswith(internal):
        return False
    return True


def _is_compute(name: str) -> bool:
    return _is_op(name) and name not in METADATA_OPS


def _has_compute_below(event) -> bool:
    return any(_is_compute(c.name) or _has_compute_below(c) for c in event.cpu_children)


# multi_tensor_apply's limits (ATen/native/cuda/MultiTensorApply.cuh): tensors per launch by the
# number of tensor lists (depth 1..5), blocks per launch, elements per block.
_MAX_TENSORS = (110, 64, 48, 36, 30)
_MAX_BLOCKS = 320
_CHUNK = 65536


def _is_foreach(name: str) -> bool:
    return name.startswith("aten::_foreach_")


def _has_ancestor(event, predicate: Callable[[str], bool]) -> bool:
    """Whether an event that encloses ``event`` (its CPU parent, or theirs) has a name ``predicate`` accepts."""
    p = event.cpu_parent
    while p is not None:
        if predicate(p.name):
            return True
        p = p.cpu_parent
    return False


def _under_foreach(event) -> bool:
    return _has_ancestor(event, _is_foreach)


def multi_tensor_launches(numels: list[int], depth: int) -> int:
    """Launches of one ``multi_tensor_apply`` over tensors of these sizes on a GPU (``depth``
    tensor lists): a launch goes when its tensor table or its block table is full, and a tensor
    whose chunks straddle a launch starts the next table."""
    max_tensors = _MAX_TENSORS[min(max(depth, 1), len(_MAX_TENSORS)) - 1]
    launches = tensors = blocks = 0
    for numel in numels:
        if numel == 0:
            continue
        tensors += 1
        chunks = -(-numel // _CHUNK)
        for chunk in range(chunks):
            blocks += 1
            last = chunk == chunks - 1
            if (tensors == max_tensors and last) or blocks == _MAX_BLOCKS:
                launches += 1
                blocks = 0
                tensors = 0 if last else 1
    return launches + (blocks > 0)


def _foreach_launches(event) -> int:
    # The CPU loop runs one op per tensor; its first input's shape is that tensor's, and the
    # number of non-scalar inputs is the number of tensor lists. An op without such children
    # (a GPU's fused implementation) is one launch.
    per_tensor = [c for c in event.cpu_children if _is_compute(c.name)]
    shapes = [c.input_shapes for c in per_tensor if c.input_shapes and c.input_shapes[0]]
    if not shapes:
        return 1
    depth = sum(1 for s in shapes[0] if s)
    return multi_tensor_launches([math.prod(s[0]) for s in shapes], depth)


def _counted(events) -> dict[str, int]:
    names: dict[str, int] = {}
    for e in events:
        if _is_foreach(e.name):
            n = 0 if _under_foreach(e) else _foreach_launches(e)
        elif _is_compute(e.name) and not _has_compute_below(e):
            n = 0 if _under_foreach(e) else 1
        else:
            n = 0
        if n:
            names[e.name] = names.get(e.name, 0) + n
    return names


def kernel_names(fn: Callable[[], object]) -> dict[str, int]:
    """The counted kernels of one call of ``fn()`` by op name (forward and, if fn runs it, backward).

    Call fn once before counting so that one-time work (lazy initialisation, compilation) is not
    counted; this function itself runs fn exactly once.
    """
    # shapes: the per-tensor sizes of multi-tensor ops
    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return _counted(prof.events())


def count_kernels(fn: Callable[[], object]) -> int:
    """The number of kernels of one call of ``fn()``: the sum of ``kernel_names(fn)``."""
    return sum(kernel_names(fn).values())


def _under_op(event) -> bool:
    return _has_ancestor(event, _is_op)


def count_ops(fn: Callable[[], object]) -> tuple[int, int]:
    """(all, top) operator calls of one call of ``fn()``: every ``namespace::op`` event the profiler
    records, metadata ops and ops called by other ops included (each is a pass through the
    dispatcher), and the top-level ones among them, called from Python or by the autograd engine
    rather than by another op (where most of the host's cost per op is paid; ``tsc-bench --host``).
    Call fn once before, as for kernel_names."""
    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = [e for e in prof.events() if _is_op(e.name)]
    return len(ops), sum(1 for e in ops if not _under_op(e))
