"""The weight-mean projection (the TSC controller's first kernel; docs/tsc.md, docs/ops.md) on every
backend vs tsc_kernels.reference, and its Triton kernel under the interpreter. Its use inside the
controller (opcheck of both ops, torch.compile of the network) is in test_lstm_controller.py."""
import importlib.util
import math
import os

import pytest
import torch

import tsc_kernels
from tsc_kernels import _extension
from tsc_kernels import reference
from conftest import FUSED_BACKENDS, TOLERANCES
from hypothesis import strategies as st
from hypothesis_cases import _close, CHANNELS, LOW_PRECISION, SEED, TINY_CHANNELS


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_weight_mean_matches_reference(backend, dtype):
    ws = [
        torch.randn(8, 5, 3, 3, dtype=dtype),
        torch.randn(6, 3, 1, 1, dtype=dtype),
        torch.randn(4, 7, 3, dtype=dtype),
        torch.randn(3, 2, 2, 3, 2, dtype=dtype),  # conv3d
        torch.randn(5, 6, 3, 3, dtype=dtype).to(memory_format=torch.channels_last),
        torch.randn(4, 9, 5, 5, dtype=dtype)[:, ::2],  # non-contiguous C_in
        # C_in past the CPU kernel's vector runs (lcm(K, lanes) values) with rows left over
        torch.randn(7, 19, 3, 3, dtype=dtype),
        torch.randn(5, 21, 3, dtype=dtype),
        torch.randn(3, 11, 5, 5, dtype=dtype),
        torch.randn(4, 13, 2, 2, dtype=dtype),
    ]
    ws = [w.requires_grad_() for w in ws]
    out = tsc_kernels.weight_mean(ws)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ref = reference.weight_mean([w.to(acc) for w in ws])
    assert out.dtype == acc and out.shape == (sum(w.shape[0] * math.prod(w.shape[2:]) for w in ws),)
    # fp32 accumulation on every backend; the torch backend rounds fp16/bf16 means to the input dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, ws, grad)
    want = torch.autograd.grad(reference.weight_mean(ws).to(acc), ws, grad)
    for i, (g, w, x) in enumerate(zip(got, want, ws)):
        assert g.dtype == x.dtype and g.shape == x.shape, i
        torch.testing.assert_close(g, w, msg=lambda m: f"weights[{i}]: {m}")
    if backend != "torch":  # dW is a stride-0 view over C_in: no full-size dW is written
        assert all(g.stride(1) == 0 for g in got)



