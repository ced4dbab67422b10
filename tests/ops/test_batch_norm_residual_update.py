"""The fused BatchNorm tail on every backend vs the reference (docs/ops.md).

Accuracy is judged against an fp64 evaluation of the reference: a backend's error in a dtype may be
at most twice the reference's own error in that dtype plus a small absolute slack.
"""
import importlib.util
import os
import re

import math

import pytest
import torch

import tsc_kernels
from tsc_kernels import reference
from conftest import FUSED_BACKENDS, TOLERANCES, count_triton_launches
from hypothesis import strategies as st
from hypothesis_cases import _close, _permute, activation_shapes, LOW_PRECISION, SEED

# Not powers of two; 0-3 spatial dims.
SHAPES = [(3, 7, 5, 4), (2, 5, 9), (4, 3, 2, 3, 5), (5, 6)]

OP_NAMES = {"cpu": "batch_norm_residual_update", "torch": "batch_norm_residual_update_torch",
            "triton": "batch_norm_residual_update_triton"}


acc_dtype = reference.accumulation_dtype  # fp32 arithmetic for fp32/fp16/bf16, fp64 for fp64


def channels_last(t):
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def make_inputs(shape, dtype, affine=True, running=True, x_cl=False, y_cl=False, training=True, relu=True):
    """(y, x, dt, running_mean, running_var, weight, bias); y is nudged so that no pre-ReLU sum is
    within 0.1 of the kink (where the fp64 and low-precision masks could disagree)."""
    C = shape[1]
    acc = acc_dtype(dtype)
    x = torch.randn(shape, dtype=torch.float64) * 1.5 + 0.7
    y = torch.randn(shape, dtype=torch.float64)
    dt = torch.rand(C, dtype=torch.float64) + 0.2
    rm = torch.randn(C, dtype=torch.float64) * 0.3 if running else None
    rv = torch.rand(C, dtype=torch.float64) + 0.5 if running else None
    w = torch.rand(C, dtype=torch.float64) + 0.5 if affine else None
    b = torch.randn(C, dtype=torch.float64) * 0.2 if affine else None
    if relu:
        pre = reference.batch_norm_residual_update(
            y,
            x.to(dtype).double(),
            dt,
            None if rm is None else rm.clone(),
            None if rv is None else rv.clone(),
            w,
            b,
            training or rm is None,
            0.1,
            1e-5,
            False,
        )
        y = y + 0.1 * torch.sign(pre)
    y, x = y.to(dtype), x.to(dtype)
    if y_cl:
        y = channels_last(y)
    if x_cl:
        x = channels_last(x)
    cast = [None if t is None else t.to(acc) for t in (dt, rm, rv, w, b)]
    return (y, x, *cast[:1], *cast[1:3], *cast[3:])


