"""Property tests (hypothesis): on random shapes, dtypes and layouts every backend that can run CPU
tensors equals the reference, forward and backward, and keeps the properties docs/ops.md states.

For every op of the registry (tsc_kernels/ops/registry.py ``OPS``; a new op without an entry in
``PROPERTIES`` and ``STRATEGIES`` fails here): the fused backends against the fp64 reference with the
op tests' criterion, and per-op properties (Δt = 0 gives the shortcut, linearity, permutations of
channels commute, ...) on every backend. Besides, the same-dtype reference comparisons over five
memory layouts of residual_update, weight_mean and lstm_controller.

Bounded for CI: EXAMPLES per op for the C++ and torch backends (PROPERTY_EXAMPLES per property),
TRITON_EXAMPLES under the Triton interpreter (seconds per example; INTERPRETER_EXAMPLES for the
controller) on tiny shapes. TSC_FUZZ_EXAMPLES=<n> raises all of them to n (`make fuzz`).
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tsc_kernels
from tsc_kernels import reference
from tsc_kernels.ops.registry import OPS, dispatch
from conftest import FUSED_BACKENDS, TEST_BACKENDS, TOLERANCES, assert_within_reference_error
import test_batch_norm_residual_update  # the op tests' input builders and checks
import test_lstm_controller
import test_multistep_update
import test_ode_combine
import test_residual_update
import test_robustness
import test_scale_concat

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


# ---------------------------------------------------------------------------------------------
# Every op of the registry (issue 25, item 3): for each op a case strategy, a check against the
# fp64 reference with the project's criterion (conftest.assert_within_reference_error; the
# BatchNorm tail's own check_against_fp64, which also compares the running statistics), and
# properties from docs/ops.md. Inputs come from the op tests' make_inputs. An op added to the
# registry without an entry here fails test_every_op_has_property_tests (and its parametrisations).
# Shapes: channel counts that are not powers of two; tiny ones for the Triton interpreter.
# ---------------------------------------------------------------------------------------------
CHANNELS, TINY_CHANNELS = [3, 5, 6, 7, 9, 11, 13], [3, 5, 6, 7]
SEED = st.integers(0, 2**31 - 1)
LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]  # what the fp64 criterion is for


@st.composite
def activation_shapes(draw, small, min_spatial=0):
    """(N, C, *spatial): N in 1..3, C not a power of two, 0-3 odd spatial dims (0-2 on the interpreter)."""
    spatial = draw(st.lists(st.sampled_from([1, 3, 5] if small else [1, 3, 5, 7]), min_size=min_spatial,
                            max_size=2 if small else 3))
    return (draw(st.integers(1, 3)), draw(st.sampled_from(TINY_CHANNELS if small else CHANNELS)), *spatial)


@st.composite
def elementwise_cases(draw, small):
    """shape, dtype, channels_last, relu, seed."""
    return (draw(activation_shapes(small)), draw(st.sampled_from(LOW_PRECISION)), draw(st.booleans()),
            draw(st.booleans()), draw(SEED))


@st.composite
def batch_norm_cases(draw, small):
    """shape, dtype, training, affine, running, relu, x_cl, y_cl, seed; eval needs running statistics.
    One value per channel in training is degenerate (variance 0): N * spatial >= 2."""
    x_cl, y_cl = draw(st.booleans()), draw(st.booleans())
    # check_against_fp64 compares out's strides with the reference's, also those of size-1 dims, which
    # differ when x and y have different layouts (the reference's TensorIterator picks another order)
    shape = draw(activation_shapes(small).filter(
        lambda s: math.prod(s) // s[1] >= 2 and (x_cl == y_cl or 1 not in s)))
    training, affine, running = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    return (shape, draw(st.sampled_from(LOW_PRECISION)), training or not running, affine, running,
            draw(st.booleans()), x_cl, y_cl, draw(SEED))


@st.composite
def multistep_cases(draw, small):
    """shape, dtype, channels_last, relu, with_dt, with_keep, seed."""
    return (*draw(elementwise_cases(small))[:4], draw(st.booleans()), draw(st.booleans()), draw(SEED))


@st.composite
def scale_concat_cases(draw, small):
    """(shape of x, k), dtype, channels_last, seed; Cx and k are not powers of two (Cx = 0 allowed)."""
    shape = draw(activation_shapes(small))
    cx = draw(st.sampled_from([0] + (TINY_CHANNELS if small else CHANNELS)))
    k = draw(st.sampled_from(TINY_CHANNELS if small else CHANNELS))
    return ((shape[0], cx, *shape[2:]), k), draw(st.sampled_from(LOW_PRECISION)), draw(st.booleans()), draw(SEED)


@st.composite
def ode_cases(draw, small):
    """shape, dtype, stages (1-8), channels_last, seed."""
    return (draw(activation_shapes(small)), draw(st.sampled_from(LOW_PRECISION)), draw(st.integers(1, 4 if small else 8)),
            draw(st.booleans()), draw(SEED))


@st.composite
def weight_mean_cases(draw, small):
    """shapes (C_out, C_in, *k) of 1-3 weights, C_in not a power of two, dtype, seed."""
    shapes = [(draw(st.integers(1, 6)), draw(st.sampled_from(TINY_CHANNELS if small else CHANNELS)),
               *draw(st.lists(st.sampled_from([1, 3, 5]), min_size=1, max_size=2 if small else 3)))
              for _ in range(draw(st.integers(1, 3)))]
    return shapes, draw(st.sampled_from(LOW_PRECISION + [torch.float64])), draw(SEED)


@st.composite
def lstm_controller_cases(draw, small):
    """(L, D, H, C), seed: fp32, the controller's dtype."""
    return (draw(st.integers(1, 3 if small else 4)), draw(st.sampled_from([3, 5, 7, 13])), draw(st.sampled_from([1, 3, 5])),
            draw(st.sampled_from([3, 5, 7]))), draw(SEED)


