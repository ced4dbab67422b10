"""timm's ResNet family with TSC blocks (docs/timm.md): ``tsc_kernels.convert(timm.create_model(...))``.

timm is optional: ``import tsc_kernels`` never imports this module. ``convert`` imports it when it
is handed a model whose class lives in ``timm.*``; importing it registers timm's ``ResNet``,
``BasicBlock`` and ``Bottleneck`` with the block/network registries, exactly like this package's
own families.

A timm block computes ``act(shortcut + drop_path(attn(BN(...))))``. Its TSC version computes
``act(shortcut + drop_path(attn(BN(...))) ⊗ Δt)``: drop-path multiplies each sample by 0 or
1/keep and Δt each channel by a constant, so ``drop_path(F) ⊗ Δt == drop_path(F ⊗ Δt)`` and the
per-sample mask applies to ``F ⊗ Δt`` as timm applies it to F. Everything else of the branch
(``drop_block``, the anti-aliasing layer ``aa``, the attention module ``se``) runs where timm runs
it. The update is the fused ``residual_update`` with the ReLU fused when the block's final
activation is a plain ``nn.ReLU``; any other activation (``act_layer="silu"`` …) runs after an
update without ReLU.

Fold (``tsc_kernels.fold``) scales the last BN of F by Δt, as for torchvision blocks. An attention
module then reads the scaled BN output; fold undoes the scale where the module's gate reads it,
which is exact for timm's ``SEModule`` (``se.fc1``) and ``EffectiveSEModule`` (``se.fc``): both
squeeze by a per-channel mean (and optionally max, also positively homogeneous) before a 1x1 conv,
so dividing that conv's input columns by Δt (> 0) gives the gate of the unscaled input. Other
attention modules (ECA, CBAM, GatherExcite, GlobalContext, …) mix channels or positions before
their gate; fold raises a TypeError naming them (convert and training support them).
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint
from timm.layers import BatchNormAct2d, EffectiveSEModule, FrozenBatchNormAct2d, SEModule
from timm.models._features import feature_take_indices
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from .blocks import _TSCBlock, register_block
from .network import _TSCNetwork, register_network

# attention module type -> name of its first conv, whose input columns fold divides by Δt
_FOLDABLE_ATTENTION = {SEModule: "fc1", EffectiveSEModule: "fc"}


class _TimmBlock(_TSCBlock):
    """What timm's BasicBlock and Bottleneck share: attention and drop-path at the end of F, the
    final activation module (``act2`` / ``act3``), fold of the attention's gate."""

    final_act_name: str

    @property
    def post_activation(self) -> bool:  # read by _TSCBlock.forward: fuse the ReLU when it is one
        return type(getattr(self, self.final_act_name)) is nn.ReLU

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def _end_of_branch(self, out: torch.Tensor) -> torch.Tensor:
        if self.se is not None:
            out = self.se(out)
        if self.drop_path is not None:
            out = self.drop_path(out)  # per sample: commutes with the per-channel ⊗Δt
        return out

    def forward(self, x: torch.Tensor, dt: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(x, dt)
        return out if self.post_activation else getattr(self, self.final_act_name)(out)

    # fold (tsc_kernels.fold calls these around scaling the tail BN by Δt)
    def tsc_fold_check(self, name: str, dt: torch.Tensor) -> None:
        tail = getattr(self, self.tail_name)
        if isinstance(tail, (BatchNormAct2d, FrozenBatchNormAct2d)):
            raise TypeError(f"fold cannot fold Δt into {name}.{self.tail_name} ({type(tail).__name__}): a norm "
                            "layer with a built-in activation does not absorb a per-channel scale")
        if self.se is None:
            return
        if type(self.se) not in _FOLDABLE_ATTENTION:
            kinds = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in _FOLDABLE_ATTENTION)
            raise TypeError(f"fold cannot fold Δt through the attention module {name}.se "
                            f"({type(self.se).__module__}.{type(self.se).__qualname__}): its gate is not "
                            f"invariant to a per-channel input scale that fold can undo; foldable: {kinds}")
        if not bool((dt > 0).all()):
            raise ValueError(f"fold cannot fold SE block {name}: some of its Δt underflowed to 0")

    def tsc_fold_after_tail(self, dt: torch.Tensor) -> None:
        """The tail now outputs z·Δt: divide the gate's first conv's input columns by Δt so the
        gate sees avgpool(z) again, and the attention outputs z·Δt·gate(z)."""
        if self.se is None:
            return
        conv = getattr(self.se, _FOLDABLE_ATTENTION[type(self.se)])
        conv.weight.div_(dt.to(conv.weight.dtype).view(1, -1, 1, 1))


class TSCTimmBasicBlock(_TimmBlock, BasicBlock):
    plain_class = BasicBlock
    final_act_name = "act2"

    def _branch(self, x):  # timm's BasicBlock.forward up to the residual add
        out = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        return self._shortcut(x), self._end_of_branch(self.bn2(self.conv2(out)))


class TSCTimmBottleneck(_TimmBlock, Bottleneck):
    plain_class = Bottleneck
    final_act_name = "act3"
    default_reduction = 8
    controller_convs = ("conv1", "conv3")
    branch_conv_names = ("conv1", "conv2", "conv3")
    tail_name = "bn3"

    def _branch(self, x):  # timm's Bottleneck.forward up to the residual add
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(out)))))
        return self._shortcut(x), self._end_of_branch(self.bn3(self.conv3(out)))


class TSCTimmResNet(_TSCNetwork, ResNet):
    """timm ResNet / ResNeXt / SE-ResNet / Wide ResNet (any stem, downsample, aa, drop-path,
    drop-block) with TSC blocks. ``forward``, ``forward_features`` and ``forward_intermediates``
    run the controller once and hand every block its Δt; ``forward_head`` is timm's."""

    plain_class = ResNet
    stage_names = ("layer1", "layer2", "layer3", "layer4")

    def _run_stage(self, stage: nn.Sequential, dts, x: torch.Tensor) -> torch.Tensor:
        """The stage's blocks on x; dts: each block's Δt (one entry of block_step_sizes())."""
        checkpoint = self.grad_checkpointing and not torch.jit.is_scripting()
        for block, dt in zip(stage, dts):
            # timm's set_grad_checkpointing: recompute each block in the backward pass, as timm does
            x = torch.utils.checkpoint.checkpoint(block, x, dt, use_reentrant=False) if checkpoint else block(x, dt)
        return x

    def _run_blocks(self, x: torch.Tensor, step_sizes) -> torch.Tensor:
        # the stages of _TSCNetwork._forward_stages (a training step's weight aliases included),
        # each as timm runs it
        for stage, dts in zip(self.tsc_stages(), step_sizes):
            x = self._run_stage(stage, dts, x)
        return x

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_stages(self.maxpool(self._stem(x)))

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's ``forward_intermediates`` (stem output and every stage's output) with Δt."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(5, indices)
        intermediates = []
        x = self._stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        stages = list(zip(self.tsc_stages(), self.block_step_sizes()))
        if stop_early:
            stages = stages[:max_index]
        for index, (stage, dts) in enumerate(stages, start=1):
            x = self._run_stage(stage, dts, x)
            if index in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, *args, **kwargs):
        raise TypeError("prune_intermediate_layers would empty stages that the TSC controller steps through: "
                        "fold the model first (tsc_kernels.fold), then prune the plain timm ResNet")


for _cls in (TSCTimmBasicBlock, TSCTimmBottleneck):
    register_block(_cls)
register_network(TSCTimmResNet)