def run(fn, y, x, dt, rm, rv, w, b, training, relu, grad):
    """out, running stats and the gradients of (y, x, dt, w, b) of fn on leaf copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (y, x, dt, w, b)]
    ly, lx, ldt, lw, lb = leaves
    rm, rv = (None if t is None else t.clone() for t in (rm, rv))
    out = fn(ly, lx, ldt, rm, rv, lw, lb, training, 0.1, 1e-5, relu)
    diff = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, diff, grad.to(out.dtype))
    return out.detach(), rm, rv, grads


def check_against_fp64(shape, dtype, training, affine=True, running=True, relu=True, x_cl=False, y_cl=False):
    inputs = make_inputs(shape, dtype, affine, running, x_cl, y_cl, training, relu)
    y, x = inputs[:2]
    grad = torch.randn(shape, dtype=torch.float64)
    got = run(tsc_kernels.batch_norm_residual_update, *inputs, training, relu, grad)
    ref = run(reference.batch_norm_residual_update, *inputs, training, relu, grad)
    exact = run(
        reference.batch_norm_residual_update, *(None if t is None else t.double() for t in inputs), training, relu, grad
    )
    assert got[0].dtype == y.dtype and got[0].stride() == ref[0].stride(), "out keeps y's dtype and memory format"
    atol = TOLERANCES[dtype][0]
    values = y.numel() // shape[1]
    names = ["out", "running_mean", "running_var", "dy", "dx", "ddt"] + (["dweight", "dbias"] if affine else [])
    flat = [[*result[:3], *result[3]] for result in (got, ref, exact)]
    for name, g, r, e in zip(names, *flat):
        if e is None:
            assert g is None and r is None, name
            continue
        assert g.dtype == r.dtype and g.shape == r.shape, name
        scale = values ** 0.5 if name in ("ddt", "dweight", "dbias") else 1.0  # sums over N * spatial values
        err = (g.double() - e).abs().max().item() if g.numel() else 0.0
        ref_err = (r.double() - e).abs().max().item() if r.numel() else 0.0
        assert err <= 2 * ref_err + atol * scale * max(1.0, e.abs().max().item()), (
            f"{name}: error {err:.3g} vs reference's {ref_err:.3g}"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, shape, training, dtype):
    check_against_fp64(shape, dtype, training)


@pytest.mark.parametrize(
    "affine, running, relu", [(False, True, True), (True, False, True), (False, False, False), (True, True, False)]
)
@pytest.mark.parametrize("shape", [(3, 7, 5, 4), (5, 6)])
def test_options_match_reference(backend, shape, affine, running, relu):
    check_against_fp64(shape, torch.float32, True, affine=affine, running=running, relu=relu)
    if running:
        check_against_fp64(shape, torch.float32, False, affine=affine, running=running, relu=relu)


@pytest.mark.parametrize("x_cl, y_cl", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(3, 7, 5, 4), (2, 5, 9), (4, 3, 2, 3, 5)])
def test_channels_last_matches_reference(backend, shape, training, x_cl, y_cl):
    check_against_fp64(shape, torch.float32, training, x_cl=x_cl, y_cl=y_cl)
    check_against_fp64(shape, torch.bfloat16, training, x_cl=x_cl, y_cl=y_cl, relu=False)


@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_running_statistics_after_three_steps(backend, buffer_dtype):
    C = 6
    got = [torch.zeros(C, dtype=buffer_dtype), torch.ones(C, dtype=buffer_dtype)]
    want = [t.clone() for t in got]
    dt = torch.rand(C)
    for step in range(3):
        y, x = torch.randn(4, C, 3, 5), torch.randn(4, C, 3, 5) * (step + 1) + step
        tsc_kernels.batch_norm_residual_update(y, x, dt, *got, None, None, True, 0.2, 1e-5, True)
        reference.batch_norm_residual_update(y, x, dt, *want, None, None, True, 0.2, 1e-5, True)
    atol, rtol = TOLERANCES[buffer_dtype]
    for g, w in zip(got, want):
        assert g.dtype == buffer_dtype
        torch.testing.assert_close(g, w, atol=max(atol, 1e-5), rtol=max(rtol, 1e-5))
    # eval reads them back
    y, x = torch.randn(2, C, 4), torch.randn(2, C, 4)
    torch.testing.assert_close(
        tsc_kernels.batch_norm_residual_update(y, x, dt, *got, None, None, False, 0.2, 1e-5, True),
        reference.batch_norm_residual_update(y, x, dt, *got, None, None, False, 0.2, 1e-5, True),
    )


def _register_triton():
    y, x, dt, rm, rv, w, b = make_inputs((2, 3, 4), torch.float32)
    tsc_kernels.batch_norm_residual_update(y, x, dt, rm, rv, w, b, True, 0.1, 1e-5, True)


@pytest.mark.parametrize("training", [True, False])
def test_opcheck_without_affine(backend, training):
    """opcheck with None weight and bias, ReLU off (tests/ops/test_common.py's test_opcheck runs the
    affine samples with ReLU on and off)."""
    relu, affine = False, False
    if backend == "triton":
        _register_triton()
    forward = getattr(torch.ops.tsc, OP_NAMES[backend])
    for cl in (False, True):
        y, x, dt, rm, rv, w, b = make_inputs((2, 5, 3, 4), torch.float32, affine=affine, x_cl=cl, y_cl=cl)
        args = (y, x, dt, rm, rv, w, b, training, 0.1, 1e-5, relu)
        torch.library.opcheck(forward, args)
        if backend == "torch":  # no separate backward op: autograd derives it
            continue
        out, mean, invstd = forward(*args)
        backward = getattr(torch.ops.tsc, OP_NAMES[backend].replace("update", "update_backward"))
        saved = (mean, invstd, out if relu else None)
        torch.library.opcheck(backward, (torch.randn_like(out), x, dt, w, b, *saved, training))


def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    y, x, dt, rm, rv, w, b = make_inputs((2, 6, 5, 3), torch.float32)

    def step(fn, y, x, dt, rm, rv, w, b):
        return fn(y, x * 2.0, dt, rm, rv, w, b, True, 0.1, 1e-5, True).sum()

    leaves = [t.clone().requires_grad_() for t in (y, x, dt, w, b)]
    ref_leaves = [t.clone().requires_grad_() for t in (y, x, dt, w, b)]
    stats, ref_stats = (rm.clone(), rv.clone()), (rm.clone(), rv.clone())
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    lp = leaves
    loss = compiled(tsc_kernels.batch_norm_residual_update, lp[0], lp[1], lp[2], *stats, lp[3], lp[4])
    rl = ref_leaves
    ref_loss = step(reference.batch_norm_residual_update, rl[0], rl[1], rl[2], *ref_stats, rl[3], rl[4])
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    for g, r in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(ref_loss, ref_leaves)):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    for s, r in zip(stats, ref_stats):  # the in-place running update survives functionalisation
        torch.testing.assert_close(s, r)


@pytest.mark.big_for_interpreter
@pytest.mark.parametrize("fused", FUSED_BACKENDS)
def test_deterministic_across_runs_and_threads(fused):
    """The fused ops' results are bitwise the same across calls and thread counts (fixed-order
    reductions; ATen's own batch norm, the reference, is not). The planes (2, 3, 131, 129) are
    longer than one chunk of the CPU kernel; the rows case is channels-last."""
    threads = torch.get_num_threads()
    for cl in (False, True):
        y, x, dt, rm, rv, w, b = make_inputs((2, 3, 131, 129), torch.float32, x_cl=cl, y_cl=cl)
        grad = torch.randn_like(y)
        results = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            try:
                with tsc_kernels.use_backend(fused):
                    results.append(
                        run(tsc_kernels.batch_norm_residual_update, y, x, dt, rm, rv, w, b, True, True, grad)
                    )
            finally:
                torch.set_num_threads(threads)
        for other in results[1:]:
            assert torch.equal(other[0], results[0][0])
            for g, g0 in zip(other[3], results[0][3]):
                assert torch.equal(g, g0)


# ---------------------------------------------------------------------------------------------
# What the suite common to every op (tests/ops/test_common.py) runs: reference match per dtype x
# layout, opcheck, fp64 gradcheck, torch.compile, empty batch, bad input
# ---------------------------------------------------------------------------------------------
def sample_inputs(dtype, channels_last):
    """Training (running statistics updated) and eval (read), ReLU on and off, with the affine
    parameters, at a tiny shape per layout (x and y in it); test_opcheck_without_affine adds None
    weight and bias."""
    shape = (3, 4, 2, 3) if channels_last else (2, 3, 4, 5)
    samples = []
    for training in (True, False):
        for relu in (True, False):
            y, x, dt, rm, rv, w, b = make_inputs(shape, dtype, x_cl=channels_last, y_cl=channels_last,
                                                 training=training, relu=relu)
            y, x, dt, w, b = (t.requires_grad_() for t in (y, x, dt, w, b))
            samples.append(((y, x, dt, rm, rv, w, b, training, 0.1, 1e-5, relu), {}))
    return samples


def reference_terms(args):
    """Every output depends on its channel's batch statistics: N * spatial values."""
    return args[0].numel() // args[0].shape[1]


