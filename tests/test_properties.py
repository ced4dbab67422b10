"""Property tests (hypothesis): on random shapes, dtypes and layouts every backend that can run CPU
tensors equals the reference, forward and backward, for residual_update, weight_mean and lstm_controller.

Bounded for CI: EXAMPLES per op for the C++ and torch backends, TRITON_EXAMPLES under the Triton
interpreter (seconds per example). TSC_FUZZ_EXAMPLES=<n> raises both to n (`make fuzz`).
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tsc_kernels
from tsc_kernels import reference
from conftest import TEST_BACKENDS, TOLERANCES

FUZZ = int(os.environ.get("TSC_FUZZ_EXAMPLES", "0"))
EXAMPLES = FUZZ or 50
TRITON_EXAMPLES = FUZZ or 6


def _settings(backend):
    return settings(max_examples=TRITON_EXAMPLES if backend == "triton" else EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["contiguous", "channels_last", "transposed", "sliced", "expanded"]


def _layout(t, layout, gen):
    """`t` (N, C, *spatial) with the same values in another memory layout."""
    if layout == "channels_last" and t.dim() > 2:
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "transposed" and t.dim() > 2:  # last two dims swapped in memory
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":  # every other element of a bigger tensor along every dim
        big = torch.randn([2 * s for s in t.shape], generator=gen, dtype=t.dtype)
        big[tuple(slice(None, None, 2) for _ in t.shape)] = t
        return big[tuple(slice(None, None, 2) for _ in t.shape)]
    if layout == "expanded" and t.shape[0] > 0:  # batch entries all alias the first one
        return t[:1].expand_as(t)
    return t


@st.composite
def residual_cases(draw):
    spatial = draw(st.lists(st.integers(1, 5), min_size=0, max_size=3))
    shape = (draw(st.integers(0, 3)), draw(st.integers(1, 9)), *spatial)
    dtype = draw(st.sampled_from(DTYPES))
    return shape, dtype, draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(LAYOUTS)), draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_residual_update_matches_reference(backend):
    @_settings(backend)
    @given(residual_cases())
    def check(case):
        shape, dtype, layout_y, layout_f, relu, seed = case
        gen = torch.Generator().manual_seed(seed)
        acc = reference.accumulation_dtype(dtype)
        y0 = _layout(torch.randn(shape, generator=gen, dtype=dtype), layout_y, gen)
        f0 = _layout(torch.randn(shape, generator=gen, dtype=dtype), layout_f, gen)
        dt0 = torch.rand(shape[1], generator=gen, dtype=acc)
        y, f, dt = (t.detach().requires_grad_() for t in (y0, f0, dt0))
        yr, fr, dtr = (t.detach().requires_grad_() for t in (y0, f0, dt0))
        atol, rtol = TOLERANCES[dtype]
        with tsc_kernels.use_backend(backend):
            out = tsc_kernels.residual_update(y, f, dt, relu=relu)
        ref = reference.residual_update(yr, fr, dtr, relu=relu)
        assert out.shape == ref.shape and out.dtype == dtype
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
        grad = torch.randn(shape, generator=gen, dtype=dtype)
        with tsc_kernels.use_backend(backend):
            got = torch.autograd.grad(out, (y, f, dt), grad)
        want = torch.autograd.grad(ref, (yr, fr, dtr), grad)
        n_sum = max(1, ref.numel() // shape[1])  # terms of each ddt sum: rounding grows with it
        for name, g, w in zip(("dy", "df", "ddt"), got, want):
            assert g.dtype == w.dtype and g.shape == w.shape, name
            scale = n_sum ** 0.5 * 4 if name == "ddt" else 1.0
            torch.testing.assert_close(g, w, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")

    check()


@st.composite
def weight_cases(draw):
    count = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(DTYPES))
    shapes = [(draw(st.integers(1, 6)), draw(st.integers(1, 5)),
               *draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))) for _ in range(count)]
    return shapes, dtype, [draw(st.sampled_from(LAYOUTS[:4])) for _ in shapes], draw(st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_weight_mean_matches_reference(backend):
    @_settings(backend)
    @given(weight_cases())
    def check(case):
        shapes, dtype, layouts, seed = case
        gen = torch.Generator().manual_seed(seed)
        ws0 = [_layout(torch.randn(s, generator=gen, dtype=dtype), lay, gen) for s, lay in zip(shapes, layouts)]
        ws = [w.detach().requires_grad_() for w in ws0]
        wr = [w.detach().requires_grad_() for w in ws0]
        with tsc_kernels.use_backend(backend):
            out = tsc_kernels.weight_mean(ws)
        # the op returns the accumulation dtype (fp32 for fp16/bf16). The reference means in fp64 here;
        # allowed: one rounding to the weights' dtype (the torch backend means in that dtype, the
        # fused ones in fp32)
        ref = reference.weight_mean([w.double() for w in wr]).to(out.dtype)
        assert out.dtype == reference.accumulation_dtype(dtype)
        atol, rtol = TOLERANCES[dtype]
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
        grad = torch.randn(out.shape, generator=gen, dtype=out.dtype)
        with tsc_kernels.use_backend(backend):
            got = torch.autograd.grad(out, ws, grad)
        want = torch.autograd.grad(ref, wr, grad)  # dW = grad / C_in, rounded once to the weight's dtype
        atol, rtol = TOLERANCES[dtype]
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.dtype == dtype and g.shape == w.shape
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"dW[{i}]: {m}")

    check()


@st.composite
def lstm_cases(draw):
    L, D, H, C = (draw(st.integers(1, 4)), draw(st.integers(1, 12)), draw(st.integers(1, 5)), draw(st.integers(1, 8)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return (L, D, H, C), dtype, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_lstm_controller_matches_reference(backend):
    @_settings(backend)
    @given(lstm_cases())
    def check(case):
        (L, D, H, C), dtype, noncontiguous, seed = case
        gen = torch.Generator().manual_seed(seed)
        shapes = [(L, D), (H, D), (H,), (4 * H, H), (4 * H, H), (4 * H,), (4 * H,), (C, H), (C,)]
        ts = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
        if noncontiguous:  # transposed matrices and strided vectors: same values, other strides
            ts = [t.t().contiguous().t() if t.dim() == 2 else _layout(t[None], "sliced", gen)[0] for t in ts]
        args = [t.detach().requires_grad_() for t in ts]
        refs = [t.detach().requires_grad_() for t in ts]
        with tsc_kernels.use_backend(backend):
            out = tsc_kernels.lstm_controller(*args)
        ref = reference.lstm_controller(*refs)
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
        grad = torch.randn(ref.shape, generator=gen, dtype=dtype)
        with tsc_kernels.use_backend(backend):
            got = torch.autograd.grad(out, args, grad)
        want = torch.autograd.grad(ref, refs, grad)
        for i, (g, w) in enumerate(zip(got, want)):  # BPTT sums over blocks and gates: a looser fp32 bound
            torch.testing.assert_close(g, w, atol=tol * 10, rtol=tol * 10, msg=lambda m: f"grad of arg {i}: {m}")

    check()
