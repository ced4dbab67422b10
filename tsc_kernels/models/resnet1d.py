"""1-D ResNets for sequences (N, C, length): CIFAR-style stages of Conv1d / BatchNorm1d basic blocks.

The residual update, weight mean and controllers take any number of spatial dims (docs/ops.md), so
the TSC version is the same construction as for images: ``TSCBasicBlock1d`` extends
``BasicBlock1d`` with the same submodules (state_dict keys unchanged), ``TSCResNet1d`` extends
``ResNet1d``, both registered so ``convert``, ``fold`` (Δt into bn2, a BatchNorm1d) and
``tsc_kernels.diagnostics`` handle them.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from .blocks import _TSCBlock, register_block
from .conversion import convert_if_requested
from .network import _TSCNetwork, register_network


def conv3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv1d:
    return nn.Conv1d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock1d(nn.Module):
    """torchvision's BasicBlock in 1-D: conv3-BN-ReLU-conv3-BN, shortcut add, ReLU.

    ``downsample`` (a 1x1 Conv1d + BatchNorm1d) projects the shortcut when the stride or width changes.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm1d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3(planes, planes)
        self.bn2 = nn.BatchNorm1d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + identity)


@register_block
class TSCBasicBlock1d(_TSCBlock, BasicBlock1d):
    """``relu(shortcut + bn2(conv2(…)) ⊗ Δt)``; the controller reads conv1 and conv2 (w̄ length 2·3·C)."""

    plain_class = BasicBlock1d

    def _branch(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return (x if self.downsample is None else self.downsample(x)), self.bn2(self.conv2(out))


class ResNet1d(nn.Module):
    """Stem conv3 (``width`` channels)-BN-ReLU, three stages of widths w, 2w, 4w at strides 1, 2, 2
    with ``blocks_per_stage`` basic blocks each, global average pool, linear classifier."""

    stage_names = ("layer1", "layer2", "layer3")

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.inplanes = width
        self.conv1 = conv3(in_channels, width)
        self.bn1 = nn.BatchNorm1d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(width, blocks_per_stage, 1)
        self.layer2 = self._make_layer(2 * width, blocks_per_stage, 2)
        self.layer3 = self._make_layer(4 * width, blocks_per_stage, 2)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        for m in self.modules():  # the CIFAR ResNets' (torchvision's) initialisation
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv1d(self.inplanes, planes, 1, stride=stride, bias=False),
                                       nn.BatchNorm1d(planes))
        layers = [BasicBlock1d(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock1d(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._forward_stages(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_network
class TSCResNet1d(_TSCNetwork, ResNet1d):
    plain_class = ResNet1d


def resnet1d(depth: int, num_classes: int = 10, in_channels: int = 1, width: int = 16, tsc: str | None = "lstm",
             reduction: int | None = None, dt: float | None = None) -> nn.Module:
    """1-D ResNet of ``depth`` = 6n+2 layers (n basic blocks per stage; 20, 56, 110, …) for inputs
    (N, in_channels, length). ``tsc``: "lstm", "2fc", "indp", "fixed" (with ``dt``, default 1.0) or
    None (the plain network); ``reduction`` as for every builder (default 4)."""
    _checks.tsc_mode(tsc, "tsc", allow_none=True)
    _checks.reduction(reduction)
    dt = _checks.fixed_dt(dt, tsc)
    _checks.cifar_depth(depth, False)
    for value, name in ((num_classes, "num_classes"), (in_channels, "in_channels"), (width, "width")):
        _checks.positive_int(value, name)
    return convert_if_requested(ResNet1d((depth - 2) // 6, num_classes, in_channels, width), tsc, reduction, dt)
