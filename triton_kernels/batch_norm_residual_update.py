"""Triton kernels of the fused BatchNorm tail ``out = relu?(y + dt[c] * batch_norm(x))``
(docs/ops.md): kernels, launchers and AOT configs in one file.

Tensors are seen as contiguous (outer, C, inner) blocks (tsc_kernels/ops/_layout.py) and walked in
2-D tiles [BLOCK_A, BLOCK_B]:
  planes (inner > 1, NCHW-like)   one channel per program, rows a = n (stride C*inner), columns b = s;
                                  planes under 128 bytes: CH adjacent channels (_reduce.channels_per_program),
                                  columns b = the CH planes of sample n, one contiguous run
  rows   (inner == 1, channels-last or 2-D)   a tile of BLOCK_B channels, rows a = n*spatial (stride C)
The rows a of a tensor are cut into n_chunks chunks of a_per rows (a multiple of BLOCK_A); the
chunking depends on the shape only, so every reduction below sums in the same order on every run
and every GPU (deterministic). Grid (channel tiles, n_chunks): n_chunks <= MAX_CHUNKS on axis 1.
Rows with >= FINAL_BLOCK_K chunks store their (chunk, channel) partials transposed (PART_T), so
that the finalize programs can own FINAL_BLOCK_T channels and still read long runs.

Launches (docs/ops.md says why not one):
  forward, training   stats (per-chunk mean / M2)  ->  stats finalize (Chan merge in chunk order,
                      save_mean / save_invstd, running statistics)  ->  apply          3 launches
  forward, eval       apply (coefficients from the running statistics)                  1 launch
  backward, training  reduce (S1, S2 partials; writes dy)  ->  finalize (S1, S2, ddt, dweight,
                      dbias, dx coefficients)  ->  dx                                    3 launches
  backward, eval      reduce (also writes dx = g' dt γ invstd and dy)  ->  finalize       2 launches
Arithmetic runs in the accumulation dtype (fp32; fp64 for fp64 inputs), the dtype of dt.
"""
from __future__ import annotations

import struct
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from tsc_kernels.ops import batch_norm_residual_update as _declaration  # noqa: F401  (declares the op first)
from tsc_kernels.ops._layout import channel_view, is_channels_last_like, to_layout
from tsc_kernels.ops.registry import triton_backward, triton_forward
from tsc_kernels.reference import accumulation_dtype

from . import _launch
from ._reduce import channel_spread, channel_sums, channels_per_program, chunk_sum, log2

class Sizes(NamedTuple):
    """Tile and chunk sizes. TILE: elements per tile (BLOCK_A * BLOCK_B); ROWS_BLOCK_C: channels per
    tile of the rows layout; MIN_CHUNK: elements a program walks at least (amortises its per-channel
    loads and its partial); MAX_CHUNKS: bound of the chunks per channel (the partial buffers and the
    merges); FINAL_BLOCK: channels per finalize program, FINAL_BLOCK_K: chunks per tile of its merge
    (_reduce.chunk_sum), FINAL_BLOCK_T: channels per finalize program over transposed partials (PART_T);
    NUM_WARPS of every kernel but the backward reduction's REDUCE_WARPS."""
    TILE: int
    ROWS_BLOCK_C: int
    MIN_CHUNK: int
    MAX_CHUNKS: int
    FINAL_BLOCK: int
    FINAL_BLOCK_K: int
    FINAL_BLOCK_T: int
    NUM_WARPS: int
    REDUCE_WARPS: int


# The GPU sizes compile spill-free for sm_80 / sm_90 (aot.py). The backward reduction holds two
# 1024-element accumulators: at 4 warps its aligned (JIT) fp32 rows variant spilled 16 B on sm_80
# (tests/tooling/test_triton_aot.py); 8 warps halve the registers per thread. The finalize merges a
# (64 chunks, 32 channels) tile per step: <= 1024 chunks take 16 steps per pass and a 6-deep tree.
# MIN_CHUNK = one tile: CIFAR's (128, 16, 32, 32) and (128, 64, 8, 8) run >= 512 programs per pass
# (>= 2 per SM, tests/tooling/test_launch_plans.py); with 16384 they ran 128.
GPU = Sizes(TILE=1024, ROWS_BLOCK_C=64, MIN_CHUNK=1024, MAX_CHUNKS=1024, FINAL_BLOCK=32, FINAL_BLOCK_K=64,
            FINAL_BLOCK_T=4, NUM_WARPS=4, REDUCE_WARPS=8)
# Small sizes for tests under the interpreter (tests/ops/test_batch_norm_residual_update.py sets
# RUN = SMALL): tiny shapes then run several chunks, several tiles per chunk and partial tiles, and
# the finalize several chunk tiles (2 chunks each, the last one partial): every path of the GPU chunking.
SMALL = Sizes(TILE=32, ROWS_BLOCK_C=8, MIN_CHUNK=16, MAX_CHUNKS=3, FINAL_BLOCK=4, FINAL_BLOCK_K=2,
              FINAL_BLOCK_T=2, NUM_WARPS=1, REDUCE_WARPS=1)
# The sizes the launchers and launch_plan use (read at call time): the GPU's, also under the
# interpreter, so that a launch plan is both what the launchers launch and what a GPU runs.
RUN = GPU


# ---------------------------------------------------------------------------------------------
# Tile helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _channels(pid_c, C, inner, PLANES: tl.constexpr, CH: tl.constexpr, BLOCK_B: tl.constexpr):
    """The channel of every tile column (in planes: one channel, repeated; with CH > 1 adjacent
    channels, column b in channel pid_c * CH + b // inner) and its mask."""
    if PLANES and CH == 1:
        ch = pid_c + tl.zeros([BLOCK_B], dtype=tl.int64)
    elif PLANES:
        ch = pid_c * CH + tl.arange(0, BLOCK_B) // inner
    else:
        ch = pid_c * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    return ch, ch < C


