"""LM-ResNets (Lu et al. 2018, "Beyond Finite Layer Neural Networks"): the linear multi-step
architecture, plain and with TSC step sizes (docs/lm_resnet.md).

Every block n of a stage computes, with u_n its input, S its shortcut (identity or projection) and
f its residual branch:

    u_{n+1} = act((1 - k_n)·S(u_n) + k_n·u_{n-1} + η_n·Δt_n ⊗ f(u_n))

one fused ``tsc_kernels.multistep_update`` per block. k_n is a trainable scalar per block
(``block.lm_k``, initialised from U[-0.1, 0] as in the paper); Δt_n = 1 without TSC, the
controller's step sizes with it. u_{n-1} is the previous block's S(u_{n-1}), i.e. its input for an
identity shortcut. The first block of every stage, and any block whose shortcut projects, has no
u_{n-1} of its shape: it takes the Euler step (k = 0) and has no ``lm_k``.

Stochastic depth (Huang et al. 2016, as the paper applies it to LM-ResNet): block l of L (counted
over the whole network, l = 1..L) survives with p_l = 1 - (l / L)·(1 - p_L), p_L =
``stochastic_depth``. In training η_l ~ Bernoulli(p_l) per sample; in eval η_l = p_l, the
expectation (the paper's convention: no rescaling in training, the branch scaled by p_l at test).

The networks reuse the TSC machinery: ``CIFARLMResNet`` / ``LMResNet`` are plain networks, their
TSC versions (``TSCCIFARLMResNet`` / ``TSCLMResNet``) are made by ``tsc_kernels.convert`` (blocks
swapped for TSC blocks, one ``NetworkController``), and ``tsc_kernels.fold`` turns them back into
the plain LM network with Δt folded into each branch's last layer (k_n kept).
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import ResNet

from .. import _checks
from ..ops.multistep_update import multistep_update
from .blocks import PLAIN_TO_TSC_BLOCK, PreActBasicBlock, PreActBottleneck
from .cifar import CIFARResNet
from .conversion import convert_if_requested
from .network import _TSCNetwork, register_network


def survival_probabilities(num_blocks: int, last: float | None) -> tuple[float, ...]:
    """p_l = 1 - (l / L)·(1 - last) for l = 1..L (all 1 when ``last`` is None)."""
    if last is None:
        return (1.0,) * num_blocks
    return tuple(1.0 - (l / num_blocks) * (1.0 - last) for l in range(1, num_blocks + 1))


def _check_stochastic_depth(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"stochastic_depth must be a float in (0, 1] or None, got {type(value).__name__}")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"stochastic_depth must be the last block's survival probability in (0, 1], got {value}")
    return float(value)


def _init_lm(model: nn.Module, stochastic_depth: float | None) -> None:
    """Give every multi-step block its k_n ~ U[-0.1, 0] and the network its survival schedule."""
    count = 0
    for name in model.stage_names:
        for d, block in enumerate(getattr(model, name)):
            count += 1
            if d > 0 and block.downsample is None:
                ref = block.conv1.weight
                block.lm_k = nn.Parameter(torch.empty((), dtype=ref.dtype, device=ref.device).uniform_(-0.1, 0.0))
    model.lm_stochastic_depth = stochastic_depth
    model.lm_survival = survival_probabilities(count, stochastic_depth)


def _branch(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(shortcut, f) of a plain or TSC block: the TSC class's ``_branch`` works on the plain block."""
    return PLAIN_TO_TSC_BLOCK.get(type(block), type(block))._branch(block, x)


def _post_activation(block: nn.Module) -> bool:
    return PLAIN_TO_TSC_BLOCK.get(type(block), type(block)).post_activation


