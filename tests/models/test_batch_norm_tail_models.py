"""TSC blocks whose branch ends in a plain BatchNorm run it fused with ⊗Δt and the update
(tsc_kernels.batch_norm_residual_update), with nn.BatchNorm's exact bookkeeping."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import tsc_kernels
from tsc_kernels import models
from tsc_kernels.models import blocks
from tsc_kernels.profiling import kernel_names


def unfused(model):
    """A copy of `model` whose TSC blocks run BN and the update as two ops (the path before fusion)."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if models.is_tsc_block(m):
            m.fused_bn_tail = False  # instance attribute shadows the class's
    return twin


def train_steps(model, x, target, steps=2):
    """Loss of each SGD step. Two: the second updates the running statistics the first left
    (momentum=None: their cumulative average) and reads SGD's momentum buffer."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def assert_same_state(a, b, atol=1e-5, rtol=1e-5):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def bn_configured(model, **attrs):
    for m in model.modules():
        if type(m) in blocks.FUSABLE_NORMS:
            for k, v in attrs.items():
                setattr(m, k, v)
    return model


@pytest.mark.parametrize("variant", ["default", "momentum-none", "no-running-stats", "no-affine"])
def test_fused_tail_equals_two_ops(backend, variant):
    torch.manual_seed(0)
    model = models.cifar_resnet(8, num_classes=5)
    if variant == "momentum-none":
        bn_configured(model, momentum=None)
    elif variant == "no-running-stats":
        for m in model.modules():
            if type(m) in blocks.FUSABLE_NORMS:
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
    elif variant == "no-affine":
        for m in model.modules():
            if type(m) in blocks.FUSABLE_NORMS:
                m.affine, m.weight, m.bias = False, None, None
    twin = unfused(model)
    x, target = torch.randn(6, 3, 10, 10), torch.randint(0, 5, (6,))
    torch.testing.assert_close(train_steps(model, x, target), train_steps(twin, x, target), atol=1e-5, rtol=1e-5)
    assert_same_state(model, twin)
    for m in (model, twin):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), atol=1e-5, rtol=1e-5)


@pytest.mark.cpu_only
def test_uses_the_fused_op_once_per_block():
    model = models.cifar_resnet(14)
    with tsc_kernels.use_backend("torch"):
        names = kernel_names(lambda: model(torch.randn(2, 3, 8, 8)))
    assert names.get("tsc::batch_norm_residual_update_torch", 0) == 0  # decomposed by the reference
    with tsc_kernels.use_backend("cpu"):
        names = kernel_names(lambda: model(torch.randn(2, 3, 8, 8)))
    blocks_n = sum(1 for m in model.modules() if models.is_tsc_block(m))
    assert names.get("tsc::batch_norm_residual_update") == blocks_n
    assert "tsc::residual_update" not in names


@pytest.mark.cpu_only
def test_other_tails_keep_the_two_op_path():
    """SyncBatchNorm, SE blocks and pre-activation blocks are not fused (docs/backends.md)."""
    model = models.cifar_resnet(8)
    model.layer1[0].bn2 = nn.SyncBatchNorm(16)
    assert type(model.layer1[0].bn2) not in blocks.FUSABLE_NORMS
    pre = models.cifar_resnet(8, preact=True)
    with tsc_kernels.use_backend("cpu"):
        names = kernel_names(lambda: pre(torch.randn(2, 3, 8, 8)))
    assert "tsc::batch_norm_residual_update" not in names and "tsc::residual_update" in names


@pytest.mark.parametrize("name", ["resnet18", "cifar_resnet56"])
def test_fused_and_torch_backends_agree_after_three_steps(name):
    torch.manual_seed(0)
    if name == "resnet18":
        model = tsc_kernels.convert(torchvision.models.resnet18(num_classes=7))
        x = torch.randn(2, 3, 40, 40)
    else:
        model = models.cifar_resnet(56, num_classes=7)
        x = torch.randn(4, 3, 12, 12)
    target = torch.randint(0, 7, (x.shape[0],))
    twin = copy.deepcopy(model)
    fused_backend = tsc_kernels.backend.resolve(torch.device("cpu"))
    with tsc_kernels.use_backend(fused_backend):
        a = train_steps(model, x, target)
    with tsc_kernels.use_backend("torch"):
        b = train_steps(twin, x, target)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    assert_same_state(model, twin, atol=2e-4, rtol=2e-4)  # weights after 3 momentum steps, BN buffers


def test_compiled_model_equals_eager():
    torch.manual_seed(0)
    model = models.cifar_resnet(8, num_classes=4)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x, target = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    torch.testing.assert_close(train_steps(model, x, target), train_steps(compiled, x, target), atol=1e-5, rtol=1e-5)
    assert_same_state(model, twin)
