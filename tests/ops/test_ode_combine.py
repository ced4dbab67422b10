"""The fused ODE stage combination z + sum_i c[i] * k_i on every backend vs the reference (docs/ode.md)."""
import pytest
import torch

import tsc_kernels
from tsc_kernels import reference
from conftest import TOLERANCES, assert_within_reference_error

SHAPES = [(3, 5, 7, 9), (2, 33), (1, 17, 4, 4, 4), (77,), (4, 19, 6)]


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_error_within_twice_the_references_own(backend, dtype, channels_last):
    z, ks, c = make_inputs((6, 11, 9, 7), dtype, 4, channels_last=channels_last)
    assert_within_reference_error(lambda z, c, *ks: tsc_kernels.ode_combine(z, list(ks), c),
                                  lambda z, c, *ks: reference.ode_combine(z, list(ks), c),
                                  (z, c, *ks), torch.randn_like(z), ("dz", "dcoeffs", "dk1", "dk2", "dk3", "dk4"))


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


def test_gradcheck_fp64(backend):
    z, ks, c = make_inputs((2, 3, 5), torch.float64, 3)
    assert torch.autograd.gradcheck(lambda z, a, b, k, c: tsc_kernels.ode_combine(z, [a, b, k], c), (z, *ks, c))


def test_deterministic_dc(backend):
    z, ks, c = make_inputs((5, 41, 33), torch.float32, 2)
    out = tsc_kernels.ode_combine(z, ks, c)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, c, grad, retain_graph=True)[0]
    second = torch.autograd.grad(out, c, grad)[0]
    assert torch.equal(first, second)


def test_empty(backend):
    z, ks, c = make_inputs((0, 4, 3), torch.float32, 2)
    out = tsc_kernels.ode_combine(z, ks, c)
    assert out.shape == z.shape
    dc = torch.autograd.grad(out.sum(), c)[0]
    assert torch.equal(dc, torch.zeros_like(c))


OP_NAMES = {"cpu": "ode_combine", "torch": "ode_combine_torch", "triton": "ode_combine_triton"}


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(backend, channels_last):
    if backend == "triton":
        tsc_kernels.ode_combine(*make_inputs((1, 2, 3), torch.float32, 1, requires_grad=False))  # registers the op
    z, ks, c = make_inputs((2, 5, 3, 4), torch.float32, 3, channels_last=channels_last)
    op = getattr(torch.ops.tsc, OP_NAMES[backend])
    torch.library.opcheck(op, (z, ks, c))
    if backend != "torch":
        bwd = getattr(torch.ops.tsc, OP_NAMES[backend].replace("ode_combine", "ode_combine_backward"))
        torch.library.opcheck(bwd, (torch.randn_like(z.detach()), [k.detach() for k in ks], c.detach()))


def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    z, ks, c = make_inputs((2, 6, 5), torch.float32, 2)

    def step(z, a, b, c):
        return tsc_kernels.ode_combine(z, [a * 2.0, b], c).sum()

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(z, *ks, c)
    got = torch.autograd.grad(loss, (z, *ks, c))
    ref_loss = reference.ode_combine(z, [ks[0] * 2.0, ks[1]], c).sum()
    want = torch.autograd.grad(ref_loss, (z, *ks, c))
    torch.testing.assert_close(loss, ref_loss)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("bad, error, match", [
    (dict(stages=[]), ValueError, "stages must hold 1 to 8"),
    (dict(stages="x"), TypeError, "stages must be a list"),
    (dict(coeffs=torch.ones(3)), ValueError, "coeffs must have shape"),
    (dict(coeffs=torch.ones(2, dtype=torch.float16)), TypeError, "coeffs must have dtype"),
    (dict(stages=[torch.ones(2, 3), torch.ones(2, 4)]), ValueError, r"stages\[1\] must have z's shape"),
    (dict(stages=[torch.ones(2, 3), torch.ones(2, 3, dtype=torch.float64)]), TypeError, r"stages\[1\] must have z's dtype"),
    (dict(z=torch.ones(2, 3, dtype=torch.int64)), TypeError, "z must have dtype"),
])
def test_bad_input(bad, error, match):
    args = dict(z=torch.ones(2, 3), stages=[torch.ones(2, 3), torch.ones(2, 3)], coeffs=torch.ones(2))
    args.update(bad)
    with pytest.raises(error, match=match):
        tsc_kernels.ode_combine(**args)
