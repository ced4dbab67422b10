"""gpu-check's op cases: for every op of the registry, how to build its forward arguments at a
shape (on a device, never meta), the minimum bytes its forward and backward must move, and the
shapes it is timed at (tsc_kernels/gpu_check_ops.py times them; docs/gpu.md).

The elementwise ops take their inputs from the op tests' own builders (tests/ops/test_<op>.py
``make_inputs``: imported, so gpu-check times exactly what the tests check), created on the device
through torch's default device; weight_mean and lstm_controller take a TSC network's real conv
weights and controller (ResNet-50 on the GPU). gpu-check runs from a checkout (it builds it and runs
its tests), so tests/ is there.

Minimum bytes (docs/ops.md, "Minimum traffic"; N elements of an activation, e bytes each, the
per-channel vectors of C values left out: < 0.1 % at these shapes):
  residual_update (ReLU fused, as ResNet-50's blocks)   fwd 3N e (y, f -> out); bwd 5N e (g, f, out -> dy, df)
  batch_norm_residual_update (training, ReLU)           fwd 4N e (stats read x; apply x, y -> out);
                                                        bwd 8N e (sums g, x, out; apply -> dx, dy).
                                                        Two passes each way are inherent: the output needs
                                                        statistics over the whole batch first.
  multistep_update (ReLU)                               fwd 4N e (u, u_prev, f -> out); bwd 8N e
                                                        (g, u, u_prev, f, out -> du, du_prev, df)
  scale_concat                                          fwd 2 (Cx + k) P e; bwd 3 k P e (P = N H W pixels;
                                                        dx is a view of g)
  ode_combine, s stages                                 fwd (s + 2) N e; bwd (2 s + 1) N e (dz is g)
  weight_mean                                           fwd every weight + w̄ (fp32); bwd dw̄ in, dw̄ / C_in out
                                                        (dW is a stride-0 view: never written)
  lstm_controller                                       every tensor it reads and writes once; its recurrence,
                                                        not its bytes, is its limit (flag not meaningful)
"""
from __future__ import annotations

import importlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import reference
from .ops._layout import to_layout
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
        raise FileNotFoundError(f"gpu-check's op table builds its inputs with tests/*/{name}.py: run it from a checkout")
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


