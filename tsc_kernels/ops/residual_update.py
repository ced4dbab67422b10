"""The fused residual update ``out = y + f * dt[c]`` (docs/ops.md): public entry point and the
torch.library glue of its C++/CUDA op.

Ops:
  tsc::residual_update / tsc::residual_update_backward   C++ (CPU) and CUDA kernels, csrc/
  tsc::residual_update_triton (+ _backward_triton)       Triton, triton_kernels/residual_update.py
  tsc::residual_update_torch                             the reference, CompositeImplicitAutograd
"""
from __future__ import annotations

import torch

from .. import _checks, _extension, backend, reference
from ._layout import output_like

# The torch backend: the reference registered as an op, so it is traced, opchecked and compiled
# like the others; autograd comes from PyTorch through the reference's own aten calls.
torch.library.define("tsc::residual_update_torch", "(Tensor y, Tensor f, Tensor dt, bool relu) -> Tensor")
torch.library.impl("tsc::residual_update_torch", "CompositeImplicitAutograd", reference.residual_update)


def _setup_context(ctx, inputs, output):
    _, f, dt, relu = inputs
    ctx.save_for_backward(f, dt, output if relu else None)


def make_backward(backward_op):
    """Autograd formula of the Triton op (the C++ op has the same one in C++): (dy, df, ddt) from
    one fused pass; without a fused ReLU dy is the incoming gradient itself."""

    def backward(ctx, grad):
        f, dt, relu_out = ctx.saved_tensors
        dy, df, ddt = backward_op(grad, f, dt, relu_out)
        return (grad if relu_out is None else dy), df, ddt, None

    return backward


def _fake_backward(grad, f, dt, relu_out):
    dy = output_like(f) if relu_out is not None else f.new_empty(0)
    return dy, output_like(f), torch.empty_like(dt)


def register_fakes(forward_name: str, backward_name: str) -> None:
    torch.library.register_fake(forward_name)(lambda y, f, dt, relu: output_like(y))
    torch.library.register_fake(backward_name)(_fake_backward)


def register_glue(forward_name: str, backward_name: str) -> None:
    """register_fake for a (forward, backward) op pair and register_autograd for the forward."""
    register_fakes(forward_name, backward_name)
    backward_op = getattr(torch.ops.tsc, backward_name.split("::")[1])
    torch.library.register_autograd(forward_name, make_backward(backward_op), setup_context=_setup_context)


if _extension.has_cpp_ops():
    # The C++ op carries its autograd formula itself (csrc/residual_update_autograd.cpp): it runs
    # once per residual block, where a Python formula's overhead is as long as the kernel.
    register_fakes("tsc::residual_update", "tsc::residual_update_backward")


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
    return backend.op_for(y.device, "residual_update", "residual_update")(y, f, dt, relu)
