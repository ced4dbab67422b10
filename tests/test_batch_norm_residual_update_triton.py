"""The Triton fused BatchNorm tail (tsc_kernels._triton.batch_norm_residual_update) vs
tsc_kernels.reference, run on CPU tensors under the Triton interpreter.

The `small_sizes` fixture (every test here) makes the launchers use 32-element tiles, 8-channel row
tiles, at most 3 chunks per channel and merges of 2-chunk tiles (bn_triton.SMALL, _reduce), so these
small odd shapes run several chunks per channel, several tiles per chunk, partial tiles and merges
over several chunk tiles: the deterministic partial-sum + fixed-order finalize path the GPU runs.
"""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton kernels run on CPU only under the interpreter: set TRITON_INTERPRET=1 before pytest starts "
                "(the AOT compile for sm_80/sm_90 is tests/test_triton_aot.py)", allow_module_level=True)
pytest.importorskip("triton")

import tsc_kernels  # noqa: E402
from tsc_kernels import reference  # noqa: E402
from conftest import TOLERANCES, count_triton_launches  # noqa: E402
import tsc_kernels._triton.batch_norm_residual_update as bn_triton  # noqa: E402  (registers the tsc::*_triton ops)
import tsc_kernels._triton._reduce as reduce_triton  # noqa: E402

op = torch.ops.tsc.batch_norm_residual_update_triton
bwd_op = torch.ops.tsc.batch_norm_residual_update_backward_triton

SHAPES = [(3, 7, 5, 4), (2, 5, 9), (2, 3, 2, 3, 5), (5, 6)]


@pytest.fixture(autouse=True)
def small_sizes(monkeypatch):
    monkeypatch.setattr(bn_triton, "RUN", bn_triton.SMALL)
    monkeypatch.setattr(reduce_triton, "BLOCK_K", 2)
    monkeypatch.setattr(reduce_triton, "BLOCK_C", 4)
CL_FORMAT = {4: torch.channels_last, 5: torch.channels_last_3d}


def layouts(shape):
    return [False, True] if len(shape) in CL_FORMAT else [False]


CASES = [(s, cl) for s in SHAPES for cl in layouts(s)]
CASE_IDS = [f"{'x'.join(map(str, s))}{'-cl' if cl else ''}" for s, cl in CASES]


def fmt(t, cl):
    return t.to(memory_format=CL_FORMAT[t.dim()]) if cl else t


def make(shape, cl=False, dtype=torch.float32, affine=True, running=True, stats_dtype=None, offset=0.5):
    """Arguments of one call: y, x (mean `offset`, std 2), dt, running stats (positive variances), γ, β."""
    C = shape[1]
    acc = reference.accumulation_dtype(dtype)
    y = fmt(torch.randn(shape, dtype=acc).to(dtype), cl)
    x = fmt((offset + 2 * torch.randn(shape, dtype=acc)).to(dtype), cl)
    dt = torch.rand(C, dtype=acc) + 0.1
    sd = stats_dtype or acc
    rm = (0.3 * torch.randn(C)).to(sd) if running else None
    rv = (torch.rand(C) + 0.5).to(sd) if running else None
    w = (torch.randn(C) + 1).to(acc) if affine else None
    b = torch.randn(C).to(acc) if affine else None
    return y, x, dt, rm, rv, w, b


def clone(t):
    return None if t is None else t.clone()


