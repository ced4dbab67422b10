"""The ODE view of residual networks (docs/ode.md): neural-ODE blocks on the fused kernels and the
solver-consistency test ("is it an ODE?", Ott et al., "ResNet after all?").

    ODEBlock(f, solver, step_size, t1)   z(t1) of dz/dt = f(z), z(0) = x, fixed-step Euler/midpoint/RK4;
                                         every solver update is one fused op (residual_update for the
                                         Euler step, ode_combine for RK stage inputs and combinations)
    refine(model, factor)                the same network with every residual block's step
                                         y + F(y)·Δt taken as `factor` sub-steps of Δt/factor
    ode_consistency(model, data, ...)    accuracy per refinement factor
    StepAdaptation(...)                  the slides' step-size adaptation (train vs finer test solver)

Backpropagation goes through the solver's operations (discretise-then-optimise).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from . import _checks
from .models import blocks as _blocks
from .ops.ode_combine import ode_combine
from .ops.residual_update import residual_update

log = logging.getLogger(__name__)

# Butcher tableaux (explicit): (a, b) with a[i] the coefficients of stage i's input z + h·Σ a[i][j]·k_j.
SOLVERS = {
    "euler": ((), (1.0,)),
    "midpoint": (((0.5,),), (0.0, 1.0)),
    "rk4": (((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
}
ORDER = {"euler": 1, "midpoint": 2, "rk4": 4}


def _solver(solver: object) -> str:
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(repr(s) for s in SOLVERS)}, got {solver!r}")
    return solver


def _positive_float(x: object, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")
    if not (x > 0 and math.isfinite(x)):
        raise ValueError(f"{name} must be a finite number > 0, got {x}")
    return float(x)


def num_steps(t1: float, step_size: float) -> int:
    """ceil(t1 / step_size), with a relative tolerance so that e.g. 1 / 0.1 gives 10, not 11."""
    return max(1, math.ceil(t1 / step_size * (1 - 1e-12)))


class ODEBlock(nn.Module):
    """z(t1) for dz/dt = f(z), z(0) = x, with a fixed-step explicit solver.

    The number of steps is ``ceil(t1 / step_size)`` and the steps are uniform, ``h = t1 / steps``
    (<= step_size), so they cover [0, t1] exactly. ``step_size`` and ``solver`` are plain settable
    attributes: the coefficients reach the kernels as small tensors, so changing the step between
    iterations rebuilds nothing (under torch.compile a new value is a new guard).

    Args:
        f: the weight-tied, autonomous vector field, a module mapping z to dz/dt of z's shape.
        solver: "euler", "midpoint" or "rk4".
        step_size: the largest step, > 0.
        t1: the end time, > 0.
    """

    def __init__(self, f: nn.Module, solver: str = "euler", step_size: float = 0.25, t1: float = 1.0):
        super().__init__()
        _checks.module(f, "f")
        self.f = f
        self.solver = solver
        self.step_size = step_size
        self.t1 = _positive_float(t1, "t1")
        self._coeff_cache: dict = {}

    @property
    def solver(self) -> str:
        return self._solver

    @solver.setter
    def solver(self, value: str) -> None:
        self._solver = _solver(value)

    @property
    def step_size(self) -> float:
        return self._step_size

    @step_size.setter
    def step_size(self, value: float) -> None:
        self._step_size = _positive_float(value, "step_size")

    @property
    def steps(self) -> int:
        return num_steps(self.t1, self.step_size)

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, step_size={self.step_size:g}, t1={self.t1:g}, steps={self.steps}"

    def _coeffs(self, solver: str, h: float, z: torch.Tensor):
        """The solver's coefficient tensors for step h (cached: one small copy per new step size)."""
        acc = torch.float64 if z.dtype == torch.float64 else torch.float32
        key = (solver, h, acc, z.device, z.shape[1] if z.dim() > 1 else None)
        if key not in self._coeff_cache:
            a, b = SOLVERS[solver]
            stage_inputs = [torch.tensor([h * c for c in row], dtype=acc, device=z.device) for row in a]
            # stages with a zero weight (midpoint's k1) are left out of the final combination
            final = torch.tensor([h * c for c in b if c != 0.0], dtype=acc, device=z.device)
            euler_dt = torch.full((z.shape[1],), h, dtype=acc, device=z.device) if 2 <= z.dim() <= 5 else None
            if len(self._coeff_cache) > 16:
                self._coeff_cache.clear()
            self._coeff_cache[key] = (stage_inputs, final, euler_dt)
        return self._coeff_cache[key]

    def step(self, z: torch.Tensor, h: float, solver: str | None = None) -> torch.Tensor:
        """One step of size h."""
        solver = self.solver if solver is None else _solver(solver)
        stage_inputs, final, euler_dt = self._coeffs(solver, h, z)
        if solver == "euler" and euler_dt is not None:
            return residual_update(z, self.f(z), euler_dt)
        ks = [self.f(z)]
        for coeffs in stage_inputs:
            ks.append(self.f(ode_combine(z, ks[: len(coeffs)], coeffs)))
        _, b = SOLVERS[solver]
        return ode_combine(z, [k for k, w in zip(ks, b) if w != 0.0], final)

    def integrate(self, x: torch.Tensor, step_size: float | None = None, solver: str | None = None) -> torch.Tensor:
        """z(t1) with another step size or solver than the block's own (the consistency test)."""
        steps = num_steps(self.t1, self.step_size if step_size is None else _positive_float(step_size, "step_size"))
        h = self.t1 / steps
        z = x
        for _ in range(steps):
            z = self.step(z, h, solver)
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.integrate(x)


