"""tsc-bench: TSC's overhead against the plain network (the main job of this project).

    tsc-bench [--model cifar_resnet56] [--batch 32] [--device cpu|cuda] [--dtype fp32|bf16|fp16]
              [--channels-last] [--steps N] [--quick] [--json PATH]
    python -m tsc_kernels.bench ...

Builds three variants of one network and measures each the same way:
  plain        the network without TSC (tsc=None)
  tsc-eager    the TSC network on the torch backend (the pure-PyTorch reference: what a naive
               implementation costs)
  tsc-fused    the TSC network on the fastest backend available for the device (cpu / cuda / triton)
Columns (one row per variant):
  params train/infer   parameters while training / after tsc_kernels.fold (inference)
  GMAC train/infer     multiply-adds of one forward pass at batch 1 (torch.utils.flop_counter counts
                       2 FLOPs per multiply-add; the paper's "GFLOPs" are multiply-adds), while
                       training (controllers included) / folded
  step ms, ±           median and inter-quartile range of a training step (forward, cross-entropy,
                       backward, SGD step) over --steps steps after warm-up; the variants' steps
                       are interleaved, so drift of the machine's speed shifts all rows alike
                       (run_rounds: the eager variants' rounds, then the compiled ones', each round
                       in a shuffled order)
  kernels              leaf compute ops of one training step under torch.profiler (docs/performance.md;
                       a GPU-launch proxy)
  peak MB              peak tensor memory of one training step (CUDA: allocator peak; CPU:
                       profiler memory events)
  infer ms             median eval-mode forward of the folded model (no_grad)
  overhead             step time and kernels against the plain row of the same mode; the time is
                       the median of the per-round ratios (a round runs every variant's step once,
                       so pairing a step with the plain step of its round cancels the machine's
                       drift: on a noisy VM it moves less than the ratio of the medians)
With --compile three more rows run the same step under torch.compile (plain-c, tsc-ref-c: the
reference compiled, tsc-auto-c: the default backend compiled, which picks per op whether inductor
sees the reference math or the fused op); their kernels are not counted (inductor's kernels are
not profiler ops) and their inference is the eager rows'. --history appends the rows to a CSV.

--host adds the host's share of a step (--host-only runs it alone): on a GPU a CIFAR-size step is
bound by the host (Python, dispatcher, autograd: 10-20 us per op), not by the device, so whatever
TSC adds on the host is what it costs there. The same step at batch 2 on 8x8 inputs (--host-batch,
--host-image-size; 32x32 for 224-pixel models) with one thread, where compute vanishes; variants
  plain        the network without TSC
  tsc-fused    TSC_LSTM on `auto` (the fused ops)
  tsc-fixed    tsc="fixed": a constant Δt, no controller (the fused BatchNorm tail only)
  tsc-ref      TSC_LSTM on the torch backend (the reference)
  plain+pass   plain, plus the passes TSC's controller makes over the conv weights (their w̄, and
               each w̄ gradient added into the weight's gradient), without the controller: real
               work on this CPU (MBs per step), microseconds on a GPU; tsc-fused against it is
               the host cost TSC adds beyond them
  tsc-leafdt   tsc-fused with every block's Δt read from one trained leaf tensor instead of the
               controller: the fused tails and Δt's gradient alone (tsc-fused against it: the
               controller's cost)
and, with --compile, plain-c, tsc-auto-c, tsc-ref-c and plain+pass-c compiled (plain+pass-c: the
passes as tsc-auto-c makes them, the reference traced into the network's graph); --host-steps
interleaved rounds.
Columns: ops (operator calls of one eager step under torch.profiler, every dispatcher pass counted),
top (those called from Python or the autograd engine, not by another op),
the medians of the step and of its forward (zero_grad, forward, loss), backward and optimizer
parts, and each against the plain row of its mode as the median of per-round ratios.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import re
import statistics
import sys
import time
import types
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import backend as backend_mod
from . import models
from .convert import convert
from .fold import fold
from .models.network import call_reading_aliases
from .ops.lstm_controller import training_weight_mean
from .ops.registry import dispatch, eager_op
from .profiling import count_kernels, count_ops, quiet_profiler

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (name, backend: None for the plain network, compiled): the eager rows, then with --compile the
# same three under torch.compile (tsc-ref-c: the compiled reference; tsc-auto-c: what a user of
# this library gets, `auto` choosing per op what runs inside the compiled graph).
VARIANTS = (("plain", None, False), ("tsc-eager", "torch", False), ("tsc-fused", "auto", False))
COMPILED_VARIANTS = (("plain-c", None, True), ("tsc-ref-c", "torch", True), ("tsc-auto-c", "auto", True))


@dataclass
class Row:
    variant: str
    backend: str
    params_train: int
    params_infer: int
    gmac_train: float
    gmac_infer: float
    step_ms: float
    step_iqr_ms: float
    kernels: int | None  # None for compiled rows: inductor's kernels are not profiler ops
    peak_mb: float
    infer_ms: float | None  # None for compiled rows (the folded network is the plain row's)
    overhead_time_pct: float | None = None
    overhead_kernels_pct: float | None = None
    step_times_ms: list = field(default_factory=list)
    mode: str = "eager"


def build_model(name: str, tsc: str | None, num_classes: int | None) -> tuple[nn.Module, int]:
    """(model, input image size) for a model name: cifar_resnetN, cifar_preact_resnetN or any
    tsc_kernels.models builder (resnet50, resnext50_32x4d, se_resnet50, ...) or timm:NAME (a timm ResNet,
    converted with tsc_kernels.convert)."""
    if name.startswith("timm:"):  # a timm ResNet by its timm name (docs/timm.md)
        return _build_timm_model(name[len("timm:"):], tsc, num_classes)
    m = re.fullmatch(r"cifar_densenet(\d+)", name)  # the TSC paper's DenseNet-40 is cifar_densenet40 (k = 12)
    if m:
        return models.cifar_densenet(int(m.group(1)), 12, num_classes=num_classes or 10, tsc=tsc), 32
    m = re.fullmatch(r"cifar_lm_resnet(\d+)", name)  # LM-ResNet (docs/lm_resnet.md), pre-act, paper's defaults
    if m:
        return models.cifar_lm_resnet(int(m.group(1)), num_classes=num_classes or 10, tsc=tsc), 32
    m = re.fullmatch(r"cifar_(preact_)?resnet(\d+)", name)
    if m:
        return models.cifar_resnet(int(m.group(2)), num_classes=num_classes or 10, preact=bool(m.group(1)), tsc=tsc), 32
    builder = getattr(models, name, None)
    not_builders = ("cifar_resnet", "cifar_lm_resnet", "lm_coefficients")
    if builder is None or name.startswith("_") or not callable(builder) or name in not_builders:
        raise ValueError(f"--model must be cifar_resnetN, cifar_preact_resnetN or a tsc_kernels.models builder "
                         f"(resnet18, resnet50, resnext50_32x4d, ...), got {name!r}")
    kwargs = {"num_classes": num_classes} if num_classes else {}
    return builder(tsc=tsc, **kwargs), 224


def _build_timm_model(name: str, tsc: str | None, num_classes: int | None) -> tuple[nn.Module, int]:
    try:
        import timm
    except ImportError as e:
        raise ValueError(f"--model timm:{name} needs timm: pip install timm (or 'tsc-kernels[timm]')") from e
    if not timm.is_model(name):
        raise ValueError(f"--model timm:NAME needs a timm model name (timm.list_models('resnet*')), got {name!r}")
    model = timm.create_model(name, pretrained=False, **({"num_classes": num_classes} if num_classes else {}))
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return (model if tsc is None else convert(model, mode=tsc)), size


def gmacs(model: nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(fn, device: torch.device) -> float:
    """Peak bytes of tensors alive during one call of fn, beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each event's own allocations minus frees ("[memory]" events: frees outside any op), in
    # start order: the running sum is the live tensor memory; an op's net change counts at its start.
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def median_iqr(times: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[2] - q[0]


class Variant:
    """One network variant, ready to train: its model, data, optimizer and backend."""

    def __init__(self, args, name: str, tsc: str | None, backend_name: str, compiled: bool = False,
                 batch: int | None = None, image_size: int | None = None):
        self.name, self.tsc, self.backend_name, self.compiled = name, tsc, backend_name, compiled
        self.device, dtype = torch.device(args.device), DTYPES[args.dtype]
        torch.manual_seed(0)
        model, size = build_model(args.model, tsc, args.num_classes)
        size = image_size or args.image_size or size
        batch = batch or args.batch
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = model.to(self.device).to(memory_format=memory_format)
        self.x = torch.randn(batch, 3, size, size, device=self.device).to(memory_format=memory_format)
        head = getattr(self.model, "fc", None) or getattr(self.model, "classifier", None)  # ResNets / DenseNets
        if head is None:
            head = self.model.get_classifier()  # timm
        classes = head.out_features
        self.target = torch.randint(0, classes, (batch,), device=self.device)
        # foreach: one multi-tensor update for all parameters, PyTorch's default on a GPU (on a CPU it
        # would loop per parameter, and the kernel count would mostly measure the optimizer)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9, foreach=True)
        # the module itself stays uncompiled (fold, parameter counts); the step calls `forward`
        self.forward = torch.compile(_own_forward(self.model), backend=args.compile_backend) if compiled else self.model
        self.autocast = torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)
        self.times: list[float] = []

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with self.autocast:
            loss = nn.functional.cross_entropy(self.forward(self.x), self.target)
        loss.backward()
        self.opt.step()

    def timed_step(self) -> None:
        with backend_mod.use_backend(self.backend_name):
            _sync(self.device)
            t0 = time.perf_counter()
            self.step()
            _sync(self.device)
        self.times.append((time.perf_counter() - t0) * 1e3)

    def report(self, args) -> Row:
        """Everything but the step times: parameters, multiply-adds, kernels, memory, folded inference."""
        model, x = self.model, self.x
        with backend_mod.use_backend(self.backend_name):
            resolved = backend_mod.resolve(self.device) if self.tsc is not None else "-"
            params_train = sum(p.numel() for p in model.parameters())
            model.eval()
            gmac_train = gmacs(model, x[:1])
            model.train()
            # inductor's generated kernels are no profiler ops: kernels are counted in eager mode only
            kernels = None if self.compiled else count_kernels(self.step)
            peak = peak_memory_mb(self.step, self.device)
            folded = fold(model).eval() if self.tsc is not None else model.eval()
            params_infer = sum(p.numel() for p in folded.parameters())
            gmac_infer = gmacs(folded, x[:1])
            infer = []
            with torch.no_grad(), self.autocast:
                for i in range(0 if self.compiled else args.warmup + args.steps):
                    _sync(self.device)
                    t0 = time.perf_counter()
                    folded(x)
                    _sync(self.device)
                    if i >= args.warmup:
                        infer.append((time.perf_counter() - t0) * 1e3)
        step_ms, iqr = median_iqr(self.times)
        return Row(self.name, resolved, params_train, params_infer, gmac_train, gmac_infer, step_ms, iqr, kernels,
                   peak, statistics.median(infer) if infer else None, step_times_ms=list(self.times),
                   mode="compiled" if self.compiled else "eager")


