"""Triton kernels of the fused residual update ``out = y + f * dt[c]`` (docs/ops.md): kernels,
launchers and the torch.library glue in one file (the Liger-Kernel layout).

Tensors are seen as contiguous (outer, C, inner) blocks (tsc_kernels/ops/_layout.py): inner = 1 for
channels-last inputs. Arithmetic runs in dt's dtype (fp32, or fp64 for fp64 inputs).
  forward                 1 launch: reads y, f; writes out
  backward, inner > 1     grid (C, sample chunks): reads grad, f (+ out with the ReLU); writes df
                          (+ dy with the ReLU) and one partial sum of ddt[c] per chunk
                          planes shorter than 128 B (7x7 bf16, 3x3): grid (channel tiles, sample chunks),
                          CH adjacent channels per program (_reduce.narrow_backward_plan)
  backward, inner == 1    grid (channel tiles, row chunks), the same per tile of channels
  then, with > 1 chunk    1 small launch adding the chunks' partials in a fixed order (_reduce.py: a
                          (chunks x channels) tile tree, not a chunk-by-chunk chain)
Both backward reductions run in a fixed order: ddt is deterministic. `_reduce.backward_plan` picks
the backward's kernel, grid and chunks (shared with scale_concat, as are the tile sizes) for the
launcher and for `launch_plan` (the launch plan of tsc_kernels._launch_plan) alike. Launches run on
the tensors' device (the registry wraps every launcher in _launch.on_device); every index product
that can pass 2^31 is int64 (per-element indices only for tensors that need it: INDEX_64,
_launch.index_64).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tsc_kernels.ops._layout import channel_view, is_channels_last_like, to_layout
from tsc_kernels.ops import residual_update as _declaration  # noqa: F401  (declares the op first)
from tsc_kernels.ops.registry import triton_backward, triton_forward

from . import _launch, _reduce

FWD_BLOCK = 1024


@triton.jit
def residual_fwd_kernel(y_ptr, f_ptr, dt_ptr, out_ptr, numel, C, inner, RELU: tl.constexpr, BLOCK: tl.constexpr,
                        INDEX_64: tl.constexpr):
    pid = tl.program_id(0)
    if INDEX_64:  # _launch.index_64: int32 indices (and channel divisions) unless the tensor needs more
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
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
def _backward_tile(g_ptr, f_ptr, out_ptr, dy_ptr, df_ptr, offs, mask, dt, RELU: tl.constexpr):
    """One tile of the backward, shared by the three kernels: df = g dt (dy = g through the ReLU
    first), and g f, the tile's contribution to ddt, in dt's (the accumulation) dtype."""
    acc_ty = dt.dtype
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    if RELU:
        out = tl.load(out_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        g = tl.where(out <= 0, 0.0, g)  # threshold_backward: zero where out <= 0
        tl.store(dy_ptr + offs, g.to(dy_ptr.dtype.element_ty), mask=mask)
    tl.store(df_ptr + offs, (g * dt).to(df_ptr.dtype.element_ty), mask=mask)
    return g * f


@triton.jit
def residual_bwd_planes_kernel(g_ptr, f_ptr, out_ptr, dt_ptr, dy_ptr, df_ptr, partial_ptr, N, C, inner, n_per_chunk,
                               RELU: tl.constexpr, BLOCK: tl.constexpr, INDEX_64: tl.constexpr):
    """Program (c, k) owns channel c of samples [k*n_per_chunk, (k+1)*n_per_chunk): writes their df (dy)
    and partial[k, c], its share of ddt[c], summed in a fixed order (merged by _reduce.sum_chunks).
    Indices are int64 when the tensor needs it (INDEX_64), else int32 like the divisions."""
    c = tl.program_id(0)
    k = tl.program_id(1)
    if INDEX_64:
        c = c.to(tl.int64)
        k = k.to(tl.int64)
    acc_ty = dt_ptr.dtype.element_ty
    dt = tl.load(dt_ptr + c)
    acc = tl.zeros([BLOCK], dtype=acc_ty)
    n0 = k * n_per_chunk
    n1 = tl.minimum(n0 + n_per_chunk, N)  # int64 with INDEX_64: n0 is
    start_idx = n0 * inner
    end_idx = n1 * inner
    for start in range(start_idx, end_idx, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < end_idx
        offs = ((idx // inner) * C + c) * inner + idx % inner
        acc += _backward_tile(g_ptr, f_ptr, out_ptr, dy_ptr, df_ptr, offs, mask, dt, RELU)
    tl.store(partial_ptr + k * C + c, tl.sum(acc, axis=0))


@triton.jit
def residual_bwd_channels_kernel(g_ptr, f_ptr, out_ptr, dt_ptr, dy_ptr, df_ptr, partial_ptr, N, C, inner, n_per_chunk,
                                 RELU: tl.constexpr, CH: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """Narrow planes (_reduce.narrow_backward_plan): program (j, k) owns channels [j*CH, (j+1)*CH) of
    samples [k*n_per_chunk, ...): per sample one contiguous run of CH planes (the tile's columns b,
    channel j*CH + b // inner), BLOCK_A samples per step; partial[k, channels] by _reduce.channel_sums."""
    j = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    acc_ty = dt_ptr.dtype.element_ty
    b = tl.arange(0, BLOCK_B)
    ch = j * CH + b // inner
    bmask = (b < CH * inner) & (ch < C)
    dt = tl.load(dt_ptr + ch, mask=bmask, other=0.0)
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=acc_ty)
    n0 = k * n_per_chunk
    n1 = tl.minimum(n0 + n_per_chunk, N)
    for a0 in range(n0, n1, BLOCK_A):
        a = a0 + tl.arange(0, BLOCK_A).to(tl.int64)
        mask = (a < n1)[:, None] & bmask[None, :]
        offs = a[:, None] * C * inner + j * CH * inner + b[None, :]
        acc += _backward_tile(g_ptr, f_ptr, out_ptr, dy_ptr, df_ptr, offs, mask, dt[None, :], RELU)
    chs = j * CH + tl.arange(0, CH)
    tl.store(partial_ptr + k * C + chs, _reduce.channel_sums(tl.sum(acc, axis=0), inner, CH), mask=chs < C)


