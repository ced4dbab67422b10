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
`sum_chunks_kernel` launch (residual_update, scale_concat, ode_combine).
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
    sum_chunks_kernel[merge_grid(C, BLOCK_C)](partial, out, chunks, C, BLOCK_K=BLOCK_K, BLOCK_C=BLOCK_C, num_warps=WARPS)


AOT_CONFIGS = [dict(kernel=sum_chunks_kernel, name="sum_chunks_fp32",
                    signature={"partial_ptr": "*fp32", "out_ptr": "*fp32", "chunks": "i64", "C": "i64",
                               "BLOCK_K": "constexpr", "BLOCK_C": "constexpr"},
                    constexprs={"BLOCK_K": GPU_BLOCK_K, "BLOCK_C": GPU_BLOCK_C}, num_warps=WARPS)]
