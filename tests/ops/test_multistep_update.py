"""The fused linear multi-step update (LM-ResNet) on every backend vs the reference
(docs/ops.md, multistep_update)."""
import re

import pytest
import torch

import tsc_kernels
from tsc_kernels import reference
from conftest import TOLERANCES, assert_within_reference_error, count_triton_launches

SHAPES = [(3, 5, 7, 9), (2, 33), (1, 17, 4, 4, 3), (4, 19, 6), (5, 3, 1, 1)]
CL_SHAPES = [(4, 19, 6, 5), (2, 7, 3, 4, 5), (3, 6, 5), (2, 45, 3, 2)]
NAMES = ("du", "du_prev", "df", "dk", "ddt", "dkeep")


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(shape, dtype, channels_last=False, requires_grad=True, with_dt=True, with_keep=True):
    u, u_prev, f = (torch.randn(shape, dtype=dtype) for _ in range(3))
    if channels_last:  # channel dim innermost in memory, for any rank
        u, u_prev, f = (t.movedim(1, -1).contiguous().movedim(-1, 1) for t in (u, u_prev, f))
    acc = acc_dtype(dtype)
    k = torch.empty((), dtype=acc).uniform_(-0.9, 0.5)
    dt = torch.rand(shape[1], dtype=acc) if with_dt else None
    keep = torch.bernoulli(torch.full((shape[0],), 0.6, dtype=acc)) * 1.25 + 0.1 if with_keep else None
    tensors = [u, u_prev, f, k, dt, keep]
    return tuple(None if t is None else t.requires_grad_(requires_grad) for t in tensors)


