"""Robustness (issue 6): bad input, legal-but-unusual shapes, NaN/Inf, channels_last end to end,
determinism and memory of the C++ ops.

Every case runs on every backend that can run CPU tensors (the `backend` fixture): argument checks
live in the API layer (tsc_kernels/_checks.py) and must fire before any backend's kernel runs, and
the unusual shapes must give the reference's answer on every backend.
"""
import pytest
import torch
import torchvision

import tsc_kernels
from tsc_kernels import gpu_check_cases, models, reference
from tsc_kernels._checks import LSTM_PARAM_NAMES
from tsc_kernels.nn import NetworkController, TSCController
from tsc_kernels.ops.registry import OPS
from conftest import TEST_BACKENDS, TOLERANCES

def _lstm_params(D=7, H=3, C=5, dtype=torch.float32):
    return [torch.randn(H, D, dtype=dtype), torch.randn(H, dtype=dtype), torch.randn(4 * H, H, dtype=dtype),
            torch.randn(4 * H, H, dtype=dtype), torch.randn(4 * H, dtype=dtype), torch.randn(4 * H, dtype=dtype),
            torch.randn(C, H, dtype=dtype), torch.randn(C, dtype=dtype)]


def _with(params, i, value):
    params = list(params)
    params[i] = value
    return params


Y = lambda *s: torch.randn(*(s or (2, 3, 4, 4)))  # noqa: E731
DT = lambda c=3: torch.rand(c)  # noqa: E731
W = lambda *s: torch.randn(*(s or (4, 3, 3, 3)))  # noqa: E731

