"""gpu-check's op cases: for every op of the registry, how to build its forward arguments at a
spec (on a device, never meta), the minimum bytes its forward and backward must move, and the
specs it is timed at (tsc_kernels/gpu_check_ops.py times them; docs/gpu.md).

All of it is declared in the op's own file (``REAL_SHAPES`` and ``example_inputs`` in
tsc_kernels/ops/<op>.py, see tsc_kernels/ops/_shapes.py; minimum bytes as in docs/ops.md,
"Minimum traffic"); this module turns it into an ``OpCase`` per registered op. The inputs are
created on the device through torch's default device; the network ops (weight_mean,
lstm_controller) take a TSC network's real conv weights and controller (ResNet-50 on the GPU).
``tests_module`` imports a test module of the checkout (tests/tooling/test_op_list.py reads
test_gpu_ready's launcher list with it); the op cases no longer need tests/.
"""
from __future__ import annotations

import functools
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .ops._shapes import Network, RealShapes
from .ops.registry import OPS

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("contiguous", "channels_last")
DTYPES = (torch.float32, torch.bfloat16)
NO_LAYOUT = "-"  # ops whose tensors have no channel layout (2-D / 1-D: the controller)


def tests_module(name: str):
    """tests/<folder>/<name>.py of this checkout (ops/, models/, tooling/: its builders; its
    conftest comes with it, and puts the three folders on sys.path for the modules' own imports)."""
    tests = ROOT / "tests"
    found = sorted(tests.glob(f"*/{name}.py"))
    if not found:
        raise FileNotFoundError(f"tests/*/{name}.py is not here: run it from a checkout")
    for folder in (tests, *(d for d in sorted(tests.iterdir()) if d.is_dir() and d.name != "__pycache__")):
        if str(folder) not in sys.path:
            sys.path.append(str(folder))  # appended: nothing of the package's own imports is shadowed
    return importlib.import_module(name)


@dataclass(frozen=True)
class OpCase:
    """How gpu-check times one op. ``build(spec, dtype, channels_last)`` returns the forward
    arguments on the current default device with the differentiable ones requiring grad;
    ``min_bytes(args)`` the (forward, backward) bytes the op must move; ``full`` the table's
    largest specs (GPU), ``tiny`` small ones for the CPU tests."""
    build: Callable[..., tuple]
    min_bytes: Callable[[tuple], tuple[int, int]]
    full: tuple
    tiny: tuple
    layouts: tuple = LAYOUTS
    dtypes: tuple = DTYPES
    bandwidth_meaningful: bool = True
    note: str = ""
    extra: str = ""  # name of a spec's second item ((shape, extra) specs): "k", "stages"

    def label(self, spec) -> str:
        """A spec as the table shows it: (64, 256, 56, 56); (64, 224, 56, 56) k=32; resnet50."""
        if isinstance(spec, str):
            return spec
        if self.extra:
            return f"{tuple(spec[0])} {self.extra}={spec[1]}"
        return str(tuple(spec))


def controller_network(name: str) -> torch.nn.Module:
    """A TSC network whose conv weights and controller the weight_mean / lstm_controller rows use:
    "resnet50" (torchvision's, converted) or "resnet1d" (a tiny one for the CPU tests)."""
    from . import convert, models
    if name == "resnet50":
        import torchvision
        return convert(torchvision.models.resnet50(weights=None))
    if name == "resnet1d":
        return models.resnet1d(8, width=4)
    raise ValueError(f"controller network must be 'resnet50' or 'resnet1d', got {name!r}")


def network(name: str) -> Network:
    """A controller network's tensors, as a network op's example_inputs takes them."""
    model = controller_network(name)
    stages = model.controller_inputs()
    return Network(weights=[w for stage in stages for ws in stage for w in ws], blocks=[len(s) for s in stages],
                   params=[p for c in model.tsc_controller.stages for p in c.lstm_params()])


def _build(example_inputs, real: RealShapes, spec, dtype, channels_last):
    """The forward arguments on the default device, the differentiable ones requiring grad."""
    return example_inputs(network(spec) if real.network else spec, dtype, channels_last=channels_last,
                          requires_grad=True)


def _case(name: str) -> OpCase | None:
    """The OpCase of tsc_kernels/ops/<name>.py's REAL_SHAPES (None: the op declares none)."""
    module = sys.modules.get(f"{__package__}.ops.{name}")
    real = getattr(module, "REAL_SHAPES", None)
    if real is None:
        return None
    return OpCase(functools.partial(_build, module.example_inputs, real), real.min_bytes, real.full, real.tiny,
                  layouts=LAYOUTS if real.layouts else (NO_LAYOUT,), dtypes=real.dtypes,
                  bandwidth_meaningful=real.bandwidth_meaningful, note=real.note, extra=real.extra)


CASES: dict[str, OpCase] = {name: case for name in OPS if (case := _case(name)) is not None}


def case_of(name: str) -> OpCase:
    if name not in CASES:
        raise KeyError(f"op {name!r} is registered but gpu-check has no case for it (tsc_kernels/gpu_check_cases.py "
                       f"reads REAL_SHAPES and example_inputs of tsc_kernels/ops/{name}.py: declare them there)")
    return CASES[name]

