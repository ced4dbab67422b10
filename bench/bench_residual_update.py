"""Residual update ``y + f * dt[c]`` (docs/ops.md): fused CPU op vs eager reference vs
torch.compile(reference) vs a same-size copy_ (the memory-bandwidth limit), for forward, backward
and both, fp32 and bf16, on a large and a small shape. Run with `make bench-ops`
(pytest-benchmark); bench/ratios.py turns the saved JSON into the ratio table.
"""
import pytest
import torch

import tsc_kernels
from tsc_kernels import reference

from _impls import implementation

SHAPES = {"large": (8, 256, 56, 56), "small": (4, 64, 8, 8)}
IMPLS = ("fused", "eager", "compile", "copy")


def _fn(impl):
    return implementation(impl, tsc_kernels.residual_update, reference.residual_update)


def _inputs(shape, dtype, requires_grad):
    y, f = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    dt = torch.rand(shape[1])
    return [t.requires_grad_(requires_grad) for t in (y, f, dt)]


def _copy_bench(benchmark, shape, dtype):
    src, dst = torch.randn(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
    benchmark(dst.copy_, src)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("size", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", ["fwd", "bwd", "fwd+bwd"])
def test_residual_update(benchmark, pass_, impl, size, dtype):
    shape = SHAPES[size]
    benchmark.group = f"residual_update {pass_} {size} {tuple(shape)} {str(dtype)[6:]}"
    benchmark.extra_info.update(impl=impl, pass_=pass_, shape=list(shape), dtype=str(dtype)[6:])
    if impl == "copy":
        return _copy_bench(benchmark, shape, dtype)
    fn = _fn(impl)
    if pass_ == "fwd":
        args = _inputs(shape, dtype, requires_grad=False)
        fn(*args, relu=False)  # warm-up (compiles)
        benchmark(fn, *args, relu=False)
        return
    args = _inputs(shape, dtype, requires_grad=True)
    grad = torch.randn(shape, dtype=dtype)
    if pass_ == "bwd":
        out = fn(*args, relu=False)
        torch.autograd.grad(out, args, grad, retain_graph=True)
        benchmark(torch.autograd.grad, out, args, grad, retain_graph=True)
    else:
        def step():
            return torch.autograd.grad(fn(*args, relu=False), args, grad)

        step()
        benchmark(step)
