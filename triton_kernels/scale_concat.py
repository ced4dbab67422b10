"""Triton kernels of scale_concat ``out = cat([x, f * dt[c]], dim=1)`` (docs/ops.md):
kernels, launchers and the torch.library glue in one file.

Tensors are seen as contiguous (outer, channels, inner) blocks (inner = 1 for channels-last, see
csrc/scale_concat_math.h): out's row o is x's row o followed by f's row o scaled by dt.
  forward                 1 launch over out: x's part copied, f's part scaled (one pass, both parts)
  backward, inner > 1     one program per (channel c, chunk of samples): reads grad[:, Cx + c] and
                          f[:, c], writes df and its chunk's partial sum of ddt[c]
  backward, inner == 1    one program per (block of 64 channels, chunk of rows)
The chunks split the sample / row axis so that a GPU's SMs have work even when k (the growth rate,
12-48) is small: the split, its partial sums and their fixed-order finalisation are the residual
update's (_reduce.py: backward_plan, and the merge, a fixed-order tile tree); one
chunk is one launch, more add the small ordered merge. `launch_plan` is built from the same
forward_grid / backward_plan the launchers call. ddt is deterministic. dx is a view of grad (no kernel).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tsc_kernels.ops._layout import is_channels_last_like, to_layout
from tsc_kernels.ops import scale_concat as _declaration
from tsc_kernels.ops.registry import triton_backward, triton_forward

from . import _launch, _reduce

FWD_BLOCK = 1024


@triton.jit
def scale_concat_fwd_kernel(x_ptr, f_ptr, dt_ptr, out_ptr, numel, Cx, K, inner, BLOCK: tl.constexpr,
                            INDEX_64: tl.constexpr):
    pid = tl.program_id(0)
    if INDEX_64:  # _launch.index_64: int32 indices (and divisions) unless the tensor needs more
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
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
def scale_concat_bwd_planes_kernel(g_ptr, f_ptr, dt_ptr, df_ptr, partial_ptr, N, Cx, K, inner, n_per_chunk,
                                   BLOCK: tl.constexpr, INDEX_64: tl.constexpr):
    """Program (c, k) owns channel c of f in samples [k*n_per_chunk, (k+1)*n_per_chunk): writes their df
    and partial[k, c], summed in a fixed order. Indices are int64 when the tensors need it (INDEX_64)."""
    c = tl.program_id(0)
    k = tl.program_id(1)
    if INDEX_64:
        c = c.to(tl.int64)
        k = k.to(tl.int64)
    acc_ty = dt_ptr.dtype.element_ty
    dt = tl.load(dt_ptr + c)
    acc = tl.zeros([BLOCK], dtype=acc_ty)
    n0 = k * n_per_chunk
    end_idx = tl.minimum(n0 + n_per_chunk, N) * inner
    for start in range(n0 * inner, end_idx, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < end_idx
        o = idx // inner
        sp = idx % inner
        g = tl.load(g_ptr + ((o * (Cx + K) + Cx + c) * inner + sp), mask=mask, other=0.0).to(acc_ty)
        f_offs = (o * K + c) * inner + sp
        f = tl.load(f_ptr + f_offs, mask=mask, other=0.0).to(acc_ty)
        tl.store(df_ptr + f_offs, (g * dt).to(df_ptr.dtype.element_ty), mask=mask)
        acc += g * f
    tl.store(partial_ptr + k * K + c, tl.sum(acc, axis=0))


@triton.jit
def scale_concat_bwd_rows_kernel(g_ptr, f_ptr, dt_ptr, df_ptr, partial_ptr, R, Cx, K, rows_per_chunk,
                                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channels-last: program (j, k) owns f's channels [j*BLOCK_C, (j+1)*BLOCK_C) of rows
    [k*rows_per_chunk, (k+1)*rows_per_chunk) and writes partial[k, channels]."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    k = tl.program_id(1).to(tl.int64)
    cmask = cols < K
    acc_ty = dt_ptr.dtype.element_ty
    dt = tl.load(dt_ptr + cols, mask=cmask, other=0.0)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_ty)
    r0 = k * rows_per_chunk
    r1 = tl.minimum(r0 + rows_per_chunk, R)
    for start in range(r0, r1, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R).to(tl.int64)
        mask = (rows < r1)[:, None] & cmask[None, :]
        g = tl.load(g_ptr + (rows[:, None] * (Cx + K) + Cx + cols[None, :]), mask=mask, other=0.0).to(acc_ty)
        f_offs = rows[:, None] * K + cols[None, :]
        f = tl.load(f_ptr + f_offs, mask=mask, other=0.0).to(acc_ty)
        tl.store(df_ptr + f_offs, (g * dt[None, :]).to(df_ptr.dtype.element_ty), mask=mask)
        acc += g * f
    tl.store(partial_ptr + k * K + cols, tl.sum(acc, axis=0), mask=cmask)


def _view(t: torch.Tensor, cl: bool) -> tuple[int, int]:
    """(outer, inner) of t's contiguous block (csrc/scale_concat_layout.h scale_concat_shape)."""
    spatial = 1
    for s in t.shape[2:]:
        spatial *= s
    return (t.shape[0] * spatial, 1) if cl else (t.shape[0], spatial)


