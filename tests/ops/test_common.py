"""The suite every registered op runs (issue 25, item 3): parametrised over the registry
(``tsc_kernels.ops.registry.OPS``) x the ``backend`` fixture, so a new op is picked up without an
entry here, and fails until its ``tests/ops/test_<op>.py`` declares what the suite needs:

  sample_inputs(dtype, channels_last)  [(args, kwargs), ...]: arguments of ``tsc_kernels.<op>`` (and
                                       ``reference.<op>``, the same signature); the floating tensors
                                       that require grad are differentiated. Tiny shapes that are not
                                       powers of two (the Triton interpreter runs them all)
  empty_inputs()                       [(args, kwargs), ...] with an empty batch; [] and NO_EMPTY_BATCH
                                       (why) for an op without one
  BAD_INPUTS                           [(args, exception, regex), ...]: args a tuple (positional), a dict
                                       (keywords) or a callable returning one (built when the test runs)
  DTYPES, LAYOUTS (optional)           the reference match's dtypes (default fp32, fp16, bf16: what the
                                       fp64 criterion is for) and channels_last values (default both;
                                       (False,) for ops whose tensors have no channel layout);
  GRADCHECK_LAYOUTS (optional)         the fp64 gradcheck's, default LAYOUTS
  reference_inputs(dtype, channels_last)  more samples for the reference match only (optional: larger
                                       shapes, too slow for gradcheck under the interpreter)
  reference_terms(args) (optional)     the fp64 criterion's least number of terms per result (an op
                                       whose outputs come from reductions: conftest.assert_within_reference_error)

Checks, for every op and backend: the reference match per dtype x layout with the fp64-relative
criterion (conftest.assert_within_reference_error: outputs and every gradient) and the reference's
output shape; ``torch.library.opcheck`` of the backend's forward op and of its backward op
(the calls the public function makes, recorded: no per-op argument list); fp64 ``gradcheck``;
``torch.compile(fullgraph=True, backend="aot_eager")`` forward and backward against the reference; an
empty batch (the reference's output shape, zero gradients); each bad input's exception and message.
The hypothesis properties per op are tests/ops/test_properties.py's; the op-specific tests
(determinism, mixed layouts, running statistics, launch counts, ...) stay in each op's file.
"""
import importlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

import tsc_kernels
from tsc_kernels import reference
from tsc_kernels.ops.registry import OPS
from conftest import TOLERANCES, assert_within_reference_error

NAMES = sorted(OPS)
LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)
NEEDS = ("sample_inputs", "empty_inputs", "BAD_INPUTS")


def op_module(name, needs=NEEDS):
    """tests/ops/test_<name>.py (on sys.path: conftest), failing the test when it is missing or lacks
    what the common suite needs."""
    try:
        module = importlib.import_module(f"test_{name}")
    except ModuleNotFoundError as e:
        if e.name != f"test_{name}":
            raise
        pytest.fail(f"op {name!r} of the registry has no tests/ops/test_{name}.py")
    missing = [n for n in needs if not hasattr(module, n)]
    if missing:
        pytest.fail(f"tests/ops/test_{name}.py lacks {', '.join(missing)} (tests/ops/test_common.py's docstring)")
    return module


def _module_or_none(name):
    try:
        return importlib.import_module(f"test_{name}")
    except ModuleNotFoundError:
        return None


def _params(make, arity=1):
    """pytest params over ops x what make(module) adds (arity: values per param): an op whose module
    is missing or incomplete still gets one param, whose test fails saying what is missing."""
    params = []
    for name in NAMES:
        module = _module_or_none(name)
        complete = module is not None and all(hasattr(module, n) for n in NEEDS)
        for extra in make(module) if complete else [(None,) * (arity - 1)]:
            values = (name, *(extra if isinstance(extra, tuple) else (extra,)))[:arity]
            params.append(pytest.param(*values, id="-".join(str(v) for v in values)))
    return params


def _no_extra(module):
    return [None]


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def _dtype_layouts(module):
    if module is None:
        return [None]
    dtypes = getattr(module, "DTYPES", LOW_PRECISION)
    layouts = getattr(module, "LAYOUTS", (False, True))
    return [(_dtype_id(d), "channels_last" if cl else "contiguous") for d in dtypes for cl in layouts]