def empty_inputs():
    y, x, dt, rm, rv, w, b = make_inputs((0, 4, 3, 3), torch.float32, relu=False)
    y, x, dt, w, b = (t.requires_grad_() for t in (y, x, dt, w, b))
    return [((y, x, dt, rm, rv, w, b, False, 0.1, 1e-5, True), {})]

# tests/ops/test_triton_plans.py: the op's forward arguments at an activation shape (meta tensors:
# meta(shape, channels_last=False, dtype=float32)) and the kernels that merge its per-chunk partials
def plan_forward_args(shape, cl, dtype, meta):
    C = shape[1]
    return (meta(shape, cl, dtype), meta(shape, cl, dtype), *(meta((C,)) for _ in range(5)), True, 0.1, 1e-5, True)


PLAN_MERGES = ("bn_stats_finalize_kernel", "bn_bwd_finalize_kernel")


BN_BAD_BASE = dict(y=torch.randn(2, 3, 4), x=torch.randn(2, 3, 4), dt=torch.rand(3), running_mean=torch.zeros(3),
                   running_var=torch.ones(3), weight=torch.ones(3), bias=torch.zeros(3), training=True, momentum=0.1,
                   eps=1e-5, relu=True)
BAD_INPUTS = [
    (dict(BN_BAD_BASE, **{"x": torch.randn(2, 3, 5)}), ValueError, re.escape("x must have y's shape")),
    (dict(BN_BAD_BASE, **{"x": torch.randn(2, 3, 4).double()}), TypeError, re.escape("x must have y's dtype")),
    (dict(BN_BAD_BASE, **{"dt": torch.rand(4)}), ValueError, re.escape("dt must have shape (C,)")),
    (dict(BN_BAD_BASE, **{"weight": torch.rand(4)}), ValueError, re.escape("weight must have shape (C,)")),
    (dict(BN_BAD_BASE, **{"bias": torch.rand(3, 1)}), ValueError, re.escape("bias must have shape (C,)")),
    (dict(BN_BAD_BASE, **{"weight": torch.ones(3, dtype=torch.int64)}), TypeError, re.escape("weight must have dtype")),
    (dict(BN_BAD_BASE, **{"running_var": None}), ValueError, re.escape("running_mean and running_var must both")),
    (
        dict(BN_BAD_BASE, **{"running_mean": None, "running_var": None, "training": False}),
        ValueError,
        re.escape("training=False (running statistics) needs"),
    ),
    (
        dict(BN_BAD_BASE, **{"running_var": torch.ones(3).double()}),
        TypeError,
        re.escape("running_var must have running_mean's dtype"),
    ),
    (dict(BN_BAD_BASE, **{"running_mean": torch.zeros(3, device="meta")}), ValueError, re.escape("one device")),
    (
        dict(BN_BAD_BASE, **{"y": torch.randn(1, 3), "x": torch.randn(1, 3)}),
        ValueError,
        re.escape("training needs more than 1 value per channel"),
    ),
    (
        dict(BN_BAD_BASE, **{"y": torch.randn(1, 3, 1, 1), "x": torch.randn(1, 3, 1, 1)}),
        ValueError,
        re.escape("training needs more than 1 value per channel"),
    ),
    (dict(BN_BAD_BASE, **{"momentum": 1.5}), ValueError, re.escape("momentum must be in [0, 1]")),
    (dict(BN_BAD_BASE, **{"eps": 0.0}), ValueError, re.escape("eps must be > 0")),
    (dict(BN_BAD_BASE, **{"eps": "1e-5"}), TypeError, re.escape("eps must be a float")),
    (dict(BN_BAD_BASE, **{"training": 1}), TypeError, re.escape("training must be a bool")),
    (dict(BN_BAD_BASE, **{"relu": None}), TypeError, re.escape("relu must be a bool")),
    (dict(BN_BAD_BASE, **{"y": None}), TypeError, re.escape("y must be a torch.Tensor")),
]