def forward_grid(numel: int) -> tuple[int]:
    return (triton.cdiv(numel, FWD_BLOCK),)


def launch_plan(x, f, dt, sms: int = 132) -> list[dict]:
    """Launches of scale_concat and its backward for these forward arguments (meta tensors are fine)."""
    cl = is_channels_last_like(x)
    numel = x.numel() + f.numel()
    elem, acc = x.element_size(), dt.element_size()
    if numel == 0:
        return []
    k = f.shape[1]
    plan = [_launch.launch("scale_concat_fwd_kernel", "forward", forward_grid(numel), 4,
                           bytes=2 * numel * elem + k * acc, chain=1,
                           request_bytes=_launch.request_bytes(FWD_BLOCK, elem), smem=0)]
    if f.numel() == 0:
        return plan
    outer, inner = _view(x, cl)
    p = _reduce.backward_plan(outer, k, inner)
    kernel = "scale_concat_bwd_planes_kernel" if p["planes"] else "scale_concat_bwd_rows_kernel"
    return plan + _reduce.chunk_launches("backward", kernel, p, k, inner, f.numel(), elem, acc, moved=3,
                                     rows_adjacent=False)


@triton_forward("scale_concat")
def scale_concat_triton(x: torch.Tensor, f: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    cl = is_channels_last_like(x)
    x, f, dt = to_layout(x, cl), to_layout(f, cl), dt.contiguous()
    out = _declaration.empty_in_layout(x, x.shape[1] + f.shape[1])
    _, inner = _view(x, cl)
    if out.numel():
        scale_concat_fwd_kernel[forward_grid(out.numel())](
            x, f, dt, out, out.numel(), x.shape[1], f.shape[1], inner, BLOCK=FWD_BLOCK,
            INDEX_64=_launch.index_64(out.numel(), FWD_BLOCK))
    return out


@triton_backward("scale_concat")
def scale_concat_backward_triton(grad: torch.Tensor, f: torch.Tensor,
                                 dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    p = _reduce.backward_plan(outer, k, inner)
    grid, per = p["grid"], p["per"]
    # one chunk: the partial row is ddt itself; else a (chunks, k) buffer and the fixed-order merge
    partial = ddt if p["chunks"] == 1 else torch.empty((p["chunks"], k), dtype=dt.dtype, device=dt.device)
    if p["planes"]:
        scale_concat_bwd_planes_kernel[grid](g, f, dt, df, partial, outer, cx, k, inner, per, BLOCK=_reduce.BWD_BLOCK,
                                             INDEX_64=_launch.index_64(g.numel(), _reduce.BWD_BLOCK),
                                             num_warps=_reduce.BWD_WARPS)
    else:
        scale_concat_bwd_rows_kernel[grid](g, f, dt, df, partial, outer, cx, k, per, BLOCK_R=_reduce.ROWS_BLOCK_R,
                                           BLOCK_C=_reduce.ROWS_BLOCK_C)
    if p["chunks"] > 1:
        _reduce.sum_chunks(partial, ddt)
    return df, ddt


def _sig(dtype: str, names: tuple[str, ...]) -> dict:
    return {n: ("*fp32" if n in ("dt_ptr", "partial_ptr") else f"*{dtype}") for n in names}


# Ahead-of-time compile configurations (triton_kernels/aot.py): every kernel, each activation dtype,
# with the block sizes the launchers use.
AOT_CONFIGS = [
    cfg
    for dtype in ("fp32", "fp16", "bf16")
    for cfg in (
        dict(kernel=scale_concat_fwd_kernel, name=f"scale_concat_fwd_{dtype}",
             signature={**_sig(dtype, ("x_ptr", "f_ptr", "dt_ptr", "out_ptr")), "numel": "i64", "Cx": "i64", "K": "i64",
                        "inner": "i64", "BLOCK": "constexpr", "INDEX_64": "constexpr"},
             constexprs={"BLOCK": FWD_BLOCK, "INDEX_64": True}),
        dict(kernel=scale_concat_bwd_planes_kernel, name=f"scale_concat_bwd_planes_{dtype}",
             signature={**_sig(dtype, ("g_ptr", "f_ptr", "dt_ptr", "df_ptr", "partial_ptr")), "N": "i64", "Cx": "i64",
                        "K": "i64", "inner": "i64", "n_per_chunk": "i64", "BLOCK": "constexpr",
                        "INDEX_64": "constexpr"},
             constexprs={"BLOCK": _reduce.BWD_BLOCK, "INDEX_64": True}, num_warps=_reduce.BWD_WARPS),
        dict(kernel=scale_concat_bwd_rows_kernel, name=f"scale_concat_bwd_rows_{dtype}",
             signature={**_sig(dtype, ("g_ptr", "f_ptr", "dt_ptr", "df_ptr", "partial_ptr")), "R": "i64", "Cx": "i64",
                        "K": "i64", "rows_per_chunk": "i64", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"},
             constexprs={"BLOCK_R": _reduce.ROWS_BLOCK_R, "BLOCK_C": _reduce.ROWS_BLOCK_C}),
    )
]
