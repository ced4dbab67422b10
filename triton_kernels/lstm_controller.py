"""Triton kernels of the batched TSC_LSTM controller (docs/tsc.md, docs/ops.md): every stage of a network in a
few launches per phase (issue 22).

Ops (the schemas of tsc::lstm_controller / tsc::lstm_controller_backward, csrc/lstm_controller_cpu.cpp and
tsc_kernels/ops/lstm_controller.py, whose declaration gives the fakes and autograd here):
  tsc::lstm_controller_triton(Tensor wbar_packed, int[] blocks, Tensor[] params) -> (Tensor, Tensor)
  tsc::lstm_controller_backward_triton(Tensor grad, Tensor dt_packed, Tensor wbar_packed, int[] blocks,
                                       Tensor[] params, Tensor saved) -> (Tensor, Tensor[])

Layouts (those of the C++/CUDA ops, so `saved` means the same on every backend):
  wbar_packed  1-D, stage s's (L_s, D_s) rows back to back; dt_packed the same with C_s.
  params       8 per stage: fc_in.weight (H, D), fc_in.bias (H), weight_ih (4H, H), weight_hh (4H, H),
               bias_ih (4H), bias_hh (4H), fc_out.weight (C, H), fc_out.bias (C), read (and their
               gradients written) in place through data pointers in the tables.
  saved        1-D, per stage 7*L*H values: x (L,H) = relu(fc_in), activated gates (L,4H) in the
               order i, f, g, o, cell states c (L,H), hidden states h (L,H).

Launches (`_plan`, which the launchers and `launch_plan` both run):
  products   lstm_controller_products_kernel: the products that do not depend on the recurrence,
             every block of every stage at once. Each is a job, Y[r, c] = epilogue(sum_k a(r, k) b(k, c)
             + bias[c]), in a table row (buffer ids and offsets, or parameter pointers: the forward's
             table does not change between steps, so DeviceTableCache hands back the same one):
             DOT jobs (k contiguous in both operands: fc_in, the gates' input half x W_ih^T + b_ih + b_hh,
             fc_out) give a program BLOCK_R outputs of one row, k in BLOCK_K chunks; AXPY jobs (b
             contiguous in c: every backward product, the weight gradients as sums over blocks in
             block order) a BLOCK_R x BLOCK_K tile, k in order. Deterministic; no atomics.
  cell       lstm_controller_cell_fwd_kernel / lstm_controller_cell_bwd_kernel: one program per stage,
             the recurrence over its blocks (h W_hh^T plus the precomputed input gates, the cell;
             BPTT backward): the only launches whose chain is the number of blocks.
Forward: fc_in, input gates, cell, fc_out (4 launches); backward: fc_out's gradients, BPTT, dx and
the LSTM weight gradients, fc_in's gradients (4 launches).
Vectors a later phase needs in another distribution over threads go through global memory (`saved`,
`gin`, `ws`) with a CTA barrier between phases, and every buffer a phase writes is distinct from the
ones it reads (no in-place read-modify-write: replicated lanes of a tile could read a value another
lane already overwrote). Hence the forward's scratch `gin` (the gates' input half) beside `saved`.

Precision: the kernels compute in the element type of the buffers: fp32 (the controller always
runs in fp32, issue 3), fp64 only for gradcheck under the interpreter.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import List, Tuple

import torch
import triton
import triton.language as tl

from tsc_kernels.ops import lstm_controller as _declaration  # noqa: F401  (declares the op first)
from tsc_kernels.ops.registry import triton_backward, triton_forward
from tsc_kernels._triton import _launch
from tsc_kernels._triton._launch import DeviceTableCache

# Buffer ids of a table reference (the kernels' pointer arguments, or a parameter's own pointer).
B_NONE, B_WBAR, B_DT, B_GRAD, B_SAVED, B_WS, B_DWBAR, B_GIN, B_PTR = (tl.constexpr(i) for i in range(9))
# Operand kinds: a plain load, the constant 1 (bias gradients), sigmoid_backward(grad[i], dt[i]).
K_PLAIN, K_ONE, K_SIGBWD = (tl.constexpr(i) for i in range(3))
E_LINEAR, E_RELU, E_SIGMOID, E_RELU_BWD = (tl.constexpr(i) for i in range(4))
F_DOT, F_AXPY = tl.constexpr(0), tl.constexpr(1)
# Columns of a job row: form, rows, cols, K, epilogue, first program; operands a, b (buffer, value,
# kind, outer stride, inner stride: a(r, k) = A[r*outer + k*inner], b(k, c) = B[k*inner + c*outer]);
# references y, y2 (a copy: db_hh = db_ih), bias1, bias2, aux (ReLU output for E_RELU_BWD) as
# (buffer, value): value = element offset into the buffer, or a data pointer for B_PTR.
J_FORM, J_ROWS, J_COLS, J_K, J_EPI, J_PROG0 = (tl.constexpr(i) for i in range(6))
J_A, J_B = tl.constexpr(6), tl.constexpr(11)
J_Y, J_Y2, J_BIAS1, J_BIAS2, J_AUX = (tl.constexpr(16 + 2 * i) for i in range(5))
NJOB = tl.constexpr(26)
# Columns of a cell (stage) row: L, H, offset into saved, into gin / ws, W_hh's pointer.
C_L, C_H, C_SAVED, C_SCRATCH, C_WHH = (tl.constexpr(i) for i in range(5))
NCELL = tl.constexpr(5)


def saved_numel(blocks: int, h: int) -> int:
    """x (L,H), gates (L,4H), c (L,H), h (L,H)."""
    return 7 * blocks * h


def ws_numel(blocks: int, h: int) -> int:
    """Backward scratch: dh (L,H) from fc_out, dgates (L,4H), dh_rec (L,H), dc_carry (L,H), dx (L,H)."""
    return 8 * blocks * h


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
def _resolve(row, col, wbar_ptr, dt_ptr, grad_ptr, saved_ptr, ws_ptr, dwbar_ptr, gin_ptr):
    """The pointer a (buffer, value) table reference names (B_NONE: wbar_ptr, never dereferenced)."""
    buf = tl.load(row + col)
    val = tl.load(row + col + 1)
    p = wbar_ptr + val
    if buf == B_DT:
        p = dt_ptr + val
    elif buf == B_GRAD:
        p = grad_ptr + val
    elif buf == B_SAVED:
        p = saved_ptr + val
    elif buf == B_WS:
        p = ws_ptr + val
    elif buf == B_DWBAR:
        p = dwbar_ptr + val
    elif buf == B_GIN:
        p = gin_ptr + val
    elif buf == B_PTR:
        p = val.to(tl.pointer_type(wbar_ptr.dtype.element_ty))
    return p


@triton.jit
def _operand(p, q, kind, idx, mask):
    """Operand values at idx: p[idx], 1, or sigmoid_backward(p[idx], q[idx]) (p = grad, q = dt)."""
    v = tl.load(p + idx, mask=mask & (kind != K_ONE), other=0.0)
    y = tl.load(q + idx, mask=mask & (kind == K_SIGBWD), other=0.0)
    v = tl.where(kind == K_SIGBWD, v * y * (1.0 - y), v)
    return tl.where(mask & (kind == K_ONE), 1.0, v)


@triton.jit
def _store_output(y, y2, has_y2, b1, has_b1, b2, has_b2, aux, epi, acc, r, c, cols, mask):
    acc += tl.load(b1 + c, mask=mask & has_b1, other=0.0) + tl.load(b2 + c, mask=mask & has_b2, other=0.0)
    e = r * cols + c
    if epi == E_RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)
    elif epi == E_SIGMOID:
        acc = _sigmoid(acc)
    elif epi == E_RELU_BWD:
        acc = tl.where(tl.load(aux + e, mask=mask, other=0.0) <= 0.0, 0.0, acc)
    tl.store(y + e, acc, mask=mask)
    tl.store(y2 + e, acc, mask=mask & has_y2)


@triton.jit
def lstm_controller_products_kernel(jobs_ptr, n_jobs, wbar_ptr, dt_ptr, grad_ptr, saved_ptr, ws_ptr, dwbar_ptr, gin_ptr,
                                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    j = pid * 0
    for t in range(1, n_jobs):  # the last job whose first program is <= pid
        j = tl.where(pid >= tl.load(jobs_ptr + t * NJOB + J_PROG0), t, j)
    row = jobs_ptr + j * NJOB
    form = _dim(row, J_FORM)
    rows = _dim(row, J_ROWS)
    cols = _dim(row, J_COLS)
    K = _dim(row, J_K)
    epi = _dim(row, J_EPI)
    local = pid - _dim(row, J_PROG0)
    a = _resolve(row, J_A, wbar_ptr, dt_ptr, grad_ptr, saved_ptr, ws_ptr, dwbar_ptr, gin_ptr)
    b = _resolve(row, J_B, wbar_ptr, dt_ptr, grad_ptr, saved_ptr, ws_ptr, dwbar_ptr, gin_ptr)
    a_dt = dt_ptr + tl.load(row + J_A + 1)  # sigmoid_backward's dt, at the grad operand's offset
    b_dt = dt_ptr + tl.load(row + J_B + 1)
    a_kind, a_out, a_in = _dim(row, J_A + 2), _dim(row, J_A + 3), _dim(row, J_A + 4)
    b_kind, b_out, b_in = _dim(row, J_B + 2), _dim(row, J_B + 3), _dim(row, J_B + 4)
    y = _resolve(row, J_Y, wbar_ptr, dt_ptr, grad_ptr, saved_ptr, ws_ptr, dwbar_ptr, gin_ptr)
    y2 = _resolve(row, J_Y2, wbar_ptr, dt_ptr, grad_ptr, saved_ptr, ws_ptr, dwbar_ptr, gin_ptr)
    b1 = _resolve(row, J_BIAS1, wbar_ptr, dt_ptr, grad_ptr, saved_ptr, ws_ptr, dwbar_ptr, gin_ptr)
    b2 = _resolve(row, J_BIAS2, wbar_ptr, dt_ptr, grad_ptr, saved_ptr, ws_ptr, dwbar_ptr, gin_ptr)
    aux = _resolve(row, J_AUX, wbar_ptr, dt_ptr, grad_ptr, saved_ptr, ws_ptr, dwbar_ptr, gin_ptr)
    has_y2 = tl.load(row + J_Y2) != B_NONE
    has_b1 = tl.load(row + J_BIAS1) != B_NONE
    has_b2 = tl.load(row + J_BIAS2) != B_NONE
    if form == F_DOT:
        # BLOCK_R outputs of row r; b's rows (the outputs' columns) read along k, BLOCK_K at a time
        tiles = tl.cdiv(cols, BLOCK_R)
        r = local // tiles
        c = (local % tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
        cmask = (c < cols) & (r < rows)
        acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=wbar_ptr.dtype.element_ty)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = (k < K) & (r < rows)
            av = _operand(a, a_dt, a_kind, r * a_out + k * a_in, kmask)
            bv = _operand(b, b_dt, b_kind, k[None, :] * b_in + c[:, None] * b_out, cmask[:, None] & kmask[None, :])
            acc += bv * av[None, :]
        _store_output(y, y2, has_y2, b1, has_b1, b2, has_b2, aux, epi, tl.sum(acc, axis=1), r, c, cols, cmask)
    else:
        # a BLOCK_R x BLOCK_K tile of outputs; k in order (sums over blocks keep block order). Names
        # differ from the DOT branch's: Triton needs a name to keep one type across the branches.
        n_ct = tl.cdiv(cols, BLOCK_K)
        rt = (local // n_ct) * BLOCK_R + tl.arange(0, BLOCK_R)
        ct = (local % n_ct) * BLOCK_K + tl.arange(0, BLOCK_K)
        rt_mask = rt < rows
        ct_mask = ct < cols
        acc_t = tl.zeros([BLOCK_R, BLOCK_K], dtype=wbar_ptr.dtype.element_ty)
        for kk in range(0, K):
            av_t = _operand(a, a_dt, a_kind, rt * a_out + kk * a_in, rt_mask)
            bv_t = _operand(b, b_dt, b_kind, kk * b_in + ct * b_out, ct_mask)
            acc_t += av_t[:, None] * bv_t[None, :]
        _store_output(y, y2, has_y2, b1, has_b1, b2, has_b2, aux, epi, acc_t, rt[:, None], ct[None, :], cols,
                      rt_mask[:, None] & ct_mask[None, :])


@triton.jit
def _load_gates(g_row, H, m):
    """The activated gates (i, f, g, o) of columns g_row + [0, H) of one block's (4H,) gate row."""
    gi = tl.load(g_row, mask=m, other=0.0)
    gf = tl.load(g_row + H, mask=m, other=0.0)
    gg = tl.load(g_row + 2 * H, mask=m, other=0.0)
    go = tl.load(g_row + 3 * H, mask=m, other=0.0)
    return gi, gf, gg, go


