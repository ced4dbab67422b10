"""Pure-PyTorch reference of every tsc op: the executable form of docs/ops.md.

Each op's reference lives beside its declaration, as ``reference`` in ``tsc_kernels/ops/<op>.py``
(one implementation: this module re-exports them under the ops' names, so
``tsc_kernels.reference.<op>`` is the same function). Every backend (C++ CPU, CUDA, Triton) is
tested against these functions. They favour clarity over speed; the torch backend runs them as
they are (through ``torch.library`` ops, see ``ops/``). Inputs are assumed valid: argument checks
live beside them (``check_args``, re-exported by ``tsc_kernels._checks``).

An op added later needs no line here: ``tsc_kernels.reference.<op>`` finds its module's ``reference``
(``__getattr__`` below; the names listed are the ops of the first release, for readers and linters).
"""
from __future__ import annotations

import sys

from .ops._common import accumulation_dtype
from .ops.batch_norm_residual_update import reference as batch_norm_residual_update
from .ops.lstm_controller import reference as lstm_controller
from .ops.multistep_update import reference as multistep_update
from .ops.ode_combine import reference as ode_combine
from .ops.residual_update import reference as residual_update
from .ops.scale_concat import reference as scale_concat
from .ops.weight_mean import reference as weight_mean

__all__ = [
    "accumulation_dtype", "batch_norm_residual_update", "lstm_controller", "multistep_update", "ode_combine",
    "residual_update", "scale_concat", "weight_mean",
]


def __getattr__(name: str):
    """``reference`` of tsc_kernels/ops/<name>.py for an op not listed above (declared, so imported)."""
    module = sys.modules.get(f"{__package__}.ops.{name}") if not name.startswith("_") else None
    if module is None or not hasattr(module, "reference"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return module.reference