def _own_forward(model: nn.Module) -> nn.Module:
    """``model``, its forward now a copy of its class's forward with a code object of its own. Dynamo
    keeps compiled graphs per code object and, per call, checks each entry's guards until one
    passes: compiled variants whose networks share a class (plain-c, tsc-auto-c and tsc-ref-c all
    run cifar.py's forward) paid for each other's failing guard checks, where a user's one compiled
    network pays for its own only."""
    fn = type(model).forward
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    model.forward = types.MethodType(own, model)
    return model


def variant_specs(args) -> tuple:
    return VARIANTS + (COMPILED_VARIANTS if args.compile else ())


def measure(args, progress) -> list[Row]:
    """Every variant of variant_specs(args), their timed steps interleaved (run_rounds) so that a
    machine getting slower or faster during the run shifts all rows alike. Compiled variants
    compile during their warm-up steps."""
    variants = [Variant(args, name, None if b is None else "lstm", b or "auto", compiled)
                for name, b, compiled in variant_specs(args)]
    for v in variants:
        with backend_mod.use_backend(v.backend_name):
            for _ in range(args.warmup):
                v.step()
    run_rounds(variants, args.steps, progress)
    return [v.report(args) for v in variants]


def run_rounds(variants: list, rounds: int, progress=None) -> None:
    """``rounds`` timed steps of every variant, interleaved: round by round, each variant's step once
    per round (a ratio against the plain step of the same round cancels the machine's drift). The
    eager variants' rounds run first, then the compiled variants' (each row is paired with the plain
    row of its own mode), and each round runs its variants in a shuffled order (seeded): a step
    right after a step of the other mode, or always after the same variant, pays for the state the
    previous one left. In one fixed order the compiled plain step, always run right after the eager
    ones, took 4-5 % longer than the same compiled plain step run later in the round (an A/A
    control), which made every compiled row look that much cheaper against it."""
    rng = random.Random(0)
    for compiled in (False, True):
        group = [v for v in variants if v.compiled == compiled]
        for _ in range(rounds if group else 0):
            rng.shuffle(group)
            for v in group:
                v.timed_step()
                if progress is not None:
                    progress.update(1)


