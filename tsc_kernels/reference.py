"""Pure-PyTorch reference of every tsc op: this file is the executable form of docs/ops.md.

Every backend (C++ CPU, CUDA, Triton) is tested against these functions. They favour clarity over
speed; the torch backend runs them as they are (through ``torch.library`` ops, see ``ops/``).
Inputs are assumed valid: argument checks live in ``tsc_kernels._checks`` (the API layer).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 arithmetic for fp32/fp16/bf16, fp64 for fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def residual_update(y: torch.Tensor, f: torch.Tensor, dt: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """``out = y + f * dt[c]`` (channel dim 1), then ReLU when ``relu``; computed in fp32 (fp64 for fp64)."""
    acc = accumulation_dtype(y.dtype)
    dt_b = dt.to(acc).view((1, -1) + (1,) * (y.dim() - 2))
    out = y.to(acc) + f.to(acc) * dt_b
    if relu:
        out = torch.relu(out)
    return out.to(y.dtype)


def scale_concat(x: torch.Tensor, f: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """``cat([x, f * dt[c]], dim=1)``: a dense layer's new features f scaled channel-wise by its
    step sizes and appended to its input x (TSC-DenseNet, docs/densenet.md). The product is computed
    in fp32 (fp64 for fp64) and rounded once to x's dtype."""
    acc = accumulation_dtype(x.dtype)
    dt_b = dt.to(acc).view((1, -1) + (1,) * (x.dim() - 2))
    return torch.cat([x, (f.to(acc) * dt_b).to(x.dtype)], dim=1)


def multistep_update(
    u: torch.Tensor,
    u_prev: torch.Tensor,
    f: torch.Tensor,
    k: torch.Tensor,
    dt: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """Linear multi-step update ``relu?((1 - k)·u + k·u_prev + (keep[n]·dt[c])·f)`` (LM-ResNet).

    k is 0-d; dt (C,) and keep (N,) default to 1. Computed in fp32 (fp64 for fp64); the output has
    u's dtype. The per-(sample, channel) factor keep[n]·dt[c] is formed first, as the kernels do.
    """
    acc = accumulation_dtype(u.dtype)
    scale = torch.ones((), dtype=acc, device=u.device)
    if dt is not None:
        scale = scale * dt.to(acc).view((1, -1) + (1,) * (u.dim() - 2))
    if keep is not None:
        scale = scale * keep.to(acc).view((-1,) + (1,) * (u.dim() - 1))
    k = k.to(acc)
    out = (1 - k) * u.to(acc) + k * u_prev.to(acc) + scale * f.to(acc)
    if relu:
        out = torch.relu(out)
    return out.to(u.dtype)


def ode_combine(z: torch.Tensor, stages: Sequence[torch.Tensor], coeffs: torch.Tensor) -> torch.Tensor:
    """One ODE solver stage combination ``z + sum_i coeffs[i] * stages[i]`` (docs/ode.md), terms added
    in stage order in fp32 (fp64 for fp64); the output has z's dtype."""
    acc = accumulation_dtype(z.dtype)
    out = z.to(acc)
    for i, k in enumerate(stages):
        out = out + coeffs[i].to(acc) * k.to(acc)
    return out.to(z.dtype)


def batch_norm_residual_update(
    y: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    relu: bool,
) -> torch.Tensor:
    """The fused BatchNorm tail of a residual block: ``relu?(y + dt[c] * F.batch_norm(x, ...))``.

    Exactly ``F.batch_norm``'s meaning (batch statistics when ``training``, the running ones
    otherwise; running statistics updated in place in training with the unbiased variance),
    computed in fp32 (fp64 for fp64 inputs); the output has y's dtype.
    """
    acc = accumulation_dtype(x.dtype)
    # Statistics in the accumulation dtype; a running buffer of another dtype is updated through a copy.
    stats = [None if t is None else t.to(acc) for t in (running_mean, running_var)]
    z = F.batch_norm(x.to(acc), stats[0], stats[1], None if weight is None else weight.to(acc),
                     None if bias is None else bias.to(acc), training, momentum, eps)
    for buf, new in zip((running_mean, running_var), stats):
        if buf is not None and new is not buf:
            buf.copy_(new)
    # z stays in the accumulation dtype: the update adds it to y before the one rounding to y's dtype
    return residual_update(y, z, dt, relu)


def weight_mean(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """w̄ of one block: each conv weight ``(C_out, C_in, *k)`` averaged over C_in, flattened, concatenated."""
    return torch.cat([w.mean(dim=1).reshape(-1) for w in weights])


def lstm_controller(
    wbar: torch.Tensor,
    fc_in_weight: torch.Tensor,
    fc_in_bias: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor,
    bias_hh: torch.Tensor,
    fc_out_weight: torch.Tensor,
    fc_out_bias: torch.Tensor,
) -> torch.Tensor:
    """TSC_LSTM for one stage: ``wbar (L, D) -> dt (L, C)``.

    ``x_d = relu(fc_in(w̄_d))``; ``h_d, c_d = LSTMCell(x_d, (h_{d-1}, c_{d-1}))`` with gate order
    (i, f, g, o) and ``h_0 = c_0 = 0``; ``dt_d = sigmoid(fc_out(h_d))``.
    """
    x = torch.relu(F.linear(wbar, fc_in_weight, fc_in_bias))
    hidden = weight_hh.shape[1]
    h = wbar.new_zeros(hidden)
    c = wbar.new_zeros(hidden)
    hs = []
    for d in range(wbar.shape[0]):
        gates = F.linear(x[d], weight_ih, bias_ih) + F.linear(h, weight_hh, bias_hh)
        i, fg, g, o = gates.chunk(4)
        c = torch.sigmoid(fg) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        hs.append(h)
    return torch.sigmoid(F.linear(torch.stack(hs), fc_out_weight, fc_out_bias))
