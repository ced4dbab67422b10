"""Launch plans of the LSTM controller (issue 22) on both GPU backends, at the controllers of ResNet-50,
ResNet-152 and CIFAR ResNet-1202 (meta tensors: no memory, no GPU), and the CUDA launcher's plan run
on CPU tensors against the C++ kernels.

The rules are docs/gpu.md's (tests/tooling/test_launch_plans.py checks every op over its table). The one
exception, named here with its reason: RECURRENT_CELL kernels run the LSTM recurrence over the blocks
of a stage, which is sequential (block d needs h_{d-1} and c_{d-1}), so their chain is the number of
blocks of the longest stage (200 at CIFAR-1202) and cannot be cut. Only the recurrent cell sits in
those launches: every product that does not depend on the recurrence (fc_in, the input half of the
gates, fc_out and their gradients) runs in the products launches, which follow every rule.
"""
import os

import pytest
import torch

from tsc_kernels import _extension, _launch_plan, models

# The recurrence's launches (CUDA: forward cell, BPTT; Triton: the same two): the sequential
# exception to the chain rule, and nothing else may sit in them.
RECURRENT_CELL = {"lstm_controller_recurrent_kernel", "lstm_controller_bptt_kernel",
                  "lstm_controller_cell_fwd_kernel", "lstm_controller_cell_bwd_kernel"}
SMS = 132
MB8 = 8 * 2**20

# (builder, blocks per stage): the blocks are the networks' (torchvision ResNet-50/152, CIFAR ResNet-1202);
# D, H, C come from the built controllers.
CONTROLLERS = {
    "resnet50": (models.resnet50, [3, 4, 6, 3]),
    "resnet152": (models.resnet152, [3, 8, 36, 3]),
    "cifar_resnet1202": (lambda: models.cifar_resnet(1202), [200, 200, 200]),
}


def _backends():
    out = []
    if _extension.has_cpp_ops() and hasattr(torch.ops.tsc, "cuda_launch_plan"):
        out.append("cuda")
    try:
        import triton  # noqa: F401
        out.append("triton")
    except ImportError:
        pass
    return out


BACKENDS = _backends()


def controller_args(name):
    """lstm_controller's forward arguments for the network's controllers, on the meta device."""
    builder, blocks = CONTROLLERS[name]
    with torch.device("meta"):
        model = builder()
    stages = list(model.tsc_controller.stages)
    assert len(stages) == len(blocks)
    params = [p.detach() for c in stages for p in c.lstm_params()]
    wbar = torch.empty(sum(L * c.in_features for L, c in zip(blocks, stages)), device="meta")
    return wbar, blocks, params


@pytest.fixture(scope="module", params=list(CONTROLLERS))
def controller(request):
    return request.param, controller_args(request.param)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rules_hold_with_the_recurrent_cell_exception(controller, backend):
    name, (wbar, blocks, params) = controller
    plan = _launch_plan.launch_plan("lstm_controller", wbar, blocks, params, backend=backend, sms=SMS)
    assert {l["phase"] for l in plan} == {"forward", "backward"}
    for l in plan:
        where = f"{name} {backend} {l['phase']} {l['kernel']}"
        gx, gy, gz = l["grid"]
        assert 0 < gx < 2**31 and 0 < gy <= 65535 and 0 < gz <= 65535, where
        assert l["smem"] <= 48 * 1024, where
        if l["bytes"] >= MB8:
            assert gx * gy * gz >= 2 * SMS, where
            assert l["request_bytes"] >= 128, where
        if l["kernel"] in RECURRENT_CELL:
            assert l["chain"] == max(blocks), where  # the exception: sequential over the blocks
        else:
            assert l["chain"] <= 64, where


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_few_launches_per_phase_not_per_stage(controller, backend):
    name, (wbar, blocks, params) = controller
    plan = _launch_plan.launch_plan("lstm_controller", wbar, blocks, params, backend=backend, sms=SMS)
    for phase in ("forward", "backward"):
        launches = [l for l in plan if l["phase"] == phase]
        # fc_in / gates / cell / fc_out; fc_out's gradients / BPTT / dx and LSTM weights / fc_in's
        assert len(launches) == 4, (name, backend, phase, [l["kernel"] for l in launches])
        assert sum(l["kernel"] in RECURRENT_CELL for l in launches) == 1


