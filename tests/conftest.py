"""Shared fixtures: the backends that can run CPU tensors here, and per-dtype tolerances."""
import pytest
import torch
from torch import nn

import tsc_kernels

# (dtype, atol, rtol) for comparing a backend with the reference. Backends compute in fp32 like the
# reference, so fp32 differences are rounding-order only; fp16/bf16 allow one rounding of the output.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float64: (1e-12, 1e-12),
}

CPU_BACKENDS = tsc_kernels.available_backends("cpu")
# the fused backends (everything but the reference itself)
FUSED_CPU_BACKENDS = [b for b in CPU_BACKENDS if b != "torch"]


def pytest_configure(config):
    config.addinivalue_line("markers", "big_for_interpreter: too large for the Triton interpreter; runs on the other backends")


def pytest_collection_modifyitems(config, items):
    """Deselect (not skip) big_for_interpreter cases of the triton backend under TRITON_INTERPRET=1."""
    if not tsc_kernels.backend.TRITON_INTERPRET:
        return
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        is_triton = params is not None and "triton" in (params.params.get("backend"), params.params.get("fused"))
        (drop if is_triton and item.get_closest_marker("big_for_interpreter") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def count_triton_launches(fn) -> int:
    """Triton kernel launches during fn() under the interpreter (its profile shows host copies, not launches)."""
    from triton.runtime import interpreter

    calls = 0
    original = interpreter.GridExecutor.__call__

    def counting(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        return original(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = counting
    try:
        fn()
    finally:
        interpreter.GridExecutor.__call__ = original
    return calls


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    with tsc_kernels.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize(model, scale=0.5):
    """(tests of models) Non-trivial BN statistics/affines and controller weights, so Δt and BN are far from identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        if hasattr(model, "tsc_controller"):
            for p in model.tsc_controller.parameters():
                p.normal_(0, scale)
    return model