@triton.jit
def residual_bwd_rows_kernel(g_ptr, f_ptr, out_ptr, dt_ptr, dy_ptr, df_ptr, partial_ptr, R, C, rows_per_chunk,
                             RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channels-last: program (j, k) owns channels [j*BLOCK_C, (j+1)*BLOCK_C) of rows
    [k*rows_per_chunk, (k+1)*rows_per_chunk) and writes partial[k, channels] (fixed-order tile sum)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    k = tl.program_id(1).to(tl.int64)
    cmask = cols < C
    acc_ty = dt_ptr.dtype.element_ty
    dt = tl.load(dt_ptr + cols, mask=cmask, other=0.0)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_ty)
    r0 = k * rows_per_chunk
    r1 = tl.minimum(r0 + rows_per_chunk, R)  # int64: r0 is
    for start in range(r0, r1, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R).to(tl.int64)
        mask = (rows < r1)[:, None] & cmask[None, :]
        offs = rows[:, None] * C + cols[None, :]
        acc += _backward_tile(g_ptr, f_ptr, out_ptr, dy_ptr, df_ptr, offs, mask, dt[None, :], RELU)
    tl.store(partial_ptr + k * C + cols, tl.sum(acc, axis=0), mask=cmask)


def launch_plan(y, f, dt, relu, sms: int = 132) -> list[dict]:
    """Launches of residual_update (forward) and its backward for these forward arguments (meta
    tensors are fine): built from forward_grid and backward_plan, as the launchers."""
    cl = is_channels_last_like(y)
    outer, C, inner = channel_view(y, cl)
    numel, elem, acc = y.numel(), y.element_size(), dt.element_size()
    if numel == 0:
        return []
    fwd = _launch.launch("residual_fwd_kernel", "forward", forward_grid(numel), 4, bytes=3 * numel * elem + C * acc,
                         chain=1, request_bytes=_launch.request_bytes(FWD_BLOCK, elem), smem=0)
    p = _reduce.narrow_backward_plan(outer, C, inner, elem)
    kernel = _BWD_KERNELS[(p["planes"], p["CH"] > 1)]
    return [fwd] + _reduce.chunk_launches("backward", kernel, p, C, inner, numel, elem, acc, moved=5 if relu else 3)


_BWD_KERNELS = {(True, False): "residual_bwd_planes_kernel", (True, True): "residual_bwd_channels_kernel",
                (False, False): "residual_bwd_rows_kernel"}


def forward_grid(numel: int) -> tuple[int]:
    return (triton.cdiv(numel, FWD_BLOCK),)


