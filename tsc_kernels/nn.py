"""Controller modules: one stage's TSCController and the network-level NetworkController.

Parameter names and layouts match nn.Linear / nn.LSTMCell (docs/tsc.md), so a controller's
state_dict is interchangeable with a plain PyTorch one.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from . import _checks
from .ops import lstm_controller as _controller

MODES = _checks.TSC_MODES  # "lstm", "2fc", "indp", "fixed"


def hidden_size(channels: int, reduction: int) -> int:
    """H = max(1, C // r) (docs/tsc.md)."""
    return max(1, channels // reduction)


def _autocast_off():
    """Disables autocast (CPU and CUDA) where it is on; a no-op otherwise.

    The controller runs in its parameters' dtype (fp32) under autocast (docs/ops.md: Δt is fp32):
    autocast would otherwise run nn.Linear (2fc) and the torch backend's reference ops (F.linear in
    the LSTM) in bf16/fp16. The fused C++/Triton ops are not autocast-aware and run fp32 anyway.
    """
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


class TSCController(nn.Module):
    """Δt controller of one stage: ``forward(wbar (L, D)) -> dt (L, C)``, values in (0, 1).

    mode "lstm": shared fc_in (Linear D->H), lstm (LSTMCell H->H), fc_out (Linear H->C), recurrent
    over the stage's blocks; "2fc": per-block fc_in[d], fc_out[d] (needs num_blocks); "indp": a free
    parameter theta (num_blocks, C) initialised to 0, dt = sigmoid(theta) (needs num_blocks); "fixed":
    no parameters, dt = ``dt`` (a float > 0, default 1.0) for every block and channel (the paper's
    constant-step baselines Δt = 1 and Δt = 0.01; ``dt`` is accepted for this mode only).
    """

    def __init__(self, in_features: int, channels: int, reduction: int = 4, mode: str = "lstm",
                 num_blocks: int | None = None, dt: float | None = None):
        dt = _checks.controller_config(in_features, channels, reduction, mode, num_blocks, dt)
        super().__init__()
        self.in_features, self.channels, self.reduction = in_features, channels, reduction
        self.mode, self.num_blocks = mode, num_blocks
        self.dt = dt  # the constant step size of mode "fixed", None otherwise
        self.hidden = hidden_size(channels, reduction)
        if mode == "lstm":
            self.fc_in = nn.Linear(in_features, self.hidden)
            self.lstm = nn.LSTMCell(self.hidden, self.hidden)
            self.fc_out = nn.Linear(self.hidden, channels)
        elif mode == "2fc":
            self.fc_in = nn.ModuleList(nn.Linear(in_features, self.hidden) for _ in range(num_blocks))
            self.fc_out = nn.ModuleList(nn.Linear(self.hidden, channels) for _ in range(num_blocks))
        elif mode == "indp":
            self.theta = nn.Parameter(torch.zeros(num_blocks, channels))

    def lstm_params(self) -> tuple[torch.Tensor, ...]:
        """The nine parameters of tsc_kernels.lstm_controller, in its argument order."""
        return (self.fc_in.weight, self.fc_in.bias, self.lstm.weight_ih, self.lstm.weight_hh,
                self.lstm.bias_ih, self.lstm.bias_hh, self.fc_out.weight, self.fc_out.bias)

    def fixed_step_sizes(self, num_blocks: int, like: torch.Tensor) -> torch.Tensor:
        """Mode "fixed": Δt (num_blocks, C) filled with ``dt``, in ``like``'s dtype and device (no kernel
        beyond the fill; the weights are not read)."""
        return torch.full((num_blocks, self.channels), self.dt, dtype=like.dtype, device=like.device)

    def forward(self, wbar: torch.Tensor) -> torch.Tensor:
        if self.mode == "fixed":  # no parameters to compare wbar with: its shape only
            _checks.controller_wbar(wbar, self.in_features, self.num_blocks, _checks.tensor(wbar, "wbar"))
            return self.fixed_step_sizes(wbar.shape[0], wbar)
        # wbar against this controller (D = in_features; L = num_blocks for the per-block modes,
        # any L >= 1 for the recurrent lstm), before any kernel runs
        like = self.theta if self.mode == "indp" else (self.fc_in if self.mode == "lstm" else self.fc_in[0]).weight
        _checks.controller_wbar(wbar, self.in_features, None if self.mode == "lstm" else self.num_blocks, like)
        with _autocast_off():  # fp32 controller under autocast
            if self.mode == "lstm":
                return _controller.lstm_controller(wbar, *self.lstm_params())
            if self.mode == "2fc":
                return torch.stack([torch.sigmoid(fo(torch.relu(fi(w))))
                                    for w, fi, fo in zip(wbar, self.fc_in, self.fc_out)])
            return torch.sigmoid(self.theta)

    def extra_repr(self) -> str:
        fixed = f", dt={self.dt}" if self.mode == "fixed" else ""
        return (f"in_features={self.in_features}, channels={self.channels}, hidden={self.hidden}, "
                f"mode={self.mode!r}{fixed}")


class NetworkController(nn.Module):
    """Every stage's controller; ``forward(weights)`` returns every block's Δt in one call (batched kernels).

    weights[s][d] is the list of conv weights block d of stage s declares (docs/tsc.md: basic block
    conv1, conv2; bottleneck conv1, conv3). Returns one (L_s, C_s) tensor per stage.
    """

    def __init__(self, stages: Sequence[TSCController]):
        stages = _checks.module_list(stages, "stages", TSCController)
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, weights: Sequence[Sequence[Sequence[torch.Tensor]]]) -> list[torch.Tensor]:
        # One weight_mean launch for every conv of every block, one controller launch for every
        # lstm stage (tsc_kernels.ops.lstm_controller.network_dt).
        with _autocast_off():  # fp32 controller under autocast
            return _controller.network_dt(weights, list(self.stages))
