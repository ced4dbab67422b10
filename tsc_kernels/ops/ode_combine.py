"""The fused ODE stage combination ``z + sum_i coeffs[i] * stages[i]`` (docs/ode.md).

One call is one solver update: the Euler step (one stage), an RK stage input (z + a·h·k_j) and the
final RK combination (all stages). The coefficients are a small fp32 tensor (fp64 for fp64 inputs),
not constants baked into a kernel, so the step size can change between iterations without
recompiling or rebuilding anything, and they are differentiable.

Schemas (csrc/ode_combine_cpu.cpp, TORCH_LIBRARY_FRAGMENT, and the declaration below):
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
  tsc::ode_combine_torch                                      the reference below: the spec
"""
from __future__ import annotations

from typing import Sequence

import torch

from ._common import accumulation_dtype, same_device, tensor
from ._layout import output_like, to_layout
from ._shapes import RealShapes, nbytes
from .registry import OpDef, define, dispatch

MAX_STAGES = 8  # csrc/ode_combine_math.h kOdeMaxStages


def reference(z: torch.Tensor, stages: Sequence[torch.Tensor], coeffs: torch.Tensor) -> torch.Tensor:
    """One ODE solver stage combination ``z + sum_i coeffs[i] * stages[i]`` (docs/ode.md), terms added
    in stage order in fp32 (fp64 for fp64); the output has z's dtype."""
    acc = accumulation_dtype(z.dtype)
    out = z.to(acc)
    for i, k in enumerate(stages):
        out = out + coeffs[i].to(acc) * k.to(acc)
    return out.to(z.dtype)


def check_args(z: object, stages: object, coeffs: object) -> None:
    """tsc_kernels.ode_combine: z, 1-8 stages of z's shape/dtype/device, coeffs (len(stages),) fp32 (fp64)."""
    tensor(z, "z")
    if isinstance(stages, torch.Tensor) or not isinstance(stages, (list, tuple)):
        raise TypeError(f"stages must be a list or tuple of tensors, got {type(stages).__name__}")
    if not 1 <= len(stages) <= MAX_STAGES:
        raise ValueError(f"stages must hold 1 to {MAX_STAGES} tensors, got {len(stages)}")
    for i, k in enumerate(stages):
        tensor(k, f"stages[{i}]")
        if k.dtype != z.dtype:
            raise TypeError(f"stages[{i}] must have z's dtype {z.dtype}, got {k.dtype}")
        if k.shape != z.shape:
            raise ValueError(f"stages[{i}] must have z's shape {tuple(z.shape)}, got {tuple(k.shape)}")
    tensor(coeffs, "coeffs", (accumulation_dtype(z.dtype),))
    if coeffs.dim() != 1 or coeffs.shape[0] != len(stages):
        raise ValueError(f"coeffs must have shape (len(stages),) = ({len(stages)},), got {tuple(coeffs.shape)}")
    same_device({"z": z, **{f"stages[{i}]": k for i, k in enumerate(stages)}, "coeffs": coeffs})


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
    reference=reference,
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
    check_args(z, stages, coeffs)
    return dispatch("ode_combine", z.device)(z, list(stages), coeffs)


# --- Real shapes (tsc_kernels/ops/_shapes.py): launch plans and gpu-check; specs (shape, stages) ---
def example_inputs(spec, dtype, channels_last=False, device=None, requires_grad=False) -> tuple:
    """(z, stages, coeffs) with `spec[1]` stages."""
    shape, stages = spec
    z, *ks = (to_layout(torch.randn(shape, dtype=dtype, device=device), channels_last) for _ in range(stages + 1))
    c = torch.randn(stages, dtype=accumulation_dtype(dtype), device=device)
    return (z.requires_grad_(requires_grad), [k.requires_grad_(requires_grad) for k in ks],
            c.requires_grad_(requires_grad))


def _min_bytes(args):
    """s stages: forward (s + 2) N e, backward (2 s + 1) N e (dz is g)."""
    z, stages, _ = args
    s = len(stages)
    return (s + 2) * nbytes(z), (2 * s + 1) * nbytes(z)


REAL_SHAPES = RealShapes(
    launch=(("ode-cifar-4stages", ((128, 64, 8, 8), 4)), ("ode-resnet50-4stages", ((64, 256, 56, 56), 4))),
    full=(((64, 256, 56, 56), 4),), tiny=(((3, 5, 7, 9), 4),), min_bytes=_min_bytes, note="RK4's final combination",
    extra="stages")