@triton_forward("residual_update")
def residual_update_triton(y: torch.Tensor, f: torch.Tensor, dt: torch.Tensor, relu: bool) -> torch.Tensor:
    cl = is_channels_last_like(y)
    y, f, dt = to_layout(y, cl), to_layout(f, cl), dt.contiguous()
    out = torch.empty_like(y)
    outer, C, inner = channel_view(y, cl)
    if y.numel():
        residual_fwd_kernel[forward_grid(y.numel())](
            y, f, dt, out, y.numel(), C, inner, RELU=relu, BLOCK=FWD_BLOCK,
            INDEX_64=_launch.index_64(y.numel(), FWD_BLOCK))
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
    p = _reduce.narrow_backward_plan(outer, C, inner, f.element_size())
    grid, per = p["grid"], p["per"]
    # One chunk: the kernel's partial row is ddt itself (one launch); else a (chunks, C) buffer from
    # the caching allocator (capture-safe) and the fixed-order merge.
    partial = ddt if p["chunks"] == 1 else torch.empty((p["chunks"], C), dtype=dt.dtype, device=dt.device)
    if p["CH"] > 1:
        residual_bwd_channels_kernel[grid](g, f, out, dt, dy_arg, df, partial, outer, C, inner, per, RELU=relu,
                                           CH=p["CH"], BLOCK_A=p["BLOCK_A"], BLOCK_B=p["BLOCK_B"],
                                           num_warps=_reduce.BWD_WARPS)
    elif p["planes"]:
        residual_bwd_planes_kernel[grid](g, f, out, dt, dy_arg, df, partial, outer, C, inner, per,
                                         RELU=relu, BLOCK=_reduce.BWD_BLOCK,
                                         INDEX_64=_launch.index_64(f.numel(), _reduce.BWD_BLOCK),
                                         num_warps=_reduce.BWD_WARPS)
    else:
        residual_bwd_rows_kernel[grid](g, f, out, dt, dy_arg, df, partial, outer, C, per,
                                       RELU=relu, BLOCK_R=_reduce.ROWS_BLOCK_R, BLOCK_C=_reduce.ROWS_BLOCK_C)
    if p["chunks"] > 1:
        _reduce.sum_chunks(partial, ddt)
    return dy, df, ddt


def _sig(dtype: str, acc: str = "fp32") -> dict:
    return {"y_ptr": f"*{dtype}", "f_ptr": f"*{dtype}", "dt_ptr": f"*{acc}", "out_ptr": f"*{dtype}"}


def _bwd_sig(dtype: str) -> dict:
    return {"g_ptr": f"*{dtype}", "f_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "dt_ptr": "*fp32",
            "dy_ptr": f"*{dtype}", "df_ptr": f"*{dtype}", "partial_ptr": "*fp32"}


# the channels kernel's tile at 7x7 maps in bf16 (CH = 4 planes of 49 values in 256 columns)
_NARROW_TILE = dict(CH=4, BLOCK_A=_reduce.BWD_BLOCK // 256, BLOCK_B=256)


# Ahead-of-time compile configurations (triton_kernels/aot.py): every kernel, each activation
# dtype, ReLU on and off, with the block sizes the launchers use.
AOT_CONFIGS = [
    cfg
    for dtype in ("fp32", "fp16", "bf16")
    for relu in (False, True)
    for cfg in (
        dict(kernel=residual_fwd_kernel, name=f"residual_fwd_{dtype}_relu{int(relu)}",
             signature={**_sig(dtype), "numel": "i64", "C": "i64", "inner": "i64", "RELU": "constexpr",
                        "BLOCK": "constexpr", "INDEX_64": "constexpr"},
             constexprs={"RELU": relu, "BLOCK": FWD_BLOCK, "INDEX_64": True}),
        dict(kernel=residual_bwd_planes_kernel, name=f"residual_bwd_planes_{dtype}_relu{int(relu)}",
             signature={**_bwd_sig(dtype), "N": "i64", "C": "i64", "inner": "i64", "n_per_chunk": "i64",
                        "RELU": "constexpr", "BLOCK": "constexpr", "INDEX_64": "constexpr"},
             constexprs={"RELU": relu, "BLOCK": _reduce.BWD_BLOCK, "INDEX_64": True},
             num_warps=_reduce.BWD_WARPS),
        dict(kernel=residual_bwd_channels_kernel, name=f"residual_bwd_channels_{dtype}_relu{int(relu)}",
             signature={**_bwd_sig(dtype), "N": "i64", "C": "i64", "inner": "i64", "n_per_chunk": "i64",
                        "RELU": "constexpr", "CH": "constexpr", "BLOCK_A": "constexpr", "BLOCK_B": "constexpr"},
             constexprs={"RELU": relu, **_NARROW_TILE}, num_warps=_reduce.BWD_WARPS),
        dict(kernel=residual_bwd_rows_kernel, name=f"residual_bwd_rows_{dtype}_relu{int(relu)}",
             signature={**_bwd_sig(dtype), "R": "i64", "C": "i64", "rows_per_chunk": "i64", "RELU": "constexpr",
                        "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"},
             constexprs={"RELU": relu, "BLOCK_R": _reduce.ROWS_BLOCK_R, "BLOCK_C": _reduce.ROWS_BLOCK_C}),
    )
] + _reduce.AOT_CONFIGS  # the merge of the partials (shared with scale_concat and ode_combine)