def test_eval_allows_one_value_per_channel(backend):
    y, x, dt, rm, rv, w, b = make_inputs((1, 3), torch.float32, training=False)
    out = tsc_kernels.batch_norm_residual_update(y, x, dt, rm, rv, w, b, False, 0.1, 1e-5, True)
    torch.testing.assert_close(
        out, reference.batch_norm_residual_update(y, x, dt, rm, rv, w, b, False, 0.1, 1e-5, True)
    )


@pytest.mark.cpu_only
@pytest.mark.parametrize("relu", [False, True])
def test_fused_op_is_one_kernel_each_way(backend, relu):
    """docs/performance.md: the fused op is one kernel forward and one backward; the reference is several."""
    from tsc_kernels.profiling import count_kernels

    y, x, dt, rm, rv, w, b = make_inputs((2, 6, 5, 3), torch.float32)
    leaves = [t.requires_grad_() for t in (y, x, dt, w, b)]
    grad = torch.randn(2, 6, 5, 3)

    def fwd():
        return tsc_kernels.batch_norm_residual_update(y, x, dt, rm, rv, w, b, True, 0.1, 1e-5, relu)

    def bwd_only():
        torch.autograd.grad(out, leaves, grad, retain_graph=True)

    fwd()
    out = fwd()
    bwd_only()
    count = count_triton_launches if backend == "triton" and tsc_kernels.backend.TRITON_INTERPRET else count_kernels
    n_fwd, n_bwd = count(fwd), count(bwd_only)
    if backend == "torch":
        assert n_fwd > 1 and n_bwd > 1, (n_fwd, n_bwd)
    elif backend == "triton":  # launches: a statistics and an apply kernel may be separate
        assert 1 <= n_fwd <= 3 and 1 <= n_bwd <= 3, (n_fwd, n_bwd)
    else:
        assert (n_fwd, n_bwd) == (1, 1), (n_fwd, n_bwd)


