"""Triton kernels of scale_concat ``out = cat([x, f * dt[c]], dim=1)`` (docs/ops.md):
kernels, launchers and the torch.library glue in one file.

Tensors are seen as contiguous (outer, channels, inner) blocks (inner = 1 for channels-last, see
csrc/scale_concat_math.h): out's row o is x's row o followed by f's row o scaled by dt.
  forward                 1 launch over out: x's part copied, f's part scaled (one pass, both parts)
  backward, inner > 1     1 launch, one program per channel c: reads grad[:, Cx + c] and f[:, c],
                          writes df and ddt[c]
  backward, inner == 1    1 launch, one program per block of channels, looping over rows
Both backward kernels reduce in a fixed order: ddt is deterministic. dx is a view of grad (no kernel).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tsc_kernels.ops._layout import is_channels_last_like, to_layout
from tsc_kernels.ops import scale_concat as _declaration
from tsc_kernels.ops.registry import triton_backward, triton_forward

FWD_BLOCK = 1024
BWD_BLOCK = 1024
BWD_WARPS = 8
ROWS_BLOCK_R, ROWS_BLOCK_C = 32, 64


@triton.jit
def scale_concat_fwd_kernel(x_ptr, f_ptr, dt_ptr, out_ptr, numel, Cx, K, inner, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    row = (Cx + K) * inner
    x_row = Cx * inner
    o = offs // row
    r = offs - o * row
    is_x = r < x_row
    j = r - x_row
    x = tl.load(x_ptr + (o * x_row + r), mask=mask & is_x, other=0.0)
    f_mask = mask & (r >= x_row)
    f = tl.load(f_ptr + (o * K * inner + j), mask=f_mask, other=0.0).to(dt_ptr.dtype.element_ty)
    dt = tl.load(dt_ptr + j // inner, mask=f_mask, other=0.0)
    out = tl.where(is_x, x, (f * dt).to(out_ptr.dtype.element_ty))
    tl.store(out_ptr + offs, out, mask=mask)


@triton.jit
def scale_concat_bwd_planes_kernel(g_ptr, f_ptr, dt_ptr, df_ptr, ddt_ptr, N, Cx, K, inner, BLOCK: tl.constexpr):
    """Program c owns channel c of f: its (N, inner) planes, summed in a fixed order."""
    c = tl.program_id(0).to(tl.int64)
    acc_ty = dt_ptr.dtype.element_ty
    dt = tl.load(dt_ptr + c)
    acc = tl.zeros([BLOCK], dtype=acc_ty)
    total = N * inner
    for start in range(0, total, BLOCK):
        idx = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = idx < total
        o = idx // inner
        sp = idx % inner
        g = tl.load(g_ptr + ((o * (Cx + K) + Cx + c) * inner + sp), mask=mask, other=0.0).to(acc_ty)
        f_offs = (o * K + c) * inner + sp
        f = tl.load(f_ptr + f_offs, mask=mask, other=0.0).to(acc_ty)
        tl.store(df_ptr + f_offs, (g * dt).to(df_ptr.dtype.element_ty), mask=mask)
        acc += g * f
    tl.store(ddt_ptr + c, tl.sum(acc, axis=0))


@triton.jit
def scale_concat_bwd_rows_kernel(g_ptr, f_ptr, dt_ptr, df_ptr, ddt_ptr, R, Cx, K,
                                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channels-last: program p owns f's channels [p*BLOCK_C, (p+1)*BLOCK_C) of every row."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < K
    acc_ty = dt_ptr.dtype.element_ty
    dt = tl.load(dt_ptr + cols, mask=cmask, other=0.0)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_ty)
    for start in range(0, R, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R).to(tl.int64)
        mask = (rows < R)[:, None] & cmask[None, :]
        g = tl.load(g_ptr + (rows[:, None] * (Cx + K) + Cx + cols[None, :]), mask=mask, other=0.0).to(acc_ty)
        f_offs = rows[:, None] * K + cols[None, :]
        f = tl.load(f_ptr + f_offs, mask=mask, other=0.0).to(acc_ty)
        tl.store(df_ptr + f_offs, (g * dt[None, :]).to(df_ptr.dtype.element_ty), mask=mask)
        acc += g * f
    tl.store(ddt_ptr + cols, tl.sum(acc, axis=0), mask=cmask)


def _view(t: torch.Tensor, cl: bool) -> tuple[int, int]:
    """(outer, inner) of t's contiguous block (csrc/scale_concat_layout.h scale_concat_shape)."""
    spatial = 1
    for s in t.shape[2:]:
        spatial *= s
    return (t.shape[0] * spatial, 1) if cl else (t.shape[0], spatial)


