"""TSC networks (issue 4): model zoo, convert, fold, diagnostics.

Inputs are tiny (2x3x32x32) because the CPUs are shared; speed is not asserted here.
"""
import copy
import sys
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

import tsc_kernels
from tsc_kernels import _checks, models
from conftest import FUSED_BACKENDS, randomize


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def stage_shapes(plain, stage_names):
    """(L, C, D) per stage read off a plain network's conv shapes, docs/tsc.md: D sums C_out·k1·k2 over
    conv1+conv2 (basic) or conv1+conv3 (bottleneck); C is the block's output channels."""
    shapes = []
    for name in stage_names:
        stage = getattr(plain, name)
        block = stage[0]
        convs = [block.conv1, block.conv3] if hasattr(block, "conv3") else [block.conv1, block.conv2]
        d = sum(c.weight.shape[0] * c.weight.shape[2] * c.weight.shape[3] for c in convs)
        shapes.append((len(stage), convs[-1].out_channels, d))
    return shapes


def controller_size(shapes, mode, r):
    """Controller parameters from docs/tsc.md's layer sizes (nn.Linear / nn.LSTMCell with biases)."""
    total = 0
    for L, C, D in shapes:
        H = max(1, C // r)
        fc = (D * H + H) + (H * C + C)
        total += {"lstm": fc + 2 * (4 * H * H + 4 * H), "2fc": L * fc, "indp": L * C}[mode]
    return total


def force_unit_steps(model):
    """Replace the controller's output by Δt = 1 everywhere (the plain ResNet's step)."""
    def ones(weights):
        return [torch.ones(len(stage), stage[0][-1].shape[0]) for stage in weights]
    model.tsc_controller.forward = ones
    return model


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run thousands of tiny ops; on a shared 2-core machine OpenMP's per-op thread
    handoff made a ResNet-1202 step 15x slower with 2 threads (36 s vs 2 s). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name, added", [("resnet18", 1_830_960), ("resnet34", 1_830_960),
                                         ("resnet50", 2_271_200), ("resnet101", 2_271_200)])
def test_lstm_adds_the_papers_parameter_count(name, added):
    builder = getattr(models, name)
    plain, tsc = builder(tsc=None), builder(tsc="lstm")
    assert type(plain) is ResNet
    assert n_params(plain) == n_params(getattr(torchvision.models, name)())
    assert n_params(tsc) - n_params(plain) == added
    assert n_params(tsc.tsc_controller) == added


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "se_resnet50", "cifar"])
@pytest.mark.parametrize("mode", ["lstm", "2fc", "indp"])
def test_controller_sizes_follow_spec(name, mode):
    if name == "cifar":
        build, stages = (lambda **kw: models.cifar_resnet(164, **kw)), ("layer1", "layer2", "layer3")
    else:
        build, stages = getattr(models, name), ("layer1", "layer2", "layer3", "layer4")
    plain = build(tsc=None)
    shapes = stage_shapes(plain, stages)
    r = 8 if isinstance(plain.layer1[0], (Bottleneck,)) else 4
    assert n_params(build(tsc=mode)) - n_params(plain) == controller_size(shapes, mode, r)
    # an explicit reduction changes H = C // r
    assert n_params(build(tsc=mode, reduction=2)) - n_params(plain) == controller_size(shapes, mode, 2)


def test_resnext50_uses_real_conv1_width():
    """The paper lists +2.27 M for ResNeXt-50 (conv1 width C/4); the real width C/2 gives +2.45 M."""
    plain, tsc = models.resnext50_32x4d(tsc=None), models.resnext50_32x4d()
    added = n_params(tsc) - n_params(plain)
    assert plain.layer1[0].conv1.out_channels == plain.layer1[0].conv3.out_channels // 2
    assert round(added / 1e6, 2) == 2.45
    assert added > n_params(models.resnet50()) - n_params(models.resnet50(tsc=None))


# ---------------------------------------------------------------- architecture and keys
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_state_dict_keys_are_torchvisions_plus_controller(name):
    tv = getattr(torchvision.models, name)()
    tsc = getattr(models, name)()
    keys = list(tsc.state_dict())
    plain_keys = [k for k in keys if not k.startswith("tsc_controller.")]
    assert plain_keys == list(tv.state_dict())
    assert "tsc_controller.stages.0.fc_in.weight" in keys
    assert "tsc_controller.stages.3.lstm.weight_hh" in keys
    assert isinstance(tsc, ResNet) and isinstance(tsc.layer1[0], (BasicBlock, Bottleneck))
    # the plain SE model carries an SE module in every block, under the torchvision block's keys
    se = models.se_resnet50(tsc=None).state_dict()
    assert "layer1.0.se.fc1.weight" in se and "layer1.0.conv3.weight" in se


