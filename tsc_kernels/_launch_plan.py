"""Launch plans: the GPU kernels an op launches for given arguments, computed without a GPU.

``launch_plan(op, *args, backend, sms=132, **kwargs)`` (exported as
``tsc_kernels.profiling.launch_plan``; fields in docs/gpu.md) asks the code the launchers
themselves run: for ``backend="cuda"`` the C++ planners (``tsc::cuda_launch_plan``, csrc/launch_plan.h;
host code, present in CPU-only builds too), for ``backend="triton"`` the ``launch_plan`` function of
the op's Triton module, which its launchers call to launch. Arguments are the op's forward
arguments; tensors may live on the ``meta`` device, so ResNet-50's largest activations cost nothing.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any

import torch

from .ops.registry import OPS

BACKENDS = ("cuda", "triton")
FIELDS = ("kernel", "phase", "grid", "threads", "bytes", "chain", "request_bytes", "smem")
_INT_FIELDS = FIELDS[3:]


@functools.lru_cache(maxsize=None)
def _arguments(op: str):
    return torch._C.parse_schema(f"tsc::{op}{OPS[op].schema}").arguments


def _bind(op: str, args: tuple, kwargs: dict) -> list:
    params = _arguments(op)
    if len(args) > len(params):
        raise TypeError(f"launch_plan: {op} takes {len(params)} arguments, got {len(args)}")
    values = list(args)
    for p in params[len(args):]:
        if p.name in kwargs:
            values.append(kwargs.pop(p.name))
        elif p.has_default_value():
            values.append(p.default_value)
        else:
            raise TypeError(f"launch_plan: {op} needs argument {p.name!r}")
    if kwargs:
        raise TypeError(f"launch_plan: {op} has no argument(s) {sorted(kwargs)}")
    return values


def _flatten(op: str, values: list) -> tuple[list, list[int], list[float]]:
    """The op's forward arguments in csrc/launch_plan.h's order."""
    tensors: list = []
    ints: list[int] = []
    floats: list[float] = []
    for p, v in zip(_arguments(op), values):
        t = p.type.getElementType() if isinstance(p.type, torch.OptionalType) else p.type
        item = t.getElementType() if isinstance(t, torch.ListType) else None
        if isinstance(item, torch.TensorType):
            ints.append(len(v))
            tensors.extend(v)
        elif isinstance(t, torch.TensorType):
            tensors.append(v)
        elif isinstance(t, (torch.IntType, torch.BoolType)):
            ints.append(int(v))
        elif isinstance(item, torch.IntType):
            ints.append(len(v))
            ints.extend(int(x) for x in v)
        elif isinstance(t, torch.FloatType):
            floats.append(float(v))
        else:  # pragma: no cover - a schema type no op uses yet
            raise NotImplementedError(f"launch_plan: argument type {p.type} of {op}")
    return tensors, ints, floats


def _cuda_plan(op: str, values: list, sms: int) -> list[dict]:
    tensors, ints, floats = _flatten(op, values)
    names, fields = torch.ops.tsc.cuda_launch_plan(op, tensors, ints, floats, sms)
    plan = []
    for i, name in enumerate(names):
        phase, kernel = name.split(":", 1)
        f = fields[8 * i: 8 * i + 8]
        plan.append(dict(kernel=kernel, phase=phase, grid=tuple(f[:3]), threads=f[3], bytes=f[4], chain=f[5],
                         request_bytes=f[6], smem=f[7]))
    return plan


def _check(op: str, backend: str, plan: list[dict]) -> list[dict]:
    for launch in plan:
        missing = [k for k in FIELDS if k not in launch]
        if missing or launch["phase"] not in ("forward", "backward") or len(launch["grid"]) != 3:
            raise RuntimeError(f"launch_plan: {backend} planner of {op} returned a malformed launch {launch}")
    return plan


def launch_plan(op: str, *args: Any, backend: str, sms: int = 132, **kwargs: Any) -> list[dict]:
    """Every kernel launch, forward then backward, that `op` makes for these arguments on a GPU
    with `sms` SMs: dicts with kernel, phase, grid (3 ints), threads, bytes, chain, request_bytes,
    smem (docs/gpu.md). `op` is a registered op's name ("residual_update", ...)."""
    if not isinstance(op, str) or op not in OPS:
        raise ValueError(f"launch_plan: op must be one of {sorted(OPS)}, got {op!r}")
    if backend not in BACKENDS:
        raise ValueError(f"launch_plan: backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(sms, bool) or not isinstance(sms, int) or sms <= 0:
        raise ValueError(f"launch_plan: sms must be a positive int, got {sms!r}")
    values = _bind(op, args, dict(kwargs))
    if backend == "cuda":
        return _check(op, backend, _cuda_plan(op, values, sms))
    module = importlib.import_module(OPS[op].module)
    return _check(op, backend, module.launch_plan(*values, sms=sms))
