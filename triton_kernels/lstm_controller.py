"""Triton kernels of the batched TSC_LSTM controller (docs/tsc.md, docs/ops.md): every stage of a network in one
launch forward and one launch backward, one program per stage.

Ops (the schemas of tsc::lstm_controller / tsc::lstm_controller_backward, csrc/ops.cpp and
tsc_kernels/ops/lstm_controller.py, whose declaration gives the fakes and autograd here):
  tsc::lstm_controller_triton(Tensor wbar_packed, int[] blocks, Tensor[] params) -> (Tensor, Tensor)
  tsc::lstm_controller_backward_triton(Tensor grad, Tensor dt_packed, Tensor wbar_packed, int[] blocks,
                                       Tensor[] params, Tensor saved) -> (Tensor, Tensor[])

Layouts (those of the C++/CUDA ops, so `saved` means the same on every backend):
  wbar_packed  1-D, stage s's (L_s, D_s) rows back to back; dt_packed the same with C_s.
  params       8 per stage: fc_in.weight (H, D), fc_in.bias (H), weight_ih (4H, H), weight_hh (4H, H),
               bias_ih (4H), bias_hh (4H), fc_out.weight (C, H), fc_out.bias (C). The kernels read
               them (and write their gradients) in place through data pointers in the stage table:
               no packing copy in either direction.
  saved        1-D, per stage 7*L*H values: x (L,H) = relu(fc_in), activated gates (L,4H) in the
               order i, f, g, o, cell states c (L,H), hidden states h (L,H).
  table        int64 (S, NMETA): L, D, H, C, offsets into wbar/dt/saved/workspace, 8 parameter
               pointers, 8 gradient pointers.

Why one program per stage: the recurrence over blocks is sequential and the whole controller is a
few MFLOP, so the cost on a GPU is launches, not arithmetic. Inside a program every matrix product
is tiled (BLOCK_R rows x BLOCK_K columns per step, loops over the rest), so the register footprint
does not grow with H (4..256), D (up to 9216) or C (up to 2048). Vectors that the next phase needs
in a different distribution over threads (x, gates, c, h, and the backward deltas) go through
global memory (`saved`, `ws`) with a CTA barrier between the phases: a register tensor cannot be
re-sliced by a runtime index in Triton. Every buffer a phase writes is distinct from the ones it
reads (no in-place read-modify-write), so replicated lanes of a tile can never read a value another
lane already overwrote.

Precision: the kernels compute in the element type of the buffers: fp32 (the controller always
runs in fp32, issue 3), fp64 only for gradcheck under the interpreter.
"""
from __future__ import annotations

import os
from typing import List, Tuple

import torch
import triton
import triton.language as tl

from tsc_kernels.ops import lstm_controller as _declaration  # noqa: F401  (declares the op first)
from tsc_kernels.ops.registry import triton_backward, triton_forward
from tsc_kernels._triton._launch import DeviceTableCache

# Columns of the per-stage int64 table (constexpr: jit code may only read constexpr globals):
# sizes, offsets into the packed buffers, then the data pointers of the 8 parameters and of their
# 8 gradient buffers (0 in the forward table).
M_L, M_D, M_H, M_C, M_WBAR, M_DT, M_SAVED, M_WS = (tl.constexpr(i) for i in range(8))
M_PARAM = tl.constexpr(8)
M_GRAD = tl.constexpr(16)
NMETA = tl.constexpr(24)


def saved_numel(blocks: int, h: int) -> int:
    """x (L,H), gates (L,4H), c (L,H), h (L,H)."""
    return 7 * blocks * h


def ws_numel(blocks: int, h: int, c: int) -> int:
    """Backward scratch: dz (L,C), dh (L,H), dgates (L,4H), dh_rec (L,H), dc_carry (L,H), dx (L,H)."""
    return blocks * (c + 8 * h)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1: one exp, no overflow for large |x| (exp -> inf gives -1 / +1).
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _ptr(row, col, like_ptr):
    """Column `col` of a table row, an address, as a pointer of like_ptr's element type."""
    return tl.load(row + col).to(tl.pointer_type(like_ptr.dtype.element_ty))


