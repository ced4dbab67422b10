"""The fused BatchNorm tail of a residual block (docs/ops.md): its declaration and public entry point.

    out = relu?(y + dt[c] * F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))

Per channel c over the M = N * spatial values of x: mean μ and biased variance v (training) or the
running statistics (eval), invstd = 1 / sqrt(v + eps), x̂ = (x - μ) * invstd, z = γ x̂ + β (γ = 1,
β = 0 without affine). Training updates running_mean/var in place exactly as F.batch_norm does
(unbiased variance v * M / (M - 1) into running_var).

Schemas (csrc/batch_norm_residual_update_cpu.cpp, TORCH_LIBRARY_FRAGMENT, and the declaration below):

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
  tsc::batch_norm_residual_update_torch               the reference below, the spec (returns out only)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import FLOAT_DTYPES, accumulation_dtype, flag, same_device, tensor
from ._layout import output_like, to_layout
from ._shapes import ACTIVATIONS, LIMITS, RESNET50, TINY, RealShapes, elementwise_bytes
from .registry import OpDef, define, dispatch
from .residual_update import check_args as residual_update_args
from .residual_update import reference as residual_update_reference


def reference(
    y: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    relu: bool,
) -> torch.Tensor:
    """The fused BatchNorm tail of a residual block: ``relu?(y + dt[c] * F.batch_norm(x, ...))``.

    Exactly ``F.batch_norm``'s meaning (batch statistics when ``training``, the running ones
    otherwise; running statistics updated in place in training with the unbiased variance),
    computed in fp32 (fp64 for fp64 inputs); the output has y's dtype.
    """
    acc = accumulation_dtype(x.dtype)
    # Statistics in the accumulation dtype; a running buffer of another dtype is updated through a copy.
    stats = [None if t is None else t.to(acc) for t in (running_mean, running_var)]
    z = F.batch_norm(x.to(acc), stats[0], stats[1], None if weight is None else weight.to(acc),
                     None if bias is None else bias.to(acc), training, momentum, eps)
    for buf, new in zip((running_mean, running_var), stats):
        if buf is not None and new is not buf:
            buf.copy_(new)
    # z stays in the accumulation dtype: the update adds it to y before the one rounding to y's dtype
    return residual_update_reference(y, z, dt, relu)


def check_args(y, x, dt, running_mean, running_var, weight, bias, training, momentum, eps, relu) -> None:
    """The fused BatchNorm tail's arguments (tsc_kernels.batch_norm_residual_update)."""
    residual_update_args(y, x, dt, relu, f_name="x")  # y, x (as f), dt, relu: the update's own rules
    flag(training, "training")
    for name, value in (("momentum", momentum), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if not training and running_mean is None:
        raise ValueError("training=False (running statistics) needs running_mean and running_var, got None")
    channels = y.shape[1]
    named = {}
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        tensor(t, name, FLOAT_DTYPES)
        if t.dim() != 1 or t.shape[0] != channels:
            raise ValueError(f"{name} must have shape (C,) = ({channels},) matching y's channel dim 1, "
                             f"got {tuple(t.shape)}")
        named[name] = t
    if running_mean is not None and running_var.dtype != running_mean.dtype:
        raise TypeError(f"running_var must have running_mean's dtype {running_mean.dtype}, got {running_var.dtype}")
    same_device({"y": y, **named})
    if training:
        values = y.numel() // channels if channels else 0
        if values <= 1:
            # F.batch_norm's own rule: the batch variance needs more than one value per channel
            raise ValueError(f"training needs more than 1 value per channel (N * spatial), "
                             f"got input shape {tuple(y.shape)}")


def _stats_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[1], dtype=accumulation_dtype(x.dtype))


def _fake_forward(y, x, dt, running_mean, running_var, weight, bias, training, momentum, eps, relu):
    return output_like(y), _stats_like(x), _stats_like(x)


def _fake_backward(grad, x, dt, weight, bias, save_mean, save_invstd, relu_out, training):
    acc = accumulation_dtype(x.dtype)
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
    reference=reference,
    reference_schema="(Tensor y, Tensor x, Tensor dt, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
                     "Tensor? weight, Tensor? bias, bool training, float momentum, float eps, bool relu) -> Tensor",
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
    check_args(y, x, dt, running_mean, running_var, weight, bias, training, momentum, eps, relu)
    op = dispatch("batch_norm_residual_update", y.device)
    out = op(y, x, dt, running_mean, running_var, weight, bias, training, float(momentum), float(eps), relu)
    return out[0] if OP.returns_saved(op) else out


# --- Real shapes (tsc_kernels/ops/_shapes.py): launch plans and gpu-check ---
def example_inputs(shape, dtype, channels_last=False, device=None, requires_grad=False) -> tuple:
    """The training forward with running statistics, affine and the ReLU fused, at an activation shape;
    the running statistics never require grad."""
    y, x = (to_layout(torch.randn(shape, dtype=dtype, device=device), channels_last) for _ in range(2))
    acc, C = accumulation_dtype(dtype), shape[1]
    dt, rm, rv, w, b = (torch.rand(C, dtype=acc, device=device) + 0.5 for _ in range(5))
    y, x, dt, w, b = (t.requires_grad_(requires_grad) for t in (y, x, dt, w, b))
    return y, x, dt, rm, rv, w, b, True, 0.1, 1e-5, True


# Minimum bytes (training, ReLU): forward 4N e (the statistics read x; the apply reads x, y, writes out),
# backward 8N e (the sums read g, x, out; the apply -> dx, dy). Two passes each way are inherent: the
# output needs statistics over the whole batch first.
REAL_SHAPES = RealShapes(launch=ACTIVATIONS + LIMITS, full=RESNET50, tiny=TINY, min_bytes=elementwise_bytes(4, 8),
                         note="training, ReLU fused")
