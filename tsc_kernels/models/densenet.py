"""TSC-DenseNet (docs/densenet.md): DenseNets whose layers append their new features scaled by Δt.

The TSC paper (Appendix C) extends the controller to DenseNet: "we use the parameters that
generate the new feature at each step as the input of our controller. The new feature is
channel-wise multiplied with the output step size, and then concatenated with old features".
So a dense layer ℓ computes its new features F_ℓ(x) from everything before it, and the dense
block's running tensor becomes ``x ← cat([x, F_ℓ(x) ⊗ Δt_ℓ])``, fused in one pass by
``tsc_kernels.scale_concat``. Δt_ℓ has k entries (the growth rate).

- Controller input (w̄): the convs that produce the new features: conv1 of a basic layer
  (BN-ReLU-conv3x3, length 9k); conv1 and conv2 of a bottleneck layer (BN-ReLU-conv1x1 to 4k,
  BN-ReLU-conv3x3 to k; length 4k + 9k), in that order. Every layer's w̄ has the same length within
  a dense block (the mean over C_in removes the growing input width), so one controller per dense
  block reads its layers as the LSTM's steps.
- Hidden size: the paper does not give one for DenseNet; H = max(1, k // 4) (reduction 4, as for
  basic residual blocks): H = 3 for k = 12, 8 for torchvision's k = 32, 12 for DenseNet-161's k = 48.
- Models: ``cifar_densenet(depth, growth_rate, bc)`` (Huang et al.'s CIFAR DenseNets: 3x3 stem,
  three dense blocks, transitions BN-ReLU-conv1x1-avgpool; ``bc=True`` bottleneck layers and
  compression 0.5) and ``convert`` of torchvision's ``DenseNet`` (densenet121/161/169/201).
- The TSC classes are the plain ones with the layer and network classes swapped (state_dict keys
  unchanged, plus ``tsc_controller.*``). The TSC network's forward walks ``features`` itself:
  torchvision's ``_DenseBlock.forward`` keeps a list of features and concatenates it in every
  layer; the TSC forward keeps the concatenation as one tensor and extends it with scale_concat,
  which gives every layer exactly the input the list would (old features, then each earlier
  layer's F ⊗ Δt), and the block's output.
- ``fold``: every dense layer ends with a conv, so Δt is baked into that conv's output channels
  (``W'[o] = W[o]·Δt[o]``; dropout after it commutes with the scale): the folded model is the
  plain DenseNet with equal outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.densenet import DenseNet, _DenseBlock, _DenseLayer, _Transition

from .. import _checks
from ..ops.scale_concat import scale_concat
from .blocks import PLAIN_TO_TSC_BLOCK, _TSCBlock, register_block
from .conversion import convert_if_requested
from .network import _TSCNetwork, build_controller, register_network


# --------------------------------------------------------------------------------------------------
# Plain CIFAR DenseNet (torchvision's DenseNet has the ImageNet stem and bottleneck layers only)
# --------------------------------------------------------------------------------------------------
class DenseLayer(nn.Module):
    """Basic dense layer (no bottleneck): BN-ReLU-conv3x3 producing ``growth_rate`` new features,
    dropout after the conv. Takes a tensor or a list of tensors (concatenated), as torchvision's."""

    def __init__(self, num_input_features: int, growth_rate: int, drop_rate: float = 0.0):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, growth_rate, kernel_size=3, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, input) -> torch.Tensor:
        x = input if isinstance(input, torch.Tensor) else torch.cat(input, 1)
        new_features = self.conv1(self.relu1(self.norm1(x)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class DenseBlock(_DenseBlock):
    """A dense block of given layers (``denselayer1`` …), with torchvision's _DenseBlock forward."""

    def __init__(self, layers: list[nn.Module]):
        nn.ModuleDict.__init__(self)
        for i, layer in enumerate(layers):
            self.add_module(f"denselayer{i + 1}", layer)


class CIFARDenseNet(DenseNet):
    """Huang et al.'s CIFAR DenseNet: conv3x3 stem (16 channels; 2k with bc), three dense blocks of
    equal length, transitions BN-ReLU-conv1x1-avgpool2 (compression 0.5 with bc), final BN (norm5),
    ReLU, global average pool, linear classifier. Same module names as torchvision's DenseNet
    (``features.denseblock1.denselayer1.conv1`` …) and its forward."""

    def __init__(self, depth: int = 40, growth_rate: int = 12, bc: bool = False, num_classes: int = 10,
                 drop_rate: float = 0.0, in_channels: int = 3):
        nn.Module.__init__(self)
        layers_per_block = (depth - 4) // (6 if bc else 3)
        num_features = 2 * growth_rate if bc else 16
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(in_channels, num_features, kernel_size=3, padding=1, bias=False))
        for i in range(3):
            if bc:
                layers = [_DenseLayer(num_features + j * growth_rate, growth_rate, bn_size=4, drop_rate=drop_rate)
                          for j in range(layers_per_block)]
            else:
                layers = [DenseLayer(num_features + j * growth_rate, growth_rate, drop_rate)
                          for j in range(layers_per_block)]
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(layers))
            num_features += layers_per_block * growth_rate
            if i != 2:
                out_features = num_features // 2 if bc else num_features
                self.features.add_module(f"transition{i + 1}", _Transition(num_features, out_features))
                num_features = out_features
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        for m in self.modules():  # torchvision's DenseNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)