def compare_with_reference(inputs, relu):
    u = inputs[0]
    atol, rtol = TOLERANCES[u.dtype]
    out = tsc_kernels.multistep_update(*inputs, relu=relu)
    ref = reference.multistep_update(*inputs, relu=relu)
    assert out.dtype == u.dtype and out.shape == u.shape
    assert out.stride() == ref.stride(), "the output must keep u's memory format"
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    grad = torch.randn_like(ref)
    wrt = [(n, t) for n, t in zip(NAMES, inputs) if t is not None]
    got = torch.autograd.grad(out, [t for _, t in wrt], grad)
    want = torch.autograd.grad(ref, [t for _, t in wrt], grad)
    for (name, _), g, w in zip(wrt, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        # the reductions sum many products: allow for the summation order (and fp16/bf16 inputs)
        scale = max(1.0, u.numel() ** 0.5) if name in ("dk", "ddt", "dkeep") else 1.0
        torch.testing.assert_close(g, w, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, shape, relu, dtype):
    compare_with_reference(make_inputs(shape, dtype), relu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_error_within_twice_the_references_own(backend, dtype, channels_last):
    inputs = make_inputs((6, 13, 9, 7), dtype, channels_last=channels_last)
    assert_within_reference_error(lambda *a: tsc_kernels.multistep_update(*a, relu=True),
                                  lambda *a: reference.multistep_update(*a, relu=True),
                                  inputs, torch.randn_like(inputs[0]), NAMES)


@pytest.mark.parametrize("with_dt, with_keep", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_optional_dt_and_keep(backend, with_dt, with_keep, channels_last):
    compare_with_reference(make_inputs((3, 6, 5, 3), torch.float32, channels_last, with_dt=with_dt, with_keep=with_keep), relu=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", CL_SHAPES)
def test_channels_last_matches_reference(backend, shape, relu, dtype):
    inputs = make_inputs(shape, dtype, channels_last=True)
    assert not inputs[0].is_contiguous()
    compare_with_reference(inputs, relu)


def test_memory_format_and_mixed_layouts(backend):
    u, u_prev, f, k, dt, keep = make_inputs((2, 12, 5, 7), torch.float32, requires_grad=False)
    u, f = u.to(memory_format=torch.channels_last), f.to(memory_format=torch.channels_last)
    out = tsc_kernels.multistep_update(u, u_prev, f, k, dt, keep, relu=True)  # u_prev contiguous: copied
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference.multistep_update(u, u_prev, f, k, dt, keep, relu=True))
    big = torch.randn(4, 12, 5, 14)
    compare_with_reference((big[::2, :, :, ::2].requires_grad_(), u_prev.requires_grad_(), f.requires_grad_(),
                            k.requires_grad_(), dt.requires_grad_(), keep.requires_grad_()), relu=False)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_fp64(backend, relu, channels_last):
    inputs = make_inputs((2, 3, 4, 5) if not channels_last else (3, 4, 2, 3), torch.float64, channels_last)
    with torch.no_grad():  # keep outputs away from the ReLU kink, where finite differences are wrong
        out = reference.multistep_update(*inputs, relu=False)
        inputs[0].add_(torch.sign(out) * 0.2)
    assert torch.autograd.gradcheck(lambda *a: tsc_kernels.multistep_update(*a, relu=relu), inputs)


OP_NAMES = {"cpu": "multistep_update", "torch": "multistep_update_torch", "triton": "multistep_update_triton"}


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(backend, relu, channels_last):
    if backend == "triton":  # registers the Triton ops
        tsc_kernels.multistep_update(*make_inputs((1, 2, 3), torch.float32, requires_grad=False))
    inputs = make_inputs((2, 5, 3, 4), torch.float32, channels_last=channels_last)
    fwd = getattr(torch.ops.tsc, OP_NAMES[backend])
    torch.library.opcheck(fwd, (*inputs, relu))
    torch.library.opcheck(fwd, (*inputs[:4], None, None, relu))
    if backend != "torch":  # the torch backend has no separate backward op: autograd derives it
        bwd = getattr(torch.ops.tsc, OP_NAMES[backend].replace("multistep_update", "multistep_update_backward"))
        out = fwd(*inputs, relu).detach()
        det = [t.detach() for t in inputs]
        torch.library.opcheck(bwd, (torch.randn_like(out), *det, out if relu else None))


def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    inputs = make_inputs((2, 6, 5, 3), torch.float32)

    def step(u, u_prev, f, k, dt, keep):
        return tsc_kernels.multistep_update(u, u_prev, f * 2.0, k, dt, keep, relu=True).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(*inputs)
    got = torch.autograd.grad(loss, inputs)
    u, u_prev, f, k, dt, keep = inputs
    ref_loss = reference.multistep_update(u, u_prev, f * 2.0, k, dt, keep, relu=True).sum()
    want = torch.autograd.grad(ref_loss, inputs)
    torch.testing.assert_close(loss, ref_loss)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)


def test_empty_batch(backend):
    u, u_prev, f, k, dt, _ = make_inputs((0, 4, 3, 3), torch.float32)
    out = tsc_kernels.multistep_update(u, u_prev, f, k, dt, None, relu=True)
    assert out.shape == (0, 4, 3, 3)
    dk, ddt = torch.autograd.grad(out.sum(), (k, dt))
    assert torch.equal(dk, torch.zeros(())) and torch.equal(ddt, torch.zeros(4))


def test_gradients_are_deterministic(backend):
    inputs = make_inputs((5, 7, 6, 5), torch.float32)
    grad = torch.randn(5, 7, 6, 5)
    runs = [torch.autograd.grad(tsc_kernels.multistep_update(*inputs, relu=False), inputs[3:], grad) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _bad(**over):
    args = dict(u=torch.randn(2, 3, 4), u_prev=torch.randn(2, 3, 4), f=torch.randn(2, 3, 4), k=torch.tensor(-0.05),
                dt=torch.rand(3), keep=torch.ones(2), relu=False)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "args, exc, words",
    [
        (_bad(u_prev=torch.randn(2, 3, 5)), ValueError, "u_prev must have u's shape"),
        (_bad(f=torch.randn(2, 3, 5)), ValueError, "f must have u's shape"),
        (_bad(f=torch.randn(2, 3, 4).double()), TypeError, "f must have u's dtype"),
        (_bad(u=torch.randn(3), u_prev=torch.randn(3), f=torch.randn(3)), ValueError, "u must have shape (N, C"),
        (_bad(k=torch.tensor([0.1])), ValueError, "k must be a 0-d tensor"),
        (_bad(k=torch.tensor(0.1, dtype=torch.float64)), TypeError, "k must have dtype float32"),
        (_bad(k=0.1), TypeError, "k must be a torch.Tensor"),
        (_bad(dt=torch.rand(4)), ValueError, "dt must have shape (C,)"),
        (_bad(dt=torch.rand(3).half()), TypeError, "dt must have dtype float32"),
        (_bad(keep=torch.ones(3)), ValueError, "keep must have shape (N,)"),
        (_bad(keep=torch.ones(2, 1)), ValueError, "keep must have shape (N,)"),
        (_bad(relu=1), TypeError, "relu must be a bool"),
        (_bad(u=[1.0]), TypeError, "u must be a torch.Tensor"),
        (_bad(u=torch.ones(2, 3, 4, dtype=torch.int32)), TypeError, "u must have dtype"),
    ],
)
def test_bad_input(backend, args, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        tsc_kernels.multistep_update(**args)


@pytest.mark.cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_tensors_cpu_streaming_path(dtype, channels_last):
    """Outputs of 8 MB and more take the CPU kernel's streaming-store path: check it too (odd sizes,
    so runs start unaligned and end in a tail)."""
    if "cpu" not in tsc_kernels.available_backends("cpu"):
        pytest.skip("the C++ extension is not built")
    with tsc_kernels.use_backend("cpu"):
        inputs = make_inputs((3, 37, 131, 179), dtype, channels_last=channels_last)
        assert inputs[0].nbytes >= 8 << 20 or dtype != torch.float32
        compare_with_reference(inputs, relu=True)


@pytest.mark.cpu_only
def test_fused_op_kernel_counts(backend):
    """docs/ops.md (multistep_update): one kernel forward; backward one pass plus the finalize (the C++
    CPU op counts once: its reduction runs inside it); the reference is several."""
    from tsc_kernels.profiling import count_kernels

    inputs = make_inputs((2, 6, 5, 3), torch.float32)
    grad = torch.randn(2, 6, 5, 3)

    def fwd():
        return tsc_kernels.multistep_update(*inputs, relu=True)

    def bwd_only():
        torch.autograd.grad(out, inputs, grad, retain_graph=True)

    fwd()
    out = fwd()
    bwd_only()
    if backend == "triton" and tsc_kernels.backend.TRITON_INTERPRET:
        # backward: the pass, the finalize (ddt, dkeep, dk's per-channel-tile shares), the merge of dk's shares
        assert (count_triton_launches(fwd), count_triton_launches(bwd_only)) == (1, 3)
    elif backend == "torch":
        assert count_kernels(fwd) > 1 and count_kernels(bwd_only) > 1
    else:
        assert (count_kernels(fwd), count_kernels(bwd_only)) == (1, 1)


def test_triton_backward_grid_within_cuda_limits_at_many_channels(monkeypatch):
    """The Triton backward's (sample, channel tile) programs lie on grid axis 0 (up to 2^31 - 1): with
    the tiles on axis 1 (at most 65535), C > 131,070 could not launch. The kernels are replaced by
    recorders here (the interpreter would take minutes over 2^17 channels); the grid is the launcher's."""
    if not tsc_kernels.backend.TRITON_INTERPRET:
        pytest.skip("the Triton launchers run on CPU tensors only under TRITON_INTERPRET=1")
    ms = pytest.importorskip("tsc_kernels._triton.multistep_update")
    grids = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            grids.append((self.name, tuple(grid)))
            return lambda *args, **kwargs: None

    monkeypatch.setattr(ms, "multistep_bwd_kernel", Recorder("bwd"))
    monkeypatch.setattr(ms, "multistep_finalize_kernel", Recorder("finalize"))
    # tiles of 2 channels x 16 positions at any S (the GPU sizes would give S = 2 256 channels per tile)
    monkeypatch.setattr(ms, "RUN", ms.SMALL._replace(MIN_S=16))
    C = 140_001  # contiguous planes (S = 2): 2 channels per program, 70,001 tiles > 65535
    u, up, f = (torch.zeros(2, C, 2) for _ in range(3))
    ms.multistep_update_backward_triton(torch.zeros(2, C, 2), u, up, f, torch.tensor([0.3]), torch.ones(C),
                                        torch.ones(2), None)
    bwd = [g for name, g in grids if name == "bwd"]
    assert ms.backward_tile(C, 2, False) == (2, 16)
    assert bwd == [(2 * -(-C // 2),)]  # every (sample, channel tile) gets a program
    for _, grid in grids:
        assert grid[0] < 2**31 and all(d <= 65535 for d in grid[1:]), grid