STRATEGIES = {"residual_update": elementwise_cases, "batch_norm_residual_update": batch_norm_cases,
              "multistep_update": multistep_cases, "scale_concat": scale_concat_cases, "ode_combine": ode_cases,
              "weight_mean": weight_mean_cases, "lstm_controller": lstm_controller_cases}


def _leaves(*ts):
    return tuple(None if t is None else t.detach().clone().requires_grad_() for t in ts)


def _permute(t, perm, dim=1):
    return None if t is None else t.index_select(dim, perm)


def _grads(out, inputs, grad):
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return torch.autograd.grad(out, wrt, grad)


def _close(got, want, dtype, scale=1.0, msg=""):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got, want, atol=atol * scale, rtol=rtol, msg=lambda m: f"{msg}: {m}" if msg else m)


# --- residual_update ------------------------------------------------------------------------
def residual_fp64(case):
    shape, dtype, cl, relu, _ = case
    y, f, dt = test_residual_update.make_inputs(shape, dtype, channels_last=cl)
    assert_within_reference_error(lambda *a: tsc_kernels.residual_update(*a, relu=relu),
                                  lambda *a: reference.residual_update(*a, relu=relu),
                                  (y, f, dt), torch.randn(shape, dtype=dtype), ("dy", "df", "ddt"))


def residual_zero_dt_is_the_shortcut(case):
    """Δt = 0: out = relu?(y) bit for bit, df = 0, dy = the incoming gradient (masked by out > 0)."""
    shape, dtype, cl, relu, _ = case
    y, f, dt = test_residual_update.make_inputs(shape, dtype, channels_last=cl)
    dt = torch.zeros_like(dt, requires_grad=True)
    out = tsc_kernels.residual_update(y, f, dt, relu=relu)
    assert torch.equal(out, torch.relu(y) if relu else y)
    g = torch.randn(shape, dtype=dtype)
    dy, df, _ = torch.autograd.grad(out, (y, f, dt), g)
    assert torch.equal(dy, torch.where(out > 0, g, 0) if relu else g) and not df.any()


