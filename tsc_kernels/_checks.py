"""Argument checks of every public function, gathered in one API layer (as flash-attention does).

Each raises TypeError (wrong kind of object or dtype) or ValueError (wrong shape or value) naming
the argument and what was expected, before any kernel runs.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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


def residual_update_args(y: object, f: object, dt: object, relu: object) -> None:
    tensor(y, "y")
    tensor(f, "f")
    flag(relu, "relu")
    if not 2 <= y.dim() <= 5:
        raise ValueError(f"y must have shape (N, C, *spatial) with 0 to 3 spatial dims, got shape {tuple(y.shape)}")
    if f.dtype != y.dtype:
        raise TypeError(f"f must have y's dtype {y.dtype}, got {f.dtype}")
    if f.shape != y.shape:
        raise ValueError(f"f must have y's shape {tuple(y.shape)}, got {tuple(f.shape)}")
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    tensor(dt, "dt", (acc,))
    if dt.dim() != 1 or dt.shape[0] != y.shape[1]:
        raise ValueError(f"dt must have shape (C,) = ({y.shape[1]},) matching y's channel dim 1, got {tuple(dt.shape)}")
    same_device({"y": y, "f": f, "dt": dt})
