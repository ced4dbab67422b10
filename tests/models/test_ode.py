"""The ODE view (docs/ode.md): ODE blocks' solvers, refine / ode_consistency, step adaptation."""
import math

import pytest
import torch
from torch import nn

import tsc_kernels
from tsc_kernels import ode
from tsc_kernels.models import cifar_resnet


class Linear(nn.Module):
    """dz/dt = lam * z (the TSC paper's Fig. 1 uses lam = -4)."""

    def __init__(self, lam=-4.0):
        super().__init__()
        self.lam = lam

    def forward(self, z):
        return self.lam * z


def hand_written(z, h, steps, solver, f):
    for _ in range(steps):
        if solver == "euler":
            z = z + h * f(z)
        elif solver == "midpoint":
            z = z + h * f(z + h / 2 * f(z))
        else:
            k1 = f(z)
            k2 = f(z + h / 2 * k1)
            k3 = f(z + h / 2 * k2)
            k4 = f(z + h * k3)
            z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return z


@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4"])
def test_solver_matches_hand_written_loop(backend, solver):
    z0 = torch.randn(3, 4, 5, dtype=torch.float64)
    block = ode.ODEBlock(Linear(), solver=solver, step_size=0.1)
    want = hand_written(z0, 0.1, 10, solver, Linear())
    torch.testing.assert_close(block(z0), want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4"])
def test_order_of_convergence(solver):
    """Global error at t1 = 1 of z' = -4z against exp(-4): slope of log(error) vs log(h) is the order."""
    z0 = torch.ones(1, 2, dtype=torch.float64)
    exact = math.exp(-4.0)
    hs = [1 / 16, 1 / 32, 1 / 64]
    errors = [abs(ode.ODEBlock(Linear(), solver, h)(z0)[0, 0].item() - exact) for h in hs]
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(len(hs) - 1)]
    assert all(abs(o - ode.ORDER[solver]) < 0.25 for o in orders), orders


def test_steps_cover_t1():
    block = ode.ODEBlock(Linear(), step_size=0.3, t1=1.0)
    assert block.steps == 4  # h = 0.25 <= 0.3
    assert ode.ODEBlock(Linear(), step_size=0.1).steps == 10


def test_step_size_changes_without_rebuild():
    block = ode.ODEBlock(Linear(), "rk4", step_size=0.5)
    z = torch.ones(1, 3)
    a = block(z)
    block.step_size = 0.05
    b = block(z)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, hand_written(z, 0.05, 20, "rk4", Linear()), atol=1e-6, rtol=1e-6)


def test_gradients_through_the_solver(backend):
    f = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double()
    block = ode.ODEBlock(f, "rk4", step_size=0.5)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))


def small_net(preact, tsc):
    torch.manual_seed(0)
    model = cifar_resnet(8, num_classes=3, preact=preact, tsc=tsc).double().eval()
    for m in model.modules():  # non-trivial BN statistics so that eval differs from identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("preact", [False, True])
@pytest.mark.parametrize("tsc", [None, "lstm"])
def test_refine_one_is_the_model(preact, tsc):
    model = small_net(preact, tsc)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(ode.refine(model, 1)(x), model(x), atol=0, rtol=0)


def manual_substepped(model, x, k):
    """The refined forward written out for a CIFAR ResNet."""
    from tsc_kernels.models.blocks import PLAIN_TO_TSC_BLOCK, is_tsc_block
    x = model.conv1(x)
    if not model.preact:
        x = model.relu(model.bn1(x))
    dts = model.stage_step_sizes() if tsc_kernels.models.network.is_tsc_network(model) else None
    for s, stage in enumerate(model.tsc_stages() if dts is not None else [model.layer1, model.layer2, model.layer3]):
        for d, block in enumerate(stage):
            cls = type(block) if is_tsc_block(block) else PLAIN_TO_TSC_BLOCK[type(block)]
            dt = (
                dts[s][d]
                if dts is not None
                else torch.ones(block.conv1.out_channels if model.preact else block.bn2.num_features, dtype=x.dtype)
            )
            if block.downsample is not None:
                shortcut, fy = cls._branch(block, x)
                x = shortcut + fy * dt.view(1, -1, 1, 1)
                x = torch.relu(x) if cls.post_activation else x
                continue
            for _ in range(k):
                _, fy = cls._branch(block, x)
                x = x + fy * (dt / k).view(1, -1, 1, 1)
                x = torch.relu(x) if cls.post_activation else x
    if model.preact:
        x = model.relu(model.bn_final(x))
    return model.fc(torch.flatten(model.avgpool(x), 1))