def widened(wbar, blocks, params, k):
    """The same controllers with fc_in's input (D) and fc_out's output (C) k times as wide."""
    out = []
    for s in range(len(blocks)):
        w_in, b_in, w_ih, w_hh, b_ih, b_hh, w_out, b_out = params[8 * s: 8 * s + 8]
        H, D = w_in.shape
        C = w_out.shape[0]
        out += [
            w_in.new_empty(H, k * D),
            b_in,
            w_ih,
            w_hh,
            b_ih,
            b_hh,
            w_out.new_empty(k * C, H),
            b_out.new_empty(k * C),
        ]
    return wbar.new_empty(k * wbar.numel()), blocks, out


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_cell_sits_in_the_recurrent_launches(controller, backend):
    # fc_in and fc_out are not in the recurrent launches: widening them (D, C x 3) changes the
    # products launches only. At the ResNets (where the cell's state is small) the recurrent
    # launches also move less than W_hh and W_ih together: W_ih's product is the products' too.
    name, args = controller
    plan = _launch_plan.launch_plan("lstm_controller", *args, backend=backend, sms=SMS)
    wide = _launch_plan.launch_plan("lstm_controller", *widened(*args, 3), backend=backend, sms=SMS)
    assert [l["kernel"] for l in plan] == [l["kernel"] for l in wide]
    for l, w in zip(plan, wide):
        if l["kernel"] in RECURRENT_CELL:
            assert l == w, (name, backend)
    def products(p):
        return sum(l["bytes"] for l in p if l["kernel"] not in RECURRENT_CELL)
    assert products(wide) > products(plan)
    if name.startswith("resnet"):
        params = args[2]
        lstm_weights = sum(p.numel() * p.element_size() for i, p in enumerate(params) if i % 8 in (2, 3))
        for l in plan:
            if l["kernel"] in RECURRENT_CELL:
                assert l["bytes"] < lstm_weights, (name, backend, l)


@pytest.mark.skipif("cuda" not in BACKENDS, reason="the C++ extension (tsc::cuda_launch_plan) is not built")
def test_cuda_plan_names_the_launchers_kernels():
    wbar, blocks, params = controller_args("resnet50")
    plan = _launch_plan.launch_plan("lstm_controller", wbar, blocks, params, backend="cuda")
    source = open(os.path.join(os.path.dirname(__file__), "..", "..", "csrc", "lstm_controller_cuda.cu")).read()
    for kernel in {l["kernel"] for l in plan}:
        assert f" {kernel}(" in source, kernel


# ---------------------------------------------------------------------------------------------
# The CUDA launcher's plan executed on CPU tensors (tsc::_lstm_controller_cuda_plan_on_cpu: the
# same steps, jobs, offsets and element functions) against the C++ CPU kernels.
# ---------------------------------------------------------------------------------------------
# (L, D, C, H): blocks 3, 5, 2 with feature sizes 7 and 13 (not powers of two), a stage of one block
# (no recurrence) and one of none (gradients are sums over zero blocks).
ODD_STAGES = [(3, 13, 7, 13), (5, 7, 13, 7), (2, 13, 13, 17), (1, 7, 5, 3), (0, 7, 4, 2)]


def make_args(stages, dtype):
    params = []
    for _, D, C, H in stages:
        fc_in, lstm, fc_out = torch.nn.Linear(D, H), torch.nn.LSTMCell(H, H), torch.nn.Linear(H, C)
        for p in (
            fc_in.weight,
            fc_in.bias,
            lstm.weight_ih,
            lstm.weight_hh,
            lstm.bias_ih,
            lstm.bias_hh,
            fc_out.weight,
            fc_out.bias,
        ):
            params.append((2.0 * p.detach()).to(dtype))  # off the linear regions; the ReLU masks some units
    wbar = torch.randn(sum(L * D for L, D, _, _ in stages), dtype=dtype)
    return wbar, [L for L, _, _, _ in stages], params


@pytest.mark.skipif(not _extension.has_kernel("lstm_controller", "CPU"), reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_plan_on_cpu_matches_the_cpu_kernels(dtype):
    torch.manual_seed(0)
    wbar, blocks, params = make_args(ODD_STAGES, dtype)
    dt, saved = torch.ops.tsc.lstm_controller(wbar, blocks, params)
    grad = torch.randn_like(dt)
    want = torch.ops.tsc.lstm_controller_backward(grad, dt, wbar, blocks, params, saved)
    got_dt, got_saved, got_dwbar, got_grads = torch.ops.tsc._lstm_controller_cuda_plan_on_cpu(
        wbar, blocks, params, grad
    )
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-12, 1e-12)
    torch.testing.assert_close(got_dt, dt, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_saved, saved, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_dwbar, want[0], atol=atol, rtol=rtol)
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
    for k, (g, w) in enumerate(zip(got_grads, want[1])):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"stage {k // 8} {names[k % 8]}: {m}")
