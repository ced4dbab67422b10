"""timm's ResNet family (issue 12): convert, fold, drop-path, attention, anti-aliasing (docs/timm.md).

Inputs are small (2x3x64x64, batch 4-8 where train-mode statistics need it) because the CPUs are
shared; speed is not asserted here.
"""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

timm = pytest.importorskip("timm", reason="timm is an optional dependency (pip install 'tsc-kernels[timm]')")

import tsc_kernels  # noqa: E402
from conftest import FUSED_BACKENDS  # noqa: E402
from conftest import randomize  # noqa: E402
from test_models import n_params  # noqa: E402
from timm.models.resnet import BasicBlock, ResNet  # noqa: E402

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Thousands of tiny ops: one thread is faster on the shared 2-core machine (see test_models.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def create(name, freeze_bn=False, **kwargs):
    kwargs.setdefault("num_classes", 10)
    model = timm.create_model(name, pretrained=False, **kwargs)
    if freeze_bn:  # timm's fine-tuning helper: BatchNorm2d -> FrozenBatchNorm2d (weight, bias are buffers)
        model = timm.layers.freeze_batch_norm_2d(randomize(model))
    return model


# (timm model name, create_model kwargs): every feature the conversion must honour
CASES = {
    "resnet50_drop_path": ("resnet50", dict(drop_path_rate=0.1)),
    "resnet18": ("resnet18", {}),
    "resnext50_32x4d": ("resnext50_32x4d", {}),
    "seresnet50": ("seresnet50", {}),  # timm SEModule after bn3
    "wide_resnet50_2": ("wide_resnet50_2", {}),
    "resnet50d": ("resnet50d", {}),  # deep stem, average-pool downsample
    "resnetblur18": ("resnetblur18", {}),  # aa_layer=BlurPool2d
    "resnet18_aa_avgpool": ("resnet18", dict(aa_layer=nn.AvgPool2d)),
    "resnet18_drop_block": ("resnet18", dict(drop_block_rate=0.2, drop_path_rate=0.2)),
    "resnet18_silu": ("resnet18", dict(act_layer="silu")),  # final activation is not a ReLU
    "resnet18_ese": ("resnet18", dict(block_args=dict(attn_layer="ese"))),  # EffectiveSEModule
    "resnet18_frozen_bn": ("resnet18", dict(freeze_bn=True)),
    "test_resnet": ("test_resnet", {}),  # timm's tiny test net: basic and bottleneck stages mixed
}


def plain_keys(model):
    return [k for k in model.state_dict() if not k.startswith("tsc_controller.")]


# ---------------------------------------------------------------- convert
@pytest.mark.parametrize("case", list(CASES))
def test_convert_keeps_weights_and_fold_gives_back_timm(case):
    name, kwargs = CASES[case]
    plain = randomize(create(name, **kwargs))  # stands in for pretrained weights
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    block_types = [type(b) for s in ("layer1", "layer2", "layer3", "layer4") for b in getattr(plain, s)]

    model = tsc_kernels.convert(plain)
    assert model is plain and isinstance(model, ResNet) and tsc_kernels.models.is_tsc_network(model)
    after = model.state_dict()
    assert plain_keys(model) == list(before)
    assert all(k.startswith("tsc_controller.") for k in list(after)[len(before):])
    for k, v in before.items():
        assert torch.equal(after[k], v), k

    randomize(model).eval()
    dt = torch.cat(list(tsc_kernels.step_sizes(model).values()))
    assert dt.std() > 0.05  # Δt far from constant, or the comparison below could not fail
    with torch.no_grad():
        want = model(X)
    folded = tsc_kernels.fold(model)
    assert type(folded) is ResNet and not hasattr(folded, "tsc_controller")
    assert [type(b) for s in ("layer1", "layer2", "layer3", "layer4") for b in getattr(folded, s)] == block_types
    assert list(folded.state_dict()) == list(before)
    # a fresh timm model loads the folded weights and computes the TSC model's outputs
    fresh = create(name, **kwargs).eval()
    fresh.load_state_dict(folded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        # timm's feature API goes through the controller too
        feats = model.forward_features(X)
        torch.testing.assert_close(fresh.forward_features(X), feats, rtol=1e-5, atol=1e-5 * feats.abs().max().item())


def test_lstm_parameter_count_equals_torchvisions():
    """TSC_LSTM on timm's ResNet-50 adds what it adds to torchvision's: +2,271,200 (paper: +2.27 M)."""
    import torchvision

    added = {}
    for lib, plain in (("timm", create("resnet50", num_classes=1000)), ("torchvision", torchvision.models.resnet50())):
        count = n_params(plain)
        added[lib] = n_params(tsc_kernels.convert(plain)) - count
    assert added == {"timm": 2_271_200, "torchvision": 2_271_200}


def test_controller_runs_once_per_forward_and_reaches_every_block():
    model = randomize(tsc_kernels.convert(create("resnet18")))
    calls = []
    model.tsc_controller.register_forward_hook(lambda *a: calls.append(1))
    for fn in (model, model.forward_features, lambda x: model.forward_intermediates(x)[0]):
        calls.clear()
        fn(X)
        assert len(calls) == 1
    # forward_intermediates: the stem and every stage, as timm's
    model.eval()
    folded = tsc_kernels.fold(model)
    with torch.no_grad():
        got = model.forward_intermediates(X, indices=[0, 2, 4], stop_early=True, intermediates_only=True)
        want = folded.forward_intermediates(X, indices=[0, 2, 4], stop_early=True, intermediates_only=True)
    assert [g.shape for g in got] == [w.shape for w in want] and len(got) == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # a block ignoring its Δt would leave the output unchanged when the controller changes
    with torch.no_grad():
        before = model(X)
        model.tsc_controller.stages[3].fc_out.bias.add_(1.0)
        assert not torch.allclose(model(X), before)


# ---------------------------------------------------------------- drop-path, drop-block: training mode
def test_drop_path_masks_f_times_dt_per_sample():
    """out = relu(shortcut + drop_path(F ⊗ Δt)): a per-sample 0 or 1/keep factor, timm's mask."""
    model = tsc_kernels.convert(create("resnet50", drop_path_rate=1.0))  # last block: drop_prob 1 * 15/15
    block = randomize(model).layer3[1].train()
    keep = 1 - block.drop_path.drop_prob
    assert 0.4 < keep < 0.8
    x = torch.randn(8, block.conv1.in_channels, 6, 6)
    dt = torch.rand(block.conv3.out_channels) * 0.9 + 0.05
    torch.manual_seed(123)
    got = block(x, dt)

    # manually: F with the block's layers (train-mode BN: batch statistics), timm's mask from the same seed
    torch.manual_seed(123)
    f = block.act1(block.bn1(block.conv1(x)))
    f = block.act2(block.bn2(block.conv2(f)))
    f = block.bn3(block.conv3(f))
    mask = x.new_empty(8, 1, 1, 1).bernoulli_(keep) / keep
    want = torch.relu(x + f * dt.view(1, -1, 1, 1) * mask)
    assert 0 < int((mask == 0).sum()) < 8  # both dropped and kept samples: the mask is per sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dropped = mask.view(-1) == 0
    torch.testing.assert_close(got[dropped], torch.relu(x[dropped]), rtol=0, atol=0)

    # eval: no drop
    block.eval()
    with torch.no_grad():
        want = torch.relu(x + block.bn3(block.conv3(block.act2(block.bn2(block.conv2(
            block.act1(block.bn1(block.conv1(x)))))))) * dt.view(1, -1, 1, 1))
        torch.testing.assert_close(block(x, dt), want, rtol=1e-5, atol=1e-5)


def test_training_mode_matches_the_folded_timm_model():
    """Train mode (batch statistics, drop-path and drop-block drawing from the same seed): the TSC
    model and its folded timm model compute the same output, so each random mask falls where timm's
    falls and multiplies what timm's multiplies."""
    model = randomize(tsc_kernels.convert(create("resnet18", drop_path_rate=0.5, drop_block_rate=0.3)))
    folded = tsc_kernels.fold(model)
    x = torch.randn(8, 3, 64, 64)
    model.train(), folded.train()
    outs = []
    for m in (model, folded):
        torch.manual_seed(7)
        with torch.no_grad():
            outs.append(m(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4 * outs[1].abs().max().item())
    torch.manual_seed(8)
    with torch.no_grad():
        other = folded(x)
    assert not torch.allclose(other, outs[1])  # the masks matter: another seed gives another output


# ---------------------------------------------------------------- backends, compile, checkpointing
def train_step(model, x, backend):
    model.zero_grad()
    with tsc_kernels.use_backend(backend):  # backward inside too: checkpointed blocks rerun in it
        loss = F.cross_entropy(model(x), torch.arange(x.shape[0]) % 10)
        loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


# The Triton interpreter is far too slow for a ResNet forward: the fused C++ backend only. In train
# mode a batch-4 BatchNorm over layer4's 2x2 maps amplifies fp32 rounding (relative gradient
# differences up to ~2e-2 in SE-ResNet-50's deep layers), so the tight comparison runs in fp64.
@pytest.mark.parametrize("backend", [b for b in FUSED_BACKENDS if b != "triton"])
@pytest.mark.parametrize("name, dtype, tol", [("resnet18", torch.float32, 1e-3), ("resnet18", torch.float64, 1e-10),
                                              ("seresnet50", torch.float64, 1e-10)])
def test_backends_agree_on_a_training_step(name, dtype, tol, backend):
    model = randomize(tsc_kernels.convert(create(name))).train().to(dtype)
    x = torch.randn(4, 3, 64, 64, dtype=dtype)
    ref_loss, ref_grads = train_step(copy.deepcopy(model), x, "torch")
    loss, grads = train_step(model, x, backend)
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    assert grads.keys() == ref_grads.keys() and any(k.startswith("tsc_controller.") for k in grads)
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=tol, atol=tol * g.abs().max().item(), msg=k)


def test_torch_compile_fullgraph():
    """fullgraph=True: no graph break in the controller, the blocks or timm's forward_features/head.
    aot_eager traces forward and backward as inductor would, without minutes of C++ codegen."""
    torch._dynamo.reset()
    model = randomize(tsc_kernels.convert(create("test_resnet", drop_path_rate=0.2))).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    out = compiled(X)
    out.square().sum().backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    torch.manual_seed(3)
    want = model(X)
    want.square().sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-5, msg=k)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(X), model(X), rtol=1e-5, atol=1e-5)


