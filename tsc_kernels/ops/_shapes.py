"""An op's real shapes: where the GPU checks run it, declared in its own file (tsc_kernels/ops/<op>.py).

Each op module has ``REAL_SHAPES`` (a ``RealShapes``) and ``example_inputs(spec, dtype,
channels_last=False, device=None, requires_grad=False)``: its forward arguments at one spec, with
random values (none on ``meta``) on ``device`` (None: torch's default device). Two consumers iterate
the registry and read them, so a new op adds its shapes here, in its file, and nowhere else:

  tsc_kernels/launch_rules.py    the launch plans at ``launch`` (on ``meta``, so the largest shapes
                                 cost nothing), each at both layouts and every dtype;
  tsc_kernels/gpu_check_cases.py gpu-check's op table: ``full`` on the GPU, ``tiny`` in the CPU
                                 tests, with ``min_bytes`` as the yardstick.

The shapes several ops share (ResNet activations, the grid limits) are below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

FP = (torch.float32, torch.bfloat16)

# (label, shape): ResNet-50 at batch 64 and 256, ResNet-18 and 50's first stage, CIFAR at batch 128
ACTIVATIONS = (
    ("resnet50-stage1", (64, 256, 56, 56)),
    ("resnet50-stage4-b256", (256, 2048, 7, 7)),
    ("resnet18-stage1", (64, 64, 56, 56)),
    ("cifar-stage1", (128, 16, 32, 32)),
    ("cifar-stage3", (128, 64, 8, 8)),
)
# grid limits: a huge channel count, and a tensor past 2**31 elements (int64 indexing)
LIMITS = (("C=2^20", (2, 1 << 20, 3, 3)), ("past-2^31", (65, 2048, 128, 128)))
# gpu-check: ResNet-50's largest activations (layer1 at batch 64, layer4 at batch 256), and small ones
RESNET50 = ((64, 256, 56, 56), (256, 2048, 7, 7))
TINY = ((3, 5, 7, 9), (2, 6, 3, 3))
# TSC networks (launch plans: built on meta; gpu-check: ResNet-50 on the GPU, a tiny 1-D one on the CPU)
NETWORKS = ("resnet50", "resnet152", "cifar_resnet1202")


class Network(NamedTuple):
    """What a network op's example_inputs gets for a spec naming a TSC network: the conv weights its
    controller reads (block order), the stages' block counts and the lstm controllers' parameters
    (8 per stage, in the op's order)."""
    weights: list
    blocks: list
    params: list


@dataclass(frozen=True)
class RealShapes:
    """Where the GPU checks run one op.

    launch: (label, spec) of the launch-plan table; case ids ``<label>-<nchw|cl>-<dtype>`` (network
        ops: ``<label>-<dtype>``, or ``<label>`` when the op has one dtype).
    full, tiny: gpu-check's specs, on the GPU and in the CPU tests.
    min_bytes: (forward arguments) -> the (forward, backward) bytes the op must move at least (docs/ops.md).
    network: the specs name TSC networks (launch_rules and gpu-check build them; example_inputs gets
        a Network); such ops' launch plans have no layout.
    layouts: the op's tensors have a channel layout (gpu-check runs both).
    extra: name of a spec's second item ((shape, extra) specs), for gpu-check's labels.
    """
    launch: tuple
    full: tuple
    tiny: tuple
    min_bytes: Callable[[tuple], tuple[int, int]]
    network: bool = False
    layouts: bool = True
    dtypes: tuple = FP
    bandwidth_meaningful: bool = True
    note: str = ""
    extra: str = ""


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def elementwise_bytes(fwd: int, bwd: int) -> Callable[[tuple], tuple[int, int]]:
    """min_bytes of an op moving fwd and bwd activation-sized tensors (its first argument's size); the
    per-channel vectors of C values are left out (< 0.1 % at the real shapes)."""
    return lambda args: (fwd * nbytes(args[0]), bwd * nbytes(args[0]))
