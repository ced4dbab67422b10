"""Build of tsc_kernels._C (C++ CPU kernels always; CUDA kernels when possible).

Environment:
  TSC_BUILD_CUDA=auto|0|1   auto (default): build the CUDA kernels when torch is a CUDA build and
                            nvcc is found; 0: skip them; 1: require them (fail if impossible).
  TORCH_CUDA_ARCH_LIST      GPU architectures, default "8.0;9.0+PTX" (sm_80, sm_90 binaries + compute_90 PTX
                            that newer GPUs (sm_100, sm_120) JIT-compile).
  CUDA_HOME                 CUDA toolkit root, default /usr/local/cuda when it exists.
  TSC_CPU_AVX2=auto|0|1     compile the CPU kernels for AVX2+FMA+F16C (ATen's Vectorized then uses AVX2
                            intrinsics instead of its portable fallback, ~2-5x faster here);
                            auto (default): when the build machine's CPU has avx2 and fma.
ptxas register/spill statistics (-Xptxas -v) are printed in the build log (make keeps it in
build/build.log and build/ptxas.txt).
"""
import glob
import os
import shutil

from setuptools import setup

os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")  # +PTX: no "no kernel image" on sm_100/sm_120
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    # torch guesses CUDA_HOME from the nvcc on PATH (/usr/local/bin/nvcc -> /usr/local): wrong here.
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch  # noqa: E402  (after the environment above: cpp_extension reads it at import)
except ImportError:
    # pyproject.toml deliberately does not list torch as a build requirement: pip would build _C in
    # an isolated environment against whatever torch it downloads there, and that _C fails to load
    # (or crashes) beside the user's own torch. The build must see the torch it installs beside.
    raise SystemExit(
        "tsc-kernels: torch is not importable in the build environment. The extension must be built "
        "against the torch it will run with: install torch first, then build without isolation: "
        "pip install --no-build-isolation tsc-kernels  (or `pip install --no-build-isolation -e .` in the source tree)")
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def write_build_info(with_cuda: bool) -> None:
    """tsc_kernels/_build_info.py: the torch this build compiles against, so that an _C that later fails
    to load under another torch can say which one it was built for (tsc_kernels/_extension.py)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tsc_kernels", "_build_info.py"), "w") as f:
        f.write('"""Written by setup.py at build time (not tracked): what tsc_kernels._C was built against."""\n')
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"TORCH_CUDA = {torch.version.cuda!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")


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


def want_avx2() -> bool:
    mode = os.environ.get("TSC_CPU_AVX2", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"TSC_CPU_AVX2 must be auto, 0 or 1, got {mode!r}")
    if mode != "auto":
        return mode == "1"
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return False
    return all(f in flags for f in ("avx2", "fma", "f16c"))


# -fopenmp: at::parallel_for is an inline OpenMP region; without the flag it silently runs serially.
# The loader resolves libgomp.so.1 to the copy torch already loaded, so there is one thread pool.
cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
link_flags = ["-fopenmp"]
if want_avx2():
    # The same switch ATen's own AVX2 kernels are built with (see ATen/cpu/vec/vec256).
    cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
sources = sorted(glob.glob("csrc/*.cpp"))
with_cuda = want_cuda()
write_build_info(with_cuda)
print(f"tsc-kernels: building tsc_kernels._C against torch {torch.__version__} ({torch.__file__}), "
      f"CUDA kernels: {'yes' if with_cuda else 'no'}")
if with_cuda:
    sources += sorted(glob.glob("csrc/*.cu"))
    ext = CUDAExtension(
        "tsc_kernels._C",
        sources,
        include_dirs=[os.path.abspath("csrc")] + cuda_include_dirs(),
        extra_compile_args={
            "cxx": cxx_flags + ["-DTSC_WITH_CUDA"],
            "nvcc": ["-O3", "-std=c++20", "-Xptxas=-v", "-lineinfo", "-DTSC_WITH_CUDA"],
        },
        extra_link_args=link_flags,
        py_limited_api=False,
    )
else:
    ext = CppExtension(
        "tsc_kernels._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
