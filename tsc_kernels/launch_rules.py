"""The rules GPU launch plans are checked against, at every op's real shapes (issue 22; docs/gpu.md).

``cases()`` is the table: every op of the registry at the real shapes its file declares
(``REAL_SHAPES.launch`` in tsc_kernels/ops/<op>.py, see tsc_kernels/ops/_shapes.py): the
activations, concatenations, multistep and ODE stages, conv weights and controllers of real networks
(ResNet-18/50/152 at batch 64 and 256, CIFAR ResNets at batch 128 up to depth 1202, DenseNet-40 k=12
and DenseNet-121 k=32), both layouts, fp32 and bf16, plus a huge channel count and a tensor past
2**31 elements for the grid limits; all tensors on the ``meta`` device, built by the op's own
``example_inputs``. ``violations(op, args, plan)`` lists where a plan breaks the rules.
tests/tooling/test_launch_plans.py asserts none at every case for both GPU backends (``KNOWN_VIOLATIONS``,
strict xfail, lists defects still open: none today); ``make gpu-report`` prints the table.
"""
from __future__ import annotations

import functools
import importlib

import torch
import torchvision

from .convert import convert
from .models import cifar_resnet
from .ops._shapes import FP, Network
from .ops.registry import OPS

SMS = 132  # H100 SXM
MB = 1 << 20
BIG = 8 * MB  # launches moving at least this much must fill the GPU and coalesce
MAX_CHAIN = 64
MAX_SMEM = 48 * 1024
GRID_LIMITS = (2**31 - 1, 65535, 65535)
META = "meta"


def meta_tensor(*shape, dtype=torch.float32, cl=False):
    t = torch.empty(shape, dtype=dtype, device=META)
    if cl and len(shape) == 4:
        t = t.to(memory_format=torch.channels_last)
    return t


@functools.lru_cache(maxsize=None)
def network_tensors(name: str) -> Network:
    """(conv weights the controller reads, stage block counts, controller parameters) of a TSC network, on meta."""
    with torch.device(META):
        if name.startswith("cifar_resnet"):
            model = cifar_resnet(int(name[len("cifar_resnet"):]))
        else:
            model = convert(getattr(torchvision.models, name)())
    ctrl, weights, params, _ = model._controller_tensors()
    blocks = [len(stage._modules) for stage in model.tsc_stages()]
    return Network(weights, blocks, params)


def op_module(op: str):
    """tsc_kernels/ops/<op>.py, where the op is declared with its example_inputs and REAL_SHAPES."""
    return importlib.import_module(f"{__package__}.ops.{op}")


def op_args(op: str, spec, dtype=torch.float32, cl: bool = False) -> tuple:
    """(op, forward arguments on meta) at one spec of the op's REAL_SHAPES (a network op's: a network name)."""
    module = op_module(op)
    if module.REAL_SHAPES.network:
        spec = network_tensors(spec)
    return (op, module.example_inputs(spec, dtype, channels_last=cl, device=META))


# The arguments of the ops the tests build by hand (tests/tooling/test_launch_plans.py, test_cuda_plans.py).
def residual_args(shape, dtype, cl):
    return op_args("residual_update", shape, dtype, cl)


def batch_norm_args(shape, dtype, cl):
    return op_args("batch_norm_residual_update", shape, dtype, cl)


def multistep_args(shape, dtype, cl):
    return op_args("multistep_update", shape, dtype, cl)


def scale_concat_args(x, f, dtype, cl):
    return op_args("scale_concat", (x, f[1]), dtype, cl)


def ode_args(shape, dtype, cl, stages=4):
    return op_args("ode_combine", (shape, stages), dtype, cl)


def weight_mean_args(name, dtype):
    return op_args("weight_mean", name, dtype)


def controller_args(name):
    return op_args("lstm_controller", name)


def cases() -> list[tuple]:
    """(id, op, args) of the table: every op of the registry at its real shapes, both layouts, fp32 and bf16."""
    return list(_iter_cases())