def _n_e(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _residual(shape, dtype, cl):
    y, f, dt = tests_module("test_residual_update").make_inputs(shape, dtype, channels_last=cl)
    return y, f, dt, True


def _batch_norm(shape, dtype, cl):
    y, x, dt, rm, rv, w, b = tests_module("test_batch_norm_residual_update").make_inputs(
        shape, dtype, x_cl=cl, y_cl=cl, training=True, relu=True)
    y, x, dt, w, b = (t.requires_grad_() for t in (y, x, dt, w, b))  # the running statistics are not differentiated
    return y, x, dt, rm, rv, w, b, True, 0.1, 1e-5, True


def _multistep(shape, dtype, cl):
    u, u_prev, f, k, dt, keep = tests_module("test_multistep_update").make_inputs(shape, dtype, channels_last=cl)
    return u, u_prev, f, k, dt, keep.detach(), True  # keep (stochastic depth's mask) is data, not a parameter


def _scale_concat(spec, dtype, cl):
    shape, k = spec
    return tests_module("test_scale_concat").make_inputs(shape, k, dtype, channels_last=cl)


def _ode_combine(spec, dtype, cl):
    shape, stages = spec
    z, ks, c = tests_module("test_ode_combine").make_inputs(shape, dtype, stages, channels_last=cl)
    return z, ks, c


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


def _conv_weights(model) -> list[torch.Tensor]:
    return [w for stage in model.controller_inputs() for ws in stage for w in ws]


def _weight_mean(name, dtype, cl):
    weights = _conv_weights(controller_network(name))
    return ([to_layout(w.detach().to(dtype), cl).requires_grad_() for w in weights],)


def _lstm_controller(name, dtype, cl):
    model = controller_network(name)
    stages = model.controller_inputs()
    wbar = reference.weight_mean(_conv_weights(model)).detach().to(dtype).requires_grad_()
    params = [p.detach().to(dtype).requires_grad_() for c in model.tsc_controller.stages for p in c.lstm_params()]
    return wbar, [len(stage) for stage in stages], params


def _elementwise_bytes(fwd: int, bwd: int):
    """min_bytes of an op moving fwd and bwd activation-sized tensors (its first argument's size)."""
    return lambda args: (fwd * _n_e(args[0]), bwd * _n_e(args[0]))


def _scale_concat_bytes(args):
    x, f, _ = args
    return 2 * (_n_e(x) + _n_e(f)), 3 * _n_e(f)


def _ode_combine_bytes(args):
    z, stages, _ = args
    s = len(stages)
    return (s + 2) * _n_e(z), (2 * s + 1) * _n_e(z)


def _weight_mean_bytes(args):
    (weights,) = args
    packed = 4 * sum(w.shape[0] * math.prod(w.shape[2:]) for w in weights)  # w̄ is fp32
    return sum(_n_e(w) for w in weights) + packed, 2 * packed


def _lstm_controller_bytes(args):
    """Inputs read and outputs written once: forward wbar, params -> dt, saved; backward grad, dt,
    wbar, params, saved -> dwbar, dparams (output sizes from the op's fake)."""
    wbar, blocks, params = args
    dt, saved = OPS["lstm_controller"].fake(wbar, blocks, params)
    p = sum(_n_e(t) for t in params)
    return _n_e(wbar) + p + _n_e(dt) + _n_e(saved), 2 * _n_e(dt) + 2 * _n_e(wbar) + 2 * p + _n_e(saved)


# ResNet-50's largest activations: layer1 at batch 64 and layer4 at batch 256.
_RESNET50 = ((64, 256, 56, 56), (256, 2048, 7, 7))
_TINY = ((3, 5, 7, 9), (2, 6, 3, 3))
CASES: dict[str, OpCase] = {
    "residual_update": OpCase(_residual, _elementwise_bytes(3, 5), _RESNET50, _TINY, note="ReLU fused"),
    "batch_norm_residual_update": OpCase(_batch_norm, _elementwise_bytes(4, 8), _RESNET50, _TINY,
                                         note="training, ReLU fused"),
    "multistep_update": OpCase(_multistep, _elementwise_bytes(4, 8), _RESNET50, _TINY,
                               note="ReLU fused, dt and keep"),
    # DenseNet-121's largest concatenation: dense block 1's last layer (Cx = 64 + 5 * 32) at batch 64
    "scale_concat": OpCase(_scale_concat, _scale_concat_bytes, (((64, 224, 56, 56), 32),), (((3, 5, 7, 9), 3),),
                           note="DenseNet-121", extra="k"),
    "ode_combine": OpCase(_ode_combine, _ode_combine_bytes, (((64, 256, 56, 56), 4),), (((3, 5, 7, 9), 4),),
                          note="RK4's final combination", extra="stages"),
    "weight_mean": OpCase(_weight_mean, _weight_mean_bytes, ("resnet50",), ("resnet1d",),
                          note="the controller's conv weights"),
    "lstm_controller": OpCase(_lstm_controller, _lstm_controller_bytes, ("resnet50",), ("resnet1d",),
                              layouts=(NO_LAYOUT,), dtypes=(torch.float32,), bandwidth_meaningful=False,
                              note="fp32 (runs fp32 under autocast); recurrence-bound: % of copy_ not meaningful"),
}


def case_of(name: str) -> OpCase:
    if name not in CASES:
        raise KeyError(f"op {name!r} is registered but gpu-check has no case for it: add one to "
                       "tsc_kernels/gpu_check_cases.py CASES")
    return CASES[name]