def residual_linear_in_dt(case):
    """Without the ReLU, out - y is linear in Δt: out(a + b) = out(a) + out(b) - y (fp64)."""
    shape, _, cl, _, _ = case
    y, f, a = test_residual_update.make_inputs(shape, torch.float64, channels_last=cl, requires_grad=False)
    b = torch.randn_like(a)
    sum_ = tsc_kernels.residual_update(y, f, a + b)
    torch.testing.assert_close(sum_, tsc_kernels.residual_update(y, f, a) + tsc_kernels.residual_update(y, f, b) - y,
                               atol=1e-12, rtol=1e-12)


def residual_channel_permutation_commutes(case):
    """Permuting the channels of y, f and Δt permutes out, dy, df and ddt."""
    shape, dtype, cl, relu, _ = case
    y, f, dt = test_residual_update.make_inputs(shape, dtype, channels_last=cl)
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


# --- batch_norm_residual_update -------------------------------------------------------------
def batch_norm_fp64(case):
    shape, dtype, training, affine, running, relu, x_cl, y_cl, _ = case
    test_batch_norm_residual_update.check_against_fp64(shape, dtype, training, affine, running, relu, x_cl, y_cl)


def _bn_inputs(case, dtype=None):
    shape, dtype_, training, affine, running, relu, x_cl, y_cl, _ = case
    return test_batch_norm_residual_update.make_inputs(shape, dtype or dtype_, affine, running, x_cl, y_cl, training, relu)


def _bn(inputs, case):
    training, relu = case[2], case[5]
    y, x, dt, rm, rv, w, b = inputs
    return tsc_kernels.batch_norm_residual_update(y, x, dt, rm, rv, w, b, training, 0.1, 1e-5, relu)


def batch_norm_zero_dt_is_the_shortcut(case):
    """Δt = 0: out = relu?(y) bit for bit; training still updates the running statistics as F.batch_norm."""
    y, x, dt, rm, rv, w, b = _bn_inputs(case)
    training = case[2]
    want = [None if t is None else t.clone() for t in (rm, rv)]
    if training and rm is not None:
        torch.nn.functional.batch_norm(x.to(rm.dtype), *want, None, None, True, 0.1, 1e-5)
    out = _bn((y, x, torch.zeros_like(dt), rm, rv, w, b), case)
    assert torch.equal(out, torch.relu(y) if case[5] else y)
    for name, got, w_ in zip(("running_mean", "running_var"), (rm, rv), want):
        if got is not None:
            _close(got, w_, got.dtype, msg=name)


def batch_norm_training_ignores_a_per_channel_shift(case):
    """In training, x + s[c] gives the same out (batch statistics absorb the shift), fp64."""
    if not case[2]:
        case = (case[0], case[1], True, *case[3:])
    y, x, dt, rm, rv, w, b = _bn_inputs(case, torch.float64)
    shift = 3 * torch.randn(x.shape[1], dtype=torch.float64).view(1, -1, *[1] * (x.dim() - 2))
    out = _bn((y, x, dt, rm, rv, w, b), case)
    shifted = _bn((y, x + shift, dt, None if rm is None else rm.clone(), None if rv is None else rv.clone(), w, b), case)
    torch.testing.assert_close(shifted, out, atol=1e-9, rtol=1e-9)


def batch_norm_channel_permutation_commutes(case):
    """Permuting the channels of every input permutes out and the running statistics."""
    y, x, dt, rm, rv, w, b = _bn_inputs(case)
    perm = torch.randperm(y.shape[1])
    p = [_permute(y, perm), _permute(x, perm)] + [None if t is None else t[perm] for t in (dt, rm, rv, w, b)]
    out = _bn((y, x, dt, rm, rv, w, b), case)
    pout = _bn(p, case)
    _close(pout, _permute(out, perm), y.dtype, msg="out")
    for name, got, want in zip(("running_mean", "running_var"), p[3:5], (rm, rv)):
        if want is not None:
            _close(got, want[perm], got.dtype, msg=name)