class _LMNetwork:
    """Mixin of LM networks: the stages run the multi-step scheme (the module docstring)."""

    stage_names: tuple[str, ...]
    lm_survival: tuple[float, ...]

    def _keep(self, p: float, x: torch.Tensor, acc: torch.dtype) -> torch.Tensor | None:
        if p >= 1.0:
            return None
        keep = torch.empty(x.shape[0], dtype=acc, device=x.device)
        return keep.bernoulli_(p) if self.training else keep.fill_(p)

    def _lm_forward_stages(self, x: torch.Tensor, stage_dts: list[torch.Tensor] | None) -> torch.Tensor:
        l = 0
        for s, name in enumerate(self.stage_names):
            dts = stage_dts[s].unbind(0) if stage_dts is not None else None
            prev = None  # S(u_{n-1}) of the previous block of this stage
            for d, block in enumerate(getattr(self, name)):
                shortcut, f = _branch(block, x)
                if shortcut.dtype != f.dtype:  # autocast: the update runs in the branch's dtype
                    shortcut = shortcut.to(f.dtype)
                acc = torch.float64 if f.dtype == torch.float64 else torch.float32
                k = getattr(block, "lm_k", None)
                if k is None or prev is None:  # Euler step: k = 0, u_prev unused
                    k, u_prev = torch.zeros((), dtype=acc, device=f.device), shortcut
                else:
                    k, u_prev = k.to(acc), prev.to(f.dtype)
                dt = dts[d].to(acc) if dts is not None else None
                x = multistep_update(shortcut, u_prev, f, k, dt, self._keep(self.lm_survival[l], f, acc),
                                     relu=_post_activation(block))
                prev = shortcut
                l += 1
        return x


class CIFARLMResNet(_LMNetwork, CIFARResNet):
    """CIFAR LM-ResNet: ``CIFARResNet`` (stem, three stages, pool, fc) with multi-step stages."""

    def __init__(self, block: type, blocks_per_stage: int, num_classes: int = 10, stochastic_depth: float | None = None,
                 in_channels: int = 3):
        super().__init__(block, blocks_per_stage, num_classes, in_channels)
        _init_lm(self, stochastic_depth)

    def _forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        return self._lm_forward_stages(x, None)


class TSCCIFARLMResNet(_TSCNetwork, CIFARLMResNet):
    plain_class = CIFARLMResNet

    def _forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        return self._lm_forward_stages(x, self.stage_step_sizes())


