"""The fused ODE stage combination ``z + sum_i coeffs[i] * stages[i]`` (docs/ode.md).

One call is one solver update: the Euler step (one stage), an RK stage input (z + a·h·k_j) and the
final RK combination (all stages). The coefficients are a small fp32 tensor (fp64 for fp64 inputs),
not constants baked into a kernel, so the step size can change between iterations without
recompiling or rebuilding anything, and they are differentiable.

Schemas (csrc/ops.cpp and the declaration below):
    tsc::ode_combine(Tensor z, Tensor[] stages, Tensor coeffs) -> Tensor
    tsc::ode_combine_backward(Tensor grad, Tensor[] stages, Tensor coeffs) -> (Tensor[], Tensor)
Backward: dz = grad (not copied), dstages[i] = coeffs[i] * grad, dcoeffs[i] = sum(grad * stages[i])
(fp32 accumulation, deterministic), in one pass over grad and the stages.

Layout: the op is elementwise, so every tensor is read flat in z's layout (channels-last-like z
keeps it, anything else becomes contiguous; see ops/_layout.py); the output has that layout, the
stage gradients that of grad.

Ops:
  tsc::ode_combine / tsc::ode_combine_backward                C++ (CPU) and CUDA, csrc/ode_combine_*
  tsc::ode_combine_triton / tsc::ode_combine_backward_triton  Triton, triton_kernels/ode_combine.py
  tsc::ode_combine_torch                                      the reference
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _checks, reference
from ._layout import output_like
from .registry import OpDef, define, dispatch


def _setup_context(ctx, inputs, output):
    _, stages, coeffs = inputs
    ctx.save_for_backward(coeffs, *stages)


def _backward(backward_op, ctx, grad):
    coeffs, *stages = ctx.saved_tensors
    dstages, dcoeffs = backward_op(grad, list(stages), coeffs)
    return grad, list(dstages), dcoeffs


def _fake_backward(grad, stages, coeffs):
    return [output_like(grad) for _ in stages], torch.empty_like(coeffs)


OP = define(OpDef(
    name="ode_combine",
    schema="(Tensor z, Tensor[] stages, Tensor coeffs) -> Tensor",
    backward_schema="(Tensor grad, Tensor[] stages, Tensor coeffs) -> (Tensor[], Tensor)",
    reference=reference.ode_combine,
    fake=lambda z, stages, coeffs: output_like(z),
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
    # An elementwise tail: under torch.compile `auto` lets inductor fuse the reference with the
    # vector field's last op, as for the residual update.
    when_compiling="reference",
))


def ode_combine(z: torch.Tensor, stages: Sequence[torch.Tensor], coeffs: torch.Tensor) -> torch.Tensor:
    """``z + sum_i coeffs[i] * stages[i]`` in one fused pass (one ODE solver update).

    Args:
        z: any shape; fp32/fp16/bf16 (fp64 for gradcheck); contiguous or channels-last (kept).
        stages: 1 to 8 tensors of z's shape, dtype and device (the solver's stage derivatives).
        coeffs: (len(stages),) weights, fp32 (fp64 with fp64 inputs), e.g. ``h * b_i``; arithmetic is fp32.
    Differentiable in z, every stage and coeffs.
    """
    _checks.ode_combine_args(z, stages, coeffs)
    return dispatch("ode_combine", z.device)(z, list(stages), coeffs)