def test_grad_checkpointing_gives_the_same_gradients():
    model = randomize(tsc_kernels.convert(create("resnet18")))
    want_loss, want = train_step(model, X, "torch")
    model.set_grad_checkpointing(True)
    loss, got = train_step(model, X, "torch")
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


# ---------------------------------------------------------------- errors, optional import
def test_unsupported_timm_models_are_named():
    with pytest.raises(TypeError, match=r"timm\.models\.vision_transformer\.VisionTransformer"):
        tsc_kernels.convert(create("test_vit"))
    model = create("skresnet18")  # timm's ResNet class with selective-kernel blocks
    with pytest.raises(TypeError, match=r"layer1\.0 \(timm\.models\.sknet\.SelectiveKernelBasic\)"):
        tsc_kernels.convert(model)
    assert type(model) is ResNet and not hasattr(model, "tsc_controller")  # untouched

    class MyResNet(ResNet):
        pass

    with pytest.raises(TypeError, match="MyResNet"):
        tsc_kernels.convert(MyResNet(BasicBlock, (1, 1, 1, 1)))
    with pytest.raises(TypeError, match="prune_intermediate_layers"):
        tsc_kernels.convert(create("resnet18")).prune_intermediate_layers(2)
    with pytest.raises(RuntimeError, match="needs its step sizes"):
        tsc_kernels.convert(create("resnet18")).layer1[0](torch.randn(1, 64, 8, 8))


