"""Triton kernels of the fused residual update ``out = y + f * dt[c]`` (docs/ops.md): kernels,
launchers and the torch.library glue in one file (the Liger-Kernel layout).

Tensors are seen as contiguous (outer, C, inner) blocks (tsc_kernels/ops/_layout.py): inner = 1 for
channels-last inputs. Arithmetic runs in dt's dtype (fp32, or fp64 for fp64 inputs).
  forward                 1 launch: reads y, f; writes out
  backward, inner > 1     1 launch, one program per channel: reads grad, f (+ out with the ReLU);
                          writes df (+ dy with the ReLU) and ddt[c]
  backward, inner == 1    1 launch, one program per block of channels, looping over rows
Both backward kernels reduce in a fixed order: ddt is deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tsc_kernels.ops._layout import channel_view, is_channels_last_like, to_layout
from tsc_kernels.ops import residual_update as _declaration  # noqa: F401  (declares the op first)
from tsc_kernels.ops.registry import triton_backward, triton_forward

FWD_BLOCK = 1024
BWD_BLOCK = 1024
BWD_WARPS = 8  # with 4 warps the bf16 ReLU variant spills on sm_80 (16 B): 1024 lanes over 256 threads do not
ROWS_BLOCK_R, ROWS_BLOCK_C = 32, 64


@triton.jit
def residual_fwd_kernel(y_ptr, f_ptr, dt_ptr, out_ptr, numel, C, inner, RELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc_ty = dt_ptr.dtype.element_ty
    dt = tl.load(dt_ptr + (offs // inner) % C, mask=mask, other=0.0)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    out = y + f * dt
    if RELU:
        out = tl.where(out < 0, 0.0, out)  # NaN passes, as torch.relu
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def residual_bwd_planes_kernel(g_ptr, f_ptr, out_ptr, dt_ptr, dy_ptr, df_ptr, ddt_ptr, N, C, inner,
                               RELU: tl.constexpr, BLOCK: tl.constexpr):
    """Program c owns channel c: its (N, inner) planes, summed in a fixed order."""
    c = tl.program_id(0).to(tl.int64)
    acc_ty = dt_ptr.dtype.element_ty
    dt = tl.load(dt_ptr + c)
    acc = tl.zeros([BLOCK], dtype=acc_ty)
    total = N * inner
    for start in range(0, total, BLOCK):
        idx = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = idx < total
        offs = ((idx // inner) * C + c) * inner + idx % inner
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        if RELU:
            out = tl.load(out_ptr + offs, mask=mask, other=0.0).to(acc_ty)
            g = tl.where(out <= 0, 0.0, g)  # threshold_backward: zero where out <= 0
            tl.store(dy_ptr + offs, g.to(dy_ptr.dtype.element_ty), mask=mask)
        tl.store(df_ptr + offs, (g * dt).to(df_ptr.dtype.element_ty), mask=mask)
        acc += g * f
    tl.store(ddt_ptr + c, tl.sum(acc, axis=0))


@triton.jit
def residual_bwd_rows_kernel(g_ptr, f_ptr, out_ptr, dt_ptr, dy_ptr, df_ptr, ddt_ptr, R, C,
                             RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channels-last: program k owns channels [k*BLOCK_C, (k+1)*BLOCK_C) of every row."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    acc_ty = dt_ptr.dtype.element_ty
    dt = tl.load(dt_ptr + cols, mask=cmask, other=0.0)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_ty)
    for start in range(0, R, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R).to(tl.int64)
        mask = (rows < R)[:, None] & cmask[None, :]
        offs = rows[:, None] * C + cols[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        if RELU:
            out = tl.load(out_ptr + offs, mask=mask, other=0.0).to(acc_ty)
            g = tl.where(out <= 0, 0.0, g)
            tl.store(dy_ptr + offs, g.to(dy_ptr.dtype.element_ty), mask=mask)
        tl.store(df_ptr + offs, (g * dt[None, :]).to(df_ptr.dtype.element_ty), mask=mask)
        acc += g * f
    tl.store(ddt_ptr + cols, tl.sum(acc, axis=0), mask=cmask)


@triton_forward("residual_update")
def residual_update_triton(y: torch.Tensor, f: torch.Tensor, dt: torch.Tensor, relu: bool) -> torch.Tensor:
    cl = is_channels_last_like(y)
    y, f, dt = to_layout(y, cl), to_layout(f, cl), dt.contiguous()
    out = torch.empty_like(y)
    outer, C, inner = channel_view(y, cl)
    if y.numel():
        residual_fwd_kernel[(triton.cdiv(y.numel(), FWD_BLOCK),)](
            y, f, dt, out, y.numel(), C, inner, RELU=relu, BLOCK=FWD_BLOCK)
    return out


@triton_backward("residual_update")
def residual_update_backward_triton(
    grad: torch.Tensor, f: torch.Tensor, dt: torch.Tensor, relu_out: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, df, ddt); dy is an empty (0,) tensor without the ReLU (it is grad itself), as in C++."""
    cl = is_channels_last_like(f)
    relu = relu_out is not None
    f, g, dt = to_layout(f, cl), to_layout(grad, cl), dt.contiguous()
    out = to_layout(relu_out, cl) if relu else f  # unused pointer when relu is off
    df = torch.empty_like(f)
    dy = torch.empty_like(f) if relu else f.new_empty(0)
    ddt = torch.empty_like(dt) if f.numel() else torch.zeros_like(dt)  # the kernels write every channel
    outer, C, inner = channel_view(f, cl)
    if f.numel() == 0:
        return dy, df, ddt
    dy_arg = dy if relu else df  # unused pointer when relu is off
    if inner > 1:
        residual_bwd_planes_kernel[(C,)](g, f, out, dt, dy_arg, df, ddt, outer, C, inner, RELU=relu, BLOCK=BWD_BLOCK, num_warps=BWD_WARPS)
    else:
        residual_bwd_rows_kernel[(triton.cdiv(C, ROWS_BLOCK_C),)](
            g, f, out, dt, dy_arg, df, ddt, outer, C, RELU=relu, BLOCK_R=ROWS_BLOCK_R, BLOCK_C=ROWS_BLOCK_C)
    return dy, df, ddt


