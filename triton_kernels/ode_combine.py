"""Triton kernels of the fused ODE stage combination ``z + sum_i c[i] * k_i`` (docs/ode.md).

The op is elementwise with one coefficient per stage: every tensor is read flat in z's layout
(tsc_kernels/ops/_layout.py). Stage pointers are kernel arguments (k0..k7; unused ones repeat z and
are never read: NUM_STAGES is a constexpr), so a call copies no pointer table to the device, and
the coefficients are read from a small device tensor, so a new step size needs no recompilation.
  forward   1 launch: reads z and the stages, writes out
  backward  2 launches: every dk_i = c_i * g and per-program partial sums of g * k_i over a grid
            that depends on numel only, then _reduce's fixed-order merge of the (programs, stages)
            partials (a tile tree, 37 dependent steps for 1024 programs): dc is deterministic
`launch_plan` is built from the same forward_grid / backward_programs as the launchers.
"""
from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from tsc_kernels.ops._layout import is_channels_last_like, to_layout
from tsc_kernels.ops import ode_combine as _declaration  # noqa: F401  (declares the op first)
from tsc_kernels.ops.registry import triton_backward, triton_forward

from . import _launch, _reduce

MAX_STAGES = 8  # csrc/ode_combine_math.h kOdeMaxStages
FWD_BLOCK = 1024
BWD_BLOCK = 1024
BWD_MAX_PROGRAMS = 1024


@triton.jit
def _term(o, k_ptr, c_ptr, j: tl.constexpr, offs, mask):
    k = tl.load(k_ptr + offs, mask=mask, other=0.0).to(o.dtype)
    return o + tl.load(c_ptr + j) * k


