"""Shared fixtures: the backends that can run CPU tensors here, and per-dtype tolerances."""
import pytest
import torch

import tsc_kernels

# (dtype, atol, rtol) for comparing a backend with the reference. Backends compute in fp32 like the
# reference, so fp32 differences are rounding-order only; fp16/bf16 allow one rounding of the output.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float64: (1e-12, 1e-12),
}

CPU_BACKENDS = tsc_kernels.available_backends("cpu")
# the fused backends (everything but the reference itself)
FUSED_CPU_BACKENDS = [b for b in CPU_BACKENDS if b != "torch"]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    with tsc_kernels.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
