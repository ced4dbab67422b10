"""tsc-kernels: fused kernels for the adaptive Time Stepping Controller (TSC) of residual networks.

Public API (see README.md):
    residual_update(y, f, dt, relu=False)    fused channel-wise Euler step y + f * dt[c]
    scale_concat(x, f, dt)                    fused cat([x, f * dt[c]], dim=1) (TSC-DenseNet)
    multistep_update(u, u_prev, f, k, ...)   fused LM-ResNet step (1-k)u + k u_prev + keep dt f
    batch_norm_residual_update(y, x, dt, ...) the fused BatchNorm tail relu?(y + dt[c] * batch_norm(x))
    weight_mean(weights)                      w̄ of one block (mean over C_in of each conv weight)
    lstm_controller(wbar, *params)            TSC_LSTM controller of one stage: wbar (L, D) -> Δt (L, C)
    nn.TSCController, nn.NetworkController    controller modules (every block's Δt in one batched call)
    models.*                                  TSC ResNets (torchvision names) and CIFAR ResNets
    convert(model), fold(model)               torchvision/timm ResNet -> TSC; TSC -> plain network for inference
    step_sizes, evolution_time, stability_bound, plot_step_sizes   diagnostics
    lm_coefficients(model)                    learned k_n of an LM-ResNet (beside step_sizes)
    available_backends(), set_backend(name), use_backend(name), get_backend()
    info()                                    versions, the extension's build, each backend or why it is missing
    ode_combine(z, stages, coeffs)            fused ODE solver update z + sum_i coeffs[i] * stages[i]
    ode.ODEBlock, ode.refine, ode.ode_consistency, ode.StepAdaptation   the ODE view (docs/ode.md)
    reference                                 the pure-PyTorch spec of every op
"""
from . import models, nn, ode, reference
from .backend import BackendUnavailableError, available_backends, get_backend, set_backend, use_backend
from .convert import convert
from .diagnostics import evolution_time, plot_step_sizes, stability_bound, step_sizes
from .fold import fold
from ._info import info
from .models.lm_resnet import lm_coefficients
from .ops.batch_norm_residual_update import batch_norm_residual_update
from .ops.lstm_controller import lstm_controller
from .ops.multistep_update import multistep_update
from .ops.ode_combine import ode_combine
from .ops.residual_update import residual_update
from .ops.scale_concat import scale_concat
from .ops.weight_mean import weight_mean

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "batch_norm_residual_update",
    "convert",
    "evolution_time",
    "fold",
    "info",
    "get_backend",
    "lm_coefficients",
    "lstm_controller",
    "models",
    "multistep_update",
    "nn",
    "ode",
    "ode_combine",
    "plot_step_sizes",
    "reference",
    "residual_update",
    "scale_concat",
    "set_backend",
    "stability_bound",
    "step_sizes",
    "use_backend",
    "weight_mean",
]
from ._version import __version__ as __version__  # the public version (re-exported)