def _layouts(module):
    layouts = getattr(module, "LAYOUTS", (False, True)) if module is not None else (False,)
    return ["channels_last" if cl else "contiguous" for cl in layouts]


def _gradcheck_layouts(module):
    layouts = getattr(module, "GRADCHECK_LAYOUTS", getattr(module, "LAYOUTS", (False, True))) if module else (False,)
    return ["channels_last" if cl else "contiguous" for cl in layouts]


def _bad(module):
    return list(range(len(module.BAD_INPUTS))) if module is not None else [None]


def _samples(name, dtype, layout):
    samples = op_module(name).sample_inputs(getattr(torch, dtype), layout == "channels_last")
    assert samples, f"test_{name}.sample_inputs({dtype}, {layout}) gave no samples"
    return samples


def _differentiable(args, kwargs):
    """(the floating tensors of args/kwargs that require grad, a function of them calling fn)."""
    leaves, spec = tree_flatten((args, kwargs))
    where = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]

    def call(fn):
        def run(*flat):
            new = list(leaves)
            for i, t in zip(where, flat):
                new[i] = t
            a, k = tree_unflatten(new, spec)
            return fn(*a, **k)
        return run

    return [leaves[i] for i in where], call


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in NAMES])
def test_every_op_has_a_test_module(name):
    module = op_module(name)
    assert callable(module.sample_inputs) and callable(module.empty_inputs) and module.BAD_INPUTS
    assert module.empty_inputs() or getattr(module, "NO_EMPTY_BATCH", ""), (
        f"tests/ops/test_{name}.py: empty_inputs() is empty and NO_EMPTY_BATCH does not say why")


@pytest.mark.parametrize("name, dtype, layout", _params(_dtype_layouts, 3))
def test_matches_the_fp64_reference(backend, name, dtype, layout):
    """A backend's error against the fp64 reference is at most twice the same-dtype reference's own,
    for the output and every gradient; the output has the reference's dtype and shape."""
    fn, ref, module = getattr(tsc_kernels, name), getattr(reference, name), op_module(name)
    extra = module.reference_inputs(getattr(torch, dtype), layout == "channels_last") if hasattr(
        module, "reference_inputs") else []
    for args, kwargs in [*_samples(name, dtype, layout), *extra]:
        flat, call = _differentiable(args, kwargs)
        out, want = call(fn)(*flat), call(ref)(*flat)
        assert out.shape == want.shape  # (the dtype: the op's own tests; weight_mean's is the accumulation's)
        grad = torch.randn_like(want)
        terms = module.reference_terms(args) if hasattr(module, "reference_terms") else 1
        assert_within_reference_error(call(fn), call(ref), flat, grad, [f"d{i}" for i in range(len(flat))],
                                      min_terms=terms, context=f"{kwargs} {[tuple(t.shape) for t in flat]}")


