"""Models by name for tsc-train: every tsc_kernels.models builder, ``torchvision:NAME``, ``timm:NAME``.

Names with a depth in them build the CIFAR-style families at that depth: ``cifar_resnetN``,
``cifar_preact_resnetN``, ``cifar_densenetN`` (growth rate 12, the paper's DenseNet-40 is
``cifar_densenet40``), ``cifar_lm_resnetN`` and ``resnet1dN`` (sequences, MNIST-1D). Any other name
is a builder of ``tsc_kernels.models`` (``resnet50``, ``se_resnet50``, ``densenet121``, ...).
``torchvision:NAME`` and ``timm:NAME`` build that library's network with random weights
(``weights=None`` / ``pretrained=False``: nothing is downloaded) and convert it with
``tsc_kernels.convert``. The same name with ``tsc=None`` builds the plain network that ``fold`` gives
back, so ``folded.pt`` reloads with :func:`load_folded`.
"""
from __future__ import annotations

import os
import re

import torch
from torch import nn

from .. import models
from ..convert import convert

TSC_MODES = ("lstm", "2fc", "indp", "fixed", "none")
# names that are functions of tsc_kernels.models but not network builders taking tsc=...
_NOT_BUILDERS = {"cifar_resnet", "cifar_lm_resnet", "cifar_densenet", "resnet1d", "lm_coefficients",
                 "build_controller", "register_block", "register_network", "stage_shapes", "is_tsc_block",
                 "is_tsc_network"}


def is_cifar_style(name: str) -> bool:
    """Networks built for small inputs (32x32 CIFAR stems, sequences): default image size 32, not 224."""
    return name.startswith(("cifar_", "resnet1d"))


def builder_names() -> list[str]:
    """The plain builder names of tsc_kernels.models (for error messages and --help)."""
    return sorted(n for n in models.__all__
                  if n[0].islower() and callable(getattr(models, n)) and n not in _NOT_BUILDERS)


def build(name: str, tsc: str | None, num_classes: int, in_channels: int = 3, dt: float | None = None) -> nn.Module:
    """The network ``name`` (module docstring) with ``num_classes`` outputs; ``tsc`` None: plain.

    Raises ValueError naming ``model`` for an unknown name, one that cannot take ``in_channels``
    channels, or a torchvision/timm network that ``convert`` cannot handle.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a non-empty string, got {name!r}")
    if tsc is not None and tsc not in TSC_MODES[:-1]:
        raise ValueError(f"tsc must be one of {', '.join(TSC_MODES)} (or None), got {tsc!r}")
    kw = {"tsc": tsc, "num_classes": num_classes}
    if tsc == "fixed":
        kw["dt"] = 1.0 if dt is None else dt
    if name.startswith(("torchvision:", "timm:")):
        _three_channels(name, in_channels)
        return _external(name, tsc, num_classes, dt)
    m = re.fullmatch(r"cifar_densenet(\d+)", name)
    if m:
        return models.cifar_densenet(int(m.group(1)), 12, in_channels=in_channels, **kw)
    m = re.fullmatch(r"cifar_lm_resnet(\d+)", name)
    if m:
        return models.cifar_lm_resnet(int(m.group(1)), in_channels=in_channels, **kw)
    m = re.fullmatch(r"cifar_(preact_)?resnet(\d+)", name)
    if m:
        return models.cifar_resnet(int(m.group(2)), preact=bool(m.group(1)), in_channels=in_channels, **kw)
    m = re.fullmatch(r"resnet1d(\d+)", name)
    if m:
        return models.resnet1d(int(m.group(1)), in_channels=in_channels, **kw)
    if name not in builder_names():
        raise ValueError(f"model: unknown name {name!r}; use cifar_resnetN, cifar_preact_resnetN, cifar_densenetN, "
                         f"cifar_lm_resnetN, resnet1dN, torchvision:NAME, timm:NAME or one of "
                         f"{', '.join(builder_names())}")
    _three_channels(name, in_channels)
    return getattr(models, name)(**kw)


def _three_channels(name: str, in_channels: int) -> None:
    # the ImageNet-style builders have a fixed 3-channel stem; digits / MNIST-1D need the CIFAR families
    if in_channels != 3:
        raise ValueError(f"model: {name} takes 3-channel images, the data set has {in_channels} channel(s); "
                         "use a cifar_* model (or resnet1dN for sequences)")


def _external(name: str, tsc: str | None, num_classes: int, dt: float | None) -> nn.Module:
    lib, _, arch = name.partition(":")
    if lib == "torchvision":
        import torchvision

        try:
            net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        except (ValueError, KeyError) as e:
            raise ValueError(f"model: torchvision has no model {arch!r} ({e})") from e
    else:
        try:
            import timm
        except ImportError as e:
            raise ValueError(f"model: {name} needs timm: pip install timm (or 'tsc-kernels[timm]')") from e
        if not timm.is_model(arch):
            raise ValueError(f"model: timm has no model {arch!r} (timm.list_models('resnet*') lists its ResNets)")
        net = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    if tsc is None:
        return net
    try:
        return convert(net, mode=tsc, dt=(1.0 if dt is None else dt) if tsc == "fixed" else None)
    except TypeError as e:  # not a ResNet / DenseNet family that convert knows
        raise ValueError(f"model: {name} cannot be made a TSC network: {e}") from e


def load_folded(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """The plain network saved as ``folded.pt`` by tsc-train, rebuilt by name and loaded (eval mode)."""
    blob = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or "state_dict" not in blob or "model" not in blob:
        raise ValueError(f"path: {os.fspath(path)} is not a folded.pt written by tsc-train")
    net = build(blob["model"], None, blob["num_classes"], blob["in_channels"])
    net.load_state_dict(blob["state_dict"])
    return net.eval()