class LMResNet(_LMNetwork, ResNet):
    """torchvision ResNet / ResNeXt with multi-step stages (made by the ``lm_resnet*`` builders)."""

    stage_names = ("layer1", "layer2", "layer3", "layer4")

    def _forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        return self._lm_forward_stages(x, None)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self._forward_stages(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TSCLMResNet(_TSCNetwork, LMResNet):
    plain_class = LMResNet

    def _forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        return self._lm_forward_stages(x, self.stage_step_sizes())


register_network(TSCCIFARLMResNet)
register_network(TSCLMResNet)


def cifar_lm_resnet(depth: int, preact: bool = True, stochastic_depth: float | None = 0.5, tsc: str | None = None,
                    num_classes: int = 10, reduction: int | None = None, bottleneck: bool | None = None,
                    in_channels: int = 3, dt: float | None = None) -> nn.Module:
    """CIFAR LM-ResNet of ``depth`` layers (6n+2 basic / 9n+2 bottleneck, as ``cifar_resnet``).

    Args:
        preact: pre-activation blocks (the paper's CIFAR LM-ResNets) or post-activation (ReLU fused).
        stochastic_depth: survival probability p_L of the last block (linear decay from 1), None: off.
            The paper uses 0.8 for LM-ResNet-56 and 0.5 for LM-ResNet-110.
        tsc: None (plain LM-ResNet, Δt = 1) or a controller mode ("lstm", "2fc", "indp") giving
            each block's Δt inside the two-step scheme, or "fixed" with ``dt`` (a constant step size).
        in_channels: input channels (1 for grey images such as scikit-learn's digits).
    """
    _checks.tsc_mode(tsc, "tsc", allow_none=True)
    _checks.reduction(reduction)
    dt = _checks.fixed_dt(dt, tsc)
    _checks.positive_int(in_channels, "in_channels")
    _checks.flag(preact, "preact")
    stochastic_depth = _check_stochastic_depth(stochastic_depth)
    bottleneck = _checks.cifar_depth(depth, bottleneck)
    _checks.positive_int(num_classes, "num_classes")
    n = (depth - 2) // (9 if bottleneck else 6)
    block = {(False, False): torchvision.models.resnet.BasicBlock, (True, False): torchvision.models.resnet.Bottleneck,
             (False, True): PreActBasicBlock, (True, True): PreActBottleneck}[(bottleneck, preact)]
    return convert_if_requested(CIFARLMResNet(block, n, num_classes, stochastic_depth, in_channels), tsc, reduction, dt)


def _lm_torchvision(builder, tsc, reduction, stochastic_depth, kwargs) -> nn.Module:
    _checks.tsc_mode(tsc, "tsc", allow_none=True)
    _checks.reduction(reduction)
    stochastic_depth = _check_stochastic_depth(stochastic_depth)
    kwargs.setdefault("weights", None)
    model = builder(**kwargs)
    if type(model) is not ResNet:
        raise TypeError(f"{builder.__name__} must build a torchvision ResNet, got {type(model).__name__}")
    model.__class__ = LMResNet  # same submodules and weights: only the stages' forward changes
    _init_lm(model, stochastic_depth)
    return convert_if_requested(model, tsc, reduction)


def lm_resnet18(tsc: str | None = None, reduction: int | None = None, stochastic_depth: float | None = None,
                **kwargs) -> nn.Module:
    """LM-ResNet-18: torchvision ResNet-18 (kwargs go to torchvision.models.resnet18) with multi-step stages."""
    return _lm_torchvision(torchvision.models.resnet18, tsc, reduction, stochastic_depth, kwargs)


def lm_resnet34(tsc: str | None = None, reduction: int | None = None, stochastic_depth: float | None = None,
                **kwargs) -> nn.Module:
    return _lm_torchvision(torchvision.models.resnet34, tsc, reduction, stochastic_depth, kwargs)


def lm_resnet50(tsc: str | None = None, reduction: int | None = None, stochastic_depth: float | None = None,
                **kwargs) -> nn.Module:
    return _lm_torchvision(torchvision.models.resnet50, tsc, reduction, stochastic_depth, kwargs)


def lm_resnet101(tsc: str | None = None, reduction: int | None = None, stochastic_depth: float | None = None,
                 **kwargs) -> nn.Module:
    return _lm_torchvision(torchvision.models.resnet101, tsc, reduction, stochastic_depth, kwargs)


def lm_resnext50_32x4d(tsc: str | None = None, reduction: int | None = None, stochastic_depth: float | None = None,
                       **kwargs) -> nn.Module:
    """LM-ResNeXt-50 32x4d (the paper's LM-ResNeXt uses the same scheme)."""
    return _lm_torchvision(torchvision.models.resnext50_32x4d, tsc, reduction, stochastic_depth, kwargs)


def lm_coefficients(model: nn.Module) -> dict[str, float]:
    """k_n of every multi-step block of an LM network, ``{"layer1.1": k, ...}`` in forward order
    (Euler blocks, which have no k, are left out). Report it beside ``tsc_kernels.step_sizes``."""
    _checks.module(model, "model")
    if not isinstance(model, _LMNetwork):
        raise TypeError(f"lm_coefficients needs an LM network (tsc_kernels.models.cifar_lm_resnet / lm_resnet*), "
                        f"got {type(model).__module__}.{type(model).__qualname__}")
    return {f"{name}.{d}": float(block.lm_k.detach())
            for name in model.stage_names for d, block in enumerate(getattr(model, name)) if hasattr(block, "lm_k")}