def ode_blocks(model: nn.Module) -> list[ODEBlock]:
    return [m for m in model.modules() if isinstance(m, ODEBlock)]


# --------------------------------------------------------------------------------------------------
# refine: every residual block as `factor` sub-steps
# --------------------------------------------------------------------------------------------------
def _is_residual_block(m: nn.Module) -> bool:
    return _blocks.is_tsc_block(m) or type(m) in _blocks.PLAIN_TO_TSC_BLOCK


def _substepped_forward(block: nn.Module, factor: int):
    """block's forward with y + F(y)·Δt taken as `factor` steps of Δt/factor (F re-evaluated at each
    sub-step's input, the fused ReLU after each sub-step in post-activation blocks). A plain block
    has Δt = 1; a block with a projection shortcut stays one step."""
    tsc_cls = type(block) if _blocks.is_tsc_block(block) else _blocks.PLAIN_TO_TSC_BLOCK[type(block)]
    original = block.forward

    def forward(x, dt=None):
        if getattr(block, "downsample", None) is not None:
            return original(x) if dt is None else original(x, dt)
        if dt is None:
            if _blocks.is_tsc_block(block):
                return original(x, dt)  # its own error: a TSC block needs its Δt
            channels = getattr(block, tsc_cls.branch_conv_names[-1]).out_channels
            dt = x.new_ones(channels, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        dt = dt.to(torch.float64 if x.dtype == torch.float64 else torch.float32) / factor
        y = x
        for _ in range(factor):
            _, fy = tsc_cls._branch(block, y)
            y = residual_update(y, fy.to(y.dtype), dt, relu=tsc_cls.post_activation)
        return y

    return forward


@contextlib.contextmanager
def _refined(model: nn.Module, factor: int):
    patched = []
    try:
        for m in model.modules():
            if isinstance(m, ODEBlock):
                patched.append((m, "step_size", m.step_size))
                m.step_size = m.step_size / factor
            elif _is_residual_block(m):
                patched.append((m, "forward", m.__dict__.get("forward")))
                m.forward = _substepped_forward(m, factor)
        yield
    finally:
        for m, attr, old in reversed(patched):
            if attr == "forward" and old is None:
                del m.forward
            else:
                setattr(m, attr, old)


class Refined(nn.Module):
    """``model`` with every residual block sub-stepped ``factor`` times (see ``refine``). It holds the
    model itself (``self.model``): the parameters are shared, never copied."""

    def __init__(self, model: nn.Module, factor: int):
        super().__init__()
        self.model = model
        self.factor = factor

    def forward(self, *args, **kwargs):
        if self.factor == 1:
            return self.model(*args, **kwargs)
        with _refined(self.model, self.factor):
            return self.model(*args, **kwargs)


def refine(model: nn.Module, factor: int) -> Refined:
    """``model`` whose residual blocks take ``factor`` sub-steps of Δt/factor with the same F.

    Works for the TSC and plain ResNets of this library (post- and pre-activation, CIFAR and
    torchvision-style) and for ODE blocks (step_size / factor). Weights are untouched and shared.
    Evaluate it in eval mode: in training mode BatchNorm layers would update their running
    statistics once per sub-step.
    """
    _checks.module(model, "model")
    _checks.positive_int(factor, "factor")
    return Refined(model, factor)


def _batches(data):
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return [tuple(data)]
    return data


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    """Top-1 accuracy of ``model`` on data = (x, y) tensors or an iterable of (x, y) batches."""
    correct = total = 0
    for x, y in _batches(data):
        correct += (model(x).argmax(1) == y).sum().item()
        total += y.numel()
    if total == 0:
        raise ValueError("data must hold at least one sample")
    return correct / total


def ode_consistency(model: nn.Module, data, factors=(1, 2, 4, 8)) -> dict[int, float]:
    """{factor: accuracy of refine(model, factor)} in eval mode (the model's mode is restored)."""
    factors = [_checks.positive_int(f, "factors[i]") for f in factors]
    was_training = model.training
    model.eval()
    try:
        return {f: accuracy(refine(model, f), data) for f in factors}
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------------
# Step adaptation (Ott et al.): compare the train solver with a finer test solver every `every` steps
# --------------------------------------------------------------------------------------------------
@dataclass
class StepDecision:
    iteration: int
    train_accuracy: float
    test_accuracy: float
    old_step: float
    new_step: float
    action: str  # "shrink" or "grow"


class StepAdaptation:
    """Every ``every`` iterations: accuracy of the ODE blocks with their own solver and with
    ``test_solver`` (at the same step size) on the batch; if they differ by more than ``threshold``
    the step is multiplied by ``shrink``, else by ``grow`` (capped at ``max_step``).

    Call it once per iteration: ``adapt(model, x, y)`` or ``adapt(accuracies=(train, test))``.
    Decisions are kept in ``self.history`` and logged.
    """

    def __init__(self, test_solver: str = "rk4", every: int = 50, threshold: float = 0.1, shrink: float = 0.5,
                 grow: float = 1.1, max_step: float = 1.0, min_step: float = 1e-3):
        self.test_solver = _solver(test_solver)
        self.every = _checks.positive_int(every, "every")
        self.threshold = _positive_float(threshold, "threshold")
        self.shrink = _positive_float(shrink, "shrink")
        self.grow = _positive_float(grow, "grow")
        self.max_step = _positive_float(max_step, "max_step")
        self.min_step = _positive_float(min_step, "min_step")
        if not self.shrink < 1:
            raise ValueError(f"shrink must be < 1, got {shrink}")
        if not self.grow >= 1:
            raise ValueError(f"grow must be >= 1, got {grow}")
        self.iteration = 0
        self.history: list[StepDecision] = []

    @torch.no_grad()
    def _accuracies(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        blocks = ode_blocks(model)
        if not blocks:
            raise ValueError("model must contain at least one ODEBlock")
        was_training = model.training
        model.eval()
        try:
            train = (model(x).argmax(1) == y).float().mean().item()
            solvers = [b.solver for b in blocks]
            for b in blocks:
                b.solver = self.test_solver
            try:
                test = (model(x).argmax(1) == y).float().mean().item()
            finally:
                for b, s in zip(blocks, solvers):
                    b.solver = s
        finally:
            model.train(was_training)
        return train, test

    def __call__(self, model: nn.Module | None = None, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                 accuracies: tuple[float, float] | None = None) -> StepDecision | None:
        self.iteration += 1
        if self.iteration % self.every:
            return None
        if accuracies is None:
            if model is None or x is None or y is None:
                raise ValueError("pass model, x and y, or accuracies=(train, test)")
            accuracies = self._accuracies(model, x, y)
        train, test = (float(a) for a in accuracies)
        blocks = ode_blocks(model) if model is not None else []
        old = blocks[0].step_size if blocks else (self.history[-1].new_step if self.history else self.max_step)
        if abs(train - test) > self.threshold:
            new, action = max(self.min_step, old * self.shrink), "shrink"
        else:
            new, action = min(self.max_step, old * self.grow), "grow"
        for b in blocks:
            b.step_size = new
        decision = StepDecision(self.iteration, train, test, old, new, action)
        self.history.append(decision)
        log.info("step adaptation at iteration %d: train %.4f vs %s %.4f -> %s step %.4g -> %.4g",
                 self.iteration, train, self.test_solver, test, action, old, new)
        return decision


# --------------------------------------------------------------------------------------------------
# A small ODE-net classifier (images: dims=2, sequences: dims=1)
# --------------------------------------------------------------------------------------------------
class ConvField(nn.Module):
    """Autonomous vector field GroupNorm-ReLU-conv-GroupNorm-ReLU-conv (weights shared over time)."""

    def __init__(self, width: int, dims: int):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        groups = math.gcd(width, 4)
        self.net = nn.Sequential(nn.GroupNorm(groups, width), nn.ReLU(), conv(width, width, 3, padding=1),
                                 nn.GroupNorm(groups, width), nn.ReLU(), conv(width, width, 3, padding=1))

    def forward(self, z):
        return self.net(z)


def odenet(in_channels: int, num_classes: int, dims: int = 2, widths=(16, 32), solver: str = "euler",
           step_size: float = 0.25, t1: float = 1.0) -> nn.Sequential:
    """Stem conv (3x3) + ReLU, then per stage: a stride-2 down-sampling conv (not before the first)
    and one ODEBlock(ConvField), then global average pool and a linear head."""
    _checks.positive_int(in_channels, "in_channels")
    _checks.positive_int(num_classes, "num_classes")
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 (sequences) or 2 (images), got {dims!r}")
    widths = [_checks.positive_int(w, "widths[i]") for w in widths]
    if not widths:
        raise ValueError("widths must hold at least one width")
    conv = nn.Conv2d if dims == 2 else nn.Conv1d
    pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool1d(1)
    layers: list[nn.Module] = [conv(in_channels, widths[0], 3, padding=1), nn.ReLU()]
    for i, w in enumerate(widths):
        if i:
            layers += [conv(widths[i - 1], w, 3, stride=2, padding=1), nn.ReLU()]
        layers.append(ODEBlock(ConvField(w, dims), solver=solver, step_size=step_size, t1=t1))
    layers += [pool, nn.Flatten(), nn.Linear(widths[-1], num_classes)]
    return nn.Sequential(*layers)
