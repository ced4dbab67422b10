"""The TSC network mixin (controller once per forward, every block gets its Δt), controller
construction from conv shapes, and the registry of TSC network classes that ``convert`` reads.
"""
from __future__ import annotations

import math
import operator
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules import module as _module

from ..nn import NetworkController, TSCController, _autocast_off
from ..ops.lstm_controller import NetworkPlan
from . import blocks as _blocks

# TSCController.lstm_params() as paths in the controller's submodules (its fast form, below)
_LSTM_PARAM_PATHS = (("fc_in", "weight"), ("fc_in", "bias"), ("lstm", "weight_ih"), ("lstm", "weight_hh"),
                     ("lstm", "bias_ih"), ("lstm", "bias_hh"), ("fc_out", "weight"), ("fc_out", "bias"))

# --------------------------------------------------------------------------------------------------
# TSC networks
# --------------------------------------------------------------------------------------------------
class _TSCNetwork:
    """Mixin of TSC networks: runs ``self.tsc_controller`` once per forward and feeds every block its Δt.

    Made by ``tsc_kernels.convert`` (models/conversion.py: class swap of a plain network), which sets
    ``tsc_controller``, ``tsc_mode`` and ``_tsc_cache``.
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

    def block_step_sizes(self) -> list[Sequence[torch.Tensor]]:
        """Every block's Δt for this forward pass, stage by stage: ``[[(C_s,) per block] per stage]``.

        A training step (autograd on, not compiling) takes the fast path: the network's
        ``NetworkPlan`` (checked once, reused while the conv weights and controller parameters are
        the same tensors) runs the controller in two launches and splits Δt into the blocks' views
        in one op, whose backward is one cat (per-stage tensors unbound per block cost a view, an
        unbind and a stack per stage). Otherwise (eval without autograd: cached; under
        torch.compile: traced once) the per-stage tensors of ``stage_step_sizes`` unbound.
        """
        return self._step_sizes(aliased=False)[0]

    def _step_sizes(self, aliased: bool) -> tuple:
        """(block_step_sizes(), swap): swap is None, or with ``aliased`` on the plan's eager path
        on a C++ backend (the convs' parameter dicts, their weights, the aliases the convs read in this
        forward instead of the weights: NetworkPlan.run, _forward_stages)."""
        if (self.training or torch.is_grad_enabled()) and not torch.compiler.is_compiling():
            planned = self._planned_step_sizes(aliased)
            if planned is not None:
                return planned
        # unbind, not dts[d]: its backward is one stack per stage, where L indexings would cost
        # a zeros + copy + add per block in the backward pass
        return [dts.unbind(0) for dts in self.stage_step_sizes()], None

    def _controller_tensors(self):
        """(conv weights, lstm parameters) that ``controller_inputs()`` and the stages'
        ``lstm_params()`` return, flat, read straight from the modules' parameter dicts (a tenth of
        the time); None where a block, a controller or a hook asks for the general path."""
        ctrl = self._modules.get("tsc_controller")
        if not _runs_network_dt(ctrl):
            return None
        try:
            blocks = [block for stage in self.tsc_stages() for block in stage._modules.values()]
            # blocks whose tsc_weights() is _TSCBlock's (their controller_convs' weights): another
            # may compute anything. One set, not a call per block (the host cost stays O(1) calls).
            if {type(block).tsc_weights for block in blocks} != _DEFAULT_TSC_WEIGHTS:
                return None
            dicts = [block._modules[n]._parameters for block in blocks for n in type(block).controller_convs]
            weights = list(map(_WEIGHT, dicts))  # no Python frame per weight (test_host_budget)
            params = [c._modules[m]._parameters[p] for c in ctrl._modules["stages"]._modules.values()
                      if c.mode == "lstm" for m, p in _LSTM_PARAM_PATHS]
        except (KeyError, AttributeError):  # a parametrized conv (no "weight" parameter), another stage kind
            return None
        return ctrl, weights, params, dicts

    def _fixed_plan_holds(self, ctrl, plan: NetworkPlan) -> bool:
        """Whether a "fixed" network's plan still stands, checked without reading its conv weights:
        its Δt are constants that depend on no weight, valid while the controller is the same
        unhooked one, the stages hold the same blocks and the first conv weight the plan was built
        from is still the first block's, on the plan's device and dtype (``.to()`` moves it in
        place). Walking every block's conv weights per step cost ~0.1 ms inside a training step,
        whose activations and gradients have evicted those objects from the cache since the last
        step. False: the general path decides."""
        if not _runs_network_dt(ctrl):
            return False
        stages = tuple(tuple(stage._modules.values()) for stage in self.tsc_stages())
        if stages != plan.network_blocks or not stages or not stages[0]:
            return False
        first, w = stages[0][0], plan.weights[0]
        return (first._modules[type(first).controller_convs[0]]._parameters.get("weight") is w
                and w.device == plan.device and w.dtype == plan.dtype)

    def _planned_step_sizes(self, aliased: bool):
        """(every block's Δt by the network's plan, stage by stage; swap: see _step_sizes); None
        for the general path."""
        ctrl = self._modules.get("tsc_controller")
        plan = None if ctrl is None else ctrl.__dict__.get("_plan")
        swap = None
        if type(plan) is NetworkPlan and plan.fixed and self._fixed_plan_holds(ctrl, plan):
            dts = plan.run((), ())
        else:
            plan, dts, swap = self._run_plan(aliased)
            if dts is None:
                return None
        out, start = [], 0
        for L in plan.blocks:
            out.append(dts[start:start + L])
            start += L
        return out, swap

    def _run_plan(self, aliased: bool) -> tuple:
        """(the plan, every block's Δt, swap: see _planned_step_sizes) after checking the plan
        against the network's tensors (building it where it is missing or stale); (None, None,
        None) for the general path."""
        tensors = self._controller_tensors()
        if tensors is None:
            return None, None, None
        ctrl, weights, params, dicts = tensors
        # the plan lives with the controller (fold, which drops the controller, drops it too)
        plan = ctrl.__dict__.get("_plan")
        if plan is _MIXED:  # some stages are 2fc / indp, or mix modes: network_dt every step
            return None, None, None
        if plan is None or not plan.matches(weights, params):
            # network_dt's checks, with their messages, then the plan (None: mixed controller modes)
            plan = NetworkPlan.build(self.controller_inputs(), list(ctrl.stages))
            ctrl.__dict__["_plan"] = _MIXED if plan is None else plan
            if plan is None:
                return None, None, None
            # the blocks the plan was built for (_fixed_plan_holds compares them)
            plan.network_blocks = tuple(tuple(stage._modules.values()) for stage in self.tsc_stages())
        try:
            if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
                with _autocast_off():  # the controller runs fp32 (NetworkController.forward)
                    dts = plan.run(weights, params, aliased)
            else:
                dts = plan.run(weights, params, aliased)
        except Exception:
            # a weight changed dtype, device or shape in place: network_dt's checks name it
            ctrl.__dict__["_plan"] = None
            return None, None, None
        if not aliased:
            return plan, dts, None
        dts, aliases = dts
        return plan, dts, (dicts, weights, aliases) if aliases else None

    def _forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        # A training step on the plan: the controller's convs read their weights through aliases
        # made by w̄'s autograd node, put in their parameter dicts for this forward only (the node
        # then adds each weight's w̄ gradient into its conv's gradient: NetworkPlan.run). An
        # instance's own block_step_sizes (tsc-bench's tsc-leafdt) gives its Δt.
        if "block_step_sizes" in self.__dict__:
            return self._run_blocks(x, self.block_step_sizes())
        step_sizes, swap = self._step_sizes(aliased=True)
        if swap is None:
            return self._run_blocks(x, step_sizes)
        return call_reading_aliases(*swap, self._run_blocks, x, step_sizes)

    def _run_blocks(self, x: torch.Tensor, step_sizes) -> torch.Tensor:
        for stage, dts in zip(self.tsc_stages(), step_sizes):
            for block, dt in zip(stage, dts):
                x = block(x, dt)
        return x


def call_reading_aliases(dicts: Sequence[dict], weights: Sequence[torch.Tensor], aliases: Sequence[torch.Tensor],
                         fn, *args):
    """fn(*args) with aliases[j] as the "weight" of the module whose parameter dict is dicts[j]
    (a training step's weight aliases: NetworkPlan.run), weights[j] (its Parameter) put back after,
    also when fn fails."""
    for d, alias in zip(dicts, aliases):
        d["weight"] = alias
    try:
        return fn(*args)
    finally:
        for d, weight in zip(dicts, weights):
            d["weight"] = weight


_WEIGHT = operator.itemgetter("weight")
_MIXED = object()  # the plan of a controller whose stages NetworkPlan does not cover


def _runs_network_dt(ctrl) -> bool:
    """Whether a plan may stand for ``ctrl``'s forward: a NetworkController whose forward is not
    replaced (a subclass, an instance attribute) or hooked."""
    return type(ctrl) is NetworkController and not (
        "forward" in ctrl.__dict__ or ctrl._forward_hooks or ctrl._forward_pre_hooks
        or _module._global_forward_hooks or _module._global_forward_pre_hooks)


_DEFAULT_TSC_WEIGHTS = {_blocks._TSCBlock.tsc_weights}


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
        if reduction is not None:
            r = reduction
        else:
            r = _blocks.PLAIN_TO_TSC_BLOCK.get(type(stage[0]), type(stage[0])).default_reduction
        controllers.append(TSCController(in_features, channels, reduction=r, mode=mode, num_blocks=num_blocks, dt=dt))
    ref = _stage_blocks(model.get_submodule(stage_names[0]))[0].conv1.weight
    return NetworkController(controllers).to(device=ref.device, dtype=ref.dtype)
