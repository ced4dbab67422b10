"""The CUDA kernels: built into _C whenever a CUDA toolchain exists (no GPU is needed to check)."""
import os
import shutil

import pytest
import torch

import tsc_kernels  # noqa: F401  (declares every op)
from tsc_kernels import _extension
from tsc_kernels.ops.registry import OPS

CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
HAS_NVCC = torch.version.cuda is not None and (
    os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc") is not None
)
BUILT_WITHOUT_CUDA = os.environ.get("TSC_BUILD_CUDA") == "0"


@pytest.mark.skipif(not HAS_NVCC, reason="no nvcc / CUDA torch on this machine: the CUDA kernels cannot be built")
@pytest.mark.skipif(BUILT_WITHOUT_CUDA, reason="TSC_BUILD_CUDA=0 asked for a build without CUDA kernels")
@pytest.mark.parametrize("op", sorted(name + suffix for name in OPS for suffix in ("", "_backward")))
def test_extension_carries_cuda_kernels(op):
    """Every registered op (tsc_kernels.ops.registry.OPS) and its backward: a CPU and a CUDA kernel."""
    assert _extension.has_cpp_ops(), _extension.LOAD_ERROR
    assert _extension.has_kernel(op, "CUDA"), f"tsc::{op} has no CUDA kernel: was _C built with nvcc?"
    assert _extension.has_kernel(op, "CPU")


# The per-element kernels of cuda_elementwise.cuh (docs/gpu.md, "Index math and loads").
ELEMENTWISE_KERNELS = ("residual_forward_kernel", "multistep_forward_kernel", "bn_apply_kernel",
                       "bn_backward_apply_kernel")
needs_cuda_build = pytest.mark.skipif(not HAS_NVCC or BUILT_WITHOUT_CUDA,
                                      reason="no CUDA kernels in this build "
                                             "(no nvcc / CUDA torch, or TSC_BUILD_CUDA=0)")


def _cuobjdump():
    try:
        import triton.backends.nvidia as nv  # Triton ships cuobjdump; the CUDA toolkit may not
        path = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    except ImportError:
        path = ""
    return path if os.path.exists(path) else shutil.which("cuobjdump")


@pytest.fixture(scope="module")
def sass():
    """[(mangled name, SASS text)] of every kernel in the built extension, all architectures."""
    import re
    import subprocess

    if _cuobjdump() is None:
        pytest.skip("no cuobjdump (neither Triton's nor the CUDA toolkit's) to read the SASS")
    assert _extension.has_cpp_ops(), _extension.LOAD_ERROR
    import tsc_kernels._C as ext

    text = subprocess.run([_cuobjdump(), "-sass", ext.__file__], capture_output=True, text=True, check=True).stdout
    return [tuple(part.split("\n", 1)) for part in re.split(r"\n\s*Function : ", text)[1:]]


# Every integer division routine (32- or 64-bit) starts from a float reciprocal, MUFU.RCP; the
# magic-number division is a multiply-high and a shift, and nothing else in these kernels divides.
DIVISION = "MUFU.RCP"


@pytest.mark.parametrize("kernel", ELEMENTWISE_KERNELS)
@needs_cuda_build
def test_elementwise_kernels_use_32bit_index_math_and_16_byte_loads(sass, kernel):
    """In the compiled SASS: the 32-bit instantiations (index_t = unsigned, the one every tensor
    below 2^31 elements runs) contain no integer division routine, the int64 ones do, and the packed
    ones (W > 1) load and store 16 bytes at a time (LDG.E.128 / STG.E.128)."""
    import re

    found = []
    for name, body in sass:
        m = re.search(kernel + r"ILi(\d+)E([jl])", name)
        if not m:
            continue
        width, index = int(m.group(1)), m.group(2)
        found.append((width, index))
        assert (DIVISION in body) == (index == "l"), \
            f"{name}: {DIVISION} in the int32 variant, or missing in the int64 one"
        if width > 1:
            assert "LDG.E.128" in body and "STG.E.128" in body, \
                f"{name}: the packed variant has no 16-byte loads/stores"
    assert any(w > 1 and i == "j" for w, i in found), f"{kernel}: no packed 32-bit instantiation in the SASS ({found})"
    assert any(i == "l" for _, i in found), f"{kernel}: no 64-bit instantiation for tensors past 2^31 elements"


