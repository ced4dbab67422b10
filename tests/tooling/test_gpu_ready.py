"""GPU readiness of the residual update, weight-mean and controller ops (docs/gpu.md).

Defects a first GPU would show (wrong device/stream, syncs and pageable copies per step, one program
per channel, int32 overflow, grid axis limits, foreign pointers). What the CPU or the Triton
interpreter can show runs here; the GPU cases skip with the reason "needs a CUDA device" and run in
`make gpu-check`.
"""
import contextlib
import importlib
import os
import re
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tsc_kernels
from tsc_kernels import gpu_check_cases, reference
from tsc_kernels.ops.registry import OPS

ROOT = Path(__file__).resolve().parents[2]
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="Triton kernels run on CPU tensors only under TRITON_INTERPRET=1"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_2_cuda = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")

triton = pytest.importorskip("triton")
from tsc_kernels._triton import _launch  # noqa: E402
from tsc_kernels._triton import residual_update as tru  # noqa: E402
from tsc_kernels._triton import _reduce  # noqa: E402
from tsc_kernels._triton import weight_mean as twm  # noqa: E402
from tsc_kernels._triton import lstm_controller as tlc  # noqa: E402
from tsc_kernels._triton import multistep_update as tms  # noqa: E402
from tsc_kernels._triton import scale_concat as tsc_  # noqa: E402


def stage_params(D, C, H, device="cpu"):
    fc_in, lstm, fc_out = torch.nn.Linear(D, H), torch.nn.LSTMCell(H, H), torch.nn.Linear(H, C)
    ps = [
        fc_in.weight,
        fc_in.bias,
        lstm.weight_ih,
        lstm.weight_hh,
        lstm.bias_ih,
        lstm.bias_hh,
        fc_out.weight,
        fc_out.bias,
    ]
    return [p.detach().to(device) for p in ps]


# ------------------------------------------------------------------ 1. launches on the tensors' device

def test_on_device_selects_cuda_device_only_for_cuda_tensors(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: seen.append(d) or contextlib.nullcontext())

    class FakeCuda:
        is_cuda = True
        device = torch.device("cuda", 1)

    with _launch.on_device(FakeCuda()):
        pass
    with _launch.on_device(torch.zeros(1)):
        pass
    assert seen == [torch.device("cuda", 1)]


# test_every_triton_launcher_checks_devices_and_launches_on_the_tensors_device (section 7) runs every
# registered op's launchers, forward and backward, through the dispatcher and directly.