# (id, call, exception type, regex the message must match: it names the argument and what was expected)
BAD_INPUT = [
    # --- residual_update ---
    (
        "ru-y-rank1",
        lambda: tsc_kernels.residual_update(torch.randn(3), torch.randn(3), DT()),
        ValueError,
        r"y must have shape \(N, C, \*spatial\)",
    ),
    (
        "ru-y-rank6",
        lambda: tsc_kernels.residual_update(Y(1, 3, 1, 1, 1, 1), Y(1, 3, 1, 1, 1, 1), DT()),
        ValueError,
        r"y must have shape .*0 to 3 spatial",
    ),
    (
        "ru-f-channels",
        lambda: tsc_kernels.residual_update(Y(), Y(2, 4, 4, 4), DT()),
        ValueError,
        r"f must have y's shape",
    ),
    (
        "ru-f-spatial",
        lambda: tsc_kernels.residual_update(Y(), Y(2, 3, 4, 5), DT()),
        ValueError,
        r"f must have y's shape",
    ),
    (
        "ru-dt-channels",
        lambda: tsc_kernels.residual_update(Y(), Y(), DT(4)),
        ValueError,
        r"dt must have shape \(C,\) = \(3,\)",
    ),
    (
        "ru-dt-rank2",
        lambda: tsc_kernels.residual_update(Y(), Y(), torch.rand(1, 3)),
        ValueError,
        r"dt must have shape \(C,\)",
    ),
    (
        "ru-dt-rank0",
        lambda: tsc_kernels.residual_update(Y(), Y(), torch.tensor(0.5)),
        ValueError,
        r"dt must have shape \(C,\)",
    ),
    (
        "ru-dt-fp16",
        lambda: tsc_kernels.residual_update(Y(), Y(), DT().half()),
        TypeError,
        r"dt must have dtype float32",
    ),
    (
        "ru-dt-fp64-with-fp32",
        lambda: tsc_kernels.residual_update(Y(), Y(), DT().double()),
        TypeError,
        r"dt must have dtype float32",
    ),
    (
        "ru-dt-int",
        lambda: tsc_kernels.residual_update(Y(), Y(), torch.ones(3, dtype=torch.int64)),
        TypeError,
        r"dt must have dtype float32",
    ),
    (
        "ru-dt-not-tensor",
        lambda: tsc_kernels.residual_update(Y(), Y(), [0.5] * 3),
        TypeError,
        r"dt must be a torch.Tensor",
    ),
    ("ru-f-dtype", lambda: tsc_kernels.residual_update(Y(), Y().bfloat16(), DT()), TypeError, r"f must have y's dtype"),
    (
        "ru-f-device",
        lambda: tsc_kernels.residual_update(Y(), Y().to("meta"), DT()),
        ValueError,
        r"one device.*f on meta",
    ),
    (
        "ru-dt-device",
        lambda: tsc_kernels.residual_update(Y(), Y(), DT().to("meta")),
        ValueError,
        r"one device.*dt on meta",
    ),
    (
        "ru-y-int",
        lambda: tsc_kernels.residual_update(Y().int(), Y().int(), DT()),
        TypeError,
        r"y must have dtype float32, float16, bfloat16, float64; got int32",
    ),
    (
        "ru-y-bool",
        lambda: tsc_kernels.residual_update(Y() > 0, Y() > 0, DT()),
        TypeError,
        r"y must have dtype .*got bool",
    ),
    (
        "ru-f-int",
        lambda: tsc_kernels.residual_update(Y(), Y().long(), DT()),
        TypeError,
        r"f must have dtype .*got int64",
    ),
    (
        "ru-y-complex",
        lambda: tsc_kernels.residual_update(Y().cfloat(), Y().cfloat(), DT()),
        TypeError,
        r"y must have dtype .*got complex64",
    ),
    (
        "ru-y-not-tensor",
        lambda: tsc_kernels.residual_update([[1.0]], Y(), DT()),
        TypeError,
        r"y must be a torch.Tensor, got list",
    ),
    ("ru-relu-int", lambda: tsc_kernels.residual_update(Y(), Y(), DT(), relu=1), TypeError, r"relu must be a bool"),
    # --- weight_mean ---
    ("wm-empty-list", lambda: tsc_kernels.weight_mean([]), ValueError, r"weights must hold at least one conv weight"),
    ("wm-bare-tensor", lambda: tsc_kernels.weight_mean(W()), TypeError, r"weights must be a list or tuple"),
    (
        "wm-linear-weight",
        lambda: tsc_kernels.weight_mean([torch.randn(4, 3)]),
        ValueError,
        r"weights\[0\] must be a conv weight \(C_out, C_in, \*k\)",
    ),
    (
        "wm-1d-weight",
        lambda: tsc_kernels.weight_mean([torch.randn(4)]),
        ValueError,
        r"weights\[0\] must be a conv weight",
    ),
    (
        "wm-6d-weight",
        lambda: tsc_kernels.weight_mean([torch.randn(2, 2, 1, 1, 1, 1)]),
        ValueError,
        r"weights\[0\] must be a conv weight .*1 to 3 kernel dims",
    ),
    (
        "wm-zero-cin",
        lambda: tsc_kernels.weight_mean([W(4, 0, 3, 3)]),
        ValueError,
        r"weights\[0\] must have at least one input channel",
    ),
    ("wm-int", lambda: tsc_kernels.weight_mean([W().int()]), TypeError, r"weights\[0\] must have dtype .*got int32"),
    ("wm-bool", lambda: tsc_kernels.weight_mean([W() > 0]), TypeError, r"weights\[0\] must have dtype .*got bool"),
    (
        "wm-mixed-dtype",
        lambda: tsc_kernels.weight_mean([W(), W().double()]),
        TypeError,
        r"weights\[1\] must have weights\[0\]'s dtype",
    ),
    (
        "wm-mixed-device",
        lambda: tsc_kernels.weight_mean([W(), W().to("meta")]),
        ValueError,
        r"one device.*weights\[1\] on meta",
    ),
    (
        "wm-not-tensor",
        lambda: tsc_kernels.weight_mean([W(), "conv2"]),
        TypeError,
        r"weights\[1\] must be a torch.Tensor",
    ),
    # --- lstm_controller ---
    (
        "lstm-wbar-rank1",
        lambda: tsc_kernels.lstm_controller(torch.randn(7), *_lstm_params()),
        ValueError,
        r"wbar must have shape \(L, D\)",
    ),
    (
        "lstm-wbar-no-blocks",
        lambda: tsc_kernels.lstm_controller(torch.randn(0, 7), *_lstm_params()),
        ValueError,
        r"wbar must have shape \(L, D\) with L >= 1",
    ),
    (
        "lstm-wbar-D",
        lambda: tsc_kernels.lstm_controller(torch.randn(3, 8), *_lstm_params()),
        ValueError,
        r"fc_in_weight must have shape \(3, 8\)",
    ),
    (
        "lstm-wbar-bf16",
        lambda: tsc_kernels.lstm_controller(torch.randn(3, 7).bfloat16(), *_lstm_params()),
        TypeError,
        r"wbar must have dtype float32, float64",
    ),
    (
        "lstm-wbar-int",
        lambda: tsc_kernels.lstm_controller(torch.ones(3, 7, dtype=torch.int32), *_lstm_params()),
        TypeError,
        r"wbar must have dtype",
    ),
    (
        "lstm-fc_in_bias-shape",
        lambda: tsc_kernels.lstm_controller(torch.randn(3, 7), *_with(_lstm_params(), 1, torch.randn(4))),
        ValueError,
        r"fc_in_bias must have shape \(3,\)",
    ),
    (
        "lstm-weight_ih-shape",
        lambda: tsc_kernels.lstm_controller(torch.randn(3, 7), *_with(_lstm_params(), 2, torch.randn(12, 4))),
        ValueError,
        r"weight_ih must have shape \(12, 3\)",
    ),
    (
        "lstm-weight_hh-transposed",
        lambda: tsc_kernels.lstm_controller(torch.randn(3, 7), *_with(_lstm_params(), 3, torch.randn(3, 12))),
        ValueError,
        r"weight_hh must have shape \(12, 3\)",
    ),
    (
        "lstm-bias_hh-2d",
        lambda: tsc_kernels.lstm_controller(torch.randn(3, 7), *_with(_lstm_params(), 5, torch.randn(1, 12))),
        ValueError,
        r"bias_hh must have shape \(12,\)",
    ),
    (
        "lstm-fc_out_weight-1d",
        lambda: tsc_kernels.lstm_controller(torch.randn(3, 7), *_with(_lstm_params(), 6, torch.randn(5))),
        ValueError,
        r"fc_out_weight must be 2-D",
    ),
    (
        "lstm-fc_out_bias-shape",
        lambda: tsc_kernels.lstm_controller(torch.randn(3, 7), *_with(_lstm_params(), 7, torch.randn(6))),
        ValueError,
        r"fc_out_bias must have shape \(5,\)",
    ),
    (
        "lstm-param-dtype",
        lambda: tsc_kernels.lstm_controller(torch.randn(3, 7), *_with(_lstm_params(), 2, torch.randn(12, 3).double())),
        TypeError,
        r"weight_ih must have wbar's dtype",
    ),
    (
        "lstm-param-int",
        lambda: tsc_kernels.lstm_controller(
            torch.randn(3, 7), *_with(_lstm_params(), 4, torch.ones(12, dtype=torch.int64))
        ),
        TypeError,
        r"bias_ih must have dtype float32, float64",
    ),
    (
        "lstm-param-device",
        lambda: tsc_kernels.lstm_controller(
            torch.randn(3, 7), *_with(_lstm_params(), 3, torch.randn(12, 3, device="meta"))
        ),
        ValueError,
        r"one device.*weight_hh on meta",
    ),
    (
        "lstm-param-none",
        lambda: tsc_kernels.lstm_controller(torch.randn(3, 7), *_with(_lstm_params(), 7, None)),
        TypeError,
        r"fc_out_bias must be a torch.Tensor, got NoneType",
    ),
    # --- TSCController / NetworkController ---
    (
        "ctrl-unknown-mode",
        lambda: TSCController(18, 4, mode="gru"),
        ValueError,
        r"mode must be one of 'lstm', '2fc', 'indp', 'fixed', got 'gru'",
    ),
    (
        "ctrl-2fc-no-num_blocks",
        lambda: TSCController(18, 4, mode="2fc"),
        ValueError,
        r"num_blocks is required for mode '2fc'",
    ),
    (
        "ctrl-indp-no-num_blocks",
        lambda: TSCController(18, 4, mode="indp"),
        ValueError,
        r"num_blocks is required for mode 'indp'",
    ),
    (
        "ctrl-num_blocks-zero",
        lambda: TSCController(18, 4, mode="indp", num_blocks=0),
        ValueError,
        r"num_blocks must be >= 1",
    ),
    ("ctrl-in_features-zero", lambda: TSCController(0, 4), ValueError, r"in_features must be >= 1, got 0"),
    ("ctrl-in_features-float", lambda: TSCController(18.0, 4), TypeError, r"in_features must be an int, got float"),
    ("ctrl-channels-negative", lambda: TSCController(18, -1), ValueError, r"channels must be >= 1, got -1"),
    ("ctrl-reduction-zero", lambda: TSCController(18, 4, reduction=0), ValueError, r"reduction must be >= 1, got 0"),
    (
        "ctrl-lstm-wbar-D",
        lambda: TSCController(18, 4)(torch.randn(3, 17)),
        ValueError,
        r"wbar must have shape \(num_blocks, in_features\) = \(L, 18\), got shape \(3, 17\)",
    ),
    (
        "ctrl-2fc-wbar-D",
        lambda: TSCController(18, 4, mode="2fc", num_blocks=3)(torch.randn(3, 17)),
        ValueError,
        r"wbar must have shape .* = \(3, 18\)",
    ),
    (
        "ctrl-2fc-wbar-L",
        lambda: TSCController(18, 4, mode="2fc", num_blocks=3)(torch.randn(2, 18)),
        ValueError,
        r"wbar must have shape .* = \(3, 18\), got shape \(2, 18\)",
    ),
    (
        "ctrl-indp-wbar-L",
        lambda: TSCController(18, 4, mode="indp", num_blocks=3)(torch.randn(2, 18)),
        ValueError,
        r"wbar must have shape .* = \(3, 18\)",
    ),
    (
        "ctrl-2fc-wbar-dtype",
        lambda: TSCController(18, 4, mode="2fc", num_blocks=3)(torch.randn(3, 18).double()),
        TypeError,
        r"wbar must have the controller parameters' dtype",
    ),
    (
        "ctrl-2fc-wbar-device",
        lambda: TSCController(18, 4, mode="2fc", num_blocks=3)(torch.randn(3, 18, device="meta")),
        ValueError,
        r"wbar must be on the controller parameters' device",
    ),
    (
        "ctrl-wbar-not-tensor",
        lambda: TSCController(18, 4, mode="indp", num_blocks=3)("wbar"),
        TypeError,
        r"wbar must be a torch.Tensor, got str",
    ),
    ("netctrl-empty", lambda: NetworkController([]), ValueError, r"stages must hold at least one TSCController"),
    (
        "netctrl-not-controller",
        lambda: NetworkController([TSCController(18, 4), torch.nn.Linear(2, 2)]),
        TypeError,
        r"stages\[1\] must be a TSCController, got Linear",
    ),
    (
        "netctrl-bare-controller",
        lambda: NetworkController(TSCController(18, 4)),
        TypeError,
        r"stages must be a list of TSCController",
    ),
    (
        "netctrl-stage-count",
        lambda: NetworkController([TSCController(18, 4)])([]),
        ValueError,
        r"weights has 0 stages but there are 1",
    ),
    (
        "netctrl-linear-weight",
        lambda: NetworkController([TSCController(18, 4)])([[[torch.randn(4, 3)]]]),
        ValueError,
        r"weights\[0\]\[0\]\[0\] must be a conv weight",
    ),
    (
        "netctrl-empty-block",
        lambda: NetworkController([TSCController(18, 4)])([[[]]]),
        ValueError,
        r"weights\[0\]\[0\] must hold at least one conv weight",
    ),
    (
        "netctrl-wbar-length",
        lambda: NetworkController([TSCController(18, 4)])([[[W(1, 3, 3, 3)]]]),
        ValueError,
        r"gives w̄ of length 9, but stage 0's controller has in_features=18",
    ),
    # --- convert / fold / diagnostics / TSC blocks ---
    (
        "convert-linear",
        lambda: tsc_kernels.convert(torch.nn.Linear(2, 2)),
        TypeError,
        r"convert cannot handle torch.nn.modules.linear.Linear",
    ),
    (
        "convert-resnet-subclass",
        lambda: tsc_kernels.convert(
            type("MyCIFAR", (models.CIFARResNet,), {})(torchvision.models.resnet.BasicBlock, 1)
        ),
        TypeError,
        r"convert cannot handle .*MyCIFAR",
    ),
    (
        "convert-not-module",
        lambda: tsc_kernels.convert("resnet18"),
        TypeError,
        r"model must be a torch.nn.Module, got str",
    ),
    ("convert-twice", lambda: tsc_kernels.convert(models.cifar_resnet(8)), ValueError, r"already a TSC network"),
    (
        "convert-mode",
        lambda: tsc_kernels.convert(models.cifar_resnet(8, tsc=None), mode="lstm2"),
        ValueError,
        r"mode must be one of",
    ),
    (
        "convert-reduction",
        lambda: tsc_kernels.convert(models.cifar_resnet(8, tsc=None), reduction=0),
        ValueError,
        r"reduction must be >= 1",
    ),
    (
        "fold-plain",
        lambda: tsc_kernels.fold(models.cifar_resnet(8, tsc=None)),
        TypeError,
        r"fold expects a TSC network",
    ),
    (
        "fold-inplace-int",
        lambda: tsc_kernels.fold(models.cifar_resnet(8), inplace=1),
        TypeError,
        r"inplace must be a bool",
    ),
    (
        "step_sizes-plain",
        lambda: tsc_kernels.step_sizes(torch.nn.Linear(2, 2)),
        TypeError,
        r"step_sizes needs a TSC network",
    ),
    (
        "evolution_time-plain",
        lambda: tsc_kernels.evolution_time(models.cifar_resnet(8, tsc=None)),
        TypeError,
        r"evolution_time needs a TSC network",
    ),
    (
        "stability_bound-iterations",
        lambda: tsc_kernels.stability_bound(models.cifar_resnet(8), iterations=0),
        ValueError,
        r"iterations must be >= 1",
    ),
    (
        "plot_step_sizes-plain",
        lambda: tsc_kernels.plot_step_sizes(torch.nn.Linear(2, 2)),
        TypeError,
        r"plot_step_sizes needs a TSC network",
    ),
    (
        "block-dt-channels",
        lambda: models.cifar_resnet(8).layer1[0](torch.randn(1, 16, 4, 4), torch.rand(5)),
        ValueError,
        r"dt must have shape \(C,\) = \(16,\)",
    ),
    (
        "block-dt-int",
        lambda: models.cifar_resnet(8).layer1[0](torch.randn(1, 16, 4, 4), torch.ones(16, dtype=torch.int64)),
        TypeError,
        r"dt must have dtype .*got int64",
    ),
    ("cifar-depth", lambda: models.cifar_resnet(9), ValueError, r"depth must be 6n\+2"),
]


