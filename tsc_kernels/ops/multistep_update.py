"""The linear multi-step update of LM-ResNet (docs/ops.md, multistep_update): declaration and entry point.

    out = relu?((1 - k)·u + k·u_prev + keep[n]·dt[c]·f)

Ops (tsc_kernels/ops/registry.py):
  tsc::multistep_update (+ _backward)            C++ (CPU) and CUDA kernels, csrc/multistep_update_*
  tsc::multistep_update_triton (+ _backward_triton)  Triton, triton_kernels/multistep_update.py
  tsc::multistep_update_torch                    the reference
Under torch.compile `auto` runs the reference: the op is elementwise (plus small reductions in its
backward), exactly what inductor fuses with the BatchNorm/conv epilogue around it, whereas the fused
op would be an opaque call that splits the fusion (as for residual_update).
"""
from __future__ import annotations

import torch

from .. import _checks, reference
from ._layout import output_like
from .registry import OpDef, define, dispatch


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
    reference=reference.multistep_update,
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
                     dt: torch.Tensor | None = None, keep: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
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
    _checks.multistep_update_args(u, u_prev, f, k, dt, keep, relu)
    return dispatch("multistep_update", u.device)(u, u_prev, f, k, dt, keep, relu)
