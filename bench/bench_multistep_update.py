"""Linear multi-step update ``(1-k)·u + k·u_prev + keep[n]·dt[c]·f`` (docs/ops.md, multistep_update):
fused fwd+bwd (CPU op) vs the eager reference vs torch.compile(reference) vs the bandwidth limit.

    pytest bench/bench_multistep_update.py --benchmark-only     (pytest-benchmark, like the other benches)
    python bench/bench_multistep_update.py [--shape 8,256,56,56]  (one run, prints the ratio table)

The limit is the minimum traffic at the speed of a same-size copy_ (which moves 2N elements):
forward reads u, u_prev, f and writes out (4N); backward reads grad, u, u_prev, f and writes du,
du_prev, df (7N): 11N for fwd+bwd, i.e. 5.5 copies.
"""
import argparse
import statistics
import time

import pytest
import torch

import tsc_kernels
from tsc_kernels import reference

from _impls import implementation

SHAPES = {"large": (8, 256, 56, 56), "small": (32, 64, 8, 8)}
IMPLS = ("fused", "eager", "compile", "copy")
TRAFFIC_IN_COPIES = 5.5
def _fn(impl):
    return implementation(impl, tsc_kernels.multistep_update, reference.multistep_update)


def _inputs(shape, dtype=torch.float32):
    u, u_prev, f = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    k = torch.tensor(-0.05, requires_grad=True)
    dt = torch.rand(shape[1], requires_grad=True)
    keep = torch.bernoulli(torch.full((shape[0],), 0.8))
    return [u, u_prev, f, k, dt, keep]


def _step_fn(impl, shape):
    """A zero-argument fwd+bwd step (or the copy_ of the bandwidth limit)."""
    if impl == "copy":
        src, dst = torch.randn(shape), torch.empty(shape)
        return lambda: dst.copy_(src)
    fn, args = _fn(impl), _inputs(shape)
    grad = torch.randn(shape)
    wrt = args[:5]
    return lambda: torch.autograd.grad(fn(*args, relu=False), wrt, grad)


@pytest.mark.parametrize("size", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_multistep_update_fwd_bwd(benchmark, impl, size):
    shape = SHAPES[size]
    benchmark.group = f"multistep_update fwd+bwd {size} {tuple(shape)} fp32"
    benchmark.extra_info.update(impl=impl, shape=list(shape), traffic_in_copies=TRAFFIC_IN_COPIES)
    step = _step_fn(impl, shape)
    step()  # warm-up (compiles)
    benchmark(step)


def _median_ms(step, repeats):
    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8,256,56,56")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    t = {impl: _median_ms(_step_fn(impl, shape), args.repeats) for impl in IMPLS}
    limit = t["copy"] * TRAFFIC_IN_COPIES
    print(f"multistep_update fwd+bwd {shape} fp32, median of {args.repeats} (ms), backend {tsc_kernels.get_backend()}")
    print(f"fused {t['fused']:.2f}  eager {t['eager']:.2f}  compile {t['compile']:.2f}  limit {limit:.2f}")
    print(f"fused vs eager {t['eager'] / t['fused']:.2f}x, vs compile {t['compile'] / t['fused']:.2f}x, "
          f"fused / limit {t['fused'] / limit:.2f}x")


if __name__ == "__main__":
    main()
