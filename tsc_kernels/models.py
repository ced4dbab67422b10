"""TSC residual networks: torchvision's ResNet family and CIFAR ResNets with adaptive step sizes.

Every builder takes ``tsc="lstm" | "2fc" | "indp" | None`` (None: the plain network) and
``reduction`` (controller hidden size H = max(1, C // reduction); default 4 for basic blocks, 8 for
bottlenecks, SPEC.md §1).

Architecture (SPEC.md §1):
- A TSC block is a torchvision ``BasicBlock`` / ``Bottleneck`` (or one of this module's SE and
  pre-activation blocks) whose class has been swapped for a subclass: its submodules and therefore
  its state_dict keys (``layer1.0.conv1.weight`` …) are exactly those of the plain block. Its
  forward takes the block's Δt as an argument and ends with the fused
  ``residual_update(shortcut, F, Δt, relu=True)`` (post-activation, ReLU fused) or ``relu=False``
  (pre-activation CIFAR blocks, whose F ends with a conv).
- The network owns one ``tsc_kernels.nn.NetworkController`` under the prefix ``tsc_controller.``
  (``tsc_controller.stages.0.fc_in.weight`` …). Its forward runs the controller once, before the
  stages, for every block of every stage, then hands each block its row of Δt as an argument
  (no state is written during forward, so it traces and compiles).
- Δt depends on weights only. In eval mode with autograd off (``torch.no_grad`` /
  ``torch.inference_mode``) it is computed once and cached; the cache key holds the data pointer and
  autograd version counter of every tensor the controller reads (conv weights and controller
  parameters), so optimizer steps, ``load_state_dict``, ``.to()`` and in-place edits under
  ``torch.no_grad`` all invalidate it. Writes through ``tensor.data`` bypass version counters: call
  ``model.clear_step_size_cache()`` after those. With autograd on (training, or eval while taking
  gradients) Δt is recomputed every forward so its gradient is always right.

Models: ``resnet18/34/50/101/152``, ``resnext50_32x4d``, ``resnext101_32x8d``, ``wide_resnet50_2``
(torchvision's architectures, built with ``weights=None`` unless ``weights`` is passed),
``se_resnet50/101`` (squeeze-excitation inside F after the last BN, before ⊗Δt: torchvision's
``ResNet`` class with ``SEBottleneck`` blocks, SE reduction 16), and ``cifar_resnet(depth)``.

Parameter counts: TSC_LSTM adds 1,830,960 to ResNet-18/34 and 2,271,200 to ResNet-50/101 (the
paper's +1.83 M / +2.27 M). For ResNeXt-50 32x4d the paper lists +2.27 M, which corresponds to a
conv1 width of C/4; this library reads the real conv shapes (conv1 width C/2 in ResNeXt-50), so the
controller's input is wider and it adds 2,445,280 (+2.45 M).
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet, conv1x1, conv3x3
from torchvision.ops import SqueezeExcitation

from . import _checks
from .nn import NetworkController, TSCController
from .ops.residual_update import residual_update

__all__ = [
    "CIFARResNet", "PreActBasicBlock", "PreActBottleneck", "SEBottleneck", "TSCBasicBlock",
    "TSCBottleneck", "TSCCIFARResNet", "TSCPreActBasicBlock", "TSCPreActBottleneck", "TSCResNet",
    "TSCSEBottleneck", "cifar_resnet", "is_tsc_network", "resnet18", "resnet34", "resnet50",
    "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d", "se_resnet50", "se_resnet101",
    "wide_resnet50_2",
]


# --------------------------------------------------------------------------------------------------
# Plain blocks this module adds (torchvision has BasicBlock and Bottleneck)
# --------------------------------------------------------------------------------------------------
class SEBottleneck(Bottleneck):
    """torchvision Bottleneck with squeeze-excitation (``self.se``) after bn3, before the residual add."""

    se_reduction = 16

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1, norm_layer=None):
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer)
        channels = planes * self.expansion
        self.se = SqueezeExcitation(channels, max(1, channels // self.se_reduction))

    def _branch(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return (x if self.downsample is None else self.downsample(x)), out

    def forward(self, x):
        identity, out = self._branch(x)
        return self.relu(out + identity)


class PreActBasicBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016b): BN-ReLU-conv3x3-BN-ReLU-conv3x3, identity add.

    A projection shortcut (``downsample``, a 1x1 conv) reads the pre-activated input.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=False)  # bn1's output also feeds the shortcut: no in-place ReLU
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.downsample = downsample

    def _branch(self, x):
        pre = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(pre)
        return shortcut, self.conv2(self.relu(self.bn2(self.conv1(pre))))

    def forward(self, x):
        shortcut, out = self._branch(x)
        return shortcut + out


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-conv1x1, BN-ReLU-conv3x3 (stride), BN-ReLU-conv1x1 (x4)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=False)
        self.conv1 = conv1x1(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.downsample = downsample

    def _branch(self, x):
        pre = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(pre)
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        return shortcut, self.conv3(self.relu(self.bn3(out)))

    def forward(self, x):
        shortcut, out = self._branch(x)
        return shortcut + out


# --------------------------------------------------------------------------------------------------
# TSC blocks: subclasses with the same submodules; forward(x, dt)
# --------------------------------------------------------------------------------------------------
class _TSCBlock:
    """Mixin of TSC blocks. Subclasses set ``plain_class`` (the block they extend), ``post_activation``,
    ``default_reduction`` and the conv names below."""

    plain_class: type
    post_activation = True
    default_reduction = 4
    controller_convs: tuple[str, ...] = ("conv1", "conv2")  # the convs w̄ reads (SPEC.md §1)
    branch_conv_names: tuple[str, ...] = ("conv1", "conv2")  # every conv of F, in order
    tail_name = "bn2"  # the last layer of F before ⊗Δt (fold scales it)

    def tsc_weights(self) -> list[torch.Tensor]:
        return [getattr(self, n).weight for n in self.controller_convs]

    def branch_convs(self) -> list[nn.Conv2d]:
        return [getattr(self, n) for n in self.branch_conv_names]

    def tsc_channels(self) -> int:
        """Length of this block's Δt: its output channels."""
        return getattr(self, self.branch_conv_names[-1]).out_channels

    def forward(self, x, dt=None):
        if dt is None:
            raise RuntimeError(
                f"{type(self).__name__} needs its step sizes: call the whole TSC network (it runs the "
                "controller and passes every block its Δt), or call block(x, dt) with dt of shape (C,)")
        _checks.tensor(dt, "dt")
        shortcut, out = self._branch(x)
        if shortcut.dtype != out.dtype and torch.is_autocast_enabled(out.device.type):
            # Under autocast the branch's convs give bf16/fp16 while an fp32 input can reach the
            # shortcut unchanged (a block fed fp32 activations): the update runs in the branch's
            # dtype, as torchvision's `out += identity` does, instead of failing residual_update's
            # same-dtype check.
            shortcut = shortcut.to(out.dtype)
        # residual_update takes fp32 Δt (fp64 with fp64 activations) whatever the controller's dtype
        dt = dt.to(torch.float64 if out.dtype == torch.float64 else torch.float32)
        return residual_update(shortcut, out, dt, relu=self.post_activation)