@triton.jit
def ode_combine_fwd_kernel(z_ptr, k0, k1, k2, k3, k4, k5, k6, k7, c_ptr, out_ptr, numel,
                           NUM_STAGES: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    o = tl.load(z_ptr + offs, mask=mask, other=0.0).to(c_ptr.dtype.element_ty)
    o = _term(o, k0, c_ptr, 0, offs, mask)
    if NUM_STAGES > 1:
        o = _term(o, k1, c_ptr, 1, offs, mask)
    if NUM_STAGES > 2:
        o = _term(o, k2, c_ptr, 2, offs, mask)
    if NUM_STAGES > 3:
        o = _term(o, k3, c_ptr, 3, offs, mask)
    if NUM_STAGES > 4:
        o = _term(o, k4, c_ptr, 4, offs, mask)
    if NUM_STAGES > 5:
        o = _term(o, k5, c_ptr, 5, offs, mask)
    if NUM_STAGES > 6:
        o = _term(o, k6, c_ptr, 6, offs, mask)
    if NUM_STAGES > 7:
        o = _term(o, k7, c_ptr, 7, offs, mask)
    tl.store(out_ptr + offs, o.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _stage_grad(g, k_ptr, d_ptr, c_ptr, j: tl.constexpr, offs, mask, acc):
    """dk_j = c_j * g; returns acc + g * k_j."""
    tl.store(d_ptr + offs, (tl.load(c_ptr + j) * g).to(d_ptr.dtype.element_ty), mask=mask)
    return acc + g * tl.load(k_ptr + offs, mask=mask, other=0.0).to(g.dtype)


@triton.jit
def ode_combine_bwd_kernel(g_ptr, k0, k1, k2, k3, k4, k5, k6, k7, d0, d1, d2, d3, d4, d5, d6, d7,
                           c_ptr, partial_ptr, numel, NUM_STAGES: tl.constexpr, BLOCK: tl.constexpr):
    """Program p visits tiles p, p + P, ...; writes partial[p, j] = its sum of g * k_j."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc_ty = c_ptr.dtype.element_ty
    a0 = tl.zeros([BLOCK], dtype=acc_ty)
    a1 = tl.zeros([BLOCK], dtype=acc_ty)
    a2 = tl.zeros([BLOCK], dtype=acc_ty)
    a3 = tl.zeros([BLOCK], dtype=acc_ty)
    a4 = tl.zeros([BLOCK], dtype=acc_ty)
    a5 = tl.zeros([BLOCK], dtype=acc_ty)
    a6 = tl.zeros([BLOCK], dtype=acc_ty)
    a7 = tl.zeros([BLOCK], dtype=acc_ty)
    for start in range(pid.to(tl.int64) * BLOCK, numel, nprog * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        a0 = _stage_grad(g, k0, d0, c_ptr, 0, offs, mask, a0)
        if NUM_STAGES > 1:
            a1 = _stage_grad(g, k1, d1, c_ptr, 1, offs, mask, a1)
        if NUM_STAGES > 2:
            a2 = _stage_grad(g, k2, d2, c_ptr, 2, offs, mask, a2)
        if NUM_STAGES > 3:
            a3 = _stage_grad(g, k3, d3, c_ptr, 3, offs, mask, a3)
        if NUM_STAGES > 4:
            a4 = _stage_grad(g, k4, d4, c_ptr, 4, offs, mask, a4)
        if NUM_STAGES > 5:
            a5 = _stage_grad(g, k5, d5, c_ptr, 5, offs, mask, a5)
        if NUM_STAGES > 6:
            a6 = _stage_grad(g, k6, d6, c_ptr, 6, offs, mask, a6)
        if NUM_STAGES > 7:
            a7 = _stage_grad(g, k7, d7, c_ptr, 7, offs, mask, a7)
    row = partial_ptr + pid * NUM_STAGES
    tl.store(row + 0, tl.sum(a0, axis=0))
    if NUM_STAGES > 1:
        tl.store(row + 1, tl.sum(a1, axis=0))
    if NUM_STAGES > 2:
        tl.store(row + 2, tl.sum(a2, axis=0))
    if NUM_STAGES > 3:
        tl.store(row + 3, tl.sum(a3, axis=0))
    if NUM_STAGES > 4:
        tl.store(row + 4, tl.sum(a4, axis=0))
    if NUM_STAGES > 5:
        tl.store(row + 5, tl.sum(a5, axis=0))
    if NUM_STAGES > 6:
        tl.store(row + 6, tl.sum(a6, axis=0))
    if NUM_STAGES > 7:
        tl.store(row + 7, tl.sum(a7, axis=0))


def _check(op: str, z: torch.Tensor, stages: List[torch.Tensor], coeffs: torch.Tensor) -> None:
    if not 1 <= len(stages) <= MAX_STAGES:
        raise ValueError(f"{op}: stages must hold 1 to {MAX_STAGES} tensors, got {len(stages)}")
    for j, k in enumerate(stages):
        if k.shape != z.shape or k.dtype != z.dtype or k.device != z.device:
            raise ValueError(f"{op}: stages[{j}] must have shape {tuple(z.shape)}, dtype {z.dtype} "
                             f"and device {z.device}")
    if coeffs.shape != (len(stages),):
        raise ValueError(f"{op}: coeffs must have shape ({len(stages)},), got {tuple(coeffs.shape)}")


def _pad(ptrs: list, filler: torch.Tensor) -> list:
    return list(ptrs) + [filler] * (MAX_STAGES - len(ptrs))


def forward_grid(numel: int) -> tuple[int]:
    return (triton.cdiv(numel, FWD_BLOCK),)


def backward_programs(numel: int) -> int:
    """Programs of ode_combine_bwd_kernel (a function of numel only: the partials' order is fixed)."""
    return min(triton.cdiv(numel, BWD_BLOCK), BWD_MAX_PROGRAMS)


def launch_plan(z, stages, coeffs, sms: int = 132) -> list[dict]:
    """Launches of the forward and the backward for these forward arguments (meta tensors are fine)."""
    numel, elem, acc, s = z.numel(), z.element_size(), coeffs.element_size(), len(stages)
    if numel == 0:
        return []
    request = _launch.request_bytes(FWD_BLOCK, elem)
    programs = backward_programs(numel)
    return [
        _launch.launch("ode_combine_fwd_kernel", "forward", forward_grid(numel), 4,
                       bytes=(s + 2) * numel * elem + s * acc, chain=1, request_bytes=request, smem=0),
        _launch.launch("ode_combine_bwd_kernel", "backward", (programs,), 4,
                       bytes=(2 * s + 1) * numel * elem + (programs + 1) * s * acc, chain=1 + _reduce.log2(BWD_BLOCK),
                       request_bytes=request, smem=_launch.reduce_smem(1, 4, acc)),
        _reduce.merge_launch("backward", programs, s, acc),
    ]


@triton_forward("ode_combine")
def ode_combine_triton(z: torch.Tensor, stages: List[torch.Tensor], coeffs: torch.Tensor) -> torch.Tensor:
    _check("tsc::ode_combine_triton", z, stages, coeffs)
    cl = is_channels_last_like(z)
    z = to_layout(z, cl)
    ks = [to_layout(k, cl) for k in stages]
    out = torch.empty_like(z)
    if z.numel():
        ode_combine_fwd_kernel[forward_grid(z.numel())](
            z, *_pad(ks, z), coeffs.contiguous(), out, z.numel(), NUM_STAGES=len(ks), BLOCK=FWD_BLOCK)
    return out


@triton_backward("ode_combine")
def ode_combine_backward_triton(grad: torch.Tensor, stages: List[torch.Tensor], coeffs: torch.Tensor
                                ) -> tuple[List[torch.Tensor], torch.Tensor]:
    _check("tsc::ode_combine_backward_triton", grad, stages, coeffs)
    cl = is_channels_last_like(grad)
    g = to_layout(grad, cl)
    ks = [to_layout(k, cl) for k in stages]
    dks = [torch.empty_like(g) for _ in ks]
    if g.numel() == 0:
        return dks, torch.zeros_like(coeffs)
    programs = backward_programs(g.numel())
    partial = torch.empty((programs, len(ks)), dtype=coeffs.dtype, device=g.device)
    ode_combine_bwd_kernel[(programs,)](g, *_pad(ks, g), *_pad(dks, g), coeffs.contiguous(), partial, g.numel(),
                                        NUM_STAGES=len(ks), BLOCK=BWD_BLOCK)
    dc = torch.empty(coeffs.shape, dtype=coeffs.dtype, device=coeffs.device)
    _reduce.sum_chunks(partial, dc)
    return dks, dc


# Ahead-of-time compile configurations (triton_kernels/aot.py): each activation dtype with 1
# (Euler, RK stage inputs), 4 (RK4) and 8 (the most) stages, the launchers' block sizes.
def _ptrs(prefix: str, dtype: str) -> dict:
    return {f"{prefix}{j}": f"*{dtype}" for j in range(MAX_STAGES)}


AOT_CONFIGS = [
    cfg
    for dtype in ("fp32", "fp16", "bf16")
    for stages in (1, 4, 8)
    for cfg in (
        dict(kernel=ode_combine_fwd_kernel, name=f"ode_combine_fwd_{dtype}_s{stages}",
             signature={"z_ptr": f"*{dtype}", **_ptrs("k", dtype), "c_ptr": "*fp32", "out_ptr": f"*{dtype}",
                        "numel": "i64", "NUM_STAGES": "constexpr", "BLOCK": "constexpr"},
             constexprs={"NUM_STAGES": stages, "BLOCK": FWD_BLOCK}),
        dict(kernel=ode_combine_bwd_kernel, name=f"ode_combine_bwd_{dtype}_s{stages}",
             signature={"g_ptr": f"*{dtype}", **_ptrs("k", dtype), **_ptrs("d", dtype), "c_ptr": "*fp32",
                        "partial_ptr": "*fp32", "numel": "i64", "NUM_STAGES": "constexpr", "BLOCK": "constexpr"},
             constexprs={"NUM_STAGES": stages, "BLOCK": BWD_BLOCK}),
    )
]
