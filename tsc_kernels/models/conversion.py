"""The conversion core behind ``tsc_kernels.convert`` (the public module, which re-exports ``convert``),
and ``convert_if_requested``, the builders' last step.

It lives in ``tsc_kernels.models`` because it reads the models' registries (PLAIN_TO_TSC_NETWORK,
PLAIN_TO_TSC_BLOCK) and the builders call it: imports run one way only, builders -> conversion ->
network / blocks, and tsc_kernels.convert -> here.

What ``convert`` supports and how: tsc_kernels/convert.py's docstring.
"""
from __future__ import annotations

from torch import nn

from .. import _checks
from .blocks import PLAIN_TO_TSC_BLOCK
from .network import PLAIN_TO_TSC_NETWORK, build_controller, is_tsc_network


def _qualname(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def convert(model: nn.Module, mode: str = "lstm", reduction: int | None = None, dt: float | None = None) -> nn.Module:
    """Make ``model`` a TSC network in place and return it.

    Args:
        model: a torchvision ResNet / ResNeXt / Wide ResNet, a timm ResNet (``timm.create_model``), or a
            plain network of tsc_kernels.models.
        mode: controller kind, "lstm" (TSC_LSTM), "2fc", "indp", or "fixed" (a constant step size
            ``dt`` for every block and channel, no controller parameters; docs/tsc.md).
        reduction: controller hidden size H = max(1, C // reduction); None: 4 for basic blocks, 8 for
            bottlenecks.
        dt: mode "fixed" only: the constant step size, a float > 0 (None: 1.0).

    The controller is created on the device and dtype of the network's first block. Raises TypeError
    naming the module that cannot be converted, ValueError for bad arguments.
    """
    _checks.module(model, "model")
    _checks.tsc_mode(mode, "mode")
    _checks.reduction(reduction)
    if type(model).__module__.startswith("timm."):
        # timm is optional: its ResNet classes are registered only once a timm model shows up
        from . import timm_resnet  # noqa: F401
    dt = _checks.fixed_dt(dt, mode)
    if is_tsc_network(model):
        raise ValueError(f"model is already a TSC network ({type(model).__name__}); convert it once")
    # exact class match: a subclass may have its own forward, which the TSC network would bypass
    target = PLAIN_TO_TSC_NETWORK.get(type(model))
    if target is None:
        supported = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in PLAIN_TO_TSC_NETWORK)
        raise TypeError(f"convert cannot handle {_qualname(model)}: it converts {supported} "
                        "(torchvision ResNet, ResNeXt and Wide ResNet are ResNet instances)")
    if hasattr(target, "tsc_convert"):  # families whose stages are not nn.Sequential attributes (DenseNet)
        return target.tsc_convert(model, mode, reduction, dt)
    for stage_name in target.stage_names:
        stage = getattr(model, stage_name, None)
        if not isinstance(stage, nn.Sequential) or len(stage) == 0:
            raise TypeError(f"convert cannot handle {stage_name} of {type(model).__name__}: expected a non-empty "
                            f"nn.Sequential of residual blocks, got {type(stage).__name__}")
        for d, block in enumerate(stage):
            if type(block) not in PLAIN_TO_TSC_BLOCK:
                blocks = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in PLAIN_TO_TSC_BLOCK)
                raise TypeError(f"convert cannot handle block {stage_name}.{d} ({_qualname(block)}): "
                                f"supported blocks are {blocks}")
    controller = build_controller(model, target.stage_names, mode, reduction, dt)  # ValueError on odd shapes

    for stage_name in target.stage_names:
        for block in getattr(model, stage_name):
            block.__class__ = PLAIN_TO_TSC_BLOCK[type(block)]
    model.__class__ = target
    model.tsc_controller = controller
    model.tsc_mode = mode
    model._tsc_cache = None
    return model


def convert_if_requested(model: nn.Module, tsc: str | None, reduction: int | None,
                         dt: float | None = None) -> nn.Module:
    """The builders' last step: ``model`` as it is (tsc=None) or converted to TSC in place (mode ``tsc``)."""
    if tsc is None:
        return model
    return convert(model, mode=tsc, reduction=reduction, dt=dt)
