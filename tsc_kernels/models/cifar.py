"""CIFAR ResNets (He et al. 2016a/b): plain and TSC, basic or bottleneck, post- or pre-activation."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1, conv3x3

from .. import _checks
from .blocks import PreActBasicBlock, PreActBottleneck
from .conversion import convert_if_requested
from .network import _TSCNetwork, register_network

class CIFARResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016a/b): 3x3 stem conv with 16 channels, three stages of widths
    16/32/64 (x4 outputs for bottlenecks) at strides 1/2/2, global average pool, linear classifier.

    Post-activation: stem conv-BN-ReLU, projection shortcuts conv1x1+BN (option B). Pre-activation
    (``PreActBasicBlock`` / ``PreActBottleneck``): stem conv only, projection shortcuts conv1x1, and
    a final BN-ReLU (``bn_final``) before the pool.
    """

    stage_names = ("layer1", "layer2", "layer3")

    def __init__(self, block: type, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.preact = block in (PreActBasicBlock, PreActBottleneck)
        self.inplanes = 16
        self.conv1 = conv3x3(in_channels, 16)
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


class TSCCIFARResNet(_TSCNetwork, CIFARResNet):
    plain_class = CIFARResNet


register_network(TSCCIFARResNet)


def cifar_resnet(depth: int, num_classes: int = 10, preact: bool = False, tsc: str | None = "lstm",
                 reduction: int | None = None, bottleneck: bool | None = None, in_channels: int = 3,
                 dt: float | None = None) -> nn.Module:
    """CIFAR ResNet of ``depth`` layers: 6n+2 with basic blocks or 9n+2 with bottlenecks (n per stage).

    ``bottleneck=None`` picks by depth: when only one of 6n+2 / 9n+2 fits, that one; when both fit
    (20, 56, 110, 164, …), basic blocks up to depth 110 and bottlenecks above, as He et al. name
    them (ResNet-20…110 and 1202 basic, ResNet-164 and 1001 bottleneck). ``preact=True`` builds the
    pre-activation variant (He et al. 2016b); its TSC blocks use the residual update without ReLU.
    ``in_channels``: input channels (3 for CIFAR, 1 for grey images such as scikit-learn's 8x8
    digits; any spatial size works: the pool is adaptive). ``dt``: tsc="fixed" only, the constant
    step size (default 1.0).
    Depth 1202 (19.4 M parameters, 600 blocks) trains: one step at batch 2 takes ~2 s on one CPU
    thread (tests/models/test_models.py).
    """
    _checks.tsc_mode(tsc, "tsc", allow_none=True)
    _checks.reduction(reduction)
    dt = _checks.fixed_dt(dt, tsc)
    _checks.flag(preact, "preact")
    bottleneck = _checks.cifar_depth(depth, bottleneck)
    _checks.positive_int(num_classes, "num_classes")
    _checks.positive_int(in_channels, "in_channels")
    n = (depth - 2) // (9 if bottleneck else 6)
    block = {(False, False): BasicBlock, (True, False): Bottleneck,
             (False, True): PreActBasicBlock, (True, True): PreActBottleneck}[(bottleneck, preact)]
    return convert_if_requested(CIFARResNet(block, n, num_classes, in_channels), tsc, reduction, dt)
