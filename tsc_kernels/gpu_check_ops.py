"""gpu-check's op table (step ``ops``, docs/gpu.md): every op of the registry x {contiguous,
channels_last} x {fp32, bf16} (where the op has them: tsc_kernels/gpu_check_cases.py), forward and
forward+backward through the op's autograd formula, on each fused backend, against a ``copy_`` of
the op's minimum bytes, in one table. A row whose forward+backward runs below TARGET of the copy's
bandwidth is flagged LOW and fails the step; so does a row that raised.

Timing: one warm-up call (JIT compiles, allocator), then REPS calls between two CUDA events. The
host's time to issue those calls is measured too: when it is as long as the GPU's, the GPU waited
for the host, the row measures launch overhead rather than the kernels and is marked host-bound
(small ops: ResNet-50's weight means are ~40 MB, ~15 µs of copy_) instead of LOW.
On the CPU (the tests) the same code times with perf_counter and never touches torch.cuda.
"""
from __future__ import annotations

import importlib
import time
from typing import Callable

import torch

from .gpu_check_cases import NO_LAYOUT, OpCase, case_of
from .ops.registry import OPS

TARGET = 0.70  # issue 22: flag anything below 70 % of copy_ bandwidth
HOST_BOUND = 0.9  # host issue time >= 90 % of the GPU time: the GPU was (nearly) idle waiting for launches
REPS = 10
FLAGS = {
    "LOW": f"forward+backward below {TARGET:.0%} of copy_ bandwidth (fails the step)",
    "ERROR": "the row raised (fails the step)",
    "host-bound": "the GPU waited for the host's launches: the kernels' bandwidth is not what was timed",
    "n/m": ("not meaningful: a recurrence over the blocks, latency-bound, not limited by its bytes "
            "(timed for reference)"),
}


def backend_op(name: str, backend: str):
    """The op packet that runs `name` on `backend` ("cpu" and "cuda": the C++ op, "triton": the Triton op)."""
    op = OPS[name]
    if backend == "triton":
        importlib.import_module(op.module)  # registers tsc::<name>_triton
        return op.op("_triton")
    if backend in ("cpu", "cuda"):
        return op.op()
    raise ValueError(f"backend must be 'cpu', 'cuda' or 'triton', got {backend!r}")


def time_call(fn: Callable[[], object], device: torch.device, reps: int = REPS) -> tuple[float, bool]:
    """(seconds per call, host_bound) of fn() after one warm-up call."""
    fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps, False
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    host = time.perf_counter() - t0
    end.synchronize()
    gpu = start.elapsed_time(end) / 1e3
    return gpu / reps, host >= HOST_BOUND * gpu


def copy_seconds(nbytes: int, device: torch.device, reps: int = REPS) -> float:
    """Time of a copy_ moving nbytes (it reads and writes nbytes / 2)."""
    src = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return time_call(lambda: dst.copy_(src), device, reps)[0]


def _tensors(args) -> list[torch.Tensor]:
    flat = []
    for a in args:
        flat.extend(a if isinstance(a, (list, tuple)) else [a])
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out  # fused ops also return their saved state


def calls(op, args) -> tuple[Callable, Callable]:
    """(forward, forward+backward) of op(*args); the backward takes a fixed random gradient of the
    output and differentiates every argument that requires grad."""
    leaves = [t for t in _tensors(args) if t.requires_grad]
    grad = torch.randn_like(_first(op(*args)))

    def forward():
        with torch.no_grad():
            op(*args)

    def forward_backward():
        torch.autograd.grad(_first(op(*args)), leaves, grad, allow_unused=True)
    return forward, forward_backward


def flag(row: dict) -> str:
    """The row's flag (FLAGS), "" for a row at or above TARGET."""
    if row.get("error"):
        return "ERROR"
    if not row["meaningful"]:
        return "n/m"
    if row["host_bound"]:
        return "host-bound"
    return "LOW" if row["fraction"] < TARGET else ""


def finish_row(row: dict, fwd_s: float, both_s: float, copy_s: float, host_bound: bool) -> dict:
    """Fill a row's times, fractions of copy_ bandwidth and flag. copy_s: a copy_ of the op's
    forward+backward minimum bytes; the forward's share of it is scaled by its bytes."""
    fwd_copy_s = copy_s * row["fwd_bytes"] / row["min_bytes"] if row["min_bytes"] else 0.0
    row.update(fwd_ms=fwd_s * 1e3, fwd_bwd_ms=both_s * 1e3, copy_ms=copy_s * 1e3, host_bound=host_bound,
               fwd_fraction=fwd_copy_s / fwd_s if fwd_s > 0 else 0.0, fraction=copy_s / both_s if both_s > 0 else 0.0)
    row["flag"] = flag(row)
    return row


