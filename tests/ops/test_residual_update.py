"""The fused residual update on every backend vs the reference (docs/ops.md)."""
import re

import pytest
import torch

import tsc_kernels
from tsc_kernels import reference
from conftest import TOLERANCES, assert_within_reference_error, count_triton_launches

SHAPES = [(3, 5, 7, 9), (2, 33), (1, 17, 4, 4, 4), (4, 19, 6), (5, 3, 1, 1), (2, 1, 3, 5)]
CL_SHAPES = [(4, 19, 6, 5), (2, 7, 3, 4, 5), (3, 6, 5)]  # channels-last variants (3-D via strides)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_error_within_twice_the_references_own(backend, dtype, channels_last):
    y, f, dt = make_inputs((6, 13, 9, 7), dtype, channels_last=channels_last)
    assert_within_reference_error(lambda *a: tsc_kernels.residual_update(*a, relu=True),
                                  lambda *a: reference.residual_update(*a, relu=True),
                                  (y, f, dt), torch.randn_like(y), ("dy", "df", "ddt"))


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


@pytest.mark.parametrize("relu", [False, True])
def test_gradcheck_fp64(backend, relu):
    y, f, dt = make_inputs((2, 3, 4, 5), torch.float64)
    with torch.no_grad():  # keep sums away from the ReLU kink, where finite differences are wrong
        y += torch.sign(y) * 0.1
    assert torch.autograd.gradcheck(lambda a, b, c: tsc_kernels.residual_update(a, b, c, relu=relu), (y, f, dt))
    y, f, dt = make_inputs((3, 4, 2, 3), torch.float64, channels_last=True)
    assert torch.autograd.gradcheck(lambda a, b, c: tsc_kernels.residual_update(a, b, c, relu=relu), (y, f, dt))


OP_NAMES = {"cpu": "residual_update", "torch": "residual_update_torch", "triton": "residual_update_triton"}


def _forward_op(name):
    return getattr(torch.ops.tsc, OP_NAMES[name])


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(backend, relu, channels_last):
    if backend == "triton":
        tsc_kernels.residual_update(*make_inputs((1, 2, 3), torch.float32, requires_grad=False))  # registers the op
    y, f, dt = make_inputs((2, 5, 3, 4), torch.float32, channels_last=channels_last)
    torch.library.opcheck(_forward_op(backend), (y, f, dt, relu))
    if backend != "torch":  # the torch backend has no separate backward op: autograd derives it
        bwd = getattr(torch.ops.tsc, OP_NAMES[backend].replace("residual_update", "residual_update_backward"))
        out = _forward_op(backend)(y, f, dt, relu).detach()
        torch.library.opcheck(bwd, (torch.randn_like(out), f.detach(), dt.detach(), out if relu else None))


def test_torch_compile_fullgraph(backend):
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


def test_empty_batch(backend):
    y, f, dt = make_inputs((0, 4, 3, 3), torch.float32)
    out = tsc_kernels.residual_update(y, f, dt, relu=True)
    assert out.shape == (0, 4, 3, 3)
    (ddt,) = torch.autograd.grad(out.sum(), (dt,))
    assert torch.equal(ddt, torch.zeros(4))


@pytest.mark.parametrize(
    "args, exc, words",
    [
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.rand(3)), ValueError, "f must have y's shape"),
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.rand(4)), ValueError, "dt must have shape (C,)"),
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.rand(1, 3)), ValueError, "dt must have shape"),
        ((torch.randn(3), torch.randn(3), torch.rand(3)), ValueError, "y must have shape (N, C"),
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 4).double(), torch.rand(3)), TypeError, "f must have y's dtype"),
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.rand(3).half()), TypeError, "dt must have dtype float32"),
        ((torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 3, dtype=torch.int32), torch.rand(3)), TypeError, "y must have dtype"),
        (([1.0], torch.randn(2, 3), torch.rand(3)), TypeError, "y must be a torch.Tensor"),
    ],
)
def test_bad_input(backend, args, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        tsc_kernels.residual_update(*args)


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