@triton.jit
def _param_ptrs(row, col0, like_ptr):
    """The 8 parameter (or gradient) pointers of a stage, in the order of the module docstring."""
    return (_ptr(row, col0 + 0, like_ptr), _ptr(row, col0 + 1, like_ptr), _ptr(row, col0 + 2, like_ptr),
            _ptr(row, col0 + 3, like_ptr), _ptr(row, col0 + 4, like_ptr), _ptr(row, col0 + 5, like_ptr),
            _ptr(row, col0 + 6, like_ptr), _ptr(row, col0 + 7, like_ptr))


@triton.jit
def _dim(row, col):
    # Sizes and offsets fit int32 (the largest buffer, ResNet-18's fc_in, has 1.2 M values):
    # int32 index arithmetic keeps the tile addresses cheaper than int64.
    return tl.load(row + col).to(tl.int32)


@triton.jit
def _mv(w_ptr, x_ptr, x_on, n_rows, n_cols, r0, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """(W @ x)[r0:r0+BLOCK_R] for a row-major W (n_rows, n_cols); x is treated as 0 unless x_on."""
    rows = r0 + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=w_ptr.dtype.element_ty)
    for k0 in range(0, n_cols, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < n_cols
        w = tl.load(w_ptr + rows[:, None] * n_cols + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        x = tl.load(x_ptr + cols, mask=cmask & x_on, other=0.0)
        acc += w * x[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _mv2(wa_ptr, xa_ptr, wb_ptr, xb_ptr, xb_on, n_rows, n_cols, r0, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """(Wa @ xa + Wb @ xb)[r0:r0+BLOCK_R], both W (n_rows, n_cols): the LSTM gates in one sweep."""
    rows = r0 + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=wa_ptr.dtype.element_ty)
    for k0 in range(0, n_cols, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < n_cols
        offs = rows[:, None] * n_cols + cols[None, :]
        m2 = rmask[:, None] & cmask[None, :]
        xa = tl.load(xa_ptr + cols, mask=cmask, other=0.0)
        acc += tl.load(wa_ptr + offs, mask=m2, other=0.0) * xa[None, :]
        # h_{d-1} = 0 at d = 0: skip the W_hh read entirely then (scalar branch, no divergence).
        if xb_on:
            xb = tl.load(xb_ptr + cols, mask=cmask, other=0.0)
            acc += tl.load(wb_ptr + offs, mask=m2, other=0.0) * xb[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _mvt(w_ptr, v_ptr, n_rows, n_cols, k0, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """(W^T @ v)[k0:k0+BLOCK_K] for a row-major W (n_rows, n_cols)."""
    cols = k0 + tl.arange(0, BLOCK_K)
    cmask = cols < n_cols
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=w_ptr.dtype.element_ty)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        w = tl.load(w_ptr + rows[:, None] * n_cols + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        v = tl.load(v_ptr + rows, mask=rmask, other=0.0)
        acc += w * v[:, None]
    return tl.sum(acc, axis=0)


@triton.jit
def _outer_sum(a_ptr, b_ptr, n_d, n_rows, n_cols, r0, k0, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_d a[d, r0:+BLOCK_R] (x) b[d, k0:+BLOCK_K]: a weight gradient tile (a (n_d, n_rows), b (n_d, n_cols))."""
    rows = r0 + tl.arange(0, BLOCK_R)
    cols = k0 + tl.arange(0, BLOCK_K)
    rmask = rows < n_rows
    cmask = cols < n_cols
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=a_ptr.dtype.element_ty)
    for d in range(0, n_d):
        a = tl.load(a_ptr + d * n_rows + rows, mask=rmask, other=0.0)
        b = tl.load(b_ptr + d * n_cols + cols, mask=cmask, other=0.0)
        acc += a[:, None] * b[None, :]
    return acc


@triton.jit
def _store_outer(out_ptr, acc, n_rows, n_cols, r0, k0, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = r0 + tl.arange(0, BLOCK_R)
    cols = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], acc,
             mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :])


@triton.jit
def _weight_grad(out_ptr, a_ptr, b_ptr, n_d, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (n_rows, n_cols) = sum_d a_d (x) b_d, tile by tile."""
    for r0 in range(0, n_rows, BLOCK_R):
        for k0 in range(0, n_cols, BLOCK_K):
            acc = _outer_sum(a_ptr, b_ptr, n_d, n_rows, n_cols, r0, k0, BLOCK_R, BLOCK_K)
            _store_outer(out_ptr, acc, n_rows, n_cols, r0, k0, BLOCK_R, BLOCK_K)


@triton.jit
def _bias_grad(out_ptr, a_ptr, n_d, n, BLOCK: tl.constexpr):
    """out (n,) = sum_d a[d, :]."""
    for r0 in range(0, n, BLOCK):
        idx = r0 + tl.arange(0, BLOCK)
        m = idx < n
        acc = tl.zeros([BLOCK], dtype=a_ptr.dtype.element_ty)
        for d in range(0, n_d):
            acc += tl.load(a_ptr + d * n + idx, mask=m, other=0.0)
        tl.store(out_ptr + idx, acc, mask=m)


@triton.jit
def lstm_controller_fwd_kernel(meta_ptr, wbar_ptr, dt_ptr, saved_ptr,
                               BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    s = tl.program_id(0)
    meta = meta_ptr + s * NMETA
    L = _dim(meta, M_L)
    D = _dim(meta, M_D)
    H = _dim(meta, M_H)
    C = _dim(meta, M_C)
    wbar = wbar_ptr + _dim(meta, M_WBAR)
    dt = dt_ptr + _dim(meta, M_DT)
    w_in, b_in, w_ih, w_hh, b_ih, b_hh, w_out, b_out = _param_ptrs(meta, M_PARAM, wbar_ptr)
    xs = saved_ptr + _dim(meta, M_SAVED)
    gs = xs + L * H
    cs = gs + L * 4 * H
    hs = cs + L * H

    # fc_in + ReLU for every block: x_d = relu(W_in w̄_d + b_in).
    for d in range(0, L):
        for r0 in range(0, H, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            m = rows < H
            x = _mv(w_in, wbar + d * D, True, H, D, r0, BLOCK_R, BLOCK_K) + tl.load(b_in + rows, mask=m, other=0.0)
            tl.store(xs + d * H + rows, tl.where(x < 0.0, 0.0, x), mask=m)
    tl.debug_barrier()

    # LSTMCell recurrence, gate order (i, f, g, o), h_0 = c_0 = 0.
    for d in range(0, L):
        for r0 in range(0, 4 * H, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            m = rows < 4 * H
            z = _mv2(w_ih, xs + d * H, w_hh, hs + (d - 1) * H, d > 0, 4 * H, H, r0, BLOCK_R, BLOCK_K)
            z += tl.load(b_ih + rows, mask=m, other=0.0) + tl.load(b_hh + rows, mask=m, other=0.0)
            is_g = (rows >= 2 * H) & (rows < 3 * H)
            tl.store(gs + d * 4 * H + rows, tl.where(is_g, _tanh(z), _sigmoid(z)), mask=m)
        tl.debug_barrier()
        for j0 in range(0, H, BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            m = j < H
            g_row = gs + d * 4 * H + j
            gi = tl.load(g_row, mask=m, other=0.0)
            gf = tl.load(g_row + H, mask=m, other=0.0)
            gg = tl.load(g_row + 2 * H, mask=m, other=0.0)
            go = tl.load(g_row + 3 * H, mask=m, other=0.0)
            c_prev = tl.load(cs + (d - 1) * H + j, mask=m & (d > 0), other=0.0)
            c = gf * c_prev + gi * gg
            tl.store(cs + d * H + j, c, mask=m)
            tl.store(hs + d * H + j, go * _tanh(c), mask=m)
        tl.debug_barrier()

    # fc_out + sigmoid for every block.
    for d in range(0, L):
        for r0 in range(0, C, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            m = rows < C
            z = _mv(w_out, hs + d * H, True, C, H, r0, BLOCK_R, BLOCK_K) + tl.load(b_out + rows, mask=m, other=0.0)
            tl.store(dt + d * C + rows, _sigmoid(z), mask=m)


@triton.jit
def lstm_controller_bwd_kernel(meta_ptr, wbar_ptr, dt_ptr, grad_ptr, saved_ptr, dwbar_ptr, ws_ptr,
                               BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    s = tl.program_id(0)
    meta = meta_ptr + s * NMETA
    L = _dim(meta, M_L)
    D = _dim(meta, M_D)
    H = _dim(meta, M_H)
    C = _dim(meta, M_C)
    wbar = wbar_ptr + _dim(meta, M_WBAR)
    dwbar = dwbar_ptr + _dim(meta, M_WBAR)
    dt = dt_ptr + _dim(meta, M_DT)
    gdt = grad_ptr + _dim(meta, M_DT)
    w_in, b_in, w_ih, w_hh, b_ih, b_hh, w_out, b_out = _param_ptrs(meta, M_PARAM, wbar_ptr)
    dw_in, db_in, dw_ih, dw_hh, db_ih, db_hh, dw_out, db_out = _param_ptrs(meta, M_GRAD, wbar_ptr)
    xs = saved_ptr + _dim(meta, M_SAVED)
    gs = xs + L * H
    cs = gs + L * 4 * H
    hs = cs + L * H
    dz = ws_ptr + _dim(meta, M_WS)      # d(fc_out pre-activation)      (L, C)
    dh = dz + L * C                     # dL/dh_d through fc_out          (L, H)
    dg = dh + L * H                     # d(gate pre-activations)         (L, 4H)
    dhr = dg + L * 4 * H                # W_hh^T dg_d: dL/dh_{d-1} via d  (L, H)
    dcc = dhr + L * H                   # dc_d * f_d: dL/dc_{d-1} via d   (L, H)
    dx = dcc + L * H                    # d(fc_in pre-activation)         (L, H)

    # sigmoid': dz = g * dt * (1 - dt).
    for i0 in range(0, L * C, BLOCK_K):
        i = i0 + tl.arange(0, BLOCK_K)
        m = i < L * C
        y = tl.load(dt + i, mask=m, other=0.0)
        tl.store(dz + i, tl.load(gdt + i, mask=m, other=0.0) * y * (1.0 - y), mask=m)
    tl.debug_barrier()

    # fc_out: its weight/bias gradients and dh_d = W_out^T dz_d.
    _weight_grad(dw_out, dz, hs, L, C, H, BLOCK_R, BLOCK_K)
    _bias_grad(db_out, dz, L, C, BLOCK_K)
    for d in range(0, L):
        for k0 in range(0, H, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            tl.store(dh + d * H + cols, _mvt(w_out, dz + d * C, C, H, k0, BLOCK_R, BLOCK_K), mask=cols < H)
    tl.debug_barrier()

    # BPTT over the blocks, last to first.
    for t in range(0, L):
        d = L - 1 - t
        has_next = d < L - 1
        for j0 in range(0, H, BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            m = j < H
            g_row = gs + d * 4 * H + j
            gi = tl.load(g_row, mask=m, other=0.0)
            gf = tl.load(g_row + H, mask=m, other=0.0)
            gg = tl.load(g_row + 2 * H, mask=m, other=0.0)
            go = tl.load(g_row + 3 * H, mask=m, other=0.0)
            c = tl.load(cs + d * H + j, mask=m, other=0.0)
            c_prev = tl.load(cs + (d - 1) * H + j, mask=m & (d > 0), other=0.0)
            h_grad = tl.load(dh + d * H + j, mask=m, other=0.0) + tl.load(dhr + (d + 1) * H + j, mask=m & has_next, other=0.0)
            tc = _tanh(c)
            c_grad = h_grad * go * (1.0 - tc * tc) + tl.load(dcc + (d + 1) * H + j, mask=m & has_next, other=0.0)
            dg_row = dg + d * 4 * H + j
            tl.store(dg_row, c_grad * gg * gi * (1.0 - gi), mask=m)
            tl.store(dg_row + H, c_grad * c_prev * gf * (1.0 - gf), mask=m)
            tl.store(dg_row + 2 * H, c_grad * gi * (1.0 - gg * gg), mask=m)
            tl.store(dg_row + 3 * H, h_grad * tc * go * (1.0 - go), mask=m)
            tl.store(dcc + d * H + j, c_grad * gf, mask=m)
        tl.debug_barrier()
        if d > 0:
            for k0 in range(0, H, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                tl.store(dhr + d * H + cols, _mvt(w_hh, dg + d * 4 * H, 4 * H, H, k0, BLOCK_R, BLOCK_K), mask=cols < H)
        tl.debug_barrier()

    # LSTMCell weights: dW_ih = sum_d dg_d x_d^T, dW_hh = sum_{d>=1} dg_d h_{d-1}^T, db_ih = db_hh = sum_d dg_d;
    # then dx_d = (W_ih^T dg_d) masked by the ReLU of fc_in.
    _weight_grad(dw_ih, dg, xs, L, 4 * H, H, BLOCK_R, BLOCK_K)
    _weight_grad(dw_hh, dg + 4 * H, hs, L - 1, 4 * H, H, BLOCK_R, BLOCK_K)
    _bias_grad(db_ih, dg, L, 4 * H, BLOCK_K)
    _bias_grad(db_hh, dg, L, 4 * H, BLOCK_K)
    for d in range(0, L):
        for k0 in range(0, H, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            m = cols < H
            x = tl.load(xs + d * H + cols, mask=m, other=0.0)
            v = _mvt(w_ih, dg + d * 4 * H, 4 * H, H, k0, BLOCK_R, BLOCK_K)
            tl.store(dx + d * H + cols, tl.where(x <= 0.0, 0.0, v), mask=m)
    tl.debug_barrier()

    # fc_in: dW_in = sum_d dx_d w̄_d^T, db_in = sum_d dx_d, dw̄_d = W_in^T dx_d.
    _weight_grad(dw_in, dx, wbar, L, H, D, BLOCK_R, BLOCK_K)
    _bias_grad(db_in, dx, L, H, BLOCK_K)
    for d in range(0, L):
        for k0 in range(0, D, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            tl.store(dwbar + d * D + cols, _mvt(w_in, dx + d * H, H, D, k0, BLOCK_R, BLOCK_K), mask=cols < D)




# ---------------------------------------------------------------------------------------------
# Launchers and torch.library glue
# ---------------------------------------------------------------------------------------------
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Tile sizes. On a GPU, 32 x 64 fp32 tiles over 8 warps (8 values per thread per tile) keep both
# kernels spill-free on sm_80 and sm_90; with 4 warps the backward spills on sm_80 (see aot.py).
# Under the interpreter the cost is per Python-level tile step, and tests use small odd shapes:
# 16 x 16 still makes every loop run several (partial) tiles there.
BLOCK_R, BLOCK_K, NUM_WARPS = (16, 16, 1) if _INTERPRET else (32, 64, 8)
_PER_STAGE = 8
_TABLES = DeviceTableCache()


def _dims(op: str, wbar: torch.Tensor, blocks: List[int], params: List[torch.Tensor]) -> list[tuple[int, int, int, int]]:
    """(L, D, H, C) per stage after checking the packed arguments against each other (as the C++ op does)."""
    if len(params) != _PER_STAGE * len(blocks):
        raise ValueError(f"{op}: params must hold 8 tensors per stage ({_PER_STAGE * len(blocks)} for {len(blocks)} stages), got {len(params)}")
    if wbar.dim() != 1 or wbar.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: wbar_packed must be a 1-D float32/float64 tensor, got {wbar.dtype} {tuple(wbar.shape)}")
    dims, total = [], 0
    for s, L in enumerate(blocks):
        p = params[_PER_STAGE * s: _PER_STAGE * (s + 1)]
        if any(t.dtype != wbar.dtype or t.device != wbar.device for t in p):
            raise ValueError(f"{op}: stage {s}: every parameter must have wbar_packed's dtype {wbar.dtype} and device {wbar.device}")
        if p[0].dim() != 2 or p[6].dim() != 2:
            raise ValueError(f"{op}: stage {s}: fc_in.weight and fc_out.weight must be 2-D")
        H, D, C = p[0].shape[0], p[0].shape[1], p[6].shape[0]
        want = [(H,), (4 * H, H), (4 * H, H), (4 * H,), (4 * H,), (C, H), (C,)]
        for k, shape in enumerate(want, start=1):
            if tuple(p[k].shape) != shape:
                raise ValueError(f"{op}: stage {s}: params[{_PER_STAGE * s + k}] must have shape {shape}, got {tuple(p[k].shape)}")
        if L < 0:
            raise ValueError(f"{op}: blocks[{s}] must be >= 0, got {L}")
        dims.append((int(L), int(D), int(H), int(C)))
        total += L * D
    if wbar.numel() != total:
        raise ValueError(f"{op}: wbar_packed must hold sum(L_s * D_s) = {total} values, got {wbar.numel()}")
    return dims


def _table(dims, params, grads) -> tuple[torch.Tensor, list[int]]:
    """The (S, NMETA) int64 stage table and the packed lengths (wbar, dt, saved, ws)."""
    rows, off = [], [0, 0, 0, 0]
    for s, (L, D, H, C) in enumerate(dims):
        p = params[_PER_STAGE * s: _PER_STAGE * (s + 1)]
        g = grads[_PER_STAGE * s: _PER_STAGE * (s + 1)] if grads else [None] * _PER_STAGE
        rows.append([L, D, H, C, off[0], off[1], off[2], off[3]]
                    + [t.data_ptr() for t in p] + [0 if t is None else t.data_ptr() for t in g])
        off[0] += L * D
        off[1] += L * C
        off[2] += saved_numel(L, H)
        off[3] += ws_numel(L, H, C)
    device = params[0].device if params else torch.device("cpu")
    # Cached per content (sizes and pointers): no pageable copy or sync per step; the forward's
    # table (parameter pointers only) is built once per model (_launch.DeviceTableCache).
    return _TABLES.get(rows, NMETA.value, device), off


# The declared schemas (tsc_kernels/ops/lstm_controller.py): `int[]` where custom_op would infer
# `SymInt[]` from the type hints.
@triton_forward("lstm_controller")
def lstm_controller_triton(wbar_packed: torch.Tensor, blocks: List[int], params: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    dims = _dims("tsc::lstm_controller_triton", wbar_packed, blocks, params)
    wbar = wbar_packed.contiguous()
    params = [p.contiguous() for p in params]
    table, (_, n_dt, n_saved, _) = _table(dims, params, None)
    dt = wbar.new_empty(n_dt)
    saved = wbar.new_empty(n_saved)
    if dims:
        lstm_controller_fwd_kernel[(len(dims),)](table, wbar, dt, saved, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    return dt, saved


@triton_backward("lstm_controller")
def lstm_controller_backward_triton(grad: torch.Tensor, dt_packed: torch.Tensor, wbar_packed: torch.Tensor, blocks: List[int],
                                    params: List[torch.Tensor], saved: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    op = "tsc::lstm_controller_backward_triton"
    dims = _dims(op, wbar_packed, blocks, params)
    n_dt = sum(L * C for L, _, _, C in dims)
    n_saved = sum(saved_numel(L, H) for L, _, H, _ in dims)
    for name, t, n in (("grad", grad, n_dt), ("dt_packed", dt_packed, n_dt), ("saved", saved, n_saved)):
        if t.dim() != 1 or t.numel() != n or t.dtype != wbar_packed.dtype:
            raise ValueError(f"{op}: {name} must be 1-D {wbar_packed.dtype} with {n} values, got {t.dtype} {tuple(t.shape)}")
    wbar, grad, dt, saved = wbar_packed.contiguous(), grad.contiguous(), dt_packed.contiguous(), saved.contiguous()
    params = [p.contiguous() for p in params]
    # Every gradient is written whole by the kernel (a stage with L = 0 gets zeros), so empty_like suffices.
    dparams = [torch.empty_like(p) for p in params]
    table, (_, _, _, n_ws) = _table(dims, params, dparams)
    dwbar = torch.empty_like(wbar)
    ws = wbar.new_empty(n_ws)
    if dims:
        lstm_controller_bwd_kernel[(len(dims),)](table, wbar, dt, grad, saved, dwbar, ws,
                                                 BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    return dwbar, dparams


# Ahead-of-time compile configurations (triton_kernels/aot.py). L, D, H, C and every offset are
# runtime values read from the stage table (one launch serves stages of different sizes), so one
# binary per kernel covers every network, from CIFAR ResNet-20 (H = 4) to ResNet-50 (H = 256,
# C = 2048) and ResNet-18 (D = 9216): the tile loops, not the registers, grow with the shapes.
AOT_CONFIGS = [
    dict(kernel=lstm_controller_fwd_kernel, name="lstm_controller_fwd_fp32",
         signature={"meta_ptr": "*i64", "wbar_ptr": "*fp32", "dt_ptr": "*fp32", "saved_ptr": "*fp32",
                    "BLOCK_R": "constexpr", "BLOCK_K": "constexpr"},
         constexprs={"BLOCK_R": BLOCK_R, "BLOCK_K": BLOCK_K}, num_warps=NUM_WARPS),
    dict(kernel=lstm_controller_bwd_kernel, name="lstm_controller_bwd_fp32",
         signature={"meta_ptr": "*i64", "wbar_ptr": "*fp32", "dt_ptr": "*fp32", "grad_ptr": "*fp32", "saved_ptr": "*fp32",
                    "dwbar_ptr": "*fp32", "ws_ptr": "*fp32", "BLOCK_R": "constexpr", "BLOCK_K": "constexpr"},
         constexprs={"BLOCK_R": BLOCK_R, "BLOCK_K": BLOCK_K}, num_warps=NUM_WARPS),
]
