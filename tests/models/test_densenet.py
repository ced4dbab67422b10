"""TSC-DenseNet (docs/densenet.md): CIFAR DenseNets, torchvision DenseNet convert, fold, parameter counts.

Inputs are tiny (CIFAR 2x3x32x32, torchvision 1x3x64x64) because the CPUs are shared.
"""
import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.densenet import DenseNet

import tsc_kernels
from tsc_kernels import models
from conftest import randomize
from tsc_kernels.models.densenet import CIFARDenseNet, TSCBottleneckDenseLayer, TSCDenseLayer
from conftest import FUSED_BACKENDS


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def controller_params(D, C, H):
    """TSC_LSTM of one dense block: fc_in (D->H), LSTMCell(H, H), fc_out (H->C), all with biases."""
    return (D * H + H) + 2 * (4 * H * H + 4 * H) + (H * C + C)


def test_densenet40_parameter_counts():
    """The paper's DenseNet-40 (k = 12): 1.02 M parameters; TSC_LSTM adds 3 x 471 (D = 9k = 108, H = 3)."""
    plain = models.cifar_densenet(40, 12, tsc=None)
    tsc = models.cifar_densenet(40, 12)
    assert n_params(plain) == 1_019_722
    assert controller_params(108, 12, 3) == 471
    assert n_params(tsc) - n_params(plain) == 3 * 471 == 1413
    assert [len(b) for n, b in plain.features.named_children() if n.startswith("denseblock")] == [12, 12, 12]


def test_densenet_bc_parameter_counts():
    """DenseNet-BC-100 (k = 12): 0.77 M (Huang et al.: 0.8 M); controllers read conv1 (4k) + conv2 (9k)."""
    plain = models.cifar_densenet(100, 12, bc=True, tsc=None)
    tsc = models.cifar_densenet(100, 12, bc=True)
    assert n_params(plain) == 769_162
    assert n_params(tsc) - n_params(plain) == 3 * controller_params(13 * 12, 12, 3)
    assert all(type(layer) is TSCBottleneckDenseLayer for _, _, layer in tsc.tsc_named_blocks())


