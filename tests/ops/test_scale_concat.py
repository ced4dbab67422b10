"""scale_concat ``cat([x, f * dt[c]], dim=1)`` (docs/ops.md) on every backend vs the reference."""
import re

import pytest
import torch

import tsc_kernels
from tsc_kernels import reference
from tsc_kernels.ops.scale_concat import empty_in_layout
from conftest import TOLERANCES, assert_within_reference_error, count_triton_launches
from hypothesis import strategies as st
from hypothesis_cases import _close, _leaves, _permute, activation_shapes, CHANNELS, LOW_PRECISION, SEED, TINY_CHANNELS

# (x shape, k): 0-3 spatial dims, channel counts that are not powers of two, Cx = 0 and k = 0 edges
CASES = [((3, 5, 7, 9), 3), ((2, 33), 7), ((1, 17, 4, 4, 3), 12), ((4, 19, 6), 5), ((5, 3, 1, 1), 1),
         ((2, 0, 3, 5), 4), ((2, 6, 3, 5), 0)]
CL_CASES = [((4, 19, 6, 5), 12), ((2, 7, 3, 4, 5), 3), ((3, 6, 5), 9)]


acc_dtype = reference.accumulation_dtype  # fp32 arithmetic for fp32/fp16/bf16, fp64 for fp64


