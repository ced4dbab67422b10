"""scale_concat ``cat([x, f * dt[c]], dim=1)`` (docs/ops.md): fused CPU op vs eager
reference vs torch.compile(reference) vs the memory-bandwidth limit (a copy_ moving the same bytes),
forward and forward+backward, fp32, at a DenseNet-40 shape and a DenseNet-121-like one.

    pytest bench/bench_scale_concat.py -q --benchmark-columns=median,iqr,rounds

Bytes the op must move (elements; dx is a view of the gradient, no traffic):
forward reads x (Cx) and f (k) and writes out (Cx + k): 2 (Cx + k); backward reads grad's last k
channels and f and writes df: 3k. The "copy" row copies a tensor of half that many elements
(a copy_ reads and writes each element), so it is the bandwidth limit of the pass.
"""
import pytest
import torch

import tsc_kernels
from tsc_kernels import reference

from _impls import implementation

# (N, Cx, k, H, W): DenseNet-40's last layer of dense block 1 at batch 64; DenseNet-121's last
# layer of dense block 1 (Cx = 64 + 5*32) at batch 8
SHAPES = {"densenet40": (64, 148, 12, 32, 32), "densenet121": (8, 224, 32, 56, 56)}
IMPLS = ("fused", "eager", "compile", "copy")
def _fn(impl):
    return implementation(impl, tsc_kernels.scale_concat, reference.scale_concat)


def _inputs(shape, requires_grad):
    n, cx, k, h, w = shape
    x, f, dt = torch.randn(n, cx, h, w), torch.randn(n, k, h, w), torch.rand(k)
    return [t.requires_grad_(requires_grad) for t in (x, f, dt)]


def moved_elements(shape, pass_):
    n, cx, k, h, w = shape
    per_pixel = 2 * (cx + k) + (3 * k if pass_ == "fwd+bwd" else 0)
    return n * h * w * per_pixel


@pytest.mark.parametrize("size", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_scale_concat(benchmark, pass_, impl, size):
    shape = SHAPES[size]
    benchmark.group = f"scale_concat {pass_} {size} (N, Cx, k, H, W)={shape} fp32"
    # the copy row already moves the minimum bytes: the limit is 1 copy (bench/ratios.py)
    benchmark.extra_info.update(impl=impl, pass_=pass_, shape=list(shape), moved_bytes=4 * moved_elements(shape, pass_),
                               traffic_in_copies=1.0)
    if impl == "copy":
        numel = moved_elements(shape, pass_) // 2
        src, dst = torch.randn(numel), torch.empty(numel)
        benchmark(dst.copy_, src)
        return
    fn = _fn(impl)
    if pass_ == "fwd":
        args = _inputs(shape, requires_grad=False)
        fn(*args)  # warm-up (compiles)
        benchmark(fn, *args)
        return
    args = _inputs(shape, requires_grad=True)
    n, cx, k, h, w = shape
    grad = torch.randn(n, cx + k, h, w)

    def step():
        return torch.autograd.grad(fn(*args), args, grad)

    step()
    benchmark(step)
