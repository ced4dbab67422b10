"""The fused scale-and-concatenate of TSC-DenseNet (docs/ops.md): its declaration and
public entry point.

    out = cat([x, f * dt[c]], dim=1)      x (N, Cx, *spatial), f (N, k, *spatial), dt (k,)

A dense layer's new features f, scaled channel-wise by the layer's step sizes, appended to its input.

Schemas (csrc/scale_concat_cpu.cpp, TORCH_LIBRARY_FRAGMENT, and the declaration below):

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
  tsc::scale_concat_torch                          the reference below (torch.cat of x and f * dt): the spec
Under torch.compile `auto` runs the reference (when_compiling="reference"): a concatenation whose
second input is an elementwise product is exactly what inductor fuses into one kernel (it writes
both parts of the output from one generated loop, and fuses the product with the conv or BatchNorm
epilogue before it), while the fused op would be an opaque call that blocks that fusion.
"""
from __future__ import annotations

import torch

from ._common import accumulation_dtype, same_device, tensor
from ._layout import is_channels_last_like, to_layout
from ._shapes import RealShapes, nbytes
from .registry import OpDef, define, dispatch


def reference(x: torch.Tensor, f: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """``cat([x, f * dt[c]], dim=1)``: a dense layer's new features f scaled channel-wise by its
    step sizes and appended to its input x (TSC-DenseNet, docs/densenet.md). The product is computed
    in fp32 (fp64 for fp64) and rounded once to x's dtype."""
    acc = accumulation_dtype(x.dtype)
    dt_b = dt.to(acc).view((1, -1) + (1,) * (x.dim() - 2))
    return torch.cat([x, (f.to(acc) * dt_b).to(x.dtype)], dim=1)


def check_args(x: object, f: object, dt: object) -> None:
    """tsc_kernels.scale_concat: x (N, Cx, *spatial), f (N, k, *spatial) of x's dtype, dt (k,)."""
    tensor(x, "x")
    tensor(f, "f")
    if not 2 <= x.dim() <= 5:
        raise ValueError(f"x must have shape (N, Cx, *spatial) with 0 to 3 spatial dims, got shape {tuple(x.shape)}")
    if f.dtype != x.dtype:
        raise TypeError(f"f must have x's dtype {x.dtype}, got {f.dtype}")
    if f.dim() != x.dim() or f.shape[0] != x.shape[0] or f.shape[2:] != x.shape[2:]:
        raise ValueError(f"f must have shape (N, k, *spatial) = ({x.shape[0]}, k, {', '.join(map(str, x.shape[2:]))}) "
                         f"matching x's batch and spatial dims, got {tuple(f.shape)}")
    tensor(dt, "dt", (accumulation_dtype(x.dtype),))
    if dt.dim() != 1 or dt.shape[0] != f.shape[1]:
        raise ValueError(f"dt must have shape (k,) = ({f.shape[1]},) matching f's channel dim 1, "
                         f"got {tuple(dt.shape)}")
    same_device({"x": x, "f": f, "dt": dt})


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
    reference=reference,
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
    check_args(x, f, dt)
    return dispatch("scale_concat", x.device)(x, f, dt)


# --- Real shapes (tsc_kernels/ops/_shapes.py): launch plans and gpu-check; specs (x's shape, k) ---
def example_inputs(spec, dtype, channels_last=False, device=None, requires_grad=False) -> tuple:
    """(x, f, dt): x (N, Cx, *spatial), k new features."""
    shape, k = spec
    x = to_layout(torch.randn(shape, dtype=dtype, device=device), channels_last)
    f = to_layout(torch.randn((shape[0], k, *shape[2:]), dtype=dtype, device=device), channels_last)
    dt = torch.rand(k, dtype=accumulation_dtype(dtype), device=device)
    return tuple(t.requires_grad_(requires_grad) for t in (x, f, dt))


def _min_bytes(args):
    """Forward 2 (Cx + k) P e, backward 3 k P e (P = N * spatial pixels; dx is a view of g)."""
    x, f, _ = args
    return 2 * (nbytes(x) + nbytes(f)), 3 * nbytes(f)


REAL_SHAPES = RealShapes(
    # DenseNet-40 k=12's last layer of a block; DenseNet-121 k=32's first and last block
    launch=(("densenet40-k12", ((64, 148, 32, 32), 12)), ("densenet121-k32-block1", ((64, 224, 56, 56), 32)),
            ("densenet121-k32-block4", ((64, 992, 7, 7), 32))),
    # DenseNet-121's largest concatenation: dense block 1's last layer (Cx = 64 + 5 * 32) at batch 64
    full=(((64, 224, 56, 56), 32),), tiny=(((3, 5, 7, 9), 3),), min_bytes=_min_bytes, note="DenseNet-121", extra="k")
