"""Launch helpers shared by every Triton op of tsc_kernels (docs/gpu.md).

Triton launches a kernel on ``torch.cuda.current_device()`` and that device's current stream, not
on the device of its arguments. Tensors on cuda:1 launched while cuda:0 is current would run on
GPU 0's stream with GPU 1 pointers: an illegal address or a race with GPU 1's stream. So every
launcher runs inside :func:`on_device` (the Python twin of the C++ ops' CUDAGuard), after
:func:`check_same_device`: the registry's triton_forward / triton_backward wrap each launcher in
both (tsc_kernels/ops/registry.py, on_tensors_device).

Device tables (per-weight or per-stage rows of sizes and data pointers, which a Triton kernel
cannot take by value) come from :class:`DeviceTableCache`. Building them with
``torch.tensor(rows, device="cuda")`` on every call is a synchronous copy from pageable memory:
a stream sync per training step, and an error under CUDA-graph capture. The cache builds a table
once per distinct content (the data pointers and sizes), copying it from pinned memory with
``non_blocking=True``, and hands back the same device tensor while the content is unchanged.

CUDA-graph replay correctness: a captured graph bakes in the device address of the table and the
addresses written in it. (1) Parameters and their buffers have fixed addresses for the lifetime of
the model, and the graph's own allocations (outputs, gradient buffers) come from the graph's private
pool at fixed addresses on every replay, so the table's content stays right for every replay.
(2) The table itself must stay allocated and unchanged while the graph lives: entries created
while the current stream is capturing are therefore never evicted (nor are their pinned source
buffers, which a captured host-to-device copy reads again at every replay). Entries created
eagerly are evicted least-recently-used beyond ``capacity``; a graph captured after an eager
warm-up that hit such an entry keeps it alive because the cache marks every entry used during a
capture as permanent too. The cost is a few hundred bytes per distinct table.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Iterable, Sequence

import torch


def index_64(numel: int, block: int) -> bool:
    """The INDEX_64 constexpr of the per-element kernels: whether their flat indices (which reach
    numel + block - 1) need int64. Below that (every activation of a CIFAR or ImageNet CNN) they are
    int32, and so are the per-element divisions that find an element's channel: a 64-bit division
    is a long software routine on NVIDIA GPUs, a 32-bit one a few instructions."""
    return numel + block > 2**31 - 1


def on_device(t: torch.Tensor):
    """Context in which a Triton launch for tensors on t's device runs on that device (and its
    current stream): ``torch.cuda.device(t.device)`` for CUDA tensors, nothing otherwise (CPU
    tensors under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_same_device(op: str, like: torch.Tensor, **tensors) -> None:
    """ValueError naming the first argument (keyword name) not on like's device: a kernel must
    never receive a pointer into another device's memory. None values are skipped; a list value
    is checked element by element (name[i])."""
    for name, t in tensors.items():
        items = enumerate(t) if isinstance(t, (list, tuple)) else [(None, t)]
        for i, x in items:
            if x is not None and x.device != like.device:
                label = name if i is None else f"{name}[{i}]"
                raise ValueError(f"{op}: {label} must be on {like.device}, got {x.device}")


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class DeviceTableCache:
    """int64 device tables keyed by their content (see the module docstring for the graph rules)."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._entries: OrderedDict = OrderedDict()  # key -> (device table, pinned host copy or None)
        self._permanent: set = set()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, rows: Sequence[Iterable[int]], ncols: int, device: torch.device) -> torch.Tensor:
        """The (len(rows), ncols) int64 table on `device` holding `rows`."""
        flat = tuple(int(v) for row in rows for v in row)
        if len(flat) != len(rows) * ncols:
            raise ValueError(f"DeviceTableCache: every row must have {ncols} values")
        key = (device, ncols, flat)
        entry = self._entries.get(key)
        if entry is None:
            host = torch.tensor(flat, dtype=torch.int64).reshape(len(rows), ncols)
            if device.type == "cuda":
                # Pinned source + non_blocking: an asynchronous copy on the current stream (no sync).
                # The pinned buffer stays referenced by the entry, so it is never reused while the
                # copy (or a captured copy node, at every replay) may still read it.
                host = host.pin_memory()
                entry = (host.to(device, non_blocking=True), host)
            else:
                entry = (host, None)
            self._entries[key] = entry
        else:
            self._entries.move_to_end(key)
        if _capturing(device):
            self._permanent.add(key)
        self._evict()
        return entry[0]

    def _evict(self) -> None:
        while len(self._entries) > self.capacity:
            for key in self._entries:
                if key not in self._permanent:
                    del self._entries[key]
                    break
            else:
                return  # everything left is referenced by a captured graph


# ---------------------------------------------------------------------------------------------
# Launch plans (tsc_kernels/_launch_plan.py; fields in docs/gpu.md): each op module's
# `launch_plan(*forward_args, sms)` builds its launches from the same planning function its
# launchers call, with these helpers for the fields that are estimates.
# ---------------------------------------------------------------------------------------------
WARP = 32
# Triton's coalescing pass gives a thread at most 16 contiguous bytes per load instruction, so one
# warp's load covers at most 32 x 16 = 512 contiguous bytes.
MAX_WARP_REQUEST = WARP * 16


def request_bytes(run: int, elem: int) -> int:
    """Contiguous bytes one warp's main load covers when its lanes walk `run` adjacent elements of
    `elem` bytes (run = 1: lanes a stride apart, one element each)."""
    return max(elem, min(run * elem, MAX_WARP_REQUEST))


def reduce_smem(outputs: int, warps: int, elem: int) -> int:
    """Shared memory of a tl.sum whose values span the warps (the one estimate of every Triton plan):
    Triton combines the warps' partials through a scratch buffer of one slot per (output, warp);
    0 for a single warp. `outputs` = values the reduction yields (1 for a full sum)."""
    return outputs * warps * elem if warps > 1 else 0


def launch(kernel: str, phase: str, grid, warps: int, *, bytes: int, chain: int, request_bytes: int,
           smem: int) -> dict:
    """One launch-plan entry: grid padded to 3 dimensions, threads = num_warps * 32."""
    g = tuple(int(x) for x in grid) + (1,) * (3 - len(grid))
    return dict(kernel=kernel, phase=phase, grid=g, threads=warps * WARP, bytes=int(bytes), chain=int(chain),
                request_bytes=int(request_bytes), smem=int(smem))


def tile_request_bytes(block_cols: int, valid_cols: int, elem: int, rows_adjacent: bool) -> int:
    """request_bytes of a 2-D tile load whose columns are contiguous in memory: Triton spreads a warp
    over ceil(32 / lanes per row) rows of the tile, each lane holding up to 16 contiguous bytes. When
    the rows follow each other in memory (row stride == valid_cols), the warp's rows form one run."""
    vec = max(1, min(16 // elem, block_cols))
    lanes_per_row = max(1, min(WARP, block_cols // vec))
    rows_per_warp = WARP // lanes_per_row
    run = valid_cols * rows_per_warp if rows_adjacent else min(valid_cols, lanes_per_row * vec)
    return request_bytes(run, elem)