# ---------------------------------------------------------------- forward and backward
ALL_BUILDERS = {
    "resnet18": models.resnet18, "resnet34": models.resnet34, "resnet50": models.resnet50,
    "resnet101": models.resnet101, "resnext50_32x4d": models.resnext50_32x4d,
    "wide_resnet50_2": models.wide_resnet50_2, "se_resnet50": models.se_resnet50,
    "se_resnet101": models.se_resnet101,
    "cifar20": lambda **kw: models.cifar_resnet(20, **kw),
    "cifar20_preact": lambda **kw: models.cifar_resnet(20, preact=True, **kw),
    "cifar29_bottleneck": lambda **kw: models.cifar_resnet(29, **kw),
    "cifar29_preact_bottleneck": lambda **kw: models.cifar_resnet(29, preact=True, **kw),
}
# the largest models: one tiny forward+backward only (time), lstm mode
LARGE_BUILDERS = {"resnet152": models.resnet152, "resnext101_32x8d": models.resnext101_32x8d}


def forward_backward(model, x=X, train=True):
    model.train(train)
    out = model(x)
    assert out.shape == (x.shape[0], model.fc.out_features) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.arange(x.shape[0]) % model.fc.out_features).backward()
    return out


# lstm on every model; 2fc and indp on resnet18 and the CIFAR nets (CPU time)
FB_CASES = [(n, "lstm") for n in ALL_BUILDERS] + [
    (n, m) for m in ("2fc", "indp") for n in ALL_BUILDERS if n.startswith(("resnet18", "cifar"))]


