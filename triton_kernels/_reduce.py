"""Fixed-order merges of per-chunk partial sums, shared by the Triton ops (issue 22, finding 1).

The backward (and BatchNorm statistics) reductions of tsc_kernels split a tensor's rows into chunks
whose count depends on the shape only; every chunk writes one partial per channel into a
(chunks, C) table. The merge of that table used to walk the chunks one after another, one dependent
load and add per chunk (up to 1024 steps) in ``cdiv(C, 128)`` programs. Here a program owns BLOCK_C
channels and loads a (BLOCK_K chunks, BLOCK_C channels) tile at a time: the tiles of one program
are added elementwise in chunk-tile order (cdiv(chunks, BLOCK_K) dependent steps), and the BLOCK_K
rows of the accumulated tile are then summed by ``tl.sum`` along axis 0, a reduction tree of depth
log2(BLOCK_K) whose shape is fixed by the constexpr sizes and the layout. The order of every addition
is a function of (chunks, C, BLOCK_K, BLOCK_C) only: bit-identical results run to run, and the same on
every GPU (the split never depends on the SM count).

`chain_of` gives the launch-plan chain of such a merge; `merge_launch` plans the stand-alone
`sum_chunks_kernel` launch (residual_update, scale_concat, ode_combine). The chunked per-channel
reduction that residual_update's and scale_concat's backward share (its tile sizes, its split into
chunks: `backward_plan`, and its launch plan: `chunk_launches`) lives here too.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import _launch

# GPU tile of the merge: 32 chunks x 64 channels (2048 fp32 values, 16 per thread at 4 warps); a
# warp's row load covers 64 contiguous channels. At most 1024 chunks (every op's cap) need
# 32 + 5 = 37 dependent steps. The launcher and merge_launch read BLOCK_K / BLOCK_C at call time:
# tests set them to 2 x 4 under the interpreter so that a few chunks span several chunk tiles (the
# last one partial) and several channel tiles.
BLOCK_K, BLOCK_C, WARPS = 32, 64, 4
GPU_BLOCK_K, GPU_BLOCK_C = BLOCK_K, BLOCK_C


@triton.jit
def chunk_sum(ptr, stride_k, chunks, offs, cmask, shift, weight_ptr,
              SHIFTED: tl.constexpr, SQUARE: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_K: tl.constexpr):
    """Σ_k t(ptr[k * stride_k + offs]) over k < chunks, in the fixed order of the module docstring.

    offs: the [BLOCK_C] int64 offsets of the columns (cmask their mask); t(v) = v, minus `shift` (a
    [BLOCK_C] vector) when SHIFTED, squared when SQUARE, times weight_ptr[k] when WEIGHTED."""
    rows = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros([BLOCK_K, offs.shape[0]], dtype=ptr.dtype.element_ty)
    for k0 in range(0, chunks, BLOCK_K):
        k = k0 + rows
        km = k < chunks
        m = km[:, None] & cmask[None, :]
        v = tl.load(ptr + k[:, None] * stride_k + offs[None, :], mask=m, other=0.0)
        if SHIFTED:
            v = tl.where(m, v - shift[None, :], 0.0)
        if SQUARE:
            v = v * v
        if WEIGHTED:
            v = v * tl.load(weight_ptr + k, mask=km, other=0.0).to(v.dtype)[:, None]
        acc += v
    return tl.sum(acc, axis=0)


@triton.jit
def sum_chunks_kernel(partial_ptr, out_ptr, chunks, C, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[c] = Σ_k partial[k, c] (a (chunks, C) table), fixed order (chunk_sum)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = cols < C
    total = chunk_sum(partial_ptr, C, chunks, cols, cmask, partial_ptr, partial_ptr,
                      SHIFTED=False, SQUARE=False, WEIGHTED=False, BLOCK_K=BLOCK_K)
    tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=cmask)


def log2(n: int) -> int:
    """Depth of tl.sum's tree over n (a power of two) values."""
    return max(int(n).bit_length() - 1, 0)


