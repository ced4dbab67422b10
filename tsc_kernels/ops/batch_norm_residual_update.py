"""The fused BatchNorm tail of a residual block (docs/ops.md): its declaration and public entry point.

    out = relu?(y + dt[c] * F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))

Per channel c over the M = N * spatial values of x: mean μ and biased variance v (training) or the
running statistics (eval), invstd = 1 / sqrt(v + eps), x̂ = (x - μ) * invstd, z = γ x̂ + β (γ = 1,
β = 0 without affine). Training updates running_mean/var in place exactly as F.batch_norm does
(unbiased variance v * M / (M - 1) into running_var).

Schemas (csrc/ops.cpp and the declaration below, tsc_kernels/ops/registry.py):

    tsc::batch_norm_residual_update(Tensor y, Tensor x, Tensor dt, Tensor(a!)? running_mean,
        Tensor(b!)? running_var, Tensor? weight, Tensor? bias, bool training, float momentum,
        float eps, bool relu) -> (Tensor out, Tensor save_mean, Tensor save_invstd)
      out in y's dtype and layout (output_like(y)); save_mean / save_invstd (C,) in the accumulation
      dtype (fp32; fp64 for fp64 x): the batch statistics in training, the running ones in eval.
      Forward: one statistics pass over x (training only) and one pass reading x, y, writing out.
    tsc::batch_norm_residual_update_backward(Tensor grad, Tensor x, Tensor dt, Tensor? weight,
        Tensor? bias, Tensor save_mean, Tensor save_invstd, Tensor? relu_out, bool training)
        -> (Tensor dy, Tensor dx, Tensor ddt, Tensor dweight, Tensor dbias)
      g' = grad masked by relu_out > 0 when the ReLU was fused (relu_out = the forward's out);
      S1 = Σ g', S2 = Σ g' x̂ per channel (one reduction pass, fixed order: deterministic), then one
      elementwise pass: dx = (dt γ invstd)(g' - S1/M - x̂ S2/M) in training, g' dt γ invstd in eval;
      dy = g' (an empty (0,) tensor without the ReLU: dy is grad itself); ddt = γ S2 + β S1;
      dweight = dt S2, dbias = dt S1 (empty (0,) tensors when weight / bias is None). dx has x's
      dtype and layout, dy y's; ddt, dweight, dbias are fp32 (fp64 for fp64).

Ops:
  tsc::batch_norm_residual_update(_backward)          C++ (CPU) and CUDA, csrc/batch_norm_residual_update_*
  tsc::batch_norm_residual_update_triton (+ _backward_triton)   Triton, triton_kernels/batch_norm_residual_update.py
  tsc::batch_norm_residual_update_torch               the reference (returns out only)
"""
from __future__ import annotations

import torch

from .. import _checks, reference
from ._layout import output_like
from .registry import OpDef, define, dispatch


def _stats_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[1], dtype=reference.accumulation_dtype(x.dtype))


def _fake_forward(y, x, dt, running_mean, running_var, weight, bias, training, momentum, eps, relu):
    return output_like(y), _stats_like(x), _stats_like(x)


def _fake_backward(grad, x, dt, weight, bias, save_mean, save_invstd, relu_out, training):
    acc = reference.accumulation_dtype(x.dtype)
    dy = output_like(relu_out) if relu_out is not None else x.new_empty(0)
    dw = torch.empty_like(dt) if weight is not None else x.new_empty(0, dtype=acc)
    db = torch.empty_like(dt) if bias is not None else x.new_empty(0, dtype=acc)
    return dy, output_like(x), torch.empty_like(dt), dw, db


def _setup_context(ctx, inputs, output):
    y, x, dt, running_mean, running_var, weight, bias, training, momentum, eps, relu = inputs
    out, save_mean, save_invstd = output
    ctx.set_materialize_grads(False)  # save_mean / save_invstd are internal outputs: no zero grads
    ctx.training = training
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.save_for_backward(x, dt, weight, bias, save_mean, save_invstd, out if relu else None)


def _backward(backward_op, ctx, grad, grad_mean, grad_invstd):
    x, dt, weight, bias, save_mean, save_invstd, relu_out = ctx.saved_tensors
    if grad is None:
        grad = torch.zeros_like(relu_out if relu_out is not None else x)
    dy, dx, ddt, dw, db = backward_op(grad, x, dt, weight, bias, save_mean, save_invstd, relu_out, ctx.training)
    return ((grad if relu_out is None else dy), dx, ddt, None, None,
            dw if ctx.has_weight else None, db if ctx.has_bias else None, None, None, None, None)


OP = define(OpDef(
    name="batch_norm_residual_update",
    schema="(Tensor y, Tensor x, Tensor dt, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? weight, "
           "Tensor? bias, bool training, float momentum, float eps, bool relu) -> (Tensor, Tensor, Tensor)",
    backward_schema="(Tensor grad, Tensor x, Tensor dt, Tensor? weight, Tensor? bias, Tensor save_mean, "
                    "Tensor save_invstd, Tensor? relu_out, bool training) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    reference=reference.batch_norm_residual_update,
    reference_schema="(Tensor y, Tensor x, Tensor dt, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? weight, "
                     "Tensor? bias, bool training, float momentum, float eps, bool relu) -> Tensor",
    fake=_fake_forward,
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
    mutates_args=("running_mean", "running_var"),
    # Once per TSC block: the same formula is registered in C++ (csrc/batch_norm_residual_update_autograd.cpp);
    # _setup_context/_backward serve the Triton ops.
    cpp_autograd=True,
    # An elementwise tail after a reduction: inductor fuses the reference with the conv's epilogue
    # neighbours (docs/backends.md has the measurements).
    when_compiling="reference",
))


def batch_norm_residual_update(
    y: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    relu: bool = True,
) -> torch.Tensor:
    """``relu?(y + dt[c] * F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))`` fused.

    Args:
        y: shortcut, (N, C, *spatial) with 1-3 spatial dims (or none), fp32/fp16/bf16 (fp64 for gradcheck).
        x: the branch's last conv output, y's shape and dtype (its memory format may differ).
        dt: (C,) step sizes, fp32 (fp64 with fp64 inputs).
        running_mean, running_var: (C,) buffers updated in place in training, read in eval; None
            (both) for batch statistics only (track_running_stats=False; then training must be True).
        weight, bias: (C,) affine γ, β or None (affine=False).
        training: batch statistics (True) or the running ones (False), as F.batch_norm.
        momentum: running-statistics factor (F.batch_norm's; a module with momentum=None passes
            its cumulative-average factor). eps: added to the variance.
        relu: apply ReLU to the sum (post-activation blocks).
    Statistics and arithmetic run in fp32 for fp16/bf16 activations. Returns out (y's dtype and layout).
    """
    _checks.batch_norm_residual_update_args(y, x, dt, running_mean, running_var, weight, bias, training, momentum, eps, relu)
    op = dispatch("batch_norm_residual_update", y.device)
    out = op(y, x, dt, running_mean, running_var, weight, bias, training, float(momentum), float(eps), relu)
    return out[0] if OP.returns_saved(op) else out
