"""The weight-mean projection and the batched TSC_LSTM controller on every backend (docs/tsc.md, docs/ops.md).

Each backend is compared with tsc_kernels.reference and with a plain nn.Linear / nn.LSTMCell loop
holding the same parameters (the controller's own submodules), forward and every gradient.
"""
import importlib.util
import os
import math

import pytest
import torch

import tsc_kernels
from tsc_kernels import _extension
from tsc_kernels.ops.registry import dispatch
from tsc_kernels import reference
from tsc_kernels.nn import NetworkController, TSCController
from tsc_kernels.profiling import count_kernels
from conftest import count_triton_launches
from hypothesis import strategies as st
from tsc_kernels.ops.registry import OPS
from hypothesis_cases import SEED
import test_robustness



# Stage shapes (L, D, C, r) of real networks (docs/tsc.md): basic blocks give D = 2 * 9 * C,
# bottlenecks D = C / 4 + C.
NETWORKS = {
    "cifar_resnet56": [(9, 18 * c, c, 4) for c in (16, 32, 64)],
    "resnet18": [(2, 18 * c, c, 4) for c in (64, 128, 256, 512)],
    "resnet50": [(l, c // 4 + c, c, 8) for l, c in ((3, 256), (4, 512), (6, 1024), (3, 2048))],
    "odd": [(1, 7, 5, 4), (5, 13, 3, 4), (4, 11, 9, 2), (3, 5, 1, 4)],  # L = 1, H = 1 (C < r), ...
}
# Stages of more than 100 k multiply-adds in fc_in and fc_out (L (D + C) H) take the Triton
# interpreter 20 s to minutes each (ResNet-18's third stage: 110 s): they run on the other backends
# here, the Triton kernels are compiled for these sizes in tests/tooling/test_triton_aot.py, and
# cifar_resnet56's network test below runs all its stages batched on every backend.
BIG = pytest.mark.big_for_interpreter
STAGES = [pytest.param(s, id=f"{net}-L{s[0]}-D{s[1]}-C{s[2]}",
                       marks=[BIG] if s[0] * (s[1] + s[2]) * max(1, s[2] // s[3]) > 100_000 else [])
          for net, stages in NETWORKS.items() for s in stages]


def block_convs(D, C, L, dtype=torch.float32):
    """L blocks of conv weights whose w̄ has length D: basic (two 3x3, D = 18C), bottleneck (1x1 to
    C/4, 1x1 to C) or, for other D, a 3x3 conv of D // 9 outputs plus a 1-D conv making up the rest.
    C_in is kept small: the mean runs over it, and the controller's shapes do not depend on it."""
    def one():
        if D == 18 * C:
            return [torch.randn(C, 3, 3, 3, dtype=dtype) * 0.5, torch.randn(C, 2, 3, 3, dtype=dtype) * 0.5]
        if D == C // 4 + C and C >= 4:
            return [torch.randn(C // 4, 3, 1, 1, dtype=dtype) * 0.5, torch.randn(C, 2, 1, 1, dtype=dtype) * 0.5]
        ws = [torch.randn(D // 9, 3, 3, 3, dtype=dtype)] if D >= 9 else []
        return ws + ([torch.randn(D % 9, 2, 1, dtype=dtype)] if D % 9 else [])
    return [[w.requires_grad_() for w in one()] for _ in range(L)]


def make_controller(L, D, C, r, mode="lstm", dtype=torch.float32):
    ctrl = TSCController(D, C, reduction=r, mode=mode, num_blocks=L).to(dtype)
    with torch.no_grad():  # default init gives Δt ≈ 0.5 everywhere: spread it so errors show, while
        for p in ctrl.parameters():  # keeping pre-activations O(1) (saturated gates amplify rounding)
            p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]) if p.dim() == 2 else torch.randn_like(p) * 0.5)
    return ctrl


def plain_loop(ctrl, wbar):
    """The stage as a user would write it: the controller's own nn.Linear / nn.LSTMCell, block by block."""
    state, out = None, []
    for d in range(wbar.shape[0]):
        x = torch.relu(ctrl.fc_in(wbar[d:d + 1]))
        state = ctrl.lstm(x, state)
        out.append(torch.sigmoid(ctrl.fc_out(state[0])))
    return torch.cat(out)


def assert_grads_close(got, want, names, rtol=1e-4):
    for name, g, w in zip(names, got, want):
        assert g is not None and g.shape == w.shape and g.dtype == w.dtype, name
        # sums over up to D = 9216 products: absolute error relative to the gradient's scale
        torch.testing.assert_close(
            g, w, rtol=rtol, atol=1e-5 * max(1.0, w.abs().max().item()), msg=lambda m: f"{name}: {m}"
        )


PARAM_NAMES = ("wbar",) + tuple(
    f"{m}.{p}"
    for m, p in (
        ("fc_in", "weight"),
        ("fc_in", "bias"),
        ("lstm", "weight_ih"),
        ("lstm", "weight_hh"),
        ("lstm", "bias_ih"),
        ("lstm", "bias_hh"),
        ("fc_out", "weight"),
        ("fc_out", "bias"),
    )
)


@pytest.mark.parametrize("stage", STAGES)
def test_lstm_controller_matches_reference_and_lstmcell(backend, stage):
    L, D, C, r = stage
    ctrl = make_controller(L, D, C, r)
    wbar = torch.randn(L, D).requires_grad_()
    inputs = (wbar, *ctrl.lstm_params())
    dt = tsc_kernels.lstm_controller(*inputs)
    ref = reference.lstm_controller(*inputs)
    plain = plain_loop(ctrl, wbar)
    assert dt.shape == (L, C) and dt.dtype == torch.float32
    torch.testing.assert_close(dt, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dt, plain, rtol=1e-5, atol=1e-6)
    cot = torch.randn(L, C)
    got = torch.autograd.grad(dt, inputs, cot)
    assert_grads_close(got, torch.autograd.grad(ref, inputs, cot), PARAM_NAMES)
    assert_grads_close(got, torch.autograd.grad(plain, inputs, cot), PARAM_NAMES)


# resnet18's stage shapes are covered stage by stage above; batching is checked on the others.
@pytest.mark.parametrize("net", ["cifar_resnet56", pytest.param("resnet50", marks=BIG), "odd"])
def test_network_controller_matches_reference_and_lstmcell(backend, net):
    """Every stage of a network batched (one weight_mean, one controller launch) vs per-stage loops."""
    stages = NETWORKS[net]
    ctrls = [make_controller(*s) for s in stages]
    weights = [block_convs(D, C, L) for L, D, C, _ in stages]
    network = NetworkController(ctrls)
    dts = network(weights)
    leaves = [w for blocks in weights for ws in blocks for w in ws] + list(network.parameters())
    cots = [torch.randn(L, C) for L, _, C, _ in stages]
    got = torch.autograd.grad(dts, leaves, cots)
    with tsc_kernels.use_backend("torch"):  # the reference weight mean for both comparisons
        wbars = [torch.stack([reference.weight_mean(ws) for ws in blocks]) for blocks in weights]
    refs = [reference.lstm_controller(wb, *c.lstm_params()) for wb, c in zip(wbars, ctrls)]
    plains = [plain_loop(c, wb) for wb, c in zip(wbars, ctrls)]
    names = [f"conv weight {i}" for i in range(len(leaves) - len(list(network.parameters())))] + [
        n for n, _ in network.named_parameters()
    ]
    for want_dts in (refs, plains):
        for s, (dt, want) in enumerate(zip(dts, want_dts)):
            assert dt.shape == want.shape, s
            torch.testing.assert_close(dt, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"stage {s}: {m}")
        assert_grads_close(got, torch.autograd.grad(want_dts, leaves, cots), names)


@BIG  # gradcheck runs the interpreter hundreds of times; the Triton section below has a smaller one
def test_gradcheck_end_to_end(backend):
    """fp64 from the conv weights through the batched weight_mean and controller (two lstm stages)."""
    stages = [(3, 18, 1, 2), (2, 5, 6, 4)]  # H = 1 (C < r) and H = 1, D from a 3x3 conv (9 * 2) and odd convs
    ctrls = [make_controller(*s, dtype=torch.float64) for s in stages]
    network = NetworkController(ctrls)
    weights = [
        [[torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)] for _ in range(3)],
        [
            [
                torch.randn(2, 4, 1, dtype=torch.float64, requires_grad=True),
                torch.randn(3, 2, 1, dtype=torch.float64, requires_grad=True),
            ]
            for _ in range(2)
        ],
    ]
    flat = [w for blocks in weights for ws in blocks for w in ws]
    names = [n for n, _ in network.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in network.parameters()]

    def fn(*tensors):
        ws = iter(tensors[:len(flat)])
        nested = [[[next(ws) for _ in blk] for blk in blocks] for blocks in weights]
        return tuple(torch.func.functional_call(network, dict(zip(names, tensors[len(flat):])), (nested,)))

    assert torch.autograd.gradcheck(fn, (*flat, *params))


def test_opcheck(backend):
    ws = [
        torch.randn(4, 3, 3, 3, requires_grad=True),
        torch.randn(5, 4, 1, 1).to(memory_format=torch.channels_last).requires_grad_(),
    ]
    stages = [(2, 7, 3, 4), (3, 5, 6, 2)]
    ctrls = [make_controller(*s) for s in stages]
    params = [p.detach().requires_grad_() for c in ctrls for p in c.lstm_params()]
    wbar = torch.randn(2 * 7 + 3 * 5, requires_grad=True)
    blocks = [2, 3]
    if backend == "torch":  # autograd comes from the reference's aten calls: no separate backward op
        torch.library.opcheck(torch.ops.tsc.weight_mean_torch, (ws,))
        torch.library.opcheck(torch.ops.tsc.lstm_controller_torch, (wbar, blocks, params))
        return
    suffix = "" if backend in ("cpu", "cuda") else "_triton"
    # dispatch imports the Triton modules, which register their ops
    assert dispatch("weight_mean", wbar.device) is getattr(torch.ops.tsc, "weight_mean" + suffix)
    assert dispatch("lstm_controller", wbar.device) is getattr(torch.ops.tsc, "lstm_controller" + suffix)
    wm, wm_bwd = getattr(torch.ops.tsc, "weight_mean" + suffix), getattr(torch.ops.tsc, "weight_mean_backward" + suffix)
    fwd, bwd = (
        getattr(torch.ops.tsc, "lstm_controller" + suffix),
        getattr(torch.ops.tsc, "lstm_controller_backward" + suffix),
    )
    torch.library.opcheck(wm, (ws,))
    torch.library.opcheck(wm_bwd, (torch.randn(4 * 9 + 5), [w.detach() for w in ws]))
    torch.library.opcheck(fwd, (wbar, blocks, params))
    dt, saved = (t.detach() for t in fwd(wbar, blocks, params))
    torch.library.opcheck(bwd, (torch.randn_like(dt), dt, wbar.detach(), blocks, [p.detach() for p in params], saved))


def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    stages = [(2, 18, 4, 2), (3, 10, 8, 4)]
    network = NetworkController([make_controller(*s) for s in stages])
    weights = [
        block_convs(18, 4, 2),
        [[torch.randn(2, 5, 1, 1, requires_grad=True), torch.randn(8, 2, 1, 1, requires_grad=True)] for _ in range(3)],
    ]
    wbar = torch.randn(3, 10)
    ctrl = network.stages[1]

    def step(weights, wbar):
        dts = network(weights)
        single = tsc_kernels.lstm_controller(wbar, *ctrl.lstm_params())
        w1 = tsc_kernels.weight_mean(weights[0][0])
        return sum(d.sum() for d in dts) + single.square().sum() + w1.sum()

    loss = torch.compile(step, fullgraph=True)(weights, wbar)
    leaves = [w for b in weights for ws in b for w in ws] + list(network.parameters())
    got = torch.autograd.grad(loss, leaves)
    with tsc_kernels.use_backend("torch"):
        ref_loss = step(weights, wbar)
    want = torch.autograd.grad(ref_loss, leaves)
    torch.testing.assert_close(loss, ref_loss)
    assert_grads_close(got, want, [str(i) for i in range(len(leaves))])


@pytest.mark.cpu_only
def test_fused_path_kernel_count(backend):
    """fwd + bwd of a 3-stage network: one weight_mean, one controller, their backwards, one cat of
    the per-stage Δt gradients; the reference path needs a kernel per op per block."""
    stages = NETWORKS["cifar_resnet56"]
    network = NetworkController([make_controller(*s) for s in stages])
    weights = [block_convs(D, C, L) for L, D, C, _ in stages]
    leaves = [w for b in weights for ws in b for w in ws] + list(network.parameters())

    def step():
        dts = network(weights)
        torch.autograd.backward(dts, [torch.ones_like(d) for d in dts])
        for p in leaves:
            p.grad = None

    step()
    if backend == "triton" and tsc_kernels.backend.TRITON_INTERPRET:
        # the interpreter's profile shows host copies, not launches: count the launches (weight
        # mean one each way; the controller four each way: fc_in, the gates' input half, the
        # recurrent cell, fc_out, and their backwards)
        assert count_triton_launches(step) == 2 + 2 * 4
        return
    n = count_kernels(step) - 3  # the three ones_like cotangents
    if backend == "torch":
        assert n > 100
    else:
        # dW is a view expanded over C_in: with no conv gradient to add it into (this isolated
        # controller), AccumulateGrad materialises it, one copy per weight; in a network that is
        # the add into the conv's own gradient that exists anyway
        assert n <= 6 + len([w for b in weights for ws in b for w in ws]), n


@pytest.mark.parametrize("mode", ["lstm", "2fc", "indp"])
def test_modes_give_dt_in_unit_interval(backend, mode):
    L, D, C = 4, 18, 6
    ctrl = TSCController(D, C, reduction=2, mode=mode, num_blocks=L)
    dt = ctrl(torch.randn(L, D) * 10)
    assert dt.shape == (L, C)
    assert ((dt > 0) & (dt < 1)).all()
    if mode == "indp":
        assert torch.equal(dt, torch.full((L, C), 0.5))
    network = NetworkController([ctrl, TSCController(9, 3, reduction=1, mode="lstm")])
    out = network([block_convs(D, C, L), [[torch.randn(1, 2, 3, 3)] for _ in range(2)]])
    assert [tuple(o.shape) for o in out] == [(L, C), (2, 3)]
    assert all(((o > 0) & (o < 1)).all() for o in out)
    if mode == "indp":
        assert torch.equal(out[0], torch.full((L, C), 0.5))


def test_mixed_modes_match_per_stage_forward(backend):
    """A network mixing lstm, 2fc and indp stages gives each stage its own controller's Δt."""
    ctrls = [
        make_controller(3, 18, 2, 2),
        make_controller(2, 18, 2, 2, mode="2fc"),
        make_controller(4, 9, 3, 1),
        make_controller(2, 9, 3, 1, mode="indp"),
    ]
    weights = [
        block_convs(18, 2, 3),
        block_convs(18, 2, 2),
        [[torch.randn(1, 2, 3, 3)] for _ in range(4)],
        [[torch.randn(1, 2, 3, 3)] for _ in range(2)],
    ]
    out = NetworkController(ctrls)(weights)
    for s, (ctrl, blocks) in enumerate(zip(ctrls, weights)):
        wbar = torch.stack([reference.weight_mean(ws) for ws in blocks])
        want = reference.lstm_controller(wbar, *ctrl.lstm_params()) if ctrl.mode == "lstm" else ctrl(wbar)
        torch.testing.assert_close(out[s], want, rtol=1e-5, atol=1e-6, msg=lambda m: f"stage {s}: {m}")


# ---------------------------------------------------------------------------------------------
# What the suite common to every op (tests/ops/test_common.py) runs: reference match per dtype x
# layout, opcheck, fp64 gradcheck, torch.compile, empty batch, bad input
# ---------------------------------------------------------------------------------------------
LAYOUTS = (False,)  # 2-D and 1-D tensors: no channel layout
DTYPES = (torch.float32,)  # the controller runs in fp32 (fp64 for gradcheck); fp16/bf16 are rejected
NO_EMPTY_BATCH = "a stage has L >= 1 blocks (a bad input: test_lstm_controller_bad_inputs)"


def sample_inputs(dtype, channels_last):
    """One stage (L, D, C, r) of a few blocks, H = C // r: tiny, every size odd."""
    samples = []
    for L, D, C, r in ((2, 5, 3, 2),):
        ctrl = make_controller(L, D, C, r, dtype=dtype)
        params = [p.detach().clone().requires_grad_() for p in ctrl.lstm_params()]
        samples.append(((torch.randn(L, D, dtype=dtype, requires_grad=True), *params), {}))
    return samples


def empty_inputs():
    return []
# tests/ops/test_triton_plans.py plans the ops on activations; this one's arguments are not
PLAN_NOT_ON_ACTIVATIONS = "a network's controller parameters: tests/tooling/test_controller_plans.py"


# the rest: test_lstm_controller_bad_inputs
BAD_INPUTS = [(lambda: (torch.randn(4, 5)[:0], *_params()), ValueError, r"L >= 1")]


def _params(H=2, D=5, C=3):
    return [
        torch.randn(H, D),
        torch.randn(H),
        torch.randn(4 * H, H),
        torch.randn(4 * H, H),
        torch.randn(4 * H),
        torch.randn(4 * H),
        torch.randn(C, H),
        torch.randn(C),
    ]


@pytest.mark.parametrize("change, error, match", [
    (lambda w, p: (w[0], p), ValueError, r"wbar must have shape \(L, D\)"),
    (lambda w, p: (w[:0], p), ValueError, r"L >= 1"),
    (lambda w, p: (w.int(), p), TypeError, r"wbar must have dtype"),
    (lambda w, p: (w.half(), p), TypeError, r"wbar must have dtype"),
    (lambda w, p: (w, [p[0][:, :4]] + p[1:]), ValueError, r"fc_in_weight must have shape \(2, 5\)"),
    (lambda w, p: (w, p[:3] + [p[3][:, :1]] + p[4:]), ValueError, r"weight_hh must have shape \(8, 2\)"),
    (lambda w, p: (w, p[:5] + [p[5][:4]] + p[6:]), ValueError, r"bias_hh must have shape \(8,\)"),
    (lambda w, p: (w, p[:7] + [p[7][:2]]), ValueError, r"fc_out_bias must have shape \(3,\)"),
    (lambda w, p: (w, p[:6] + [p[6][0]] + p[7:]), ValueError, r"fc_out_weight must be 2-D"),
    (lambda w, p: (w, p[:2] + [p[2].double()] + p[3:]), TypeError, r"weight_ih must have wbar's dtype"),
    (lambda w, p: (w, p[:1] + ["bias"] + p[2:]), TypeError, r"fc_in_bias must be a torch.Tensor"),
])
def test_lstm_controller_bad_inputs(backend, change, error, match):
    wbar, params = change(torch.randn(4, 5), _params())
    with pytest.raises(error, match=match):
        tsc_kernels.lstm_controller(wbar, *params)


def test_network_bad_inputs(backend):
    network = NetworkController([TSCController(18, 2, reduction=2), TSCController(18, 2, mode="indp", num_blocks=2)])
    good = [block_convs(18, 2, 3), block_convs(18, 2, 2)]
    with pytest.raises(ValueError, match=r"2 stages but there are"):
        NetworkController(list(network.stages)[:1])(good)
    with pytest.raises(
        ValueError, match=r"weights\[0\]\[1\] gives w̄ of length 9, but stage 0's controller has in_features=18"
    ):
        network([[good[0][0], [torch.randn(1, 2, 3, 3)], good[0][2]], good[1]])
    with pytest.raises(ValueError, match=r"weights\[1\] has 3 blocks but stage 1's 'indp' controller has num_blocks=2"):
        network([good[0], block_convs(18, 2, 3)])
    with pytest.raises(ValueError, match=r"weights\[1\] must be a non-empty list"):
        network([good[0], []])
    with pytest.raises(TypeError, match=r"fc_in_weight must have wbar's dtype torch.float32"):  # before any launch
        NetworkController([TSCController(18, 2, reduction=2).double()])([good[0]])


# network_dt validates every step through fast predicates (_checks.conv_weights_like, lstm_params_like)
# and names the argument only when they fail: a bad weight or parameter in a LATER block or stage
# (after the first weight has set the dtype and device) must still be rejected before any launch.
LATER_BLOCK_ERRORS = [
    (
        "other-dtype",
        lambda w: w.double(),
        TypeError,
        r"weights\[1\]\[0\]\[0\] must have weights\[0\]\[0\]\[0\]'s dtype torch.float32",
    ),
    (
        "other-device",
        lambda w: w.to("meta"),
        ValueError,
        r"one device, got weights\[0\]\[0\]\[0\] on cpu, weights\[1\]\[0\]\[0\] on meta",
    ),
    (
        "no-input-channels",
        lambda w: w[:, :0],
        ValueError,
        r"weights\[1\]\[0\]\[0\] must have at least one input channel",
    ),
    ("linear-weight", lambda w: w.flatten(1), ValueError, r"weights\[1\]\[0\]\[0\] must be a conv weight"),
    ("not-a-tensor", lambda w: w.tolist(), TypeError, r"weights\[1\]\[0\]\[0\] must be a torch.Tensor"),
    ("integer", lambda w: w.long(), TypeError, r"weights\[1\]\[0\]\[0\] must have dtype"),
]


@pytest.mark.parametrize(
    "change, error, match", [c[1:] for c in LATER_BLOCK_ERRORS], ids=[c[0] for c in LATER_BLOCK_ERRORS]
)
def test_network_rejects_a_bad_weight_in_a_later_block(change, error, match):
    network = NetworkController([TSCController(36, 2, reduction=2), TSCController(36, 2, reduction=2)])
    weights = [block_convs(36, 2, 2), block_convs(36, 2, 3)]  # two 3x3 convs per block
    network(weights)  # the good network runs
    weights[1][0] = [change(w.detach()) for w in weights[1][0]]  # the whole block: its own checks pass
    with pytest.raises(error, match=match):
        network(weights)


def test_network_rejects_bad_parameters_in_a_later_stage():
    network = NetworkController([TSCController(18, 2, reduction=2), TSCController(18, 4, reduction=2)])
    weights = [block_convs(18, 2, 2), block_convs(18, 4, 2)]
    network(weights)
    with torch.no_grad():
        network.stages[1].lstm.weight_hh = torch.nn.Parameter(network.stages[1].lstm.weight_hh[:, :1].clone())
    with pytest.raises(ValueError, match=r"weight_hh must have shape \(8, 2\)"):
        network(weights)
    network.stages[1].lstm.weight_hh = torch.nn.Parameter(torch.randn(8, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"weight_hh must have wbar's dtype torch.float32"):
        network(weights)


@pytest.mark.parametrize("change", [c[1] for c in LATER_BLOCK_ERRORS], ids=[c[0] for c in LATER_BLOCK_ERRORS])
def test_fast_predicates_agree_with_the_checks(change):
    """conv_weights_like accepts exactly what conv_weights + conv_in_channels + same dtype/device accept."""
    from tsc_kernels import _checks
    first, good = torch.randn(3, 2, 3, 3), [torch.randn(4, 5, 3, 3), torch.randn(2, 1, 3)]
    assert _checks.conv_weights_like(good, first) and _checks.conv_weights_like(tuple(good), first)
    assert not _checks.conv_weights_like([], first) and not _checks.conv_weights_like(good[0], first)
    assert not _checks.conv_weights_like([good[0], change(good[1])], first)
    ctrl = TSCController(18, 4, reduction=2)
    params = ctrl.lstm_params()
    assert _checks.lstm_params_like(params, 18, torch.float32, first.device)
    assert not _checks.lstm_params_like(params, 17, torch.float32, first.device)
    assert not _checks.lstm_params_like(params, 18, torch.float64, first.device)
    assert not _checks.lstm_params_like(params[:-1], 18, torch.float32, first.device)
    assert not _checks.lstm_params_like(params[:6] + (params[6][:, :1],) + params[7:], 18, torch.float32, first.device)
    assert not _checks.lstm_params_like(params[:7] + (params[7].tolist(),), 18, torch.float32, first.device)


# ---------------------------------------------------------------------------------------------
# The Triton kernels under the interpreter (from test_lstm_controller_triton.py).
# The Triton weight-mean projection and batched LSTM controller (tsc_kernels._triton.weight_mean /
# .controller) vs tsc_kernels.reference, run on CPU tensors under the Triton interpreter.
#
# Shapes are small and odd on purpose: the interpreter runs the kernels with 16 x 16 tiles, so
# D = 37 and H = 20 (4H = 80) make every tiled loop run several tiles, the last one partial.
# ---------------------------------------------------------------------------------------------

TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
# the Triton kernels run on CPU only under the interpreter: TRITON_INTERPRET=1 before pytest starts
# (the AOT compile for sm_80/sm_90 is tests/tooling/test_triton_aot.py)
TRITON_ONLY = pytest.mark.skipif(not TRITON_INTERPRETED, reason="the Triton kernels run on CPU only under the "
                                 "interpreter: set TRITON_INTERPRET=1 before pytest starts")
if TRITON_INTERPRETED:
    import tsc_kernels._triton.lstm_controller  # noqa: F401  (registers the tsc::*_triton ops)
    import tsc_kernels._triton.weight_mean  # noqa: F401

    wm_op = torch.ops.tsc.weight_mean_triton
    ctrl_op = torch.ops.tsc.lstm_controller_triton


# (L, D, C, H) per stage. The third stage has H > the interpreter tile (16) so the gate rows (4H)
# and the hidden columns span several tiles; the fourth has a single block (no recurrence).
TRITON_STAGES = [(3, 37, 13, 3), (2, 20, 8, 2), (2, 40, 24, 20), (1, 5, 3, 1)]



def make_stage_params(D, C, H, dtype=torch.float32):
    """The 8 parameters of one stage, from real nn.Linear / nn.LSTMCell modules (their init scales)."""
    fc_in, lstm, fc_out = torch.nn.Linear(D, H), torch.nn.LSTMCell(H, H), torch.nn.Linear(H, C)
    params = [
        fc_in.weight,
        fc_in.bias,
        lstm.weight_ih,
        lstm.weight_hh,
        lstm.bias_ih,
        lstm.bias_hh,
        fc_out.weight,
        fc_out.bias,
    ]
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



@TRITON_ONLY
def test_triton_controller_forward_matches_reference():
    wbars, params = make_network(TRITON_STAGES)
    dt, saved = ctrl_op(packed(wbars), blocks_of(TRITON_STAGES), params)
    torch.testing.assert_close(dt, reference_dt(wbars, params), atol=1e-6, rtol=1e-5)
    assert saved.shape == (sum(7 * L * H for L, _, _, H in TRITON_STAGES),)



@TRITON_ONLY
def test_triton_controller_matches_nn_lstmcell_loop():
    # An oracle independent of tsc_kernels.reference: torch's own modules holding the same weights.
    L, D, C, H = 4, 37, 13, 20
    fc_in, lstm, fc_out = torch.nn.Linear(D, H), torch.nn.LSTMCell(H, H), torch.nn.Linear(H, C)
    wbar = torch.randn(L, D)
    h = c = torch.zeros(1, H)
    want = []
    for d in range(L):
        h, c = lstm(torch.relu(fc_in(wbar[d:d + 1])), (h, c))
        want.append(torch.sigmoid(fc_out(h)))
    params = [fc_in.weight, fc_in.bias, lstm.weight_ih, lstm.weight_hh, lstm.bias_ih, lstm.bias_hh,
              fc_out.weight, fc_out.bias]
    dt, _ = ctrl_op(wbar.reshape(-1), [L], [p.detach() for p in params])
    torch.testing.assert_close(dt.view(L, C), torch.cat(want).detach(), atol=1e-6, rtol=1e-5)



@TRITON_ONLY
def test_triton_controller_gradients_match_reference():
    wbars, params = make_network(TRITON_STAGES)
    wbar = packed(wbars)
    dt, _ = ctrl_op(wbar, blocks_of(TRITON_STAGES), params)
    ref = reference_dt(wbars, params)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(dt, [wbar] + params, grad)
    want = torch.autograd.grad(ref, wbars + params, grad)
    torch.testing.assert_close(got[0], packed(want[: len(wbars)]), atol=1e-5, rtol=1e-5, msg=lambda m: f"d wbar: {m}")
    names = [
        "fc_in.weight",
        "fc_in.bias",
        "weight_ih",
        "weight_hh",
        "bias_ih",
        "bias_hh",
        "fc_out.weight",
        "fc_out.bias",
    ]
    for k, (g, w) in enumerate(zip(got[1:], want[len(wbars):])):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=lambda m: f"stage {k // 8} {names[k % 8]}: {m}")



@TRITON_ONLY
def test_triton_controller_empty_stage_gets_zero_gradients():
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



@TRITON_ONLY
def test_triton_split_launches_match_reference_forward_and_backward():
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



@TRITON_ONLY
def test_triton_split_launches_gradcheck_fp64():
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



@TRITON_ONLY
def test_triton_launchers_run_the_plan(monkeypatch):
    # The launchers run _plan, and launch_plan reports it: the launches they make are _plan's,
    # forward then backward, 4 each whatever the number of stages.
    mod = tsc_kernels._triton.lstm_controller
    log = []
    for name in (
        "lstm_controller_products_kernel",
        "lstm_controller_cell_fwd_kernel",
        "lstm_controller_cell_bwd_kernel",
    ):
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



@TRITON_ONLY
@pytest.mark.skipif(not _extension.has_kernel("lstm_controller", "CPU"),
                    reason="the C++ extension (tsc::lstm_controller CPU kernel) is not built")
def test_triton_saved_layout_is_the_cpp_ops():
    # `saved` has one documented layout on every backend: the Triton backward must accept the C++
    # forward's saved state and vice versa, giving the same gradients.
    wbars, params = make_network(TRITON_STAGES[:2])
    wbar, blocks = packed(wbars).detach(), blocks_of(TRITON_STAGES[:2])
    p = [t.detach() for t in params]
    dt_t, saved_t = ctrl_op(wbar, blocks, p)
    dt_c, saved_c = torch.ops.tsc.lstm_controller(wbar, blocks, p)
    torch.testing.assert_close(saved_t, saved_c, atol=1e-6, rtol=1e-5)
    grad = torch.randn_like(dt_t)
    got = torch.ops.tsc.lstm_controller_backward_triton(grad, dt_c, wbar, blocks, p, saved_c)
    want = torch.ops.tsc.lstm_controller_backward(grad, dt_t, wbar, blocks, p, saved_t)
    for g, w in zip([got[0], *got[1]], [want[0], *want[1]]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)



@TRITON_ONLY
def test_triton_controller_rejects_mismatched_arguments():
    wbars, params = make_network(TRITON_STAGES[:1])
    with pytest.raises(ValueError, match="8 tensors per stage"):
        ctrl_op(packed(wbars), [3], params[:7])
    with pytest.raises(ValueError, match="sum"):
        ctrl_op(packed(wbars)[:-1], [3], params)
    with pytest.raises(ValueError, match="shape"):
        ctrl_op(packed(wbars), [3], params[:3] + [params[3][:, :-1]] + params[4:])



@TRITON_ONLY
def test_triton_controller_gradcheck_fp64():
    stages = [(2, 3, 2, 1), (3, 4, 3, 2)]
    wbars, params = make_network(stages, torch.float64)
    blocks = blocks_of(stages)

    def fn(wbar, *params):
        return ctrl_op(wbar, blocks, list(params))[0]

    # fast_mode: random projections of the Jacobian keep the interpreted kernel calls few.
    assert torch.autograd.gradcheck(fn, (packed(wbars).detach().requires_grad_(), *params), fast_mode=True)



@TRITON_ONLY
def test_triton_end_to_end_gradcheck_fp64_from_conv_weights():
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



@TRITON_ONLY
def test_triton_controller_opcheck():
    wbars, params = make_network(TRITON_STAGES[:2])
    torch.library.opcheck(ctrl_op, (packed(wbars).detach().requires_grad_(), blocks_of(TRITON_STAGES[:2]), params))
    wbar, blocks, p = packed(wbars).detach(), blocks_of(TRITON_STAGES[:2]), [t.detach() for t in params]
    dt, saved = ctrl_op(wbar, blocks, p)
    torch.library.opcheck(
        torch.ops.tsc.lstm_controller_backward_triton, (torch.randn_like(dt), dt, wbar, blocks, p, saved)
    )


@TRITON_ONLY
def test_triton_public_api_dispatches_to_triton():
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



@TRITON_ONLY
def test_triton_torch_compile_fullgraph():
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


# ---------------------------------------------------------------------------------------------
# Hypothesis properties (tests/ops/test_properties.py runs them on every backend): the case
# strategy, the check against the fp64 reference and docs/ops.md's properties
# ---------------------------------------------------------------------------------------------
@st.composite
def lstm_controller_cases(draw, small):
    """(L, D, H, C), seed: fp32, the controller's dtype."""
    return (
        draw(st.integers(1, 3 if small else 4)),
        draw(st.sampled_from([3, 5, 7, 13])),
        draw(st.sampled_from([1, 3, 5])),
        draw(st.sampled_from([3, 5, 7])),
    ), draw(SEED)


# --- lstm_controller ------------------------------------------------------------------------
def _controller(case, dtype=torch.float32):
    (L, D, H, C), _ = case
    return (torch.randn(L, D, dtype=dtype, requires_grad=True),
            *(p.requires_grad_() for p in test_robustness._lstm_params(D, H, C, dtype)))


def lstm_fp64(case):
    """Against the reference in fp64, with the controller tests' tolerances (assert_grads_close: BPTT
    sums over blocks and gates; the fused and the fp32 reference round in different orders)."""
    inputs = _controller(case)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    dt, ref = tsc_kernels.lstm_controller(*inputs), reference.lstm_controller(*exact)
    assert dt.dtype == torch.float32 and dt.shape == ref.shape
    torch.testing.assert_close(dt, ref.float(), rtol=1e-5, atol=1e-6)
    grad = torch.randn(dt.shape)
    want = [w.float() for w in torch.autograd.grad(ref, exact, grad.double())]
    assert_grads_close(torch.autograd.grad(dt, inputs, grad), want, PARAM_NAMES)


def lstm_is_causal(case):
    """Δt of the first l blocks depends on their w̄ rows only: the same from wbar[:l], and no gradient
    reaches the later rows from them."""
    wbar, *params = _controller(case)
    L = wbar.shape[0]
    dt = tsc_kernels.lstm_controller(wbar, *params)
    assert ((dt >= 0) & (dt <= 1)).all(), "Δt is a sigmoid"
    for l_ in range(1, L):
        torch.testing.assert_close(tsc_kernels.lstm_controller(wbar[:l_], *params), dt[:l_], atol=2e-5, rtol=2e-5)
    (dwbar,) = torch.autograd.grad(dt[:1], (wbar,), torch.randn(1, dt.shape[1]))
    assert not dwbar[1:].any()


def lstm_stages_batched_equal_stages_alone(case):
    """The op behind the public function runs several stages in one call: the same as one call per stage."""
    (L, D, H, C), _ = case
    stages = [_controller(case), _controller(((L + 1, D + 2, H, C + 1), 0))]
    op = dispatch("lstm_controller", stages[0][0].device)
    out = op(torch.cat([s[0].reshape(-1) for s in stages]), [s[0].shape[0] for s in stages],
             [p for s in stages for p in s[1:]])
    out = out[0] if OPS["lstm_controller"].returns_saved(op) else out
    torch.testing.assert_close(out, torch.cat([tsc_kernels.lstm_controller(*s).reshape(-1) for s in stages]),
                               atol=2e-5, rtol=2e-5)


PROPERTY_STRATEGY = lstm_controller_cases
# (check against the fp64 reference, [properties]): tests/ops/test_properties.py runs them
PROPERTIES = (lstm_fp64, [lstm_is_causal, lstm_stages_batched_equal_stages_alone])
