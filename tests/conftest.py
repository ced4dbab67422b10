"""Shared fixtures: the test device and the backends that run its tensors, and per-dtype tolerances.

TSC_TEST_DEVICE=cuda (what `make gpu-check` sets) runs the op tests on the GPU: the tensors the
tests create land there (torch's default device) and the ``backend`` fixture runs every backend that
takes CUDA tensors (cuda, triton, torch). Tests that count CPU ops or interpreter launches are
marked ``cpu_only`` and skip there with that reason. Default: cpu.
"""
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import tsc_kernels

# tests/ops (one test_<op>.py per registered op and the suites common to every op), tests/models (the
# networks, training, experiments) and tests/tooling (gpu-check, benches, plans, install, registry):
# test modules import each other by basename (`import test_residual_update`), so every folder is on
# sys.path whichever files pytest collects. No __init__.py: basenames stay unique across the folders.
TEST_DIRS = tuple(Path(__file__).resolve().parent / d for d in ("ops", "models", "tooling"))
for _d in TEST_DIRS:
    if str(_d) not in sys.path:
        sys.path.insert(0, str(_d))

TEST_DEVICE = os.environ.get("TSC_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise pytest.UsageError(f"TSC_TEST_DEVICE must be 'cpu' or 'cuda', got {TEST_DEVICE!r}")
if TEST_DEVICE == "cuda" and not torch.cuda.is_available():
    raise pytest.UsageError("TSC_TEST_DEVICE=cuda needs a CUDA device: torch.cuda.is_available() is False")

# (dtype, atol, rtol) for comparing a backend with the reference. Backends compute in fp32 like the
# reference, so fp32 differences are rounding-order only; fp16/bf16 allow one rounding of the output.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float64: (1e-12, 1e-12),
}



def assert_within_reference_error(fused, ref, inputs, grad, names, factor=2.0, min_terms=1, context=""):
    """flash-attention's criterion, for outputs and gradients: the backend's largest error against the
    reference run in fp64 (on the same inputs, upcast) is at most `factor` times the largest error of
    the reference run in the inputs' own dtype, plus one epsilon of that dtype at the result's scale
    (for results the same-dtype reference gets exactly; sqrt(terms) of them for reductions). Fixed tolerances either
    hide a kernel that
    loses precision in fp16/bf16 or fail one that is more precise than eager PyTorch.

    fused, ref: callables of *inputs; inputs: their arguments (tensors that require grad are
    differentiated); grad: the output's incoming gradient; names: of those gradients, for messages;
    min_terms: the floor's least number of terms, for results that are functions of reductions (a
    normalisation's output depends on its batch statistics: the values per channel)."""
    def fp64(t):
        return t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t

    results = {}
    for label, fn, args, g in (("fused", fused, inputs, grad), ("ref", ref, inputs, grad),
                               ("ref64", ref, [fp64(t) for t in inputs], grad.double())):
        out = fn(*args)
        wrt = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]
        results[label] = [out, *torch.autograd.grad(out, wrt, g)]
    for name, got, same_dtype, exact in zip(("out", *names), results["fused"], results["ref"], results["ref64"]):
        err = (got.double() - exact).abs().max().item()
        ref_err = (same_dtype.double() - exact).abs().max().item()
        # A reduced result (ddt, dk: one value per many inputs) is a single sample of rounding error,
        # so the floor grows like a rounding random walk: sqrt(terms) epsilons.
        terms = max(min_terms, inputs[0].numel() // max(1, exact.numel()))
        floor = torch.finfo(got.dtype).eps * max(1.0, exact.abs().max().item()) * terms ** 0.5
        assert err <= factor * ref_err + floor, (
            f"{name} ({got.dtype}): error {err:.3g} against the fp64 reference, the {same_dtype.dtype} reference's is "
            f"{ref_err:.3g} (allowed {factor} x that + {floor:.2g}){' ' + context if context else ''}")


TEST_BACKENDS = tsc_kernels.available_backends(TEST_DEVICE)
# the fused backends (everything but the reference itself)
FUSED_BACKENDS = [b for b in TEST_BACKENDS if b != "torch"]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "big_for_interpreter: too large for the Triton interpreter; runs on the other backends"
    )
    config.addinivalue_line(
        "markers", "cpu_only: counts CPU ops or interpreter launches; skipped with TSC_TEST_DEVICE=cuda"
    )


def pytest_collection_modifyitems(config, items):
    """Skip cpu_only tests on the GPU; deselect (not skip) big_for_interpreter cases of the triton
    backend under TRITON_INTERPRET=1."""
    if TEST_DEVICE != "cpu":
        skip = pytest.mark.skip(reason=f"counts CPU ops or interpreter launches (TSC_TEST_DEVICE={TEST_DEVICE})")
        for item in items:
            if item.get_closest_marker("cpu_only"):
                item.add_marker(skip)
    if not tsc_kernels.backend.TRITON_INTERPRET:
        return
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        is_triton = params is not None and "triton" in (params.params.get("backend"), params.params.get("fused"))
        (drop if is_triton and item.get_closest_marker("big_for_interpreter") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def count_triton_launches(fn) -> int:
    """Triton kernel launches during fn() under the interpreter (its profile shows host copies, not launches)."""
    from triton.runtime import interpreter

    calls = 0
    original = interpreter.GridExecutor.__call__

    def counting(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        return original(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = counting
    try:
        fn()
    finally:
        interpreter.GridExecutor.__call__ = original
    return calls


@pytest.fixture(params=TEST_BACKENDS)
def backend(request):
    with tsc_kernels.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed_and_device():
    torch.manual_seed(0)
    if TEST_DEVICE == "cpu":
        yield
        return
    torch.set_default_device(TEST_DEVICE)  # factory calls without a device create GPU tensors
    try:
        yield
    finally:
        torch.set_default_device("cpu")


def randomize(model, scale=0.5):
    """(tests of models) Non-trivial BN statistics/affines and controller weights, so Δt and BN are far
    from identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        if hasattr(model, "tsc_controller"):
            for p in model.tsc_controller.parameters():
                p.normal_(0, scale)
    return model


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one intra-op thread (as tsc-experiment and tsc-train's tests do);
    restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