# --------------------------------------------------------------------------------------------------
# --host: the host's share of a step (tiny tensors, one thread)
# --------------------------------------------------------------------------------------------------
# (name, tsc mode, backend, compiled)
HOST_VARIANTS = (("plain", None, "auto", False), ("tsc-fused", "lstm", "auto", False),
                 ("tsc-fixed", "fixed", "auto", False), ("tsc-ref", "lstm", "torch", False),
                 ("plain+pass", None, "auto", False), ("tsc-leafdt", "lstm", "auto", False))
HOST_COMPILED_VARIANTS = (("plain-c", None, "auto", True), ("tsc-auto-c", "lstm", "auto", True),
                          ("tsc-ref-c", "lstm", "torch", True), ("plain+pass-c", None, "auto", True))
PHASES = ("step", "fwd", "bwd", "opt")


@dataclass
class HostRow:
    variant: str
    backend: str
    mode: str  # "eager" / "compiled"
    ops: int | None  # operator calls of one step (eager rows): every dispatcher pass
    top_ops: int | None  # those called from Python or the autograd engine, not by another op
    ms: dict  # phase -> median ms
    overhead_pct: dict = field(default_factory=dict)  # phase -> median per-round ratio - 1, vs plain of the mode
    times_ms: dict = field(default_factory=dict)  # phase -> per-round ms