# ---------------------------------------------------------------------------------------------
# The Triton kernels under the interpreter (from test_batch_norm_residual_update_triton.py).
# The Triton fused BatchNorm tail (tsc_kernels._triton.batch_norm_residual_update) vs
# tsc_kernels.reference, run on CPU tensors under the Triton interpreter.
#
# The `small_sizes` fixture (every test here) makes the launchers use 32-element tiles, 8-channel row
# tiles, at most 3 chunks per channel and merges of 2-chunk tiles (bn_triton.SMALL, _reduce), so these
# small odd shapes run several chunks per channel, several tiles per chunk, partial tiles and merges
# over several chunk tiles: the deterministic partial-sum + fixed-order finalize path the GPU runs.
# ---------------------------------------------------------------------------------------------

TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
# the Triton kernels run on CPU only under the interpreter: TRITON_INTERPRET=1 before pytest starts
# (the AOT compile for sm_80/sm_90 is tests/tooling/test_triton_aot.py)
TRITON_ONLY = pytest.mark.skipif(not TRITON_INTERPRETED, reason="the Triton kernels run on CPU only under the "
                                 "interpreter: set TRITON_INTERPRET=1 before pytest starts")
if TRITON_INTERPRETED:
    import tsc_kernels._triton.batch_norm_residual_update as bn_triton  # registers the tsc::*_triton ops
    import tsc_kernels._triton._reduce as reduce_triton

    op = torch.ops.tsc.batch_norm_residual_update_triton
    bwd_op = torch.ops.tsc.batch_norm_residual_update_backward_triton


TRITON_SHAPES = [(3, 7, 5, 4), (2, 5, 9), (2, 3, 2, 3, 5), (5, 6)]



@pytest.fixture
def small_sizes(monkeypatch):
    monkeypatch.setattr(bn_triton, "RUN", bn_triton.SMALL)
    monkeypatch.setattr(reduce_triton, "BLOCK_K", 2)
    monkeypatch.setattr(reduce_triton, "BLOCK_C", 4)



CL_FORMAT = {4: torch.channels_last, 5: torch.channels_last_3d}



def layouts(shape):
    return [False, True] if len(shape) in CL_FORMAT else [False]



CASES = [(s, cl) for s in TRITON_SHAPES for cl in layouts(s)]



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



@TRITON_ONLY
@pytest.mark.usefixtures("small_sizes")
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,cl", CASES, ids=CASE_IDS)
def test_triton_forward_matches_reference(shape, cl, training, relu):
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