def _sig(dtype: str, acc: str = "fp32") -> dict:
    return {"y_ptr": f"*{dtype}", "f_ptr": f"*{dtype}", "dt_ptr": f"*{acc}", "out_ptr": f"*{dtype}"}


def _bwd_sig(dtype: str) -> dict:
    return {"g_ptr": f"*{dtype}", "f_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "dt_ptr": "*fp32",
            "dy_ptr": f"*{dtype}", "df_ptr": f"*{dtype}", "ddt_ptr": "*fp32"}


# Ahead-of-time compile configurations (triton_kernels/aot.py): every kernel, each activation
# dtype, ReLU on and off, with the block sizes the launchers use.
AOT_CONFIGS = [
    cfg
    for dtype in ("fp32", "fp16", "bf16")
    for relu in (False, True)
    for cfg in (
        dict(kernel=residual_fwd_kernel, name=f"residual_fwd_{dtype}_relu{int(relu)}",
             signature={**_sig(dtype), "numel": "i64", "C": "i64", "inner": "i64", "RELU": "constexpr", "BLOCK": "constexpr"},
             constexprs={"RELU": relu, "BLOCK": FWD_BLOCK}),
        dict(kernel=residual_bwd_planes_kernel, name=f"residual_bwd_planes_{dtype}_relu{int(relu)}",
             signature={**_bwd_sig(dtype), "N": "i64", "C": "i64", "inner": "i64", "RELU": "constexpr", "BLOCK": "constexpr"},
             constexprs={"RELU": relu, "BLOCK": BWD_BLOCK}, num_warps=BWD_WARPS),
        dict(kernel=residual_bwd_rows_kernel, name=f"residual_bwd_rows_{dtype}_relu{int(relu)}",
             signature={**_bwd_sig(dtype), "R": "i64", "C": "i64", "RELU": "constexpr", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"},
             constexprs={"RELU": relu, "BLOCK_R": ROWS_BLOCK_R, "BLOCK_C": ROWS_BLOCK_C}),
    )
]
