"""The fused linear multi-step update (LM-ResNet) on every backend vs the reference
(docs/ops.md, multistep_update)."""
import re

import pytest
import torch

import tsc_kernels
from tsc_kernels import reference
from conftest import TOLERANCES, assert_within_reference_error, count_triton_launches
from hypothesis import strategies as st
from hypothesis_cases import _close, _leaves, _permute, elementwise_cases, SEED

SHAPES = [(3, 5, 7, 9), (2, 33), (1, 17, 4, 4, 3), (4, 19, 6), (5, 3, 1, 1)]
CL_SHAPES = [(4, 19, 6, 5), (2, 7, 3, 4, 5), (3, 6, 5), (2, 45, 3, 2)]
NAMES = ("du", "du_prev", "df", "dk", "ddt", "dkeep")


acc_dtype = reference.accumulation_dtype  # fp32 arithmetic for fp32/fp16/bf16, fp64 for fp64


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


@pytest.mark.parametrize("with_dt, with_keep", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_optional_dt_and_keep(backend, with_dt, with_keep, channels_last):
    compare_with_reference(
        make_inputs((3, 6, 5, 3), torch.float32, channels_last, with_dt=with_dt, with_keep=with_keep), relu=True
    )


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


# ---------------------------------------------------------------------------------------------
# What the suite common to every op (tests/ops/test_common.py) runs: reference match per dtype x
# layout, opcheck, fp64 gradcheck, torch.compile, empty batch, bad input
# ---------------------------------------------------------------------------------------------
def sample_inputs(dtype, channels_last):
    """ReLU off and on at a tiny shape per layout, and without dt and keep (smaller still); u nudged so
    that no output is near the ReLU kink (where finite differences are wrong)."""
    shape = (3, 4, 2, 3) if channels_last else (2, 3, 4, 5)
    samples = []
    for relu, with_extras in ((False, True), (True, True), (False, False)):
        inputs = make_inputs(shape if with_extras else (2, 3, 5), dtype, channels_last, with_dt=with_extras,
                             with_keep=with_extras)
        with torch.no_grad():
            inputs[0].add_(torch.sign(reference.multistep_update(*inputs, relu=False)) * 0.2)
        samples.append((inputs, {"relu": relu}))
    return samples


def reference_inputs(dtype, channels_last):
    """A larger shape for the reference match (the fp64 criterion)."""
    return [(make_inputs((6, 13, 9, 7), dtype, channels_last=channels_last), {"relu": True})]


def reference_terms(args):
    """dk sums every element's product: on the tiny samples (120 O(1) products that cancel to O(1)) the
    fused CPU kernel's fp32 sum reaches the linear n·eps bound (3e-6 seen, 2.3 x the sqrt(n) floor),
    so the floor there is n epsilons; the larger reference_inputs shape keeps the sqrt(n) floor."""
    n = args[0].numel()
    return n * n if n < 1000 else 1


def empty_inputs():
    u, u_prev, f, k, dt, _ = make_inputs((0, 4, 3, 3), torch.float32)
    return [((u, u_prev, f, k, dt, None), {"relu": True})]

# tests/ops/test_triton_plans.py: the op's forward arguments at an activation shape (meta tensors:
# meta(shape, channels_last=False, dtype=float32)) and the kernels that merge its per-chunk partials
def plan_forward_args(shape, cl, dtype, meta):
    return (meta(shape, cl, dtype), meta(shape, cl, dtype), meta(shape, cl, dtype), meta((1,)), meta((shape[1],)),
            meta((shape[0],)), True)


PLAN_MERGES = ("multistep_finalize_kernel", "sum_chunks_kernel")


BAD_INPUTS = [
    (lambda: _bad(u_prev=torch.randn(2, 3, 5)), ValueError, re.escape("u_prev must have u's shape")),
    (lambda: _bad(f=torch.randn(2, 3, 5)), ValueError, re.escape("f must have u's shape")),
    (lambda: _bad(f=torch.randn(2, 3, 4).double()), TypeError, re.escape("f must have u's dtype")),
    (
        lambda: _bad(u=torch.randn(3), u_prev=torch.randn(3), f=torch.randn(3)),
        ValueError,
        re.escape("u must have shape (N, C"),
    ),
    (lambda: _bad(k=torch.tensor([0.1])), ValueError, re.escape("k must be a 0-d tensor")),
    (lambda: _bad(k=torch.tensor(0.1, dtype=torch.float64)), TypeError, re.escape("k must have dtype float32")),
    (lambda: _bad(k=0.1), TypeError, re.escape("k must be a torch.Tensor")),
    (lambda: _bad(dt=torch.rand(4)), ValueError, re.escape("dt must have shape (C,)")),
    (lambda: _bad(dt=torch.rand(3).half()), TypeError, re.escape("dt must have dtype float32")),
    (lambda: _bad(keep=torch.ones(3)), ValueError, re.escape("keep must have shape (N,)")),
    (lambda: _bad(keep=torch.ones(2, 1)), ValueError, re.escape("keep must have shape (N,)")),
    (lambda: _bad(relu=1), TypeError, re.escape("relu must be a bool")),
    (lambda: _bad(u=[1.0]), TypeError, re.escape("u must be a torch.Tensor")),
    (lambda: _bad(u=torch.ones(2, 3, 4, dtype=torch.int32)), TypeError, re.escape("u must have dtype")),
]


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backward_splits_the_positions(monkeypatch, dtype):
    """Issue 22: where (sample, channel tile) programs are few, the backward splits the positions
    (position_splits) and merges the splits' partials in a fixed order. With the small sizes a
    (3, 19, 5, 7) channels-last block takes 2 (fp32) or 3 (bf16) splits, the last one short: the
    launches are the plan's, the gradients the reference's, the same from run to run."""
    if not tsc_kernels.backend.TRITON_INTERPRET:
        pytest.skip("the Triton launchers run on CPU tensors only under TRITON_INTERPRET=1")
    ms = pytest.importorskip("tsc_kernels._triton.multistep_update")
    from triton.runtime import interpreter

    monkeypatch.setattr(ms, "RUN", ms.SMALL)
    shape = (3, 19, 5, 7)
    bp = ms.backward_plan(3, 19, 35, True, torch.empty((), dtype=dtype).element_size())
    assert bp["splits"] > 1 and 35 % bp["per"] != 0, bp
    torch.manual_seed(3)
    u, up, f, k, dt, keep = make_inputs(shape, dtype, channels_last=True, requires_grad=False)
    out = reference.multistep_update(u, up, f, k, dt, keep, relu=True)
    g = torch.randn(shape, dtype=dtype)
    launches, run = [], interpreter.InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self.__name__, tuple(grid) + (1,) * (3 - len(grid))))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", record)
    first = ms.multistep_update_backward_triton(g, u, up, f, k, dt, keep, out)
    plan = ms.launch_plan(u, up, f, k, dt, keep, True)
    assert launches == [(p["kernel"], p["grid"]) for p in plan if p["phase"] == "backward"]
    again = ms.multistep_update_backward_triton(g, u, up, f, k, dt, keep, out)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    inputs = [t.detach().requires_grad_() for t in (u, up, f, k, dt, keep)]
    want = torch.autograd.grad(reference.multistep_update(*inputs, relu=True), inputs, g)
    atol, rtol = TOLERANCES[dtype]
    for name, a, b in zip(NAMES, first, want):
        scale = max(1.0, u.numel() ** 0.5) if name in ("dk", "ddt", "dkeep") else 1.0
        torch.testing.assert_close(a, b, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# Hypothesis properties (tests/ops/test_properties.py runs them on every backend): the case
# strategy, the check against the fp64 reference and docs/ops.md's properties
# ---------------------------------------------------------------------------------------------
@st.composite
def multistep_cases(draw, small):
    """shape, dtype, channels_last, relu, with_dt, with_keep, seed."""
    return (*draw(elementwise_cases(small))[:4], draw(st.booleans()), draw(st.booleans()), draw(SEED))


# --- multistep_update -----------------------------------------------------------------------
def _ms_inputs(case, dtype=None):
    shape, dtype_, cl, _, with_dt, with_keep, _ = case
    return make_inputs(shape, dtype or dtype_, channels_last=cl, with_dt=with_dt,
                                             with_keep=with_keep)


def multistep_fp64(case):
    relu = case[3]
    inputs = _ms_inputs(case)
    names = [n for n, t in zip(NAMES, inputs) if t is not None]
    assert_within_reference_error(lambda *a: tsc_kernels.multistep_update(*a, relu=relu),
                                  lambda *a: reference.multistep_update(*a, relu=relu),
                                  inputs, torch.randn(case[0], dtype=case[1]), names)


def multistep_k_zero_is_the_residual_update(case):
    """k = 0 and keep = 1: the residual update of u, f and Δt (Δt = 1 when absent), forward and gradients."""
    u, u_prev, f, _, dt, _ = _ms_inputs(case)
    relu = case[3]
    dt = (
        dt
        if dt is not None
        else torch.ones(u.shape[1], dtype=reference.accumulation_dtype(u.dtype), requires_grad=True)
    )
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
    pout = tsc_kernels.multistep_update(
        *p, k, None if dt is None else dt[c_perm], None if keep is None else keep[n_perm], relu=case[3]
    )
    _close(pout, _permute(_permute(out, n_perm, 0), c_perm), u.dtype)


PROPERTY_STRATEGY = multistep_cases
# (check against the fp64 reference, [properties]): tests/ops/test_properties.py runs them
PROPERTIES = (multistep_fp64, [multistep_k_zero_is_the_residual_update,
                                          multistep_k_one_without_f_is_the_previous_shortcut,
                                          multistep_permutations_commute])
