"""Argument checks of every public function: one API layer (as flash-attention does).

Each raises TypeError (wrong kind of object or dtype) or ValueError (wrong shape or value) naming
the argument and what was expected, before any kernel runs. An op's checks live beside its
declaration, as ``check_args`` in ``tsc_kernels/ops/<op>.py`` (with the generic helpers of
``tsc_kernels/ops/_common.py``); this module re-exports them as ``<op>_args`` and holds the checks
of the models, converters and modules. An op added later needs no line here: ``_checks.<op>_args``
finds its module's ``check_args`` (``__getattr__`` at the end).
"""
from __future__ import annotations

import sys

import torch

from .ops._common import FLOAT_DTYPES, flag, same_device, tensor
from .ops.batch_norm_residual_update import check_args as batch_norm_residual_update_args
from .ops.lstm_controller import CONTROLLER_DTYPES, LSTM_PARAM_NAMES, lstm_params_like
from .ops.lstm_controller import check_args as lstm_controller_args
from .ops.multistep_update import check_args as multistep_update_args
from .ops.ode_combine import MAX_STAGES as ODE_MAX_STAGES
from .ops.ode_combine import check_args as ode_combine_args
from .ops.residual_update import check_args as residual_update_args
from .ops.scale_concat import check_args as scale_concat_args
from .ops.weight_mean import check_args as weight_mean_args
from .ops.weight_mean import conv_in_channels, conv_weights, conv_weights_like, like_first_weight

__all__ = [
    # each op's checks (tsc_kernels/ops/<op>.py) and the helpers they share (tsc_kernels/ops/_common.py)
    "FLOAT_DTYPES", "flag", "same_device", "tensor", "batch_norm_residual_update_args", "CONTROLLER_DTYPES",
    "LSTM_PARAM_NAMES", "lstm_params_like", "lstm_controller_args", "multistep_update_args", "ODE_MAX_STAGES",
    "ode_combine_args", "residual_update_args", "scale_concat_args", "weight_mean_args", "conv_in_channels",
    "conv_weights", "conv_weights_like", "like_first_weight",
    # this module's own
    "TSC_MODES", "tsc_mode", "fixed_dt", "positive_int", "reduction", "cifar_depth", "module", "controller_config",
    "controller_wbar", "module_list",
]

# --- models, convert, fold, diagnostics (tsc_kernels.models / convert / fold / diagnostics) ---
TSC_MODES = ("lstm", "2fc", "indp", "fixed")  # "fixed": constant Δt = dt, no controller (docs/tsc.md)


def tsc_mode(mode: object, name: str = "mode", allow_none: bool = False) -> str | None:
    if mode is None and allow_none:
        return None
    if not isinstance(mode, str) or mode not in TSC_MODES:
        allowed = ", ".join(repr(m) for m in TSC_MODES) + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be one of {allowed}, got {mode!r}")
    return mode


def fixed_dt(dt: object, mode: object, name: str = "dt") -> float | None:
    """The constant step size of mode "fixed": a finite float > 0 (default 1.0); None for every other mode.

    Given together with another mode it is an error (it would be silently ignored).
    """
    if mode != "fixed":
        if dt is not None:
            raise ValueError(f"{name} only applies to tsc mode 'fixed' (a constant step size), "
                             f"got {name}={dt!r} with mode {mode!r}")
        return None
    if dt is None:
        return 1.0
    if isinstance(dt, bool) or not isinstance(dt, (float, int)):
        raise TypeError(f"{name} must be a float (the constant step size of mode 'fixed'), got {type(dt).__name__}")
    dt = float(dt)
    if not (0.0 < dt < float("inf")):
        raise ValueError(f"{name} must be a finite float > 0 (the constant step size of mode 'fixed'), got {dt}")
    return dt


