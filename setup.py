"""Build of tsc_kernels._C (C++ CPU kernels always; CUDA kernels when possible).

Environment:
  TSC_BUILD_CUDA=auto|0|1   auto (default): build the CUDA kernels when torch is a CUDA build and
                            nvcc is found; 0: skip them; 1: require them (fail if impossible).
  TORCH_CUDA_ARCH_LIST      GPU architectures, default "8.0;9.0" (sm_80, sm_90).
  CUDA_HOME                 CUDA toolkit root, default /usr/local/cuda when it exists.
  TSC_CPU_NATIVE=1          compile the CPU kernels with -march=native (off by default).
ptxas register/spill statistics (-Xptxas -v) are printed in the build log (make keeps it in
build/build.log and build/ptxas.txt).
"""
import glob
import os
import shutil

from setuptools import setup

os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    # torch guesses CUDA_HOME from the nvcc on PATH (/usr/local/bin/nvcc -> /usr/local): wrong here.
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402  (after the environment above: cpp_extension reads it at import)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda() -> bool:
    mode = os.environ.get("TSC_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"TSC_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    cuda_home = os.environ.get("CUDA_HOME", "")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    possible = torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc)
    if mode == "1" and not possible:
        raise SystemExit("TSC_BUILD_CUDA=1 but torch is not a CUDA build or nvcc was not found (set CUDA_HOME)")
    return possible


def cuda_include_dirs() -> list:
    """Headers torch's CUDA headers include (cuSPARSE, cuBLAS) ship in the nvidia wheels."""
    try:
        import nvidia
    except ImportError:
        return []
    return [p for base in nvidia.__path__ for p in glob.glob(os.path.join(base, "cu*", "include"))]


cxx_flags = ["-O3", "-std=c++20"]
if os.environ.get("TSC_CPU_NATIVE") == "1":
    cxx_flags.append("-march=native")
sources = sorted(glob.glob("csrc/*.cpp"))
if want_cuda():
    sources += sorted(glob.glob("csrc/*.cu"))
    ext = CUDAExtension(
        "tsc_kernels._C",
        sources,
        include_dirs=[os.path.abspath("csrc")] + cuda_include_dirs(),
        extra_compile_args={
            "cxx": cxx_flags + ["-DTSC_WITH_CUDA"],
            "nvcc": ["-O3", "-std=c++20", "-Xptxas=-v", "-lineinfo", "-DTSC_WITH_CUDA"],
        },
        py_limited_api=False,
    )
else:
    ext = CppExtension(
        "tsc_kernels._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": cxx_flags},
    )

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