def chain_of(chunks: int, block_k: int | None = None) -> int:
    """Dependent steps of one chunk_sum: the chunk tiles in order, then the tree over BLOCK_K rows."""
    block_k = BLOCK_K if block_k is None else block_k
    return triton.cdiv(max(chunks, 1), block_k) + log2(block_k)


def merge_grid(C: int, block_c: int) -> tuple[int]:
    return (triton.cdiv(C, block_c),)


def merge_launch(phase: str, chunks: int, C: int, elem: int = 4) -> dict:
    """The plan of sum_chunks_kernel over a (chunks, C) table of `elem`-byte values."""
    return _launch.launch("sum_chunks_kernel", phase, merge_grid(C, BLOCK_C), WARPS, bytes=(chunks + 1) * C * elem,
                          chain=chain_of(chunks), request_bytes=_launch.request_bytes(min(C, BLOCK_C), elem),
                          smem=_launch.reduce_smem(BLOCK_C, WARPS, elem))


def sum_chunks(partial, out) -> None:
    """out = partial.sum(0) in the fixed order above (partial: a contiguous (chunks, C) table)."""
    chunks, C = partial.shape
    sum_chunks_kernel[merge_grid(C, BLOCK_C)](partial, out, chunks, C, BLOCK_K=BLOCK_K, BLOCK_C=BLOCK_C,
                                              num_warps=WARPS)


# --------------------------------------------------------------------------------------------------
# Chunked per-channel reductions: the backward split of residual_update and scale_concat
# --------------------------------------------------------------------------------------------------
# Both ops reduce grad * f over every axis but the channel one, with the same work split: the
# planes kernels (inner > 1) walk a channel's plane BWD_BLOCK values at a time with BWD_WARPS warps;
# the rows kernels (channels-last, inner == 1) reduce (ROWS_BLOCK_R rows x ROWS_BLOCK_C channels)
# tiles over the rows. Everything here is read at call time (tests shrink MIN_CHUNK_ELEMS and
# ROWS_BLOCK_R under the interpreter to force several chunks on small shapes).
BWD_BLOCK = 1024
# residual_update: with 4 warps its bf16 ReLU variant spills on sm_80 (16 B); 1024 lanes over 256 threads do not
BWD_WARPS = 8
ROWS_BLOCK_R, ROWS_BLOCK_C = 16, 64

# Work split of the backward reductions. A GPU has 108-132 SMs: one program per channel (16-64 for
# CIFAR widths) leaves most of them idle, so the sample (or row) axis is split into chunks as well,
# aiming at TARGET_PROGRAMS programs; the chunk count depends on the shape only, so the partial sums
# and their fixed-order finalisation give bit-identical ddt from run to run. Grid axis 1 is limited
# to 65535 (axis 0 to 2^31 - 1): channels go on axis 0, chunks on axis 1. A chunk holds at least
# MIN_CHUNK_ELEMS values, so small tensors stay one launch (a chunk's partial row is ddt itself).
# 1024 (one BWD_BLOCK) and 16-row tiles: CIFAR's (128, 64, 8, 8) backward, 10 MB, has 512 programs
# (>= 2 per SM, tests/tooling/test_launch_plans.py); with 16384 it had 32 (planes) or 128 (rows). The merge of
# up to TARGET_PROGRAMS chunks stays a short tree (_reduce).
TARGET_PROGRAMS = 1024
MIN_CHUNK_ELEMS = 1024
MAX_GRID_Y = 65535