@needs_2_cuda
@pytest.mark.parametrize("be", ["cuda", "triton"])
def test_runs_on_cuda1_while_cuda0_is_current(be):
    if be == "triton" and INTERPRET:
        pytest.skip("the interpreter runs CPU tensors only")
    if be not in tsc_kernels.available_backends("cuda"):
        pytest.skip(f"backend {be} is not available for CUDA tensors")
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    y, f = (
        torch.randn(4, 19, 7, 5, device=dev, requires_grad=True),
        torch.randn(4, 19, 7, 5, device=dev, requires_grad=True),
    )
    dt = torch.rand(19, device=dev, requires_grad=True)
    with tsc_kernels.use_backend(be):
        out = tsc_kernels.residual_update(y, f, dt, relu=True)
        g = torch.autograd.grad(out.sum(), (y, f, dt))
    ref = reference.residual_update(y, f, dt, relu=True)
    want = torch.autograd.grad(ref.sum(), (y, f, dt))
    torch.cuda.synchronize(dev)
    torch.testing.assert_close(out, ref)
    for a, b in zip(g, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ 2/3. backward grids

@pytest.mark.parametrize(
    "N, C, inner", [(128, 16, 32 * 32), (128, 64, 8 * 8), (256, 2048, 7 * 7), (1, 3, 5), (70000, 1, 64 * 1024)]
)
def test_planes_grid_spreads_over_samples_within_limits(N, C, inner):
    (gc, chunks), per = _reduce.planes_grid(N, C, inner)
    assert gc == C and 1 <= chunks <= 65535 and per * chunks >= N and per * (chunks - 1) < N
    if N * inner >= 64 * _reduce.MIN_CHUNK_ELEMS and C < 64:
        assert C * chunks >= 256, "a CIFAR-width backward must keep a GPU's SMs busy"


@pytest.mark.parametrize("R, C", [(64 * 56 * 56, 64), (128 * 32 * 32, 16), (1, 3), (37, 2048), (2**31 // 64, 64)])
def test_rows_grid_splits_rows_within_limits(R, C):
    (tiles, chunks), per = _reduce.rows_grid(R, C)
    assert tiles == triton.cdiv(C, _reduce.ROWS_BLOCK_C) and 1 <= chunks <= 65535
    assert per % _reduce.ROWS_BLOCK_R == 0 and per * chunks >= R and per * (chunks - 1) < R
    if R * C >= 1 << 20 and C <= 64:
        assert chunks >= 64, "channels-last C <= 64 must not be one program"


@needs_interpreter
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_split_backward_matches_reference_and_is_deterministic(monkeypatch, channels_last, relu):
    """Force the multi-chunk path on small shapes: partials + fixed-order sum give the reference's
    ddt, bit-identical from run to run."""
    monkeypatch.setattr(_reduce, "MIN_CHUNK_ELEMS", 1)
    monkeypatch.setattr(_reduce, "ROWS_BLOCK_R", 32)
    y, f = torch.randn(5, 3, 7, 6), torch.randn(5, 3, 7, 6)
    if channels_last:
        y, f = y.movedim(1, -1).contiguous().movedim(-1, 1), f.movedim(1, -1).contiguous().movedim(-1, 1)
        assert _reduce.rows_grid(5 * 42, 3)[0][1] > 1
    else:
        assert _reduce.planes_grid(5, 3, 42)[0][1] > 1
    dt = torch.rand(3)
    out = reference.residual_update(y, f, dt, relu=relu)
    g = torch.randn_like(out)
    run = lambda: torch.ops.tsc.residual_update_backward_triton(g, f, dt, out if relu else None)  # noqa: E731
    dy, df, ddt = run()
    want_ddt = ((torch.where(out > 0, g, 0.0) if relu else g) * f).sum(dim=(0, 2, 3))
    torch.testing.assert_close(ddt, want_ddt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(df, (torch.where(out > 0, g, 0.0) if relu else g) * dt[:, None, None])
    assert torch.equal(run()[2], ddt)


@needs_interpreter
@pytest.mark.parametrize("channels_last", [False, True])
def test_scale_concat_split_backward_matches_reference_and_is_deterministic(monkeypatch, channels_last):
    """scale_concat's backward splits samples / rows like the residual update's (k = 3 channels
    would otherwise be 3 programs, or 1 channels-last, on a GPU of 100+ SMs)."""
    monkeypatch.setattr(_reduce, "MIN_CHUNK_ELEMS", 1)
    x, f = torch.randn(5, 4, 7, 6), torch.randn(5, 3, 7, 6)
    if channels_last:
        x, f = (t.movedim(1, -1).contiguous().movedim(-1, 1) for t in (x, f))
        assert _reduce.rows_grid(5 * 42, 3)[0][1] > 1
    else:
        assert _reduce.planes_grid(5, 3, 42)[0][1] > 1
    dt = torch.rand(3)
    g = torch.randn(5, 7, 7, 6)
    run = lambda: torch.ops.tsc.scale_concat_backward_triton(g, f, dt)  # noqa: E731
    df, ddt = run()
    torch.testing.assert_close(ddt, (g[:, 4:] * f).sum(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(df, g[:, 4:] * dt[:, None, None])
    assert torch.equal(run()[1], ddt)


# ------------------------------------------------------------------ 4. capture safety of the launch path

FORBIDDEN = ("item", "cpu", "tolist", "numpy")


@contextlib.contextmanager
def no_host_sync(monkeypatch, allow_table_build=False):
    """Fail on anything in the launch path that syncs or copies from pageable memory per call."""
    def boom(name):
        def f(*a, **k):
            raise AssertionError(f"{name} called in a launch path")
        return f

    with monkeypatch.context() as m:
        for name in FORBIDDEN:
            m.setattr(torch.Tensor, name, boom(f"Tensor.{name}"))
        if not allow_table_build:
            m.setattr(torch, "tensor", boom("torch.tensor"))
        yield


@needs_interpreter
def test_residual_launchers_never_sync(monkeypatch):
    y, f, dt = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4), torch.rand(3)
    with no_host_sync(monkeypatch):
        out = torch.ops.tsc.residual_update_triton(y, f, dt, True)
        torch.ops.tsc.residual_update_backward_triton(torch.randn_like(out), f, dt, out)


@needs_interpreter
def test_table_launchers_reuse_their_device_table(monkeypatch):
    """Second call with the same weights/parameters: no table is built (no torch.tensor, no copy)."""
    ws = [torch.randn(4, 3, 3, 3), torch.randn(2, 4, 1, 1)]
    params = stage_params(5, 3, 2)
    wbar = torch.randn(2 * 5)
    torch.ops.tsc.weight_mean_triton(ws)
    torch.ops.tsc.lstm_controller_triton(wbar, [2], params)
    with no_host_sync(monkeypatch):
        torch.ops.tsc.weight_mean_triton(ws)
        torch.ops.tsc.lstm_controller_triton(wbar, [2], params)


def test_device_table_cache_keeps_captured_entries(monkeypatch):
    cache = _launch.DeviceTableCache(capacity=2)
    cpu = torch.device("cpu")
    a = cache.get([[1, 2]], 2, cpu)
    assert cache.get([[1, 2]], 2, cpu) is a
    monkeypatch.setattr(_launch, "_capturing", lambda d: True)
    captured = cache.get([[3, 4]], 2, cpu)
    monkeypatch.setattr(_launch, "_capturing", lambda d: False)
    for k in range(5):
        cache.get([[10 + k, 0]], 2, cpu)
    assert len(cache) == 2
    assert cache.get([[3, 4]], 2, cpu) is captured, "a table baked into a captured graph must never be freed"
    assert torch.equal(captured, torch.tensor([[3, 4]]))


# ------------------------------------------------------------------ 6. grid axis limits

def test_weight_mean_8192x8192_grid_fits():
    w = torch.empty(8192, 8192, 1, 1, device="meta")
    fwd = twm.fwd_grid([w, w])
    # row tiles on axis 0 (limit 2^31 - 1), weights on axis 1 (limit 65535); the backward
    # launches one program per weight (it loops over the weight's packed dw̄), so it has no tile axis
    assert fwd == (triton.cdiv(8192, twm.FWD_ROWS), 2)


# ------------------------------------------------------------------ 7. device checks

def raw(custom_op):
    """The Python launcher behind a torch.library.custom_op (called directly: through the dispatcher a
    meta tensor would route the call to the fake kernel)."""
    return custom_op._init_fn


@needs_interpreter
def test_triton_launchers_reject_tensors_on_another_device():
    y, f, dt = torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.rand(3)
    with pytest.raises(ValueError, match="relu_out must be on cpu"):
        raw(tru.residual_update_backward_triton)(y, f, dt, torch.empty(2, 3, 5, device="meta"))
    with pytest.raises(ValueError, match="dt must be on cpu"):
        raw(tru.residual_update_triton)(y, f, dt.to("meta"), False)
    params = stage_params(5, 3, 2)
    wbar = torch.randn(10)
    dt_c, saved = torch.ops.tsc.lstm_controller_triton(wbar, [2], params)
    with pytest.raises(ValueError, match="saved must be on cpu"):
        raw(tlc.lstm_controller_backward_triton)(dt_c, dt_c, wbar, [2], params, saved.to("meta"))
    # grad is the first tensor: the registry's device check (tsc_kernels/ops/registry.py, on_tensors_device)
    # takes its device as the reference and names the first argument that differs
    with pytest.raises(ValueError, match="lstm_controller_backward_triton: dt_packed must be on meta, got cpu"):
        raw(tlc.lstm_controller_backward_triton)(dt_c.to("meta"), dt_c, wbar, [2], params, saved)
    with pytest.raises(ValueError, match=r"weights\[0\] must be on meta, got cpu"):
        raw(twm.weight_mean_backward_triton)(torch.empty(36, device="meta"), [torch.randn(4, 3, 3, 3)])


SUFFIXES = ("_triton", "_backward_triton")


def triton_launchers(ops=None) -> list[str]:
    """tsc::<op>_triton and tsc::<op>_backward_triton of every op of `ops` (default: the registry,
    read now): derived, so a new op's launchers are checked without naming them here."""
    return [name + suffix for name in (OPS if ops is None else ops) for suffix in SUFFIXES]


def _op_and_suffix(launcher: str) -> tuple[str, str]:
    return next((launcher.removesuffix(s), s) for s in SUFFIXES[::-1] if launcher.endswith(s))


def launcher_call(launcher: str) -> tuple[object, tuple]:
    """(the custom op, its CPU arguments) of one Triton launcher. The forward's arguments are the
    op's gpu-check case at its first tiny spec (fp32, contiguous: tsc_kernels/gpu_check_cases.py,
    one per registered op); the backward's are the ones the op's autograd formula passes it after
    that forward, recorded at the dispatcher."""
    name, suffix = _op_and_suffix(launcher)
    case = gpu_check_cases.case_of(name)
    with torch.device("cpu"):
        args = case.build(case.tiny[0], torch.float32, False)
    op = OPS[name]
    custom = getattr(importlib.import_module(op.module), launcher)
    if suffix == "_triton":
        return custom, args
    recorded = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            if func._schema.name == f"tsc::{launcher}":
                recorded.append(a)
            return func(*a, **(kw or {}))

    out = op.op("_triton")(*args)
    first = out[0] if isinstance(out, (tuple, list)) else out
    leaves = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])
              if isinstance(t, torch.Tensor) and t.requires_grad]
    with Record():
        torch.autograd.grad(first, leaves, torch.randn_like(first), allow_unused=True)
    assert len(recorded) == 1, f"{launcher} ran {len(recorded)} times in one backward"
    return custom, recorded[0]


def optional_tensor_args(schema: str) -> list[int]:
    """Positions of the `Tensor?` arguments of a schema "(...) -> ..."."""
    args = torch._C.parse_schema(f"tsc::x{schema}").arguments
    return [i for i, a in enumerate(args)
            if isinstance(a.type, torch.OptionalType) and isinstance(a.type.getElementType(), torch.TensorType)]


def test_some_launchers_take_optional_tensors():
    """The None variant below is not vacuous: some forward takes absent optional tensors."""
    assert optional_tensor_args("(Tensor a, Tensor? b, Tensor[] c, Tensor?[] d, int? e) -> Tensor") == [1]
    assert any(optional_tensor_args(op.schema) for op in OPS.values())


def _last_tensor_on_meta(args: tuple) -> tuple:
    """args with the last tensor (or the last tensor of the last list holding one) moved to meta."""
    args = list(args)
    for i in reversed(range(len(args))):
        a = args[i]
        if isinstance(a, torch.Tensor):
            args[i] = torch.empty_like(a, device="meta")
            return tuple(args)
        if isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in a):
            k = max(j for j, t in enumerate(a) if isinstance(t, torch.Tensor))
            args[i] = [*a[:k], torch.empty_like(a[k], device="meta"), *a[k + 1:]]
            return tuple(args)
    raise AssertionError("no tensor argument")


@needs_interpreter
@pytest.mark.parametrize("launcher", triton_launchers())
def test_every_triton_launcher_checks_devices_and_launches_on_the_tensors_device(monkeypatch, launcher):
    """Each launcher is wrapped by the registry (tsc_kernels/ops/registry.py, on_tensors_device):
    called directly, a tensor on another device is a ValueError naming it; through the dispatcher
    and directly, it runs inside on_device(its first tensor) (on CUDA: that tensor's device)."""
    custom, args = launcher_call(launcher)
    name, _ = _op_and_suffix(launcher)
    tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, torch.Tensor)]
    assert len(tensors) >= 2, "the device check needs a second tensor to compare"
    with pytest.raises(ValueError, match=rf"^tsc::{launcher}: \S+ must be on cpu, got meta$"):
        raw(custom)(*_last_tensor_on_meta(args))
    entered = []
    real = _launch.on_device
    monkeypatch.setattr(_launch, "on_device", lambda t: entered.append(t.device) or real(t))
    raw(custom)(*args)
    assert entered == [torch.device("cpu")]
    getattr(torch.ops.tsc, launcher)(*args)
    assert entered == [torch.device("cpu")] * 2
    # The device check skips absent optional tensors: the forward with every `Tensor?` argument None
    # (multistep_update's dt and keep, the BatchNorm tail's running statistics, weight and bias).
    optional = optional_tensor_args(OPS[name].schema)
    if launcher == f"{name}_triton" and optional:
        raw(custom)(*(None if i in optional else a for i, a in enumerate(args)))
        assert entered == [torch.device("cpu")] * 3


