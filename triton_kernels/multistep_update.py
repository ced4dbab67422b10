"""Triton kernels of the linear multi-step update ``relu?((1-k)·u + k·u_prev + keep[n]·dt[c]·f)``
(docs/ops.md, multistep_update): kernels, launchers and the torch.library glue in one file.

Each sample is one contiguous block, channel-first (offset c·S + s) or channels-last (s·C + c); the
kernels take the two strides (sc, ss) so one kernel serves both. Arithmetic runs in k's dtype (fp32,
fp64 for fp64 inputs).
  forward    1 launch: reads u, u_prev, f; writes out
  backward   1 launch, one program per (split of the positions, sample, block of channels), looping
             over its positions in (BLOCK_C, BLOCK_S) tiles sized from the shape (backward_tile):
             writes du, du_prev, df and the (splits, N, C) partial-sum tables; the splits' dkeep/ddt
             partials merged by _reduce when there are several (position_splits); then the finalize
             (one program per tile of channels: ddt and a share of dk; one per tile of samples: dkeep)
             and _reduce's merge of the dk shares, all in a fixed order (deterministic) and without a
             long serial chain.
`launch_plan` is built from the same forward_grid / backward_tile / position_splits / finalize_plan as
the launchers.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from tsc_kernels.ops import multistep_update as _declaration  # noqa: F401  (declares the op first)
from tsc_kernels.ops._layout import is_channels_last_like, to_layout
from tsc_kernels.ops.registry import triton_backward, triton_forward

from . import _launch, _reduce
from ._reduce import chunk_sum, log2

FWD_BLOCK = 1024


class Sizes(NamedTuple):
    """Backward tiles: TILE elements per (BLOCK_C, BLOCK_S) tile, BLOCK_S (planes: positions, the
    contiguous axis) between MIN_S and MAX_S; FIN_BLOCK channels (or samples) per finalize program,
    FIN_BLOCK_K samples (or channels) per step of its merge; the positions are split until the
    backward has MIN_PROGRAMS programs (position_splits)."""
    TILE: int
    MIN_S: int
    MAX_S: int
    ROWS_MAX_C: int
    FIN_BLOCK: int
    FIN_BLOCK_K: int
    MIN_PROGRAMS: int


# 512-element tiles: with 5 loads, 3 stores and 2 accumulators per element (int64 offsets), 1024-element
# tiles need ~255 registers and spilled on sm_90 (tests/tooling/test_triton_aot.py). The tile is cut from the
# shape (finding 2 of issue 22: a fixed (2, 256) planes tile idles 81 % of its lanes at S = 49).
# The finalize merges (64 x 32) tiles: C = 2048 channels of a sample take 32 steps and a 6-deep tree.
GPU = Sizes(TILE=512, MIN_S=2, MAX_S=256, ROWS_MAX_C=32, FIN_BLOCK=32, FIN_BLOCK_K=64, MIN_PROGRAMS=512)
# Small sizes for tests under the interpreter (they set RUN = SMALL): several tile steps and several
# finalize tiles, and split positions, on tiny shapes.
SMALL = Sizes(TILE=32, MIN_S=4, MAX_S=16, ROWS_MAX_C=8, FIN_BLOCK=4, FIN_BLOCK_K=2, MIN_PROGRAMS=16)
# The sizes the launchers and launch_plan use (read at call time): the GPU's, also under the interpreter.
RUN = GPU


def backward_tile(C: int, S: int, cl: bool, elem: int = 4, sizes: Optional[Sizes] = None) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S) of multistep_bwd_kernel for `elem`-byte activations. Planes (channel-first,
    S > 1): BLOCK_S covers a channel's S positions (a power of two in [MIN_S, MAX_S]), BLOCK_C the rest
    of the tile; rows (channels-last or S == 1): BLOCK_C covers up to ROWS_MAX_C 4-byte channels (as
    many bytes for 2-byte ones: a warp's row request is 128 B), BLOCK_S the rest. Where that leaves
    few (sample, channel tile) programs, position_splits splits the positions instead of narrowing
    the tile (issue 22: (64, 256, 56, 56) bf16 had 512 programs of 64-byte requests)."""
    sizes = RUN if sizes is None else sizes
    if cl or S == 1:
        cap = sizes.ROWS_MAX_C * max(1, 4 // elem)
        block_c = min(max(triton.next_power_of_2(max(C, 1)), 2), cap)
        return block_c, sizes.TILE // block_c
    block_s = min(max(triton.next_power_of_2(S), sizes.MIN_S), sizes.MAX_S)
    block_c = max(min(sizes.TILE // block_s, triton.next_power_of_2(max(C, 1))), 2)
    return block_c, block_s


def position_splits(N: int, C: int, S: int, block_c: int, block_s: int, sizes: Optional[Sizes] = None
                    ) -> tuple[int, int]:
    """(splits, positions per split) of the backward: the S positions of a (sample, channel tile) are
    cut into splits of whole BLOCK_S steps until N x channel tiles x splits reaches MIN_PROGRAMS (a
    shape rule, never the SM count: the partial sums, merged in a fixed order, are the same on every
    GPU). One split of all S positions when the programs are already enough."""
    sizes = RUN if sizes is None else sizes
    steps = triton.cdiv(max(S, 1), block_s)
    programs = max(N * triton.cdiv(C, block_c), 1)
    want = min(steps, triton.cdiv(sizes.MIN_PROGRAMS, programs))
    per = triton.cdiv(steps, max(want, 1)) * block_s
    return triton.cdiv(max(S, 1), per), per


def backward_plan(N: int, C: int, S: int, cl: bool, elem: int, sizes: Optional[Sizes] = None) -> dict:
    """The backward's split for the launcher and launch_plan: tile (BLOCK_C, BLOCK_S), splits and
    positions per split, programs (the grid)."""
    block_c, block_s = backward_tile(C, S, cl, elem, sizes)
    splits, per = position_splits(N, C, S, block_c, block_s, sizes)
    return dict(BLOCK_C=block_c, BLOCK_S=block_s, splits=splits, per=per,
                programs=splits * N * triton.cdiv(C, block_c))


def finalize_plan(N: int, C: int, sizes: Optional[Sizes] = None) -> dict:
    """Programs of multistep_finalize_kernel: ctiles channel tiles (ddt, dk shares) then ntiles sample
    tiles (dkeep); its BLOCK and BLOCK_K."""
    sizes = RUN if sizes is None else sizes
    return dict(ctiles=triton.cdiv(C, sizes.FIN_BLOCK), ntiles=triton.cdiv(N, sizes.FIN_BLOCK),
                BLOCK=sizes.FIN_BLOCK, BLOCK_K=sizes.FIN_BLOCK_K)


def forward_grid(numel: int) -> tuple[int]:
    return (triton.cdiv(numel, FWD_BLOCK),)


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
                         pk_ptr, pf_ptr, N, C, S, sc, ss, PER,
                         HAS_DT: tl.constexpr, HAS_KEEP: tl.constexpr, RELU: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (p·N + n)·cdiv(C, BLOCK_C) + j owns channels [j·BLOCK_C, (j+1)·BLOCK_C) of sample n at
    positions [p·PER, (p+1)·PER) (split p, position_splits), in order; its partial sums go to row
    p·N + n of the (splits·N, C) tables. Everything is flattened onto grid axis 0 (up to 2^31 - 1): on
    axis 1 (at most 65535) the channel tiles stopped launching past C = 131,070."""
    n_tiles = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0).to(tl.int64)
    ns = pid // n_tiles  # p·N + n
    n = ns % N
    s_lo = (ns // N) * PER
    s_hi = tl.minimum(s_lo + PER, S)
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
    for start in range(s_lo, s_hi, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S).to(tl.int64)
        mask = cmask[:, None] & (s < s_hi)[None, :]
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
    tl.store(pk_ptr + ns * C + cols, tl.sum(acc_k, axis=1), mask=cmask)
    tl.store(pf_ptr + ns * C + cols, tl.sum(acc_f, axis=1), mask=cmask)


@triton.jit
def multistep_finalize_kernel(pk_ptr, pf_ptr, dt_ptr, keep_ptr, dkp_ptr, ddt_ptr, dkeep_ptr, N, C, PK_ROWS,
                              HAS_DT: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """Programs j < cdiv(C, BLOCK): channels j*BLOCK..: ddt[c] = Σ_n keep[n]·pf[n, c] and
    dkp[j] = Σ_{r, c in tile} pk[r, c] over the PK_ROWS (splits·N) rows of pk (dk = Σ_j dkp[j], merged by
    _reduce). Programs after them:
    samples (j - cdiv(C, BLOCK))*BLOCK..: dkeep[n] = Σ_c dt[c]·pf[n, c]. Every sum is a fixed-order
    _reduce.chunk_sum (tiles of BLOCK_K, then a tree)."""
    ctiles = tl.cdiv(C, BLOCK)
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    if pid < ctiles:
        cols = pid * BLOCK + lanes
        cm = cols < C
        colk = chunk_sum(pk_ptr, C, PK_ROWS, cols, cm, pk_ptr, pk_ptr, SHIFTED=False, SQUARE=False, WEIGHTED=False,
                         BLOCK_K=BLOCK_K)
        tl.store(dkp_ptr + pid, tl.sum(colk, axis=0))
        if HAS_DT:
            ddt = chunk_sum(pf_ptr, C, N, cols, cm, pf_ptr, keep_ptr, SHIFTED=False, SQUARE=False, WEIGHTED=HAS_KEEP,
                            BLOCK_K=BLOCK_K)
            tl.store(ddt_ptr + cols, ddt, mask=cm)
    else:
        if HAS_KEEP:
            rows = (pid - ctiles) * BLOCK + lanes
            rm = rows < N
            dkeep = chunk_sum(pf_ptr, 1, C, rows * C, rm, pf_ptr, dt_ptr, SHIFTED=False, SQUARE=False,
                              WEIGHTED=HAS_DT, BLOCK_K=BLOCK_K)
            tl.store(dkeep_ptr + rows, dkeep, mask=rm)


def _shape(t: torch.Tensor, cl: bool) -> tuple[int, int, int, bool]:
    """(N, C, S, channels_last) of the per-sample blocks (see csrc/multistep_update_layout.h)."""
    n, c = t.shape[0], t.shape[1]
    s = t.numel() // (n * c) if n * c else 0
    return n, c, s, cl and t.dim() > 2


def launch_plan(u, u_prev, f, k, dt, keep, relu, sms: int = 132) -> list[dict]:
    """Launches of the forward and the backward for these forward arguments (meta tensors are fine),
    from forward_grid, backward_plan and finalize_plan, as the launchers."""
    N, C, S, cl = _shape(u, is_channels_last_like(u))
    numel, elem, acc = u.numel(), u.element_size(), k.element_size()
    plan, splits = [], 1
    if numel:
        plan.append(_launch.launch("multistep_fwd_kernel", "forward", forward_grid(numel), 4,
                                   bytes=4 * numel * elem + (C + N + 1) * acc, chain=1,
                                   request_bytes=_launch.request_bytes(FWD_BLOCK, elem), smem=0))
        bp = backward_plan(N, C, S, cl, elem)
        block_c, block_s, splits = bp["BLOCK_C"], bp["BLOCK_S"], bp["splits"]
        rows = cl or S == 1  # lanes along c (contiguous, rows S·... apart) or along s (channels S apart)
        request = (_launch.tile_request_bytes(block_c, min(C, block_c), elem, rows_adjacent=C <= block_c) if rows
                   else _launch.tile_request_bytes(block_s, min(S, block_s), elem, rows_adjacent=S <= block_s))
        plan.append(_launch.launch("multistep_bwd_kernel", "backward", (bp["programs"],), 4,
                                   bytes=(8 if relu else 7) * numel * elem + (2 * splits * N * C + C + N + 1) * acc,
                                   chain=1 + log2(block_s),  # streaming loop, then the tree over BLOCK_S
                                   request_bytes=request, smem=2 * _launch.reduce_smem(block_c, 4, acc)))
        if splits > 1:  # the splits' pf partials: a (splits, N·C) table
            plan.append(_reduce.merge_launch("backward", splits, N * C, acc))
    fin = finalize_plan(N, C)
    if fin["ctiles"] + fin["ntiles"]:
        steps = max(triton.cdiv(splits * N, fin["BLOCK_K"]), triton.cdiv(C, fin["BLOCK_K"]))
        plan.append(_launch.launch("multistep_finalize_kernel", "backward", (fin["ctiles"] + fin["ntiles"],), 4,
                                   bytes=((2 + splits) * N * C + 2 * (N + C) + fin["ctiles"]) * acc,
                                   chain=steps + log2(fin["BLOCK_K"]) + log2(fin["BLOCK"]),
                                   request_bytes=_launch.request_bytes(min(C, fin["BLOCK"]), acc),
                                   smem=_launch.reduce_smem(fin["BLOCK"], 4, acc)))
        plan.append(_reduce.merge_launch("backward", fin["ctiles"], 1, acc))
    return plan


@triton_forward("multistep_update")
def multistep_update_triton(u: torch.Tensor, u_prev: torch.Tensor, f: torch.Tensor, k: torch.Tensor,
                            dt: Optional[torch.Tensor], keep: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    cl = is_channels_last_like(u)
    u, u_prev, f = (to_layout(t, cl) for t in (u, u_prev, f))
    out = torch.empty_like(u)
    N, C, S, cl = _shape(u, cl)
    if u.numel():
        multistep_fwd_kernel[forward_grid(u.numel())](
            u, u_prev, f, k, k if dt is None else dt.contiguous(), k if keep is None else keep.contiguous(), out,
            u.numel(), C, 1 if cl else S, C * S, HAS_DT=dt is not None, HAS_KEEP=keep is not None, RELU=relu,
            BLOCK=FWD_BLOCK, INDEX_64=_launch.index_64(u.numel(), FWD_BLOCK))
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
    flags = dict(HAS_DT=dt is not None, HAS_KEEP=keep is not None)
    pf = k.new_empty(N * C)
    if u.numel():
        bp = backward_plan(N, C, S, cl, u.element_size())
        splits = bp["splits"]
        pk = k.new_empty(splits * N * C)
        pfs = pf if splits == 1 else k.new_empty(splits * N * C)  # the splits' pf partials, merged below
        multistep_bwd_kernel[(bp["programs"],)](
            g, u, u_prev, f, o, k, k if dt is None else dt, k if keep is None else keep, du, dp, df, pk, pfs,
            N, C, S, 1 if cl else S, C if cl else 1, bp["per"], RELU=relu, BLOCK_C=bp["BLOCK_C"],
            BLOCK_S=bp["BLOCK_S"], **flags)
        if splits > 1:
            _reduce.sum_chunks(pfs.view(splits, N * C), pf)
    else:
        splits = 1
        pk = k.new_zeros(N * C)
        pf.zero_()
    fin = finalize_plan(N, C)
    if fin["ctiles"] + fin["ntiles"]:
        dkp = k.new_empty(fin["ctiles"], 1)  # each channel tile's share of dk
        multistep_finalize_kernel[(fin["ctiles"] + fin["ntiles"],)](
            pk, pf, k if dt is None else dt, k if keep is None else keep, dkp, k if dt is None else ddt,
            k if keep is None else dkeep, N, C, splits * N, BLOCK=fin["BLOCK"], BLOCK_K=fin["BLOCK_K"], **flags)
        _reduce.sum_chunks(dkp, dk)
    else:  # N = C = 0: nothing to sum
        dk.zero_()
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
    sig.update({"pk_ptr": "*fp32", "pf_ptr": "*fp32", "N": "i64", "C": "i64", "S": "i64", "sc": "i64", "ss": "i64",
                "PER": "i64",
                "HAS_DT": "constexpr", "HAS_KEEP": "constexpr", "RELU": "constexpr", "BLOCK_C": "constexpr",
                "BLOCK_S": "constexpr"})
    return sig


_FIN_SIG = {"pk_ptr": "*fp32", "pf_ptr": "*fp32", "dt_ptr": "*fp32", "keep_ptr": "*fp32", "dkp_ptr": "*fp32",
            "ddt_ptr": "*fp32", "dkeep_ptr": "*fp32", "N": "i64", "C": "i64", "PK_ROWS": "i64",
            "HAS_DT": "constexpr", "HAS_KEEP": "constexpr", "BLOCK": "constexpr", "BLOCK_K": "constexpr"}

# Every backward tile backward_tile can pick on a GPU: planes for S = 2 .. 256 and beyond, rows for
# C = 2 .. 32 and beyond.
_PLANES_TILES = sorted({backward_tile(4096, 2**e, False, 4, GPU) for e in range(1, 10)})
_ROWS_TILES = sorted({backward_tile(2**e, 1, True, elem, GPU) for e in range(1, 8) for elem in (2, 4)})
# the tiles at the largest S and C (the fixed tiles before issue 22)
GPU_PLANES_TILE = backward_tile(2, GPU.MAX_S, False, 4, GPU)
GPU_ROWS_TILE = backward_tile(GPU.ROWS_MAX_C, 1, True, 4, GPU)
PLANES_TILE, ROWS_TILE = GPU_PLANES_TILE, GPU_ROWS_TILE
_WORST = ("bf16", True, True, True)  # every tile in this flag set; the two largest-S / widest tiles in all

# Ahead-of-time compile configurations (triton_kernels/aot.py): every activation dtype and ReLU
# setting with dt and keep given (the LM-ResNet training case), plus fp32 without either; the
# backward's tiles (the launcher's GPU sizes).
_FLAG_SETS = ([(dtype, relu, True, True) for dtype in ("fp32", "fp16", "bf16") for relu in (False, True)]
              + [("fp32", False, False, False)])
AOT_CONFIGS = [
    cfg
    for dtype, relu, has_dt, has_keep in _FLAG_SETS
    for cfg in [
        dict(kernel=multistep_fwd_kernel,
             name=f"multistep_fwd_{dtype}_relu{int(relu)}_dt{int(has_dt)}_keep{int(has_keep)}",
             signature=_fwd_sig(dtype),
             constexprs={"HAS_DT": has_dt, "HAS_KEEP": has_keep, "RELU": relu, "BLOCK": FWD_BLOCK, "INDEX_64": True}),
    ] + [
        dict(kernel=multistep_bwd_kernel,
             name=f"multistep_bwd_{tile_name}_{dtype}_relu{int(relu)}_dt{int(has_dt)}_keep{int(has_keep)}",
             signature=_bwd_sig(dtype),
             constexprs={"HAS_DT": has_dt, "HAS_KEEP": has_keep, "RELU": relu, "BLOCK_C": tile[0], "BLOCK_S": tile[1]})
        for tile_name, tile in (("planes", GPU_PLANES_TILE), ("rows", GPU_ROWS_TILE))
    ]
] + [
    dict(kernel=multistep_bwd_kernel, name=f"multistep_bwd_{tile_name}{tile[0]}x{tile[1]}_{_WORST[0]}_relu1_dt1_keep1",
         signature=_bwd_sig(_WORST[0]),
         constexprs={"HAS_DT": True, "HAS_KEEP": True, "RELU": True, "BLOCK_C": tile[0], "BLOCK_S": tile[1]})
    for tile_name, tiles, known in (("planes", _PLANES_TILES, GPU_PLANES_TILE), ("rows", _ROWS_TILES, GPU_ROWS_TILE))
    for tile in tiles if tile != known
] + [
    dict(kernel=multistep_finalize_kernel, name=f"multistep_finalize_dt{int(f)}_keep{int(f)}", signature=_FIN_SIG,
         constexprs={"HAS_DT": f, "HAS_KEEP": f, "BLOCK": GPU.FIN_BLOCK, "BLOCK_K": GPU.FIN_BLOCK_K})
    for f in (True, False)
]