def planes_grid(N: int, C: int, inner: int) -> tuple[tuple[int, int], int]:
    """((C, chunks), samples per chunk) of a planes kernel (residual_bwd_planes_kernel, scale_concat's)."""
    by_work = max(1, (N * inner) // MIN_CHUNK_ELEMS)
    chunks = max(1, min(N, MAX_GRID_Y, by_work, triton.cdiv(TARGET_PROGRAMS, max(C, 1))))
    per = triton.cdiv(N, chunks)
    return (C, triton.cdiv(N, per)), per


def rows_grid(R: int, C: int) -> tuple[tuple[int, int], int]:
    """((channel tiles, chunks), rows per chunk, a multiple of ROWS_BLOCK_R) of a rows kernel
    (residual_bwd_rows_kernel, scale_concat's)."""
    tiles = triton.cdiv(C, ROWS_BLOCK_C)
    by_work = max(1, (R * min(C, ROWS_BLOCK_C)) // MIN_CHUNK_ELEMS)
    chunks = max(1, min(triton.cdiv(R, ROWS_BLOCK_R), MAX_GRID_Y, by_work, triton.cdiv(TARGET_PROGRAMS, tiles)))
    per = triton.cdiv(triton.cdiv(R, chunks), ROWS_BLOCK_R) * ROWS_BLOCK_R
    return (tiles, triton.cdiv(R, per)), per


def backward_plan(outer: int, C: int, inner: int) -> dict:
    """The backward's split for the launcher and the launch plan: planes (inner > 1: the planes kernel,
    else the rows kernel), grid, per (samples or rows per chunk) and chunks (> 1: the partials are
    merged by _reduce)."""
    planes = inner > 1
    grid, per = planes_grid(outer, C, inner) if planes else rows_grid(outer, C)
    return dict(planes=planes, grid=grid, per=per, chunks=grid[1])


def narrow_backward_plan(outer: int, C: int, inner: int, elem: int) -> dict:
    """backward_plan, but planes shorter than NARROW_BYTES go to a channels kernel (residual_update's
    residual_bwd_channels_kernel): CH adjacent channels per program (channels_per_program), a
    [BLOCK_A samples, BLOCK_B columns] tile of BWD_BLOCK values, grid (channel tiles, sample chunks)."""
    ch = channels_per_program(C, inner, elem, BWD_BLOCK) if inner > 1 else 1
    if ch == 1:
        return dict(backward_plan(outer, C, inner), CH=1)
    block_b = triton.next_power_of_2(ch * inner)
    tiles = triton.cdiv(C, ch)
    by_work = max(1, (outer * ch * inner) // MIN_CHUNK_ELEMS)
    chunks = max(1, min(outer, MAX_GRID_Y, by_work, triton.cdiv(TARGET_PROGRAMS, tiles)))
    per = triton.cdiv(outer, chunks)
    grid = (tiles, triton.cdiv(outer, per))
    return dict(planes=True, grid=grid, per=per, chunks=grid[1], CH=ch, BLOCK_A=BWD_BLOCK // block_b,
                BLOCK_B=block_b)


def chunk_launches(phase: str, kernel: str, p: dict, C: int, inner: int, numel: int, elem: int, acc: int,
                   moved: int, rows_adjacent: bool = True) -> list[dict]:
    """Plan of the chunked reduction `kernel` (residual_update's or scale_concat's, split by backward_plan)
    moving `moved` tensors of numel values, and of the merge of its partials when there are several.
    rows_adjacent: whether the rows kernel's tensors have row stride C (scale_concat's grad has not)."""
    if p.get("CH", 1) > 1:  # narrow planes: a sample's CH adjacent planes are one contiguous run
        warps, chain = BWD_WARPS, 1 + log2(p["BLOCK_A"]) + log2(p["BLOCK_B"])
        request = _launch.request_bytes(p["CH"] * inner, elem)
        smem = _launch.reduce_smem(p["BLOCK_B"], BWD_WARPS, acc)
    elif p["planes"]:  # lanes walk a channel's plane (inner contiguous values) BWD_BLOCK at a time
        warps, chain = BWD_WARPS, 1 + log2(BWD_BLOCK)
        request, smem = _launch.request_bytes(min(inner, BWD_BLOCK), elem), _launch.reduce_smem(1, BWD_WARPS, acc)
    else:  # (ROWS_BLOCK_R, ROWS_BLOCK_C) tiles, rows C values apart, reduced over the rows
        warps, chain = 4, 1 + log2(ROWS_BLOCK_R)
        request = _launch.tile_request_bytes(ROWS_BLOCK_C, min(C, ROWS_BLOCK_C), elem,
                                                  rows_adjacent=rows_adjacent and C <= ROWS_BLOCK_C)
        smem = _launch.reduce_smem(ROWS_BLOCK_C, 4, acc)
    plan = [_launch.launch(kernel, phase, p["grid"], warps, bytes=moved * numel * elem + (p["chunks"] + 1) * C * acc,
                           chain=chain, request_bytes=request, smem=smem)]
    if p["chunks"] > 1:
        plan.append(merge_launch(phase, p["chunks"], C, acc))
    return plan


# --------------------------------------------------------------------------------------------------
# Narrow planes: several adjacent channels per program (issue 22)
# --------------------------------------------------------------------------------------------------
# A plane (the inner values of one channel of one sample) shorter than NARROW_BYTES (7x7 bf16: 98 B,
# 3x3: 36 / 18 B) makes a one-channel program's warp request one short run. The planes of channels
# c, c+1, ... of one sample follow each other in memory, so a program that owns CH adjacent channels
# reads CH * inner contiguous values per sample; channel_sums then splits its column sums by channel,
# each channel's sum still a reduction of fixed shape (deterministic).
NARROW_BYTES = 128
# bound of CH x (tile columns), the [CH, BLOCK_B] select of channel_sums: 16 values per thread at 4 warps
# (BatchNorm's bf16 statistics kernel spilled 12 B on sm_80 with 4096: CH = 8 planes of 49 in 512 columns)
MAX_SEGMENT_TILE = 2048


def channels_per_program(C: int, inner: int, elem: int, max_cols: int) -> int:
    """CH, the power-of-two count of adjacent channels a planes program owns: 1 for planes of at
    least NARROW_BYTES, else doubled until a sample's run of CH planes fills a warp's request
    (_launch.MAX_WARP_REQUEST) or would pass C, max_cols columns or MAX_SEGMENT_TILE."""
    ch = 1
    if inner * elem >= NARROW_BYTES:
        return ch
    while ch * inner * elem < _launch.MAX_WARP_REQUEST and 2 * ch <= C:
        cols = triton.next_power_of_2(2 * ch * inner)
        if cols > max_cols or 2 * ch * cols > MAX_SEGMENT_TILE:
            break
        ch *= 2
    return ch


@triton.jit
def channel_sums(cols, inner, CH: tl.constexpr):
    """[CH] sums of a tile row `cols` whose column b holds channel b // inner (columns past CH * inner
    are zeros): a [CH, columns] select reduced along the columns, a tree of fixed shape."""
    b = tl.arange(0, cols.shape[0])
    sel = (b // inner)[None, :] == tl.arange(0, CH)[:, None]
    return tl.sum(tl.where(sel, cols[None, :], 0.0), axis=1)


@triton.jit
def channel_spread(v, inner, BLOCK_B: tl.constexpr):
    """The [BLOCK_B] row whose column b holds v[b // inner] (0 past the CH channels of v): the
    converse of channel_sums, by the same [CH, columns] select."""
    sel = (tl.arange(0, BLOCK_B) // inner)[None, :] == tl.arange(0, v.shape[0])[:, None]
    return tl.sum(tl.where(sel, v[:, None], 0.0), axis=0)


AOT_CONFIGS = [dict(kernel=sum_chunks_kernel, name="sum_chunks_fp32",
                    signature={"partial_ptr": "*fp32", "out_ptr": "*fp32", "chunks": "i64", "C": "i64",
                               "BLOCK_K": "constexpr", "BLOCK_C": "constexpr"},
                    constexprs={"BLOCK_K": GPU_BLOCK_K, "BLOCK_C": GPU_BLOCK_C}, num_warps=WARPS)]