@needs_cuda
def test_cuda_ops_reject_tensors_on_another_device():
    if "cuda" not in tsc_kernels.available_backends("cuda"):
        pytest.skip("the CUDA kernels are not built")
    y = torch.randn(2, 3, 5, device="cuda")
    with pytest.raises(RuntimeError, match="relu_out must be on"):
        torch.ops.tsc.residual_update_backward(y, y, torch.rand(3, device="cuda"), torch.rand(2, 3, 5))
    params = stage_params(5, 3, 2, "cuda")
    wbar = torch.randn(10, device="cuda")
    dt, saved = torch.ops.tsc.lstm_controller(wbar, [2], params)
    with pytest.raises(RuntimeError, match="saved must be on"):
        torch.ops.tsc.lstm_controller_backward(dt, dt, wbar, [2], params, saved.cpu())


# ------------------------------------------------------------------ 5. int64 indices (GPU only)

@needs_cuda
@pytest.mark.parametrize("be", ["cuda", "triton"])
def test_more_than_2_31_elements_per_channel(be):
    if be not in tsc_kernels.available_backends("cuda"):
        pytest.skip(f"backend {be} is not available for CUDA tensors")
    free, _ = torch.cuda.mem_get_info()
    n = (1 << 31) + 4096
    if free < 7 * 2 * n:
        pytest.skip(f"needs {7 * 2 * n >> 30} GiB of free GPU memory")
    f = torch.ones(1, 1, n, dtype=torch.bfloat16, device="cuda")
    g = torch.ones_like(f)
    dt = torch.full((1,), 0.5, device="cuda")
    with tsc_kernels.use_backend(be):
        op = torch.ops.tsc.residual_update_backward if be == "cuda" else torch.ops.tsc.residual_update_backward_triton
        _, df, ddt = op(g, f, dt, None)
    assert df[0, 0, -1].item() == 0.5 and df[0, 0, 0].item() == 0.5
    torch.testing.assert_close(ddt, torch.tensor([float(n)], device="cuda"), rtol=1e-5, atol=0)


