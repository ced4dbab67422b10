"""tsc-kernels: fused kernels for the adaptive Time Stepping Controller (TSC) of residual networks.

Public API (see README.md):
    residual_update(y, f, dt, relu=False)    fused channel-wise Euler step
    weight_mean(weights)                      w̄ of one block (mean over C_in of each conv weight)
    lstm_controller(wbar, *params)            TSC_LSTM controller of one stage: wbar (L, D) -> Δt (L, C)
    available_backends(), set_backend(name), use_backend(name), get_backend()
    reference                                 the pure-PyTorch spec of every op
"""
from . import reference
from .backend import BackendUnavailableError, available_backends, get_backend, set_backend, use_backend
from .ops.residual_update import residual_update
from .ops.weight_mean import weight_mean
from .ops.lstm_controller import lstm_controller

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "get_backend",
    "lstm_controller",
    "reference",
    "residual_update",
    "set_backend",
    "use_backend",
    "weight_mean",
]
__version__ = "0.1.0"

# TSC networks (issue 4): model zoo, conversion of torchvision models, folding, diagnostics
from . import models
from .convert import convert
from .fold import fold
from .diagnostics import evolution_time, plot_step_sizes, stability_bound, step_sizes

__all__ += ["convert", "evolution_time", "fold", "models", "plot_step_sizes", "stability_bound", "step_sizes"]