@pytest.mark.parametrize("name, k, blocks", [("densenet121", 32, 4), ("densenet161", 48, 4)])
def test_torchvision_densenet_parameter_counts(name, k, blocks):
    plain = getattr(torchvision.models, name)(weights=None)
    tsc = tsc_kernels.convert(copy.deepcopy(plain))
    per_block = controller_params(13 * k, k, k // 4)
    assert n_params(tsc) - n_params(plain) == blocks * per_block
    assert set(tsc.state_dict()) == set(plain.state_dict()) | {
        k for k in tsc.state_dict() if k.startswith("tsc_controller.")
    }
    assert tsc.stage_names == tuple(f"features.denseblock{i}" for i in range(1, 5))


def test_state_dict_keys_unchanged():
    plain = models.cifar_densenet(16, 4, tsc=None)
    tsc = tsc_kernels.convert(copy.deepcopy(plain))
    extra = set(tsc.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("tsc_controller.stages.") for k in extra)
    assert set(plain.state_dict()) <= set(tsc.state_dict())
    tsc.load_state_dict(models.cifar_densenet(16, 4).state_dict())  # interchangeable


def test_step_sizes_of_one_are_the_plain_network():
    """With Δt = 1 (indp, θ = 100: sigmoid rounds to 1) the TSC network is the plain one: the forward
    reproduces torchvision's _DenseBlock semantics exactly."""
    plain = randomize(models.cifar_densenet(16, 5, tsc=None)).eval()
    tsc = tsc_kernels.convert(copy.deepcopy(plain), mode="indp").eval()
    with torch.no_grad():
        for stage in tsc.tsc_controller.stages:
            stage.theta.fill_(100.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tsc(x), plain(x), rtol=0, atol=0)


def test_new_features_are_scaled_by_dt():
    """Each layer appends F(x) ⊗ Δt: check a TSC dense block layer by layer against the plain layers."""
    tsc = randomize(models.cifar_densenet(16, 5)).eval()
    dts = tsc_kernels.step_sizes(tsc)
    block = tsc.features.denseblock2
    x = torch.randn(2, block.denselayer1.norm1.num_features, 8, 8)
    with torch.no_grad():
        want = x
        for name, layer in block.items():
            new = TSCDenseLayer.plain_class.forward(layer, want)
            want = torch.cat([want, new * dts[f"features.denseblock2.{name}"].view(1, -1, 1, 1)], 1)
            x = layer(x, dts[f"features.denseblock2.{name}"])
        torch.testing.assert_close(x, want)


@pytest.mark.parametrize("build, shape", [
    (lambda: models.cifar_densenet(40, 12, tsc=None), (2, 3, 32, 32)),
    (lambda: models.cifar_densenet(28, 6, bc=True, tsc=None, drop_rate=0.2), (2, 3, 32, 32)),
    (lambda: torchvision.models.densenet121(weights=None), (1, 3, 64, 64)),
])
def test_fold_is_exact_and_plain(build, shape):
    plain = build()
    tsc = randomize(tsc_kernels.convert(copy.deepcopy(plain))).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        want = tsc(x)
        folded = tsc_kernels.fold(tsc)
        got = folded(x)
    assert type(folded) is type(plain) and not tsc_kernels.models.is_tsc_network(folded)
    assert set(folded.state_dict()) == set(plain.state_dict())
    assert n_params(folded) == n_params(plain)
    assert all(type(m) in (torchvision.models.densenet._DenseLayer, models.DenseLayer)
               for n, m in folded.named_modules() if "denselayer" in n and n.count(".") == 2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, plain.eval()(x), rtol=1e-3, atol=1e-3), "Δt must matter"


def test_memory_efficient_torchvision_layers():
    """torchvision's checkpointed layers (memory_efficient=True) run the same math."""
    plain = torchvision.models.DenseNet(8, (2, 2), 16, memory_efficient=True)
    tsc = tsc_kernels.convert(copy.deepcopy(plain))
    ref = tsc_kernels.convert(torchvision.models.DenseNet(8, (2, 2), 16))
    ref.load_state_dict(tsc.state_dict())
    x = torch.randn(2, 3, 32, 32)
    tsc(x).sum().backward()
    ref(x).sum().backward()
    for (n, p), q in zip(tsc.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.big_for_interpreter  # a whole DenseNet step; the op itself is checked in test_scale_concat
def test_backends_agree_on_a_training_step(backend):
    # fp64: an fp32 DenseNet-40 step at batch 2 is too ill-conditioned for a tight comparison of the
    # controller's gradients (they differ by rounding alone); in fp64 the backends agree to ~1e-10
    torch.manual_seed(0)
    base = randomize(models.cifar_densenet(40, 12)).double()
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 7])
    results = {}
    for b in ("torch", backend):
        model = copy.deepcopy(base).train()
        with tsc_kernels.use_backend(b):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
        results[b] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(results[backend][0], results["torch"][0], rtol=1e-9, atol=1e-9)
    for n, g in results["torch"][1].items():
        assert g is not None, n
        torch.testing.assert_close(results[backend][1][n], g, rtol=1e-7, atol=1e-9, msg=n)


def test_diagnostics_work():
    model = models.cifar_densenet(16, 4)
    dts = tsc_kernels.step_sizes(model)
    assert list(dts) == [f"features.denseblock{b}.denselayer{i}" for b in (1, 2, 3) for i in (1, 2, 3, 4)]
    assert all(dt.shape == (4,) and bool(((dt > 0) & (dt < 1)).all()) for dt in dts.values())
    times = tsc_kernels.evolution_time(model)
    assert list(times) == ["features.denseblock1", "features.denseblock2", "features.denseblock3"]
    assert tsc_kernels.stability_bound(model, iterations=5) > 1.0


def test_compile_fullgraph():
    torch._dynamo.reset()
    model = models.cifar_densenet(10, 3).eval()
    x = torch.randn(1, 3, 16, 16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="depth must be 3n\\+4"):
        models.cifar_densenet(41)
    with pytest.raises(ValueError, match="depth must be 6n\\+4"):
        models.cifar_densenet(42, bc=True)
    with pytest.raises(ValueError, match="drop_rate"):
        models.cifar_densenet(10, drop_rate=1.5)
    model = models.cifar_densenet(10, 3)
    with pytest.raises(ValueError, match="already a TSC network"):
        tsc_kernels.convert(model)
    with pytest.raises(RuntimeError, match="needs its step sizes"):
        model.features.denseblock1.denselayer1(torch.randn(1, 16, 4, 4))
    odd = models.cifar_densenet(10, 3, tsc=None)
    odd.features.denseblock2.denselayer1 = nn.Conv2d(1, 1, 1)
    with pytest.raises(TypeError, match="cannot handle dense layer features.denseblock2.denselayer1"):
        tsc_kernels.convert(odd)
    assert type(odd) is CIFARDenseNet  # untouched by the failed conversion
    assert isinstance(torchvision.models.densenet121(weights=None), DenseNet)
