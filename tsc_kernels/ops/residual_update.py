"""The fused residual update ``out = y + f * dt[c]`` (docs/ops.md): its declaration and public entry point.

Ops (tsc_kernels/ops/registry.py):
  tsc::residual_update / tsc::residual_update_backward   C++ (CPU) and CUDA kernels, csrc/residual_update_*;
                                                         autograd in C++ (csrc/residual_update_autograd.cpp)
  tsc::residual_update_triton (+ _backward_triton)       Triton, triton_kernels/residual_update.py
  tsc::residual_update_torch                             the reference (below: the spec)
Under torch.compile `auto` runs the reference: an elementwise tail that inductor fuses with the
BatchNorm before it (docs/backends.md has the measurements).
"""
from __future__ import annotations

import torch

from ._common import accumulation_dtype, flag, same_device, tensor
from ._layout import output_like, to_layout
from ._shapes import ACTIVATIONS, LIMITS, RESNET50, TINY, RealShapes, elementwise_bytes
from .registry import OpDef, define, dispatch


def reference(y: torch.Tensor, f: torch.Tensor, dt: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """``out = y + f * dt[c]`` (channel dim 1), then ReLU when ``relu``; computed in fp32 (fp64 for fp64)."""
    acc = accumulation_dtype(y.dtype)
    dt_b = dt.to(acc).view((1, -1) + (1,) * (y.dim() - 2))
    out = y.to(acc) + f.to(acc) * dt_b
    if relu:
        out = torch.relu(out)
    return out.to(y.dtype)


def check_args(y: object, f: object, dt: object, relu: object, f_name: str = "f") -> None:
    """residual_update's arguments (also the update's part of batch_norm_residual_update's, f_name="x")."""
    tensor(y, "y")
    tensor(f, f_name)
    flag(relu, "relu")
    if not 2 <= y.dim() <= 5:
        raise ValueError(f"y must have shape (N, C, *spatial) with 0 to 3 spatial dims, got shape {tuple(y.shape)}")
    if f.dtype != y.dtype:
        raise TypeError(f"{f_name} must have y's dtype {y.dtype}, got {f.dtype}")
    if f.shape != y.shape:
        raise ValueError(f"{f_name} must have y's shape {tuple(y.shape)}, got {tuple(f.shape)}")
    tensor(dt, "dt", (accumulation_dtype(y.dtype),))
    if dt.dim() != 1 or dt.shape[0] != y.shape[1]:
        raise ValueError(f"dt must have shape (C,) = ({y.shape[1]},) matching y's channel dim 1, "
                         f"got {tuple(dt.shape)}")
    same_device({"y": y, f_name: f, "dt": dt})


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
    reference=reference,
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
    check_args(y, f, dt, relu)
    return dispatch("residual_update", y.device)(y, f, dt, relu)


# --- Real shapes (tsc_kernels/ops/_shapes.py): launch plans and gpu-check ---
def example_inputs(shape, dtype, channels_last=False, device=None, requires_grad=False) -> tuple:
    """(y, f, dt, relu=True) at an activation shape, ReLU fused as in ResNet-50's blocks."""
    y, f = (to_layout(torch.randn(shape, dtype=dtype, device=device), channels_last) for _ in range(2))
    dt = torch.rand(shape[1], dtype=accumulation_dtype(dtype), device=device)
    return (*(t.requires_grad_(requires_grad) for t in (y, f, dt)), True)


# Minimum bytes (ReLU fused): forward 3N e (y, f -> out), backward 5N e (g, f, out -> dy, df).
REAL_SHAPES = RealShapes(launch=ACTIVATIONS + LIMITS, full=RESNET50, tiny=TINY, min_bytes=elementwise_bytes(3, 5),
                         note="ReLU fused")