# --------------------------------------------------------------------------------------------------
# TSC dense layers: forward(x, dt) -> cat([x, F(x) ⊗ dt])
# --------------------------------------------------------------------------------------------------
class _TSCDenseLayer(_TSCBlock):
    """Mixin of TSC dense layers: ``forward(x, dt)`` returns ``scale_concat(x, F(x), dt)``, where F is
    the plain layer's forward (new features, after dropout) and x the concatenated features so far."""

    post_activation = False
    default_reduction = 4

    def forward(self, x, dt=None):
        if dt is None:
            raise RuntimeError(
                f"{type(self).__name__} needs its step sizes: call the whole TSC DenseNet (it runs the controller "
                "and passes every layer its Δt), or call layer(x, dt) with x the concatenated features and dt (k,)")
        _checks.tensor(x, "x")
        _checks.tensor(dt, "dt")
        new = self.plain_class.forward(self, x)
        if x.dtype != new.dtype and torch.is_autocast_enabled(new.device.type):
            x = x.to(new.dtype)  # autocast: the convs give bf16/fp16 while x may still be fp32
        dt = dt.to(torch.float64 if new.dtype == torch.float64 else torch.float32)
        return scale_concat(x, new, dt)


class TSCDenseLayer(_TSCDenseLayer, DenseLayer):
    plain_class = DenseLayer
    controller_convs = ("conv1",)
    branch_conv_names = ("conv1",)
    tail_name = "conv1"


class TSCBottleneckDenseLayer(_TSCDenseLayer, _DenseLayer):
    """torchvision's _DenseLayer (BN-ReLU-conv1x1-BN-ReLU-conv3x3, optional checkpointing and dropout)."""

    plain_class = _DenseLayer
    controller_convs = ("conv1", "conv2")
    branch_conv_names = ("conv1", "conv2")
    tail_name = "conv2"


register_block(TSCDenseLayer)
register_block(TSCBottleneckDenseLayer)


# --------------------------------------------------------------------------------------------------
# TSC DenseNets
# --------------------------------------------------------------------------------------------------
def _dense_block_names(model: nn.Module) -> tuple[str, ...]:
    """Qualified names of the dense blocks of a (plain or TSC) DenseNet, in forward order."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise TypeError(f"convert cannot handle {type(model).__name__}: "
                        "expected a DenseNet with a `features` nn.Sequential")
    return tuple(f"features.{n}" for n, m in features.named_children() if isinstance(m, _DenseBlock))


class _TSCDenseNet(_TSCNetwork):
    """Mixin of TSC DenseNets: one controller per dense block; forward walks ``features`` and runs
    each dense block's layers with their Δt (see the module docstring)."""

    @property
    def stage_names(self) -> tuple[str, ...]:
        return _dense_block_names(self)

    def tsc_stages(self) -> list[list[nn.Module]]:
        return [list(self.get_submodule(n).values()) for n in self.stage_names]

    def tsc_named_blocks(self):
        for s, name in enumerate(self.stage_names):
            for layer_name, layer in self.get_submodule(name).items():
                yield f"{name}.{layer_name}", s, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dts = iter(self.stage_step_sizes())
        for module in self.features:
            if isinstance(module, _DenseBlock):
                # unbind: one stack per block in the backward pass (as _TSCNetwork._forward_stages)
                for layer, dt in zip(module.values(), next(dts).unbind(0)):
                    x = layer(x, dt)
            else:
                x = module(x)
        out = F.relu(x, inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)

    @classmethod
    def tsc_convert(cls, model: nn.Module, mode: str, reduction: int | None, dt: float | None = None) -> nn.Module:
        """tsc_kernels.convert for DenseNets (their stages are dense blocks inside ``features``)."""
        names = _dense_block_names(model)
        if not names:
            raise TypeError(f"convert cannot handle {type(model).__name__}: its features hold no dense block")
        for name in names:
            block = model.get_submodule(name)
            if len(block) == 0:
                raise TypeError(f"convert cannot handle {name}: an empty dense block")
            for layer_name, layer in block.items():
                if type(layer) not in (TSCDenseLayer.plain_class, TSCBottleneckDenseLayer.plain_class):
                    raise TypeError(f"convert cannot handle dense layer {name}.{layer_name} "
                                    f"({type(layer).__qualname__}): "
                                    "supported layers are torchvision's _DenseLayer and tsc_kernels' DenseLayer")
        controller = build_controller(model, names, mode, reduction, dt)  # ValueError on odd shapes
        for name in names:
            for layer in model.get_submodule(name).values():
                layer.__class__ = PLAIN_TO_TSC_BLOCK[type(layer)]
        model.__class__ = cls
        model.tsc_controller = controller
        model.tsc_mode = mode
        model._tsc_cache = None
        return model


