"""Fused BatchNorm tail ``relu(y + dt[c] * batch_norm(x))`` (docs/ops.md), training, forward +
backward, fp32: fused CPU op vs eager (F.batch_norm then the residual update: the reference) vs
torch.compile(reference) vs a same-size copy_ scaled to the op's traffic (the memory-bandwidth
limit). Run with `make bench-ops`; bench/ratios.py turns the saved JSON into the ratio table.
"""
import pytest
import torch

import tsc_kernels
from tsc_kernels import reference

from _impls import implementation

SHAPES = {"small": (32, 64, 16, 16), "large": (8, 256, 56, 56)}
IMPLS = ("fused", "eager", "compile", "copy")
# Element transfers of the fused op, fwd+bwd with the ReLU (docs/ops.md):
# forward 4N (statistics read x; apply reads x, y, writes out), backward 8N (sums read g, x, out;
# the elementwise pass reads them again and writes dx, dy). One copy_ moves 2N.
TRAFFIC_IN_COPIES = 6.0

def _fn(impl):
    return implementation(impl, tsc_kernels.batch_norm_residual_update, reference.batch_norm_residual_update)


@pytest.mark.parametrize("size", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_batch_norm_residual_update(benchmark, impl, size):
    shape = SHAPES[size]
    benchmark.group = f"batch_norm_residual_update fwd+bwd {size} {tuple(shape)} float32"
    benchmark.extra_info.update(impl=impl, pass_="fwd+bwd", shape=list(shape), dtype="float32",
                                traffic_in_copies=TRAFFIC_IN_COPIES)
    if impl == "copy":
        src, dst = torch.randn(shape), torch.empty(shape)
        benchmark(dst.copy_, src)
        return
    C = shape[1]
    y, x = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
    dt, w, b = torch.rand(C, requires_grad=True), torch.rand(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    rm, rv = torch.zeros(C), torch.ones(C)
    grad = torch.randn(shape)
    fn = _fn(impl)
    leaves = (y, x, dt, w, b)

    def step():
        out = fn(y, x, dt, rm, rv, w, b, True, 0.1, 1e-5, True)
        return torch.autograd.grad(out, leaves, grad)

    step()  # warm-up (compiles)
    benchmark(step)