class HostVariant(Variant):
    """A Variant at the host configuration whose timed step records its parts: forward (zero_grad,
    forward, loss), backward, optimizer."""

    def __init__(self, args, name, tsc, backend_name, compiled):
        super().__init__(args, name, tsc, backend_name, compiled, batch=args.host_batch,
                         image_size=host_image_size(args))
        self.parts = {p: [] for p in PHASES}
        # plain+pass(-c): the plain step plus the passes TSC's controller makes over the conv weights,
        # without the controller: w̄ of the weights TSC reads (weight_mean, in the forward) and, in
        # the same backward, weight_mean's backward with a zero gradient, which adds each weight's w̄
        # gradient into its conv gradient as in a TSC step (eagerly the same ops: on the C++
        # backends the convs read weight aliases made by w̄'s node, which adds them; compiled, the
        # reference in the network's graph, which inductor folds into the conv gradients as in
        # tsc-auto-c). On this CPU those passes are real work (several MB per step); on a GPU
        # microseconds of device time. TSC against this row is the cost it adds beyond them.
        self.passes = controller_weights(args, self.model) if name.startswith("plain+pass") else None
        if self.passes is not None:
            forward = _WithWeightPasses(self.model, self.passes, self.device)
            self.forward = torch.compile(forward, backend=args.compile_backend) if compiled else forward
        if name == "tsc-leafdt":
            self.opt.add_param_group({"params": [_leaf_step_sizes(self.model)]})

    def step(self, mark=lambda: None) -> None:
        """One training step; ``mark()`` after the forward (zero_grad, forward, loss) and the backward."""
        self.opt.zero_grad(set_to_none=True)
        with self.autocast:
            out = self.forward(self.x)
            out, wbar = out if self.passes is not None else (out, None)
            loss = nn.functional.cross_entropy(out, self.target)
        mark()
        if wbar is None:
            loss.backward()
        else:
            torch.autograd.backward((loss, wbar), (None, torch.zeros_like(wbar)))
        mark()
        self.opt.step()

    def timed_step(self) -> None:
        def mark():
            _sync(self.device)
            times.append(time.perf_counter())

        with backend_mod.use_backend(self.backend_name):
            _sync(self.device)
            times = [time.perf_counter()]
            self.step(mark)
            mark()
        t0, t1, t2, t3 = times
        for p, t in zip(PHASES, (t3 - t0, t1 - t0, t2 - t1, t3 - t2)):
            self.parts[p].append(t * 1e3)

    def host_row(self) -> HostRow:
        with backend_mod.use_backend(self.backend_name):
            resolved = backend_mod.resolve(self.device) if self.tsc is not None else "-"
            ops, top = (None, None) if self.compiled else count_ops(self.step)
        return HostRow(self.name, resolved, "compiled" if self.compiled else "eager", ops, top,
                       {p: statistics.median(t) for p, t in self.parts.items()}, times_ms=self.parts)