@needs_cuda
@pytest.mark.parametrize("be", ["cuda", "triton"])
def test_weight_mean_8192x8192_on_gpu(be):
    if be not in tsc_kernels.available_backends("cuda"):
        pytest.skip(f"backend {be} is not available for CUDA tensors")
    w = torch.randn(8192, 8192, 1, 1, device="cuda", requires_grad=True)
    with tsc_kernels.use_backend(be):
        wbar = tsc_kernels.weight_mean([w]) if hasattr(tsc_kernels, "weight_mean") else torch.ops.tsc.weight_mean([w])
    torch.testing.assert_close(wbar, reference.weight_mean([w.detach()]), atol=1e-5, rtol=1e-4)
    dw, = torch.autograd.grad(wbar.sum(), w)
    torch.testing.assert_close(dw, torch.full_like(w, 1 / 8192))


# ------------------------------------------------------------------ 10. architectures

def test_default_arch_list_carries_ptx():
    setup = (ROOT / "setup.py").read_text()
    make = (ROOT / "Makefile").read_text()
    assert re.search(r'setdefault\("TORCH_CUDA_ARCH_LIST", "[^"]*\+PTX"\)', setup)
    assert re.search(r"TORCH_CUDA_ARCH_LIST \?= \S*\+PTX", make)