def to_channels_last(t):
    """The same values with the channel dim innermost in memory, for any rank."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def make_inputs(shape, k, dtype, channels_last=False, requires_grad=True):
    x = torch.randn(shape, dtype=dtype)
    f = torch.randn((shape[0], k) + tuple(shape[2:]), dtype=dtype)
    if channels_last:
        x, f = to_channels_last(x), to_channels_last(f)
    dt = torch.rand(k, dtype=acc_dtype(dtype))
    return tuple(t.requires_grad_(requires_grad) for t in (x, f, dt))


def compare_with_reference(x, f, dt, grad_channels_last=None):
    atol, rtol = TOLERANCES[x.dtype]
    out = tsc_kernels.scale_concat(x, f, dt)
    ref = reference.scale_concat(x, f, dt)
    assert out.dtype == x.dtype and out.shape == ref.shape
    if tsc_kernels.get_backend() != "torch":  # the reference's layout is torch.cat's choice
        assert out.stride() == empty_in_layout(x, out.shape[1]).stride(), "out must follow x's layout"
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    grad = torch.randn_like(ref)
    if grad_channels_last:
        grad = to_channels_last(grad)
    got = torch.autograd.grad(out, (x, f, dt), grad, allow_unused=True)
    want = torch.autograd.grad(ref, (x, f, dt), grad, allow_unused=True)
    for name, g, w in zip(("dx", "df", "ddt"), got, want):
        assert g.dtype == w.dtype, name
        scale = max(1.0, f[0, :1].numel() * f.shape[0] ** 0.5) if name == "ddt" else 1.0
        torch.testing.assert_close(g, w, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape, k", CASES)
def test_matches_reference(backend, shape, k, dtype):
    compare_with_reference(*make_inputs(shape, k, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_error_within_twice_the_references_own(backend, dtype, channels_last):
    x, f, dt = make_inputs((6, 11, 9, 7), 13, dtype, channels_last=channels_last)
    grad = torch.randn(6, 24, 9, 7, dtype=dtype)
    assert_within_reference_error(tsc_kernels.scale_concat, reference.scale_concat, (x, f, dt),
                                  to_channels_last(grad) if channels_last else grad, ("dx", "df", "ddt"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, k", CL_CASES)
def test_channels_last_matches_reference(backend, shape, k, dtype):
    x, f, dt = make_inputs(shape, k, dtype, channels_last=True)
    assert not x.is_contiguous()
    compare_with_reference(x, f, dt, grad_channels_last=True)


def test_mixed_layouts(backend):
    """f in another layout than x, grad in another layout than out, strided inputs."""
    x, f, dt = make_inputs((3, 8, 4, 6), 5, torch.float32)
    f_cl = to_channels_last(f.detach()).requires_grad_()
    compare_with_reference(x, f_cl, dt, grad_channels_last=True)
    x_cl = to_channels_last(x.detach()).requires_grad_()
    compare_with_reference(x_cl, f, dt, grad_channels_last=False)
    big = torch.randn(6, 8, 4, 12)
    x2 = big[::2, :, :, ::2].requires_grad_()
    f2 = big[1::2, :3, :, 1::2].requires_grad_()
    compare_with_reference(x2, f2, dt[:3].detach().requires_grad_())


def test_torch_channels_last_4d(backend):
    x, f, dt = make_inputs((2, 12, 5, 7), 6, torch.float32, requires_grad=False)
    x, f = x.to(memory_format=torch.channels_last), f.to(memory_format=torch.channels_last)
    out = tsc_kernels.scale_concat(x, f, dt)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference.scale_concat(x, f, dt))


def test_dx_is_a_view_of_grad(backend):
    """dx = grad[:, :Cx] without a copy (docs/ops.md)."""
    x, f, dt = make_inputs((2, 4, 3, 3), 2, torch.float32)
    seen = {}
    x.register_hook(lambda g: seen.setdefault("dx", g))
    out = tsc_kernels.scale_concat(x, f, dt)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert seen["dx"].data_ptr() == grad.data_ptr() and torch.equal(seen["dx"], grad[:, :4])


def test_deterministic_ddt(backend):
    x, f, dt = make_inputs((6, 5, 9, 11), 7, torch.float32)
    grad = torch.randn(6, 12, 9, 11)
    first = torch.autograd.grad(tsc_kernels.scale_concat(x, f, dt), dt, grad)[0]
    again = torch.autograd.grad(tsc_kernels.scale_concat(x, f, dt), dt, grad)[0]
    assert torch.equal(first, again)


# ---------------------------------------------------------------------------------------------
# What the suite common to every op (tests/ops/test_common.py) runs: reference match per dtype x
# layout, opcheck, fp64 gradcheck, torch.compile, empty batch, bad input
# ---------------------------------------------------------------------------------------------
def sample_inputs(dtype, channels_last):
    """Tiny (x shape, k) per layout, 0 and 2 spatial dims."""
    cases = [((3, 4, 2, 3), 3)] if channels_last else [((2, 3, 4, 5), 2), ((2, 5), 3)]
    return [(make_inputs(shape, k, dtype, channels_last=channels_last), {}) for shape, k in cases]


def empty_inputs():
    return [(make_inputs((0, 4, 3, 3), 2, torch.float32), {})]

# tests/ops/test_triton_plans.py: the op's forward arguments at an activation shape (meta tensors:
# meta(shape, channels_last=False, dtype=float32)) and the kernels that merge its per-chunk partials
def plan_forward_args(shape, cl, dtype, meta):
    k = 32
    return (meta(shape, cl, dtype), meta((shape[0], k) + shape[2:], cl, dtype), meta((k,)))


PLAN_MERGES = "sum_chunks_kernel"


BAD_INPUTS = [
    (
        (torch.randn(2, 3, 4), torch.randn(2, 2, 5), torch.rand(2)),
        ValueError,
        re.escape("f must have shape (N, k, *spatial)"),
    ),
    (
        (torch.randn(2, 3, 4), torch.randn(3, 2, 4), torch.rand(2)),
        ValueError,
        re.escape("f must have shape (N, k, *spatial)"),
    ),
    (
        (torch.randn(2, 3, 4), torch.randn(2, 2, 4), torch.rand(3)),
        ValueError,
        re.escape("dt must have shape (k,) = (2,)"),
    ),
    ((torch.randn(2, 3, 4), torch.randn(2, 2, 4), torch.rand(1, 2)), ValueError, re.escape("dt must have shape")),
    ((torch.randn(3), torch.randn(3), torch.rand(3)), ValueError, re.escape("x must have shape (N, Cx")),
    (
        (torch.randn(2, 3, 4), torch.randn(2, 2, 4).double(), torch.rand(2)),
        TypeError,
        re.escape("f must have x's dtype"),
    ),
    (
        (torch.randn(2, 3, 4), torch.randn(2, 2, 4), torch.rand(2).half()),
        TypeError,
        re.escape("dt must have dtype float32"),
    ),
    (
        (torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 3, dtype=torch.int32), torch.rand(3)),
        TypeError,
        re.escape("x must have dtype"),
    ),
    (([1.0], torch.randn(2, 3), torch.rand(3)), TypeError, re.escape("x must be a torch.Tensor")),
    ((torch.randn(2, 3), None, torch.rand(3)), TypeError, re.escape("f must be a torch.Tensor")),
]


def test_large_tensor_cpu_kernel():
    """Several parallel chunks in the CPU backward (ddt summed over chunks in order)."""
    if "cpu" not in tsc_kernels.available_backends("cpu"):
        pytest.skip("the C++ extension is not built")
    with tsc_kernels.use_backend("cpu"):
        for cl in (False, True):
            compare_with_reference(*make_inputs((16, 37, 33, 31), 12, torch.float32, channels_last=cl))


@pytest.mark.cpu_only
def test_fused_op_is_one_kernel_each_way(backend):
    """The fused op is one kernel forward and one backward (dx is a view); the reference is several."""
    from tsc_kernels.profiling import count_kernels

    x, f, dt = make_inputs((2, 6, 5, 3), 4, torch.float32)
    grad = torch.randn(2, 10, 5, 3)

    def fwd():
        return tsc_kernels.scale_concat(x, f, dt)

    def bwd_only():
        torch.autograd.grad(out, (x, f, dt), grad, retain_graph=True)

    fwd()
    out = fwd()
    bwd_only()
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
@st.composite
def scale_concat_cases(draw, small):
    """(shape of x, k), dtype, channels_last, seed; Cx and k are not powers of two (Cx = 0 allowed)."""
    shape = draw(activation_shapes(small))
    cx = draw(st.sampled_from([0] + (TINY_CHANNELS if small else CHANNELS)))
    k = draw(st.sampled_from(TINY_CHANNELS if small else CHANNELS))
    return ((shape[0], cx, *shape[2:]), k), draw(st.sampled_from(LOW_PRECISION)), draw(st.booleans()), draw(SEED)


# --- scale_concat ---------------------------------------------------------------------------
def _sc_inputs(case, **kw):
    (shape, k), dtype, cl, _ = case
    return make_inputs(shape, k, dtype, channels_last=cl, **kw)


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


PROPERTY_STRATEGY = scale_concat_cases
# (check against the fp64 reference, [properties]): tests/ops/test_properties.py runs them
PROPERTIES = (scale_concat_fp64, [scale_concat_x_is_copied_and_its_gradient_passed_on,
                                         scale_concat_zero_dt_gives_zero_features,
                                         scale_concat_feature_permutation_commutes])