class _ForwardCalls(TorchFunctionMode):
    """The first call of each tsc op the public function makes, with copies of its arguments (the
    forward op of every backend, before autograd)."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)) and str(func).startswith("tsc."):
            self.calls.setdefault(str(func).split(".")[1], (func, *_copy(args, kwargs)))
        return func(*args, **kwargs)


class _BackwardCalls(TorchDispatchMode):
    """The backward ops autograd runs (below autograd: the dispatcher's view), with copies of their arguments."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if str(func).startswith("tsc.") and "_backward" in str(func):
            self.calls.setdefault(str(func).split(".")[1], (func, *_copy(args, kwargs, keep_grad=False)))
        return func(*args, **kwargs)


def _copy(args, kwargs, keep_grad=True):
    """Copies (a mutating op changes its inputs); the backward op's inputs are not differentiated."""
    def copy(t):
        if not isinstance(t, torch.Tensor):
            return t
        return t.detach().clone().requires_grad_(keep_grad and t.requires_grad)
    return tree_map(copy, args), tree_map(copy, kwargs)


@pytest.mark.parametrize("name, layout", _params(_layouts, 2))
def test_opcheck(backend, name, layout):
    """torch.library.opcheck of the forward op the backend runs and of its backward op (the torch
    backend has none: PyTorch differentiates the reference), on the calls the public function makes."""
    fn = getattr(tsc_kernels, name)
    for args, kwargs in _samples(name, "float32", layout):
        forward, backward = _ForwardCalls(), _BackwardCalls()
        flat, call = _differentiable(args, kwargs)
        with forward, backward:
            out = call(fn)(*flat)
            torch.autograd.grad(out, flat, torch.randn_like(out))
        suffix = {"torch": "_torch", "triton": "_triton"}.get(backend, "")
        fwd = forward.calls.get(name + suffix)
        assert fwd is not None, (
            f"tsc_kernels.{name} on {backend} did not call tsc::{name}{suffix}: {list(forward.calls)}"
        )
        torch.library.opcheck(fwd[0], fwd[1], fwd[2])
        if backend == "torch":
            continue
        bwd_name = f"{name}_backward{suffix}"
        if bwd_name in backward.calls:
            bwd = backward.calls[bwd_name]
            torch.library.opcheck(bwd[0], bwd[1], bwd[2])
        else:  # a C++ autograd formula calls the backward op below the Python dispatcher's view
            assert backend in ("cpu", "cuda") and OPS[name].cpp_autograd, (
                f"no {bwd_name} call seen: {list(backward.calls)}")


@pytest.mark.parametrize("name, layout", _params(_gradcheck_layouts, 2))
def test_gradcheck_fp64(backend, name, layout):
    fn = getattr(tsc_kernels, name)
    for args, kwargs in _samples(name, "float64", layout):
        flat, call = _differentiable(args, kwargs)
        assert torch.autograd.gradcheck(call(fn), flat)


@pytest.mark.parametrize("name", _params(_no_extra))
def test_torch_compile_fullgraph(backend, name):
    """The public function inside torch.compile(fullgraph=True) (aot_eager: the graph and its autograd,
    no inductor build), forward and backward, against the reference."""
    fn, ref = getattr(tsc_kernels, name), getattr(reference, name)
    atol, rtol = TOLERANCES[torch.float32]
    for args, kwargs in _samples(name, "float32", "contiguous")[:1]:
        torch._dynamo.reset()
        flat, call = _differentiable(args, kwargs)
        compiled = torch.compile(call(fn), fullgraph=True, backend="aot_eager")
        out, want = compiled(*flat), call(ref)(*flat)
        torch.testing.assert_close(out, want, atol=atol, rtol=rtol)
        grad = torch.randn_like(want)
        for i, (g, w) in enumerate(zip(torch.autograd.grad(out, flat, grad), torch.autograd.grad(want, flat, grad))):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5, msg=lambda m: f"d{i}: {m}")


def _with_empty_batch(module):
    """Ops that have an empty batch (one without says why: NO_EMPTY_BATCH, test_every_op_has_a_test_module)."""
    return [None] if module is None or module.empty_inputs() else []


@pytest.mark.parametrize("name", _params(_with_empty_batch))
def test_empty_batch(backend, name):
    """An empty batch gives the reference's (empty) output and its gradients (zeros where it reduces)."""
    fn, ref = getattr(tsc_kernels, name), getattr(reference, name)
    module = op_module(name)
    for args, kwargs in module.empty_inputs():
        flat, call = _differentiable(args, kwargs)
        out, want = call(fn)(*flat), call(ref)(*flat)
        assert out.shape == want.shape and out.numel() == 0
        got = torch.autograd.grad(out.sum(), flat, allow_unused=True, materialize_grads=True)
        expected = torch.autograd.grad(want.sum(), flat, allow_unused=True, materialize_grads=True)
        for i, (g, w) in enumerate(zip(got, expected)):
            assert g.shape == w.shape and torch.equal(g, torch.zeros_like(w)) and torch.equal(w, torch.zeros_like(w)), i


@pytest.mark.parametrize("name, index", _params(_bad, 2))
def test_bad_input(backend, name, index):
    args, exc, match = op_module(name).BAD_INPUTS[index]
    args = args() if callable(args) else args
    with pytest.raises(exc, match=match):
        if isinstance(args, dict):
            getattr(tsc_kernels, name)(**args)
        else:
            getattr(tsc_kernels, name)(*args)
