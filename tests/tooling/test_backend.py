"""Backend selection: names, the context manager, the environment variable, clear errors."""
import os
import subprocess
import sys

import pytest
import torch

import tsc_kernels
from tsc_kernels import backend as backend_mod
from tsc_kernels import _extension


def test_available_backends_lists_real_ones():
    names = tsc_kernels.available_backends()
    assert "torch" in names
    assert ("cpu" in names) == _extension.has_cpp_ops()
    assert ("cuda" in names) == (torch.cuda.is_available() and _extension.has_cuda_kernels())
    assert set(names) <= {"cuda", "triton", "cpu", "torch"}


def test_auto_picks_cpu_kernels_for_cpu_tensors():
    with tsc_kernels.use_backend("auto"):
        expected = "cpu" if _extension.has_cpp_ops() else "torch"
        assert backend_mod.resolve(torch.device("cpu")) == expected


def test_use_backend_restores_previous():
    before = tsc_kernels.get_backend()
    with tsc_kernels.use_backend("torch") as name:
        assert name == "torch" == tsc_kernels.get_backend()
        with pytest.raises(RuntimeError, match="boom"):
            with tsc_kernels.use_backend("auto"):
                raise RuntimeError("boom")
        assert tsc_kernels.get_backend() == "torch"
    assert tsc_kernels.get_backend() == before


@pytest.mark.parametrize("bad", ["gpu", "", 3, None])
def test_set_backend_rejects_unknown_names(bad):
    with pytest.raises(ValueError, match="backend must be one of auto, cuda, triton, cpu, torch"):
        tsc_kernels.set_backend(bad)


def test_unavailable_backend_raises_clearly():
    y = torch.randn(2, 3)
    with tsc_kernels.use_backend("cuda"):
        with pytest.raises(tsc_kernels.BackendUnavailableError, match="backend 'cuda' is unavailable"):
            tsc_kernels.residual_update(y, y, torch.rand(3))


def _run(code, **env):
    full_env = {k: v for k, v in os.environ.items() if k not in ("TSC_BACKEND", "TRITON_INTERPRET")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)


def test_env_variable_selects_backend():
    res = _run("import tsc_kernels; print(tsc_kernels.get_backend())", TSC_BACKEND="torch")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "torch"
    res = _run("import tsc_kernels", TSC_BACKEND="fastest")
    assert res.returncode != 0 and "TSC_BACKEND must be one of" in res.stderr


def test_triton_on_cpu_needs_the_interpreter():
    code = ("import torch, tsc_kernels; y = torch.randn(2, 3)\n"
            "with tsc_kernels.use_backend('triton'): tsc_kernels.residual_update(y, y, torch.rand(3))")
    res = _run(code)
    assert res.returncode != 0 and "TRITON_INTERPRET=1" in res.stderr