@pytest.mark.parametrize("name, mode", FB_CASES)
def test_forward_backward(name, mode):
    model = ALL_BUILDERS[name](tsc=mode)
    forward_backward(model)
    # every parameter, controller included, receives a gradient (Δt depends on the conv weights)
    missing = [k for k, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    ctrl = [p.grad.abs().sum() for p in model.tsc_controller.parameters()]
    assert all(g > 0 for g in ctrl)


@pytest.mark.parametrize("name", list(LARGE_BUILDERS))
def test_forward_backward_large(name):
    model = LARGE_BUILDERS[name]()
    forward_backward(model)
    assert model.tsc_controller.stages[0].fc_out.weight.grad is not None


# The Triton interpreter runs kernels in numpy, thousands of times slower than the GPU: it gets the
# small CIFAR networks only (every block kind still covered: basic, pre-activation, bottleneck).
AGREE_CASES = [(n, b) for b in FUSED_BACKENDS
               for n in ("resnet18", "cifar20_preact", "se_resnet50", "cifar29_bottleneck")
               if b != "triton" or n.startswith("cifar")]


@pytest.mark.parametrize("name, backend", AGREE_CASES)
def test_backends_agree_with_torch(name, backend):
    model = randomize(ALL_BUILDERS[name]())
    grads = {}
    outs = {}
    for b in ("torch", backend):
        model.zero_grad()
        # eval mode (running statistics, Δt still differentiable with autograd on): in train mode a
        # 2-sample BatchNorm over 1x1 maps amplifies rounding differences a thousandfold
        with tsc_kernels.use_backend(b):
            outs[b] = forward_backward(model, train=False)
        grads[b] = {k: p.grad.clone() for k, p in model.named_parameters()}
    torch.testing.assert_close(outs[backend], outs["torch"], rtol=1e-5, atol=1e-5)
    for k in grads["torch"]:
        torch.testing.assert_close(grads[backend][k], grads["torch"][k], rtol=1e-4, atol=1e-5, msg=k)


def test_step_sizes_are_the_controllers_and_reach_every_block():
    model = randomize(models.cifar_resnet(20, preact=True)).eval()
    dts = model.tsc_controller(model.controller_inputs())
    got = tsc_kernels.step_sizes(model)
    assert list(got) == [f"layer{s}.{d}" for s in (1, 2, 3) for d in range(3)]
    for (name, dt), want in zip(got.items(), [d for stage in dts for d in stage]):
        torch.testing.assert_close(dt, want)
    # a block ignoring its Δt would leave the output unchanged when the controller changes
    with torch.no_grad():
        before = model(X)
        model.tsc_controller.stages[2].fc_out.bias.add_(1.0)
        after = model(X)
    assert not torch.allclose(before, after)


def test_eval_caches_step_sizes_until_weights_change():
    model = randomize(models.cifar_resnet(8)).eval()
    calls = []
    model.tsc_controller.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        y1 = model(X)
        y2 = model(X)
        assert len(calls) == 1 and torch.equal(y1, y2)
        model.layer2[0].conv1.weight.mul_(2.0)  # an in-place weight change (optimizer-style)
        y3 = model(X)
        assert len(calls) == 2
        model.load_state_dict(randomize(copy.deepcopy(model)).state_dict())
        model(X)
        assert len(calls) == 3
    # the cached Δt gives the output a fresh Δt gives: with autograd on, eval recomputes Δt (so that
    # gradients reach the controller)
    with torch.no_grad():
        cached = model(X)
    assert len(calls) == 3
    torch.testing.assert_close(model(X), cached, rtol=0, atol=0)
    assert len(calls) == 4
    model.train()  # training always recomputes
    model(X)
    assert len(calls) == 5
    assert not torch.equal(y1, y3)


# ---------------------------------------------------------------- convert
@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d"])
def test_convert_keeps_weights_and_unit_steps_reproduce_torchvision(name):
    tv = getattr(torchvision.models, name)(num_classes=10)
    randomize(tv)  # stands in for pretrained weights: loaded before conversion
    tv.load_state_dict(randomize(copy.deepcopy(tv)).state_dict())
    before = {k: v.clone() for k, v in tv.state_dict().items()}
    reference = copy.deepcopy(tv).eval()
    with torch.no_grad():
        want = reference(X)

    converted = tsc_kernels.convert(tv, mode="lstm")
    assert converted is tv and isinstance(tv, ResNet)
    after = tv.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert n_params(tv) - n_params(reference) == n_params(tv.tsc_controller)

    force_unit_steps(tv).eval()
    with torch.no_grad():
        torch.testing.assert_close(tv(X), want, rtol=1e-5, atol=1e-5)
    # and in training mode (batch statistics), output and gradients alike. On the torch backend:
    # with 2 samples the last stage normalises 2 values per channel, an ill-conditioned step whose
    # rounding differences (the fused BatchNorm tail's vs torch's batch_norm) grow far beyond any
    # tolerance; the fused tail is compared with the two-op path in test_batch_norm_tail_models.py
    tv.train(), reference.train()
    with tsc_kernels.use_backend("torch"):
        out, ref = tv(X), reference(X)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(tv.conv1.weight.grad, reference.conv1.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("build", [lambda: models.se_resnet50(tsc=None, num_classes=10),
                                   lambda: models.cifar_resnet(20, preact=True, tsc=None),
                                   lambda: models.cifar_resnet(29, tsc=None)])
def test_convert_tsc_kernels_plain_models(build):
    plain = randomize(build()).eval()
    reference = copy.deepcopy(plain)
    model = force_unit_steps(tsc_kernels.convert(plain, "indp")).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X), reference(X), rtol=1e-5, atol=1e-5)


def test_convert_errors_name_the_module():
    with pytest.raises(TypeError, match="VGG"):
        tsc_kernels.convert(torchvision.models.vgg11())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        tsc_kernels.convert("resnet18")

    class MyBlock(nn.Module):
        def forward(self, x):
            return x

    model = torchvision.models.resnet18()
    model.layer3[1] = MyBlock()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"layer3\.1 .*MyBlock"):
        tsc_kernels.convert(model)
    # a failed conversion leaves the model as it was
    assert type(model) is ResNet and type(model.layer1[0]) is BasicBlock and not hasattr(model, "tsc_controller")
    assert model.state_dict().keys() == state.keys()

    class MyResNet(ResNet):
        pass

    with pytest.raises(TypeError, match="MyResNet"):
        tsc_kernels.convert(MyResNet(BasicBlock, [1, 1, 1, 1]))
    with pytest.raises(ValueError, match="mode must be one of"):
        tsc_kernels.convert(torchvision.models.resnet18(), mode="gru")
    with pytest.raises(ValueError, match="reduction must be >= 1"):
        tsc_kernels.convert(torchvision.models.resnet18(), reduction=0)
    with pytest.raises(ValueError, match="already a TSC network"):
        tsc_kernels.convert(models.resnet18())
    with pytest.raises(ValueError, match="tsc must be one of"):
        models.resnet18(tsc="LSTM")
    with pytest.raises(RuntimeError, match="needs its step sizes"):
        models.resnet18().layer1[0](torch.randn(1, 64, 8, 8))


