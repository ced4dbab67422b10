"""The CUDA kernels: built into _C whenever a CUDA toolchain exists (no GPU is needed to check)."""
import os
import shutil

import pytest
import torch

from tsc_kernels import _extension

CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
HAS_NVCC = torch.version.cuda is not None and (
    os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc") is not None
)
BUILT_WITHOUT_CUDA = os.environ.get("TSC_BUILD_CUDA") == "0"


@pytest.mark.skipif(not HAS_NVCC, reason="no nvcc / CUDA torch on this machine: the CUDA kernels cannot be built")
@pytest.mark.skipif(BUILT_WITHOUT_CUDA, reason="TSC_BUILD_CUDA=0 asked for a build without CUDA kernels")
@pytest.mark.parametrize("op", ["residual_update", "residual_update_backward"])
def test_extension_carries_cuda_kernels(op):
    assert _extension.has_cpp_ops(), _extension.LOAD_ERROR
    assert _extension.has_kernel(op, "CUDA"), f"tsc::{op} has no CUDA kernel: was _C built with nvcc?"
    assert _extension.has_kernel(op, "CPU")