@needs_cuda_build
def test_scale_concat_forward_divides_in_32_bits(sass):
    """scale_concat's forward finds each output element's source (x or f, its row and channel) by two
    divisions: its 32-bit instantiation (index_t = unsigned) has no division routine, the int64 one has."""
    import re

    found = set()
    for name, body in sass:
        m = re.search(r"scale_concat_forward_kernelILi(\d+)E([jl])", name)
        if m:
            found.add(m.group(2))
            assert (DIVISION in body) == (m.group(2) == "l"), name
            if int(m.group(1)) * 2 == 16:  # bf16 / half 16-byte packs (W = 8)
                assert "LDG.E.128" in body and "STG.E.128" in body, \
                    f"{name}: the packed variant has no 16-byte loads/stores"
    assert found == {"j", "l"}, found


# The reductions whose bf16 / half lanes load pairs (issue 22, finding 8; csrc/launch_geometry.h
# walk_reduction_items): instantiations <..., W = 2, Vec, ...> with Vec = 1 (aligned pointers) and 0.
PAIR_KERNELS = ("residual_backward_kernel", "bn_stats_kernel", "bn_backward_sums_kernel",
                "scale_concat_backward_kernel",
                "multistep_backward_kernel", "ode_combine_backward_kernel")


@pytest.mark.parametrize("kernel", PAIR_KERNELS)
@needs_cuda_build
def test_half_precision_reductions_load_pairs(sass, kernel):
    """In the compiled SASS of the bf16 instantiations: the pair variant (Vec = 1) loads with more
    32-bit LDG.E than the scalar-access one (Vec = 0, a misaligned view: 2-byte LDG.E.U16 only, besides
    its fp32 per-channel values), and fewer 2-byte loads."""
    import re

    counts = {}
    for name, body in sass:
        m = re.search(kernel + r"I(?:Lb[01]E)?Li2ELb([01])EN3c108BFloat16", name)
        if m:
            wide, narrow = len(re.findall(r"LDG\.E(?:\.CONSTANT)? ", body)), len(re.findall(r"LDG\.E\.U16", body))
            counts.setdefault(m.group(1), []).append((wide, narrow))
    assert set(counts) == {"0", "1"}, f"{kernel}: bf16 pair instantiations missing ({counts})"
    for (w1, n1), (w0, n0) in zip(counts["1"], counts["0"]):
        assert w1 > w0 and n1 < n0, (kernel, counts)


# The reductions with channel groups (issue 22; csrc/launch_geometry.h walk_group_items): a thread's slot is
# chosen by the value of its item, which may straddle two planes.
GROUP_KERNELS = ("residual_backward_kernel", "bn_stats_kernel", "bn_backward_sums_kernel", "multistep_backward_kernel")


# The BatchNorm apply passes walk a channels-last pack's channels with a running index (PackChannels): its
# per-element values stay in registers too.
NO_LOCAL_MEMORY_KERNELS = GROUP_KERNELS + ("bn_apply_kernel", "bn_backward_apply_kernel")


@pytest.mark.parametrize("kernel", NO_LOCAL_MEMORY_KERNELS)
@needs_cuda_build
def test_reduction_slots_stay_in_registers(sass, kernel):
    """In the compiled SASS of every instantiation: no local memory (STL / LDL). A slot indexed by a runtime
    value (slots ? j : 0) put the bf16 sums of bn_backward_sums_kernel and residual_backward_kernel on the
    stack; constant indices in each branch keep them in registers."""
    import re

    bodies = [(name, body) for name, body in sass if kernel in name]
    assert bodies, f"{kernel}: not in the build"
    for name, body in bodies:
        assert not re.search(r"\b(STL|LDL)\b", body), f"{name}: local memory"
