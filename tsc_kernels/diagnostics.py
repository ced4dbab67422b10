"""Diagnostics of a TSC network's time stepping: step sizes, evolution time, the stability bound, a plot.

All read Δt from the weights (a fresh controller pass under ``torch.no_grad``, whatever the mode).
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from . import _checks
from .models import is_tsc_network


def _tsc_network(model: object, what: str) -> nn.Module:
    _checks.module(model, "model")
    if not is_tsc_network(model):
        raise TypeError(f"{what} needs a TSC network (from tsc_kernels.models with tsc set, or tsc_kernels.convert), "
                        f"got {type(model).__module__}.{type(model).__qualname__}")
    return model


def step_sizes(model: nn.Module) -> dict[str, torch.Tensor]:
    """Δt of every block: ``{"layer1.0": Tensor(C), ...}`` in forward order (fp32 copies, no grad)."""
    _tsc_network(model, "step_sizes")
    with torch.no_grad():
        dts = model.compute_step_sizes()
    flat = [dt for stage_dt in dts for dt in stage_dt]
    return {name: dt.detach().float().clone() for (name, _, _), dt in zip(model.tsc_named_blocks(), flat)}


def evolution_time(model: nn.Module) -> dict[str, float]:
    """Evolution time T of each stage: Σ over its blocks of the block's mean Δt (``{"layer1": T, ...}``)."""
    _tsc_network(model, "evolution_time")
    times = {name: 0.0 for name in model.stage_names}
    for block_name, dt in step_sizes(model).items():
        times[block_name.rsplit(".", 1)[0]] += float(dt.double().mean())
    return times


def spectral_norm(conv: nn.modules.conv._ConvNd, iterations: int = 100, tol: float = 1e-7) -> float:
    """‖W‖₂ of a conv's weight reshaped to (C_out, C_in·k1·k2), by power iteration on WᵀW.

    Any conv dimension (Conv1d: (C_out, C_in·k)); the kernel dims are flattened alike.

    For a grouped conv that matrix is block diagonal (zeros across groups), so its norm is the largest
    of the groups' norms; each group's (C_out/g, C_in/g·k1·k2) block is iterated at once, batched.
    Stops once the estimate changes by less than ``tol`` (relative). Deterministic (fixed start).
    The estimate approaches ‖W‖₂ from below; on random (Kaiming) conv weights, where the top
    singular values are close, 100 iterations are within ~1e-3 and 1000 within ~1e-5.
    """
    w = conv.weight.detach().double()
    g = conv.groups
    mats = w.reshape(g, w.shape[0] // g, -1)  # (groups, C_out/g, C_in/g·k·k)
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(mats.shape[0], mats.shape[2], 1, generator=gen, dtype=torch.float64).to(w.device)
    sigma = torch.zeros(g, dtype=torch.float64, device=w.device)
    for _ in range(iterations):
        u = mats @ v
        v = mats.transpose(1, 2) @ u
        norm = v.norm(dim=1, keepdim=True)
        v = v / norm.clamp_min(1e-300)
        new_sigma = norm.squeeze(-1).squeeze(-1).sqrt()  # ‖WᵀW v‖ -> σ² for a converged unit v
        done = bool(((new_sigma - sigma).abs() <= tol * new_sigma).all())
        sigma = new_sigma
        if done:
            break
    return float(sigma.max())


def stage_stability_bounds(model: nn.Module, iterations: int = 100) -> dict[str, float]:
    """``stability_bound``'s product restricted to each stage: ``{"layer1": bound, ...}``.

    The network's bound is the product of these (perturbations grow stage after stage).
    """
    _tsc_network(model, "stage_stability_bounds")
    _checks.positive_int(iterations, "iterations")
    dts = step_sizes(model)
    logs = {name: 0.0 for name in model.stage_names}
    for name, s, block in model.tsc_named_blocks():
        mean_dt = float(dts[name].double().mean())
        for conv in block.branch_convs():
            logs[model.stage_names[s]] += math.log1p(spectral_norm(conv, iterations) * mean_dt)
    return {name: (math.exp(v) if v < 709.0 else math.inf) for name, v in logs.items()}


def stability_bound(model: nn.Module, iterations: int = 100) -> float:
    """∏ over blocks ∏ over the block's residual-branch convs of (1 + ‖W‖₂ · mean Δt).

    The perturbation growth bound of the TSC paper's Proposition 1 (Eq. 7), with each conv's weight
    as a (C_out, C_in·k1·k2) matrix (``spectral_norm``) and one factor per conv of the branch
    (shortcut projections excluded). Accumulated in log space; ``inf`` when the product overflows.
    """
    _tsc_network(model, "stability_bound")
    _checks.positive_int(iterations, "iterations")
    log_bound = sum(math.log(b) for b in stage_stability_bounds(model, iterations).values())
    return math.exp(log_bound) if log_bound < 709.0 else math.inf


def plot_step_sizes(model: nn.Module, path: str | os.PathLike | None = None):
    """Plot Δt per block (mean line, min–max band, stage boundaries); save to ``path`` if given.

    Needs matplotlib (``pip install tsc-kernels[plot]``). Uses matplotlib's object API with the Agg
    canvas, so it changes no global pyplot state. Returns the matplotlib Figure.
    """
    _tsc_network(model, "plot_step_sizes")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot_step_sizes needs matplotlib: pip install matplotlib "
                          "(or pip install 'tsc-kernels[plot]')") from e
    dts = step_sizes(model)
    names = list(dts)
    x = list(range(len(names)))
    fig = Figure(figsize=(max(6.0, 0.25 * len(names)), 3.5), layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.fill_between(x, [float(d.min()) for d in dts.values()], [float(d.max()) for d in dts.values()],
                    alpha=0.25, label="min–max over channels")
    ax.plot(x, [float(d.mean()) for d in dts.values()], marker="o", markersize=3, label="mean Δt")
    stages = [n.rsplit(".", 1)[0] for n in names]
    for i in range(1, len(names)):
        if stages[i] != stages[i - 1]:
            ax.axvline(i - 0.5, color="gray", linestyle=":", linewidth=1)
    ax.set_xticks(x, names, rotation=90, fontsize=6)
    ax.set_ylim(0, 1)
    ax.set_xlabel("block")
    ax.set_ylabel("Δt")
    ax.set_title(f"TSC step sizes ({getattr(model, 'tsc_mode', '?')})")
    ax.legend(fontsize=7)
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120)
    return fig
