"""Property tests (hypothesis): on random shapes, dtypes and layouts every backend that can run CPU
tensors equals the reference, forward and backward, and keeps the properties docs/ops.md states.

For every op of the registry (tsc_kernels/ops/registry.py ``OPS``), with the case strategy and checks
its tests/ops/test_<op>.py declares (``PROPERTY_STRATEGY``, ``PROPERTIES``; an op whose module lacks
them fails here; shared helpers in tests/ops/hypothesis_cases.py): the fused backends against the
fp64 reference with the op tests' criterion, and per-op properties (Δt = 0 gives the shortcut,
linearity, permutations of channels commute, ...) on every backend. Besides, the same-dtype reference
comparisons over five memory layouts of residual_update, weight_mean and lstm_controller.

Bounded for CI: EXAMPLES per op for the C++ and torch backends (PROPERTY_EXAMPLES per property),
TRITON_EXAMPLES under the Triton interpreter (seconds per example; INTERPRETER_EXAMPLES for the
controller) on tiny shapes. TSC_FUZZ_EXAMPLES=<n> raises all of them to n (`make fuzz`).
"""
import importlib
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tsc_kernels
from tsc_kernels import reference
from tsc_kernels.ops.registry import OPS
from conftest import FUSED_BACKENDS, TEST_BACKENDS, TOLERANCES

FUZZ = int(os.environ.get("TSC_FUZZ_EXAMPLES", "0"))
EXAMPLES = FUZZ or 50
TRITON_EXAMPLES = FUZZ or 6
PROPERTY_EXAMPLES = FUZZ or 25  # each per-op property (test_property) on the C++ and torch backends


def _settings(backend, triton_examples=TRITON_EXAMPLES, examples=EXAMPLES):
    return settings(max_examples=triton_examples if backend == "triton" else examples, deadline=None,
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
    return (
        shape,
        dtype,
        draw(st.sampled_from(LAYOUTS)),
        draw(st.sampled_from(LAYOUTS)),
        draw(st.booleans()),
        draw(st.integers(0, 2**31 - 1)),
    )


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


# ---------------------------------------------------------------------------------------------
# Every op of the registry (issue 25, item 3): for each op a case strategy, a check against the
# fp64 reference with the project's criterion (conftest.assert_within_reference_error; the
# BatchNorm tail's own check_against_fp64, which also compares the running statistics), and
# properties from docs/ops.md. Inputs come from the op tests' make_inputs. An op added to the
# registry without an entry here fails test_every_op_has_property_tests (and its parametrisations).
# Shapes: channel counts that are not powers of two; tiny ones for the Triton interpreter.
# ---------------------------------------------------------------------------------------------


def _op_module(op):
    """tests/ops/test_<op>.py, which holds the op's PROPERTY_STRATEGY and PROPERTIES (None when missing)."""
    try:
        return importlib.import_module(f"test_{op}")
    except ModuleNotFoundError as e:
        if e.name != f"test_{op}":
            raise
        return None


# {op: strategy of cases(small)}, {op: (check against the fp64 reference, [property checks])}: collected
# from every op's test module; an op without them fails test_every_op_has_property_tests
STRATEGIES = {
    op: m.PROPERTY_STRATEGY for op in OPS if (m := _op_module(op)) is not None and hasattr(m, "PROPERTY_STRATEGY")
}
PROPERTIES = {op: m.PROPERTIES for op in OPS if (m := _op_module(op)) is not None and hasattr(m, "PROPERTIES")}



def test_every_op_has_property_tests():
    """A new op of the registry needs a case strategy and properties in its tests/ops/test_<op>.py."""
    assert set(OPS) - set(PROPERTIES) == set(), "ops of the registry without PROPERTIES in tests/ops/test_<op>.py"
    assert set(PROPERTIES) - set(OPS) == set(), "property tests of ops the registry does not declare"
    assert set(STRATEGIES) == set(PROPERTIES)
    assert all(checks for _, checks in PROPERTIES.values())


# the controller makes 8 launches per forward and backward, about 1 s an example under the interpreter
INTERPRETER_EXAMPLES = {"lstm_controller": FUZZ or 3}


def _run_cases(op, backend, check, examples=EXAMPLES):
    if op not in PROPERTIES or op not in STRATEGIES:
        pytest.fail(
            f"op {op!r} has no property strategy or checks: add PROPERTY_STRATEGY and PROPERTIES to "
            f"tests/ops/test_{op}.py"
        )

    @_settings(backend, INTERPRETER_EXAMPLES.get(op, TRITON_EXAMPLES), examples)
    @given(STRATEGIES[op](small=backend == "triton"))
    def run(case):
        torch.manual_seed(case[-1])  # the op tests' make_inputs draw from the global generator
        with tsc_kernels.use_backend(backend):
            check(case)

    run()


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("op", sorted(OPS))
def test_matches_the_fp64_reference(op, backend):
    """Error against the fp64 reference within twice the same-dtype reference's own (fp32/fp16/bf16)."""
    _run_cases(op, backend, PROPERTIES[op][0] if op in PROPERTIES else None)


PROPERTY_PARAMS = [pytest.param(op, check, id=f"{op}-{check.__name__}")
                   for op in sorted(OPS) for check in (PROPERTIES[op][1] if op in PROPERTIES else [None])]


@pytest.mark.parametrize("backend", TEST_BACKENDS)
@pytest.mark.parametrize("op,check", PROPERTY_PARAMS)
def test_property(op, check, backend):
    _run_cases(op, backend, check, PROPERTY_EXAMPLES)