@triton.jit
def _tile(a0, b0, pid_c, A, C, inner, PLANES: tl.constexpr, CH: tl.constexpr, BLOCK_A: tl.constexpr,
          BLOCK_B: tl.constexpr):
    """Offsets (int64) and mask of the tile with rows a0.. (and columns b0.. in planes; b0 = 0 in rows).
    Planes with CH > 1: a row's columns are the CH adjacent planes of sample a, one contiguous run."""
    a = a0 + tl.arange(0, BLOCK_A).to(tl.int64)
    if PLANES and CH == 1:
        b = b0 + tl.arange(0, BLOCK_B)
        offs = a[:, None] * C * inner + pid_c * inner + b[None, :]
        mask = (a < A)[:, None] & (b < inner)[None, :]
    elif PLANES:
        b = b0 + tl.arange(0, BLOCK_B)
        col = pid_c * CH * inner + b  # the column's offset in a sample's C * inner values
        offs = a[:, None] * C * inner + col[None, :]
        mask = (a < A)[:, None] & ((b < CH * inner) & (col < C * inner))[None, :]
    else:
        b = pid_c * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
        offs = a[:, None] * C + b[None, :]
        mask = (a < A)[:, None] & (b < C)[None, :]
    return offs, mask


@triton.jit
def _part_walk(c, C, n_chunks, PART_T: tl.constexpr):
    """(chunk stride, offsets of the channels c at chunk 0) in one (chunks, C) half of the partials, or
    in its transpose (C, chunks) with PART_T (_plan: where the finalize must split the channels finely)."""
    if PART_T:
        return 1, c * n_chunks
    else:
        return C, c


@triton.jit
def _part_index(k, c, C, n_chunks, PART_T: tl.constexpr):
    """Index of chunk k's partial of channel c (the layout of _part_walk)."""
    stride_k, col = _part_walk(c, C, n_chunks, PART_T)
    return col + k * stride_k


@triton.jit
def _param(ptr, ch, cmask, HAS: tl.constexpr, default: tl.constexpr, acc_ty: tl.constexpr):
    """γ or β of the tile's channels in the accumulation dtype, `default` without affine."""
    if HAS:
        return tl.load(ptr + ch, mask=cmask, other=0.0).to(acc_ty)
    else:
        return tl.full(ch.shape, default, acc_ty)


@triton.jit
def _as_acc(hi, lo, acc_ty: tl.constexpr):
    """A host float passed as two fp32 halves (hi + lo), exact to ~48 bits in fp64."""
    return tl.zeros([], dtype=acc_ty) + hi + lo  # (not hi.to(): the interpreter passes Python floats)


@triton.jit
def _invstd(var_eps, acc_ty: tl.constexpr):
    """1 / sqrt(v + eps) with a correctly rounded square root (tl.sqrt may be approximate in fp32)."""
    if acc_ty == tl.float64:
        return 1.0 / tl.sqrt(var_eps)
    else:
        return 1.0 / tl.sqrt_rn(var_eps)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def bn_stats_kernel(x_ptr, part_ptr, A, C, inner, a_per, n_chunks,
                    PLANES: tl.constexpr, CH: tl.constexpr, PART_T: tl.constexpr, BLOCK_A: tl.constexpr,
                    BLOCK_B: tl.constexpr):
    """Program (channel tile, chunk k): mean and M2 of its chunk, per channel, into part[0/1, k, c].

    Sums are taken of x - K, K = the chunk's first value of the channel (with CH > 1 channels: the
    mean of the channel's plane in the chunk's first sample, nearer the mean), so that a channel whose
    mean is large against its spread does not lose its variance to cancellation; the chunks are
    merged exactly (Chan) by bn_stats_finalize_kernel.
    """
    pid_c = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    acc_ty = part_ptr.dtype.element_ty
    ch, cmask = _channels(pid_c, C, inner, PLANES, CH, BLOCK_B)
    a_start = k * a_per
    a_end = tl.minimum(a_start + a_per, A)
    if PLANES and CH > 1:  # per channel: the mean of its plane in the chunk's first sample
        row, row_mask = _tile(a_start, 0, pid_c, a_end, C, inner, PLANES, CH, 1, BLOCK_B)
        shift_ch = channel_sums(tl.reshape(tl.load(x_ptr + row, mask=row_mask, other=0.0).to(acc_ty), [BLOCK_B]),
                                inner, CH) / inner
        shift = channel_spread(shift_ch, inner, BLOCK_B)  # per column
    elif PLANES:  # per column: the first value of the column's channel
        shift = tl.load(x_ptr + a_start * C * inner + ch * inner, mask=cmask, other=0.0).to(acc_ty)
    else:
        shift = tl.load(x_ptr + a_start * C + ch, mask=cmask, other=0.0).to(acc_ty)
    s1 = tl.zeros([BLOCK_A, BLOCK_B], dtype=acc_ty)
    s2 = tl.zeros([BLOCK_A, BLOCK_B], dtype=acc_ty)
    for a0 in range(a_start, a_end, BLOCK_A):
        for b0 in range(0, CH * inner, BLOCK_B):  # one step in rows (inner == 1) and with CH > 1
            offs, mask = _tile(a0, b0, pid_c, a_end, C, inner, PLANES, CH, BLOCK_A, BLOCK_B)
            d = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty) - shift[None, :], 0.0)
            s1 += d
            s2 += d * d
    count = ((a_end - a_start) * inner).to(acc_ty)  # values of each channel in this chunk
    if PLANES and CH == 1:
        t1 = tl.sum(tl.sum(s1, axis=1), axis=0)
        t2 = tl.sum(tl.sum(s2, axis=1), axis=0)
        sh = tl.sum(tl.where(tl.arange(0, BLOCK_B) == 0, shift, 0.0), axis=0)
        tl.store(part_ptr + k * C + pid_c, sh + t1 / count)
        tl.store(part_ptr + (n_chunks + k) * C + pid_c, tl.maximum(t2 - t1 * (t1 / count), 0.0))
    elif PLANES:  # CH channels: each its own sums out of the column sums (fixed-shape trees)
        chs = pid_c * CH + tl.arange(0, CH).to(tl.int64)
        m = chs < C
        t1 = channel_sums(tl.sum(s1, axis=0), inner, CH)
        t2 = channel_sums(tl.sum(s2, axis=0), inner, CH)
        tl.store(part_ptr + k * C + chs, shift_ch + t1 / count, mask=m)
        tl.store(part_ptr + (n_chunks + k) * C + chs, tl.maximum(t2 - t1 * (t1 / count), 0.0), mask=m)
    else:
        t1 = tl.sum(s1, axis=0)
        t2 = tl.sum(s2, axis=0)
        at = _part_index(k, ch, C, n_chunks, PART_T)
        tl.store(part_ptr + at, shift + t1 / count, mask=cmask)
        tl.store(part_ptr + n_chunks * C + at, tl.maximum(t2 - t1 * (t1 / count), 0.0), mask=cmask)


