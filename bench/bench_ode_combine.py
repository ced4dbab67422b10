"""ode_combine ``z + Σ_i coeffs[i]·stages[i]`` (docs/ops.md, ode_combine): fused CPU op vs the eager
reference vs torch.compile(reference) vs the bandwidth limit, forward+backward, fp32: RK4's final
combination (4 stages) and a stage input of the midpoint rule (1 stage).

    pytest bench/bench_ode_combine.py -q --benchmark-json=build/bench_ode_combine.json
    python bench/ratios.py build/bench_ode_combine.json

Minimum traffic for N elements and s stages: forward reads z and the stages and writes out
((s + 2)N); backward reads grad and the stages and writes the s stage gradients (dz is grad itself,
no copy): (2s + 1)N. The "copy" row is a same-size copy_ (2N), so the limit is (3s + 3) / 2 copies.
"""
import pytest
import torch

import tsc_kernels
from tsc_kernels import reference

from _impls import implementation

SHAPES = {"large": (32, 64, 32, 32), "small": (64, 32, 8, 8)}
STAGES = {"rk4_final": 4, "midpoint_stage": 1}
IMPLS = ("fused", "eager", "compile", "copy")
def _fn(impl):
    return implementation(impl, tsc_kernels.ode_combine, reference.ode_combine)


@pytest.mark.parametrize("size", list(SHAPES))
@pytest.mark.parametrize("combination", list(STAGES))
@pytest.mark.parametrize("impl", IMPLS)
def test_ode_combine_fwd_bwd(benchmark, impl, combination, size):
    shape, s = SHAPES[size], STAGES[combination]
    benchmark.group = f"ode_combine fwd+bwd {combination} {size} {shape} fp32"
    benchmark.extra_info.update(impl=impl, shape=list(shape), stages=s, traffic_in_copies=(3 * s + 3) / 2)
    if impl == "copy":
        src, dst = torch.randn(shape), torch.empty(shape)
        benchmark(dst.copy_, src)
        return
    fn = _fn(impl)
    z = torch.randn(shape, requires_grad=True)
    stages = [torch.randn(shape, requires_grad=True) for _ in range(s)]
    coeffs = torch.rand(s, requires_grad=True)
    grad = torch.randn(shape)

    def step():
        return torch.autograd.grad(fn(z, stages, coeffs), [z, *stages, coeffs], grad)

    step()  # warm-up (compiles)
    benchmark(step)
