"""torchvision's ResNet family (ResNet, ResNeXt, Wide ResNet) and SE-ResNets with TSC blocks."""
from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import ResNet

from .. import _checks
from .blocks import SEBottleneck
from .conversion import convert_if_requested
from .network import _TSCNetwork, register_network

class TSCResNet(_TSCNetwork, ResNet):
    """torchvision ResNet / ResNeXt / Wide ResNet (or SE-ResNet) with TSC blocks and a controller."""

    plain_class = ResNet
    stage_names = ("layer1", "layer2", "layer3", "layer4")

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self._forward_stages(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


register_network(TSCResNet)


def _torchvision(builder, tsc, reduction, kwargs):
    _checks.tsc_mode(tsc, "tsc", allow_none=True)
    _checks.reduction(reduction)
    dt = _checks.fixed_dt(kwargs.pop("dt", None), tsc)  # tsc="fixed" only; the rest go to torchvision
    kwargs.setdefault("weights", None)
    return convert_if_requested(builder(**kwargs), tsc, reduction, dt)


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
    dt = _checks.fixed_dt(kwargs.pop("dt", None), tsc)
    return convert_if_requested(ResNet(SEBottleneck, layers, **kwargs), tsc, reduction, dt)


def se_resnet50(tsc: str | None = "lstm", reduction: int | None = None, **kwargs) -> nn.Module:
    """SE-ResNet-50: torchvision ``ResNet(SEBottleneck, [3, 4, 6, 3])``; kwargs go to ResNet."""
    return _se_resnet([3, 4, 6, 3], tsc, reduction, kwargs)


def se_resnet101(tsc: str | None = "lstm", reduction: int | None = None, **kwargs) -> nn.Module:
    return _se_resnet([3, 4, 23, 3], tsc, reduction, kwargs)

