"""Triton kernels of the linear multi-step update ``relu?((1-k)·u + k·u_prev + keep[n]·dt[c]·f)``
(docs/ops.md, multistep_update): kernels, launchers and the torch.library glue in one file.

Each sample is one contiguous block, channel-first (offset c·S + s) or channels-last (s·C + c); the
kernels take the two strides (sc, ss) so one kernel serves both. Arithmetic runs in k's dtype (fp32,
fp64 for fp64 inputs).
  forward    1 launch: reads u, u_prev, f; writes out
  backward   1 launch, one program per (sample, block of channels), looping over the spatial
             positions: writes du, du_prev, df and the (N, C) partial-sum tables; then a one-program
             finalize launch reduces them into dk, ddt, dkeep in a fixed order (deterministic).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from tsc_kernels.ops import multistep_update as _declaration  # noqa: F401  (declares the op first)
from tsc_kernels.ops._layout import is_channels_last_like, to_layout
from tsc_kernels.ops.registry import triton_backward, triton_forward

from . import _launch

FWD_BLOCK = 1024
# (BLOCK_C, BLOCK_S) tiles of the backward: channel-first planes are long along s, channels-last rows along c.
# 512-element tiles: with 5 loads, 3 stores and 2 accumulators per element (int64 offsets), 1024-element
# tiles need ~255 registers and spilled on sm_90 (tests/test_triton_aot.py).
GPU_PLANES_TILE, GPU_ROWS_TILE = (2, 256), (32, 16)
PLANES_TILE, ROWS_TILE = GPU_PLANES_TILE, GPU_ROWS_TILE
FIN_BLOCK_N, FIN_BLOCK_C = 32, 64
if os.environ.get("TRITON_INTERPRET", "0") == "1":  # the interpreter's cost is per tile step: small tiles on tiny shapes
    PLANES_TILE, ROWS_TILE, FIN_BLOCK_N, FIN_BLOCK_C = (2, 16), (16, 4), 4, 16


@triton.jit
def multistep_fwd_kernel(u_ptr, p_ptr, f_ptr, k_ptr, dt_ptr, keep_ptr, out_ptr, numel, C, inner, CS,
                         HAS_DT: tl.constexpr, HAS_KEEP: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr,
                         INDEX_64: tl.constexpr):
    pid = tl.program_id(0)
    if INDEX_64:  # _launch.index_64: int32 indices (and channel divisions) unless the tensor needs more
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc_ty = k_ptr.dtype.element_ty
    k = tl.load(k_ptr)
    scale = tl.full([BLOCK], 1.0, acc_ty)
    if HAS_DT:
        scale = tl.load(dt_ptr + (offs // inner) % C, mask=mask, other=0.0)
    if HAS_KEEP:
        scale = tl.load(keep_ptr + offs // CS, mask=mask, other=0.0) * scale
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    out = (1.0 - k) * u + k * p + scale * f
    if RELU:
        out = tl.where(out < 0, 0.0, out)  # NaN passes, as torch.relu
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def multistep_bwd_kernel(g_ptr, u_ptr, p_ptr, f_ptr, o_ptr, k_ptr, dt_ptr, keep_ptr, du_ptr, dp_ptr, df_ptr,
                         pk_ptr, pf_ptr, C, S, sc, ss,
                         HAS_DT: tl.constexpr, HAS_KEEP: tl.constexpr, RELU: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program n·cdiv(C, BLOCK_C) + j owns channels [j·BLOCK_C, (j+1)·BLOCK_C) of sample n, all its
    positions in order. (sample, channel tile) is flattened onto grid axis 0 (up to 2^31 - 1): on
    axis 1 (at most 65535) the channel tiles stopped launching past C = 131,070."""
    n_tiles = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0).to(tl.int64)
    n = pid // n_tiles
    cols = (pid % n_tiles) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = cols < C
    acc_ty = k_ptr.dtype.element_ty
    k = tl.load(k_ptr)
    scale = tl.full([BLOCK_C], 1.0, acc_ty)
    if HAS_DT:
        scale = tl.load(dt_ptr + cols, mask=cmask, other=0.0)
    if HAS_KEEP:
        scale = tl.load(keep_ptr + n) * scale
    acc_k = tl.zeros([BLOCK_C, BLOCK_S], dtype=acc_ty)
    acc_f = tl.zeros([BLOCK_C, BLOCK_S], dtype=acc_ty)
    base = n * C * S
    for start in range(0, S, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S).to(tl.int64)
        mask = cmask[:, None] & (s < S)[None, :]
        offs = base + cols[:, None] * sc + s[None, :] * ss
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        if RELU:
            o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(acc_ty)
            g = tl.where(o <= 0, 0.0, g)  # threshold_backward: zero where out <= 0
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        tl.store(du_ptr + offs, ((1.0 - k) * g).to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(dp_ptr + offs, (k * g).to(dp_ptr.dtype.element_ty), mask=mask)
        tl.store(df_ptr + offs, (scale[:, None] * g).to(df_ptr.dtype.element_ty), mask=mask)
        acc_k += g * (p - u)
        acc_f += g * f
    tl.store(pk_ptr + n * C + cols, tl.sum(acc_k, axis=1), mask=cmask)
    tl.store(pf_ptr + n * C + cols, tl.sum(acc_f, axis=1), mask=cmask)


@triton.jit
def multistep_finalize_kernel(pk_ptr, pf_ptr, dt_ptr, keep_ptr, dk_ptr, ddt_ptr, dkeep_ptr, N, C,
                              HAS_DT: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: dk = Σ pk; ddt[c] = Σ_n keep[n]·pf[n, c]; dkeep[n] = Σ_c dt[c]·pf[n, c]."""
    acc_ty = dk_ptr.dtype.element_ty
    rows = tl.arange(0, BLOCK_N).to(tl.int64)
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=acc_ty)
    for n0 in range(0, N, BLOCK_N):
        for c0 in range(0, C, BLOCK_C):
            m = ((n0 + rows) < N)[:, None] & ((c0 + cols) < C)[None, :]
            acc += tl.load(pk_ptr + (n0 + rows)[:, None] * C + (c0 + cols)[None, :], mask=m, other=0.0)
    tl.store(dk_ptr, tl.sum(tl.sum(acc, axis=1), axis=0))
    if HAS_DT:
        for c0 in range(0, C, BLOCK_C):
            cm = (c0 + cols) < C
            acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=acc_ty)
            for n0 in range(0, N, BLOCK_N):
                nm = (n0 + rows) < N
                v = tl.load(pf_ptr + (n0 + rows)[:, None] * C + (c0 + cols)[None, :], mask=nm[:, None] & cm[None, :], other=0.0)
                if HAS_KEEP:
                    v = v * tl.load(keep_ptr + n0 + rows, mask=nm, other=0.0)[:, None]
                acc += v
            tl.store(ddt_ptr + c0 + cols, tl.sum(acc, axis=0), mask=cm)
    if HAS_KEEP:
        for n0 in range(0, N, BLOCK_N):
            nm = (n0 + rows) < N
            acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=acc_ty)
            for c0 in range(0, C, BLOCK_C):
                cm = (c0 + cols) < C
                v = tl.load(pf_ptr + (n0 + rows)[:, None] * C + (c0 + cols)[None, :], mask=nm[:, None] & cm[None, :], other=0.0)
                if HAS_DT:
                    v = v * tl.load(dt_ptr + c0 + cols, mask=cm, other=0.0)[None, :]
                acc += v
            tl.store(dkeep_ptr + n0 + rows, tl.sum(acc, axis=1), mask=nm)


def _shape(t: torch.Tensor, cl: bool) -> tuple[int, int, int, bool]:
    """(N, C, S, channels_last) of the per-sample blocks (see csrc/multistep_layout.h)."""
    n, c = t.shape[0], t.shape[1]
    s = t.numel() // (n * c) if n * c else 0
    return n, c, s, cl and t.dim() > 2


@triton_forward("multistep_update")
def multistep_update_triton(u: torch.Tensor, u_prev: torch.Tensor, f: torch.Tensor, k: torch.Tensor,
                            dt: Optional[torch.Tensor], keep: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    cl = is_channels_last_like(u)
    u, u_prev, f = (to_layout(t, cl) for t in (u, u_prev, f))
    out = torch.empty_like(u)
    N, C, S, cl = _shape(u, cl)
    if u.numel():
        multistep_fwd_kernel[(triton.cdiv(u.numel(), FWD_BLOCK),)](
            u, u_prev, f, k, k if dt is None else dt.contiguous(), k if keep is None else keep.contiguous(), out,
            u.numel(), C, 1 if cl else S, C * S, HAS_DT=dt is not None, HAS_KEEP=keep is not None, RELU=relu, BLOCK=FWD_BLOCK,
            INDEX_64=_launch.index_64(u.numel(), FWD_BLOCK))
    return out


@triton_backward("multistep_update")
def multistep_update_backward_triton(
    grad: torch.Tensor, u: torch.Tensor, u_prev: torch.Tensor, f: torch.Tensor, k: torch.Tensor,
    dt: Optional[torch.Tensor], keep: Optional[torch.Tensor], relu_out: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(du, du_prev, df, dk, ddt, dkeep), ddt / dkeep empty (0,) when dt / keep are None, as in C++."""
    cl = is_channels_last_like(u)
    relu = relu_out is not None
    g, u, u_prev, f = (to_layout(t, cl) for t in (grad, u, u_prev, f))
    o = to_layout(relu_out, cl) if relu else g  # unused pointer without the ReLU
    du, dp, df = torch.empty_like(u), torch.empty_like(u), torch.empty_like(u)
    dk = torch.empty_like(k)
    dt = None if dt is None else dt.contiguous()
    keep = None if keep is None else keep.contiguous()
    ddt = k.new_empty(0) if dt is None else torch.empty_like(dt)
    dkeep = k.new_empty(0) if keep is None else torch.empty_like(keep)
    N, C, S, cl = _shape(u, cl)
    pk = k.new_empty(N * C)
    pf = k.new_empty(N * C)
    flags = dict(HAS_DT=dt is not None, HAS_KEEP=keep is not None)
    if u.numel():
        block_c, block_s = ROWS_TILE if cl or S == 1 else PLANES_TILE
        multistep_bwd_kernel[(N * triton.cdiv(C, block_c),)](
            g, u, u_prev, f, o, k, k if dt is None else dt, k if keep is None else keep, du, dp, df, pk, pf,
            C, S, 1 if cl else S, C if cl else 1, RELU=relu, BLOCK_C=block_c, BLOCK_S=block_s, **flags)
    else:
        pk.zero_()
        pf.zero_()
    multistep_finalize_kernel[(1,)](pk, pf, k if dt is None else dt, k if keep is None else keep, dk,
                                    k if dt is None else ddt, k if keep is None else dkeep, N, C,
                                    BLOCK_N=FIN_BLOCK_N, BLOCK_C=FIN_BLOCK_C, **flags)
    return du, dp, df, dk, ddt, dkeep


def _fwd_sig(dtype: str) -> dict:
    return {"u_ptr": f"*{dtype}", "p_ptr": f"*{dtype}", "f_ptr": f"*{dtype}", "k_ptr": "*fp32", "dt_ptr": "*fp32",
            "keep_ptr": "*fp32", "out_ptr": f"*{dtype}", "numel": "i64", "C": "i64", "inner": "i64", "CS": "i64",
            "HAS_DT": "constexpr", "HAS_KEEP": "constexpr", "RELU": "constexpr", "BLOCK": "constexpr",
            "INDEX_64": "constexpr"}


def _bwd_sig(dtype: str) -> dict:
    sig = {name: f"*{dtype}" for name in ("g_ptr", "u_ptr", "p_ptr", "f_ptr", "o_ptr")}
    sig.update({"k_ptr": "*fp32", "dt_ptr": "*fp32", "keep_ptr": "*fp32"})
    sig.update({name: f"*{dtype}" for name in ("du_ptr", "dp_ptr", "df_ptr")})
    sig.update({"pk_ptr": "*fp32", "pf_ptr": "*fp32", "C": "i64", "S": "i64", "sc": "i64", "ss": "i64",
                "HAS_DT": "constexpr", "HAS_KEEP": "constexpr", "RELU": "constexpr", "BLOCK_C": "constexpr", "BLOCK_S": "constexpr"})
    return sig


_FIN_SIG = {"pk_ptr": "*fp32", "pf_ptr": "*fp32", "dt_ptr": "*fp32", "keep_ptr": "*fp32", "dk_ptr": "*fp32",
            "ddt_ptr": "*fp32", "dkeep_ptr": "*fp32", "N": "i64", "C": "i64",
            "HAS_DT": "constexpr", "HAS_KEEP": "constexpr", "BLOCK_N": "constexpr", "BLOCK_C": "constexpr"}

# Ahead-of-time compile configurations (triton_kernels/aot.py): every activation dtype and ReLU
# setting with dt and keep given (the LM-ResNet training case), plus fp32 without either; both
# backward tiles (the launcher's GPU sizes).
_FLAG_SETS = [(dtype, relu, True, True) for dtype in ("fp32", "fp16", "bf16") for relu in (False, True)] + [("fp32", False, False, False)]
AOT_CONFIGS = [
    cfg
    for dtype, relu, has_dt, has_keep in _FLAG_SETS
    for cfg in [
        dict(kernel=multistep_fwd_kernel, name=f"multistep_fwd_{dtype}_relu{int(relu)}_dt{int(has_dt)}_keep{int(has_keep)}",
             signature=_fwd_sig(dtype), constexprs={"HAS_DT": has_dt, "HAS_KEEP": has_keep, "RELU": relu, "BLOCK": FWD_BLOCK,
                                                    "INDEX_64": True}),
    ] + [
        dict(kernel=multistep_bwd_kernel,
             name=f"multistep_bwd_{tile_name}_{dtype}_relu{int(relu)}_dt{int(has_dt)}_keep{int(has_keep)}",
             signature=_bwd_sig(dtype),
             constexprs={"HAS_DT": has_dt, "HAS_KEEP": has_keep, "RELU": relu, "BLOCK_C": tile[0], "BLOCK_S": tile[1]})
        for tile_name, tile in (("planes", GPU_PLANES_TILE), ("rows", GPU_ROWS_TILE))
    ]
] + [
    dict(kernel=multistep_finalize_kernel, name=f"multistep_finalize_dt{int(f)}_keep{int(f)}", signature=_FIN_SIG,
         constexprs={"HAS_DT": f, "HAS_KEEP": f, "BLOCK_N": 32, "BLOCK_C": 64})
    for f in (True, False)
]
