"""tsc-kernels: fused kernels for the adaptive Time Stepping Controller (TSC) of residual networks.

Public API (see README.md):
    residual_update(y, f, dt, relu=False)    fused channel-wise Euler step
    available_backends(), set_backend(name), use_backend(name), get_backend()
    reference                                 the pure-PyTorch spec of every op
"""
from . import reference
from .backend import BackendUnavailableError, available_backends, get_backend, set_backend, use_backend
from .ops.residual_update import residual_update

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "get_backend",
    "reference",
    "residual_update",
    "set_backend",
    "use_backend",
]
__version__ = "0.1.0"
