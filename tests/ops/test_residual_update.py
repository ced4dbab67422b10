"""The fused residual update on every backend vs the reference (docs/ops.md)."""
import re

import math
import os

import pytest
import torch

import tsc_kernels
from tsc_kernels import reference
from conftest import TOLERANCES, assert_within_reference_error, count_triton_launches
from hypothesis_cases import _close, _grads, _leaves, _permute, elementwise_cases

SHAPES = [(3, 5, 7, 9), (2, 33), (1, 17, 4, 4, 4), (4, 19, 6), (5, 3, 1, 1), (2, 1, 3, 5)]
CL_SHAPES = [(4, 19, 6, 5), (2, 7, 3, 4, 5), (3, 6, 5)]  # channels-last variants (3-D via strides)


acc_dtype = reference.accumulation_dtype  # fp32 arithmetic for fp32/fp16/bf16, fp64 for fp64


def make_inputs(shape, dtype, channels_last=False, requires_grad=True):
    y, f = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    if channels_last:  # channel dim innermost in memory, for any rank
        y, f = (t.movedim(1, -1).contiguous().movedim(-1, 1) for t in (y, f))
    dt = torch.rand(shape[1], dtype=acc_dtype(dtype))
    return tuple(t.requires_grad_(requires_grad) for t in (y, f, dt))


def compare_with_reference(y, f, dt, relu):
    atol, rtol = TOLERANCES[y.dtype]
    out = tsc_kernels.residual_update(y, f, dt, relu=relu)
    ref = reference.residual_update(y, f, dt, relu=relu)
    assert out.dtype == y.dtype and out.shape == y.shape
    assert out.stride() == ref.stride(), "the output must keep the input's memory format"
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (y, f, dt), grad)
    want = torch.autograd.grad(ref, (y, f, dt), grad)
    for name, g, w in zip(("dy", "df", "ddt"), got, want):
        assert g.dtype == w.dtype, name
        # ddt sums N*spatial products: allow for the summation order
        scale = max(1.0, y[0, 0].numel() * y.shape[0] ** 0.5) if name == "ddt" else 1.0
        torch.testing.assert_close(g, w, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, shape, relu, dtype):
    compare_with_reference(*make_inputs(shape, dtype), relu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", CL_SHAPES)
def test_channels_last_matches_reference(backend, shape, relu, dtype):
    y, f, dt = make_inputs(shape, dtype, channels_last=True)
    assert not y.is_contiguous()
    compare_with_reference(y, f, dt, relu)


def test_memory_format_torch_channels_last(backend):
    y, f, dt = make_inputs((2, 12, 5, 7), torch.float32, requires_grad=False)
    y, f = y.to(memory_format=torch.channels_last), f.to(memory_format=torch.channels_last)
    out = tsc_kernels.residual_update(y, f, dt, relu=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference.residual_update(y, f, dt, relu=True))


def test_mixed_layouts_and_noncontiguous(backend):
    y, f, dt = make_inputs((3, 8, 4, 6), torch.float32)
    f_cl = f.detach().to(memory_format=torch.channels_last).requires_grad_()
    compare_with_reference(y, f_cl, dt, relu=True)
    big = torch.randn(6, 8, 4, 12)
    y2, f2 = big[::2, :, :, ::2].requires_grad_(), big[1::2, :, :, 1::2].clone().requires_grad_()
    compare_with_reference(y2, f2, dt, relu=False)


def test_torch_compile_fullgraph_inductor(backend):
    """With inductor (the common suite compiles with aot_eager): the op between other ops in one graph."""
    torch._dynamo.reset()
    y, f, dt = make_inputs((2, 6, 5, 3), torch.float32)

    def step(y, f, dt):
        return tsc_kernels.residual_update(y, f * 2.0, dt, relu=True).sum()

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(y, f, dt)
    got = torch.autograd.grad(loss, (y, f, dt))
    ref_loss = reference.residual_update(y, f * 2.0, dt, relu=True).sum()
    want = torch.autograd.grad(ref_loss, (y, f, dt))
    torch.testing.assert_close(loss, ref_loss)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# What the suite common to every op (tests/ops/test_common.py) runs: reference match per dtype x
# layout, opcheck, fp64 gradcheck, torch.compile, empty batch, bad input
# ---------------------------------------------------------------------------------------------
def sample_inputs(dtype, channels_last):
    """ReLU off and on at a tiny shape per layout; y nudged away from 0 (the ReLU kink, where finite
    differences are wrong)."""
    shape = (3, 4, 2, 3) if channels_last else (2, 3, 4, 5)
    samples = []
    for relu in (False, True):
        y, f, dt = make_inputs(shape, dtype, channels_last=channels_last)
        with torch.no_grad():
            y += torch.sign(y) * 0.1
        samples.append(((y, f, dt), {"relu": relu}))
    return samples


def reference_inputs(dtype, channels_last):
    """A larger shape for the reference match (the fp64 criterion)."""
    return [(make_inputs((6, 13, 9, 7), dtype, channels_last=channels_last), {"relu": True})]


def empty_inputs():
    return [(make_inputs((0, 4, 3, 3), torch.float32), {"relu": True})]

# tests/ops/test_triton_plans.py: the op's forward arguments at an activation shape (meta tensors:
# meta(shape, channels_last=False, dtype=float32)) and the kernels that merge its per-chunk partials
def plan_forward_args(shape, cl, dtype, meta):
    return (meta(shape, cl, dtype), meta(shape, cl, dtype), meta((shape[1],)), True)


PLAN_MERGES = "sum_chunks_kernel"


BAD_INPUTS = [
    ((torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.rand(3)), ValueError, re.escape("f must have y's shape")),
    ((torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.rand(4)), ValueError, re.escape("dt must have shape (C,)")),
    ((torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.rand(1, 3)), ValueError, re.escape("dt must have shape")),
    ((torch.randn(3), torch.randn(3), torch.rand(3)), ValueError, re.escape("y must have shape (N, C")),
    (
        (torch.randn(2, 3, 4), torch.randn(2, 3, 4).double(), torch.rand(3)),
        TypeError,
        re.escape("f must have y's dtype"),
    ),
    (
        (torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.rand(3).half()),
        TypeError,
        re.escape("dt must have dtype float32"),
    ),
    (
        (torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 3, dtype=torch.int32), torch.rand(3)),
        TypeError,
        re.escape("y must have dtype"),
    ),
    (([1.0], torch.randn(2, 3), torch.rand(3)), TypeError, re.escape("y must be a torch.Tensor")),
]