@triton_forward("scale_concat")
def scale_concat_triton(x: torch.Tensor, f: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    cl = is_channels_last_like(x)
    x, f, dt = to_layout(x, cl), to_layout(f, cl), dt.contiguous()
    out = _declaration.empty_in_layout(x, x.shape[1] + f.shape[1])
    _, inner = _view(x, cl)
    if out.numel():
        scale_concat_fwd_kernel[(triton.cdiv(out.numel(), FWD_BLOCK),)](
            x, f, dt, out, out.numel(), x.shape[1], f.shape[1], inner, BLOCK=FWD_BLOCK)
    return out


@triton_backward("scale_concat")
def scale_concat_backward_triton(grad: torch.Tensor, f: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(df, ddt) in grad's layout; dx is grad[:, :Cx] (taken by the autograd formula)."""
    cl = is_channels_last_like(grad)
    g, f, dt = to_layout(grad, cl), to_layout(f, cl), dt.contiguous()
    k = f.shape[1]
    cx = g.shape[1] - k
    df = _declaration.empty_in_layout(g, k)
    ddt = torch.empty_like(dt) if f.numel() else torch.zeros_like(dt)  # the kernels write every channel
    if f.numel() == 0:
        return df, ddt
    outer, inner = _view(g, cl)
    if inner > 1:
        scale_concat_bwd_planes_kernel[(k,)](g, f, dt, df, ddt, outer, cx, k, inner, BLOCK=BWD_BLOCK, num_warps=BWD_WARPS)
    else:
        scale_concat_bwd_rows_kernel[(triton.cdiv(k, ROWS_BLOCK_C),)](
            g, f, dt, df, ddt, outer, cx, k, BLOCK_R=ROWS_BLOCK_R, BLOCK_C=ROWS_BLOCK_C)
    return df, ddt


def _sig(dtype: str, names: tuple[str, ...]) -> dict:
    return {n: ("*fp32" if n in ("dt_ptr", "ddt_ptr") else f"*{dtype}") for n in names}


# Ahead-of-time compile configurations (triton_kernels/aot.py): every kernel, each activation dtype,
# with the block sizes the launchers use.
AOT_CONFIGS = [
    cfg
    for dtype in ("fp32", "fp16", "bf16")
    for cfg in (
        dict(kernel=scale_concat_fwd_kernel, name=f"scale_concat_fwd_{dtype}",
             signature={**_sig(dtype, ("x_ptr", "f_ptr", "dt_ptr", "out_ptr")), "numel": "i64", "Cx": "i64", "K": "i64",
                        "inner": "i64", "BLOCK": "constexpr"},
             constexprs={"BLOCK": FWD_BLOCK}),
        dict(kernel=scale_concat_bwd_planes_kernel, name=f"scale_concat_bwd_planes_{dtype}",
             signature={**_sig(dtype, ("g_ptr", "f_ptr", "dt_ptr", "df_ptr", "ddt_ptr")), "N": "i64", "Cx": "i64", "K": "i64",
                        "inner": "i64", "BLOCK": "constexpr"},
             constexprs={"BLOCK": BWD_BLOCK}, num_warps=BWD_WARPS),
        dict(kernel=scale_concat_bwd_rows_kernel, name=f"scale_concat_bwd_rows_{dtype}",
             signature={**_sig(dtype, ("g_ptr", "f_ptr", "dt_ptr", "df_ptr", "ddt_ptr")), "R": "i64", "Cx": "i64", "K": "i64",
                        "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"},
             constexprs={"BLOCK_R": ROWS_BLOCK_R, "BLOCK_C": ROWS_BLOCK_C}),
    )
]