@pytest.mark.big_for_interpreter
@pytest.mark.parametrize("fused", FUSED_BACKENDS)
def test_weight_mean_many_rows_deterministic_across_threads(fused):
    """Weights of many output rows, as a network's are: the CPU kernel folds the vector sums of up to
    16 rows at a time (37 rows: 16, 16, 5, C_in 19 leaving rows after the last whole run) and splits
    its work by values, so a 70 x 61 x 3 x 3 weight (38 k values) is two threads' tasks, one of them
    starting inside it. Means to the reference's fp64 (fp32 tolerance), bitwise the same for 1 and 2
    threads."""
    ws = [torch.randn(37, 19, 3, 3), torch.randn(70, 61, 3, 3), torch.randn(33, 24, 3, 3), torch.randn(18, 5, 7)]
    ref = reference.weight_mean([w.double() for w in ws])
    threads, results = torch.get_num_threads(), []
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            with tsc_kernels.use_backend(fused):
                results.append(tsc_kernels.weight_mean(ws))
        finally:
            torch.set_num_threads(threads)
    torch.testing.assert_close(results[0].double(), ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(results[0], results[1])


@pytest.mark.skipif(not _extension.has_cpp_ops(), reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("create_graph", [False, True])
def test_weight_mean_aliased_adds_wbar_gradient_into_each_alias_gradient(create_graph, dtype):
    """tsc::_weight_mean_aliased (a training step's w̄, csrc/weight_mean_autograd.cpp): w̄ and an
    alias of each weight (its storage and version counter), whose gradients its node adds into
    each other: the gradients of using w̄ and the aliases are those of using w̄ and the weights.
    Shapes: K runs with C_in rows left over (5 x 7 x 3 x 3, 9 x 19 x 3 x 3), 1-D, 1x1, 5x5 (fewer
    values than a run), a channels-last weight (added as autograd adds), an alias left unused.
    On a GPU (gpu-check) the CUDA kernel adds every weight's in one launch (add_wbar_grads_kernel)."""
    ws = [torch.randn(5, 7, 3, 3), torch.randn(4, 3, 5), torch.randn(6, 10, 1, 1), torch.randn(3, 2, 5, 5),
          torch.randn(4, 6, 3, 3).to(memory_format=torch.channels_last), torch.randn(9, 19, 3, 3)]
    ws = [w.to(dtype).requires_grad_() for w in ws]
    wbar, aliases = torch.ops.tsc._weight_mean_aliased(ws)
    assert len(aliases) == len(ws)
    for a, w in zip(aliases, ws):
        assert a.data_ptr() == w.data_ptr() and a.stride() == w.stride() and a.grad_fn is wbar.grad_fn
        before = a._version
        with torch.no_grad():
            w.mul_(1)  # the version counter is shared: a saved alias sees an in-place change
        assert a._version == before + 1
    wbar, aliases = torch.ops.tsc._weight_mean_aliased(ws)
    assert torch.equal(wbar, tsc_kernels.weight_mean(ws))
    gw, rs = torch.randn_like(wbar), [torch.randn_like(w) for w in ws]
    used = len(ws) - 1  # the last alias is not used: its weight gets w̄'s gradient alone
    loss = (wbar * gw).sum() + sum((a * r).sum() for a, r in zip(aliases[:used], rs))
    got = torch.autograd.grad(loss, ws, create_graph=create_graph)
    # weight_mean's gradients, added by autograd (their values against the reference:
    # test_weight_mean_matches_reference): the same sums, bitwise
    loss = (tsc_kernels.weight_mean(ws) * gw).sum() + sum((w * r).sum() for w, r in zip(ws, rs[:used]))
    want = torch.autograd.grad(loss, ws)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == dtype and (i == used or g.stride() == ws[i].stride()), i  # a dense dW
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=lambda m: f"weights[{i}]: {m}")
    with torch.no_grad():
        assert torch.ops.tsc._weight_mean_aliased(ws)[1] == []


def test_weight_mean_gradient_reaches_only_weights_that_require_it(backend):
    ws = [
        torch.randn(4, 3, 3, 3, requires_grad=True),
        torch.randn(5, 4, 1, 1),
        torch.randn(2, 5, 3, requires_grad=True),
    ]
    out = tsc_kernels.weight_mean(ws)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [ws[0], ws[2]], grad)
    want = torch.autograd.grad(reference.weight_mean(ws), [ws[0], ws[2]], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert ws[1].grad is None
    # accumulated into an existing gradient (a conv's), as in a training step
    ws[0].grad = torch.ones_like(ws[0])
    tsc_kernels.weight_mean(ws).backward(grad)
    torch.testing.assert_close(ws[0].grad, 1 + want[0])



@pytest.mark.parametrize(
    "weights, error, match",
    [
        ([], ValueError, r"weights must hold at least one conv weight"),
        (torch.randn(4, 3, 3, 3), TypeError, r"weights must be a list or tuple"),
        ([torch.randn(4, 3)], ValueError, r"weights\[0\] must be a conv weight"),
        ([torch.randn(4, 3, 1, 1), torch.randn(4, 3, 1, 1, 1, 1)], ValueError, r"weights\[1\] must be a conv weight"),
        (
            [torch.randn(4, 3, 1, 1), torch.ones(4, 3, 1, 1, dtype=torch.int64)],
            TypeError,
            r"weights\[1\] must have dtype",
        ),
        (
            [torch.randn(4, 3, 1, 1), torch.randn(4, 3, 1, 1).double()],
            TypeError,
            r"weights\[1\] must have weights\[0\]'s dtype",
        ),
        ([torch.randn(4, 3, 1, 1), "conv"], TypeError, r"weights\[1\] must be a torch.Tensor"),
        (
            [torch.randn(4, 3, 1, 1), torch.randn(4, 0, 3, 3)],
            ValueError,
            r"weights\[1\] must have at least one input channel",
        ),
    ],
)
def test_weight_mean_bad_inputs(backend, weights, error, match):
    with pytest.raises(error, match=match):
        tsc_kernels.weight_mean(weights)



@pytest.mark.skipif(not _extension.has_cpp_ops(), reason="the C++ ops are not built")
def test_cpp_weight_mean_rejects_what_it_cannot_average():
    # the op itself, below the public checks: a mean over no input channels is 0/0, never garbage
    with pytest.raises(RuntimeError, match=r"weights\[1\] must have C_in >= 1"):
        torch.ops.tsc.weight_mean([torch.randn(3, 4, 3), torch.randn(2, 0, 3, 3)])


# ---------------------------------------------------------------------------------------------
# What the suite common to every op (tests/ops/test_common.py) runs: reference match per dtype x
# layout, opcheck, fp64 gradcheck, torch.compile, empty batch, bad input
# ---------------------------------------------------------------------------------------------
# The mean over C_in of conv weights has no channel layout of its own: LAYOUTS are the weights'
# (channels_last and a strided kernel view); its "batch" is C_out (an empty one gives no means).
def sample_inputs(dtype, channels_last):
    if channels_last:
        ws = [torch.randn(4, 3, 3, 3, dtype=dtype).to(memory_format=torch.channels_last),
              torch.randn(5, 4, 1, 1, dtype=dtype).to(memory_format=torch.channels_last),
              torch.randn(3, 2, 3, 6, dtype=dtype)[:, :, :, ::2]]
    else:
        ws = [torch.randn(4, 3, 3, 3, dtype=dtype), torch.randn(3, 5, 3, dtype=dtype),
              torch.randn(2, 3, 2, 2, 3, dtype=dtype)]
    return [(([w.requires_grad_() for w in ws],), {})]


def empty_inputs():
    return [(([torch.randn(0, 3, 3, 3, requires_grad=True), torch.randn(0, 2, 1, 1, requires_grad=True)],), {})]
# tests/ops/test_triton_plans.py plans the ops on activations; this one's arguments are not
PLAN_NOT_ON_ACTIVATIONS = "a list of conv weights: test_weight_mean_plan (tests/ops/test_triton_plans.py)"


# the rest: test_weight_mean_bad_inputs
BAD_INPUTS = [(([],), ValueError, r"weights must hold at least one conv weight")]


# ---------------------------------------------------------------------------------------------
# The Triton kernel under the interpreter (from test_lstm_controller_triton.py).
# Every layout the kernel's (C_out, C_in, K) strided view must handle.
# ---------------------------------------------------------------------------------------------

TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
# the Triton kernels run on CPU only under the interpreter: TRITON_INTERPRET=1 before pytest starts
# (the AOT compile for sm_80/sm_90 is tests/tooling/test_triton_aot.py)
TRITON_ONLY = pytest.mark.skipif(not TRITON_INTERPRETED, reason="the Triton kernels run on CPU only under the "
                                 "interpreter: set TRITON_INTERPRET=1 before pytest starts")
if TRITON_INTERPRETED:
    import tsc_kernels._triton.weight_mean  # noqa: F401  (registers the tsc::*_triton ops)

    wm_op = torch.ops.tsc.weight_mean_triton


def conv_weights(dtype):
    """Every layout the kernel's (C_out, C_in, K) strided view must handle."""
    return [
        torch.randn(5, 7, 3, 3, dtype=dtype),                                     # 3x3, contiguous
        torch.randn(6, 37, 1, 1, dtype=dtype),                                    # 1x1, C_in spans tiles
        torch.randn(4, 3, 3, 3, dtype=dtype).to(memory_format=torch.channels_last),  # C_in innermost
        torch.randn(3, 4, 5, dtype=dtype),                                        # conv1d
        torch.randn(2, 3, 2, 2, 3, dtype=dtype),                                  # conv3d
        torch.randn(3, 2, 3, 6, dtype=dtype)[:, :, :, ::2],                       # kernel dims don't collapse
    ]



@TRITON_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_triton_weight_mean_matches_reference(dtype):
    weights = [w.requires_grad_() for w in conv_weights(dtype)]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = wm_op(weights)
    # The op returns the accumulation dtype: compare with the reference on upcast weights.
    ref = reference.weight_mean([w.to(acc) for w in weights])
    assert out.dtype == acc
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, weights, grad)
    want = torch.autograd.grad(ref, weights, grad)
    # dW is stored in the weight's dtype: fp16/bf16 allow one rounding of it (conftest.TOLERANCES).
    atol, rtol = TOLERANCES[dtype] if dtype in (torch.float16, torch.bfloat16) else (tol, tol)
    for w, g, r in zip(weights, got, want):
        assert g.dtype == w.dtype
        assert g.stride(1) == 0, "dW must be a view expanded over C_in (no full-size dW written)"
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol)



