"""The Triton weight-mean projection and batched LSTM controller (tsc_kernels._triton.weight_mean /
.controller) vs tsc_kernels.reference, run on CPU tensors under the Triton interpreter.

Shapes are small and odd on purpose: the interpreter runs the kernels with 16 x 16 tiles, so
D = 37 and H = 20 (4H = 80) make every tiled loop run several tiles, the last one partial.
"""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton kernels run on CPU only under the interpreter: set TRITON_INTERPRET=1 before pytest starts "
                "(the AOT compile for sm_80/sm_90 is tests/test_triton_aot.py)", allow_module_level=True)
pytest.importorskip("triton")

import tsc_kernels  # noqa: E402
from tsc_kernels import _extension  # noqa: E402
from tsc_kernels import reference  # noqa: E402
from conftest import TOLERANCES  # noqa: E402
import tsc_kernels._triton.lstm_controller  # noqa: E402,F401  (registers the tsc::*_triton ops)
import tsc_kernels._triton.weight_mean  # noqa: E402,F401

wm_op = torch.ops.tsc.weight_mean_triton
ctrl_op = torch.ops.tsc.lstm_controller_triton

# (L, D, C, H) per stage. The third stage has H > the interpreter tile (16) so the gate rows (4H)
# and the hidden columns span several tiles; the fourth has a single block (no recurrence).
STAGES = [(3, 37, 13, 3), (2, 20, 8, 2), (2, 40, 24, 20), (1, 5, 3, 1)]


def make_stage_params(D, C, H, dtype=torch.float32):
    """The 8 parameters of one stage, from real nn.Linear / nn.LSTMCell modules (their init scales)."""
    fc_in, lstm, fc_out = torch.nn.Linear(D, H), torch.nn.LSTMCell(H, H), torch.nn.Linear(H, C)
    params = [fc_in.weight, fc_in.bias, lstm.weight_ih, lstm.weight_hh, lstm.bias_ih, lstm.bias_hh, fc_out.weight, fc_out.bias]
    # Unit-scale inputs give large pre-activations for the tiny D of the tests: scale the weights up
    # a little so every sigmoid/tanh works off its linear region and the ReLU masks some units.
    return [(p.detach() * 2.0).to(dtype).requires_grad_() for p in params]


def make_network(stages, dtype=torch.float32):
    wbars = [torch.randn(L, D, dtype=dtype, requires_grad=True) for L, D, _, _ in stages]
    params = [p for _, D, C, H in stages for p in make_stage_params(D, C, H, dtype)]
    return wbars, params


def packed(wbars):
    return torch.cat([w.reshape(-1) for w in wbars])


def reference_dt(wbars, params):
    return torch.cat([reference.lstm_controller(w, *params[8 * s: 8 * s + 8]).reshape(-1) for s, w in enumerate(wbars)])


def blocks_of(stages):
    return [L for L, _, _, _ in stages]


# ---------------------------------------------------------------------------------------------
# controller
# ---------------------------------------------------------------------------------------------


def test_controller_forward_matches_reference():
    wbars, params = make_network(STAGES)
    dt, saved = ctrl_op(packed(wbars), blocks_of(STAGES), params)
    torch.testing.assert_close(dt, reference_dt(wbars, params), atol=1e-6, rtol=1e-5)
    assert saved.shape == (sum(7 * L * H for L, _, _, H in STAGES),)


def test_controller_matches_nn_lstmcell_loop():
    # An oracle independent of tsc_kernels.reference: torch's own modules holding the same weights.
    L, D, C, H = 4, 37, 13, 20
    fc_in, lstm, fc_out = torch.nn.Linear(D, H), torch.nn.LSTMCell(H, H), torch.nn.Linear(H, C)
    wbar = torch.randn(L, D)
    h = c = torch.zeros(1, H)
    want = []
    for d in range(L):
        h, c = lstm(torch.relu(fc_in(wbar[d:d + 1])), (h, c))
        want.append(torch.sigmoid(fc_out(h)))
    params = [fc_in.weight, fc_in.bias, lstm.weight_ih, lstm.weight_hh, lstm.bias_ih, lstm.bias_hh, fc_out.weight, fc_out.bias]
    dt, _ = ctrl_op(wbar.reshape(-1), [L], [p.detach() for p in params])
    torch.testing.assert_close(dt.view(L, C), torch.cat(want).detach(), atol=1e-6, rtol=1e-5)