# --- multistep_update -----------------------------------------------------------------------
def _ms_inputs(case, dtype=None):
    shape, dtype_, cl, _, with_dt, with_keep, _ = case
    return test_multistep_update.make_inputs(shape, dtype or dtype_, channels_last=cl, with_dt=with_dt,
                                             with_keep=with_keep)


def multistep_fp64(case):
    relu = case[3]
    inputs = _ms_inputs(case)
    names = [n for n, t in zip(test_multistep_update.NAMES, inputs) if t is not None]
    assert_within_reference_error(lambda *a: tsc_kernels.multistep_update(*a, relu=relu),
                                  lambda *a: reference.multistep_update(*a, relu=relu),
                                  inputs, torch.randn(case[0], dtype=case[1]), names)


def multistep_k_zero_is_the_residual_update(case):
    """k = 0 and keep = 1: the residual update of u, f and Δt (Δt = 1 when absent), forward and gradients."""
    u, u_prev, f, _, dt, _ = _ms_inputs(case)
    relu = case[3]
    dt = dt if dt is not None else torch.ones(u.shape[1], dtype=reference.accumulation_dtype(u.dtype), requires_grad=True)
    k = torch.zeros((), dtype=dt.dtype, requires_grad=True)
    out = tsc_kernels.multistep_update(u, u_prev, f, k, dt, None, relu=relu)
    ru, rf, rdt = _leaves(u, f, dt)
    ref = tsc_kernels.residual_update(ru, rf, rdt, relu=relu)
    _close(out, ref, u.dtype, msg="out")
    g = torch.randn(u.shape, dtype=u.dtype)
    du, du_prev, df, _, ddt = torch.autograd.grad(out, (u, u_prev, f, k, dt), g)
    n_sum = u.numel() // u.shape[1]
    for name, got, want in zip(("du", "df", "ddt"), (du, df, ddt), torch.autograd.grad(ref, (ru, rf, rdt), g)):
        _close(got, want, want.dtype, n_sum ** 0.5 if name == "ddt" else 1.0, name)
    assert not du_prev.any(), "du_prev = k g' = 0"


def multistep_k_one_without_f_is_the_previous_shortcut(case):
    """k = 1 and Δt = 0: out = relu?(u_prev)."""
    u, u_prev, f, k, dt, keep = _ms_inputs(case)
    k = torch.ones_like(k)
    dt = torch.zeros(u.shape[1], dtype=k.dtype)
    out = tsc_kernels.multistep_update(u, u_prev, f, k, dt, keep, relu=case[3])
    _close(out, torch.relu(u_prev) if case[3] else u_prev, u.dtype)


def multistep_permutations_commute(case):
    """Permuting the samples (with keep) and the channels (with Δt) permutes out."""
    u, u_prev, f, k, dt, keep = _ms_inputs(case)
    n_perm, c_perm = torch.randperm(u.shape[0]), torch.randperm(u.shape[1])
    out = tsc_kernels.multistep_update(u, u_prev, f, k, dt, keep, relu=case[3])
    p = [_permute(_permute(t, n_perm, 0), c_perm) for t in (u, u_prev, f)]
    pout = tsc_kernels.multistep_update(*p, k, None if dt is None else dt[c_perm], None if keep is None else keep[n_perm],
                                        relu=case[3])
    _close(pout, _permute(_permute(out, n_perm, 0), c_perm), u.dtype)


# --- scale_concat ---------------------------------------------------------------------------
def _sc_inputs(case, **kw):
    (shape, k), dtype, cl, _ = case
    return test_scale_concat.make_inputs(shape, k, dtype, channels_last=cl, **kw)


def scale_concat_fp64(case):
    if case[0][0][1] == 0:  # an empty dx has no error to measure: Cx = 0 is the properties' case
        case = (((case[0][0][0], 1, *case[0][0][2:]), case[0][1]), *case[1:])
    (shape, k), dtype = case[0], case[1]
    x, f, dt = _sc_inputs(case)
    grad = torch.randn(shape[0], shape[1] + k, *shape[2:], dtype=dtype)
    assert_within_reference_error(tsc_kernels.scale_concat, reference.scale_concat, (x, f, dt), grad,
                                  ("dx", "df", "ddt"))