def run_both(args, training, relu, momentum=0.1, eps=1e-5):
    """(Triton out, reference out) with their own copies of the running statistics, and those copies."""
    y, x, dt, rm, rv, w, b = args
    rm_t, rv_t, rm_r, rv_r = clone(rm), clone(rv), clone(rm), clone(rv)
    out, save_mean, save_invstd = op(y, x, dt, rm_t, rv_t, w, b, training, momentum, eps, relu)
    ref = reference.batch_norm_residual_update(y, x, dt, rm_r, rv_r, w, b, training, momentum, eps, relu)
    return out, ref, (rm_t, rv_t), (rm_r, rv_r), (save_mean, save_invstd)


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,cl", CASES, ids=CASE_IDS)
def test_forward_matches_reference(shape, cl, training, relu):
    args = make(shape, cl)
    out, ref, stats_t, stats_r, (save_mean, save_invstd) = run_both(args, training, relu)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.stride() == ref.stride(), "out keeps y's layout"
    for got, want in zip(stats_t, stats_r):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    x = args[1].double()
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims) if training else args[3].double()
    var = x.var(dims, unbiased=False) if training else args[4].double()
    torch.testing.assert_close(save_mean.double(), mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(save_invstd.double(), (var + 1e-5).rsqrt(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("affine,running", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("shape,cl", [CASES[0], CASES[1], CASES[-1]], ids=[CASE_IDS[0], CASE_IDS[1], CASE_IDS[-1]])
def test_forward_without_affine_or_running_stats(shape, cl, affine, running):
    for training in ([True, False] if running else [True]):  # eval needs the running statistics
        args = make(shape, cl, affine=affine, running=running)
        out, ref, stats_t, stats_r, _ = run_both(args, training, relu=True)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for got, want in zip(stats_t, stats_r):
            assert got is None and want is None or torch.allclose(got, want, atol=1e-6, rtol=1e-6)


def test_x_in_another_layout_than_y():
    # out follows y; x is read in y's layout (copied when it differs)
    y, x, *rest = make((3, 7, 5, 4), cl=True)
    x = x.contiguous()
    out, ref, *_ = run_both((y, x, *rest), training=True, relu=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.stride() == ref.stride() == y.stride()


def test_large_mean_keeps_the_variance():
    # mean 1e4, std 2: fp32 E[x^2] - E[x]^2 would lose the variance entirely (ulp(1e8) = 8); the
    # shifted per-chunk sums and the Chan merge must give the fp64 statistics to fp32 accuracy.
    args = make((3, 7, 5, 4), offset=1e4)
    out, _, _, _, (save_mean, save_invstd) = run_both(args, True, False)
    x = args[1].double()
    var = x.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(save_mean.double(), x.mean((0, 2, 3)), atol=0, rtol=1e-7)
    torch.testing.assert_close(save_invstd.double(), (var + 1e-5).rsqrt(), atol=0, rtol=1e-4)
    want = reference.batch_norm_residual_update(*[t.double() if t is not None else None for t in args[:3]],
                                                None, None, args[5].double(), args[6].double(), True, 0.1, 1e-5, False)
    torch.testing.assert_close(out.double(), want, atol=2e-3, rtol=1e-3)


def to64(args):
    return [None if t is None else t.double() for t in args]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_matches_reference(dtype, training, relu):
    """fp16/bf16 (and fp32) activations: close to the reference in that dtype (TOLERANCES), and no
    further from the fp64 truth than the reference's own error in that dtype plus one rounding."""
    atol, rtol = TOLERANCES[dtype]
    args = make((3, 7, 5, 4), True, dtype=dtype)
    out, ref, *_ = run_both(args, training, relu)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    truth = reference.batch_norm_residual_update(*to64(args), training, 0.1, 1e-5, relu)
    # elementwise: the reference's own error plus one rounding in `dtype` (both compute in fp32)
    allowed = (ref.double() - truth).abs() + torch.finfo(dtype).eps * truth.abs() + 1e-5
    assert ((out.double() - truth).abs() <= allowed).all()


@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_running_stats_after_three_steps(stats_dtype):
    # Three training steps (different batches) update the buffers in their own dtype as the
    # reference does; an eval step then reads them.
    args = make((2, 5, 9), stats_dtype=stats_dtype)
    y, _, dt, rm, rv, w, b = args
    rm_t, rv_t, rm_r, rv_r = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    for step in range(3):
        x = 1.5 + 3 * torch.randn(y.shape)
        op(y, x, dt, rm_t, rv_t, w, b, True, 0.2, 1e-5, True)
        reference.batch_norm_residual_update(y, x, dt, rm_r, rv_r, w, b, True, 0.2, 1e-5, True)
    assert rm_t.dtype == stats_dtype
    tol = dict(atol=1e-6, rtol=1e-6) if stats_dtype in (torch.float32, torch.float64) else {}
    torch.testing.assert_close(rm_t, rm_r, **tol)
    torch.testing.assert_close(rv_t, rv_r, **tol)
    # the eval step reads the kernel's own buffers on both sides: fp16/bf16 buffers may differ from
    # the reference's by one rounding, which x̂ = (x - μ) / σ magnifies beyond the output tolerance
    out, *_ = op(y, x, dt, rm_t, rv_t, w, b, False, 0.2, 1e-5, True)
    want = reference.batch_norm_residual_update(y, x, dt, rm_t.clone(), rv_t.clone(), w, b, False, 0.2, 1e-5, True)
    torch.testing.assert_close(out, want)


def test_matches_torch_batchnorm_module():
    # An oracle independent of tsc_kernels.reference: nn.BatchNorm2d, then the update by hand.
    bn = torch.nn.BatchNorm2d(7, momentum=0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    y, x, dt = torch.randn(3, 7, 5, 4), torch.randn(3, 7, 5, 4) * 2 + 1, torch.rand(7)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    out, *_ = op(y, x, dt, rm, rv, bn.weight.detach(), bn.bias.detach(), True, 0.3, bn.eps, True)
    want = torch.relu(y + dt.view(1, -1, 1, 1) * bn(x)).detach()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm, bn.running_mean)
    torch.testing.assert_close(rv, bn.running_var)


def test_eval_with_empty_batch():
    y, x, dt, rm, rv, w, b = make((0, 5, 3))
    out, save_mean, save_invstd = op(y, x, dt, rm, rv, w, b, False, 0.1, 1e-5, True)
    assert out.shape == (0, 5, 3)
    torch.testing.assert_close(save_mean, rm)
    torch.testing.assert_close(save_invstd, (rv + 1e-5).rsqrt())
    dy, dx, ddt, dw, db = bwd_op(torch.empty_like(out), x, dt, w, b, save_mean, save_invstd, out, False)
    assert dx.shape == x.shape and dy.shape == out.shape
    for t in (ddt, dw, db):
        assert torch.equal(t, torch.zeros(5))


def test_training_needs_two_values_per_channel():
    y, x, dt, rm, rv, w, b = make((1, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        op(y, x, dt, rm, rv, w, b, True, 0.1, 1e-5, False)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------


def grads_of(fn, args, grad):
    """d(out . grad) / d(y, x, dt, weight, bias) of out = fn(y, x, dt, rm, rv, w, b)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(t.dtype.is_floating_point)
              for t in args]
    for k in (3, 4):  # running statistics are buffers, never differentiated
        if leaves[k] is not None:
            leaves[k].requires_grad_(False)
    out = fn(*leaves)
    wrt = [t for k, t in enumerate(leaves) if k not in (3, 4) and t is not None]
    return torch.autograd.grad(out, wrt, grad)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,cl", CASES, ids=CASE_IDS)
def test_gradients_match_reference(shape, cl, training, relu):
    args = make(shape, cl)
    grad = fmt(torch.randn(shape), cl)
    got = grads_of(lambda *a: op(*a, training, 0.1, 1e-5, relu)[0], args, grad)
    want = grads_of(lambda *a: reference.batch_norm_residual_update(*a, training, 0.1, 1e-5, relu), args, grad)
    for name, g, w in zip(("y", "x", "dt", "weight", "bias"), got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")
    assert got[1].stride() == args[1].stride(), "dx keeps x's layout"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients(dtype):
    # gradients in fp16/bf16 no further from the fp64 truth than the reference's own error plus one
    # rounding in their dtype (and fp32 rounding noise of the sums)
    args = make((3, 7, 5, 4), True, dtype=dtype)
    grad = torch.randn(args[0].shape).to(dtype)
    fwd = lambda *a: op(*a, True, 0.1, 1e-5, True)[0]  # noqa: E731
    ref = lambda *a: reference.batch_norm_residual_update(*a, True, 0.1, 1e-5, True)  # noqa: E731
    got, want = grads_of(fwd, args, grad), grads_of(ref, args, grad)
    truth = grads_of(ref, to64(args), grad.double())
    for name, g, w, t in zip(("y", "x", "dt", "weight", "bias"), got, want, truth):
        assert g.dtype == w.dtype
        allowed = (w.double() - t).abs() + torch.finfo(g.dtype).eps * t.abs() + 1e-4 * t.abs().max()
        assert ((g.double() - t).abs() <= allowed).all(), f"d{name}"


def test_relu_out_in_another_layout_than_x():
    # dx follows x's layout, dy relu_out's (the declaration's fakes)
    y, x, dt, rm, rv, w, b = make((3, 7, 5, 4), cl=True)
    out, save_mean, save_invstd = op(y, x, dt, rm, rv, w, b, True, 0.1, 1e-5, True)
    grad = torch.randn(out.shape)
    got = bwd_op(grad, x.contiguous(), dt, w, b, save_mean, save_invstd, out, True)
    want = bwd_op(grad, x, dt, w, b, save_mean, save_invstd, out, True)
    assert got[0].stride() == out.stride() and got[1].is_contiguous()
    for g, wt in zip(got, want):
        torch.testing.assert_close(g, wt, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("training,relu,affine,running", [
    (True, True, True, True), (True, False, False, False), (False, True, True, True), (False, False, False, True)])
@pytest.mark.parametrize("shape,cl", [((2, 3, 2, 3), True), ((3, 2, 5), False), ((4, 3), False)])
def test_gradcheck_fp64(shape, cl, training, relu, affine, running):
    y, x, dt, rm, rv, w, b = make(shape, cl, dtype=torch.float64, affine=affine, running=running)
    leaves = [t.requires_grad_() for t in (y, x, dt, w, b) if t is not None]

    def fn(*tensors):
        t = list(tensors)
        w_, b_ = (t[3], t[4]) if affine else (None, None)
        return op(t[0], t[1], t[2], clone(rm), clone(rv), w_, b_, training, 0.1, 1e-5, relu)[0]

    # fast_mode: random projections of the Jacobian keep the interpreted kernel calls few.
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


# ---------------------------------------------------------------------------------------------
# torch.library glue, torch.compile, launches, determinism, public API
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training,relu", [(True, True), (False, False)])
@pytest.mark.parametrize("shape,cl", [((2, 3, 2, 3), True), ((3, 4, 5), False)])
def test_opcheck(shape, cl, training, relu):
    y, x, dt, rm, rv, w, b = make(shape, cl)
    leaves = [t.requires_grad_() for t in (y, x, dt, w, b)]
    torch.library.opcheck(op, (*leaves[:3], rm, rv, *leaves[3:], training, 0.1, 1e-5, relu))
    out, save_mean, save_invstd = op(y.detach(), x.detach(), dt.detach(), rm, rv, w.detach(), b.detach(),
                                     training, 0.1, 1e-5, relu)
    torch.library.opcheck(bwd_op, (torch.randn_like(out), x.detach(), dt.detach(), w.detach(), b.detach(),
                                   save_mean, save_invstd, out if relu else None, training))


@pytest.mark.parametrize("training", [True, False])
def test_torch_compile_fullgraph(training):
    args = make((3, 7, 5, 4), True)
    y, x, dt, rm, rv, w, b = args

    def step(y, x, dt, rm, rv, w, b):
        return tsc_kernels.batch_norm_residual_update(y, x, dt, rm, rv, w, b, training, 0.1, 1e-5, True)

    grad = torch.randn(y.shape)
    rm_e, rv_e, rm_c, rv_c = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    with tsc_kernels.use_backend("triton"):
        want = grads_of(lambda *a: step(*a[:3], rm_e, rv_e, *a[5:]), args, grad)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        got = grads_of(lambda *a: compiled(*a[:3], rm_c, rv_c, *a[5:]), args, grad)
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g, w_)
    torch.testing.assert_close(rm_c, rm_e)
    torch.testing.assert_close(rv_c, rv_e)


@pytest.mark.cpu_only
@pytest.mark.parametrize("training,relu,fwd,bwd", [(True, True, 3, 3), (True, False, 3, 3), (False, True, 1, 2), (False, False, 1, 2)])
def test_launch_counts(training, relu, fwd, bwd):
    # training forward: stats, stats finalize, apply; eval forward: apply alone.
    # training backward: reduce, finalize, dx; eval backward: reduce (writes dx), finalize.
    # The finalize launches are the grid-wide barrier between a reduction and its consumers
    # (docs/ops.md).
    y, x, dt, rm, rv, w, b = make((3, 7, 5, 4), True)
    result = {}
    assert count_triton_launches(lambda: result.update(
        fwd=op(y, x, dt, rm, rv, w, b, training, 0.1, 1e-5, relu))) == fwd
    out, save_mean, save_invstd = result["fwd"]
    assert count_triton_launches(lambda: bwd_op(torch.randn_like(out), x, dt, w, b, save_mean, save_invstd,
                                                out if relu else None, training)) == bwd


def test_deterministic():
    # fixed chunking and fixed-order finalize sums: bitwise equal results run after run
    args = make((3, 7, 5, 4), True)
    grad = torch.randn(args[0].shape)
    results = []
    for _ in range(2):
        out, _, stats, _, saved = run_both(args, True, True)
        results.append([out, *stats, *saved, *grads_of(lambda *a: op(*a, True, 0.1, 1e-5, True)[0], args, grad)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_public_api_dispatches_to_triton():
    args = make((2, 5, 9))
    rm_t, rv_t = args[3].clone(), args[4].clone()
    with tsc_kernels.use_backend("triton"):
        out = tsc_kernels.batch_norm_residual_update(*args[:3], rm_t, rv_t, *args[5:], True)
        with pytest.raises(ValueError, match="running_mean"):
            tsc_kernels.batch_norm_residual_update(*args[:3], args[3][:2], args[4], *args[5:], True)
    ref = reference.batch_norm_residual_update(*args, True, 0.1, 1e-5, True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm_t, args[3])


def test_plan_keeps_chunks_within_limits():
    # the chunking rule (GPU and test sizes) on network-sized shapes: chunks on grid axis 1
    # <= MAX_CHUNKS <= 65535, every chunk a whole number of tiles, the chunks covering the rows exactly
    for sizes in (bn_triton.GPU, bn_triton.SMALL):
        assert sizes.MAX_CHUNKS <= 65535
        for shape, cl in [((256, 64, 56, 56), False), ((256, 2048, 7, 7), False), ((256, 64, 56, 56), True), ((4096, 3), False)]:
            t = torch.empty(shape, device="meta")
            p = bn_triton._plan(t.to(memory_format=torch.channels_last) if cl else t, cl, sizes)
            assert 1 <= p["n_chunks"] <= sizes.MAX_CHUNKS
            assert p["a_per"] % p["BLOCK_A"] == 0 and p["BLOCK_A"] * p["BLOCK_B"] == sizes.TILE
            assert (p["n_chunks"] - 1) * p["a_per"] < p["A"] <= p["n_chunks"] * p["a_per"]


@pytest.mark.parametrize("strided", ["var", "mean", "both"])
def test_running_stats_written_back_when_only_one_buffer_is_strided(strided):
    # Each buffer that is not contiguous is updated through a copy and written back on its own: a
    # contiguous running_mean beside a strided running_var once left the variance at its old value.
    args = make((3, 7, 5, 4))
    y, x, dt, rm, rv, w, b = args

    def maybe_strided(t, which):
        if strided not in (which, "both"):
            return t.clone()
        holder = torch.full((2 * t.numel(),), -7.0, dtype=t.dtype)
        holder[::2] = t
        return holder[::2]  # stride 2: not contiguous

    rm_t, rv_t = maybe_strided(rm, "mean"), maybe_strided(rv, "var")
    rm_r, rv_r = rm.clone(), rv.clone()
    op(y, x, dt, rm_t, rv_t, w, b, True, 0.1, 1e-5, True)
    reference.batch_norm_residual_update(y, x, dt, rm_r, rv_r, w, b, True, 0.1, 1e-5, True)
    assert not torch.equal(rv_r, rv) and not torch.equal(rm_r, rm)  # the step does move both
    torch.testing.assert_close(rm_t, rm_r, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rv_t, rv_r, atol=1e-6, rtol=1e-6)
