"""The linear multi-step update of LM-ResNet (docs/ops.md, multistep_update): declaration and entry point.

    out = relu?((1 - k)·u + k·u_prev + keep[n]·dt[c]·f)

Ops (tsc_kernels/ops/registry.py):
  tsc::multistep_update (+ _backward)            C++ (CPU) and CUDA kernels, csrc/multistep_update_*
  tsc::multistep_update_triton (+ _backward_triton)  Triton, triton_kernels/multistep_update.py
  tsc::multistep_update_torch                    the reference below: the spec
Under torch.compile `auto` runs the reference: the op is elementwise (plus small reductions in its
backward), exactly what inductor fuses with the BatchNorm/conv epilogue around it, whereas the fused
op would be an opaque call that splits the fusion (as for residual_update).
"""
from __future__ import annotations

import torch

from ._common import accumulation_dtype, flag, same_device, tensor
from ._layout import output_like, to_layout
from ._shapes import RESNET50, TINY, RealShapes, elementwise_bytes
from .registry import OpDef, define, dispatch


def reference(
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


def check_args(u, u_prev, f, k, dt, keep, relu) -> None:
    """tsc_kernels.multistep_update's arguments: u, u_prev, f alike; k 0-d; dt (C,), keep (N,) or None."""
    tensor(u, "u")
    tensor(u_prev, "u_prev")
    tensor(f, "f")
    flag(relu, "relu")
    if not 2 <= u.dim() <= 5:
        raise ValueError(f"u must have shape (N, C, *spatial) with 0 to 3 spatial dims, got shape {tuple(u.shape)}")
    for name, t in (("u_prev", u_prev), ("f", f)):
        if t.dtype != u.dtype:
            raise TypeError(f"{name} must have u's dtype {u.dtype}, got {t.dtype}")
        if t.shape != u.shape:
            raise ValueError(f"{name} must have u's shape {tuple(u.shape)}, got {tuple(t.shape)}")
    acc = accumulation_dtype(u.dtype)
    tensor(k, "k", (acc,))
    if k.dim() != 0:
        raise ValueError(f"k must be a 0-d tensor (one coefficient per block), got shape {tuple(k.shape)}")
    named = {"u": u, "u_prev": u_prev, "f": f, "k": k}
    for name, t, size, what in (("dt", dt, u.shape[1], "(C,)"), ("keep", keep, u.shape[0], "(N,)")):
        if t is None:
            continue
        tensor(t, name, (acc,))
        if t.dim() != 1 or t.shape[0] != size:
            raise ValueError(f"{name} must have shape {what} = ({size},) matching u, got {tuple(t.shape)}")
        named[name] = t
    same_device(named)


def _setup_context(ctx, inputs, output):
    u, u_prev, f, k, dt, keep, relu = inputs
    ctx.has_dt, ctx.has_keep = dt is not None, keep is not None
    ctx.save_for_backward(u, u_prev, f, k, dt, keep, output if relu else None)


def _backward(backward_op, ctx, grad):
    """All gradients from one fused pass; ddt / dkeep only for the inputs that were given."""
    u, u_prev, f, k, dt, keep, relu_out = ctx.saved_tensors
    du, du_prev, df, dk, ddt, dkeep = backward_op(grad, u, u_prev, f, k, dt, keep, relu_out)
    return du, du_prev, df, dk, (ddt if ctx.has_dt else None), (dkeep if ctx.has_keep else None), None


def _fake_backward(grad, u, u_prev, f, k, dt, keep, relu_out):
    def opt(t):
        return torch.empty_like(t) if t is not None else k.new_empty(0)
    return output_like(u), output_like(u), output_like(u), torch.empty_like(k), opt(dt), opt(keep)


OP = define(OpDef(
    name="multistep_update",
    schema="(Tensor u, Tensor u_prev, Tensor f, Tensor k, Tensor? dt, Tensor? keep, bool relu) -> Tensor",
    backward_schema="(Tensor grad, Tensor u, Tensor u_prev, Tensor f, Tensor k, Tensor? dt, Tensor? keep, "
                    "Tensor? relu_out) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    reference=reference,
    fake=lambda u, u_prev, f, k, dt, keep, relu: output_like(u),
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
    # Once per LM-ResNet block, like residual_update: the same formula is registered in C++
    # (csrc/multistep_update_autograd.cpp); _setup_context/_backward serve the Triton ops.
    cpp_autograd=True,
    when_compiling="reference",
))


def multistep_update(u: torch.Tensor, u_prev: torch.Tensor, f: torch.Tensor, k: torch.Tensor,
                     dt: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                     relu: bool = False) -> torch.Tensor:
    """Linear multi-step step ``relu?((1 - k)·u + k·u_prev + keep[n]·dt[c]·f)`` (LM-ResNet, docs/lm_resnet.md).

    Args:
        u: current state u_n, (N, C, *spatial) with 0-3 spatial dims; fp32/fp16/bf16/fp64;
           contiguous or channels-last (the output keeps u's layout).
        u_prev: previous state u_{n-1}, u's shape and dtype.
        f: residual branch f(u_n), u's shape and dtype.
        k: the block's coefficient k_n, a 0-d fp32 tensor (fp64 for fp64 inputs); differentiable.
        dt: (C,) step sizes (TSC's Δt) or None for Δt = 1; fp32 (fp64 for fp64).
        keep: (N,) per-sample factor of f or None: the stochastic-depth mask η_n in training, its
              expectation p_n in eval; fp32 (fp64 for fp64). Differentiable, though rarely needed.
        relu: apply ReLU to the sum (post-activation blocks).
    Arithmetic and every reduction run in fp32 (fp64 for fp64); dk, ddt, dkeep are deterministic.
    """
    check_args(u, u_prev, f, k, dt, keep, relu)
    return dispatch("multistep_update", u.device)(u, u_prev, f, k, dt, keep, relu)


# --- Real shapes (tsc_kernels/ops/_shapes.py): launch plans and gpu-check ---
def example_inputs(shape, dtype, channels_last=False, device=None, requires_grad=False) -> tuple:
    """(u, u_prev, f, k, dt, keep, relu=True): dt and keep given, ReLU fused; keep (stochastic depth's
    mask) is data, never requiring grad."""
    u, u_prev, f = (to_layout(torch.randn(shape, dtype=dtype, device=device), channels_last) for _ in range(3))
    acc = accumulation_dtype(dtype)
    k = torch.empty((), dtype=acc, device=device).uniform_(-0.9, 0.5)
    dt = torch.rand(shape[1], dtype=acc, device=device)
    keep = torch.rand(shape[0], dtype=acc, device=device) + 0.1
    return (*(t.requires_grad_(requires_grad) for t in (u, u_prev, f, k, dt)), keep, True)


# Minimum bytes (ReLU): forward 4N e (u, u_prev, f -> out), backward 8N e (g, u, u_prev, f, out -> du, du_prev, df).
REAL_SHAPES = RealShapes(
    # LM-ResNet-50's last stage (and its first, where the maps are large)
    launch=(("lm-resnet50-stage4", (64, 2048, 7, 7)), ("lm-resnet50-stage1", (64, 256, 56, 56))),
    full=RESNET50, tiny=TINY, min_bytes=elementwise_bytes(4, 8), note="ReLU fused, dt and keep")