def positive_int(x: object, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < 1:
        raise ValueError(f"{name} must be >= 1, got {x}")
    return x


def reduction(r: object) -> int | None:
    """Controller reduction ratio: None (the block's default) or a positive int."""
    return None if r is None else positive_int(r, "reduction")


def cifar_depth(depth: object, bottleneck: object) -> bool:
    """Checks a CIFAR ResNet depth; returns whether it uses bottleneck blocks (see models.cifar_resnet)."""
    positive_int(depth, "depth")
    if bottleneck is not None:
        flag(bottleneck, "bottleneck")
    basic_ok = depth >= 8 and (depth - 2) % 6 == 0
    bottleneck_ok = depth >= 11 and (depth - 2) % 9 == 0
    if bottleneck is None:
        if not (basic_ok or bottleneck_ok):
            raise ValueError(f"depth must be 6n+2 (basic blocks) or 9n+2 (bottlenecks) with n >= 1, got {depth}")
        return bottleneck_ok and (not basic_ok or depth > 110)
    if bottleneck and not bottleneck_ok:
        raise ValueError(f"a bottleneck CIFAR ResNet needs depth 9n+2 with n >= 1, got {depth}")
    if not bottleneck and not basic_ok:
        raise ValueError(f"a basic-block CIFAR ResNet needs depth 6n+2 with n >= 1, got {depth}")
    return bottleneck


def module(model: object, name: str) -> "torch.nn.Module":
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    return model


# --- tsc_kernels.nn: TSCController / NetworkController ---
def controller_config(in_features: object, channels: object, reduction: object, mode: object, num_blocks: object,
                      dt: object = None) -> float | None:
    """TSCController's constructor arguments: sizes >= 1, a known mode, num_blocks given for the per-block
    modes, dt only for mode "fixed". Returns the fixed step size (None for the other modes)."""
    positive_int(in_features, "in_features")
    positive_int(channels, "channels")
    positive_int(reduction, "reduction")
    tsc_mode(mode, "mode")
    dt = fixed_dt(dt, mode)
    if mode in ("2fc", "indp") and num_blocks is None:
        raise ValueError(f"num_blocks is required for mode {mode!r} (one set of parameters per block), got None")
    if num_blocks is not None:
        positive_int(num_blocks, "num_blocks")
    return dt


def controller_wbar(wbar: object, in_features: int, num_blocks: int | None, like: torch.Tensor) -> None:
    """A per-block (2fc / indp) controller's input: wbar (num_blocks, in_features), the parameters' dtype and device."""
    tensor(wbar, "wbar")
    if wbar.dim() != 2 or wbar.shape[1] != in_features or (num_blocks is not None and wbar.shape[0] != num_blocks):
        rows = "L" if num_blocks is None else str(num_blocks)
        raise ValueError(f"wbar must have shape (num_blocks, in_features) = ({rows}, {in_features}), "
                         f"got shape {tuple(wbar.shape)}")
    if wbar.dtype != like.dtype:
        raise TypeError(f"wbar must have the controller parameters' dtype {like.dtype}, got {wbar.dtype}")
    if wbar.device != like.device:
        raise ValueError(f"wbar must be on the controller parameters' device {like.device}, got {wbar.device}")


def module_list(modules: object, name: str, cls: type) -> list:
    """A non-empty list or tuple of `cls` modules."""
    if isinstance(modules, (torch.Tensor, str, cls)) or not hasattr(modules, "__iter__"):
        raise TypeError(f"{name} must be a list of {cls.__name__}, got {type(modules).__name__}")
    modules = list(modules)
    if len(modules) == 0:
        raise ValueError(f"{name} must hold at least one {cls.__name__}, got none")
    for i, m in enumerate(modules):
        if not isinstance(m, cls):
            raise TypeError(f"{name}[{i}] must be a {cls.__name__}, got {type(m).__name__}")
    return modules


def __getattr__(name: str):
    """``check_args`` of tsc_kernels/ops/<op>.py as ``<op>_args``, for an op not listed above."""
    op = name.removesuffix("_args")
    module = sys.modules.get(f"{__package__}.ops.{op}") if op != name and not op.startswith("_") else None
    if module is None or not hasattr(module, "check_args"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return module.check_args