@triton.jit
def bn_stats_finalize_kernel(part_ptr, mean_ptr, invstd_ptr, rm_ptr, rv_ptr, A, C, inner, a_per, n_chunks,
                             mom_hi, mom_lo, eps_hi, eps_lo, HAS_RUNNING: tl.constexpr, BLOCK: tl.constexpr,
                             BLOCK_K: tl.constexpr, PART_T: tl.constexpr):
    """Program j: channels j*BLOCK..; merges the chunks' (mean, M2) (Chan et al.) without a serial
    chain: every chunk but the last holds n = a_per * inner values, so with d_k = mean_k - mean_0
        mean = mean_0 + (n Σ_k d_k + (n_last - n) d_last) / total
        M2   = Σ_k M2_k + n Σ_k e_k² + (n_last - n) e_last²,   e_k = mean_k - mean
    three fixed-order tile sums (_reduce.chunk_sum) and one weighted term for the short last chunk.
    Writes save_mean / save_invstd and updates the running statistics (in their own dtype).
    PART_T: the partials are (C, chunks) (_part_index), a channel's chunks contiguous."""
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    cmask = c < C
    acc_ty = mean_ptr.dtype.element_ty
    last = (n_chunks - 1) + tl.zeros([], dtype=tl.int64)
    n = (a_per * inner + tl.zeros([], dtype=tl.int64)).to(acc_ty)
    n_last = ((A - last * a_per) * inner).to(acc_ty)
    total = ((tl.zeros([], dtype=tl.int64) + A) * inner).to(acc_ty)
    m2_ptr = part_ptr + n_chunks * C
    stride_k, col = _part_walk(c, C, n_chunks, PART_T)
    mean0 = tl.load(part_ptr + col, mask=cmask, other=0.0)
    d_sum = chunk_sum(part_ptr, stride_k, n_chunks, col, cmask, mean0, part_ptr, SHIFTED=True, SQUARE=False,
                      WEIGHTED=False, BLOCK_K=BLOCK_K)
    d_last = tl.load(part_ptr + last * stride_k + col, mask=cmask, other=0.0) - mean0
    mean = mean0 + (n * d_sum + (n_last - n) * d_last) / total
    e_sum = chunk_sum(part_ptr, stride_k, n_chunks, col, cmask, mean, part_ptr, SHIFTED=True, SQUARE=True,
                      WEIGHTED=False, BLOCK_K=BLOCK_K)
    m2_sum = chunk_sum(m2_ptr, stride_k, n_chunks, col, cmask, mean, part_ptr, SHIFTED=False, SQUARE=False,
                       WEIGHTED=False, BLOCK_K=BLOCK_K)
    e_last = tl.load(part_ptr + last * stride_k + col, mask=cmask, other=0.0) - mean
    m2 = m2_sum + n * e_sum + (n_last - n) * (e_last * e_last)
    var = tl.maximum(m2, 0.0) / total
    eps = _as_acc(eps_hi, eps_lo, acc_ty)
    tl.store(mean_ptr + c, mean, mask=cmask)
    tl.store(invstd_ptr + c, _invstd(var + eps, acc_ty), mask=cmask)
    if HAS_RUNNING:
        mom = _as_acc(mom_hi, mom_lo, acc_ty)
        rm = tl.load(rm_ptr + c, mask=cmask, other=0.0).to(acc_ty)
        rv = tl.load(rv_ptr + c, mask=cmask, other=0.0).to(acc_ty)
        unbiased = var * (total / (total - 1.0))
        tl.store(rm_ptr + c, (mom * mean + (1.0 - mom) * rm).to(rm_ptr.dtype.element_ty), mask=cmask)
        tl.store(rv_ptr + c, (mom * unbiased + (1.0 - mom) * rv).to(rv_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def bn_apply_kernel(y_ptr, x_ptr, out_ptr, dt_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, save_mean_ptr, save_invstd_ptr,
                    A, C, inner, a_per, eps_hi, eps_lo,
                    EVAL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, RELU: tl.constexpr,
                    PLANES: tl.constexpr, CH: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """out = relu?(y + a (x - μ) + dt β), a = dt γ invstd, over the program's chunk.

    Training: μ, invstd from the stats finalize (mean_ptr / var_ptr hold save_mean / save_invstd).
    Eval: μ = running_mean, invstd = 1/sqrt(running_var + eps) (mean_ptr / var_ptr are the running
    buffers, any float dtype), and the chunk-0 programs write save_mean / save_invstd.
    """
    pid_c = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    acc_ty = dt_ptr.dtype.element_ty
    ch, cmask = _channels(pid_c, C, inner, PLANES, CH, BLOCK_B)
    mean = tl.load(mean_ptr + ch, mask=cmask, other=0.0).to(acc_ty)
    if EVAL:
        run_var = tl.load(var_ptr + ch, mask=cmask, other=1.0).to(acc_ty)
        invstd = _invstd(run_var + _as_acc(eps_hi, eps_lo, acc_ty), acc_ty)
        if k == 0:
            tl.store(save_mean_ptr + ch, mean, mask=cmask)
            tl.store(save_invstd_ptr + ch, invstd, mask=cmask)
    else:
        invstd = tl.load(var_ptr + ch, mask=cmask, other=0.0)
    dt = tl.load(dt_ptr + ch, mask=cmask, other=0.0)
    scale = dt * _param(w_ptr, ch, cmask, HAS_W, 1.0, acc_ty) * invstd
    shift = dt * _param(b_ptr, ch, cmask, HAS_B, 0.0, acc_ty)
    a_start = k * a_per
    a_end = tl.minimum(a_start + a_per, A)
    for a0 in range(a_start, a_end, BLOCK_A):
        for b0 in range(0, CH * inner, BLOCK_B):  # one step in rows (inner == 1) and with CH > 1
            offs, mask = _tile(a0, b0, pid_c, a_end, C, inner, PLANES, CH, BLOCK_A, BLOCK_B)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
            y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc_ty)
            out = y + scale[None, :] * (x - mean[None, :]) + shift[None, :]
            if RELU:
                out = tl.where(out < 0, 0.0, out)  # NaN passes, as torch.relu
            tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def bn_bwd_reduce_kernel(g_ptr, x_ptr, out_ptr, dt_ptr, w_ptr, mean_ptr, invstd_ptr, dy_ptr, dx_ptr, part_ptr,
                         A, C, inner, a_per, n_chunks,
                         RELU: tl.constexpr, EVAL: tl.constexpr, HAS_W: tl.constexpr,
                         PLANES: tl.constexpr, CH: tl.constexpr, PART_T: tl.constexpr, BLOCK_A: tl.constexpr,
                         BLOCK_B: tl.constexpr):
    """Program (channel tile, chunk k): part[0, k, c] = Σ g', part[1, k, c] = Σ g' (x - μ) over the
    chunk (g' = grad masked by out > 0 with the ReLU, written to dy). Eval: dx = g' dt γ invstd too."""
    pid_c = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    acc_ty = dt_ptr.dtype.element_ty
    ch, cmask = _channels(pid_c, C, inner, PLANES, CH, BLOCK_B)
    mean = tl.load(mean_ptr + ch, mask=cmask, other=0.0)
    if EVAL:
        scale = tl.load(dt_ptr + ch, mask=cmask, other=0.0) * _param(w_ptr, ch, cmask, HAS_W, 1.0, acc_ty) \
            * tl.load(invstd_ptr + ch, mask=cmask, other=0.0)
    s1 = tl.zeros([BLOCK_A, BLOCK_B], dtype=acc_ty)
    s2 = tl.zeros([BLOCK_A, BLOCK_B], dtype=acc_ty)
    a_start = k * a_per
    a_end = tl.minimum(a_start + a_per, A)
    for a0 in range(a_start, a_end, BLOCK_A):
        for b0 in range(0, CH * inner, BLOCK_B):  # one step in rows (inner == 1) and with CH > 1
            offs, mask = _tile(a0, b0, pid_c, a_end, C, inner, PLANES, CH, BLOCK_A, BLOCK_B)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc_ty)
            if RELU:
                out = tl.load(out_ptr + offs, mask=mask, other=0.0).to(acc_ty)
                g = tl.where(out <= 0, 0.0, g)  # threshold_backward: zero where out <= 0
                tl.store(dy_ptr + offs, g.to(dy_ptr.dtype.element_ty), mask=mask)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
            s1 += g
            s2 += tl.where(mask, g * (x - mean[None, :]), 0.0)
            if EVAL:
                tl.store(dx_ptr + offs, (g * scale[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)
    if PLANES and CH == 1:
        tl.store(part_ptr + k * C + pid_c, tl.sum(tl.sum(s1, axis=1), axis=0))
        tl.store(part_ptr + (n_chunks + k) * C + pid_c, tl.sum(tl.sum(s2, axis=1), axis=0))
    elif PLANES:  # CH channels: each its own sums out of the column sums (fixed-shape trees)
        chs = pid_c * CH + tl.arange(0, CH).to(tl.int64)
        tl.store(part_ptr + k * C + chs, channel_sums(tl.sum(s1, axis=0), inner, CH), mask=chs < C)
        tl.store(part_ptr + (n_chunks + k) * C + chs, channel_sums(tl.sum(s2, axis=0), inner, CH), mask=chs < C)
    else:
        at = _part_index(k, ch, C, n_chunks, PART_T)
        tl.store(part_ptr + at, tl.sum(s1, axis=0), mask=cmask)
        tl.store(part_ptr + n_chunks * C + at, tl.sum(s2, axis=0), mask=cmask)


@triton.jit
def bn_bwd_finalize_kernel(part_ptr, dt_ptr, w_ptr, b_ptr, invstd_ptr, ddt_ptr, dw_ptr, db_ptr, coef_ptr,
                           total, C, n_chunks,
                           TRAINING: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr,
                           BLOCK_K: tl.constexpr, PART_T: tl.constexpr):
    """Program j: channels j*BLOCK..; S1, S2 summed over the chunks in a fixed order (_reduce.chunk_sum:
    tiles of BLOCK_K chunks, then a tree); ddt = γ S2 + β S1,
    dweight = dt S2, dbias = dt S1; training: the dx coefficients coef[0] = a S1 / M and
    coef[1] = a invstd S2 / M (a = dt γ invstd), dx = a g' - coef[0] - coef[1] (x - μ)."""
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    cmask = c < C
    acc_ty = dt_ptr.dtype.element_ty
    stride_k, col = _part_walk(c, C, n_chunks, PART_T)
    s1 = chunk_sum(part_ptr, stride_k, n_chunks, col, cmask, part_ptr, part_ptr, SHIFTED=False, SQUARE=False,
                   WEIGHTED=False, BLOCK_K=BLOCK_K)
    s2 = chunk_sum(part_ptr + n_chunks * C, stride_k, n_chunks, col, cmask, part_ptr, part_ptr, SHIFTED=False,
                   SQUARE=False, WEIGHTED=False, BLOCK_K=BLOCK_K)
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0)
    s2 = s2 * invstd  # Σ g' x̂
    dt = tl.load(dt_ptr + c, mask=cmask, other=0.0)
    gamma = _param(w_ptr, c, cmask, HAS_W, 1.0, acc_ty)
    beta = _param(b_ptr, c, cmask, HAS_B, 0.0, acc_ty)
    tl.store(ddt_ptr + c, gamma * s2 + beta * s1, mask=cmask)
    if HAS_W:
        tl.store(dw_ptr + c, dt * s2, mask=cmask)
    if HAS_B:
        tl.store(db_ptr + c, dt * s1, mask=cmask)
    if TRAINING:
        scale = dt * gamma * invstd
        m = (tl.zeros([], dtype=tl.int64) + total).to(acc_ty)
        tl.store(coef_ptr + c, scale * (s1 / m), mask=cmask)
        tl.store(coef_ptr + C + c, scale * invstd * (s2 / m), mask=cmask)


@triton.jit
def bn_bwd_dx_kernel(g_ptr, x_ptr, dt_ptr, w_ptr, mean_ptr, invstd_ptr, coef_ptr, dx_ptr, A, C, inner, a_per,
                     HAS_W: tl.constexpr, PLANES: tl.constexpr, CH: tl.constexpr, BLOCK_A: tl.constexpr,
                     BLOCK_B: tl.constexpr):
    """Training dx = a g' - coef[0] - coef[1] (x - μ) over the program's chunk (g' = dy with the
    ReLU, grad without)."""
    pid_c = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    acc_ty = dt_ptr.dtype.element_ty
    ch, cmask = _channels(pid_c, C, inner, PLANES, CH, BLOCK_B)
    mean = tl.load(mean_ptr + ch, mask=cmask, other=0.0)
    scale = tl.load(dt_ptr + ch, mask=cmask, other=0.0) * _param(w_ptr, ch, cmask, HAS_W, 1.0, acc_ty) \
        * tl.load(invstd_ptr + ch, mask=cmask, other=0.0)
    c0 = tl.load(coef_ptr + ch, mask=cmask, other=0.0)
    c1 = tl.load(coef_ptr + C + ch, mask=cmask, other=0.0)
    a_start = k * a_per
    a_end = tl.minimum(a_start + a_per, A)
    for a0 in range(a_start, a_end, BLOCK_A):
        for b0 in range(0, CH * inner, BLOCK_B):  # one step in rows (inner == 1) and with CH > 1
            offs, mask = _tile(a0, b0, pid_c, a_end, C, inner, PLANES, CH, BLOCK_A, BLOCK_B)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc_ty)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
            dx = scale[None, :] * g - c0[None, :] - c1[None, :] * (x - mean[None, :])
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _split(v: float) -> tuple[float, float]:
    """v as fp32 hi + fp32 lo (Triton passes Python floats as fp32; fp64 statistics need more)."""
    hi = struct.unpack("f", struct.pack("f", v))[0]
    return hi, struct.unpack("f", struct.pack("f", v - hi))[0]


def _plan(t: torch.Tensor, cl: bool, sizes: Optional[Sizes] = None) -> dict:
    """Tile shape and chunking of `t` (already in its kernel layout; a meta tensor is fine): a function
    of the shape and `sizes` (default RUN) only; the launchers and launch_plan both call it."""
    sizes = RUN if sizes is None else sizes
    outer, C, inner = channel_view(t, cl)
    planes = inner > 1
    ch = channels_per_program(C, inner, t.element_size(), sizes.TILE) if planes else 1
    if planes:  # CH > 1: planes under 128 bytes, a program's rows are CH adjacent planes of a sample
        block_b = min(max(triton.next_power_of_2(ch * inner), 2), sizes.TILE)
        row_len = ch * inner  # values of the program's channels per row a
        ctiles = triton.cdiv(C, ch)
    else:
        block_b = sizes.ROWS_BLOCK_C
        row_len = block_b
        ctiles = triton.cdiv(C, block_b)
    block_a = sizes.TILE // block_b
    steps = triton.cdiv(outer, block_a)
    per_chunk = max(triton.cdiv(steps, sizes.MAX_CHUNKS), triton.cdiv(sizes.MIN_CHUNK, block_a * row_len), 1)
    a_per = per_chunk * block_a
    n_chunks = triton.cdiv(outer, a_per) if outer else 0
    # Rows with many chunks (channels-last: up to MAX_CHUNKS) store their partials transposed, (C, chunks):
    # the finalize then reads a channel's chunks as one run and can own FINAL_BLOCK_T channels per
    # program (C = 2048: 512 programs, not the 64 of 32-channel rows of the (chunks, C) layout).
    part_t = not planes and n_chunks >= sizes.FINAL_BLOCK_K
    final_block = sizes.FINAL_BLOCK_T if part_t else sizes.FINAL_BLOCK
    return dict(A=outer, C=C, inner=inner, a_per=a_per, n_chunks=n_chunks, ctiles=ctiles,
                PLANES=planes, CH=ch, PART_T=part_t, BLOCK_A=block_a, BLOCK_B=block_b, final_block=final_block,
                final_grid=(triton.cdiv(C, final_block),), sizes=sizes)


def launch_plan(y, x, dt, running_mean, running_var, weight, bias, training, momentum, eps, relu,
                sms: int = 132) -> list[dict]:
    """Launches of the forward and the backward for these forward arguments (meta tensors are fine),
    from the same _plan as the launchers."""
    cl = is_channels_last_like(y)
    p = _plan(y, cl)
    sz = p["sizes"]
    if p["C"] == 0:
        return []
    numel, elem, acc = y.numel(), y.element_size(), dt.element_size()
    C, chunks, w = p["C"], p["n_chunks"], sz.NUM_WARPS
    grid = (p["ctiles"], max(chunks, 1))
    if p["PLANES"]:  # lanes along a row's CH adjacent planes (CH * inner contiguous values)
        request = _launch.request_bytes(min(p["CH"] * p["inner"], p["BLOCK_B"]), elem)
    else:  # lanes along BLOCK_B channels of a row, rows C values apart
        request = _launch.tile_request_bytes(p["BLOCK_B"], min(C, p["BLOCK_B"]), elem, rows_adjacent=C <= p["BLOCK_B"])
    outs = p["BLOCK_B"] if p["CH"] > 1 or not p["PLANES"] else 1  # values one tile reduction yields
    tree = log2(p["BLOCK_A"]) + (log2(p["BLOCK_B"]) if p["PLANES"] else 0)  # CH > 1: channel_sums' tree
    part = 2 * chunks * C * acc
    merge_chain = lambda passes: passes * (triton.cdiv(max(chunks, 1), sz.FINAL_BLOCK_K) + log2(sz.FINAL_BLOCK_K))  # noqa: E731
    final_smem = _launch.reduce_smem(p["final_block"], w, acc)
    # a warp's run in the partials: FINAL_BLOCK channels of a chunk, or (PART_T) a channel's chunks
    final_run = min(chunks, sz.FINAL_BLOCK_K) if p["PART_T"] else min(C, sz.FINAL_BLOCK)

    def tiled(kernel, phase, moved, warps=w, chain=1, smem=0):
        return _launch.launch(kernel, phase, grid, warps, bytes=moved * numel * elem + part + 4 * C * acc, chain=chain,
                              request_bytes=request, smem=smem)

    def final(kernel, phase, chain, moved_c):
        return _launch.launch(kernel, phase, p["final_grid"], w, bytes=part + moved_c * C * acc, chain=chain,
                              request_bytes=_launch.request_bytes(final_run, acc), smem=final_smem)

    plan = []
    if training:
        plan += [tiled("bn_stats_kernel", "forward", 1, chain=1 + tree, smem=_launch.reduce_smem(outs, w, acc)),
                 final("bn_stats_finalize_kernel", "forward", merge_chain(2) + 3, 6)]
    plan.append(tiled("bn_apply_kernel", "forward", 3))
    rw = sz.REDUCE_WARPS
    moved = (3 if relu else 2) + (1 if relu else 0) + (0 if training else 1)
    plan.append(tiled("bn_bwd_reduce_kernel", "backward", moved, warps=rw, chain=1 + tree,
                      smem=2 * _launch.reduce_smem(outs, rw, acc)))
    plan.append(final("bn_bwd_finalize_kernel", "backward", merge_chain(1), 8))
    if training:
        plan.append(tiled("bn_bwd_dx_kernel", "backward", 3))
    return plan


@triton_forward("batch_norm_residual_update")
def batch_norm_residual_update_triton(
    y: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    training: bool, momentum: float, eps: float, relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cl = is_channels_last_like(y)
    y, x, dt = to_layout(y, cl), to_layout(x, cl), dt.contiguous()
    acc = accumulation_dtype(x.dtype)
    out = torch.empty_like(y)
    save_mean = x.new_empty(x.shape[1], dtype=acc)
    save_invstd = x.new_empty(x.shape[1], dtype=acc)
    p = _plan(y, cl)
    sz = p["sizes"]
    if training and p["A"] * p["inner"] <= 1:
        raise ValueError("training needs more than 1 value per channel (N * spatial), "
                         f"got input shape {tuple(y.shape)}")
    if p["C"] == 0:
        return out, save_mean, save_invstd
    has_running = running_mean is not None
    rm, rv = (running_mean.contiguous(), running_var.contiguous()) if has_running else (save_mean, save_invstd)
    w = weight.contiguous() if weight is not None else dt  # unused pointer without affine
    b = bias.contiguous() if bias is not None else dt
    tiles = dict(PLANES=p["PLANES"], CH=p["CH"], BLOCK_A=p["BLOCK_A"], BLOCK_B=p["BLOCK_B"])
    eps_hi, eps_lo = _split(eps)
    if training:
        part = torch.empty((2, p["n_chunks"], p["C"]), dtype=acc, device=x.device)
        bn_stats_kernel[(p["ctiles"], p["n_chunks"])](
            x, part, p["A"], p["C"], p["inner"], p["a_per"], p["n_chunks"], PART_T=p["PART_T"], **tiles,
            num_warps=sz.NUM_WARPS)
        bn_stats_finalize_kernel[p["final_grid"]](
            part, save_mean, save_invstd, rm, rv, p["A"], p["C"], p["inner"], p["a_per"], p["n_chunks"],
            *_split(momentum), eps_hi, eps_lo, HAS_RUNNING=has_running, BLOCK=p["final_block"],
            BLOCK_K=sz.FINAL_BLOCK_K, PART_T=p["PART_T"], num_warps=sz.NUM_WARPS)
        mean_src, var_src = save_mean, save_invstd
    else:
        mean_src, var_src = rm, rv
    # eval runs at least one chunk per channel: its chunk-0 programs write save_mean / save_invstd
    bn_apply_kernel[(p["ctiles"], max(p["n_chunks"], 1))](
        y, x, out, dt, w, b, mean_src, var_src, save_mean, save_invstd, p["A"], p["C"], p["inner"], p["a_per"],
        eps_hi, eps_lo, EVAL=not training, HAS_W=weight is not None, HAS_B=bias is not None, RELU=relu,
        **tiles, num_warps=sz.NUM_WARPS)
    # A non-contiguous buffer was updated through a contiguous copy: write each back on its own
    # (one may be contiguous and the other not).
    if has_running and rm is not running_mean:
        running_mean.copy_(rm)
    if has_running and rv is not running_var:
        running_var.copy_(rv)
    return out, save_mean, save_invstd


@triton_backward("batch_norm_residual_update")
def batch_norm_residual_update_backward_triton(
    grad: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], save_mean: torch.Tensor, save_invstd: torch.Tensor,
    relu_out: Optional[torch.Tensor], training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dx, ddt, dweight, dbias) as tsc::batch_norm_residual_update_backward (the declaration's
    docstring): dy empty without the ReLU, dweight / dbias empty without weight / bias."""
    cl = is_channels_last_like(x)
    relu = relu_out is not None
    x, g, dt = to_layout(x, cl), to_layout(grad, cl), dt.contiguous()
    save_mean, save_invstd = save_mean.contiguous(), save_invstd.contiguous()
    acc = accumulation_dtype(x.dtype)
    out = to_layout(relu_out, cl) if relu else x  # unused pointer without the ReLU
    dx = torch.empty_like(x)
    dy = torch.empty_like(x) if relu else x.new_empty(0)
    ddt = torch.empty_like(dt)
    dw = torch.empty_like(dt) if weight is not None else x.new_empty(0, dtype=acc)
    db = torch.empty_like(dt) if bias is not None else x.new_empty(0, dtype=acc)
    w = weight.contiguous() if weight is not None else dt  # unused pointers without affine
    b = bias.contiguous() if bias is not None else dt
    p = _plan(x, cl)
    sz = p["sizes"]
    if p["C"]:
        tiles = dict(PLANES=p["PLANES"], CH=p["CH"], BLOCK_A=p["BLOCK_A"], BLOCK_B=p["BLOCK_B"])
        part = torch.empty((2, p["n_chunks"], p["C"]), dtype=acc, device=x.device)
        coef = torch.empty((2, p["C"]), dtype=acc, device=x.device) if training else ddt  # unused in eval
        if p["n_chunks"]:
            bn_bwd_reduce_kernel[(p["ctiles"], p["n_chunks"])](
                g, x, out, dt, w, save_mean, save_invstd, dy if relu else dx, dx, part,
                p["A"], p["C"], p["inner"], p["a_per"], p["n_chunks"],
                RELU=relu, EVAL=not training, HAS_W=weight is not None, PART_T=p["PART_T"], **tiles,
                num_warps=sz.REDUCE_WARPS)
        bn_bwd_finalize_kernel[p["final_grid"]](
            part, dt, w, b, save_invstd, ddt, dw if weight is not None else ddt, db if bias is not None else ddt,
            coef, p["A"] * p["inner"], p["C"], p["n_chunks"],
            TRAINING=training, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK=p["final_block"],
            BLOCK_K=sz.FINAL_BLOCK_K, PART_T=p["PART_T"], num_warps=sz.NUM_WARPS)
        if training and p["n_chunks"]:
            bn_bwd_dx_kernel[(p["ctiles"], p["n_chunks"])](
                dy if relu else g, x, dt, w, save_mean, save_invstd, coef, dx, p["A"], p["C"], p["inner"], p["a_per"],
                HAS_W=weight is not None, **tiles, num_warps=sz.NUM_WARPS)
    if relu and is_channels_last_like(relu_out) != cl and x.dim() > 2:
        dy = to_layout(dy, is_channels_last_like(relu_out))  # dy keeps relu_out's layout (the fake's rule)
    return dy, dx, ddt, dw, db


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile configurations (triton_kernels/aot.py): every kernel with the launchers'
# GPU tile sizes, each activation dtype and both layouts: planes with long rows (BLOCK_B = TILE:
# 56x56 and larger maps) and rows (channels-last), plus planes with short rows (BLOCK_B = 64, 7x7
# maps) in fp32; the apply and reduce kernels with ReLU + training and no ReLU + eval (every flag
# value per dtype and layout). fp32 statistics and affine parameters.
# ---------------------------------------------------------------------------------------------
_LAYOUTS = (("planes_long", True, GPU.TILE, 1), ("rows", False, GPU.ROWS_BLOCK_C, 1), ("planes_short", True, 64, 1),
            ("planes_narrow", True, 256, 4))
_TILE_SIG = {"A": "i64", "C": "i32", "inner": "i32", "a_per": "i64"}


def _tiles(planes: bool, block_b: int, ch: int) -> dict:
    return {"PLANES": planes, "CH": ch, "BLOCK_A": GPU.TILE // block_b, "BLOCK_B": block_b}


def _aot_configs() -> list[dict]:
    const = lambda names: {n: "constexpr" for n in names}  # noqa: E731
    tile_c = ("PLANES", "CH", "BLOCK_A", "BLOCK_B")
    writer_c = ("PLANES", "CH", "PART_T", "BLOCK_A", "BLOCK_B")  # the kernels that write partials
    cfgs = [
        dict(kernel=bn_stats_finalize_kernel, name=f"batch_norm_stats_finalize_running{int(r)}_t{int(t)}",
             signature={"part_ptr": "*fp32", "mean_ptr": "*fp32", "invstd_ptr": "*fp32", "rm_ptr": "*fp32",
                        "rv_ptr": "*fp32", **_TILE_SIG, "n_chunks": "i32", "mom_hi": "fp32", "mom_lo": "fp32",
                        "eps_hi": "fp32", "eps_lo": "fp32",
                        **const(("HAS_RUNNING", "BLOCK", "BLOCK_K", "PART_T"))},
             constexprs={"HAS_RUNNING": r, "BLOCK": GPU.FINAL_BLOCK_T if t else GPU.FINAL_BLOCK,
                         "BLOCK_K": GPU.FINAL_BLOCK_K, "PART_T": t},
             num_warps=GPU.NUM_WARPS)
        for r in (False, True) for t in (False, True)
    ] + [
        dict(kernel=bn_bwd_finalize_kernel, name=f"batch_norm_bwd_finalize_training{int(t)}_t{int(pt)}",
             signature={"part_ptr": "*fp32", "dt_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32",
                        "invstd_ptr": "*fp32", "ddt_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32",
                        "coef_ptr": "*fp32", "total": "i64", "C": "i32", "n_chunks": "i32",
                        **const(("TRAINING", "HAS_W", "HAS_B", "BLOCK", "BLOCK_K", "PART_T"))},
             constexprs={"TRAINING": t, "HAS_W": True, "HAS_B": True,
                         "BLOCK": GPU.FINAL_BLOCK_T if pt else GPU.FINAL_BLOCK, "BLOCK_K": GPU.FINAL_BLOCK_K,
                         "PART_T": pt}, num_warps=GPU.NUM_WARPS)
        for t in (False, True) for pt in (False, True)
    ]
    for dtype in ("fp32", "fp16", "bf16"):
        for lname, planes, block_b, ch in _LAYOUTS:
            if lname == "planes_short" and dtype != "fp32" or lname == "planes_narrow" and dtype != "bf16":
                continue
            tiles = _tiles(planes, block_b, ch)
            part_t = {"PART_T": not planes}  # transposed partials: rows (channels-last C = 2048 has 784 chunks)
            cfgs.append(dict(
                kernel=bn_stats_kernel, name=f"batch_norm_stats_{dtype}_{lname}",
                signature={"x_ptr": f"*{dtype}", "part_ptr": "*fp32", **_TILE_SIG, "n_chunks": "i32",
                           **const(writer_c)},
                constexprs={**tiles, **part_t}, num_warps=GPU.NUM_WARPS))
            cfgs.append(dict(
                kernel=bn_bwd_dx_kernel, name=f"batch_norm_bwd_dx_{dtype}_{lname}",
                signature={"g_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "dt_ptr": "*fp32", "w_ptr": "*fp32",
                           "mean_ptr": "*fp32", "invstd_ptr": "*fp32", "coef_ptr": "*fp32", "dx_ptr": f"*{dtype}",
                           **_TILE_SIG, **const(("HAS_W",) + tile_c)},
                constexprs={"HAS_W": True, **tiles}, num_warps=GPU.NUM_WARPS))
            for relu, training in ((True, True), (False, False)):
                tag = f"{dtype}_{lname}_relu{int(relu)}_{'train' if training else 'eval'}"
                cfgs.append(dict(
                    kernel=bn_apply_kernel, name=f"batch_norm_apply_{tag}",
                    signature={"y_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "dt_ptr": "*fp32",
                               "w_ptr": "*fp32", "b_ptr": "*fp32", "mean_ptr": "*fp32", "var_ptr": "*fp32",
                               "save_mean_ptr": "*fp32", "save_invstd_ptr": "*fp32", **_TILE_SIG,
                               "eps_hi": "fp32", "eps_lo": "fp32",
                               **const(("EVAL", "HAS_W", "HAS_B", "RELU") + tile_c)},
                    constexprs={"EVAL": not training, "HAS_W": True, "HAS_B": True, "RELU": relu, **tiles},
                    num_warps=GPU.NUM_WARPS))
                cfgs.append(dict(
                    kernel=bn_bwd_reduce_kernel, name=f"batch_norm_bwd_reduce_{tag}",
                    signature={"g_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "dt_ptr": "*fp32",
                               "w_ptr": "*fp32", "mean_ptr": "*fp32", "invstd_ptr": "*fp32", "dy_ptr": f"*{dtype}",
                               "dx_ptr": f"*{dtype}", "part_ptr": "*fp32", **_TILE_SIG, "n_chunks": "i32",
                               **const(("RELU", "EVAL", "HAS_W") + writer_c)},
                    constexprs={"RELU": relu, "EVAL": not training, "HAS_W": True, **tiles, **part_t},
                    num_warps=GPU.REDUCE_WARPS))
    return cfgs


AOT_CONFIGS = _aot_configs()
