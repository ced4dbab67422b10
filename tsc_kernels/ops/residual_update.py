"""The fused residual update ``out = y + f * dt[c]`` (docs/ops.md): its declaration and public entry point.

Ops (tsc_kernels/ops/registry.py):
  tsc::residual_update / tsc::residual_update_backward   C++ (CPU) and CUDA kernels, csrc/residual_update_*;
                                                         autograd in C++ (csrc/residual_update_autograd.cpp)
  tsc::residual_update_triton (+ _backward_triton)       Triton, triton_kernels/residual_update.py
  tsc::residual_update_torch                             the reference
Under torch.compile `auto` runs the reference: an elementwise tail that inductor fuses with the
BatchNorm before it (docs/backends.md has the measurements).
"""
from __future__ import annotations

import torch

from .. import _checks, reference
from ._layout import output_like
from .registry import OpDef, define, dispatch


def _setup_context(ctx, inputs, output):
    _, f, dt, relu = inputs
    ctx.save_for_backward(f, dt, output if relu else None)


def _backward(backward_op, ctx, grad):
    """(dy, df, ddt) from one fused pass; without a fused ReLU dy is the incoming gradient itself."""
    f, dt, relu_out = ctx.saved_tensors
    dy, df, ddt = backward_op(grad, f, dt, relu_out)
    return (grad if relu_out is None else dy), df, ddt, None


def _fake_backward(grad, f, dt, relu_out):
    dy = output_like(f) if relu_out is not None else f.new_empty(0)
    return dy, output_like(f), torch.empty_like(dt)


OP = define(OpDef(
    name="residual_update",
    schema="(Tensor y, Tensor f, Tensor dt, bool relu) -> Tensor",
    # relu_out: the forward output when the ReLU was fused (its mask); dy is then the masked
    # gradient, else an empty (0,) tensor (dy is the incoming gradient itself, not copied).
    backward_schema="(Tensor grad, Tensor f, Tensor dt, Tensor? relu_out) -> (Tensor, Tensor, Tensor)",
    reference=reference.residual_update,
    fake=lambda y, f, dt, relu: output_like(y),
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
    # The C++ op runs once per residual block, where a Python autograd formula's overhead is as long
    # as the kernel: its formula (the same) is registered in C++.
    cpp_autograd=True,
    when_compiling="reference",
))


def residual_update(y: torch.Tensor, f: torch.Tensor, dt: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """Channel-wise Euler step ``y + f * dt[c]`` with an optional fused ReLU.

    Args:
        y: shortcut, (N, C, *spatial) with 0-3 spatial dims; fp32/fp16/bf16 (fp64 for gradcheck);
           contiguous or channels-last (the output keeps the layout).
        f: residual branch, y's shape and dtype.
        dt: (C,) step sizes, fp32 (fp64 with fp64 inputs). Arithmetic and the ddt reduction are fp32.
        relu: apply ReLU to the sum (post-activation blocks).
    """
    _checks.residual_update_args(y, f, dt, relu)
    return dispatch("residual_update", y.device)(y, f, dt, relu)
