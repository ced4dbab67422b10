"""Triton weight-mean projection (docs/tsc.md): every conv weight's mean over C_in in one launch,
and its backward dw̄ / C_in (packed like w̄; the autograd formula expands it over C_in) in one launch.

Ops (schemas of tsc::weight_mean / tsc::weight_mean_backward, csrc/weight_mean_cpu.cpp, so the dispatcher in
tsc_kernels/ops/weight_mean.py can call these in their place):
  tsc::weight_mean_triton(Tensor[] weights) -> Tensor
      every weight (C_out, C_in, *k) averaged over C_in, flattened (C_out, *k), concatenated in
      order into one 1-D tensor; dtype fp32 (fp64 for fp64 weights); fp32 accumulation.
  tsc::weight_mean_backward_triton(Tensor grad, Tensor[] weights) -> Tensor
      out[off_j + e] = grad[off_j + e] / C_in(j): packed like w̄, fp32 (fp64 for fp64).

The weights are not concatenated first: the kernel reads them in place through a table of
(data pointer, rows, run geometry, strides, C_in, offset) rows, one row per weight, so each weight is
read once (docs/ops.md) and channels-last weights need no copy. The forward reads a weight as rows
of contiguous runs (`_run_view`, the twin of csrc/weight_mean_layout.h RunView): one output channel's
(C_in, K) block of an NCHW weight (period K: value e of the run is output k = e % K), or one (o, k)'s
C_in values of a 1x1 or channels-last weight (period 1). A program's lanes walk along the runs of
ROWS rows (issue 22: lanes stepping along C_in K values apart made one-value requests for 3x3
weights); any other layout (a strided C_in view) is made contiguous first.
"""
from __future__ import annotations

import math
from typing import List

import torch
import triton
import triton.language as tl

from tsc_kernels.reference import accumulation_dtype  # fp32 for fp16/bf16/fp32 weights, fp64 for fp64
from tsc_kernels.ops import weight_mean as _declaration  # noqa: F401  (declares the op first)
from tsc_kernels.ops.registry import triton_backward, triton_forward
from tsc_kernels._triton import _launch
from tsc_kernels._triton._launch import DeviceTableCache

# Columns of the per-weight table (int64: the first one is a data pointer); the forward reads every
# column, the backward T_ROWS, T_PERIOD (rows x period = C_out x K values of w̄), T_CIN and T_OFF.
T_PTR, T_ROWS, T_PER_OUT, T_PERIOD, T_RUN, T_SO, T_SK, T_CIN, T_OFF = (tl.constexpr(i) for i in range(9))
NTAB = tl.constexpr(9)


