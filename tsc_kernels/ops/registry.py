"""One declaration per op: the registry every layer of tsc-kernels reads.

An op is declared once, with ``define(OpDef(...))`` in ``tsc_kernels/ops/<name>.py``: its name,
forward and backward schemas, the reference implementation, the fake (meta) functions, the
autograd formula, the Triton module that implements it and what ``auto`` runs under
``torch.compile``. From that one declaration:

  tsc::<name>, tsc::<name>_backward     C++ kernels, csrc/<name>_cpu.cpp and csrc/<name>_cuda.cu
                                        (schemas in the _cpu.cpp); ``define`` adds their fakes and,
                                        unless the C++ side carries it (cpp_autograd), the autograd formula
  tsc::<name>_triton,                   triton_kernels/<name>.py: ``@triton_forward(name)`` and
  tsc::<name>_backward_triton           ``@triton_backward(name)`` turn its launchers into custom ops with
                                        the same schemas, fakes and autograd formula
  tsc::<name>_torch                     the reference (tsc_kernels.reference), CompositeImplicitAutograd:
                                        PyTorch differentiates it and inductor can fuse it

Autograd formulas: an op's formula is its OpDef's ``setup_context`` / ``backward`` (Python), which
``define`` and ``triton_backward`` register for every backend. An op declared ``cpp_autograd=True``
has the same formula a second time, in C++ (csrc/<name>_autograd.cpp, the Autograd kernel of
tsc::<name>, run once per block without a Python call). Which one is canonical depends on the backend:

  cpu, cuda (tsc::<name>)               the C++ formula; ``define`` registers no Python one
  triton (tsc::<name>_triton)           the Python formula (setup_context / backward)
  torch (tsc::<name>_torch)             PyTorch's autograd of the reference (neither formula)

The two formulas must agree bitwise: tests/ops/test_autograd_formulas.py drives the Python formula
with the cpu backend's backward op and compares it with autograd through the C++ formula, for every
op in ``OPS`` with cpp_autograd=True. A change to one formula is a change to both.

``dispatch(name, device)`` returns the op the current backend selection runs, and the tests
(tests/tooling/test_registry.py) read ``OPS`` to check every backend of every op against its declaration.
Every other list of ops is derived from ``OPS`` too, read when it is built (triton_kernels/aot.py
``modules``, tsc_kernels/gpu_check.py ``test_files``, gpu-check's op table, the Makefile's bench-ops
glob); tests/tooling/test_op_list.py proves a new op reaches each, and that the C++ schemas (csrc/<name>_cpu.cpp)
are the declared ones. The files a new op needs: docs/adding_an_op.md.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from .. import _extension, backend

# What `auto` runs for an op while torch.compile traces the caller (docs/backends.md):
# "reference": the reference math, which inductor fuses with its neighbours (elementwise tails);
# "fused": the fused op, opaque to inductor (worth it when the fused kernel replaces many launches).
WHEN_COMPILING = ("reference", "fused")


@dataclass(frozen=True)
class OpDef:
    name: str
    schema: str  # forward schema without the name, "(Tensor y, ...) -> Tensor"
    backward_schema: str
    reference: Callable  # implementation of tsc::<name>_torch
    fake: Callable  # register_fake of the forward (fused backends)
    fake_backward: Callable
    # The Python autograd formula: canonical for the triton backend, and for cpu/cuda unless cpp_autograd
    setup_context: Callable  # register_autograd's setup_context
    backward: Callable  # backward(backward_op, ctx, *grads) -> gradients of the forward's inputs
    reference_schema: str | None = None  # when the reference returns less than the fused op (no saved state)
    # The C++ op registers its autograd formula itself (Autograd dispatch key, csrc/<name>_autograd.cpp):
    # canonical for cpu/cuda, bitwise equal to setup_context/backward (tests/ops/test_autograd_formulas.py)
    cpp_autograd: bool = False
    mutates_args: tuple[str, ...] = ()
    triton_module: str | None = None  # tsc_kernels._triton.<module>; default: the op's name
    when_compiling: str = "fused"

    def __post_init__(self):
        if self.when_compiling not in WHEN_COMPILING:
            raise ValueError(f"when_compiling must be one of {WHEN_COMPILING}, got {self.when_compiling!r}")

    @property
    def module(self) -> str:
        return f"tsc_kernels._triton.{self.triton_module or self.name}"

    def op(self, suffix: str = "") -> torch._ops.OpOverloadPacket:
        """torch.ops.tsc.<name><suffix>: suffix "", "_backward", "_triton", "_backward_triton" or "_torch"."""
        return getattr(torch.ops.tsc, self.name + suffix)

    def returns_saved(self, op) -> bool:
        """Whether `op` (one of this op's backends) returns the fused ops' extra outputs (saved state)."""
        return self.reference_schema is None or op is not self.op("_torch")


OPS: dict[str, OpDef] = {}
_LIB = torch.library.Library("tsc", "FRAGMENT")  # Autograd kernels of ops that mutate inputs


def _register_autograd_of_mutating_op(op: OpDef, forward: str, backward_op) -> None:
    """The autograd formula of an op that mutates some inputs (running statistics, never
    differentiated), as its Autograd kernel: torch.library.register_autograd refuses such ops, and
    this is what it would register (an autograd.Function calling the op below autograd)."""
    forward_op = getattr(torch.ops.tsc, forward)

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            with torch._C._AutoDispatchBelowAutograd():
                output = forward_op(*args)
            op.setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return op.backward(backward_op, ctx, *grads)

    Function.__name__ = f"{forward}_autograd"
    # allow_override: a torch.library.custom_op (the Triton ops) registers its own Autograd kernel
    # from Python, whose autograd formula it refuses for mutating ops; this replaces it. torch 2.11
    # rejects the second Python registration without the flag; 2.14 happens to accept it.
    _LIB.impl(forward, lambda *args: Function.apply(*args), "Autograd", allow_override=True)


def _register_glue(op: OpDef, forward: str, backward_name: str, autograd: bool = True) -> None:
    """register_fake for a (forward, backward) pair of `op` and the autograd formula of the forward."""
    torch.library.register_fake(f"tsc::{forward}")(op.fake)
    torch.library.register_fake(f"tsc::{backward_name}")(op.fake_backward)
    if not autograd:
        return
    backward_op = getattr(torch.ops.tsc, backward_name)
    if op.mutates_args:
        _register_autograd_of_mutating_op(op, forward, backward_op)
    else:
        torch.library.register_autograd(f"tsc::{forward}", functools.partial(op.backward, backward_op),
                                        setup_context=op.setup_context)


def define(op: OpDef) -> OpDef:
    """Declare `op`: its reference op, and the fakes and autograd of its C++ ops when they are built."""
    if op.name in OPS:
        raise RuntimeError(f"tsc op {op.name!r} is declared twice")
    torch.library.define(f"tsc::{op.name}_torch", op.reference_schema or op.schema)
    torch.library.impl(f"tsc::{op.name}_torch", "CompositeImplicitAutograd", op.reference)
    if _extension.has_cpp_ops():
        _register_glue(op, op.name, f"{op.name}_backward", autograd=not op.cpp_autograd)
    OPS[op.name] = op
    return op


def on_tensors_device(op_name: str, fn):
    """``fn`` (a Triton launcher) run on its tensors' device: every tensor argument (and every tensor
    of a list argument) must be on the first one's device (ValueError naming the argument: a kernel
    must never get a pointer into another device's memory), and the launches run inside
    ``on_device(first)``, i.e. on that GPU and its current stream, whatever device is current
    (triton_kernels/_launch.py). Every launcher registered by triton_forward / triton_backward gets
    this, so no op can forget it."""
    params = list(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def launcher(*args, **kwargs):
        from tsc_kernels._triton import _launch  # Triton modules only: imported with the first launch

        named = dict(zip(params, args), **kwargs)
        first = next((t for v in named.values() for t in (v if isinstance(v, (list, tuple)) else [v])
                      if isinstance(t, torch.Tensor)), None)
        if first is None:
            return fn(*args, **kwargs)
        _launch.check_same_device(op_name, first, **{
            k: v for k, v in named.items()
            if isinstance(v, torch.Tensor)
            or (isinstance(v, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in v))})
        with _launch.on_device(first):
            return fn(*args, **kwargs)

    return launcher


def triton_forward(name: str):
    """Decorator of triton_kernels/<name>.py's forward launcher: the custom op tsc::<name>_triton
    (run on its tensors' device, see on_tensors_device)."""
    op = OPS[name]
    return lambda fn: torch.library.custom_op(f"tsc::{name}_triton", on_tensors_device(f"tsc::{name}_triton", fn),
                                              mutates_args=op.mutates_args, schema=op.schema)


def triton_backward(name: str):
    """Decorator of the backward launcher (after triton_forward): tsc::<name>_backward_triton (run on
    its tensors' device), then the fakes of both and the autograd formula of the forward."""
    op = OPS[name]

    def wrap(fn):
        custom = torch.library.custom_op(f"tsc::{name}_backward_triton",
                                         on_tensors_device(f"tsc::{name}_backward_triton", fn),
                                         mutates_args=(), schema=op.backward_schema)
        _register_glue(op, f"{name}_triton", f"{name}_backward_triton")
        return custom

    return wrap


# dispatch's answers outside torch.compile: (op name, device, backend setting) -> op. What a setting
# resolves to on a device is fixed for the process (the extension, Triton and the devices are found
# at import), so an op call costs one dict lookup instead of a resolution (tsc-bench --host).
_RESOLVED: dict = {}


def dispatch(name: str, device: torch.device):
    """The op that runs `name` on `device` under the current backend selection.

    Under `auto`, while torch.compile traces the caller, an op declared when_compiling="reference"
    runs its reference math so that inductor fuses it with its neighbours; an explicit backend
    (set_backend / use_backend / TSC_BACKEND other than auto) is always obeyed. Outside
    torch.compile the answer is cached per (op, device, setting).
    """
    if not torch.compiler.is_compiling():
        hit = _RESOLVED.get((name, device, backend._current))
        if hit is not None:
            return hit
    op = OPS[name]
    if op.when_compiling == "reference" and backend.get_backend() == "auto" and torch.compiler.is_compiling():
        return op.op("_torch")
    setting = backend.get_backend()
    resolved = backend.resolve(device)
    if resolved in ("cpu", "cuda"):
        found = op.op()
    elif resolved == "triton":
        try:
            if op.module not in sys.modules:  # the guard also keeps torch.compile from tracing the import
                importlib.import_module(op.module)
        except ImportError as exc:
            raise backend.BackendUnavailableError(
                f"tsc_kernels backend 'triton' is unavailable: importing {op.module} failed ({exc})") from exc
        found = op.op("_triton")
    else:
        found = op.op("_torch")
        if device.type == "cuda" and setting == "auto":
            return found  # not cached: resolve() warns (once) that auto runs the reference on CUDA tensors
    if not torch.compiler.is_compiling():
        _RESOLVED[(name, device, setting)] = found
    return found


def eager_op(name: str, device: torch.device):
    """``(op, checks)`` for a caller that knows it is not being compiled (it checked
    ``torch.compiler.is_compiling()``): dispatch(name, device)'s op as its default overload's C++
    entry point (what ``OpOverload.__call__`` calls, without that Python frame), and whether the op
    checks its arguments itself (the C++ ops of the cpu / cuda backends: every shape, dtype and
    device, TORCH_CHECK before any work). A caller that skips the Python checks must run them when
    ``checks`` is False (the Triton launchers and the reference do not check everything)."""
    key = (name, device, backend._current)
    hit = _EAGER.get(key)
    if hit is None:
        found = dispatch(name, device)
        hit = (found.default._op, found is OPS[name].op())
        if _RESOLVED.get(key) is not found:  # not cached by dispatch (auto's reference on CUDA warns)
            return hit
        _EAGER[key] = hit
    return hit


_EAGER: dict = {}
