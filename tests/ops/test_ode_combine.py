"""The fused ODE stage combination z + sum_i c[i] * k_i on every backend vs the reference (docs/ode.md)."""
import pytest
import torch

import tsc_kernels
from tsc_kernels import reference
from conftest import TOLERANCES, assert_within_reference_error
from hypothesis import strategies as st
from hypothesis_cases import activation_shapes, LOW_PRECISION, SEED

SHAPES = [(3, 5, 7, 9), (2, 33), (1, 17, 4, 4, 4), (77,), (4, 19, 6)]


acc_dtype = reference.accumulation_dtype  # fp32 arithmetic for fp32/fp16/bf16, fp64 for fp64


def make_inputs(shape, dtype, stages, channels_last=False, requires_grad=True):
    z = torch.randn(shape, dtype=dtype)
    ks = [torch.randn(shape, dtype=dtype) for _ in range(stages)]
    if channels_last:
        z, *ks = (t.movedim(1, -1).contiguous().movedim(-1, 1) for t in (z, *ks))
    c = torch.randn(stages, dtype=acc_dtype(dtype))
    for t in (z, *ks, c):
        t.requires_grad_(requires_grad)
    return z, ks, c


def compare_with_reference(z, ks, c):
    atol, rtol = TOLERANCES[z.dtype]
    out = tsc_kernels.ode_combine(z, ks, c)
    ref = reference.ode_combine(z, ks, c)
    assert out.dtype == z.dtype and out.shape == z.shape
    assert out.stride() == ref.stride(), "the output must keep z's memory format"
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (z, *ks, c), grad)
    want = torch.autograd.grad(ref, (z, *ks, c), grad)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype
        scale = max(1.0, z.numel() ** 0.5) if i == len(got) - 1 else 1.0  # dc sums numel products
        torch.testing.assert_close(g, w, atol=atol * scale, rtol=rtol, msg=lambda m: f"grad {i}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("stages", [1, 3, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, shape, stages, dtype):
    compare_with_reference(*make_inputs(shape, dtype, stages))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 19, 6, 5), (2, 7, 3, 4, 5)])
def test_channels_last_matches_reference(backend, shape, dtype):
    z, ks, c = make_inputs(shape, dtype, 4, channels_last=True)
    assert not z.is_contiguous()
    compare_with_reference(z, ks, c)


def test_mixed_layouts(backend):
    """Stages in another layout than z are read in z's layout."""
    z, ks, c = make_inputs((2, 5, 3, 4), torch.float32, 2, channels_last=True)
    ks = [ks[0].contiguous(), ks[1]]
    compare_with_reference(z, ks, c)


def test_eight_stages(backend):
    compare_with_reference(*make_inputs((3, 37), torch.float32, 8))


def test_deterministic_dc(backend):
    z, ks, c = make_inputs((5, 41, 33), torch.float32, 2)
    out = tsc_kernels.ode_combine(z, ks, c)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, c, grad, retain_graph=True)[0]
    second = torch.autograd.grad(out, c, grad)[0]
    assert torch.equal(first, second)


# ---------------------------------------------------------------------------------------------
# What the suite common to every op (tests/ops/test_common.py) runs: reference match per dtype x
# layout, opcheck, fp64 gradcheck, torch.compile, empty batch, bad input
# ---------------------------------------------------------------------------------------------
# (the fp64 gradcheck on the contiguous layout only, as before the common suite: four tensors make it
# long under the interpreter)
GRADCHECK_LAYOUTS = (False,)


def sample_inputs(dtype, channels_last):
    """Three stages at a tiny shape per layout."""
    shape = (3, 4, 2, 3) if channels_last else (2, 3, 5)
    return [(make_inputs(shape, dtype, 3, channels_last=channels_last), {})]


def reference_inputs(dtype, channels_last):
    """A larger shape for the reference match (the fp64 criterion)."""
    return [(make_inputs((6, 11, 9, 7), dtype, 4, channels_last=channels_last), {})]


def empty_inputs():
    return [(make_inputs((0, 4, 3), torch.float32, 2), {})]

# tests/ops/test_triton_plans.py: the op's forward arguments at an activation shape (meta tensors:
# meta(shape, channels_last=False, dtype=float32)) and the kernels that merge its per-chunk partials
def plan_forward_args(shape, cl, dtype, meta):
    return (meta(shape, cl, dtype), [meta(shape, cl, dtype) for _ in range(4)], meta((4,)))


PLAN_MERGES = "sum_chunks_kernel"


ODE_BAD_BASE = dict(z=torch.ones(2, 3), stages=[torch.ones(2, 3), torch.ones(2, 3)], coeffs=torch.ones(2))
BAD_INPUTS = [
    (dict(ODE_BAD_BASE, stages=[]), ValueError, "stages must hold 1 to 8"),
    (dict(ODE_BAD_BASE, stages="x"), TypeError, "stages must be a list"),
    (dict(ODE_BAD_BASE, coeffs=torch.ones(3)), ValueError, "coeffs must have shape"),
    (dict(ODE_BAD_BASE, coeffs=torch.ones(2, dtype=torch.float16)), TypeError, "coeffs must have dtype"),
    (dict(ODE_BAD_BASE, stages=[torch.ones(2, 3), torch.ones(2, 4)]), ValueError, r"stages\[1\] must have z's shape"),
    (
        dict(ODE_BAD_BASE, stages=[torch.ones(2, 3), torch.ones(2, 3, dtype=torch.float64)]),
        TypeError,
        r"stages\[1\] must have z's dtype",
    ),
    (dict(ODE_BAD_BASE, z=torch.ones(2, 3, dtype=torch.int64)), TypeError, "z must have dtype"),
]


# ---------------------------------------------------------------------------------------------
# Hypothesis properties (tests/ops/test_properties.py runs them on every backend): the case
# strategy, the check against the fp64 reference and docs/ops.md's properties
# ---------------------------------------------------------------------------------------------
@st.composite
def ode_cases(draw, small):
    """shape, dtype, stages (1-8), channels_last, seed."""
    return (
        draw(activation_shapes(small)),
        draw(st.sampled_from(LOW_PRECISION)),
        draw(st.integers(1, 4 if small else 8)),
        draw(st.booleans()),
        draw(SEED),
    )


# --- ode_combine ----------------------------------------------------------------------------
def _ode_inputs(case, dtype=None, requires_grad=True):
    shape, dtype_, stages, cl, _ = case
    return make_inputs(shape, dtype or dtype_, stages, channels_last=cl, requires_grad=requires_grad)


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


PROPERTY_STRATEGY = ode_cases
# (check against the fp64 reference, [properties]): tests/ops/test_properties.py runs them
PROPERTIES = (ode_fp64, [ode_zero_coeffs_give_z, ode_stages_compose, ode_repeated_stage_adds_its_coefficients])
