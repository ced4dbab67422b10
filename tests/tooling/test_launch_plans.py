"""GPU launch plans at real ResNet shapes, checked on the CPU (issue 22; docs/gpu.md, launch plans).

``launch_plan`` asks the code the launchers run (C++ planners for CUDA, the Triton modules' own
plans), with meta tensors, so ResNet-50's largest activations cost nothing. Every plan of the table
below, both GPU backends, both layouts, fp32 and bf16, must meet the rules a GPU needs to be fed:
grids within CUDA's limits, enough blocks for every launch that moves real data, no long dependent
chain, coalesced requests, shared memory within the default 48 KB. A plan that breaks one fails here.

The Triton plans are also compared with the launches the Triton launchers really make (under the
interpreter, small shapes): a plan that drifts from its launcher fails too.
"""
from __future__ import annotations

import os

import pytest
import torch

from tsc_kernels._launch_plan import BACKENDS, launch_plan
from tsc_kernels.launch_rules import (BIG, KNOWN_VIOLATIONS, SMS, batch_norm_args, cases, controller_args, meta_tensor,
                                      multistep_args, ode_args, residual_args, scale_concat_args, violations)
from tsc_kernels.ops.registry import OPS

CASES = cases()

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}-{c[0]}" for c in CASES])
def test_plan_meets_the_rules(case, backend, request):
    case_id, op, args = case
    known = KNOWN_VIOLATIONS.get((op, backend, case_id))
    if known:  # a defect still open (issue 22): strict, so the fix fails here until its entry goes
        request.applymarker(pytest.mark.xfail(strict=True, reason=known))
    plan = launch_plan(op, *args, backend=backend, sms=SMS)
    phases = {launch["phase"] for launch in plan}
    assert phases == {"forward", "backward"}, f"{op} plans {phases}: forward and backward launches expected"
    assert violations(op, args, plan) == []


def test_every_op_is_in_the_table():
    assert {op for _, op, _ in CASES} == set(OPS)


def test_the_rules_can_fail():
    """The checker itself: a serial 1024-step finalize on few programs and a 4-byte request break the rules."""
    launch = dict(kernel="k", phase="forward", grid=(2, 1, 1), threads=256, bytes=BIG, chain=1024, request_bytes=4,
                  smem=64 * 1024)
    bad = violations("residual_update", (), [launch])
    assert len(bad) == 4, bad
    bad = violations("lstm_controller", (None, [3, 200]), [launch | dict(bytes=1, chain=200, smem=0)] * 2)
    assert len(bad) == 1 and "only the recurrent cell" in bad[0], bad


@pytest.mark.parametrize("op", sorted(OPS))
def test_cuda_planner_registered(op):
    """Every registered op has a CUDA planner in the extension (host code: CPU-only builds answer too)."""
    case = next(c for c in CASES if c[1] == op)
    assert launch_plan(op, *case[2], backend="cuda")


def test_bad_arguments():
    y = meta_tensor(2, 3, 4, 4)
    args = (y, y, meta_tensor(3), False)
    with pytest.raises(ValueError, match="op must be one of"):
        launch_plan("residual", *args, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        launch_plan("residual_update", *args, backend="cpu")
    with pytest.raises(ValueError, match="sms must be a positive int"):
        launch_plan("residual_update", *args, backend="cuda", sms=0)
    with pytest.raises(TypeError, match="needs argument 'relu'"):
        launch_plan("residual_update", y, y, meta_tensor(3), backend="cuda")
    with pytest.raises(TypeError, match="no argument"):
        launch_plan("residual_update", *args, backend="cuda", nope=1)


# -- the Triton plans are the launches the launchers make ------------------------------------------
SMALL = [
    residual_args((3, 5, 7, 6), torch.float32, False), residual_args((3, 5, 7, 6), torch.float32, True),
    batch_norm_args((3, 5, 7, 6), torch.float32, False), batch_norm_args((3, 5, 7, 6), torch.float32, True),
    multistep_args((3, 5, 7, 6), torch.float32, False), multistep_args((3, 5, 7, 6), torch.float32, True),
    scale_concat_args((3, 5, 7, 6), (3, 4, 7, 6), torch.float32, False),
    scale_concat_args((3, 5, 7, 6), (3, 4, 7, 6), torch.float32, True),
    ode_args((3, 5, 7, 6), torch.float32, False),
    ("weight_mean", ([meta_tensor(6, 5, 3, 3), meta_tensor(7, 6, 1, 1), meta_tensor(3, 2, 3, 3)],)),
    controller_args("cifar_resnet8"),
]
_MUTATED = {"batch_norm_residual_update": (3, 4)}  # running statistics: updated in place, never differentiated


def _materialize(op: str, args: tuple) -> tuple:
    """CPU tensors with the meta tensors' shapes and strides, values in [0.5, 1.5] (valid for every op)."""
    def real(i, a):
        if isinstance(a, list):
            return [real(None, x) for x in a]
        if not isinstance(a, torch.Tensor):
            return a
        t = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype).uniform_(0.5, 1.5)
        return t.requires_grad_(i not in _MUTATED.get(op, ()))
    return tuple(real(i, a) for i, a in enumerate(args))


@pytest.fixture
def triton_launches(monkeypatch):
    """Records (kernel, grid, threads) of every Triton launch (the interpreter's launch path)."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("records launches under the Triton interpreter (TRITON_INTERPRET=1)")
    launches = []
    run = interpreter.InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        if not warmup:
            g = tuple(grid(kwargs) if callable(grid) else grid)
            launches.append((self.__name__, g + (1,) * (3 - len(g)), 32 * kwargs.get("num_warps", 4)))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", record)
    return launches


@pytest.mark.parametrize("case", SMALL, ids=[f"{op}-{i}" for i, (op, _) in enumerate(SMALL)])
def test_triton_plan_is_what_the_launchers_launch(case, triton_launches):
    op, meta_args = case
    args = _materialize(op, meta_args)
    out = OPS[op].op("_triton")(*args)
    out = out[0] if isinstance(out, (tuple, list)) else out
    inputs = [t for a in args for t in (a if isinstance(a, list) else [a])
              if isinstance(t, torch.Tensor) and t.requires_grad]
    torch.autograd.grad(out, inputs, torch.rand_like(out), allow_unused=True)
    plan = launch_plan(op, *meta_args, backend="triton", sms=SMS)
    assert [(p["kernel"], tuple(p["grid"]), p["threads"]) for p in plan] == triton_launches