class _WithWeightPasses(nn.Module):
    """``model`` whose forward also returns w̄ of ``weights`` as a TSC training step makes it: in
    eager steps training_weight_mean, the convs reading its weight aliases where it makes them;
    under torch.compile the reference (``auto``), traced into the same graph. A module, so that
    plain+pass-c is compiled as plain-c is (a module's call path and guards, its own code object)
    and differs from it by the passes only."""

    def __init__(self, model: nn.Module, weights: list, device: torch.device):
        super().__init__()
        self.model, self.weights, self.device = model, weights, device
        owners = {id(p): m._parameters for m in model.modules() for n, p in m._parameters.items() if n == "weight"}
        self.dicts = [owners[id(w)] for w in weights]

    def forward(self, x):
        # w̄ first, as TSC's controller does: autograd runs later nodes' backward first, and a w̄
        # made after the network would hand each weight its w̄ gradient before the conv's, which
        # autograd then adds out of place (a new buffer per weight) instead of in place
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():
            wbar = dispatch("weight_mean", self.device)(self.weights)
            return self.model(x), wbar
        wbar, aliases = training_weight_mean(self.weights, *eager_op("weight_mean", self.device))
        if aliases:
            return call_reading_aliases(self.dicts, self.weights, aliases, self.model, x), wbar
        return self.model(x), wbar


def _leaf_step_sizes(model: nn.Module) -> torch.Tensor:
    """Make the TSC network ``model`` read every block's Δt from one leaf tensor, set to the
    controller's Δt at build time and split per block as the controller's output is (tsc-leafdt: the
    blocks' fused tails and Δt's gradient without the controller). Returns the leaf, for the
    optimizer."""
    dts = [d for stage in model.block_step_sizes() for d in stage]
    counts = [len(stage) for stage in model.tsc_stages()]
    sizes = [d.numel() for d in dts]
    leaf = torch.cat([d.detach() for d in dts]).requires_grad_()

    def block_step_sizes():
        views, out, start = torch.split_with_sizes(leaf, sizes), [], 0
        for n in counts:
            out.append(views[start:start + n])
            start += n
        return out

    model.block_step_sizes = block_step_sizes  # the instance attribute shadows the method
    return leaf


def controller_weights(args, plain: nn.Module) -> list:
    """The conv weights of the plain network ``plain`` that TSC's controller reads: those the TSC
    network of the same model reads, found by parameter name."""
    tsc_model, _ = build_model(args.model, "lstm", args.num_classes)
    names = {id(p): n for n, p in tsc_model.named_parameters()}
    params = dict(plain.named_parameters())
    return [params[names[id(w)]] for stage in tsc_model.controller_inputs() for ws in stage for w in ws]