@pytest.mark.parametrize("call, exc, message", [pytest.param(c, e, m, id=i) for i, c, e, m in BAD_INPUT])
def test_bad_input_raises_naming_the_argument(backend, call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_checks_run_before_any_kernel(backend, monkeypatch):
    """A bad call must not reach a kernel: make every op launcher explode, then pass bad input."""
    def boom(*a, **k):
        raise AssertionError("a backend was resolved (a kernel about to run) before the arguments were checked")

    # every op resolves its backend right before launching, after its checks
    monkeypatch.setattr(tsc_kernels.backend, "resolve", boom)
    with pytest.raises(ValueError):
        tsc_kernels.residual_update(Y(), Y(), DT(4))
    with pytest.raises(ValueError):
        tsc_kernels.weight_mean([torch.randn(4, 3)])
    with pytest.raises(ValueError):
        tsc_kernels.lstm_controller(torch.randn(3, 7), *_with(_lstm_params(), 6, torch.randn(5)))


# --------------------------------------------------------------------------------------------------
# Legal but unusual inputs: the reference's answer, forward and backward, on every backend
# --------------------------------------------------------------------------------------------------
def _cl(t):
    """Channel dim innermost in memory, any rank (channels_last for 4-D)."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


NAN, INF = float("nan"), float("inf")
UNUSUAL_RESIDUAL = {
    "empty-batch": lambda: (Y(0, 3, 4, 4), Y(0, 3, 4, 4), DT()),
    "one-channel": lambda: (Y(2, 1, 4, 4), Y(2, 1, 4, 4), DT(1)),
    "spatial-1x1": lambda: (Y(2, 3, 1, 1), Y(2, 3, 1, 1), DT()),
    "no-spatial": lambda: (Y(2, 3), Y(2, 3), DT()),
    "3-spatial-dims": lambda: (Y(1, 3, 2, 3, 2), Y(1, 3, 2, 3, 2), DT()),
    "transposed-spatial": lambda: (Y(2, 3, 5, 4).transpose(2, 3), Y(2, 3, 4, 5), DT()),
    "transposed-batch-channel": lambda: (Y(3, 2, 4, 5).transpose(0, 1), Y(3, 2, 4, 5).transpose(0, 1), DT()),
    "sliced-with-steps": lambda: (Y(4, 6, 8, 8)[::2, ::2, 1::3, ::2], Y(4, 6, 8, 8)[1::2, 1::2, ::3, 1::2], DT()),
    "expanded-y": lambda: (Y(1, 3, 1, 1).expand(2, 3, 4, 4), Y(2, 3, 4, 4), DT()),
    "dt-strided": lambda: (Y(), Y(), torch.rand(6)[::2]),
    "dt-offset": lambda: (Y(), Y(), torch.rand(6)[3:]),
    "channels-last": lambda: (
        Y(2, 5, 3, 4).to(memory_format=torch.channels_last),
        Y(2, 5, 3, 4).to(memory_format=torch.channels_last),
        DT(5),
    ),
    "channels-last-3d": lambda: (_cl(Y(2, 5, 3)), _cl(Y(2, 5, 3)), DT(5)),
    "channels-last-and-contiguous": lambda: (Y(2, 5, 3, 4).to(memory_format=torch.channels_last), Y(2, 5, 3, 4), DT(5)),
    "large-C": lambda: (Y(2, 4099, 1, 2), Y(2, 4099, 1, 2), DT(4099)),
    "large-C-channels-last": lambda: (_cl(Y(2, 4099, 1, 2)), _cl(Y(2, 4099, 1, 2)), DT(4099)),
    # IEEE: NaN + x = NaN, inf - inf = NaN, inf * 0 = NaN, relu(NaN) = NaN (torch.relu keeps NaN)
    "nan-inf-activations": lambda: (
        torch.tensor([NAN, INF, -INF, 1.0, NAN, 0.0, INF]).view(1, 7, 1),
        torch.tensor([1.0, -INF, 1.0, INF, 0.0, NAN, 1.0]).view(1, 7, 1),
        torch.tensor([0.5, 0.5, 0.0, 0.0, 0.5, 0.5, 1.0]),
    ),
    "nan-inf-dt": lambda: (torch.ones(2, 3, 2), torch.ones(2, 3, 2), torch.tensor([NAN, INF, -INF])),
    "nan-inf-half": lambda: (
        torch.tensor([NAN, INF, -INF, 60000.0]).view(1, 4).half(),
        torch.tensor([1.0, -INF, 1.0, 60000.0]).view(1, 4).half(),
        torch.tensor([0.5, 0.5, 0.0, 1.0]),
    ),
}


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("case", UNUSUAL_RESIDUAL)
def test_residual_update_unusual_input(backend, case, relu):
    y0, f0, dt0 = UNUSUAL_RESIDUAL[case]()
    # detach() gives separate leaves that keep the inputs' strides (transposed, sliced, expanded, ...)
    y, f, dt = (t.detach().requires_grad_() for t in (y0, f0, dt0))
    yr, fr, dtr = (t.detach().requires_grad_() for t in (y0, f0, dt0))
    atol, rtol = TOLERANCES[y.dtype]
    out = tsc_kernels.residual_update(y, f, dt, relu=relu)
    ref = reference.residual_update(yr, fr, dtr, relu=relu)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol, equal_nan=True)
    if y0.is_contiguous(memory_format=torch.channels_last) and y0.dim() == 4 and not y0.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last), "channels_last input, channels_last output"
    # the gradient: finite, so every NaN in the result comes from the inputs (IEEE propagation)
    grad = torch.linspace(-1, 1, ref.numel()).view(ref.shape).to(ref.dtype) if ref.numel() else torch.ones_like(ref)
    got = torch.autograd.grad(out, (y, f, dt), grad, allow_unused=True)
    want = torch.autograd.grad(ref, (yr, fr, dtr), grad, allow_unused=True)
    for name, g, w in zip(("dy", "df", "ddt"), got, want):
        scale = max(1.0, y.numel() / max(1, y.shape[1])) if name == "ddt" else 1.0
        torch.testing.assert_close(g, w, atol=atol * scale, rtol=rtol, equal_nan=True, msg=lambda m: f"{name}: {m}")
    if case == "empty-batch":
        assert torch.equal(got[2], torch.zeros(3)), "an empty batch gives ddt = 0 (an empty sum)"


UNUSUAL_WEIGHT_MEAN = {
    "one-input-channel-1x1": lambda: [W(5, 1, 1, 1)],
    "1-kernel-dim": lambda: [W(5, 2, 3)],
    "3-kernel-dims": lambda: [W(5, 2, 3, 2, 2)],
    "zero-output-channels": lambda: [W(0, 3, 3, 3), W(2, 3, 1, 1)],
    "channels-last": lambda: [W(4, 3, 3, 3).to(memory_format=torch.channels_last), W(4, 4, 3, 3)],
    "transposed": lambda: [W(3, 4, 3, 3).transpose(0, 1)],
    "sliced-with-steps": lambda: [W(8, 6, 3, 3)[::2, 1::2]],
    "large-C_out": lambda: [W(4099, 2, 1, 1)],
    "many-weights": lambda: [W(1 + i % 3, 1 + i % 2, 1, 1) for i in range(40)],
    "nan-inf": lambda: [torch.tensor([[NAN, 1.0], [INF, 1.0], [INF, -INF], [INF, INF]]).view(4, 2, 1, 1)],
}


@pytest.mark.parametrize("case", UNUSUAL_WEIGHT_MEAN)
def test_weight_mean_unusual_input(backend, case):
    ws0 = UNUSUAL_WEIGHT_MEAN[case]()
    ws = [w.detach().requires_grad_() for w in ws0]
    wr = [w.detach().clone().requires_grad_() for w in ws0]
    out = tsc_kernels.weight_mean(ws)
    ref = reference.weight_mean(wr)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, equal_nan=True)
    grad = torch.linspace(-1, 1, ref.numel())
    for i, (g, w) in enumerate(zip(torch.autograd.grad(out, ws, grad), torch.autograd.grad(ref, wr, grad))):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5, msg=lambda m: f"dW[{i}]: {m}")


def _noncontiguous_params():
    H, D, C = 3, 7, 5
    p = _lstm_params(D, H, C)
    p[0] = torch.randn(D, H).t()  # (H, D) transposed
    p[2] = torch.randn(H, 4 * H).t()
    p[6] = torch.randn(C, 2 * H)[:, ::2]  # sliced with a step
    p[5] = torch.randn(8 * H)[1::2]
    return torch.randn(7, 4).t(), p  # wbar (4, 7) transposed


def _nan_wbar():
    wbar = torch.randn(3, 7)
    wbar[1, 2] = NAN  # NaN from block 1 on (the recurrence carries it), block 0 finite
    return wbar, _lstm_params()


UNUSUAL_LSTM = {
    "one-block": lambda: (torch.randn(1, 7), _lstm_params()),
    "hidden-1-channels-1": lambda: (torch.randn(3, 7), _lstm_params(7, 1, 1)),
    "D-1": lambda: (torch.randn(3, 1), _lstm_params(1, 3, 5)),
    "noncontiguous": _noncontiguous_params,
    "large-C": lambda: (torch.randn(2, 7), _lstm_params(7, 3, 4099)),
    "fp64": lambda: (torch.randn(3, 7, dtype=torch.float64), _lstm_params(dtype=torch.float64)),
    "inf-wbar": lambda: (torch.tensor([[INF] + [0.0] * 6, [-INF] + [1.0] * 6]), _lstm_params()),
    "nan-wbar": _nan_wbar,
}


@pytest.mark.parametrize("case", UNUSUAL_LSTM)
def test_lstm_controller_unusual_input(backend, case):
    wbar0, p0 = UNUSUAL_LSTM[case]()
    args = [t.detach().requires_grad_() for t in (wbar0, *p0)]
    refs = [t.detach().clone().requires_grad_() for t in (wbar0, *p0)]
    out = tsc_kernels.lstm_controller(*args)
    ref = reference.lstm_controller(*refs)
    atol = 1e-12 if wbar0.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol, equal_nan=True)
    grad = torch.linspace(-1, 1, ref.numel(), dtype=ref.dtype).view(ref.shape)
    names = ("wbar",) + LSTM_PARAM_NAMES
    for n, g, w in zip(names, torch.autograd.grad(out, args, grad), torch.autograd.grad(ref, refs, grad)):
        torch.testing.assert_close(g, w, atol=atol * 10, rtol=atol * 10, equal_nan=True, msg=lambda m: f"d{n}: {m}")


# --------------------------------------------------------------------------------------------------
# channels_last end to end, determinism, memory
# --------------------------------------------------------------------------------------------------
def _tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return models.cifar_resnet(8, **kw)


def _train(model, x, target, steps=2, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
    return loss.detach()


# the Triton interpreter takes ~30 s for one of these: it runs the post-activation model only
@pytest.mark.parametrize("preact", [False, pytest.param(True, marks=pytest.mark.big_for_interpreter)])
def test_channels_last_model_trains_like_contiguous(backend, preact):
    torch.manual_seed(1)
    x, target = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    base = _tiny_model(preact=preact)
    cl = _tiny_model(preact=preact).to(memory_format=torch.channels_last)
    assert cl.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    # every residual update sees channels_last input and must hand back channels_last output
    # (a hidden .contiguous() in the op would flip the layout of the rest of the network)
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append((i[0].is_contiguous(memory_format=torch.channels_last),
                                                                    o.is_contiguous(memory_format=torch.channels_last))))
             for _, _, b in cl.tsc_named_blocks()]
    loss_cl = _train(cl, x.to(memory_format=torch.channels_last), target)
    for h in hooks:
        h.remove()
    assert seen and all(o for _, o in seen), f"block outputs lost channels_last: {seen}"
    loss_base = _train(base, x, target)
    torch.testing.assert_close(loss_cl, loss_base, atol=1e-4, rtol=1e-4)
    for (n, p), q in zip(cl.named_parameters(), base.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4, msg=lambda m: f"{n}: {m}")
        assert p.grad is not None, n


# ops that move or reorder data; a channels-last residual update must run none of them
COPY_OPS = {"aten::copy_", "aten::contiguous", "aten::clone", "aten::_to_copy", "aten::to"}


@pytest.mark.cpu_only
def test_residual_update_channels_last_has_no_hidden_copy():
    """Profile the fused C++ op (forward and backward) on channels-last input: no copy/contiguous op.

    The C++ backend only: the Triton interpreter copies tensors to numpy and back by design, and the
    torch backend is the reference's chain of aten ops (its .to(fp32) of fp32 is a no-op alias).
    """
    if "cpu" not in TEST_BACKENDS:
        pytest.skip("the C++ extension tsc_kernels._C is not built: no fused CPU op to profile")
    y, f = (torch.randn(2, 8, 5, 6).to(memory_format=torch.channels_last).requires_grad_() for _ in range(2))
    dt = torch.rand(8, requires_grad=True)
    grad = torch.randn(2, 8, 5, 6).to(memory_format=torch.channels_last)
    with tsc_kernels.use_backend("cpu"):
        for relu in (False, True):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                out = tsc_kernels.residual_update(y, f, dt, relu=relu)
                dy, df, ddt = torch.autograd.grad(out, (y, f, dt), grad)
            names = {e.name for e in prof.events()}
            assert "tsc::residual_update" in names and "tsc::residual_update_backward" in names, names
            assert not names & COPY_OPS, f"hidden copies: {names & COPY_OPS}"
            for t in (out, dy, df):
                assert t.is_contiguous(memory_format=torch.channels_last) and t.stride() == y.stride()


def test_residual_update_channels_last_strides(backend):
    """On every backend the output and the gradients keep channels_last strides (no silent layout change)."""
    y, f = (torch.randn(3, 6, 4, 5).to(memory_format=torch.channels_last).requires_grad_() for _ in range(2))
    dt = torch.rand(6, requires_grad=True)
    out = tsc_kernels.residual_update(y, f, dt, relu=True)
    dy, df, _ = torch.autograd.grad(out, (y, f, dt), torch.randn(3, 6, 4, 5).to(memory_format=torch.channels_last))
    for name, t in (("out", out), ("dy", dy), ("df", df)):
        assert t.stride() == y.stride(), f"{name} strides {t.stride()} != input's {y.stride()}"


def _dt_grads(model, x, target):
    """Gradients of the loss w.r.t. every stage's Δt (the controller's output), from one step."""
    model.zero_grad()
    dts = model.compute_step_sizes()
    h = model.relu(model.bn1(model.conv1(x)))
    for stage, stage_dt in zip(model.tsc_stages(), dts):
        for block, dt in zip(stage, stage_dt.unbind(0)):
            h = block(h, dt)
    loss = torch.nn.functional.cross_entropy(model.fc(torch.flatten(model.avgpool(h), 1)), target)
    return torch.autograd.grad(loss, dts)


@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_step_is_deterministic(channels_last):
    """Two runs of one CPU training step give bitwise-equal Δt gradients (fixed-order ddt reductions).

    The C++ backend, on a batch big enough that the ddt reduction is split over threads.
    """
    if "cpu" not in TEST_BACKENDS:
        pytest.skip("the C++ extension tsc_kernels._C is not built: no cpu backend to test")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = _tiny_model().to(memory_format=fmt)
    torch.manual_seed(2)
    x, target = torch.randn(16, 3, 16, 16).to(memory_format=fmt), torch.randint(0, 10, (16,))
    with tsc_kernels.use_backend("cpu"):
        first = _dt_grads(model, x, target)
        second = _dt_grads(model, x, target)
        # the op itself, on a large reduction (N * spatial = 32768 per channel)
        y, f = (torch.randn(8, 16, 64, 64).to(memory_format=fmt).requires_grad_() for _ in range(2))
        dt = torch.rand(16, requires_grad=True)
        g = torch.randn(8, 16, 64, 64).to(memory_format=fmt)
        ddts = [torch.autograd.grad(tsc_kernels.residual_update(y, f, dt, relu=True), dt, g)[0] for _ in range(3)]
    for a, b in zip(first, second):
        assert torch.equal(a, b), "Δt gradients differ between two identical steps"
    assert all(torch.equal(ddts[0], d) for d in ddts[1:]), "ddt differs between identical calls"


def _rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE")


RSS_TOLERANCE = 4 * 2**20


def _memory_case(op):
    """The C++ op's forward arguments for the leak test: its gpu-check case (tsc_kernels/gpu_check_cases.py,
    one per op of the registry) at a (4, 16, 8, 8) activation, 4096 values, or, for the controller ops,
    whose cases are whole networks (the tiny one's largest tensor is 0.7-1.5 KB: a leak of it per
    call would stay within RSS_TOLERANCE), weights and a controller whose largest tensors are >= 16 KB."""
    if op == "weight_mean":
        return ([torch.randn(256, 2, 3, 3, requires_grad=True), torch.randn(256, 2, 3, 3, requires_grad=True)],)
    if op == "lstm_controller":
        return (torch.randn(8 * 512, requires_grad=True), [8], [p.requires_grad_() for p in _lstm_params(512, 16, 64)])
    case = gpu_check_cases.case_of(op)
    spec = case.tiny[0]
    if isinstance(spec, str):
        raise AssertionError(f"{op}: its gpu-check case builds a network ({spec!r}); give the leak test inputs "
                             "whose largest tensor is >= 16 KB in _memory_case")
    shape = (4, 16, 8, 8)
    return case.build((shape, spec[1]) if case.extra else shape, torch.float32, False)


@pytest.mark.parametrize("op", sorted(OPS))
def test_cpp_op_memory_is_flat(op):
    """1,000 forward+backward calls of a C++ op: RSS after 1,000 within 4 MB of RSS after 100.

    The inputs make every call allocate a tensor of >= 16 KB (4096 floats; checked below), so leaking
    it on every call would add >= 14 MB over the 900 calls, well above the tolerance.
    """
    if "cpu" not in TEST_BACKENDS:
        pytest.skip("the C++ extension tsc_kernels._C is not built: no C++ op to test")
    args = _memory_case(op)
    leaves = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])
              if isinstance(t, torch.Tensor) and t.requires_grad]
    cpp_op = OPS[op].op()

    def call():
        out = cpp_op(*args)  # the fused ops return their saved state too: the gradient flows from the first output
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        return outs + list(torch.autograd.grad(outs[0], leaves, torch.ones_like(outs[0])))

    largest = max(t.untyped_storage().nbytes() for t in call())
    assert 900 * largest > 3 * RSS_TOLERANCE, (
        f"{op}: the largest tensor a call makes ({largest} B) is too small to see leaking"
    )

    def run(n):
        for _ in range(n):
            call()

    with tsc_kernels.use_backend("cpu"):
        run(100)
        after_100 = _rss_bytes()
        run(900)
        after_1000 = _rss_bytes()
    assert after_1000 - after_100 < RSS_TOLERANCE, f"RSS grew {(after_1000 - after_100) / 2**20:.1f} MB over 900 calls"
