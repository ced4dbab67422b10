"""One autograd formula per op (issue 25, item 6), and no import circle in the package.

An op declared with ``cpp_autograd=True`` has its autograd formula twice: in C++
(csrc/<op>_autograd.cpp, canonical for the cpu / cuda backends) and in Python (the OpDef's
setup_context / backward, canonical for the triton / torch backends); tsc_kernels/ops/registry.py
says which is which. Here the two are held to each other: for every such op in ``OPS`` (a new one
fails until it has a case below), the Python formula driving the cpu backend's
``tsc::<op>_backward`` gives bitwise the gradients that autograd through the C++ formula gives (the
op's public function under ``use_backend("cpu")``), on non-power-of-two shapes, fp32 and fp64, with
and without create_graph.

The import check parses every module of tsc_kernels (and triton_kernels, installed as
tsc_kernels._triton) and fails on any cycle among them, counting imports inside functions too.
"""
from __future__ import annotations

import ast
import importlib
import pathlib
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import tsc_kernels
from tsc_kernels import _extension
from tsc_kernels.ops.registry import OPS

ROOT = pathlib.Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------------------------------
# Import circles
# --------------------------------------------------------------------------------------------------
PACKAGES = {"tsc_kernels": ROOT / "tsc_kernels", "tsc_kernels._triton": ROOT / "triton_kernels"}

# Import edges waiting for a fix in a file outside this test's reach, each with the fix. Keep empty.
PENDING: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
    """module name -> (file, is a package's __init__) for every module of the package."""
    found = {}
    for package, base in PACKAGES.items():
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            found[".".join([package, *parts])] = (path, is_package)
    return found


def _extension_modules() -> set[str]:
    """Compiled modules (tsc_kernels._C): importable names with no .py file."""
    return {f"tsc_kernels.{p.name.split('.')[0]}" for p in (ROOT / "tsc_kernels").glob("*.so")} | {"tsc_kernels._C"}


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, at module level or inside functions: the named
    module (an ancestor package too: ``from . import __version__``), each submodule a ``from X
    import name`` names, and the parent packages the import runs (except the importer's own, which
    are imported before it)."""
    modules = _modules()
    known = set(modules) | _extension_modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in known else base)
        edges = set()
        for target in targets:
            if target not in known:
                continue
            parts = target.split(".")
            if target != name:
                edges.add(target)
            for i in range(1, len(parts)):  # the parent packages its import runs
                module = ".".join(parts[:i])
                if module in known and module != name and not name.startswith(module + "."):
                    edges.add(module)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_import_graph_sees_the_package():
    graph = import_graph()
    assert "tsc_kernels.models.network" in graph["tsc_kernels.models"]
    assert "tsc_kernels.ops.registry" in graph["tsc_kernels.ops.residual_update"]
    assert "tsc_kernels._triton._reduce" in graph["tsc_kernels._triton.residual_update"]
    # a function-level import counts (cli imports loop when it starts a run)
    assert "tsc_kernels.train.loop" in graph["tsc_kernels.train.cli"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
    graph = import_graph()
    for (importer, imported), why in PENDING.items():
        assert imported in graph.get(importer, ()), f"{importer} no longer imports {imported}: drop it from PENDING"
        graph[importer].discard(imported)
    found = cycles(graph)
    assert not found, "import circles among tsc_kernels modules (each group imports itself back): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_public_names_import():
    import tsc_kernels.models as models

    # the module, not the package's attribute `convert` (the function it re-exports)
    convert_module = importlib.import_module("tsc_kernels.convert")

    for name in tsc_kernels.__all__:
        assert getattr(tsc_kernels, name) is not None, name
    for name in models.__all__:
        assert getattr(models, name) is not None, name
    assert convert_module.convert is tsc_kernels.convert


# --------------------------------------------------------------------------------------------------
# One autograd formula per op
# --------------------------------------------------------------------------------------------------
needs_cpp = pytest.mark.skipif(not _extension.has_cpp_ops(), reason="the C++ extension is not built")

CPP_AUTOGRAD = sorted(name for name, op in OPS.items() if op.cpp_autograd)


@dataclass
class Case:
    """One call of an op: its public function and arguments, the differentiable leaves, the op's
    arguments as the public function passes them, and where each leaf's gradient sits in the
    Python formula's output (a function of that output)."""
    public: Callable
    args: tuple
    leaves: list[torch.Tensor]
    op_args: tuple
    leaf_grads: Callable  # Python formula's gradients -> one per leaf, in leaves' order
    grad_outputs: Callable  # gradient of the public output -> the op's grads (None for internal outputs)


