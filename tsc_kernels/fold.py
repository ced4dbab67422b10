"""``fold(model)``: bake every block's Δt into its weights and drop the controllers (docs/fold.md).

Where Δt goes, per block kind (F is the residual branch, ``out = act(shortcut + F(x) ⊗ Δt)``):
- post-activation blocks (F ends with BatchNorm): ``BN(x) ⊗ Δt`` is a BatchNorm with
  ``γ' = γ·Δt``, ``β' = β·Δt`` (running statistics unchanged). Exact in eval and in train mode.
- pre-activation CIFAR blocks (F ends with a bias-free conv, of any spatial dimension): ``conv(x) ⊗ Δt``
  is the conv with each output channel's filter scaled, ``W'[o] = W[o]·Δt[o]``.
- SE blocks (F = SE(BN(x)), SE(z) = z·g(z) with a per-sample, per-channel gate g): scaling the BN
  alone would change SE's input and so its gate. Fold γ,β as above, so SE sees z' = z·Δt, and undo
  the scaling where the gate reads it: g starts ``fc1(avgpool(z'))`` and avgpool is linear per
  channel, so ``fc1.weight[:, c] /= Δt[c]`` makes ``g(z') = g(z)``. Then ``SE'(z') = z·Δt·g(z)``:
  exact (up to rounding) because Δt = sigmoid(·) > 0; a Δt that underflowed to 0 raises.
- timm blocks (docs/timm.md): the same, through the block's ``tsc_fold_check`` /
  ``tsc_fold_after_tail`` hooks; attention modules whose gate cannot be undone raise a TypeError.

The result is the plain network with the same parameter count and state_dict keys as the network
that was converted: ``torchvision.models.ResNet`` with torchvision blocks for ResNet/ResNeXt/Wide
ResNet (``ResNet`` with ``SEBottleneck`` for SE-ResNets), ``tsc_kernels.models.CIFARResNet`` for CIFAR
ResNets, ``timm.models.resnet.ResNet`` with timm's blocks for timm models,
``tsc_kernels.models.ResNet1d`` for 1-D ResNets. It calls no tsc_kernels op. BatchNorm1d/2d/3d
and Conv1d/2d/3d tails fold alike (the scale is per output channel, dim 0 of the weight).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from . import _checks
from .models import TSCSEBottleneck, is_tsc_network

_NORMS = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)


def _tail(name: str, block: nn.Module) -> nn.Module:
    """The layer of ``block`` that receives Δt; raises if it cannot absorb a per-channel scale."""
    tail = getattr(block, block.tail_name, None)
    where = f"{name}.{block.tail_name}"
    if isinstance(tail, _NORMS):
        if tail.weight is None or tail.bias is None:
            raise ValueError(f"fold cannot fold Δt into {where}: the BatchNorm has no affine γ, β (affine=False)")
        return tail
    if isinstance(tail, nn.modules.conv._ConvNd):  # Conv1d / Conv2d / Conv3d: filters scale alike
        return tail
    raise TypeError(f"fold cannot fold Δt into {where} ({type(tail).__name__}): the residual branch of "
                    f"block {name} must end with a BatchNorm (post-activation) or a conv (pre-activation)")


def _scale_output_channels(layer: nn.Module, dt: torch.Tensor) -> None:
    """layer(x) ⊗ dt == layer'(x) for a BatchNorm (γ, β) or a conv (filters and bias)."""
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.mul_(dt.to(layer.weight.dtype).view(shape))
    if layer.bias is not None:
        layer.bias.mul_(dt.to(layer.bias.dtype))


def fold(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return the plain network whose outputs equal the TSC network's (see the module docstring).

    Args:
        model: a TSC network (tsc_kernels.models builder with tsc != None, or tsc_kernels.convert).
        inplace: fold ``model`` itself (it becomes the plain network) instead of a deep copy.
    """
    _checks.module(model, "model")
    _checks.flag(inplace, "inplace")
    if not is_tsc_network(model):
        raise TypeError(f"fold expects a TSC network (from tsc_kernels.models with tsc set, or tsc_kernels.convert), "
                        f"got {type(model).__module__}.{type(model).__qualname__}")
    for name, _, block in model.tsc_named_blocks():  # check everything before changing anything
        _tail(name, block)
    if not inplace:
        model = copy.deepcopy(model)
    with torch.no_grad():
        dts = model.compute_step_sizes()
        flat = [dt for stage_dt in dts for dt in stage_dt]
        named = [(name, block, dt) for (name, _, block), dt in zip(model.tsc_named_blocks(), flat)]
        for name, block, dt in named:
            if isinstance(block, TSCSEBottleneck) and not bool((dt > 0).all()):
                raise ValueError(f"fold cannot fold SE block {name}: some of its Δt underflowed to 0")
            block.tsc_fold_check(name, dt)
        for name, block, dt in named:
            _scale_output_channels(_tail(name, block), dt)
            if isinstance(block, TSCSEBottleneck):
                fc1 = block.se.fc1.weight  # (squeeze, C, 1, 1): its input columns read avgpool(z')
                fc1.div_(dt.to(fc1.dtype).view(1, -1, 1, 1))
            block.tsc_fold_after_tail(dt)
            block.__class__ = block.plain_class
    del model.tsc_controller
    del model.tsc_mode
    del model._tsc_cache
    model.__class__ = model.plain_class
    return model