def host_image_size(args) -> int:
    """--host-image-size, else 8 for the 32-pixel CIFAR models and 32 for 224-pixel ones (8x8 would
    pool a ResNet-50's or a DenseNet-121's map away before its last stage)."""
    return args.host_image_size or (8 if args.model.startswith("cifar_") else 32)


def host_variant_specs(args) -> tuple:
    return HOST_VARIANTS + (HOST_COMPILED_VARIANTS if args.compile else ())


def measure_host(args, progress=None) -> list[HostRow]:
    """The host rows: every host variant's step, interleaved round by round, on one thread.
    Compiled variants compile during their warm-up steps (after torch._dynamo.reset(): the compute
    rows' graphs, built for other shapes, would otherwise make dynamo mark the sizes dynamic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if args.compile:
            torch._dynamo.reset()
        variants = [HostVariant(args, name, tsc, b, compiled) for name, tsc, b, compiled in host_variant_specs(args)]
        for v in variants:
            with backend_mod.use_backend(v.backend_name):
                for _ in range(max(args.warmup, 3 if v.compiled else 1)):
                    v.step()
        run_rounds(variants, args.host_steps, progress)
        rows = [v.host_row() for v in variants]
    finally:
        torch.set_num_threads(threads)
    plain = {r.mode: r for r in rows if r.variant in ("plain", "plain-c")}
    for r in rows:
        base = plain[r.mode]
        if r is not base:
            r.overhead_pct = {p: paired_overhead_pct(r.times_ms[p], base.times_ms[p]) for p in PHASES}
    return rows


def format_host_table(rows: list[HostRow]) -> str:
    head = (f"{'variant':12s} {'backend':7s} {'ops':>6s} {'top':>5s} {'step ms':>8s} {'fwd ms':>7s} {'bwd ms':>7s} "
            f"{'opt ms':>7s}  {'step':>7s} {'fwd':>7s} {'bwd':>7s} {'opt':>7s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ops = "-" if r.ops is None else str(r.ops)
        top = "-" if r.top_ops is None else str(r.top_ops)
        over = "  ".join(f"{r.overhead_pct[p]:+6.1f}%" if r.overhead_pct else f"{'':7s}" for p in PHASES)
        lines.append(f"{r.variant:12s} {r.backend:7s} {ops:>6s} {top:>5s} {r.ms['step']:8.2f} {r.ms['fwd']:7.2f} "
                     f"{r.ms['bwd']:7.2f} {r.ms['opt']:7.2f}  {over}")
    return "\n".join(lines)


def host_summary(rows: list[HostRow]) -> list[str]:
    by = {r.variant: r for r in rows}
    lines = []
    if "tsc-fused" in by:
        lines.append(f"host eager:    tsc-fused vs plain {by['tsc-fused'].overhead_pct['step']:+.1f}%, "
                     f"tsc-fixed vs plain {by['tsc-fixed'].overhead_pct['step']:+.1f}%, "
                     f"tsc-ref vs plain {by['tsc-ref'].overhead_pct['step']:+.1f}%")
    if "plain+pass" in by:
        beyond = paired_overhead_pct(by["tsc-fused"].times_ms["step"], by["plain+pass"].times_ms["step"])
        lines.append(f"host eager:    plain+pass vs plain {by['plain+pass'].overhead_pct['step']:+.1f}% "
                     f"(the controller's passes over the conv weights alone), "
                     f"tsc-fused vs plain+pass {beyond:+.1f}% (TSC's host cost beyond them)")
    if "tsc-leafdt" in by:
        beyond = paired_overhead_pct(by["tsc-fused"].times_ms["step"], by["tsc-leafdt"].times_ms["step"])
        lines.append(f"host eager:    tsc-leafdt vs plain {by['tsc-leafdt'].overhead_pct['step']:+.1f}% "
                     f"(the fused tails and Δt's gradient, no controller), tsc-fused vs tsc-leafdt "
                     f"{beyond:+.1f}% (the controller: its weight passes, LSTM and parameters)")
    if "tsc-auto-c" in by:
        lines.append(f"host compiled: tsc-auto-c vs plain-c {by['tsc-auto-c'].overhead_pct['step']:+.1f}%, "
                     f"tsc-ref-c vs plain-c {by['tsc-ref-c'].overhead_pct['step']:+.1f}%")
    if "plain+pass-c" in by:
        beyond = paired_overhead_pct(by["tsc-auto-c"].times_ms["step"], by["plain+pass-c"].times_ms["step"])
        lines.append(f"host compiled: plain+pass-c vs plain-c {by['plain+pass-c'].overhead_pct['step']:+.1f}%, "
                     f"tsc-auto-c vs plain+pass-c {beyond:+.1f}%")
    if lines:
        lines.append("(host: the step's host cost, tensors so small that compute vanishes; "
                     "% = median of per-round ratios against plain of the same mode)")
    return lines


def format_table(rows: list[Row]) -> str:
    head = (f"{'variant':10s} {'backend':7s} {'params train':>12s} {'params infer':>12s} {'GMAC train':>10s} "
            f"{'GMAC infer':>10s} {'step ms':>9s} {'±':>6s} {'kernels':>8s} {'peak MB':>8s} {'infer ms':>9s} "
            f"{'overhead':>18s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        over = "" if r.overhead_time_pct is None else f"{r.overhead_time_pct:+.1f}% t"
        if r.overhead_kernels_pct is not None:
            over += f" {r.overhead_kernels_pct:+.0f}% k"
        kernels = "-" if r.kernels is None else str(r.kernels)
        infer = "-" if r.infer_ms is None else f"{r.infer_ms:.1f}"
        lines.append(f"{r.variant:10s} {r.backend:7s} {r.params_train:12,d} {r.params_infer:12,d} {r.gmac_train:10.3f} "
                     f"{r.gmac_infer:10.3f} {r.step_ms:9.1f} {r.step_iqr_ms:6.1f} {kernels:>8s} {r.peak_mb:8.1f} "
                     f"{infer:>9s} {over:>18s}")
    return "\n".join(lines)


def paired_overhead_pct(times: list[float], base_times: list[float]) -> float:
    """Median over the timed rounds of time / base time, minus 1, in percent. Round i of every
    variant of a mode ran back to back (run_rounds), so each ratio compares steps taken under the
    same machine conditions."""
    if len(times) != len(base_times) or not times:
        raise ValueError(f"times and base_times must pair up round by round, "
                         f"got {len(times)} and {len(base_times)} steps")
    return 100 * (statistics.median(t / b for t, b in zip(times, base_times)) - 1)


def add_overheads(rows: list[Row]) -> None:
    """Each TSC row's step time (paired per round) and kernels against the plain row of the same mode
    (eager / compiled)."""
    plain = {r.mode: r for r in rows if r.variant in ("plain", "plain-c")}
    for r in rows:
        base = plain[r.mode]
        if r is base:
            continue
        r.overhead_time_pct = paired_overhead_pct(r.step_times_ms, base.step_times_ms)
        if r.kernels is not None and base.kernels:
            r.overhead_kernels_pct = 100 * (r.kernels / base.kernels - 1)


def summary(rows: list[Row]) -> list[str]:
    """One line per mode: the library's TSC step against the plain step and, compiled, against the
    compiled reference (the targets of docs/performance.md), as medians of per-round ratios."""
    by = {r.variant: r for r in rows}
    lines = []
    if "tsc-fused" in by:
        f = by["tsc-fused"]
        lines.append(f"eager:    tsc-fused vs plain {f.overhead_time_pct:+.1f}% time"
                     + (f", {f.kernels - by['plain'].kernels:+d} kernels" if f.kernels is not None else ""))
    if "tsc-auto-c" in by:
        a, ref = by["tsc-auto-c"], by["tsc-ref-c"]
        lines.append(f"compiled: tsc-auto-c vs plain-c {a.overhead_time_pct:+.1f}% time, "
                     f"vs tsc-ref-c {paired_overhead_pct(a.step_times_ms, ref.step_times_ms):+.1f}% time")
    if lines:
        lines.append("(time: median of per-round ratios; step ms: median of each row's own steps)")
    return lines


HISTORY_FIELDS = ("date", "commit", "machine", "torch", "model", "batch", "device", "dtype", "mode", "variant",
                  "backend", "step_ms", "kernels")


def append_history(path: str, args, rows: list[Row], host_rows: list[HostRow] = ()) -> None:
    """Append one CSV row per variant (the results history, bench/results/); host rows have mode
    host-eager / host-compiled, batch --host-batch and their operator calls in the kernels column."""
    import csv
    import datetime
    import os
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    machine = f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip()
    if args.device.startswith("cuda") and torch.cuda.is_available():
        machine = torch.cuda.get_device_name(torch.device(args.device))
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(HISTORY_FIELDS)
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
        for r in rows:
            w.writerow([date, commit, machine, torch.__version__, args.model, args.batch, args.device, args.dtype,
                        r.mode, r.variant, r.backend, f"{r.step_ms:.2f}", "" if r.kernels is None else r.kernels])
        for r in host_rows:
            w.writerow([date, commit, machine, torch.__version__, args.model, args.host_batch, args.device, args.dtype,
                        f"host-{r.mode}", r.variant, r.backend, f"{r.ms['step']:.3f}", "" if r.ops is None else r.ops])


def machine_info(device: str) -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": torch.get_num_threads(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "backends": backend_mod.available_backends()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tsc-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default="cifar_resnet56")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype (fp32: none)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--image-size", type=int, default=None, help="default 32 for CIFAR models, 224 otherwise")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="few steps (a run under a minute on a 2-core CPU)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON")
    p.add_argument("--compile", action="store_true",
                   help="also the three variants under torch.compile, interleaved with the eager ones")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled rows")
    p.add_argument("--history", default=None, help="append one CSV row per variant to this file")
    p.add_argument("--host", action="store_true",
                   help="also the host's share of a step (batch 2, 8x8, one thread: plain, tsc-fused, tsc-fixed, "
                        "tsc-ref; with --compile also compiled)")
    p.add_argument("--host-only", action="store_true", help="only the --host measurement")
    p.add_argument("--host-steps", type=int, default=60, help="interleaved rounds of the --host measurement")
    p.add_argument("--host-batch", type=int, default=2)
    p.add_argument("--host-image-size", type=int, default=None, help="default 8 for CIFAR models, 32 otherwise")
    args = p.parse_args(argv)
    args.host = args.host or args.host_only
    if args.quick:
        args.steps, args.warmup = min(args.steps, 4), min(args.warmup, 1)
    if args.quick:
        args.host_steps = min(args.host_steps, 4)
    for name in ("batch", "steps", "host_steps", "host_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but no CUDA device is available")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    rows: list[Row] = []
    host_rows: list[HostRow] = []
    total = ((0 if args.host_only else args.steps * len(variant_specs(args)))
             + (args.host_steps * len(host_variant_specs(args)) if args.host else 0))
    with tqdm(total=total, desc=f"tsc-bench {args.model}", unit="step", file=sys.stderr) as progress:
        if not args.host_only:
            rows = measure(args, progress)
        if args.host:
            host_rows = measure_host(args, progress)
    if rows:
        add_overheads(rows)
        print(f"tsc-bench: {args.model}, batch {args.batch}, {args.device}, {args.dtype}"
              f"{', channels_last' if args.channels_last else ''}; {args.steps} timed steps per variant, interleaved")
        print(format_table(rows))
        print("\n".join(summary(rows)))
    if host_rows:
        size = host_image_size(args)
        print(f"\ntsc-bench --host: {args.model}, batch {args.host_batch}, {size}x{size}, {args.device}, 1 thread; "
              f"{args.host_steps} rounds, interleaved")
        print(format_host_table(host_rows))
        print("\n".join(host_summary(host_rows)))
    if args.history:
        append_history(args.history, args, rows, host_rows)
    if args.json_path:
        payload = {"config": {k: v for k, v in vars(args).items()}, "machine": machine_info(args.device),
                   "rows": [asdict(r) for r in rows], "host_rows": [asdict(r) for r in host_rows]}
        with open(args.json_path, "w") as fh:
            json.dump(payload, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