@triton.jit
def weight_mean_fwd_kernel(tab_ptr, out_ptr, W_DTYPE: tl.constexpr, ROWS: tl.constexpr, BLOCK_E: tl.constexpr):
    """Program (t, w): rows t*ROWS.. of weight w (see the module docstring), a (ROWS, BLOCK_E) tile
    along their runs per step. A step covers S = period * max(BLOCK_E // period, 1) values, a
    multiple of the period, so column j always holds output j % period: the steps add up per column
    in order, then each output sums its columns (a fixed tree). A period over BLOCK_E (kernels of
    more than BLOCK_E values) takes S / BLOCK_E column chunks, one output per column.
    Tiles go on grid axis 0 (up to 2^31 - 1), weights on axis 1 (up to 65535)."""
    t = tl.program_id(0).to(tl.int64)
    w = tl.program_id(1)
    row = tab_ptr + w * NTAB
    src = tl.load(row + T_PTR).to(tl.pointer_type(W_DTYPE))
    rows = tl.load(row + T_ROWS)
    per_out = tl.load(row + T_PER_OUT)
    period = tl.load(row + T_PERIOD)
    run = tl.load(row + T_RUN)
    c_in = tl.load(row + T_CIN).to(out_ptr.dtype.element_ty)
    dst = out_ptr + tl.load(row + T_OFF)
    r = t * ROWS + tl.arange(0, ROWS)
    rm = r < rows
    base = (r // per_out) * tl.load(row + T_SO) + (r % per_out) * tl.load(row + T_SK)
    groups = tl.maximum(BLOCK_E // period, 1)
    step = groups * period
    # The grid is sized for the largest weight: tiles past this weight's rows run no loop.
    cols = tl.where(t * ROWS < rows, step, 0)
    for c0 in range(0, cols, BLOCK_E):
        j = c0 + tl.arange(0, BLOCK_E)
        jm = j < step
        acc = tl.zeros([ROWS, BLOCK_E], dtype=out_ptr.dtype.element_ty)
        for e0 in range(0, run, step):
            e = e0 + j
            m = rm[:, None] & (jm & (e < run))[None, :]
            acc += tl.load(src + base[:, None] + e[None, :], mask=m, other=0.0).to(out_ptr.dtype.element_ty)
        if groups == 1:  # one output per column
            tl.store(dst + r[:, None] * period + j[None, :], acc / c_in, mask=rm[:, None] & jm[None, :])
        else:
            k = j % period
            for kk in range(0, period):
                total = tl.sum(tl.where((k == kk)[None, :], acc, 0.0), axis=1)
                tl.store(dst + r * period + kk, total / c_in, mask=rm)


@triton.jit
def weight_mean_bwd_kernel(tab_ptr, grad_ptr, out_ptr, BLOCK: tl.constexpr):
    """Program w: dw̄ / C_in of weight w, packed like w̄ (the autograd formula expands it over C_in)."""
    w = tl.program_id(0)
    row = tab_ptr + w * NTAB
    off = tl.load(row + T_OFF)
    n = tl.load(row + T_ROWS) * tl.load(row + T_PERIOD)
    c_in = tl.load(row + T_CIN).to(grad_ptr.dtype.element_ty)
    for start in range(0, n, BLOCK):
        e = off + start + tl.arange(0, BLOCK)
        m = e < off + n
        tl.store(out_ptr + e, tl.load(grad_ptr + e, mask=m, other=0.0) / c_in, mask=m)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
# Forward: (ROWS rows x BLOCK_E run values) tiles, 4-byte rows of 512 bytes (one warp each), bf16 ones of
# 256; backward: BLOCK elements of dw̄ per program. The GPU sizes compile spill-free for sm_80/sm_90
# (aot.py); the launchers and launch_plan read them at call time, also under the interpreter (tests
# shrink BLOCK_E to run several steps and the column chunks of a long period on small weights).
FWD_ROWS, FWD_BLOCK_E, BWD_BLOCK, NUM_WARPS = 8, 128, 1024, 4

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float64: tl.float64}


def _view3(w: torch.Tensor) -> tuple[int, int, int, int, int, int] | None:
    """(C_out, C_in, K, so, si, sk) when w's kernel dims collapse into one strided dim, else None
    (the Python twin of csrc/weight_mean_layout.h weight_view)."""
    k, sk, first = 1, 1, True
    for d in range(w.dim() - 1, 1, -1):
        if w.shape[d] == 1:
            continue  # size-1 dims have no meaningful stride
        if first:
            sk, first = w.stride(d), False
        elif w.stride(d) != k * sk:
            return None
        k *= w.shape[d]
    return w.shape[0], w.shape[1], k, w.stride(0), w.stride(1), sk


def _run_view(w: torch.Tensor) -> tuple[int, int, int, int, int, int, int] | None:
    """(rows, per_out, period, run, so, sk, C_in) of w read as rows of contiguous runs (module
    docstring), or None when it is not (the Python twin of csrc/weight_mean_layout.h run_view)."""
    v = _view3(w)
    if v is None:
        return None
    c_out, c_in, k, so, si, sk = v
    if si == 1 or c_in == 1:
        return c_out * k, k, 1, c_in, so, sk, c_in
    if sk == 1 and si == k:
        return c_out, 1, k, c_in * k, so, sk, c_in
    return None


def _runs(w: torch.Tensor) -> torch.Tensor:
    """The tensor the forward reads for w: w, or a contiguous copy when w is not rows of runs."""
    return w if _run_view(w) is not None else w.contiguous()


_TABLES = DeviceTableCache()
MAX_WEIGHTS = 65535  # grid axis 1


def _table(tensors, offsets) -> torch.Tensor:
    """The int64 (n, NTAB) device table of `tensors` (each rows of runs, see _run_view) at output
    offsets `offsets`: built once per distinct content and reused (no copy, no sync) while the
    pointers stay the same (the forward's weights always do); see _launch.DeviceTableCache for CUDA graphs."""
    rows = [[t.data_ptr(), *_run_view(t), off] for t, off in zip(tensors, offsets)]
    return _TABLES.get(rows, NTAB.value, tensors[0].device)


def _offsets(weights) -> tuple[list[int], int]:
    """Where each weight's w̄ starts in the packed output, and the total length sum(C_out * K)."""
    off, total = [], 0
    for w in weights:
        off.append(total)
        total += w.shape[0] * math.prod(w.shape[2:])
    return off, total


def _check(op: str, weights) -> None:
    if len(weights) == 0:
        raise ValueError(f"{op}: weights must not be empty")
    for j, w in enumerate(weights):
        if not 3 <= w.dim() <= 5:
            raise ValueError(f"{op}: weights[{j}] must be a conv weight (C_out, C_in, *k) with 1-3 kernel dims, "
                             f"got shape {tuple(w.shape)}")
        if w.dtype != weights[0].dtype or w.device != weights[0].device:
            raise ValueError(f"{op}: weights[{j}] must have weights[0]'s dtype and device")
        if w.dtype not in _TL_DTYPES:
            raise TypeError(f"{op}: weights must be float16/bfloat16/float32/float64, got {w.dtype}")
    if len(weights) > MAX_WEIGHTS:
        raise ValueError(f"{op}: at most {MAX_WEIGHTS} weights per call, got {len(weights)}")


def fwd_grid(weights) -> tuple[int, int]:
    """(row tiles of the weight with the most rows, weights); weights as the kernel reads them (_runs)."""
    return triton.cdiv(max(_run_view(w)[0] for w in weights), FWD_ROWS), len(weights)


def fwd_step(period: int, block_e: int) -> int:
    """Run values of one step of the forward (the kernel's `step`): a multiple of the period."""
    return period * max(block_e // period, 1)


def launch_plan(weights, sms: int = 132) -> list[dict]:
    """Launches of the forward and the backward for these weights (meta tensors are fine), from the
    launchers' _runs, fwd_grid and _offsets. The forward's warps read along the runs: a request is
    the step's values (at most BLOCK_E), or the whole run when it is shorter."""
    _check("weight_mean launch_plan", weights)
    rows, block_e, bwd_block, warps = FWD_ROWS, FWD_BLOCK_E, BWD_BLOCK, NUM_WARPS
    _, total = _offsets(weights)
    if total == 0:
        return []
    elem, acc = weights[0].element_size(), (8 if weights[0].dtype == torch.float64 else 4)
    ws = [_runs(w) for w in weights]
    request = min(_launch.tile_request_bytes(block_e, min(block_e, fwd_step(v[2], block_e), v[3]), elem,
                                             rows_adjacent=False) for v in map(_run_view, ws))
    read = sum(w.numel() for w in weights) * elem
    return [
        _launch.launch("weight_mean_fwd_kernel", "forward", fwd_grid(ws), warps,
                       bytes=read + total * acc + len(weights) * 72, chain=1 + (block_e.bit_length() - 1),
                       request_bytes=request, smem=_launch.reduce_smem(rows, warps, acc)),
        _launch.launch("weight_mean_bwd_kernel", "backward", (len(weights),), warps,
                       bytes=2 * total * acc + len(weights) * 72, chain=1,
                       request_bytes=_launch.request_bytes(bwd_block, acc), smem=0),
    ]


@triton_forward("weight_mean")
def weight_mean_triton(weights: List[torch.Tensor]) -> torch.Tensor:
    _check("tsc::weight_mean_triton", weights)
    ws = [_runs(w) for w in weights]
    off, total = _offsets(ws)
    out = torch.empty(total, dtype=accumulation_dtype(ws[0].dtype), device=ws[0].device)
    if total:
        # A weight with C_in = 0 runs no C_in step and stores 0/0 = NaN, the mean of nothing, as
        # the reference does; it is never dereferenced.
        weight_mean_fwd_kernel[fwd_grid(ws)](_table(ws, off), out, W_DTYPE=_TL_DTYPES[ws[0].dtype],
                                             ROWS=FWD_ROWS, BLOCK_E=FWD_BLOCK_E, num_warps=NUM_WARPS)
    return out


@triton_backward("weight_mean")
def weight_mean_backward_triton(grad: torch.Tensor, weights: List[torch.Tensor]) -> torch.Tensor:
    _check("tsc::weight_mean_backward_triton", weights)
    off, total = _offsets(weights)
    if grad.dim() != 1 or grad.numel() != total or grad.dtype != accumulation_dtype(weights[0].dtype):
        raise ValueError(f"tsc::weight_mean_backward_triton: grad must be 1-D {accumulation_dtype(weights[0].dtype)} "
                         f"with {total} values, got {grad.dtype} {tuple(grad.shape)}")
    grad = grad.contiguous()
    out = torch.empty_like(grad)
    if total:
        # the table is read for offsets, C_out x K and C_in only: no data pointer, no copy of any weight
        rows = [[0, w.shape[0] * math.prod(w.shape[2:]), 1, 1, 1, 0, 0, w.shape[1], o] for w, o in zip(weights, off)]
        weight_mean_bwd_kernel[(len(weights),)](_TABLES.get(rows, NTAB.value, grad.device), grad, out, BLOCK=BWD_BLOCK,
                                                num_warps=NUM_WARPS)
    return out


# Ahead-of-time compile configurations (triton_kernels/aot.py): the weight dtypes of training
# (fp32, and fp16/bf16 weights), with the launcher's tile sizes; fp64 exists for gradcheck only.
# Shapes and strides are runtime values from the table: one binary per dtype serves every network.
AOT_CONFIGS = [
    dict(kernel=weight_mean_fwd_kernel, name=f"weight_mean_fwd_{name}",
         signature={"tab_ptr": "*i64", "out_ptr": "*fp32", "W_DTYPE": "constexpr", "ROWS": "constexpr",
                    "BLOCK_E": "constexpr"},
         constexprs={"W_DTYPE": dtype, "ROWS": FWD_ROWS, "BLOCK_E": FWD_BLOCK_E}, num_warps=NUM_WARPS)
    for name, dtype in (("fp32", tl.float32), ("fp16", tl.float16), ("bf16", tl.bfloat16))
] + [dict(kernel=weight_mean_bwd_kernel, name="weight_mean_bwd_fp32",
          signature={"tab_ptr": "*i64", "grad_ptr": "*fp32", "out_ptr": "*fp32", "BLOCK": "constexpr"},
          constexprs={"BLOCK": BWD_BLOCK}, num_warps=NUM_WARPS)]