@TRITON_ONLY
@pytest.mark.usefixtures("small_sizes")
@pytest.mark.parametrize("affine,running", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("shape,cl", [CASES[0], CASES[1], CASES[-1]], ids=[CASE_IDS[0], CASE_IDS[1], CASE_IDS[-1]])
def test_triton_forward_without_affine_or_running_stats(shape, cl, affine, running):
    for training in ([True, False] if running else [True]):  # eval needs the running statistics
        args = make(shape, cl, affine=affine, running=running)
        out, ref, stats_t, stats_r, _ = run_both(args, training, relu=True)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for got, want in zip(stats_t, stats_r):
            assert got is None and want is None or torch.allclose(got, want, atol=1e-6, rtol=1e-6)



@TRITON_ONLY
@pytest.mark.usefixtures("small_sizes")
def test_triton_x_in_another_layout_than_y():
    # out follows y; x is read in y's layout (copied when it differs)
    y, x, *rest = make((3, 7, 5, 4), cl=True)
    x = x.contiguous()
    out, ref, *_ = run_both((y, x, *rest), training=True, relu=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.stride() == ref.stride() == y.stride()



@TRITON_ONLY
@pytest.mark.usefixtures("small_sizes")
def test_triton_large_mean_keeps_the_variance():
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



@TRITON_ONLY
@pytest.mark.usefixtures("small_sizes")
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_low_precision_matches_reference(dtype, training, relu):
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



@TRITON_ONLY
@pytest.mark.usefixtures("small_sizes")
@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_triton_running_stats_after_three_steps(stats_dtype):
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



@TRITON_ONLY
@pytest.mark.usefixtures("small_sizes")
def test_triton_matches_torch_batchnorm_module():
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



@TRITON_ONLY
@pytest.mark.usefixtures("small_sizes")
def test_triton_eval_with_empty_batch():
    y, x, dt, rm, rv, w, b = make((0, 5, 3))
    out, save_mean, save_invstd = op(y, x, dt, rm, rv, w, b, False, 0.1, 1e-5, True)
    assert out.shape == (0, 5, 3)
    torch.testing.assert_close(save_mean, rm)
    torch.testing.assert_close(save_invstd, (rv + 1e-5).rsqrt())
    dy, dx, ddt, dw, db = bwd_op(torch.empty_like(out), x, dt, w, b, save_mean, save_invstd, out, False)
    assert dx.shape == x.shape and dy.shape == out.shape
    for t in (ddt, dw, db):
        assert torch.equal(t, torch.zeros(5))



@TRITON_ONLY
@pytest.mark.usefixtures("small_sizes")
def test_triton_training_needs_two_values_per_channel():
    y, x, dt, rm, rv, w, b = make((1, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        op(y, x, dt, rm, rv, w, b, True, 0.1, 1e-5, False)



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



@TRITON_ONLY
@pytest.mark.usefixtures("small_sizes")
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,cl", CASES, ids=CASE_IDS)
def test_triton_gradients_match_reference(shape, cl, training, relu):
    args = make(shape, cl)
    grad = fmt(torch.randn(shape), cl)
    got = grads_of(lambda *a: op(*a, training, 0.1, 1e-5, relu)[0], args, grad)
    want = grads_of(lambda *a: reference.batch_norm_residual_update(*a, training, 0.1, 1e-5, relu), args, grad)
    for name, g, w in zip(("y", "x", "dt", "weight", "bias"), got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")
    assert got[1].stride() == args[1].stride(), "dx keeps x's layout"



@TRITON_ONLY
@pytest.mark.usefixtures("small_sizes")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision_gradients(dtype):
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



@TRITON_ONLY
@pytest.mark.usefixtures("small_sizes")
def test_triton_relu_out_in_another_layout_than_x():
    # dx follows x's layout, dy relu_out's (the declaration's fakes)
    y, x, dt, rm, rv, w, b = make((3, 7, 5, 4), cl=True)
    out, save_mean, save_invstd = op(y, x, dt, rm, rv, w, b, True, 0.1, 1e-5, True)
    grad = torch.randn(out.shape)
    got = bwd_op(grad, x.contiguous(), dt, w, b, save_mean, save_invstd, out, True)
    want = bwd_op(grad, x, dt, w, b, save_mean, save_invstd, out, True)
    assert got[0].stride() == out.stride() and got[1].is_contiguous()
    for g, wt in zip(got, want):
        torch.testing.assert_close(g, wt, atol=1e-6, rtol=1e-5)



@TRITON_ONLY
@pytest.mark.usefixtures("small_sizes")
@pytest.mark.parametrize("training,relu,affine,running", [
    (True, True, True, True), (True, False, False, False), (False, True, True, True), (False, False, False, True)])
@pytest.mark.parametrize("shape,cl", [((2, 3, 2, 3), True), ((3, 2, 5), False), ((4, 3), False)])
def test_triton_gradcheck_fp64(shape, cl, training, relu, affine, running):
    y, x, dt, rm, rv, w, b = make(shape, cl, dtype=torch.float64, affine=affine, running=running)
    leaves = [t.requires_grad_() for t in (y, x, dt, w, b) if t is not None]

    def fn(*tensors):
        t = list(tensors)
        w_, b_ = (t[3], t[4]) if affine else (None, None)
        return op(t[0], t[1], t[2], clone(rm), clone(rv), w_, b_, training, 0.1, 1e-5, relu)[0]

    # fast_mode: random projections of the Jacobian keep the interpreted kernel calls few.
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)



@TRITON_ONLY
@pytest.mark.usefixtures("small_sizes")
@pytest.mark.parametrize("training,relu", [(True, True), (False, False)])
@pytest.mark.parametrize("shape,cl", [((2, 3, 2, 3), True), ((3, 4, 5), False)])
def test_triton_opcheck(shape, cl, training, relu):
    y, x, dt, rm, rv, w, b = make(shape, cl)
    leaves = [t.requires_grad_() for t in (y, x, dt, w, b)]
    torch.library.opcheck(op, (*leaves[:3], rm, rv, *leaves[3:], training, 0.1, 1e-5, relu))
    out, save_mean, save_invstd = op(y.detach(), x.detach(), dt.detach(), rm, rv, w.detach(), b.detach(),
                                     training, 0.1, 1e-5, relu)
    torch.library.opcheck(bwd_op, (torch.randn_like(out), x.detach(), dt.detach(), w.detach(), b.detach(),
                                   save_mean, save_invstd, out if relu else None, training))



@TRITON_ONLY
@pytest.mark.usefixtures("small_sizes")
@pytest.mark.parametrize("training", [True, False])
def test_triton_torch_compile_fullgraph(training):
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



@TRITON_ONLY
@pytest.mark.usefixtures("small_sizes")
@pytest.mark.cpu_only
@pytest.mark.parametrize(
    "training,relu,fwd,bwd", [(True, True, 3, 3), (True, False, 3, 3), (False, True, 1, 2), (False, False, 1, 2)]
)
def test_triton_launch_counts(training, relu, fwd, bwd):
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



@TRITON_ONLY
@pytest.mark.usefixtures("small_sizes")
def test_triton_deterministic():
    # fixed chunking and fixed-order finalize sums: bitwise equal results run after run
    args = make((3, 7, 5, 4), True)
    grad = torch.randn(args[0].shape)
    results = []
    for _ in range(2):
        out, _, stats, _, saved = run_both(args, True, True)
        results.append([out, *stats, *saved, *grads_of(lambda *a: op(*a, True, 0.1, 1e-5, True)[0], args, grad)])
    for a, b in zip(*results):
        assert torch.equal(a, b)



@TRITON_ONLY
@pytest.mark.usefixtures("small_sizes")
def test_triton_public_api_dispatches_to_triton():
    args = make((2, 5, 9))
    rm_t, rv_t = args[3].clone(), args[4].clone()
    with tsc_kernels.use_backend("triton"):
        out = tsc_kernels.batch_norm_residual_update(*args[:3], rm_t, rv_t, *args[5:], True)
        with pytest.raises(ValueError, match="running_mean"):
            tsc_kernels.batch_norm_residual_update(*args[:3], args[3][:2], args[4], *args[5:], True)
    ref = reference.batch_norm_residual_update(*args, True, 0.1, 1e-5, True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm_t, args[3])



@TRITON_ONLY
@pytest.mark.usefixtures("small_sizes")
def test_triton_plan_keeps_chunks_within_limits():
    # the chunking rule (GPU and test sizes) on network-sized shapes: chunks on grid axis 1
    # <= MAX_CHUNKS <= 65535, every chunk a whole number of tiles, the chunks covering the rows exactly
    for sizes in (bn_triton.GPU, bn_triton.SMALL):
        assert sizes.MAX_CHUNKS <= 65535
        for shape, cl in [
            ((256, 64, 56, 56), False),
            ((256, 2048, 7, 7), False),
            ((256, 64, 56, 56), True),
            ((4096, 3), False),
        ]:
            t = torch.empty(shape, device="meta")
            p = bn_triton._plan(t.to(memory_format=torch.channels_last) if cl else t, cl, sizes)
            assert 1 <= p["n_chunks"] <= sizes.MAX_CHUNKS
            assert p["a_per"] % p["BLOCK_A"] == 0 and p["BLOCK_A"] * p["BLOCK_B"] == sizes.TILE
            assert (p["n_chunks"] - 1) * p["a_per"] < p["A"] <= p["n_chunks"] * p["a_per"]



@TRITON_ONLY
@pytest.mark.usefixtures("small_sizes")
@pytest.mark.parametrize("strided", ["var", "mean", "both"])
def test_triton_running_stats_written_back_when_only_one_buffer_is_strided(strided):
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


# ---------------------------------------------------------------------------------------------
# Hypothesis properties (tests/ops/test_properties.py runs them on every backend): the case
# strategy, the check against the fp64 reference and docs/ops.md's properties
# ---------------------------------------------------------------------------------------------
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


# --- batch_norm_residual_update -------------------------------------------------------------
def batch_norm_fp64(case):
    shape, dtype, training, affine, running, relu, x_cl, y_cl, _ = case
    check_against_fp64(shape, dtype, training, affine, running, relu, x_cl, y_cl)


def _bn_inputs(case, dtype=None):
    shape, dtype_, training, affine, running, relu, x_cl, y_cl, _ = case
    return make_inputs(shape, dtype or dtype_, affine, running, x_cl, y_cl, training, relu)


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
    shifted = _bn(
        (y, x + shift, dt, None if rm is None else rm.clone(), None if rv is None else rv.clone(), w, b), case
    )
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


PROPERTY_STRATEGY = batch_norm_cases
# (check against the fp64 reference, [properties]): tests/ops/test_properties.py runs them
PROPERTIES = (batch_norm_fp64, [batch_norm_zero_dt_is_the_shortcut,
                                                     batch_norm_training_ignores_a_per_channel_shift,
                                                     batch_norm_channel_permutation_commutes])


# Issue 22: planes under 128 bytes go CH adjacent channels per program (a partial last channel tile,
# a short last chunk: CH = 4 of 6-value planes at the small sizes, CH = 8 of bf16 3x3 planes at the GPU
# sizes), and channels-last with several chunks stores its partials transposed (PART_T: the finalize
# owns FINAL_BLOCK_T channels, the last program partial). Forward and backward vs the reference, twice
# bitwise equal.
@TRITON_ONLY
@pytest.mark.parametrize("shape,cl,dtype,small,ch,part_t", [
    ((5, 11, 3, 2), False, torch.float32, True, 4, False), ((7, 5, 5, 3), True, torch.float32, True, 1, True),
    ((3, 37, 3, 3), False, torch.bfloat16, False, 8, False)])
def test_triton_narrow_planes_and_transposed_partials(shape, cl, dtype, small, ch, part_t, monkeypatch):
    if small:
        monkeypatch.setattr(bn_triton, "RUN", bn_triton.SMALL)
        monkeypatch.setattr(reduce_triton, "BLOCK_K", 2)
    p = bn_triton._plan(fmt(torch.empty(shape, dtype=dtype, device="meta"), cl), cl)
    assert (p["CH"], p["PART_T"]) == (ch, part_t) and (p["n_chunks"] > 1 or not small), p
    assert shape[1] % ch or ch == 1
    args = make(shape, cl, dtype)
    y, x, dt, rm, rv, w, b = args
    grad = torch.randn(shape).to(dtype)
    runs = []
    for _ in range(2):
        out, ref, stats_t, stats_r, (mean, invstd) = run_both(args, True, True)
        runs.append((out, *stats_t, mean, invstd, *bwd_op(grad, x, dt, w, b, mean, invstd, out, True)))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(runs[0][0], ref, **tol)
    for got, want in zip(stats_t, stats_r):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    leaves = [t.detach().double().requires_grad_() for t in (y, x, dt, w, b)]
    ref = reference.batch_norm_residual_update(*leaves[:3], clone(rm), clone(rv), *leaves[3:], True, 0.1, 1e-5, True)
    want = torch.autograd.grad(ref, leaves, grad.double())
    for got, w_ in zip(runs[0][5:], want):  # dy, dx, ddt, dweight, dbias
        torch.testing.assert_close(got.double(), w_, atol=1e-3 if dtype == torch.float32 else 5e-2, rtol=1e-3)
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_), "two runs must be bitwise equal"