@needs_interpreter
@pytest.mark.parametrize("channels_last", [False, True])
def test_per_element_kernels_agree_in_both_index_widths(monkeypatch, channels_last):
    """INDEX_64 (_launch.index_64) picks int32 or int64 flat indices; a GPU takes the int64 path only
    past 2**31 elements. Force it here on small shapes, so both widths are checked against the
    reference under the interpreter (the int32 path runs in every other test)."""
    shape = (3, 5, 7, 6)

    def rand(*size):
        t = torch.randn(*size, dtype=torch.float64)
        return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t

    u, u_prev, f = rand(*shape), rand(*shape), rand(*shape)
    dt, keep, k = (
        torch.rand(shape[1], dtype=torch.float64),
        torch.rand(shape[0], dtype=torch.float64),
        torch.tensor(-0.05, dtype=torch.float64),
    )
    x, g_sc = rand(3, 4, 7, 6), rand(3, 4 + shape[1], 7, 6)
    grad = rand(*shape)
    results = {}
    for wide in (False, True):
        monkeypatch.setattr(_launch, "index_64", lambda numel, block, wide=wide: wide)
        out_ru = tru.residual_update_triton(u, f, dt, True)
        bwd_ru = tru.residual_update_backward_triton(grad, f, dt, out_ru)
        out_ms = tms.multistep_update_triton(u, u_prev, f, k, dt, keep, False)
        out_sc = tsc_.scale_concat_triton(x, f, dt)
        bwd_sc = tsc_.scale_concat_backward_triton(g_sc, f, dt)
        results[wide] = [out_ru, *bwd_ru, out_ms, out_sc, *bwd_sc]
    torch.testing.assert_close(results[False][0], reference.residual_update(u, f, dt, relu=True))
    torch.testing.assert_close(results[False][4], reference.multistep_update(u, u_prev, f, k, dt, keep))
    torch.testing.assert_close(results[False][5], reference.scale_concat(x, f, dt))
    for narrow, wide in zip(results[False], results[True]):
        torch.testing.assert_close(wide, narrow, rtol=0, atol=0)