def _iter_cases():
    shapes = {name: op_module(name).REAL_SHAPES for name in OPS}
    for dtype in FP:
        d = str(dtype).split(".")[-1]
        for cl in (False, True):
            lay = "cl" if cl else "nchw"
            for name, real in shapes.items():
                if not real.network and dtype in real.dtypes:
                    for label, spec in real.launch:
                        yield (f"{label}-{lay}-{d}",) + op_args(name, spec, dtype, cl)
    for name, real in shapes.items():  # networks: no layout; the dtype in the id when the op has several
        if real.network:
            for dtype in real.dtypes:
                suffix = f"-{str(dtype).split('.')[-1]}" if len(real.dtypes) > 1 else ""
                for label, spec in real.launch:
                    yield (f"{label}{suffix}",) + op_args(name, spec, dtype)


# Plans that still break a rule, (op, backend, case id) -> why: a defect found before its fix lands goes here
# with its reason. tests/tooling/test_launch_plans.py marks them xfail(strict=True), so a fix fails there until
# its entry is removed; make gpu-report prints them apart from new violations. Empty since issue 22's fixes
# (the 60 shortfalls of session 14: bf16 lanes, short planes, narrow finalizes, weight_mean lanes).
KNOWN_VIOLATIONS: dict[tuple[str, str, str], str] = {}


def _min_request(op: str, args: tuple) -> dict[str, int]:
    """The request size each phase's big launches must reach: 128 bytes, or less where the layout
    itself offers no longer contiguous run. One such case: scale_concat's backward on channels-last
    tensors reads the last k channels of each (Cx + k)-channel row of the gradient, k contiguous
    values (48 bytes for DenseNet-40's k = 12 in fp32); the rows are Cx apart, so no kernel can
    request more at once."""
    need = {"forward": 128, "backward": 128}
    if op == "scale_concat":
        f = args[1]
        if f.dim() > 2 and not f.is_contiguous() and f.movedim(1, -1).is_contiguous():
            need["backward"] = min(128, f.shape[1] * f.element_size())
    return need


def violations(op: str, args: tuple, plan: list[dict]) -> list[str]:
    """The rules' violations of one plan, as readable lines."""
    bad = []
    recurrent = {"forward": 0, "backward": 0}
    longest_stage = max(args[1]) if op == "lstm_controller" else 0
    min_request = _min_request(op, args)
    for launch in plan:
        name = f"{launch['phase']} {launch['kernel']} grid={launch['grid']}"
        grid = launch["grid"]
        if any(g < 1 for g in grid) or any(g > lim for g, lim in zip(grid, GRID_LIMITS)):
            bad.append(f"{name}: grid outside CUDA's limits {GRID_LIMITS}")
        blocks = grid[0] * grid[1] * grid[2]
        if launch["bytes"] >= BIG and blocks < 2 * SMS:
            bad.append(f"{name}: moves {launch['bytes'] / MB:.1f} MB with {blocks} blocks (< 2*{SMS})")
        if launch["bytes"] >= BIG and launch["request_bytes"] < min_request[launch["phase"]]:
            bad.append(f"{name}: moves {launch['bytes'] / MB:.1f} MB in {launch['request_bytes']}-byte requests"
                       f" (< {min_request[launch['phase']]})")
        if launch["smem"] > MAX_SMEM:
            bad.append(f"{name}: {launch['smem']} B of shared memory (> 48 KB)")
        if launch["chain"] > MAX_CHAIN:
            # The one inherent exception: the LSTM recurrence over the blocks of a stage is sequential
            # (its chain is the longest stage's block count: 200 for CIFAR-1202). Only the recurrent
            # cell may sit in such a launch, one per phase; the products that do not depend on the
            # recurrence (fc_in, the gates' input half, fc_out, their gradients) are launches of their own.
            if op == "lstm_controller" and launch["chain"] <= longest_stage:
                recurrent[launch["phase"]] += 1
            else:
                bad.append(f"{name}: chain {launch['chain']} (> {MAX_CHAIN})")
    bad += [f"{phase}: {n} launches with the recurrence's chain (only the recurrent cell may have it)"
            for phase, n in recurrent.items() if n > 1]
    return bad