def measure_case(name: str, case: OpCase, spec, layout: str, dtype: torch.dtype, backends, device,
                 reps: int = REPS) -> list[dict]:
    """One row per backend for op `name` at (spec, layout, dtype)."""
    base = dict(op=name, shape=case.label(spec), layout=layout, dtype=str(dtype).removeprefix("torch."),
                meaningful=case.bandwidth_meaningful)
    try:
        with torch.device(device):
            args = case.build(spec, dtype, layout == "channels_last")
        fwd_bytes, bwd_bytes = case.min_bytes(args)
        copy_s = copy_seconds(fwd_bytes + bwd_bytes, device, reps)
    except Exception as exc:  # a failing builder is a row that says so, not a lost table
        return [dict(base, backend=be, error=f"building the inputs: {type(exc).__name__}: {exc}"[:400], flag="ERROR")
                for be in backends]
    rows = []
    for be in backends:
        row = dict(base, backend=be, fwd_bytes=fwd_bytes, min_bytes=fwd_bytes + bwd_bytes)
        try:
            forward, both = calls(backend_op(name, be), args)
            fwd_s, _ = time_call(forward, device, reps)
            both_s, host_bound = time_call(both, device, reps)
            rows.append(finish_row(row, fwd_s, both_s, copy_s, host_bound))
        except Exception as exc:  # one failing backend must not hide the other rows
            rows.append(dict(row, error=f"{type(exc).__name__}: {exc}"[:400], flag="ERROR"))
    return rows


def run_table(device, backends, tiny: bool = False, ops=None, reps: int = REPS) -> list[dict]:
    """Every row: the registry's ops (or `ops`) x the case's specs (full or tiny) x layouts x dtypes x backends."""
    device = torch.device(device)
    rows = []
    for name in (ops or list(OPS)):
        try:
            case = case_of(name)
        except KeyError as exc:
            rows.append(dict(op=name, shape="-", layout="-", dtype="-", backend="-", error=str(exc), flag="ERROR"))
            continue
        for spec in (case.tiny if tiny else case.full):
            for layout in case.layouts:
                for dtype in case.dtypes:
                    rows.extend(measure_case(name, case, spec, layout, dtype, backends, device, reps))
    return rows


_HEADER = (f"{'op':<27} {'shape':<28} {'layout':<13} {'dtype':<8} {'backend':<7} {'fwd ms':>8} {'fwd %':>6} "
           f"{'f+b ms':>8} {'f+b %':>6} {'min MB':>8}  flag")


def render(rows: list[dict]) -> list[str]:
    """The table as text lines: times, % of copy_ bandwidth (forward, forward+backward), the
    minimum bytes, the flag; then the legend."""
    lines = [_HEADER]
    for r in rows:
        head = f"{r['op']:<27} {r['shape']:<28} {r['layout']:<13} {r['dtype']:<8} {r['backend']:<7}"
        if r.get("error"):
            lines.append(f"{head} ERROR: {r['error']}")
            continue
        lines.append(f"{head} {r['fwd_ms']:8.3f} {r['fwd_fraction']:6.0%} {r['fwd_bwd_ms']:8.3f} {r['fraction']:6.0%} "
                     f"{r['min_bytes'] / 1e6:8.1f}  {r['flag']}")
    lines.append(f"% = time of a copy_ of the op's minimum bytes / the op's time (100 % = copy_ bandwidth); "
                 f"layout {NO_LAYOUT}: the op's tensors have none")
    lines += [f"{k}: {v}" for k, v in FLAGS.items()]
    return lines


def summary(rows: list[dict]) -> tuple[str, str]:
    """(status, reason) of the ops step: failed when a row is LOW or ERROR."""
    counts = {f: sum(r["flag"] == f for r in rows) for f in FLAGS}
    bad = counts["LOW"] + counts["ERROR"]
    reason = f"{len(rows)} rows: " + ", ".join(f"{n} {f}" for f, n in counts.items() if n)
    summary = reason if bad or any(counts.values()) else f"{len(rows)} rows, none flagged"
    return ("failed" if bad else "passed"), summary