def test_fold_names_attention_it_cannot_fold():
    """ECA's 1-D conv mixes neighbouring channels' means: a per-channel Δt cannot be undone in it.
    Convert and training support it; fold raises and leaves the model as it was."""
    model = randomize(tsc_kernels.convert(create("resnet18", block_args=dict(attn_layer="eca")))).eval()
    with torch.no_grad():
        out = model(X)
    assert torch.isfinite(out).all()
    with pytest.raises(TypeError, match=r"layer1\.0\.se \(timm\.layers\.eca\.EcaModule\)"):
        tsc_kernels.fold(model, inplace=True)
    assert tsc_kernels.models.is_tsc_network(model)
    with torch.no_grad():
        torch.testing.assert_close(model(X), out, rtol=0, atol=0)
    # a norm layer with a built-in activation as the branch's last layer
    from timm.layers import BatchNormAct2d

    model = tsc_kernels.convert(create("resnet18", norm_layer=BatchNormAct2d))
    with pytest.raises(TypeError, match=r"layer1\.0\.bn2 \(BatchNormAct2d\)"):
        tsc_kernels.fold(model)
    # SE: a Δt that underflowed to 0 cannot be divided out of the gate
    model = tsc_kernels.convert(create("seresnet50"), mode="indp")
    with torch.no_grad():
        model.tsc_controller.stages[1].theta[2, 5] = -1e4
    with pytest.raises(ValueError, match=r"SE block layer2\.2"):
        tsc_kernels.fold(model)


def test_importing_tsc_kernels_does_not_import_timm():
    code = "import sys, tsc_kernels; assert 'timm' not in sys.modules, 'timm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_builds_timm_models():
    from tsc_kernels import bench

    model, size = bench.build_model("timm:resnet18", "lstm", 10)
    assert type(model).__module__ == "tsc_kernels.models.timm_resnet" and isinstance(model, ResNet)
    assert size == 224 and model.fc.out_features == 10 and model.tsc_mode == "lstm"
    plain, _ = bench.build_model("timm:resnet18", None, None)
    assert type(plain) is ResNet and plain.fc.out_features == 1000
    with pytest.raises(ValueError, match="timm model name.*'resnet_50'"):
        bench.build_model("timm:resnet_50", "lstm", None)