def _t(*shape, dtype, positive=False, grad=True):
    t = torch.randn(*shape, dtype=dtype)
    if positive:
        t = t.abs() + 0.5
    return t.requires_grad_(grad)


def _residual_update(dtype, relu):
    y, f, dt = _t(3, 5, 7, 9, dtype=dtype), _t(3, 5, 7, 9, dtype=dtype), _t(5, dtype=dtype, positive=True)
    args = (y, f, dt, relu)
    return Case(tsc_kernels.residual_update, args, [y, f, dt], args, lambda g: g[:3], lambda g: (g,))


def _multistep_update(dtype, relu):
    u, u_prev, f = (_t(3, 5, 7, 6, dtype=dtype) for _ in range(3))
    k, dt, keep = _t((), dtype=dtype), _t(5, dtype=dtype, positive=True), _t(3, dtype=dtype, positive=True)
    args = (u, u_prev, f, k, dt, keep, relu)
    return Case(tsc_kernels.multistep_update, args, [u, u_prev, f, k, dt, keep], args, lambda g: g[:6],
                lambda g: (g,))


def _batch_norm_residual_update(dtype, relu, training=True):
    y, x = _t(3, 5, 7, 6, dtype=dtype), _t(3, 5, 7, 6, dtype=dtype)
    dt, weight, bias = _t(5, dtype=dtype, positive=True), _t(5, dtype=dtype, positive=True), _t(5, dtype=dtype)
    running_mean, running_var = torch.randn(5, dtype=dtype), torch.rand(5, dtype=dtype) + 0.5
    args = (y, x, dt, running_mean, running_var, weight, bias, training, 0.1, 1e-5, relu)
    # the op updates the running statistics in place: each call gets its own copies
    op_args = (y, x, dt, running_mean.clone(), running_var.clone(), weight, bias, training, 0.1, 1e-5, relu)
    return Case(tsc_kernels.batch_norm_residual_update, args, [y, x, dt, weight, bias], op_args,
                lambda g: [g[0], g[1], g[2], g[5], g[6]], lambda g: (g, None, None))


def _weight_mean(dtype, relu):
    weights = [_t(5, 3, 3, 3, dtype=dtype), _t(7, 5, 1, 1, dtype=dtype), _t(3, 6, 5, dtype=dtype)]
    return Case(lambda *ws: tsc_kernels.weight_mean(list(ws)), tuple(weights), weights, (weights,),
                lambda g: list(g[0]), lambda g: (g,))


def _lstm_controller(dtype, relu):
    L, D, H, C = 5, 11, 3, 7
    wbar = _t(L, D, dtype=dtype)
    params = [_t(H, D, dtype=dtype), _t(H, dtype=dtype), _t(4 * H, H, dtype=dtype), _t(4 * H, H, dtype=dtype),
              _t(4 * H, dtype=dtype), _t(4 * H, dtype=dtype), _t(C, H, dtype=dtype), _t(C, dtype=dtype)]
    packed = wbar.detach().reshape(-1).requires_grad_()

    def leaf_grads(g):
        return [g[0].view(L, D), *g[2]]

    return Case(tsc_kernels.lstm_controller, (wbar, *params), [wbar, *params], (packed, [L], params), leaf_grads,
                lambda g: (g.reshape(-1), None))


CASES = {
    "batch_norm_residual_update": _batch_norm_residual_update,
    "lstm_controller": _lstm_controller,
    "multistep_update": _multistep_update,
    "residual_update": _residual_update,
    "weight_mean": _weight_mean,
}


class FormulaContext:
    """What the OpDefs' setup_context / backward read and write of a torch.autograd ctx."""

    def __init__(self, inputs):
        self.needs_input_grad = tuple(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)
        self.saved_tensors: tuple = ()
        self.materialize_grads = True

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def set_materialize_grads(self, value: bool):
        self.materialize_grads = value

    def mark_non_differentiable(self, *tensors):
        pass


def python_formula(name: str, case: Case, grad: torch.Tensor, create_graph: bool) -> list:
    """The leaves' gradients by the OpDef's setup_context + backward around the cpu backend's ops."""
    op = OPS[name]
    with torch.no_grad():
        output = op.op()(*case.op_args)
    ctx = FormulaContext(case.op_args)
    op.setup_context(ctx, case.op_args, output)
    with torch.set_grad_enabled(create_graph):
        grads = op.backward(op.op("_backward"), ctx, *case.grad_outputs(grad))
    return case.leaf_grads(grads)