class TSCBasicBlock(_TSCBlock, BasicBlock):
    plain_class = BasicBlock

    def _branch(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return (x if self.downsample is None else self.downsample(x)), self.bn2(self.conv2(out))


class TSCBottleneck(_TSCBlock, Bottleneck):
    plain_class = Bottleneck
    default_reduction = 8
    controller_convs = ("conv1", "conv3")
    branch_conv_names = ("conv1", "conv2", "conv3")
    tail_name = "bn3"

    def _branch(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return (x if self.downsample is None else self.downsample(x)), self.bn3(self.conv3(out))


class TSCSEBottleneck(_TSCBlock, SEBottleneck):
    plain_class = SEBottleneck
    default_reduction = 8
    controller_convs = ("conv1", "conv3")
    branch_conv_names = ("conv1", "conv2", "conv3")
    tail_name = "bn3"  # fold also rescales se.fc1 (see tsc_kernels.fold)
    _branch = SEBottleneck._branch


class TSCPreActBasicBlock(_TSCBlock, PreActBasicBlock):
    plain_class = PreActBasicBlock
    post_activation = False
    tail_name = "conv2"
    _branch = PreActBasicBlock._branch


class TSCPreActBottleneck(_TSCBlock, PreActBottleneck):
    plain_class = PreActBottleneck
    post_activation = False
    default_reduction = 8
    controller_convs = ("conv1", "conv3")
    branch_conv_names = ("conv1", "conv2", "conv3")
    tail_name = "conv3"
    _branch = PreActBottleneck._branch


TSC_BLOCKS = (TSCBasicBlock, TSCBottleneck, TSCSEBottleneck, TSCPreActBasicBlock, TSCPreActBottleneck)
PLAIN_TO_TSC_BLOCK = {cls.plain_class: cls for cls in TSC_BLOCKS}


# --------------------------------------------------------------------------------------------------
# CIFAR ResNet (plain)
# --------------------------------------------------------------------------------------------------
class CIFARResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016a/b): 3x3 stem conv with 16 channels, three stages of widths
    16/32/64 (x4 outputs for bottlenecks) at strides 1/2/2, global average pool, linear classifier.

    Post-activation: stem conv-BN-ReLU, projection shortcuts conv1x1+BN (option B). Pre-activation
    (``PreActBasicBlock`` / ``PreActBottleneck``): stem conv only, projection shortcuts conv1x1, and
    a final BN-ReLU (``bn_final``) before the pool.
    """

    stage_names = ("layer1", "layer2", "layer3")

    def __init__(self, block: type, blocks_per_stage: int, num_classes: int = 10):
        super().__init__()
        self.preact = block in (PreActBasicBlock, PreActBottleneck)
        self.inplanes = 16
        self.conv1 = conv3x3(3, 16)
        if not self.preact:
            self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 16, blocks_per_stage, 1)
        self.layer2 = self._make_layer(block, 32, blocks_per_stage, 2)
        self.layer3 = self._make_layer(block, 64, blocks_per_stage, 2)
        if self.preact:
            self.bn_final = nn.BatchNorm2d(64 * block.expansion)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64 * block.expansion, num_classes)
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            proj = conv1x1(self.inplanes, planes * block.expansion, stride)
            downsample = proj if self.preact else nn.Sequential(proj, nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if not self.preact:
            x = self.relu(self.bn1(x))
        x = self._forward_stages(x)
        if self.preact:
            x = self.relu(self.bn_final(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------------------------------
# TSC networks
# --------------------------------------------------------------------------------------------------
class _TSCNetwork:
    """Mixin of TSC networks: runs ``self.tsc_controller`` once per forward and feeds every block its Δt.

    Made by ``tsc_kernels.convert`` (class swap of a plain network), which sets ``tsc_controller``,
    ``tsc_mode`` and ``_tsc_cache``.
    """

    plain_class: type
    stage_names: tuple[str, ...]
    tsc_controller: NetworkController

    def tsc_stages(self) -> list[nn.Sequential]:
        return [getattr(self, n) for n in self.stage_names]

    def tsc_named_blocks(self) -> Iterator[tuple[str, int, nn.Module]]:
        """(qualified block name, stage index, block) for every block, in forward order."""
        for s, name in enumerate(self.stage_names):
            for d, block in enumerate(getattr(self, name)):
                yield f"{name}.{d}", s, block

    def controller_inputs(self) -> list[list[list[torch.Tensor]]]:
        """weights[s][d]: the conv weights block d of stage s declares (NetworkController's input)."""
        return [[block.tsc_weights() for block in stage] for stage in self.tsc_stages()]

    def compute_step_sizes(self) -> list[torch.Tensor]:
        """Every stage's Δt, (L_s, C_s), freshly computed (differentiable when autograd is on)."""
        return self.tsc_controller(self.controller_inputs())

    def clear_step_size_cache(self) -> None:
        self._tsc_cache = None

    def _cache_key(self) -> tuple:
        tensors = [w for stage in self.controller_inputs() for ws in stage for w in ws]
        tensors += list(self.tsc_controller.parameters()) + list(self.tsc_controller.buffers())
        return (id(self.tsc_controller),) + tuple(
            (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in tensors)

    def stage_step_sizes(self) -> list[torch.Tensor]:
        """Δt for this forward pass: cached in eval mode without autograd (see the module docstring)."""
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.compute_step_sizes()
        key = self._cache_key()
        cache = getattr(self, "_tsc_cache", None)
        if cache is None or cache[0] != key:
            cache = (key, [dt.detach() for dt in self.compute_step_sizes()])
            self._tsc_cache = cache
        return cache[1]

    def _forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        for stage, dts in zip(self.tsc_stages(), self.stage_step_sizes()):
            # unbind, not dts[d]: its backward is one stack per stage, where L indexings would cost
            # a zeros + copy + add per block in the backward pass
            for block, dt in zip(stage, dts.unbind(0)):
                x = block(x, dt)
        return x


class TSCResNet(_TSCNetwork, ResNet):
    """torchvision ResNet / ResNeXt / Wide ResNet (or SE-ResNet) with TSC blocks and a controller."""

    plain_class = ResNet
    stage_names = ("layer1", "layer2", "layer3", "layer4")

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self._forward_stages(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TSCCIFARResNet(_TSCNetwork, CIFARResNet):
    plain_class = CIFARResNet


TSC_NETWORKS = (TSCResNet, TSCCIFARResNet)
PLAIN_TO_TSC_NETWORK = {cls.plain_class: cls for cls in TSC_NETWORKS}


def is_tsc_network(model: object) -> bool:
    return isinstance(model, _TSCNetwork)


def stage_shapes(stage: Sequence[nn.Module], stage_name: str) -> tuple[int, int, int]:
    """(L, C, D) of a stage of TSC-convertible blocks: blocks, Δt length, controller input length.

    D is read from the conv shapes: Σ over the declared convs of C_out·k1·k2 (SPEC.md §1).
    """
    shapes = set()
    for block in stage:
        tsc_cls = PLAIN_TO_TSC_BLOCK.get(type(block), type(block))
        # the TSC class's conv names, read off the (maybe still plain) block
        weights = [getattr(block, n).weight for n in tsc_cls.controller_convs]
        channels = getattr(block, tsc_cls.branch_conv_names[-1]).out_channels
        shapes.add((channels, sum(w.shape[0] * math.prod(w.shape[2:]) for w in weights)))
    if len(shapes) != 1:
        raise ValueError(f"the blocks of {stage_name} must share one (channels, controller input size) "
                         f"to share a controller, got {sorted(shapes)}")
    (channels, in_features), = shapes
    return len(stage), channels, in_features


def build_controller(model: nn.Module, stage_names: Sequence[str], mode: str, reduction: int | None) -> NetworkController:
    controllers = []
    for name in stage_names:
        stage = getattr(model, name)
        num_blocks, channels, in_features = stage_shapes(stage, name)
        r = reduction if reduction is not None else PLAIN_TO_TSC_BLOCK.get(type(stage[0]), type(stage[0])).default_reduction
        controllers.append(TSCController(in_features, channels, reduction=r, mode=mode, num_blocks=num_blocks))
    ref = getattr(model, stage_names[0])[0].conv1.weight
    return NetworkController(controllers).to(device=ref.device, dtype=ref.dtype)


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------
def _finish(model: nn.Module, tsc: str | None, reduction: int | None) -> nn.Module:
    if tsc is None:
        return model
    from .convert import convert  # convert imports this module

    return convert(model, mode=tsc, reduction=reduction)


def _torchvision(builder, tsc, reduction, kwargs):
    _checks.tsc_mode(tsc, "tsc", allow_none=True)
    _checks.reduction(reduction)
    kwargs.setdefault("weights", None)
    return _finish(builder(**kwargs), tsc, reduction)


def resnet18(tsc: str | None = "lstm", reduction: int | None = None, **kwargs) -> nn.Module:
    """torchvision ResNet-18 (kwargs go to torchvision.models.resnet18) with TSC blocks."""
    return _torchvision(torchvision.models.resnet18, tsc, reduction, kwargs)


def resnet34(tsc: str | None = "lstm", reduction: int | None = None, **kwargs) -> nn.Module:
    return _torchvision(torchvision.models.resnet34, tsc, reduction, kwargs)


def resnet50(tsc: str | None = "lstm", reduction: int | None = None, **kwargs) -> nn.Module:
    return _torchvision(torchvision.models.resnet50, tsc, reduction, kwargs)


def resnet101(tsc: str | None = "lstm", reduction: int | None = None, **kwargs) -> nn.Module:
    return _torchvision(torchvision.models.resnet101, tsc, reduction, kwargs)


def resnet152(tsc: str | None = "lstm", reduction: int | None = None, **kwargs) -> nn.Module:
    return _torchvision(torchvision.models.resnet152, tsc, reduction, kwargs)


def resnext50_32x4d(tsc: str | None = "lstm", reduction: int | None = None, **kwargs) -> nn.Module:
    """ResNeXt-50 32x4d: TSC_LSTM adds 2.45 M (real conv1 width C/2), not the paper's 2.27 M."""
    return _torchvision(torchvision.models.resnext50_32x4d, tsc, reduction, kwargs)


def resnext101_32x8d(tsc: str | None = "lstm", reduction: int | None = None, **kwargs) -> nn.Module:
    return _torchvision(torchvision.models.resnext101_32x8d, tsc, reduction, kwargs)


def wide_resnet50_2(tsc: str | None = "lstm", reduction: int | None = None, **kwargs) -> nn.Module:
    return _torchvision(torchvision.models.wide_resnet50_2, tsc, reduction, kwargs)


def _se_resnet(layers, tsc, reduction, kwargs):
    _checks.tsc_mode(tsc, "tsc", allow_none=True)
    _checks.reduction(reduction)
    return _finish(ResNet(SEBottleneck, layers, **kwargs), tsc, reduction)


def se_resnet50(tsc: str | None = "lstm", reduction: int | None = None, **kwargs) -> nn.Module:
    """SE-ResNet-50: torchvision ``ResNet(SEBottleneck, [3, 4, 6, 3])``; kwargs go to ResNet."""
    return _se_resnet([3, 4, 6, 3], tsc, reduction, kwargs)


def se_resnet101(tsc: str | None = "lstm", reduction: int | None = None, **kwargs) -> nn.Module:
    return _se_resnet([3, 4, 23, 3], tsc, reduction, kwargs)


def cifar_resnet(depth: int, num_classes: int = 10, preact: bool = False, tsc: str | None = "lstm",
                 reduction: int | None = None, bottleneck: bool | None = None) -> nn.Module:
    """CIFAR ResNet of ``depth`` layers: 6n+2 with basic blocks or 9n+2 with bottlenecks (n per stage).

    ``bottleneck=None`` picks by depth: when only one of 6n+2 / 9n+2 fits, that one; when both fit
    (20, 56, 110, 164, …), basic blocks up to depth 110 and bottlenecks above, as He et al. name
    them (ResNet-20…110 and 1202 basic, ResNet-164 and 1001 bottleneck). ``preact=True`` builds the
    pre-activation variant (He et al. 2016b); its TSC blocks use the residual update without ReLU.
    Depth 1202 (19.4 M parameters, 600 blocks) trains: one step at batch 2 takes ~2 s on one CPU
    thread (tests/test_models.py).
    """
    _checks.tsc_mode(tsc, "tsc", allow_none=True)
    _checks.reduction(reduction)
    _checks.flag(preact, "preact")
    bottleneck = _checks.cifar_depth(depth, bottleneck)
    _checks.positive_int(num_classes, "num_classes")
    n = (depth - 2) // (9 if bottleneck else 6)
    block = {(False, False): BasicBlock, (True, False): Bottleneck,
             (False, True): PreActBasicBlock, (True, True): PreActBottleneck}[(bottleneck, preact)]
    return _finish(CIFARResNet(block, n, num_classes), tsc, reduction)