def test_controller_gradients_match_reference():
    wbars, params = make_network(STAGES)
    wbar = packed(wbars)
    dt, _ = ctrl_op(wbar, blocks_of(STAGES), params)
    ref = reference_dt(wbars, params)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(dt, [wbar] + params, grad)
    want = torch.autograd.grad(ref, wbars + params, grad)
    torch.testing.assert_close(got[0], packed(want[: len(wbars)]), atol=1e-5, rtol=1e-5, msg=lambda m: f"d wbar: {m}")
    names = ["fc_in.weight", "fc_in.bias", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "fc_out.weight", "fc_out.bias"]
    for k, (g, w) in enumerate(zip(got[1:], want[len(wbars):])):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=lambda m: f"stage {k // 8} {names[k % 8]}: {m}")


def test_controller_empty_stage_gets_zero_gradients():
    # A stage with L = 0 (allowed by the schema) produces no Δt; its parameter gradients are sums
    # over zero blocks, which the kernel must still write (its buffers start uninitialised).
    stages = [(2, 9, 5, 3), (0, 7, 4, 2)]
    wbars, params = make_network(stages)
    dt, _ = ctrl_op(packed(wbars), blocks_of(stages), params)
    assert dt.shape == (2 * 5,)
    grads = torch.autograd.grad(dt.sum(), params)
    for g in grads[8:]:
        assert torch.equal(g, torch.zeros_like(g))
    assert all(g.abs().sum() > 0 for g in grads[:2])


# Issue 22's split (products over every block of every stage; the recurrent cell per stage): blocks
# 3, 5, 2 and feature sizes 7 / 13 (not powers of two, tiles of 16 cut mid-row), several stages'
# jobs in one products launch. (L, D, C, H)
SPLIT_STAGES = [(3, 13, 7, 13), (5, 7, 13, 7), (2, 13, 13, 17)]


def test_split_launches_match_reference_forward_and_backward():
    wbars, params = make_network(SPLIT_STAGES)
    wbar = packed(wbars)
    dt, _ = ctrl_op(wbar, blocks_of(SPLIT_STAGES), params)
    ref = reference_dt(wbars, params)
    torch.testing.assert_close(dt, ref, atol=1e-6, rtol=1e-5)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(dt, [wbar] + params, grad)
    want = torch.autograd.grad(ref, wbars + params, grad)
    torch.testing.assert_close(got[0], packed(want[: len(wbars)]), atol=1e-5, rtol=1e-5)
    for k, (g, w) in enumerate(zip(got[1:], want[len(wbars):])):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=lambda m: f"params[{k}]: {m}")


def test_split_launches_gradcheck_fp64():
    stages = [(3, 7, 5, 3), (2, 5, 7, 2)]
    wbars, params = make_network(stages, torch.float64)

    def fn(wbar, *params):
        return ctrl_op(wbar, blocks_of(stages), list(params))[0]

    assert torch.autograd.gradcheck(fn, (packed(wbars).detach().requires_grad_(), *params), fast_mode=True)


