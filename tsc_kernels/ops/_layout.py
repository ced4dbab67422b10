"""Output layout rule of the residual update, the Python twin of csrc/channel_layout.h.

Fake (meta) kernels and the Triton launcher must produce exactly the strides the C++ kernels do:
channels-last-like inputs (channel dim innermost in memory, not plain contiguous) keep that
layout, everything else becomes contiguous.
"""
from __future__ import annotations

import torch


def is_channels_last_like(t: torch.Tensor) -> bool:
    return t.dim() > 2 and not t.is_contiguous() and t.movedim(1, -1).is_contiguous()


def to_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if not channels_last or t.dim() <= 2:
        return t.contiguous()
    if t.movedim(1, -1).is_contiguous():
        return t
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def output_like(t: torch.Tensor) -> torch.Tensor:
    """Uninitialised output with the strides the C++ kernels give it (empty_like of the normalised input)."""
    return torch.empty_like(to_layout(t, is_channels_last_like(t)))


def channel_view(t: torch.Tensor, channels_last: bool) -> tuple[int, int, int]:
    """(outer, C, inner) of the contiguous block the kernels see (see csrc/channel_layout.h)."""
    n, c = t.shape[0], t.shape[1]
    spatial = t.numel() // (n * c) if n * c else 0
    return (n * spatial, c, 1) if channels_last else (n, c, spatial)