def test_relu_must_be_bool(backend):
    y, f, dt = make_inputs((2, 3), torch.float32, requires_grad=False)
    with pytest.raises(TypeError, match="relu must be a bool"):
        tsc_kernels.residual_update(y, f, dt, relu=1)


@pytest.mark.cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_tensors_cpu_streaming_path(dtype, channels_last):
    """Outputs of 8 MB and more take the CPU kernel's streaming-store path: check it too (odd sizes,
    so runs start unaligned and end in a tail)."""
    if "cpu" not in tsc_kernels.available_backends("cpu"):
        pytest.skip("the C++ extension is not built")
    with tsc_kernels.use_backend("cpu"):
        y, f, dt = make_inputs((3, 37, 131, 179), dtype, channels_last=channels_last)
        assert y.nbytes >= 8 << 20 or dtype != torch.float32
        compare_with_reference(y, f, dt, relu=True)
        compare_with_reference(y, f, dt, relu=False)


@pytest.mark.cpu_only
@pytest.mark.parametrize("relu", [False, True])
def test_fused_op_is_one_kernel_each_way(backend, relu):
    """docs/performance.md: the fused op is one kernel forward and one backward; the reference is several."""
    from tsc_kernels.profiling import count_kernels

    y, f, dt = make_inputs((2, 6, 5, 3), torch.float32)
    grad = torch.randn(2, 6, 5, 3)

    def fwd():
        return tsc_kernels.residual_update(y, f, dt, relu=relu)

    def bwd_only():
        torch.autograd.grad(out, (y, f, dt), grad, retain_graph=True)

    fwd()
    out = fwd()
    bwd_only()
    # under the interpreter a Triton launch shows as host copies in the profile: count launches
    count = count_triton_launches if backend == "triton" and tsc_kernels.backend.TRITON_INTERPRET else count_kernels
    n_fwd, n_bwd = count(fwd), count(bwd_only)
    if backend == "torch":
        assert n_fwd > 1 and n_bwd > 1, (n_fwd, n_bwd)
    else:
        assert (n_fwd, n_bwd) == (1, 1)


# ---------------------------------------------------------------------------------------------
# Hypothesis properties (tests/ops/test_properties.py runs them on every backend): the case
# strategy, the check against the fp64 reference and docs/ops.md's properties
# ---------------------------------------------------------------------------------------------
# --- residual_update ------------------------------------------------------------------------
def residual_fp64(case):
    shape, dtype, cl, relu, _ = case
    y, f, dt = make_inputs(shape, dtype, channels_last=cl)
    assert_within_reference_error(lambda *a: tsc_kernels.residual_update(*a, relu=relu),
                                  lambda *a: reference.residual_update(*a, relu=relu),
                                  (y, f, dt), torch.randn(shape, dtype=dtype), ("dy", "df", "ddt"))


