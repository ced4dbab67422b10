"""What every op's reference and argument checks share (tsc_kernels/ops/<op>.py).

The op modules import these from here, never from ``tsc_kernels.reference`` or ``tsc_kernels._checks``:
those two re-export every op's reference and checks, so importing them back would be an import cycle.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 arithmetic for fp32/fp16/bf16, fp64 for fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- argument checks: each raises TypeError (wrong kind of object or dtype) or ValueError (wrong
# shape or value) naming the argument and what was expected, before any kernel runs ---
def tensor(x: object, name: str, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(x.dtype).replace('torch.', '')}")
    return x


def flag(x: object, name: str) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return x


def same_device(named: dict) -> None:
    devices = {n: t.device for n, t in named.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")
