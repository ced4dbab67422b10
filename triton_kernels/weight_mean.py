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
(data pointer, C_out, C_in, K, strides, offset) rows, one row per weight, so each weight is read
exactly once (docs/ops.md) and channels-last weights need no copy. A weight is seen as
(C_out, C_in, K) with strides (so, si, sk); that holds whenever its kernel dims collapse into one,
which contiguous and channels-last weights both do; any other layout is made contiguous first.
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

# Columns of the per-weight table (int64: the first one is a data pointer).
T_PTR, T_COUT, T_CIN, T_K, T_SO, T_SI, T_SK, T_OFF = (tl.constexpr(i) for i in range(8))
NTAB = tl.constexpr(8)


@triton.jit
def weight_mean_fwd_kernel(tab_ptr, out_ptr, W_DTYPE: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr):
    """Program (t, w): outputs t*BLOCK_J.. of weight w, flattened (o, a); loops over C_in in BLOCK_I steps.
    Tiles go on grid axis 0 (up to 2^31 - 1), weights on axis 1 (up to 65535)."""
    t = tl.program_id(0).to(tl.int64)
    w = tl.program_id(1)
    row = tab_ptr + w * NTAB
    src = tl.load(row + T_PTR).to(tl.pointer_type(W_DTYPE))
    c_out = tl.load(row + T_COUT)
    c_in = tl.load(row + T_CIN)
    k = tl.load(row + T_K)
    so = tl.load(row + T_SO)
    si = tl.load(row + T_SI)
    sk = tl.load(row + T_SK)
    dst = out_ptr + tl.load(row + T_OFF)
    n_out = c_out * k
    # The grid is sized for the largest weight: tiles past this weight's end run no C_in loop.
    n_in = tl.where(t * BLOCK_J < n_out, c_in, 0)
    j = t * BLOCK_J + tl.arange(0, BLOCK_J)
    jm = j < n_out
    base = (j // k) * so + (j % k) * sk
    acc = tl.zeros([BLOCK_J, BLOCK_I], dtype=out_ptr.dtype.element_ty)
    for i0 in range(0, n_in, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        x = tl.load(src + base[:, None] + i[None, :] * si, mask=jm[:, None] & (i < c_in)[None, :], other=0.0)
        acc += x.to(out_ptr.dtype.element_ty)
    total = tl.sum(acc, axis=1)
    tl.store(dst + j, total / c_in.to(out_ptr.dtype.element_ty), mask=jm)


@triton.jit
def weight_mean_bwd_kernel(tab_ptr, grad_ptr, out_ptr, BLOCK: tl.constexpr):
    """Program w: dw̄ / C_in of weight w, packed like w̄ (the autograd formula expands it over C_in)."""
    w = tl.program_id(0)
    row = tab_ptr + w * NTAB
    off = tl.load(row + T_OFF)
    n = tl.load(row + T_COUT) * tl.load(row + T_K)
    c_in = tl.load(row + T_CIN).to(grad_ptr.dtype.element_ty)
    for start in range(0, n, BLOCK):
        e = off + start + tl.arange(0, BLOCK)
        m = e < off + n
        tl.store(out_ptr + e, tl.load(grad_ptr + e, mask=m, other=0.0) / c_in, mask=m)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
# Forward: a BLOCK_J outputs x BLOCK_I input-channels tile per C_in step; backward: BLOCK elements
# of dW per program. The GPU sizes compile spill-free for sm_80/sm_90 (aot.py); the launchers and
# launch_plan read them at call time, also under the interpreter (the test weights still run several
# and partial tiles: C_out * K and C_in are rarely multiples of 32).
FWD_BLOCK_J, FWD_BLOCK_I, BWD_BLOCK, NUM_WARPS = 32, 32, 1024, 4

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


_TABLES = DeviceTableCache()
MAX_WEIGHTS = 65535  # grid axis 1


def _table(tensors, offsets) -> torch.Tensor:
    """The int64 (n, NTAB) device table of `tensors` (each collapsible, see _view3) at output offsets
    `offsets`: built once per distinct content and reused (no copy, no sync) while the pointers stay
    the same (the forward's weights always do); see _launch.DeviceTableCache for CUDA graphs."""
    rows = [[t.data_ptr(), *_view3(t), off] for t, off in zip(tensors, offsets)]
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
    """(output tiles of the largest weight, weights)."""
    return triton.cdiv(max(w.shape[0] * math.prod(w.shape[2:]) for w in weights), FWD_BLOCK_J), len(weights)


def launch_plan(weights, sms: int = 132) -> list[dict]:
    """Launches of the forward and the backward for these weights (meta tensors are fine), from the
    launchers' fwd_grid and _offsets. The forward's lanes run along C_in (BLOCK_I per row of the
    tile) at stride si: contiguous only where si == 1 (1x1 convolutions)."""
    _check("weight_mean launch_plan", weights)
    block_j, block_i, bwd_block, warps = FWD_BLOCK_J, FWD_BLOCK_I, BWD_BLOCK, NUM_WARPS
    _, total = _offsets(weights)
    if total == 0:
        return []
    elem, acc = weights[0].element_size(), (8 if weights[0].dtype == torch.float64 else 4)
    views = [_view3(w) or _view3(w.contiguous()) for w in weights]
    request = min(_launch.request_bytes(min(v[1], block_i) if v[4] == 1 else 1, elem) for v in views)
    read = sum(w.numel() for w in weights) * elem
    return [
        _launch.launch("weight_mean_fwd_kernel", "forward", fwd_grid(weights), warps,
                       bytes=read + total * acc + len(weights) * 64, chain=1 + (block_i.bit_length() - 1),
                       request_bytes=request, smem=_launch.reduce_smem(block_j, warps, acc)),
        _launch.launch("weight_mean_bwd_kernel", "backward", (len(weights),), warps,
                       bytes=2 * total * acc + len(weights) * 64, chain=1,
                       request_bytes=_launch.request_bytes(bwd_block, acc), smem=0),
    ]


@triton_forward("weight_mean")
def weight_mean_triton(weights: List[torch.Tensor]) -> torch.Tensor:
    _check("tsc::weight_mean_triton", weights)
    ws = [w if _view3(w) is not None else w.contiguous() for w in weights]
    off, total = _offsets(ws)
    out = torch.empty(total, dtype=accumulation_dtype(ws[0].dtype), device=ws[0].device)
    if total:
        # A weight with C_in = 0 runs no C_in step and stores 0/0 = NaN, the mean of nothing, as
        # the reference does; it is never dereferenced.
        weight_mean_fwd_kernel[fwd_grid(ws)](_table(ws, off), out, W_DTYPE=_TL_DTYPES[ws[0].dtype],
                                             BLOCK_J=FWD_BLOCK_J, BLOCK_I=FWD_BLOCK_I, num_warps=NUM_WARPS)
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
        # the table is read for offsets, C_out, C_in and K only (no weight data)
        ws = [w if _view3(w) is not None else w.contiguous() for w in weights]
        weight_mean_bwd_kernel[(len(ws),)](_table(ws, off), grad, out, BLOCK=BWD_BLOCK, num_warps=NUM_WARPS)
    return out


# Ahead-of-time compile configurations (triton_kernels/aot.py): the weight dtypes of training
# (fp32, and fp16/bf16 weights), with the launcher's tile sizes; fp64 exists for gradcheck only.
# Shapes and strides are runtime values from the table: one binary per dtype serves every network.
AOT_CONFIGS = [
    dict(kernel=weight_mean_fwd_kernel, name=f"weight_mean_fwd_{name}",
         signature={"tab_ptr": "*i64", "out_ptr": "*fp32", "W_DTYPE": "constexpr", "BLOCK_J": "constexpr",
                    "BLOCK_I": "constexpr"},
         constexprs={"W_DTYPE": dtype, "BLOCK_J": FWD_BLOCK_J, "BLOCK_I": FWD_BLOCK_I}, num_warps=NUM_WARPS)
    for name, dtype in (("fp32", tl.float32), ("fp16", tl.float16), ("bf16", tl.bfloat16))
] + [dict(kernel=weight_mean_bwd_kernel, name="weight_mean_bwd_fp32",
          signature={"tab_ptr": "*i64", "grad_ptr": "*fp32", "out_ptr": "*fp32", "BLOCK": "constexpr"},
          constexprs={"BLOCK": BWD_BLOCK}, num_warps=NUM_WARPS)]