# ---------------------------------------------------------------- fold
FOLD_CASES = {
    "resnet18": lambda: models.resnet18(num_classes=10),
    "resnext50_32x4d": lambda: models.resnext50_32x4d(num_classes=10),
    "se_resnet50": lambda: models.se_resnet50(num_classes=10),
    "cifar20": lambda: models.cifar_resnet(20),
    "cifar20_preact": lambda: models.cifar_resnet(20, preact=True),
    "cifar29_preact_bottleneck": lambda: models.cifar_resnet(29, preact=True, tsc="2fc"),
    # detection backbones freeze BN: its weight/bias are buffers, folded the same way
    "resnet18_frozen_bn": lambda: tsc_kernels.convert(torchvision.models.resnet18(
        num_classes=10, norm_layer=torchvision.ops.FrozenBatchNorm2d)),
}


@pytest.mark.parametrize("name", list(FOLD_CASES))
def test_fold_is_exact_and_plain(name):
    model = randomize(FOLD_CASES[name]()).eval()
    dt = torch.cat([d for d in tsc_kernels.step_sizes(model).values()])
    assert dt.std() > 0.05  # the test is only meaningful when Δt is far from constant
    with torch.no_grad():
        want = model(X)
    state = copy.deepcopy(model.state_dict())
    folded = fold_and_check_plain(model)
    with torch.no_grad():
        torch.testing.assert_close(folded(X), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # fold copies: the TSC model is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # in train mode (batch statistics) the folded BN/conv scaling is exact too; CIFAR nets only: a
    # 2-sample BatchNorm over the ImageNet nets' 1x1 last maps amplifies rounding a thousandfold
    if not name.startswith("cifar"):
        return
    model.train(), folded.train()
    with torch.no_grad():
        torch.testing.assert_close(folded(X), model(X), rtol=1e-5, atol=1e-5 * want.abs().max().item())


def fold_and_check_plain(model):
    folded = tsc_kernels.fold(model)
    plain_keys = [k for k in model.state_dict() if not k.startswith("tsc_controller.")]
    assert list(folded.state_dict()) == plain_keys
    assert not tsc_kernels.models.is_tsc_network(folded)
    assert not any(models.is_tsc_block(m) for m in folded.modules())
    assert n_params(folded) == n_params(model) - n_params(model.tsc_controller)
    return folded


def test_fold_returns_the_torchvision_model():
    model = randomize(tsc_kernels.convert(torchvision.models.resnet18(num_classes=10))).eval()
    folded = tsc_kernels.fold(model)
    assert type(folded) is ResNet and type(folded.layer1[0]) is BasicBlock
    assert n_params(folded) == n_params(torchvision.models.resnet18(num_classes=10))
    # a fresh torchvision model loads the folded weights and computes the same outputs
    tv = torchvision.models.resnet18(num_classes=10).eval()
    tv.load_state_dict(folded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(tv(X), model(X), rtol=1e-5, atol=1e-5)
    # inplace=True turns the model itself into the plain network
    same = tsc_kernels.fold(model, inplace=True)
    assert same is model and type(model) is ResNet and not hasattr(model, "tsc_controller")
    with torch.no_grad():
        torch.testing.assert_close(model(X), tv(X), rtol=1e-5, atol=1e-5)


def export_targets(model):
    ep = torch.export.export(model.eval(), (X,))
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("build", [lambda: models.cifar_resnet(8), lambda: models.cifar_resnet(8, preact=True),
                                   models.resnet18])
def test_folded_graph_has_no_tsc_op(build):
    model = build()
    assert any("tsc." in t for t in export_targets(model))  # the check can fail: TSC graphs have tsc ops
    assert not any("tsc" in t for t in export_targets(tsc_kernels.fold(model)))


def test_fold_errors():
    with pytest.raises(TypeError, match="fold expects a TSC network.*ResNet"):
        tsc_kernels.fold(torchvision.models.resnet18())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        tsc_kernels.fold(None)
    model = tsc_kernels.convert(torchvision.models.resnet18(norm_layer=lambda c: nn.GroupNorm(1, c)))
    with pytest.raises(TypeError, match=r"layer1\.0\.bn2 \(GroupNorm\)"):
        tsc_kernels.fold(model, inplace=True)
    assert tsc_kernels.models.is_tsc_network(model)  # nothing changed
    model = torchvision.models.resnet18()
    model.layer2[1].bn2 = nn.BatchNorm2d(128, affine=False)
    model = tsc_kernels.convert(model)
    with pytest.raises(ValueError, match=r"layer2\.1\.bn2: the BatchNorm has no affine"):
        tsc_kernels.fold(model)
    se = models.se_resnet50(tsc="indp")
    with torch.no_grad():
        se.tsc_controller.stages[1].theta[2, 5] = -1e4  # sigmoid underflows to exactly 0
    with pytest.raises(ValueError, match=r"SE block layer2\.2"):
        tsc_kernels.fold(se, inplace=True)
    assert tsc_kernels.models.is_tsc_network(se)


# ---------------------------------------------------------------- CIFAR depths
def test_cifar_depth_rule():
    assert [_checks.cifar_depth(d, None) for d in (20, 32, 44, 56, 110, 1202)] == [False] * 6
    assert [_checks.cifar_depth(d, None) for d in (164, 1001, 29)] == [True] * 3
    assert _checks.cifar_depth(56, True) is True  # explicit override
    for bad, override in [(21, None), (2, None), (32, True), (29, False), (0, None)]:
        with pytest.raises(ValueError, match="depth"):
            _checks.cifar_depth(bad, override)
    model = models.cifar_resnet(56, tsc=None)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 56  # 3x3 convs + the classifier = depth
    assert n_params(models.cifar_resnet(110, tsc=None)) == pytest.approx(1.73e6, rel=0.01)  # He et al.: 1.7 M


def test_cifar_resnet_1202_trains():
    t0 = time.perf_counter()
    model = models.cifar_resnet(1202)
    assert len(model.layer1) == 200
    assert n_params(model) - n_params(model.tsc_controller) == pytest.approx(19.4e6, rel=0.01)  # He et al.: 19.4 M
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.tsc_controller.stages[0].fc_out.weight.detach().clone()
    loss = F.cross_entropy(model(X), torch.tensor([0, 1]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(model.tsc_controller.stages[0].fc_out.weight, before)
    print(f"cifar_resnet(1202): build + one training step at batch 2 took {time.perf_counter() - t0:.1f} s")


# ---------------------------------------------------------------- diagnostics
def test_evolution_time_sums_block_means():
    model = randomize(models.resnet18())
    dts = tsc_kernels.step_sizes(model)
    times = tsc_kernels.evolution_time(model)
    assert list(times) == ["layer1", "layer2", "layer3", "layer4"]
    for stage, t in times.items():
        assert t == pytest.approx(sum(float(v.mean()) for k, v in dts.items() if k.startswith(stage + ".")), rel=1e-6)
    # indp starts at Δt = 0.5: a stage of L blocks has evolution time L / 2
    assert tsc_kernels.evolution_time(models.cifar_resnet(20, tsc="indp")) == {
        "layer1": 1.5,
        "layer2": 1.5,
        "layer3": 1.5,
    }


@pytest.mark.parametrize("build", [
    lambda: models.cifar_resnet(20),
    # a small ResNeXt: grouped 3x3 convs
    lambda: tsc_kernels.convert(ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=8)),
])
def test_stability_bound_matches_svd(build):
    model = randomize(build())
    dts = tsc_kernels.step_sizes(model)
    want = 1.0
    for name, _, block in model.tsc_named_blocks():
        for conv in block.branch_convs():
            w = conv.weight.detach().double()
            g = conv.groups
            # the (C_out, C_in·k·k) matrix of a grouped conv is block diagonal over the groups
            dense = torch.block_diag(*w.reshape(g, w.shape[0] // g, -1).unbind(0))
            want *= 1 + torch.linalg.matrix_norm(dense, ord=2).item() * dts[name].double().mean().item()
    # power iteration converges slowly on random (Kaiming) weights: 1000 steps reach ~1e-5 per conv
    assert tsc_kernels.stability_bound(model, iterations=1000) == pytest.approx(want, rel=5e-4)
    assert tsc_kernels.stability_bound(model) <= want * (1 + 1e-9)  # power iteration never overshoots


def test_diagnostics_reject_plain_models():
    for fn in (tsc_kernels.step_sizes, tsc_kernels.evolution_time, tsc_kernels.stability_bound):
        with pytest.raises(TypeError, match="needs a TSC network"):
            fn(torchvision.models.resnet18())


def test_plot_step_sizes(tmp_path):
    pytest.importorskip("matplotlib")  # optional dependency (installed in the dev environment)
    model = models.cifar_resnet(20)
    fig = tsc_kernels.plot_step_sizes(model, tmp_path / "dt.png")
    assert (tmp_path / "dt.png").stat().st_size > 1000
    assert len(fig.axes[0].lines[0].get_xdata()) == 9


def test_plot_step_sizes_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import of it now raises ImportError
    with pytest.raises(ImportError, match="plot_step_sizes needs matplotlib"):
        tsc_kernels.plot_step_sizes(models.cifar_resnet(8))