class _Spy:
    """A @triton.jit kernel that records (name, grid) of every launch before running it."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.append((self.name, tuple(grid)))
            return launch(*args, **kwargs)
        return run


def test_launchers_run_the_plan(monkeypatch):
    # The launchers run _plan, and launch_plan reports it: the launches they make are _plan's,
    # forward then backward, 4 each whatever the number of stages.
    mod = tsc_kernels._triton.lstm_controller
    log = []
    for name in ("lstm_controller_products_kernel", "lstm_controller_cell_fwd_kernel", "lstm_controller_cell_bwd_kernel"):
        monkeypatch.setattr(mod, name, _Spy(getattr(mod, name), name, log))
    wbars, params = make_network(SPLIT_STAGES)
    wbar = packed(wbars)
    dt, _ = ctrl_op(wbar, blocks_of(SPLIT_STAGES), params)
    torch.autograd.grad(dt.sum(), [wbar] + params)
    dims = mod._dims("test", wbar, blocks_of(SPLIT_STAGES), params)
    plan = mod._plan(tuple(dims), (mod.BLOCK_R, mod.BLOCK_K, mod.NUM_WARPS))
    assert log == [(st.kernel, (st.programs,)) for st in plan]
    assert [st.phase for st in plan] == ["forward"] * 4 + ["backward"] * 4
    gpu = mod.launch_plan(wbar.detach(), blocks_of(SPLIT_STAGES), [p.detach() for p in params])
    assert [(l["kernel"], l["grid"][0]) for l in gpu] == [(st.kernel, st.programs) for st in plan]


@pytest.mark.skipif(not _extension.has_kernel("lstm_controller", "CPU"),
                    reason="the C++ extension (tsc::lstm_controller CPU kernel) is not built")
def test_saved_layout_is_the_cpp_ops():
    # `saved` has one documented layout on every backend: the Triton backward must accept the C++
    # forward's saved state and vice versa, giving the same gradients.
    wbars, params = make_network(STAGES[:2])
    wbar, blocks = packed(wbars).detach(), blocks_of(STAGES[:2])
    p = [t.detach() for t in params]
    dt_t, saved_t = ctrl_op(wbar, blocks, p)
    dt_c, saved_c = torch.ops.tsc.lstm_controller(wbar, blocks, p)
    torch.testing.assert_close(saved_t, saved_c, atol=1e-6, rtol=1e-5)
    grad = torch.randn_like(dt_t)
    got = torch.ops.tsc.lstm_controller_backward_triton(grad, dt_c, wbar, blocks, p, saved_c)
    want = torch.ops.tsc.lstm_controller_backward(grad, dt_t, wbar, blocks, p, saved_t)
    for g, w in zip([got[0], *got[1]], [want[0], *want[1]]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_controller_rejects_mismatched_arguments():
    wbars, params = make_network(STAGES[:1])
    with pytest.raises(ValueError, match="8 tensors per stage"):
        ctrl_op(packed(wbars), [3], params[:7])
    with pytest.raises(ValueError, match="sum"):
        ctrl_op(packed(wbars)[:-1], [3], params)
    with pytest.raises(ValueError, match="shape"):
        ctrl_op(packed(wbars), [3], params[:3] + [params[3][:, :-1]] + params[4:])


def test_controller_gradcheck_fp64():
    stages = [(2, 3, 2, 1), (3, 4, 3, 2)]
    wbars, params = make_network(stages, torch.float64)
    blocks = blocks_of(stages)

    def fn(wbar, *params):
        return ctrl_op(wbar, blocks, list(params))[0]

    # fast_mode: random projections of the Jacobian keep the interpreted kernel calls few.
    assert torch.autograd.gradcheck(fn, (packed(wbars).detach().requires_grad_(), *params), fast_mode=True)


def test_end_to_end_gradcheck_fp64_from_conv_weights():
    # Conv weights -> one weight_mean launch for all blocks -> one controller launch for all stages.
    # Stage 0: 2 basic-like blocks of two 3x3 convs with C = 2 (D = 2*9*2 = 36); stage 1: one
    # bottleneck-like block (1x1 to width 2, 1x1 to C = 3; D = 2 + 3).
    convs = [[(2, 3, 3, 3), (2, 2, 3, 3)], [(2, 2, 3, 3), (2, 2, 3, 3)], [(2, 5, 1, 1), (3, 2, 1, 1)]]
    # Conv weights x3: their means over C_in must be large enough for the weight gradients to stand
    # well above gradcheck's atol (checked below), or a wrong dW would pass unnoticed.
    weights = [(3.0 * torch.randn(s, dtype=torch.float64)).requires_grad_() for block in convs for s in block]
    stages, blocks = [(2, 36, 2, 2), (1, 5, 3, 2)], [2, 1]
    params = [p for _, D, C, H in stages for p in make_stage_params(D, C, H, torch.float64)]

    def fn(*tensors):
        ws, ps = list(tensors[: len(weights)]), list(tensors[len(weights):])
        return ctrl_op(wm_op(ws), blocks, ps)[0]

    grads = torch.autograd.grad(fn(*weights, *params).sum(), weights)
    assert all(g.abs().max() > 1e-4 for g in grads), "test setup: every conv weight must influence Δt"
    assert torch.autograd.gradcheck(fn, (*weights, *params), fast_mode=True)


def test_controller_opcheck():
    wbars, params = make_network(STAGES[:2])
    torch.library.opcheck(ctrl_op, (packed(wbars).detach().requires_grad_(), blocks_of(STAGES[:2]), params))
    wbar, blocks, p = packed(wbars).detach(), blocks_of(STAGES[:2]), [t.detach() for t in params]
    dt, saved = ctrl_op(wbar, blocks, p)
    torch.library.opcheck(torch.ops.tsc.lstm_controller_backward_triton, (torch.randn_like(dt), dt, wbar, blocks, p, saved))


def test_public_api_dispatches_to_triton():
    # tsc_kernels.lstm_controller / weight_mean with the triton backend run these ops (on CPU
    # tensors only because the interpreter is on).
    L, D, C, H = 3, 37, 13, 3
    params = make_stage_params(D, C, H)
    wbar = torch.randn(L, D)
    weights = [torch.randn(4, 3, 3, 3), torch.randn(5, 4, 1, 1)]
    with tsc_kernels.use_backend("triton"):
        dt = tsc_kernels.lstm_controller(wbar, *params)
        wb = tsc_kernels.weight_mean(weights)
    torch.testing.assert_close(dt, reference.lstm_controller(wbar, *params), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(wb, reference.weight_mean(weights), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# weight mean
# ---------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_weight_mean_matches_reference(dtype):
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


def test_weight_mean_opcheck():
    weights = [w.requires_grad_() for w in conv_weights(torch.float32)[:3]]
    torch.library.opcheck(wm_op, (weights,))
    ws = [w.detach() for w in weights]
    torch.library.opcheck(torch.ops.tsc.weight_mean_backward_triton, (torch.randn(wm_op(ws).shape), ws))


def test_weight_mean_rejects_bad_weights():
    with pytest.raises(ValueError, match="empty"):
        wm_op([])
    with pytest.raises(ValueError, match="dtype"):
        wm_op([torch.randn(2, 3, 3, 3), torch.randn(2, 3, 3, 3, dtype=torch.float64)])
    with pytest.raises(ValueError, match="conv weight"):
        wm_op([torch.randn(2, 3)])


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


def test_torch_compile_fullgraph():
    # Both ops inside one compiled graph (forward and backward), as the network controller uses them.
    torch._dynamo.reset()
    convs = [(4, 3, 3, 3), (4, 4, 3, 3), (4, 4, 3, 3), (4, 4, 3, 3)]  # 2 blocks of 2 convs, D = 72
    weights = [torch.randn(s, requires_grad=True) for s in convs]
    params = make_stage_params(72, 4, 1)

    def step(weights, params):
        return ctrl_op(wm_op(weights), [2], params)[0]

    compiled = torch.compile(step, fullgraph=True)
    got = compiled(weights, params)
    wbar = torch.stack([reference.weight_mean(weights[0:2]), reference.weight_mean(weights[2:4])])
    want = reference.lstm_controller(wbar, *params).reshape(-1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    g_got = torch.autograd.grad(got.sum(), weights + params)
    g_want = torch.autograd.grad(want.sum(), weights + params)
    for g, w in zip(g_got, g_want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