def test_every_cpp_formula_has_a_case():
    assert CPP_AUTOGRAD, "no op declares cpp_autograd=True"
    assert sorted(CASES) == CPP_AUTOGRAD, "CASES must hold one case builder per op with cpp_autograd=True"


def _variants():
    """(op name, relu) for every op with cpp_autograd=True; relu=True for the ops with a relu flag."""
    import inspect

    for name in CPP_AUTOGRAD:
        yield pytest.param(name, False, id=f"{name}-plain")
        if "relu" in inspect.signature(OPS[name].reference).parameters:
            yield pytest.param(name, True, id=f"{name}-relu")


@needs_cpp
@pytest.mark.parametrize("create_graph", [False, True], ids=["grad", "create_graph"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name, relu", list(_variants()))
def test_python_formula_matches_cpp(name, relu, dtype, create_graph):
    torch.manual_seed(0)
    case = CASES[name](dtype, relu)
    with tsc_kernels.use_backend("cpu"):
        out = case.public(*case.args)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, case.leaves, grad, create_graph=create_graph, allow_unused=True)
    got = python_formula(name, case, grad, create_graph)
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert (g is None) == (e is None), f"{name}: leaf {i}: Python {g is None=}, C++ {e is None=}"
        if e is None:
            continue
        assert (g.shape, g.dtype) == (e.shape, e.dtype), f"{name}: leaf {i}"
        assert torch.equal(g, e), f"{name}: leaf {i}: max |Python - C++| = {(g - e).abs().max().item()}"


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_batch_norm_residual_update_eval_formula_matches_cpp(relu, dtype):
    torch.manual_seed(1)
    case = _batch_norm_residual_update(dtype, relu, training=False)
    with tsc_kernels.use_backend("cpu"):
        out = case.public(*case.args)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, case.leaves, grad)
    got = python_formula("batch_norm_residual_update", case, grad, create_graph=False)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


# --------------------------------------------------------------------------------------------------
# The C++ backward nodes (csrc/autograd_util.h): what torch::autograd::Function gave for free
# --------------------------------------------------------------------------------------------------
def _forward(name, dtype=torch.float64):
    torch.manual_seed(2)
    case = CASES[name](dtype, False)
    with tsc_kernels.use_backend("cpu"):
        out = case.public(*case.args)
    return case, out


@needs_cpp
@pytest.mark.parametrize("name", CPP_AUTOGRAD)
def test_cpp_node_named_and_only_with_grad(name):
    case, out = _forward(name)
    camel = "".join(part.capitalize() for part in name.split("_"))
    nodes, seen = [out.grad_fn], []
    while nodes:  # the public function may view the op's output (lstm_controller)
        node = nodes.pop()
        seen.append(node.name())
        nodes += [n for n, _ in node.next_functions if n is not None and n.name() != "torch::autograd::AccumulateGrad"]
    assert f"{camel}Backward" in seen, seen
    with torch.no_grad(), tsc_kernels.use_backend("cpu"):
        assert not case.public(*case.args).requires_grad
    for leaf in case.leaves:
        leaf.requires_grad_(False)
    with tsc_kernels.use_backend("cpu"):
        assert case.public(*case.args).grad_fn is None


@needs_cpp
@pytest.mark.parametrize("name", CPP_AUTOGRAD)
def test_cpp_node_frees_its_saved_tensors(name):
    case, out = _forward(name)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, case.leaves, grad, retain_graph=True, allow_unused=True)
    again = torch.autograd.grad(out, case.leaves, grad, allow_unused=True)  # the graph is freed after this one
    for a, b in zip(first, again):
        assert (a is None and b is None) or torch.equal(a, b)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(out, case.leaves, grad, allow_unused=True)


@needs_cpp
@pytest.mark.parametrize("name", CPP_AUTOGRAD)
def test_cpp_node_sees_saved_tensors_modified_in_place(name):
    case, out = _forward(name)
    with torch.no_grad():
        for leaf in case.leaves:
            leaf.add_(0)  # bumps the version counter: every op saves at least one of its inputs
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out, case.leaves, torch.randn_like(out), allow_unused=True)


@needs_cpp
@pytest.mark.parametrize("name", CPP_AUTOGRAD)
def test_cpp_node_refuses_forward_ad(name):
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(3)
    case = CASES[name](torch.float64, False)
    leaf = case.leaves[0]
    with fwAD.dual_level():
        dual = fwAD.make_dual(leaf.detach(), torch.randn_like(leaf))
        args = tuple(dual if a is leaf else a for a in case.args)
        with tsc_kernels.use_backend("cpu"), pytest.raises(RuntimeError, match="forward-mode AD is not supported"):
            case.public(*args)
