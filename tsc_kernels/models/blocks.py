"""Residual blocks: the plain blocks this library adds to torchvision's (SE, pre-activation) and the
TSC blocks, subclasses of plain blocks with the same submodules whose forward takes the block's Δt.

New block families register their TSC class with ``register_block`` so that ``convert`` and
``fold`` find them.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1, conv3x3
from torchvision.ops import SqueezeExcitation

from .. import _checks
from ..ops.batch_norm_residual_update import batch_norm_residual_update
from ..ops.registry import eager_op
from ..ops.residual_update import residual_update

# Tails the fused BatchNorm tail replaces exactly: plain BatchNorm (not SyncBatchNorm, whose
# statistics cross processes, nor subclasses with a forward of their own).
FUSABLE_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# The input dims each fusable norm accepts (its _check_input_dim), checked before the fused op.
_NORM_DIMS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}


def batch_norm_tail(bn: nn.modules.batchnorm._BatchNorm, shortcut: torch.Tensor, x: torch.Tensor, dt: torch.Tensor,
                    relu: bool) -> torch.Tensor:
    """``relu?(shortcut + dt * bn(x))`` in one fused op, with ``nn.BatchNorm*.forward``'s exact
    bookkeeping: training/eval, ``momentum=None`` (cumulative average), ``track_running_stats``
    and ``num_batches_tracked``.

    A block's own call: like ``nn.BatchNorm2d.forward`` calling ``F.batch_norm``, it goes straight
    to the op (one Python frame, the backend looked up in dispatch's cache). On the cpu / cuda
    backends the argument checks of the public ``batch_norm_residual_update`` run only when the op
    fails, to name the argument: what the block passes (shapes fixed at construction, dtypes it
    produced) cannot fail them, and what a caller can get wrong (Δt's shape, dtype or device, say)
    fails the C++ op, which checks every shape, dtype and device first. The Triton launchers and
    the reference do not, so on those backends the checks run before the op, as before.
    """
    if x.dim() not in _NORM_DIMS.get(type(bn), ()):
        bn._check_input_dim(x)
    # the module's buffers and parameters read from its dicts: nn.Module.__getattr__ is a Python
    # call per attribute (they are None where the module has none, as its attributes)
    buffers, params = bn._buffers, bn._parameters
    training = bn.training
    momentum = bn.momentum
    factor = 0.0 if momentum is None else momentum
    running_mean, running_var = buffers["running_mean"], buffers["running_var"]
    if training and bn.track_running_stats:
        tracked = buffers["num_batches_tracked"]
        if tracked is not None:
            tracked.add_(1)
            if momentum is None:  # cumulative moving average
                factor = 1.0 / float(tracked)
    use_batch_stats = training or (running_mean is None and running_var is None)
    if training and not bn.track_running_stats:
        running_mean = running_var = None
    eps = bn.eps
    args = (shortcut, x, dt, running_mean, running_var, params["weight"], params["bias"], use_batch_stats,
            float(factor), float(eps), relu)
    if torch.compiler.is_compiling():
        return batch_norm_residual_update(*args)
    op, kernel_checks = eager_op("batch_norm_residual_update", x.device)
    if not (kernel_checks and 0.0 <= factor <= 1.0 and eps > 0.0):  # what the C++ op does not check
        _checks.batch_norm_residual_update_args(*args)
    try:
        out = op(*args)
    except Exception:
        # the message that names the argument, from the public op's checks; else the op's own error
        _checks.batch_norm_residual_update_args(*args)
        raise
    return out[0] if isinstance(out, tuple) else out  # the fused ops also return their saved statistics


def residual_tail(shortcut: torch.Tensor, out: torch.Tensor, dt: torch.Tensor, relu: bool) -> torch.Tensor:
    """``relu?(shortcut + out * dt)`` for a block: residual_update straight to the op, its checks
    only when the op fails (as batch_norm_tail)."""
    if torch.compiler.is_compiling():
        return residual_update(shortcut, out, dt, relu=relu)
    op, kernel_checks = eager_op("residual_update", out.device)
    if not kernel_checks:
        _checks.residual_update_args(shortcut, out, dt, relu)
    try:
        return op(shortcut, out, dt, relu)
    except Exception:
        _checks.residual_update_args(shortcut, out, dt, relu)
        raise

# --------------------------------------------------------------------------------------------------
# Plain blocks this module adds (torchvision has BasicBlock and Bottleneck)
# --------------------------------------------------------------------------------------------------
class SEBottleneck(Bottleneck):
    """torchvision Bottleneck with squeeze-excitation (``self.se``) after bn3, before the residual add."""

    se_reduction = 16

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None):
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
    controller_convs: tuple[str, ...] = ("conv1", "conv2")  # the convs w̄ reads (docs/tsc.md)
    branch_conv_names: tuple[str, ...] = ("conv1", "conv2")  # every conv of F, in order
    tail_name = "bn2"  # the last layer of F before ⊗Δt (fold scales it)

    def tsc_weights(self) -> list[torch.Tensor]:
        return [getattr(self, n).weight for n in self.controller_convs]

    def branch_convs(self) -> list[nn.Conv2d]:
        return [getattr(self, n) for n in self.branch_conv_names]

    # fold hooks (tsc_kernels.fold), for blocks whose F reads the tail's output again (attention)
    def tsc_fold_check(self, name: str, dt: torch.Tensor) -> None:
        """Raise if fold cannot fold ``dt`` into this block; called before fold changes anything."""

    def tsc_fold_after_tail(self, dt: torch.Tensor) -> None:
        """Called after fold scaled the tail by ``dt``: undo the scale where a later layer of F reads it."""

    def forward(self, x, dt=None):
        if dt is None:
            raise RuntimeError(
                f"{type(self).__name__} needs its step sizes: call the whole TSC network (it runs the "
                "controller and passes every block its Δt), or call block(x, dt) with dt of shape (C,)")
        tail = self._modules.get(self.tail_name)  # the tail is a submodule (nn.Module.__getattr__ would look here)
        fused_tail = self.fused_bn_tail and type(tail) in FUSABLE_NORMS
        # with a plain BatchNorm tail, F stops before it: the tail runs fused with ⊗Δt and the update
        shortcut, out = self._branch_before_tail(x) if fused_tail else self._branch(x)
        if shortcut.dtype != out.dtype and torch.is_autocast_enabled(out.device.type):
            # Under autocast the branch's convs give bf16/fp16 while an fp32 input can reach the
            # shortcut unchanged (a block fed fp32 activations): the update runs in the branch's
            # dtype, as torchvision's `out += identity` does, instead of failing residual_update's
            # same-dtype check.
            shortcut = shortcut.to(out.dtype)
        # the update takes fp32 Δt (fp64 with fp64 activations) whatever the controller's dtype
        acc = torch.float64 if out.dtype == torch.float64 else torch.float32
        if not (isinstance(dt, torch.Tensor) and dt.dtype == acc):
            dt = _checks.tensor(dt, "dt").to(acc)
        if fused_tail:
            return batch_norm_tail(tail, shortcut, out, dt, self.post_activation)
        return residual_tail(shortcut, out, dt, self.post_activation)

    # Blocks whose F ends with its tail BatchNorm (tail_name) set this and define
    # _branch_before_tail(x) -> (shortcut, input of the tail); _branch then follows from it.
    fused_bn_tail = False

    def _branch(self, x):
        # self may be the plain block: LM-ResNets and ode.refine run a TSC class's F on plain blocks
        cls = PLAIN_TO_TSC_BLOCK.get(type(self), type(self))
        shortcut, out = cls._branch_before_tail(self, x)
        return shortcut, getattr(self, cls.tail_name)(out)


class TSCBasicBlock(_TSCBlock, BasicBlock):
    plain_class = BasicBlock
    fused_bn_tail = True

    def _branch_before_tail(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return (x if self.downsample is None else self.downsample(x)), self.conv2(out)


class TSCBottleneck(_TSCBlock, Bottleneck):
    plain_class = Bottleneck
    default_reduction = 8
    controller_convs = ("conv1", "conv3")
    branch_conv_names = ("conv1", "conv2", "conv3")
    tail_name = "bn3"
    fused_bn_tail = True

    def _branch_before_tail(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return (x if self.downsample is None else self.downsample(x)), self.conv3(out)


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


# plain block class -> its TSC subclass; every block family adds to it (register_block)
PLAIN_TO_TSC_BLOCK: dict[type, type] = {}


def register_block(tsc_cls: type) -> type:
    """Make ``tsc_cls`` (a TSC block, subclass of its ``plain_class``) known to convert and fold."""
    PLAIN_TO_TSC_BLOCK[tsc_cls.plain_class] = tsc_cls
    return tsc_cls


def is_tsc_block(module: object) -> bool:
    return isinstance(module, _TSCBlock)


for _cls in (TSCBasicBlock, TSCBottleneck, TSCSEBottleneck, TSCPreActBasicBlock, TSCPreActBottleneck):
    register_block(_cls)