@TRITON_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_weight_mean_walks_the_runs_in_small_tiles(monkeypatch, dtype):
    """Issue 22: lanes read along each row's contiguous run. With 2 x 8 tiles the small weights take
    several steps (periods 1, 3, 4), a period over the tile (3x3: two column chunks of one output
    each), rows of (o, k) runs (channels-last), copies (a strided C_in) and partial row tiles;
    the result matches the reference and is the same from run to run."""
    wm = tsc_kernels._triton.weight_mean
    monkeypatch.setattr(wm, "FWD_ROWS", 2)
    monkeypatch.setattr(wm, "FWD_BLOCK_E", 8)
    weights = [
        torch.randn(5, 7, 3, 3, dtype=dtype),                                        # period 9 > 8
        torch.randn(3, 5, 3, dtype=dtype),                                           # period 3: steps of 6
        torch.randn(7, 19, 2, 2, dtype=dtype),                                       # period 4: steps of 8
        torch.randn(3, 37, 1, 1, dtype=dtype),                                       # period 1, 5 steps
        torch.randn(3, 5, 3, 3, dtype=dtype).to(memory_format=torch.channels_last),  # (o, k) rows
        torch.randn(4, 9, 5, 5, dtype=dtype)[:, ::2],                                # strided C_in: a copy
    ]
    assert [wm._run_view(w) is None for w in weights] == [False] * 5 + [True]
    out = wm_op(weights)
    torch.testing.assert_close(out, reference.weight_mean([w.float() for w in weights]), atol=1e-6, rtol=1e-6)
    assert torch.equal(out, wm_op(weights))


