"""The real shapes and the rules GPU launch plans are checked against (issue 22; docs/gpu.md).

``cases()`` is the table: every op at the activations, concatenations, multistep and ODE stages,
conv weights and controllers of real networks (ResNet-18/50/152 at batch 64 and 256, CIFAR ResNets
at batch 128 up to depth 1202, DenseNet-40 k=12 and DenseNet-121 k=32), both layouts, fp32 and
bf16, plus a huge channel count and a tensor past 2**31 elements for the grid limits; all tensors on
the ``meta`` device. ``violations(op, args, plan)`` lists where a plan breaks the rules.
tests/test_launch_plans.py asserts none at every case for both GPU backends; ``make gpu-report``
prints the table.
"""
from __future__ import annotations

import functools

import torch
import torchvision

from .convert import convert
from .models import cifar_resnet

SMS = 132  # H100 SXM
MB = 1 << 20
BIG = 8 * MB  # launches moving at least this much must fill the GPU and coalesce
MAX_CHAIN = 64
MAX_SMEM = 48 * 1024
GRID_LIMITS = (2**31 - 1, 65535, 65535)
FP = (torch.float32, torch.bfloat16)
META = "meta"


def meta_tensor(*shape, dtype=torch.float32, cl=False):
    t = torch.empty(shape, dtype=dtype, device=META)
    if cl and len(shape) == 4:
        t = t.to(memory_format=torch.channels_last)
    return t


# (label, shape): ResNet-50 at batch 64 and 256, ResNet-18 and 50's first stage, CIFAR at batch 128
ACTIVATIONS = [
    ("resnet50-stage1", (64, 256, 56, 56)),
    ("resnet50-stage4-b256", (256, 2048, 7, 7)),
    ("resnet18-stage1", (64, 64, 56, 56)),
    ("cifar-stage1", (128, 16, 32, 32)),
    ("cifar-stage3", (128, 64, 8, 8)),
]
# DenseNet concatenations (x, f): DenseNet-40 k=12's last layer of a block; DenseNet-121 k=32's first and last block
CONCATS = [
    ("densenet40-k12", (64, 148, 32, 32), (64, 12, 32, 32)),
    ("densenet121-k32-block1", (64, 224, 56, 56), (64, 32, 56, 56)),
    ("densenet121-k32-block4", (64, 992, 7, 7), (64, 32, 7, 7)),
]
# LM-ResNet-50's last stage (and its first, where the maps are large)
MULTISTEP = [("lm-resnet50-stage4", (64, 2048, 7, 7)), ("lm-resnet50-stage1", (64, 256, 56, 56))]
ODE = [("ode-cifar-4stages", (128, 64, 8, 8)), ("ode-resnet50-4stages", (64, 256, 56, 56))]
# grid limits: a huge channel count, and a tensor past 2**31 elements (int64 indexing)
LIMITS = [("C=2^20", (2, 1 << 20, 3, 3)), ("past-2^31", (65, 2048, 128, 128))]


def residual_args(shape, dtype, cl):
    return ("residual_update", (meta_tensor(*shape, dtype=dtype, cl=cl), meta_tensor(*shape, dtype=dtype, cl=cl), meta_tensor(shape[1]), True))


def batch_norm_args(shape, dtype, cl):
    C = shape[1]
    return ("batch_norm_residual_update", (meta_tensor(*shape, dtype=dtype, cl=cl), meta_tensor(*shape, dtype=dtype, cl=cl), meta_tensor(C),
                                           meta_tensor(C), meta_tensor(C), meta_tensor(C), meta_tensor(C), True, 0.1, 1e-5, True))


def multistep_args(shape, dtype, cl):
    return ("multistep_update", (meta_tensor(*shape, dtype=dtype, cl=cl), meta_tensor(*shape, dtype=dtype, cl=cl),
                                 meta_tensor(*shape, dtype=dtype, cl=cl), meta_tensor(), meta_tensor(shape[1]), meta_tensor(shape[0]), True))


def scale_concat_args(x, f, dtype, cl):
    return ("scale_concat", (meta_tensor(*x, dtype=dtype, cl=cl), meta_tensor(*f, dtype=dtype, cl=cl), meta_tensor(f[1])))


def ode_args(shape, dtype, cl):
    return ("ode_combine", (meta_tensor(*shape, dtype=dtype, cl=cl), [meta_tensor(*shape, dtype=dtype, cl=cl) for _ in range(4)], meta_tensor(4)))


@functools.lru_cache(maxsize=None)
def network_tensors(name: str):
    """(conv weights the controller reads, stage block counts, controller parameters) of a TSC network, on meta."""
    with torch.device(META):
        if name.startswith("cifar_resnet"):
            model = cifar_resnet(int(name[len("cifar_resnet"):]))
        else:
            model = convert(getattr(torchvision.models, name)())
    ctrl, weights, params = model._controller_tensors()
    blocks = [len(stage._modules) for stage in model.tsc_stages()]
    return weights, blocks, params


NETWORKS = ("resnet50", "resnet152", "cifar_resnet1202")


def weight_mean_args(name, dtype):
    weights, _, _ = network_tensors(name)
    return ("weight_mean", ([w.to(dtype) for w in weights],))


def controller_args(name):
    weights, blocks, params = network_tensors(name)
    wbar = torch.ops.tsc.weight_mean(list(weights))
    return ("lstm_controller", (wbar, blocks, list(params)))


def cases() -> list[tuple]:
    """(id, op, args) of the table: every op, both layouts, fp32 and bf16."""
    return list(_iter_cases())


def _iter_cases():
    for dtype in FP:
        d = str(dtype).split(".")[-1]
        for cl in (False, True):
            lay = "cl" if cl else "nchw"
            for label, shape in ACTIVATIONS + LIMITS:
                for build in (residual_args, batch_norm_args):
                    yield (f"{label}-{lay}-{d}",) + build(shape, dtype, cl)
            for label, shape in MULTISTEP:
                yield (f"{label}-{lay}-{d}",) + multistep_args(shape, dtype, cl)
            for label, x, f in CONCATS:
                yield (f"{label}-{lay}-{d}",) + scale_concat_args(x, f, dtype, cl)
            for label, shape in ODE:
                yield (f"{label}-{lay}-{d}",) + ode_args(shape, dtype, cl)
        for name in NETWORKS:
            yield (f"{name}-{d}",) + weight_mean_args(name, dtype)
    for name in NETWORKS:
        yield (f"{name}-controller",) + controller_args(name)


def violations(op: str, args: tuple, plan: list[dict]) -> list[str]:
    """The rules' violations of one plan, as readable lines."""
    bad = []
    recurrent = {"forward": 0, "backward": 0}
    longest_stage = max(args[1]) if op == "lstm_controller" else 0
    for launch in plan:
        name = f"{launch['phase']} {launch['kernel']} grid={launch['grid']}"
        grid = launch["grid"]
        if any(g < 1 for g in grid) or any(g > lim for g, lim in zip(grid, GRID_LIMITS)):
            bad.append(f"{name}: grid outside CUDA's limits {GRID_LIMITS}")
        blocks = grid[0] * grid[1] * grid[2]
        if launch["bytes"] >= BIG and blocks < 2 * SMS:
            bad.append(f"{name}: moves {launch['bytes'] / MB:.1f} MB with {blocks} blocks (< 2*{SMS})")
        if launch["bytes"] >= BIG and launch["request_bytes"] < 128:
            bad.append(f"{name}: moves {launch['bytes'] / MB:.1f} MB in {launch['request_bytes']}-byte requests (< 128)")
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