@triton.jit
def lstm_controller_cell_fwd_kernel(cells_ptr, saved_ptr, gin_ptr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """One stage's recurrence: gates_d = act(gin_d + W_hh h_{d-1}), c_d, h_d (gin: the products launch)."""
    row = cells_ptr + tl.program_id(0) * NCELL
    L = _dim(row, C_L)
    H = _dim(row, C_H)
    w_hh = _ptr(row, C_WHH, saved_ptr)
    gin = gin_ptr + _dim(row, C_SCRATCH)
    gs = saved_ptr + _dim(row, C_SAVED) + L * H
    cs = gs + L * 4 * H
    hs = cs + L * H
    for d in range(0, L):
        for r0 in range(0, 4 * H, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            m = rows < 4 * H
            z = _mv(w_hh, hs + (d - 1) * H, d > 0, 4 * H, H, r0, BLOCK_R, BLOCK_K)
            z += tl.load(gin + d * 4 * H + rows, mask=m, other=0.0)
            is_g = (rows >= 2 * H) & (rows < 3 * H)
            tl.store(gs + d * 4 * H + rows, tl.where(is_g, _tanh(z), _sigmoid(z)), mask=m)
        tl.debug_barrier()
        for j0 in range(0, H, BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            m = j < H
            gi, gf, gg, go = _load_gates(gs + d * 4 * H + j, H, m)
            c_prev = tl.load(cs + (d - 1) * H + j, mask=m & (d > 0), other=0.0)
            c = gf * c_prev + gi * gg
            tl.store(cs + d * H + j, c, mask=m)
            tl.store(hs + d * H + j, go * _tanh(c), mask=m)
        tl.debug_barrier()


@triton.jit
def lstm_controller_cell_bwd_kernel(cells_ptr, saved_ptr, ws_ptr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """One stage's BPTT: dh (fc_out's, from the products launch) through the cells, last block first,
    into dgates (L, 4H) for the products after it."""
    row = cells_ptr + tl.program_id(0) * NCELL
    L = _dim(row, C_L)
    H = _dim(row, C_H)
    w_hh = _ptr(row, C_WHH, saved_ptr)
    gs = saved_ptr + _dim(row, C_SAVED) + L * H
    cs = gs + L * 4 * H
    dh = ws_ptr + _dim(row, C_SCRATCH)  # dL/dh_d through fc_out          (L, H)
    dg = dh + L * H                     # d(gate pre-activations)         (L, 4H)
    dhr = dg + L * 4 * H                # W_hh^T dg_d: dL/dh_{d-1} via d  (L, H)
    dcc = dhr + L * H                   # dc_d * f_d: dL/dc_{d-1} via d   (L, H)
    for t in range(0, L):
        d = L - 1 - t
        has_next = d < L - 1
        for j0 in range(0, H, BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            m = j < H
            gi, gf, gg, go = _load_gates(gs + d * 4 * H + j, H, m)
            c = tl.load(cs + d * H + j, mask=m, other=0.0)
            c_prev = tl.load(cs + (d - 1) * H + j, mask=m & (d > 0), other=0.0)
            # dL/dh_d: fc_out's, plus block d + 1's through W_hh
            h_grad = tl.load(dh + d * H + j, mask=m, other=0.0)
            h_grad += tl.load(dhr + (d + 1) * H + j, mask=m & has_next, other=0.0)
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


# ---------------------------------------------------------------------------------------------
# Planning, launchers and torch.library glue
# ---------------------------------------------------------------------------------------------
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Tiles (BLOCK_R, BLOCK_K, num_warps). On a GPU, 32 x 64 fp32 tiles over 8 warps (8 values per thread
# per tile) keep every kernel spill-free on sm_80 and sm_90 (aot.py). Under the interpreter the cost
# is per Python-level tile step, and tests use small odd shapes: 16 x 16 still makes every loop run
# several (partial) tiles there. launch_plan describes the launchers' tiles.
GPU_TILES = (32, 64, 8)
BLOCK_R, BLOCK_K, NUM_WARPS = (16, 16, 1) if _INTERPRET else GPU_TILES
_PER_STAGE = 8
_TABLES = DeviceTableCache()
_PRODUCTS = "lstm_controller_products_kernel"
_CELL_FWD = "lstm_controller_cell_fwd_kernel"
_CELL_BWD = "lstm_controller_cell_bwd_kernel"
_NONE = (0, 0)


@dataclass(frozen=True)
class _Job:
    """Y[r, c] = epi(sum_k a(r, k) b(k, c) + bias1[c] + bias2[c]) (the kernel's job row). Operands are
    (buffer, value, kind, outer, inner), references (buffer, value); for B_PTR the value is
    ("p", i) / ("g", i): parameter i or its gradient, resolved to a pointer in the table."""
    form: int
    rows: int
    cols: int
    K: int
    a: tuple
    b: tuple
    y: tuple
    epi: int = 0
    y2: tuple = _NONE
    bias1: tuple = _NONE
    bias2: tuple = _NONE
    aux: tuple = _NONE


@dataclass
class _Step:
    """One launch: a products launch (jobs) or a cell launch (stages)."""
    kernel: str
    phase: str
    programs: int
    jobs: tuple = ()
    stages: tuple = ()


def _p(i):
    return (B_PTR.value, ("p", i))


def _g(i):
    return (B_PTR.value, ("g", i))


_ONE = (B_NONE.value, 0, K_ONE.value, 0, 0)


def _programs(job: _Job, tiles) -> int:
    block_r, block_k, _ = tiles
    if job.form == F_DOT.value:
        return job.rows * triton.cdiv(job.cols, block_r)
    return triton.cdiv(job.rows, block_r) * triton.cdiv(job.cols, block_k)


def _offsets(dims):
    """Per stage: offsets into wbar, dt, saved, gin (4LH) and ws (ws_numel), and the totals."""
    off, tot = [], [0, 0, 0, 0, 0]
    for L, D, H, C in dims:
        off.append(tuple(tot))
        for i, n in enumerate((L * D, L * C, saved_numel(L, H), 4 * L * H, ws_numel(L, H))):
            tot[i] += n
    return off, tot


def _forward_jobs(dims):
    fc_in, gates, fc_out = [], [], []
    DOT, PLAIN = F_DOT.value, K_PLAIN.value
    for s, ((L, D, H, C), (o_w, o_dt, o_sv, o_gin, _)) in enumerate(zip(dims, _offsets(dims)[0])):
        x, h, P = o_sv, o_sv + 6 * L * H, _PER_STAGE * s
        fc_in.append(_Job(DOT, L, H, D, (B_WBAR.value, o_w, PLAIN, D, 1), _p(P) + (PLAIN, D, 1), (B_SAVED.value, x),
                          E_RELU.value, bias1=_p(P + 1)))
        gates.append(_Job(DOT, L, 4 * H, H, (B_SAVED.value, x, PLAIN, H, 1), _p(P + 2) + (PLAIN, H, 1),
                          (B_GIN.value, o_gin), bias1=_p(P + 4), bias2=_p(P + 5)))
        fc_out.append(_Job(DOT, L, C, H, (B_SAVED.value, h, PLAIN, H, 1), _p(P + 6) + (PLAIN, H, 1), (B_DT.value, o_dt),
                           E_SIGMOID.value, bias1=_p(P + 7)))
    return fc_in, gates, fc_out


def _backward_jobs(dims):
    out, mid, inp = [], [], []
    AXPY, PLAIN, SIG = F_AXPY.value, K_PLAIN.value, K_SIGBWD.value
    for s, ((L, D, H, C), (o_w, o_dt, o_sv, _, o_ws)) in enumerate(zip(dims, _offsets(dims)[0])):
        x, h, P = o_sv, o_sv + 6 * L * H, _PER_STAGE * s
        dh, dg, dx = o_ws, o_ws + L * H, o_ws + 7 * L * H
        WS, SAVED = B_WS.value, B_SAVED.value
        # fc_out: dh = gz W_out, dW_out = gz^T h, db_out = sum_d gz (gz = sigmoid_backward(grad, dt))
        out.append(_Job(AXPY, L, H, C, (B_GRAD.value, o_dt, SIG, C, 1), _p(P + 6) + (PLAIN, 1, H), (WS, dh)))
        out.append(_Job(AXPY, C, H, L, (B_GRAD.value, o_dt, SIG, 1, C), (SAVED, h, PLAIN, 1, H), _g(P + 6)))
        out.append(_Job(AXPY, 1, C, L, _ONE, (B_GRAD.value, o_dt, SIG, 1, C), _g(P + 7)))
        # dx = relu'(dgates W_ih); dW_ih = dgates^T x; dW_hh = dgates[1:]^T h[:-1]; db_ih = db_hh = sum_d dgates
        mid.append(_Job(AXPY, L, H, 4 * H, (WS, dg, PLAIN, 4 * H, 1), _p(P + 2) + (PLAIN, 1, H), (WS, dx),
                        E_RELU_BWD.value, aux=(SAVED, x)))
        mid.append(_Job(AXPY, 4 * H, H, L, (WS, dg, PLAIN, 1, 4 * H), (SAVED, x, PLAIN, 1, H), _g(P + 2)))
        mid.append(_Job(AXPY, 4 * H, H, max(L - 1, 0), (WS, dg + 4 * H, PLAIN, 1, 4 * H), (SAVED, h, PLAIN, 1, H),
                        _g(P + 3)))
        mid.append(_Job(AXPY, 1, 4 * H, L, _ONE, (WS, dg, PLAIN, 1, 4 * H), _g(P + 4), y2=_g(P + 5)))
        # fc_in: dW_in = dx^T w̄, db_in = sum_d dx, dw̄ = dx W_in
        inp.append(_Job(AXPY, H, D, L, (WS, dx, PLAIN, 1, H), (B_WBAR.value, o_w, PLAIN, 1, D), _g(P)))
        inp.append(_Job(AXPY, 1, H, L, _ONE, (WS, dx, PLAIN, 1, H), _g(P + 1)))
        inp.append(_Job(AXPY, L, D, H, (WS, dx, PLAIN, H, 1), _p(P) + (PLAIN, 1, D), (B_DWBAR.value, o_w)))
    return out, mid, inp


@functools.lru_cache(maxsize=64)
def _plan(dims: tuple, tiles: tuple) -> list[_Step]:
    """Every launch of the forward, then the backward, with its programs: what the launchers run
    (steps with no programs are skipped by both). Cached per network (dims: ((L, D, H, C), ...)):
    the host-bound training step plans once."""
    def products(phase, jobs):
        return _Step(_PRODUCTS, phase, sum(_programs(j, tiles) for j in jobs), tuple(jobs))

    cells = tuple(range(len(dims)))
    fc_in, gates, fc_out = _forward_jobs(dims)
    out, mid, inp = _backward_jobs(dims)
    steps = [products("forward", fc_in), products("forward", gates),
             _Step(_CELL_FWD, "forward", len(dims), stages=cells), products("forward", fc_out),
             products("backward", out), _Step(_CELL_BWD, "backward", len(dims), stages=cells),
             products("backward", mid), products("backward", inp)]
    return [s for s in steps if s.programs > 0]


def _resolve_value(value, params, grads):
    if isinstance(value, tuple):
        kind, i = value
        return (params if kind == "p" else grads)[i].data_ptr()
    return value


def _job_rows(jobs, tiles, params, grads) -> list[list[int]]:
    rows, prog0 = [], 0
    for j in jobs:
        refs = []
        for ref in (j.a, j.b, j.y, j.y2, j.bias1, j.bias2, j.aux):
            refs += [ref[0], _resolve_value(ref[1], params, grads)] + list(ref[2:])
        rows.append([j.form, j.rows, j.cols, j.K, j.epi, prog0] + refs)
        prog0 += _programs(j, tiles)
    return rows


def _cell_rows(dims, params, scratch: int) -> list[list[int]]:
    """Per stage L, H, saved offset, gin (scratch 3) or ws (scratch 4) offset, W_hh's pointer."""
    offs = _offsets(dims)[0]
    return [[L, H, o[2], o[scratch], params[_PER_STAGE * s + 3].data_ptr()]
            for s, ((L, _, H, _), o) in enumerate(zip(dims, offs))]


def _run(steps, phase, dims, params, grads, bufs):
    """Launches the steps of `phase`; bufs = (wbar, dt, grad, saved, ws, dwbar, gin), unused ones any tensor."""
    tiles = (BLOCK_R, BLOCK_K, NUM_WARPS)
    device = bufs[0].device
    for st in steps:
        if st.phase != phase:
            continue
        if st.kernel == _PRODUCTS:
            table = _TABLES.get(_job_rows(st.jobs, tiles, params, grads), NJOB.value, device)
            lstm_controller_products_kernel[(st.programs,)](table, len(st.jobs), *bufs, BLOCK_R=BLOCK_R,
                                                            BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
        elif st.kernel == _CELL_FWD:
            table = _TABLES.get(_cell_rows(dims, params, 3), NCELL.value, device)
            lstm_controller_cell_fwd_kernel[(st.programs,)](table, bufs[3], bufs[6], BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K,
                                                            num_warps=NUM_WARPS)
        else:
            table = _TABLES.get(_cell_rows(dims, params, 4), NCELL.value, device)
            lstm_controller_cell_bwd_kernel[(st.programs,)](table, bufs[3], bufs[4], BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K,
                                                            num_warps=NUM_WARPS)


def _dims(op: str, wbar: torch.Tensor, blocks: List[int],
          params: List[torch.Tensor]) -> list[tuple[int, int, int, int]]:
    """(L, D, H, C) per stage after checking the packed arguments against each other (as the C++ op does)."""
    if len(params) != _PER_STAGE * len(blocks):
        raise ValueError(f"{op}: params must hold 8 tensors per stage ({_PER_STAGE * len(blocks)} for "
                         f"{len(blocks)} stages), got {len(params)}")
    if wbar.dim() != 1 or wbar.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: wbar_packed must be a 1-D float32/float64 tensor, "
                         f"got {wbar.dtype} {tuple(wbar.shape)}")
    dims, total = [], 0
    for s, L in enumerate(blocks):
        p = params[_PER_STAGE * s: _PER_STAGE * (s + 1)]
        if any(t.dtype != wbar.dtype or t.device != wbar.device for t in p):
            raise ValueError(f"{op}: stage {s}: every parameter must have wbar_packed's dtype {wbar.dtype} "
                             f"and device {wbar.device}")
        if p[0].dim() != 2 or p[6].dim() != 2:
            raise ValueError(f"{op}: stage {s}: fc_in.weight and fc_out.weight must be 2-D")
        H, D, C = p[0].shape[0], p[0].shape[1], p[6].shape[0]
        want = [(H,), (4 * H, H), (4 * H, H), (4 * H,), (4 * H,), (C, H), (C,)]
        for k, shape in enumerate(want, start=1):
            if tuple(p[k].shape) != shape:
                raise ValueError(f"{op}: stage {s}: params[{_PER_STAGE * s + k}] must have shape {shape}, "
                                 f"got {tuple(p[k].shape)}")
        if L < 0:
            raise ValueError(f"{op}: blocks[{s}] must be >= 0, got {L}")
        dims.append((int(L), int(D), int(H), int(C)))
        total += L * D
    if wbar.numel() != total:
        raise ValueError(f"{op}: wbar_packed must hold sum(L_s * D_s) = {total} values, got {wbar.numel()}")
    return dims


# The declared schemas (tsc_kernels/ops/lstm_controller.py): `int[]` where custom_op would infer
# `SymInt[]` from the type hints.
@triton_forward("lstm_controller")
def lstm_controller_triton(wbar_packed: torch.Tensor, blocks: List[int],
                           params: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    dims = _dims("tsc::lstm_controller_triton", wbar_packed, blocks, params)
    wbar = wbar_packed.contiguous()
    params = [p.contiguous() for p in params]
    _, (_, n_dt, n_saved, n_gin, _) = _offsets(dims)
    dt = wbar.new_empty(n_dt)
    saved = wbar.new_empty(n_saved)
    gin = wbar.new_empty(n_gin)  # the gates' input half, x W_ih^T + b_ih + b_hh
    steps = _plan(tuple(dims), (BLOCK_R, BLOCK_K, NUM_WARPS))
    _run(steps, "forward", dims, params, None, (wbar, dt, wbar, saved, wbar, wbar, gin))
    return dt, saved


@triton_backward("lstm_controller")
def lstm_controller_backward_triton(grad: torch.Tensor, dt_packed: torch.Tensor, wbar_packed: torch.Tensor,
                                    blocks: List[int], params: List[torch.Tensor],
                                    saved: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    op = "tsc::lstm_controller_backward_triton"
    dims = _dims(op, wbar_packed, blocks, params)
    _, (_, n_dt, n_saved, _, n_ws) = _offsets(dims)
    for name, t, n in (("grad", grad, n_dt), ("dt_packed", dt_packed, n_dt), ("saved", saved, n_saved)):
        if t.dim() != 1 or t.numel() != n or t.dtype != wbar_packed.dtype:
            raise ValueError(f"{op}: {name} must be 1-D {wbar_packed.dtype} with {n} values, "
                             f"got {t.dtype} {tuple(t.shape)}")
    wbar, grad, dt, saved = wbar_packed.contiguous(), grad.contiguous(), dt_packed.contiguous(), saved.contiguous()
    params = [p.contiguous() for p in params]
    # Every gradient is written whole by a job (K = 0 for a stage with L = 0 writes zeros), so empty_like suffices.
    dparams = [torch.empty_like(p) for p in params]
    dwbar = torch.empty_like(wbar)
    ws = wbar.new_empty(n_ws)
    steps = _plan(tuple(dims), (BLOCK_R, BLOCK_K, NUM_WARPS))
    _run(steps, "backward", dims, params, dparams, (wbar, dt, grad, saved, ws, dwbar, wbar))
    return dwbar, dparams


def _job_numel(j: _Job) -> int:
    """Elements a job reads and writes (operands, outputs, biases, the ReLU mask)."""
    def operand(o, n):
        return 0 if o[2] == K_ONE.value else (2 * n if o[2] == K_SIGBWD.value else n)
    out = j.rows * j.cols
    n = operand(j.a, j.rows * j.K) + operand(j.b, j.K * j.cols) + out
    n += (out if j.y2 != _NONE else 0) + (out if j.aux != _NONE else 0)
    return n + j.cols * ((j.bias1 != _NONE) + (j.bias2 != _NONE))


def _job_request(j: _Job, tiles, elem: int) -> int:
    block_r, block_k, _ = tiles
    if j.form == F_DOT.value:  # b's (BLOCK_R, BLOCK_K) tile, rows K apart
        return _launch.tile_request_bytes(block_k, min(j.K, block_k), elem, rows_adjacent=j.K <= block_k)
    return _launch.request_bytes(min(j.cols, block_k), elem)  # b's row slice, contiguous in c


def _step_launch(st: _Step, dims, tiles, elem: int) -> dict:
    block_r, block_k, warps = tiles
    if st.kernel == _PRODUCTS:
        dot = any(j.form == F_DOT.value for j in st.jobs)
        # the k loop streams (1); a DOT job's tl.sum over BLOCK_K is a tree of log2(BLOCK_K)
        chain = 1 + (block_k.bit_length() - 1 if dot else 0)
        return _launch.launch(st.kernel, st.phase, (st.programs,), warps,
                              bytes=elem * sum(_job_numel(j) for j in st.jobs), chain=chain,
                              request_bytes=min(_job_request(j, tiles, elem) for j in st.jobs),
                              smem=_launch.reduce_smem(block_r, warps, elem) if dot else 0)
    # a program per stage; chain = the longest stage's blocks (the recurrence, the one exception);
    # bytes: W_hh, gin / dh, the gates, c, h (forward) or dgates and the carries (backward)
    sizes = [dims[s] for s in st.stages]
    hmax = max((H for _, _, H, _ in sizes), default=1)
    bwd = st.kernel == _CELL_BWD
    return _launch.launch(st.kernel, st.phase, (st.programs,), warps,
                          bytes=elem * sum(4 * H * H + (13 if bwd else 10) * L * H for L, _, H, _ in sizes),
                          chain=max(L for L, _, _, _ in sizes),
                          request_bytes=_launch.tile_request_bytes(block_k, min(hmax, block_k), elem,
                                                                   rows_adjacent=hmax <= block_k),
                          smem=_launch.reduce_smem(block_k if bwd else block_r, warps, elem))


def launch_plan(wbar_packed: torch.Tensor, blocks: List[int], params: List[torch.Tensor], sms: int = 132) -> list[dict]:
    """The launches of lstm_controller_triton and its backward for these arguments (tensors may be on
    `meta`), forward then backward, at the launchers' tiles (the GPU's unless interpreting): `_plan`,
    which the launchers run. `sms` is unused: no grid depends on the GPU (fixed-order sums over blocks)."""
    dims = _dims("tsc::lstm_controller_triton", wbar_packed, list(blocks), list(params))
    elem = wbar_packed.element_size()
    tiles = (BLOCK_R, BLOCK_K, NUM_WARPS)
    return [_step_launch(st, dims, tiles, elem) for st in _plan(tuple(dims), tiles)]


# Ahead-of-time compile configurations (triton_kernels/aot.py). Sizes, offsets and pointers are
# runtime values read from the tables (one launch serves stages of different sizes), so one binary
# per kernel covers every network, from CIFAR ResNet-20 (H = 4) to ResNet-50 (H = 256, C = 2048)
# and ResNet-18 (D = 9216): the tile loops, not the registers, grow with the shapes.
_PTRS = ("wbar_ptr", "dt_ptr", "grad_ptr", "saved_ptr", "ws_ptr", "dwbar_ptr", "gin_ptr")
AOT_CONFIGS = [
    dict(kernel=lstm_controller_products_kernel, name="lstm_controller_products_fp32",
         signature={"jobs_ptr": "*i64", "n_jobs": "i32", **{p: "*fp32" for p in _PTRS},
                    "BLOCK_R": "constexpr", "BLOCK_K": "constexpr"},
         constexprs={"BLOCK_R": BLOCK_R, "BLOCK_K": BLOCK_K}, num_warps=NUM_WARPS),
    dict(kernel=lstm_controller_cell_fwd_kernel, name="lstm_controller_cell_fwd_fp32",
         signature={"cells_ptr": "*i64", "saved_ptr": "*fp32", "gin_ptr": "*fp32", "BLOCK_R": "constexpr",
                    "BLOCK_K": "constexpr"},
         constexprs={"BLOCK_R": BLOCK_R, "BLOCK_K": BLOCK_K}, num_warps=NUM_WARPS),
    dict(kernel=lstm_controller_cell_bwd_kernel, name="lstm_controller_cell_bwd_fp32",
         signature={"cells_ptr": "*i64", "saved_ptr": "*fp32", "ws_ptr": "*fp32", "BLOCK_R": "constexpr",
                    "BLOCK_K": "constexpr"},
         constexprs={"BLOCK_R": BLOCK_R, "BLOCK_K": BLOCK_K}, num_warps=NUM_WARPS),
]
