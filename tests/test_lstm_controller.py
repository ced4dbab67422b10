"""The weight-mean projection and the batched TSC_LSTM controller on every backend (docs/tsc.md, docs/ops.md).

Each backend is compared with tsc_kernels.reference and with a plain nn.Linear / nn.LSTMCell loop
holding the same parameters (the controller's own submodules), forward and every gradient.
"""
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



# Stage shapes (L, D, C, r) of real networks (docs/tsc.md): basic blocks give D = 2 * 9 * C,
# bottlenecks D = C / 4 + C.
NETWORKS = {
    "cifar_resnet56": [(9, 18 * c, c, 4) for c in (16, 32, 64)],
    "resnet18": [(2, 18 * c, c, 4) for c in (64, 128, 256, 512)],
    "resnet50": [(l, c // 4 + c, c, 8) for l, c in ((3, 256), (4, 512), (6, 1024), (3, 2048))],
    "odd": [(1, 7, 5, 4), (5, 13, 3, 4), (4, 11, 9, 2), (3, 5, 1, 4)],  # L = 1, H = 1 (C < r), ...
}
# Stages of more than 1 M multiply-adds in fc_in and fc_out (L (D + C) H) take the Triton
# interpreter minutes: they run on the other backends here, and the Triton kernels are compiled for
# these sizes in tests/test_triton_aot.py.
BIG = pytest.mark.big_for_interpreter
STAGES = [pytest.param(s, id=f"{net}-L{s[0]}-D{s[1]}-C{s[2]}",
                       marks=[BIG] if s[0] * (s[1] + s[2]) * max(1, s[2] // s[3]) > 1_000_000 else [])
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
        torch.testing.assert_close(g, w, rtol=rtol, atol=1e-5 * max(1.0, w.abs().max().item()), msg=lambda m: f"{name}: {m}")


PARAM_NAMES = ("wbar",) + tuple(f"{m}.{p}" for m, p in (("fc_in", "weight"), ("fc_in", "bias"), ("lstm", "weight_ih"), ("lstm", "weight_hh"),
                                                       ("lstm", "bias_ih"), ("lstm", "bias_hh"), ("fc_out", "weight"), ("fc_out", "bias")))


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
    names = [f"conv weight {i}" for i in range(len(leaves) - len(list(network.parameters())))] + [n for n, _ in network.named_parameters()]
    for want_dts in (refs, plains):
        for s, (dt, want) in enumerate(zip(dts, want_dts)):
            assert dt.shape == want.shape, s
            torch.testing.assert_close(dt, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"stage {s}: {m}")
        assert_grads_close(got, torch.autograd.grad(want_dts, leaves, cots), names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_weight_mean_matches_reference(backend, dtype):
    ws = [torch.randn(8, 5, 3, 3, dtype=dtype), torch.randn(6, 3, 1, 1, dtype=dtype), torch.randn(4, 7, 3, dtype=dtype),
          torch.randn(3, 2, 2, 3, 2, dtype=dtype),  # conv3d
          torch.randn(5, 6, 3, 3, dtype=dtype).to(memory_format=torch.channels_last),
          torch.randn(4, 9, 5, 5, dtype=dtype)[:, ::2],  # non-contiguous C_in
          # C_in past the CPU kernel's vector runs (lcm(K, lanes) values) with rows left over
          torch.randn(7, 19, 3, 3, dtype=dtype), torch.randn(5, 21, 3, dtype=dtype), torch.randn(3, 11, 5, 5, dtype=dtype),
          torch.randn(4, 13, 2, 2, dtype=dtype)]
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


def test_weight_mean_gradient_reaches_only_weights_that_require_it(backend):
    ws = [torch.randn(4, 3, 3, 3, requires_grad=True), torch.randn(5, 4, 1, 1), torch.randn(2, 5, 3, requires_grad=True)]
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


@BIG  # gradcheck runs the interpreter hundreds of times; tests/test_lstm_controller_triton.py has a smaller one
def test_gradcheck_end_to_end(backend):
    """fp64 from the conv weights through the batched weight_mean and controller (two lstm stages)."""
    stages = [(3, 18, 1, 2), (2, 5, 6, 4)]  # H = 1 (C < r) and H = 1, D from a 3x3 conv (9 * 2) and odd convs
    ctrls = [make_controller(*s, dtype=torch.float64) for s in stages]
    network = NetworkController(ctrls)
    weights = [[[torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)] for _ in range(3)],
               [[torch.randn(2, 4, 1, dtype=torch.float64, requires_grad=True), torch.randn(3, 2, 1, dtype=torch.float64, requires_grad=True)]
                for _ in range(2)]]
    flat = [w for blocks in weights for ws in blocks for w in ws]
    names = [n for n, _ in network.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in network.parameters()]

    def fn(*tensors):
        ws = iter(tensors[:len(flat)])
        nested = [[[next(ws) for _ in blk] for blk in blocks] for blocks in weights]
        return tuple(torch.func.functional_call(network, dict(zip(names, tensors[len(flat):])), (nested,)))

    assert torch.autograd.gradcheck(fn, (*flat, *params))


def test_opcheck(backend):
    ws = [torch.randn(4, 3, 3, 3, requires_grad=True), torch.randn(5, 4, 1, 1).to(memory_format=torch.channels_last).requires_grad_()]
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
    fwd, bwd = getattr(torch.ops.tsc, "lstm_controller" + suffix), getattr(torch.ops.tsc, "lstm_controller_backward" + suffix)
    torch.library.opcheck(wm, (ws,))
    torch.library.opcheck(wm_bwd, (torch.randn(4 * 9 + 5), [w.detach() for w in ws]))
    torch.library.opcheck(fwd, (wbar, blocks, params))
    dt, saved = (t.detach() for t in fwd(wbar, blocks, params))
    torch.library.opcheck(bwd, (torch.randn_like(dt), dt, wbar.detach(), blocks, [p.detach() for p in params], saved))


def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    stages = [(2, 18, 4, 2), (3, 10, 8, 4)]
    network = NetworkController([make_controller(*s) for s in stages])
    weights = [block_convs(18, 4, 2), [[torch.randn(2, 5, 1, 1, requires_grad=True), torch.randn(8, 2, 1, 1, requires_grad=True)] for _ in range(3)]]
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
    ctrls = [make_controller(3, 18, 2, 2), make_controller(2, 18, 2, 2, mode="2fc"), make_controller(4, 9, 3, 1), make_controller(2, 9, 3, 1, mode="indp")]
    weights = [block_convs(18, 2, 3), block_convs(18, 2, 2), [[torch.randn(1, 2, 3, 3)] for _ in range(4)], [[torch.randn(1, 2, 3, 3)] for _ in range(2)]]
    out = NetworkController(ctrls)(weights)
    for s, (ctrl, blocks) in enumerate(zip(ctrls, weights)):
        wbar = torch.stack([reference.weight_mean(ws) for ws in blocks])
        want = reference.lstm_controller(wbar, *ctrl.lstm_params()) if ctrl.mode == "lstm" else ctrl(wbar)
        torch.testing.assert_close(out[s], want, rtol=1e-5, atol=1e-6, msg=lambda m: f"stage {s}: {m}")


def _params(H=2, D=5, C=3):
    return [torch.randn(H, D), torch.randn(H), torch.randn(4 * H, H), torch.randn(4 * H, H), torch.randn(4 * H), torch.randn(4 * H), torch.randn(C, H), torch.randn(C)]


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


@pytest.mark.parametrize("weights, error, match", [
    ([], ValueError, r"weights must hold at least one conv weight"),
    (torch.randn(4, 3, 3, 3), TypeError, r"weights must be a list or tuple"),
    ([torch.randn(4, 3)], ValueError, r"weights\[0\] must be a conv weight"),
    ([torch.randn(4, 3, 1, 1), torch.randn(4, 3, 1, 1, 1, 1)], ValueError, r"weights\[1\] must be a conv weight"),
    ([torch.randn(4, 3, 1, 1), torch.ones(4, 3, 1, 1, dtype=torch.int64)], TypeError, r"weights\[1\] must have dtype"),
    ([torch.randn(4, 3, 1, 1), torch.randn(4, 3, 1, 1).double()], TypeError, r"weights\[1\] must have weights\[0\]'s dtype"),
    ([torch.randn(4, 3, 1, 1), "conv"], TypeError, r"weights\[1\] must be a torch.Tensor"),
    ([torch.randn(4, 3, 1, 1), torch.randn(4, 0, 3, 3)], ValueError, r"weights\[1\] must have at least one input channel"),
])
def test_weight_mean_bad_inputs(backend, weights, error, match):
    with pytest.raises(error, match=match):
        tsc_kernels.weight_mean(weights)


@pytest.mark.skipif(not _extension.has_cpp_ops(), reason="the C++ ops are not built")
def test_cpp_weight_mean_rejects_what_it_cannot_average():
    # the op itself, below the public checks: a mean over no input channels is 0/0, never garbage
    with pytest.raises(RuntimeError, match=r"weights\[1\] must have C_in >= 1"):
        torch.ops.tsc.weight_mean([torch.randn(3, 4, 3), torch.randn(2, 0, 3, 3)])


def test_network_bad_inputs(backend):
    network = NetworkController([TSCController(18, 2, reduction=2), TSCController(18, 2, mode="indp", num_blocks=2)])
    good = [block_convs(18, 2, 3), block_convs(18, 2, 2)]
    with pytest.raises(ValueError, match=r"2 stages but there are"):
        NetworkController(list(network.stages)[:1])(good)
    with pytest.raises(ValueError, match=r"weights\[0\]\[1\] gives w̄ of length 9, but stage 0's controller has in_features=18"):
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
    ("other-dtype", lambda w: w.double(), TypeError, r"weights\[1\]\[0\]\[0\] must have weights\[0\]\[0\]\[0\]'s dtype torch.float32"),
    ("other-device", lambda w: w.to("meta"), ValueError, r"one device, got weights\[0\]\[0\]\[0\] on cpu, weights\[1\]\[0\]\[0\] on meta"),
    ("no-input-channels", lambda w: w[:, :0], ValueError, r"weights\[1\]\[0\]\[0\] must have at least one input channel"),
    ("linear-weight", lambda w: w.flatten(1), ValueError, r"weights\[1\]\[0\]\[0\] must be a conv weight"),
    ("not-a-tensor", lambda w: w.tolist(), TypeError, r"weights\[1\]\[0\]\[0\] must be a torch.Tensor"),
    ("integer", lambda w: w.long(), TypeError, r"weights\[1\]\[0\]\[0\] must have dtype"),
]


@pytest.mark.parametrize("change, error, match", [c[1:] for c in LATER_BLOCK_ERRORS], ids=[c[0] for c in LATER_BLOCK_ERRORS])
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
