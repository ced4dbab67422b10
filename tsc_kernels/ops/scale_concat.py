"""The fused scale-and-concatenate of TSC-DenseNet (docs/ops.md): its declaration and
public entry point.

    out = cat([x, f * dt[c]], dim=1)      x (N, Cx, *spatial), f (N, k, *spatial), dt (k,)

A dense layer's new features f, scaled channel-wise by the layer's step sizes, appended to its input.

Schemas (csrc/ops.cpp and the declaration below, tsc_kernels/ops/registry.py):

    tsc::scale_concat(Tensor x, Tensor f, Tensor dt) -> Tensor
      out (N, Cx + k, *spatial) in x's dtype and layout (channels-last-like x gives a channels-last
      out, anything else a contiguous one): one pass reading x and f, writing both parts of out.
    tsc::scale_concat_backward(Tensor grad, Tensor f, Tensor dt) -> (Tensor df, Tensor ddt)
      grad is the gradient of out; one pass over its last k channels and f:
      df = grad[:, Cx:] * dt[c] (in grad's layout), ddt[c] = Σ grad[:, Cx + c] * f[:, c] (fp32,
      fp64 for fp64; fixed summation order: deterministic).
      dx is NOT computed by a kernel: it is the view grad[:, :Cx] (no copy; autograd accepts strided
      gradients), taken by the autograd formula below. A custom op may not return a view of its
      input, which is why dx lives outside the backward op.

Ops:
  tsc::scale_concat / tsc::scale_concat_backward   C++ (CPU) and CUDA kernels, csrc/scale_concat_*
  tsc::scale_concat_triton (+ _backward_triton)    Triton, triton_kernels/scale_concat.py
  tsc::scale_concat_torch                          the reference (torch.cat of x and f * dt)
Under torch.compile `auto` runs the reference (when_compiling="reference"): a concatenation whose
second input is an elementwise product is exactly what inductor fuses into one kernel (it writes
both parts of the output from one generated loop, and fuses the product with the conv or BatchNorm
epilogue before it), while the fused op would be an opaque call that blocks that fusion.
"""
from __future__ import annotations

import torch

from .. import _checks, reference
from ._layout import is_channels_last_like
from .registry import OpDef, define, dispatch


def empty_in_layout(like: torch.Tensor, channels: int) -> torch.Tensor:
    """Uninitialised (N, channels, *spatial) tensor with like's dtype/device, channels-last when
    like is channels-last-like, else contiguous: the layout rule of the C++ kernels
    (csrc/scale_concat_layout.h), shared by the fakes and the Triton launchers."""
    shape = (like.shape[0], channels) + tuple(like.shape[2:])
    if is_channels_last_like(like):
        return like.new_empty(shape[:1] + shape[2:] + shape[1:2]).movedim(-1, 1)
    return like.new_empty(shape)


def _setup_context(ctx, inputs, output):
    x, f, dt = inputs
    ctx.cx = x.shape[1]
    ctx.save_for_backward(f, dt)


def _backward(backward_op, ctx, grad):
    """(dx, df, ddt): dx is a view of grad (no copy), df and ddt come from one fused pass."""
    f, dt = ctx.saved_tensors
    df, ddt = backward_op(grad, f, dt)
    return grad.narrow(1, 0, ctx.cx), df, ddt


def _fake(x, f, dt):
    return empty_in_layout(x, x.shape[1] + f.shape[1])


def _fake_backward(grad, f, dt):
    return empty_in_layout(grad, f.shape[1]), torch.empty_like(dt)


OP = define(OpDef(
    name="scale_concat",
    schema="(Tensor x, Tensor f, Tensor dt) -> Tensor",
    backward_schema="(Tensor grad, Tensor f, Tensor dt) -> (Tensor, Tensor)",
    reference=reference.scale_concat,
    fake=_fake,
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
    when_compiling="reference",
))


def scale_concat(x: torch.Tensor, f: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """``cat([x, f * dt[c]], dim=1)`` in one pass: new features scaled by their step sizes, appended.

    Args:
        x: features so far, (N, Cx, *spatial) with 0-3 spatial dims; fp32/fp16/bf16/fp64; contiguous
           or channels-last (the output follows x's layout).
        f: new features, (N, k, *spatial), x's dtype.
        dt: (k,) step sizes, fp32 (fp64 with fp64 inputs). The product and the ddt reduction are fp32.
    """
    _checks.scale_concat_args(x, f, dt)
    return dispatch("scale_concat", x.device)(x, f, dt)
