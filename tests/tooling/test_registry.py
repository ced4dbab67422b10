"""Every declared op (tsc_kernels/ops/registry.py) against its declaration on every backend."""
import importlib

import pytest
import torch

import tsc_kernels  # noqa: F401  (declares every op)
from tsc_kernels import _extension, backend
from tsc_kernels.ops.registry import OPS, dispatch

NAMES = sorted(OPS)


def schema_of(packet) -> str:
    """An op's schema without its name: "(Tensor y, ...) -> Tensor"."""
    s = str(packet.default._schema)
    return s[s.index("("):]


def test_every_op_is_declared():
    assert {"residual_update", "weight_mean", "lstm_controller"} <= set(OPS)


@pytest.mark.parametrize("name", NAMES)
def test_reference_op_matches_declaration(name):
    op = OPS[name]
    assert schema_of(op.op("_torch")) == (op.reference_schema or op.schema)


@pytest.mark.skipif(not _extension.has_cpp_ops(), reason="the C++ extension is not built")
@pytest.mark.parametrize("name", NAMES)
def test_cpp_schemas_match_declaration(name):
    """csrc/<op>_cpu.cpp's schemas and the Python declaration must not drift apart."""
    op = OPS[name]
    assert schema_of(op.op()) == op.schema
    assert schema_of(op.op("_backward")) == op.backward_schema
    assert _extension.has_kernel(name, "CPU") and _extension.has_kernel(f"{name}_backward", "CPU")


@pytest.mark.skipif(
    not backend.TRITON_INTERPRET, reason="needs TRITON_INTERPRET=1 to import the Triton ops on a CPU machine"
)
@pytest.mark.parametrize("name", NAMES)
def test_triton_schemas_match_declaration(name):
    op = OPS[name]
    importlib.import_module(op.module)
    assert schema_of(op.op("_triton")) == op.schema
    assert schema_of(op.op("_backward_triton")) == op.backward_schema


@pytest.mark.parametrize("name", NAMES)
def test_dispatch_follows_the_backend(name, backend):
    suffix = {"cpu": "", "cuda": "", "triton": "_triton", "torch": "_torch"}[backend]
    assert dispatch(name, torch.device("cpu")) is OPS[name].op(suffix)


def test_auto_runs_the_reference_only_while_compiling(monkeypatch):
    """when_compiling="reference" ops run their reference math under torch.compile with `auto`, the
    others their fused op; an explicit backend is always obeyed."""
    assert OPS["residual_update"].when_compiling == "reference"
    cpu = torch.device("cpu")
    with tsc_kernels.use_backend("auto"):
        eager = {n: dispatch(n, cpu) for n in NAMES}
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        for n in NAMES:
            want = OPS[n].op("_torch") if OPS[n].when_compiling == "reference" else eager[n]
            assert dispatch(n, cpu) is want, n
    for name in tsc_kernels.available_backends("cpu"):
        with tsc_kernels.use_backend(name):
            suffix = {"cpu": "", "triton": "_triton", "torch": "_torch"}[name]
            assert dispatch("residual_update", cpu) is OPS["residual_update"].op(suffix)
