"""The TSC network mixin (controller once per forward, every block gets its Δt), controller
construction from conv shapes, and the registry of TSC network classes that ``convert`` reads.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch import nn

from ..nn import NetworkController, TSCController
from . import blocks as _blocks

# --------------------------------------------------------------------------------------------------
# TSC networks
# --------------------------------------------------------------------------------------------------
class _TSCNetwork:
    """Mixin of TSC networks: runs ``self.tsc_controller`` once per forward and feeds every block its Δt.

    Made by ``tsc_kernels.convert`` (class swap of a plain network), which sets ``tsc_controller``,
    ``tsc_mode`` and ``_tsc_cache``.
    """

    plain_class: type
    stage_names: tuple[str, ...]
    tsc_controller: NetworkController

    def tsc_stages(self) -> list[nn.Sequential]:
        return [getattr(self, n) for n in self.stage_names]

    def tsc_named_blocks(self) -> Iterator[tuple[str, int, nn.Module]]:
        """(qualified block name, stage index, block) for every block, in forward order."""
        for s, name in enumerate(self.stage_names):
            for d, block in enumerate(getattr(self, name)):
                yield f"{name}.{d}", s, block

    def controller_inputs(self) -> list[list[list[torch.Tensor]]]:
        """weights[s][d]: the conv weights block d of stage s declares (NetworkController's input)."""
        return [[block.tsc_weights() for block in stage] for stage in self.tsc_stages()]

    def compute_step_sizes(self) -> list[torch.Tensor]:
        """Every stage's Δt, (L_s, C_s), freshly computed (differentiable when autograd is on)."""
        return self.tsc_controller(self.controller_inputs())

    def clear_step_size_cache(self) -> None:
        self._tsc_cache = None

    def _cache_key(self) -> tuple:
        tensors = [w for stage in self.controller_inputs() for ws in stage for w in ws]
        tensors += list(self.tsc_controller.parameters()) + list(self.tsc_controller.buffers())
        return (id(self.tsc_controller),) + tuple(
            (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in tensors)

    def stage_step_sizes(self) -> list[torch.Tensor]:
        """Δt for this forward pass: cached in eval mode without autograd (see the module docstring)."""
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.compute_step_sizes()
        key = self._cache_key()
        cache = getattr(self, "_tsc_cache", None)
        if cache is None or cache[0] != key:
            cache = (key, [dt.detach() for dt in self.compute_step_sizes()])
            self._tsc_cache = cache
        return cache[1]

    def _forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        for stage, dts in zip(self.tsc_stages(), self.stage_step_sizes()):
            # unbind, not dts[d]: its backward is one stack per stage, where L indexings would cost
            # a zeros + copy + add per block in the backward pass
            for block, dt in zip(stage, dts.unbind(0)):
                x = block(x, dt)
        return x


# plain network class -> its TSC subclass; every model family adds to it (register_network)
PLAIN_TO_TSC_NETWORK: dict[type, type] = {}


def register_network(tsc_cls: type) -> type:
    """Make ``tsc_cls`` (a TSC network, subclass of its ``plain_class``) known to convert."""
    PLAIN_TO_TSC_NETWORK[tsc_cls.plain_class] = tsc_cls
    return tsc_cls


def is_tsc_network(model: object) -> bool:
    return isinstance(model, _TSCNetwork)


def stage_shapes(stage: Sequence[nn.Module], stage_name: str) -> tuple[int, int, int]:
    """(L, C, D) of a stage of TSC-convertible blocks: blocks, Δt length, controller input length.

    D is read from the conv shapes: Σ over the declared convs of C_out·k1·k2 (docs/tsc.md).
    """
    shapes = set()
    for block in stage:
        tsc_cls = _blocks.PLAIN_TO_TSC_BLOCK.get(type(block), type(block))
        # the TSC class's conv names, read off the (maybe still plain) block
        weights = [getattr(block, n).weight for n in tsc_cls.controller_convs]
        channels = getattr(block, tsc_cls.branch_conv_names[-1]).out_channels
        shapes.add((channels, sum(w.shape[0] * math.prod(w.shape[2:]) for w in weights)))
    if len(shapes) != 1:
        raise ValueError(f"the blocks of {stage_name} must share one (channels, controller input size) "
                         f"to share a controller, got {sorted(shapes)}")
    (channels, in_features), = shapes
    return len(stage), channels, in_features


def _stage_blocks(stage: nn.Module) -> list[nn.Module]:
    """The blocks of a stage: an nn.Sequential's modules, or an nn.ModuleDict's values (DenseNet)."""
    return list(stage.values()) if isinstance(stage, nn.ModuleDict) else list(stage)


def build_controller(model: nn.Module, stage_names: Sequence[str], mode: str, reduction: int | None,
                     dt: float | None = None) -> NetworkController:
    """One controller per stage; stage names may be dotted paths (``features.denseblock1``)."""
    controllers = []
    for name in stage_names:
        stage = _stage_blocks(model.get_submodule(name))
        num_blocks, channels, in_features = stage_shapes(stage, name)
        r = reduction if reduction is not None else _blocks.PLAIN_TO_TSC_BLOCK.get(type(stage[0]), type(stage[0])).default_reduction
        controllers.append(TSCController(in_features, channels, reduction=r, mode=mode, num_blocks=num_blocks, dt=dt))
    ref = _stage_blocks(model.get_submodule(stage_names[0]))[0].conv1.weight
    return NetworkController(controllers).to(device=ref.device, dtype=ref.dtype)



def finish(model: nn.Module, tsc: str | None, reduction: int | None, dt: float | None = None) -> nn.Module:
    """The builders' last step: ``model`` as it is (tsc=None) or converted to TSC in place."""
    if tsc is None:
        return model
    from ..convert import convert  # convert imports this package

    return convert(model, mode=tsc, reduction=reduction, dt=dt)