def residual_zero_dt_is_the_shortcut(case):
    """Δt = 0: out = relu?(y) bit for bit, df = 0, dy = the incoming gradient (masked by out > 0)."""
    shape, dtype, cl, relu, _ = case
    y, f, dt = make_inputs(shape, dtype, channels_last=cl)
    dt = torch.zeros_like(dt, requires_grad=True)
    out = tsc_kernels.residual_update(y, f, dt, relu=relu)
    assert torch.equal(out, torch.relu(y) if relu else y)
    g = torch.randn(shape, dtype=dtype)
    dy, df, _ = torch.autograd.grad(out, (y, f, dt), g)
    assert torch.equal(dy, torch.where(out > 0, g, 0) if relu else g) and not df.any()


def residual_linear_in_dt(case):
    """Without the ReLU, out - y is linear in Δt: out(a + b) = out(a) + out(b) - y (fp64)."""
    shape, _, cl, _, _ = case
    y, f, a = make_inputs(shape, torch.float64, channels_last=cl, requires_grad=False)
    b = torch.randn_like(a)
    sum_ = tsc_kernels.residual_update(y, f, a + b)
    torch.testing.assert_close(sum_, tsc_kernels.residual_update(y, f, a) + tsc_kernels.residual_update(y, f, b) - y,
                               atol=1e-12, rtol=1e-12)


def residual_channel_permutation_commutes(case):
    """Permuting the channels of y, f and Δt permutes out, dy, df and ddt."""
    shape, dtype, cl, relu, _ = case
    y, f, dt = make_inputs(shape, dtype, channels_last=cl)
    perm = torch.randperm(shape[1])
    g = torch.randn(shape, dtype=dtype)
    out = tsc_kernels.residual_update(y, f, dt, relu=relu)
    got = _grads(out, (y, f, dt), g)
    py, pf, pdt = _leaves(_permute(y, perm), _permute(f, perm), dt[perm])
    pout = tsc_kernels.residual_update(py, pf, pdt, relu=relu)
    _close(pout, _permute(out, perm), dtype, msg="out")
    pgot = _grads(pout, (py, pf, pdt), _permute(g, perm))
    n_sum = math.prod(shape) // shape[1]
    for name, p, w in zip(("dy", "df", "ddt"), pgot, got):
        _close(p, _permute(w, perm, 0 if name == "ddt" else 1), w.dtype, n_sum ** 0.5 if name == "ddt" else 1.0, name)


PROPERTY_STRATEGY = elementwise_cases
# (check against the fp64 reference, [properties]): tests/ops/test_properties.py runs them
PROPERTIES = (residual_fp64, [residual_zero_dt_is_the_shortcut, residual_linear_in_dt,
                                        residual_channel_permutation_commutes])


# Narrow planes (issue 22): planes under 128 bytes (3x3 fp32, 7x7 bf16) go to the channels kernel, CH
# adjacent channels per program. C not a multiple of CH (a partial last channel tile) and a small chunk
# size (several sample chunks merged by _reduce) exercise every path; two runs must be bitwise equal.
@pytest.mark.parametrize("shape,dtype,ch", [((5, 37, 3, 3), torch.float32, 8), ((4, 11, 7, 7), torch.bfloat16, 4)])
def test_triton_narrow_planes_span_several_channels(shape, dtype, ch, monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels run on CPU only under TRITON_INTERPRET=1")
    from tsc_kernels._triton import _reduce, residual_update  # noqa: F401  (registers the _triton ops)
    monkeypatch.setattr(_reduce, "MIN_CHUNK_ELEMS", 100)
    p = _reduce.narrow_backward_plan(shape[0], shape[1], shape[2] * shape[3], dtype.itemsize)
    assert p["CH"] == ch and shape[1] % ch and p["chunks"] > 1, p
    y, f, dt = make_inputs(shape, dtype)
    runs = []
    out = reference.residual_update(y, f, dt, relu=True).detach()
    for _ in range(2):
        runs.append(torch.ops.tsc.residual_update_backward_triton(y.detach(), f.detach(), dt.detach(), out))
    compare = reference.residual_update(y, f, dt, relu=True)
    want = torch.autograd.grad(compare, (y, f, dt), y.detach())
    atol, rtol = TOLERANCES[dtype]
    for name, g, w in zip(("dy", "df", "ddt"), runs[0], want):
        torch.testing.assert_close(g, w, atol=atol * (10 if name == "ddt" else 1), rtol=rtol, msg=name)
    assert all(torch.equal(a, b) for a, b in zip(*runs)), "two runs must be bitwise equal"