class TSCDenseNet(_TSCDenseNet, DenseNet):
    """torchvision DenseNet (densenet121/161/169/201) with TSC dense layers and a controller."""

    plain_class = DenseNet


class TSCCIFARDenseNet(_TSCDenseNet, CIFARDenseNet):
    plain_class = CIFARDenseNet


register_network(TSCDenseNet)
register_network(TSCCIFARDenseNet)


def cifar_densenet(depth: int = 40, growth_rate: int = 12, bc: bool = False, num_classes: int = 10,
                   tsc: str | None = "lstm", reduction: int | None = None, drop_rate: float = 0.0,
                   in_channels: int = 3, dt: float | None = None) -> nn.Module:
    """CIFAR DenseNet of ``depth`` (3n+4 with basic layers, 6n+4 with ``bc``: n layers per block),
    growth rate k; the TSC paper's DenseNet-40 is ``cifar_densenet(40, 12)`` (1,019,722 parameters
    for 10 classes; TSC_LSTM adds 1,413: 471 per dense block, D = 108, H = 3, C = 12).
    ``tsc=None`` gives the plain network, ``tsc="fixed"`` a constant step size ``dt``; ``reduction``:
    controller hidden size H = max(1, k // reduction); ``in_channels``: input channels (1 for grey images)."""
    _checks.tsc_mode(tsc, "tsc", allow_none=True)
    _checks.reduction(reduction)
    dt = _checks.fixed_dt(dt, tsc)
    _checks.positive_int(in_channels, "in_channels")
    _checks.flag(bc, "bc")
    _checks.positive_int(depth, "depth")
    _checks.positive_int(growth_rate, "growth_rate")
    _checks.positive_int(num_classes, "num_classes")
    per_layer = 2 if bc else 1
    if depth < 4 + 3 * per_layer or (depth - 4) % (3 * per_layer):
        raise ValueError(f"depth must be {3 * per_layer}n+4 with n >= 1 for a CIFAR DenseNet{'-BC' if bc else ''}, "
                         f"got {depth}")
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be a float in [0, 1), got {drop_rate!r}")
    model = CIFARDenseNet(depth, growth_rate, bc, num_classes, float(drop_rate), in_channels)
    return convert_if_requested(model, tsc, reduction, dt)


def _torchvision_densenet(name: str, tsc: str | None, reduction: int | None, kwargs: dict) -> nn.Module:
    import torchvision

    _checks.tsc_mode(tsc, "tsc", allow_none=True)
    _checks.reduction(reduction)
    kwargs.setdefault("weights", None)
    return convert_if_requested(getattr(torchvision.models, name)(**kwargs), tsc, reduction)


def densenet121(tsc: str | None = "lstm", reduction: int | None = None, **kwargs) -> nn.Module:
    """torchvision DenseNet-121 (kwargs go to torchvision.models.densenet121) with TSC dense layers."""
    return _torchvision_densenet("densenet121", tsc, reduction, kwargs)


def densenet161(tsc: str | None = "lstm", reduction: int | None = None, **kwargs) -> nn.Module:
    return _torchvision_densenet("densenet161", tsc, reduction, kwargs)


def densenet169(tsc: str | None = "lstm", reduction: int | None = None, **kwargs) -> nn.Module:
    return _torchvision_densenet("densenet169", tsc, reduction, kwargs)


def densenet201(tsc: str | None = "lstm", reduction: int | None = None, **kwargs) -> nn.Module:
    return _torchvision_densenet("densenet201", tsc, reduction, kwargs)