@TRITON_ONLY
def test_triton_weight_mean_opcheck():
    weights = [w.requires_grad_() for w in conv_weights(torch.float32)[:3]]
    torch.library.opcheck(wm_op, (weights,))
    ws = [w.detach() for w in weights]
    torch.library.opcheck(torch.ops.tsc.weight_mean_backward_triton, (torch.randn(wm_op(ws).shape), ws))



@TRITON_ONLY
def test_triton_weight_mean_rejects_bad_weights():
    with pytest.raises(ValueError, match="empty"):
        wm_op([])
    with pytest.raises(ValueError, match="dtype"):
        wm_op([torch.randn(2, 3, 3, 3), torch.randn(2, 3, 3, 3, dtype=torch.float64)])
    with pytest.raises(ValueError, match="conv weight"):
        wm_op([torch.randn(2, 3)])


# ---------------------------------------------------------------------------------------------
# Hypothesis properties (tests/ops/test_properties.py runs them on every backend): the case
# strategy, the check against the fp64 reference and docs/ops.md's properties
# ---------------------------------------------------------------------------------------------
@st.composite
def weight_mean_cases(draw, small):
    """shapes (C_out, C_in, *k) of 1-3 weights, C_in not a power of two, dtype, seed."""
    shapes = [(draw(st.integers(1, 6)), draw(st.sampled_from(TINY_CHANNELS if small else CHANNELS)),
               *draw(st.lists(st.sampled_from([1, 3, 5]), min_size=1, max_size=2 if small else 3)))
              for _ in range(draw(st.integers(1, 3)))]
    return shapes, draw(st.sampled_from(LOW_PRECISION + [torch.float64])), draw(SEED)


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


PROPERTY_STRATEGY = weight_mean_cases
# (check against the fp64 reference, [properties]): tests/ops/test_properties.py runs them
PROPERTIES = (weight_mean_fp64, [weight_mean_of_a_constant_is_the_constant,
                                       weight_mean_concatenates_and_ignores_input_channel_order,
                                       weight_mean_gradient_is_the_same_on_every_input_channel])