@pytest.mark.parametrize("preact", [False, True])
@pytest.mark.parametrize("tsc", [None, "lstm"])
def test_refine_matches_manual_loop(preact, tsc):
    model = small_net(preact, tsc)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        got = ode.refine(model, 3)(x)
        want = manual_substepped(model, x, 3)
        plain = model(x)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    assert not torch.allclose(got, plain)
    torch.testing.assert_close(model(x), plain, atol=0, rtol=0)  # the model is left as it was


def test_refine_shares_parameters():
    model = small_net(False, "lstm")
    refined = ode.refine(model, 4)
    ids = {id(p) for p in model.parameters()}
    assert {id(p) for p in refined.parameters()} == ids


def test_refine_ode_block():
    net = nn.Sequential(ode.ODEBlock(Linear(), "euler", step_size=0.5))
    z = torch.ones(1, 2, dtype=torch.float64)
    torch.testing.assert_close(ode.refine(net, 4)(z), ode.ODEBlock(Linear(), "euler", 0.125)(z))
    assert net[0].step_size == 0.5


def test_ode_consistency_of_ode_net():
    torch.manual_seed(0)
    model = ode.odenet(1, 3, dims=1, widths=(4,), solver="euler", step_size=0.5).double()
    x = torch.randn(6, 1, 10, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    curve = ode.ode_consistency(model, (x, y), factors=(1, 2))
    assert set(curve) == {1, 2} and all(0 <= a <= 1 for a in curve.values())
    assert curve[1] == ode.accuracy(model.eval(), [(x[:3], y[:3]), (x[3:], y[3:])])


def test_odenet_shapes():
    for dims, shape in ((2, (2, 1, 8, 8)), (1, (2, 3, 12))):
        model = ode.odenet(shape[1], 5, dims=dims, widths=(4, 6), solver="midpoint", step_size=0.5)
        assert model(torch.randn(shape)).shape == (2, 5)
        assert len(ode.ode_blocks(model)) == 2


def test_step_adaptation_scripted():
    adapt = ode.StepAdaptation(every=2, threshold=0.1, shrink=0.5, grow=1.1, max_step=1.0)
    net = nn.Sequential(ode.ODEBlock(Linear(), step_size=0.5))
    assert adapt(net, accuracies=(0.9, 0.5)) is None  # iteration 1: no check
    d = adapt(net, accuracies=(0.9, 0.5))
    assert d.action == "shrink" and net[0].step_size == 0.25
    adapt(net, accuracies=(0, 0))
    d = adapt(net, accuracies=(0.9, 0.85))
    assert d.action == "grow" and net[0].step_size == pytest.approx(0.275)
    net[0].step_size = 0.95
    adapt(net, accuracies=(0, 0))
    d = adapt(net, accuracies=(0.5, 0.5))
    assert net[0].step_size == 1.0  # capped at max_step
    assert [h.action for h in adapt.history] == ["shrink", "grow", "grow"]


def test_step_adaptation_measures_accuracies():
    torch.manual_seed(0)
    model = ode.odenet(1, 3, dims=1, widths=(4,), solver="euler", step_size=1.0)
    adapt = ode.StepAdaptation(test_solver="rk4", every=1, threshold=1.0)  # |difference| <= 1: always grows
    d = adapt(model, torch.randn(5, 1, 9), torch.randint(0, 3, (5,)))
    assert d.action == "grow" and model.training
    assert ode.ode_blocks(model)[0].solver == "euler"


@pytest.mark.parametrize("call, error, match", [
    (lambda: ode.ODEBlock(Linear(), solver="heun"), ValueError, "solver must be one of"),
    (lambda: ode.ODEBlock(Linear(), step_size=0.0), ValueError, "step_size must be"),
    (lambda: ode.ODEBlock(Linear(), step_size=-1), ValueError, "step_size must be"),
    (lambda: ode.ODEBlock(Linear(), t1=float("nan")), ValueError, "t1 must be"),
    (lambda: ode.ODEBlock(lambda z: z), TypeError, "f must be a torch.nn.Module"),
    (lambda: ode.StepAdaptation(every=0), ValueError, "every must be >= 1"),
    (lambda: ode.StepAdaptation(shrink=2.0), ValueError, "shrink must be < 1"),
    (lambda: ode.refine(nn.Linear(2, 2), 0), ValueError, "factor must be >= 1"),
    (lambda: ode.refine(nn.Linear(2, 2), 1.5), TypeError, "factor must be an int"),
    (lambda: ode.odenet(1, 3, dims=3), ValueError, "dims must be"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