def scale_concat_x_is_copied_and_its_gradient_passed_on(case):
    """out[:, :Cx] is x bit for bit, and dx is the incoming gradient's first Cx channels."""
    x, f, dt = _sc_inputs(case)
    out = tsc_kernels.scale_concat(x, f, dt)
    cx = x.shape[1]
    assert torch.equal(out[:, :cx], x)
    g = torch.randn(out.shape, dtype=out.dtype)
    (dx,) = torch.autograd.grad(out, (x,), g)
    assert torch.equal(dx, g[:, :cx])


def scale_concat_zero_dt_gives_zero_features(case):
    x, f, dt = _sc_inputs(case, requires_grad=False)
    out = tsc_kernels.scale_concat(x, f, torch.zeros_like(dt))
    assert not out[:, x.shape[1]:].any()


def scale_concat_feature_permutation_commutes(case):
    """Permuting the channels of f and Δt permutes out's new features and ddt."""
    x, f, dt = _sc_inputs(case)
    perm = torch.randperm(f.shape[1])
    out = tsc_kernels.scale_concat(x, f, dt)
    g = torch.randn(out.shape, dtype=out.dtype)
    _, ddt = torch.autograd.grad(out, (f, dt), g)
    pf, pdt = _leaves(_permute(f, perm), dt[perm])
    pout = tsc_kernels.scale_concat(x, pf, pdt)
    cx = x.shape[1]
    _close(pout[:, cx:], _permute(out[:, cx:], perm), x.dtype, msg="out")
    _, pddt = torch.autograd.grad(pout, (pf, pdt), torch.cat([g[:, :cx], _permute(g[:, cx:], perm)], 1))
    _close(pddt, ddt[perm], ddt.dtype, (f.numel() // f.shape[1]) ** 0.5, "ddt")


# --- ode_combine ----------------------------------------------------------------------------
def _ode_inputs(case, dtype=None, requires_grad=True):
    shape, dtype_, stages, cl, _ = case
    return test_ode_combine.make_inputs(shape, dtype or dtype_, stages, channels_last=cl, requires_grad=requires_grad)


def ode_fp64(case):
    z, ks, c = _ode_inputs(case)
    assert_within_reference_error(lambda z, c, *ks: tsc_kernels.ode_combine(z, list(ks), c),
                                  lambda z, c, *ks: reference.ode_combine(z, list(ks), c),
                                  (z, c, *ks), torch.randn(z.shape, dtype=z.dtype),
                                  ("dz", "dcoeffs", *(f"dk{i}" for i in range(len(ks)))))


def ode_zero_coeffs_give_z(case):
    z, ks, c = _ode_inputs(case, requires_grad=False)
    assert torch.equal(tsc_kernels.ode_combine(z, ks, torch.zeros_like(c)), z)


def ode_stages_compose(case):
    """Terms are added in stage order: combining the last stage onto the others' result is the same (fp64)."""
    z, ks, c = _ode_inputs(case, torch.float64, requires_grad=False)
    if len(ks) == 1:
        ks, c = ks + [torch.randn_like(z)], torch.cat([c, torch.randn(1, dtype=c.dtype)])
    first = tsc_kernels.ode_combine(z, ks[:-1], c[:-1])
    torch.testing.assert_close(tsc_kernels.ode_combine(first, ks[-1:], c[-1:]), tsc_kernels.ode_combine(z, ks, c),
                               atol=1e-12, rtol=1e-12)


def ode_repeated_stage_adds_its_coefficients(case):
    """ode(z, [k, k], [a, b]) = ode(z, [k], [a + b]) (fp64)."""
    z, (k, *_), c = _ode_inputs(case, torch.float64, requires_grad=False)
    a, b = torch.randn(2, dtype=c.dtype)
    torch.testing.assert_close(tsc_kernels.ode_combine(z, [k, k], torch.stack([a, b])),
                               tsc_kernels.ode_combine(z, [k], (a + b).reshape(1)), atol=1e-12, rtol=1e-12)


# --- weight_mean ----------------------------------------------------------------------------
def _weights(case, requires_grad=True):
    shapes, dtype, _ = case
    return [torch.randn(s, dtype=dtype).requires_grad_(requires_grad) for s in shapes]


def weight_mean_fp64(case):
    """Against the reference in fp64, rounded once: the mean (fp32 on the fused backends whatever the
    weights' dtype) to fp32's tolerance, dW to the weights' dtype's. (assert_within_reference_error's
    floor counts the first input's values per output value, not the C_in each mean sums.)"""
    ws = _weights(case)
    wr = [w.detach().double().requires_grad_() for w in ws]
    out, ref = tsc_kernels.weight_mean(ws), reference.weight_mean(wr)
    assert out.dtype == reference.accumulation_dtype(case[1])
    _close(out, ref.to(out.dtype), out.dtype, msg="out")
    grad = torch.randn(out.shape, dtype=out.dtype)
    for i, (g, w) in enumerate(zip(torch.autograd.grad(out, ws, grad), torch.autograd.grad(ref, wr, grad.double()))):
        assert g.dtype == case[1] and g.shape == w.shape
        _close(g, w.to(g.dtype), g.dtype, msg=f"dW{i}")


def weight_mean_of_a_constant_is_the_constant(case):
    """Weights constant along C_in (W[o, i, *k] = v[o, *k]) mean to v."""
    shapes, dtype, _ = case
    vs = [torch.randn(s[0], 1, *s[2:], dtype=dtype) for s in shapes]
    out = tsc_kernels.weight_mean([v.expand(s).contiguous() for v, s in zip(vs, shapes)])
    want = torch.cat([v.reshape(-1) for v in vs]).to(out.dtype)
    eps = torch.finfo(out.dtype).eps
    torch.testing.assert_close(out, want, atol=0, rtol=4 * eps * max(s[1] for s in shapes))


def weight_mean_concatenates_and_ignores_input_channel_order(case):
    """weight_mean([a, b]) = cat(weight_mean([a]), weight_mean([b])), and permuting C_in changes nothing."""
    ws = _weights(case, requires_grad=False)
    out = tsc_kernels.weight_mean(ws)
    _close(out, torch.cat([tsc_kernels.weight_mean([w]) for w in ws]), out.dtype, msg="concatenation")
    shuffled = [w[:, torch.randperm(w.shape[1])] for w in ws]
    _close(tsc_kernels.weight_mean(shuffled), out, ws[0].dtype, msg="C_in permuted")


def weight_mean_gradient_is_the_same_on_every_input_channel(case):
    """dW[o, i, *k] = dw̄[o, *k] / C_in: the same for every i."""
    ws = _weights(case)
    out = tsc_kernels.weight_mean(ws)
    for i, g in enumerate(torch.autograd.grad(out, ws, torch.randn_like(out))):
        assert torch.equal(g, g[:, :1].expand_as(g)), f"dW{i}"


# --- lstm_controller ------------------------------------------------------------------------
def _controller(case, dtype=torch.float32):
    (L, D, H, C), _ = case
    return (torch.randn(L, D, dtype=dtype, requires_grad=True),
            *(p.requires_grad_() for p in test_robustness._lstm_params(D, H, C, dtype)))


def lstm_fp64(case):
    """Against the reference in fp64, with the controller tests' tolerances (assert_grads_close: BPTT
    sums over blocks and gates; the fused and the fp32 reference round in different orders)."""
    inputs = _controller(case)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    dt, ref = tsc_kernels.lstm_controller(*inputs), reference.lstm_controller(*exact)
    assert dt.dtype == torch.float32 and dt.shape == ref.shape
    torch.testing.assert_close(dt, ref.float(), rtol=1e-5, atol=1e-6)
    grad = torch.randn(dt.shape)
    want = [w.float() for w in torch.autograd.grad(ref, exact, grad.double())]
    test_lstm_controller.assert_grads_close(torch.autograd.grad(dt, inputs, grad), want, test_lstm_controller.PARAM_NAMES)


def lstm_is_causal(case):
    """Δt of the first l blocks depends on their w̄ rows only: the same from wbar[:l], and no gradient
    reaches the later rows from them."""
    wbar, *params = _controller(case)
    L = wbar.shape[0]
    dt = tsc_kernels.lstm_controller(wbar, *params)
    assert ((dt >= 0) & (dt <= 1)).all(), "Δt is a sigmoid"
    for l_ in range(1, L):
        torch.testing.assert_close(tsc_kernels.lstm_controller(wbar[:l_], *params), dt[:l_], atol=2e-5, rtol=2e-5)
    (dwbar,) = torch.autograd.grad(dt[:1], (wbar,), torch.randn(1, dt.shape[1]))
    assert not dwbar[1:].any()


def lstm_stages_batched_equal_stages_alone(case):
    """The op behind the public function runs several stages in one call: the same as one call per stage."""
    (L, D, H, C), _ = case
    stages = [_controller(case), _controller(((L + 1, D + 2, H, C + 1), 0))]
    op = dispatch("lstm_controller", stages[0][0].device)
    out = op(torch.cat([s[0].reshape(-1) for s in stages]), [s[0].shape[0] for s in stages],
             [p for s in stages for p in s[1:]])
    out = out[0] if OPS["lstm_controller"].returns_saved(op) else out
    torch.testing.assert_close(out, torch.cat([tsc_kernels.lstm_controller(*s).reshape(-1) for s in stages]),
                               atol=2e-5, rtol=2e-5)


# {op: (check against the fp64 reference, {property: check})}: every op of the registry
PROPERTIES = {
    "residual_update": (residual_fp64, [residual_zero_dt_is_the_shortcut, residual_linear_in_dt,
                                        residual_channel_permutation_commutes]),
    "batch_norm_residual_update": (batch_norm_fp64, [batch_norm_zero_dt_is_the_shortcut,
                                                     batch_norm_training_ignores_a_per_channel_shift,
                                                     batch_norm_channel_permutation_commutes]),
    "multistep_update": (multistep_fp64, [multistep_k_zero_is_the_residual_update,
                                          multistep_k_one_without_f_is_the_previous_shortcut,
                                          multistep_permutations_commute]),
    "scale_concat": (scale_concat_fp64, [scale_concat_x_is_copied_and_its_gradient_passed_on,
                                         scale_concat_zero_dt_gives_zero_features,
                                         scale_concat_feature_permutation_commutes]),
    "ode_combine": (ode_fp64, [ode_zero_coeffs_give_z, ode_stages_compose, ode_repeated_stage_adds_its_coefficients]),
    "weight_mean": (weight_mean_fp64, [weight_mean_of_a_constant_is_the_constant,
                                       weight_mean_concatenates_and_ignores_input_channel_order,
                                       weight_mean_gradient_is_the_same_on_every_input_channel]),
    "lstm_controller": (lstm_fp64, [lstm_is_causal, lstm_stages_batched_equal_stages_alone]),
}


def test_every_op_has_property_tests():
    """A new op of the registry needs a case strategy and properties here (issue 25, item 3)."""
    assert set(OPS) - set(PROPERTIES) == set(), "ops of the registry without property tests in this file"
    assert set(PROPERTIES) - set(OPS) == set(), "property tests of ops the registry does not declare"
    assert set(STRATEGIES) == set(PROPERTIES)
    assert all(checks for _, checks in PROPERTIES.values())


# the controller makes 8 launches per forward and backward, about 1 s an example under the interpreter
INTERPRETER_EXAMPLES = {"lstm_controller": FUZZ or 3}


def _run_cases(op, backend, check, examples=EXAMPLES):
    if op not in PROPERTIES or op not in STRATEGIES:
        pytest.fail(f"op {op!r} has no property strategy or checks: add them to tests/ops/test_properties.py")

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
