"""Launch plans of the Triton ops (issue 22, Triton side) and the fixes they show.

Each triton_kernels/<op>.py has `launch_plan(*forward_args, sms)`, built from the planning
functions its launchers call; the plans are asked here at network shapes on the meta device (no
memory, no data touched). Launchers and plans use the GPU sizes, also under the interpreter
(tests/tooling/test_launch_plans.py compares the two). The merges of per-chunk partials (finding 1) and the
multistep backward tile (finding 2) are checked on the plans, and their kernels run under the
interpreter with small sizes (the `small_sizes` fixture) on small odd shapes whose chunk counts
exceed one merge tile and whose last chunk is short.
"""
import importlib
import os

import pytest
import torch

pytest.importorskip("triton")

from tsc_kernels import reference  # noqa: E402
from tsc_kernels._launch_plan import FIELDS, launch_plan  # noqa: E402
import tsc_kernels._triton._reduce as red  # noqa: E402
import tsc_kernels._triton.batch_norm_residual_update as bn  # noqa: E402
import tsc_kernels._triton.multistep_update as ms  # noqa: E402
import tsc_kernels._triton.ode_combine  # noqa: E402,F401
import tsc_kernels._triton.residual_update  # noqa: E402,F401
import tsc_kernels._triton.scale_concat  # noqa: E402,F401
import tsc_kernels._triton.weight_mean  # noqa: E402,F401
import tsc_kernels  # noqa: E402
from tsc_kernels.ops.registry import OPS as REGISTRY  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton kernels run on CPU only under TRITON_INTERPRET=1")
SMS = 132


def meta(shape, cl=False, dtype=torch.float32):
    t = torch.empty(shape, device="meta", dtype=dtype)
    return t.to(memory_format=torch.channels_last) if cl and len(shape) == 4 else t


def vec(n):
    return torch.empty(n, device="meta")


def _op_module(op):
    """tests/ops/test_<op>.py, which holds the op's entries for these tests (None when it is missing)."""
    try:
        return importlib.import_module(f"test_{op}")
    except ModuleNotFoundError as e:
        if e.name != f"test_{op}":
            raise
        return None


def forward_args(op, shape, cl, dtype):
    """The op's forward arguments at an activation shape (meta tensors): its test module's plan_forward_args."""
    module = _op_module(op)
    if module is None or not hasattr(module, "plan_forward_args"):
        raise AssertionError(f"{op}: add plan_forward_args(shape, cl, dtype, meta) (its forward arguments at an "
                             f"activation shape) to tests/ops/test_{op}.py, or PLAN_NOT_ON_ACTIVATIONS naming the test "
                             "that checks its plans")
    return module.plan_forward_args(shape, cl, dtype, meta)


# The ops whose arguments are activations, planned here at the activation shapes below: every op of
# the registry but those whose test module names PLAN_NOT_ON_ACTIVATIONS (a network's weights and
# controller, not an activation), with the test that checks their plans
NOT_ON_ACTIVATIONS = {op: m.PLAN_NOT_ON_ACTIVATIONS for op in REGISTRY
                      if (m := _op_module(op)) is not None and hasattr(m, "PLAN_NOT_ON_ACTIVATIONS")}
OPS = [name for name in REGISTRY if name not in NOT_ON_ACTIVATIONS]
# the kernels that merge each op's per-chunk partials: PLAN_MERGES of its test module
MERGES = {op: m.PLAN_MERGES for op in OPS if (m := _op_module(op)) is not None and hasattr(m, "PLAN_MERGES")}


def test_ops_are_the_registry():
    """Every op of the registry is planned here or named as an exception; each planned op has its
    forward arguments and its merge kernels (PLAN_MERGES) in its tests/ops/test_<op>.py."""
    assert set(NOT_ON_ACTIVATIONS) <= set(REGISTRY), "an exception the registry does not declare"
    assert set(OPS) | set(NOT_ON_ACTIVATIONS) == set(REGISTRY)
    for op in OPS:
        assert len(forward_args(op, (2, 3, 5, 7), False, torch.float32)) > 0, op
    assert set(OPS) <= set(MERGES), "ops whose per-chunk merges are not named in MERGES"


# the brief's shapes: ResNet-50 stage 1 both layouts, its last stage, a CIFAR-width bf16 channels-last block
SHAPES = [((64, 256, 56, 56), False, torch.float32), ((64, 256, 56, 56), True, torch.float32),
          ((256, 2048, 7, 7), False, torch.float32), ((256, 2048, 7, 7), True, torch.float32),
          ((64, 32, 56, 56), True, torch.bfloat16), ((37, 19, 11, 13), True, torch.float32)]
SHAPE_IDS = [f"{'x'.join(map(str, s))}{'-cl' if cl else ''}-{str(d)[6:]}" for s, cl, d in SHAPES]


def plan_of(op, shape, cl, dtype):
    return launch_plan(op, *forward_args(op, shape, cl, dtype), backend="triton", sms=SMS)


@pytest.mark.parametrize("shape,cl,dtype", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("op", OPS)
def test_plan_fields_and_limits(op, shape, cl, dtype):
    plan = plan_of(op, shape, cl, dtype)
    assert plan and plan[0]["phase"] == "forward" and plan[-1]["phase"] == "backward"
    phases = [launch["phase"] for launch in plan]
    assert phases == sorted(phases, key=lambda p: p != "forward"), "forward launches first"
    for launch in plan:
        assert set(launch) == set(FIELDS)
        gx, gy, gz = launch["grid"]
        assert 1 <= gx < 2**31 and 1 <= gy <= 65535 and 1 <= gz <= 65535, launch
        assert launch["threads"] % 32 == 0 and launch["bytes"] > 0, launch
        assert 1 <= launch["chain"] <= 64, launch
        assert launch["smem"] <= 48 * 1024, launch


def test_weight_mean_plan():
    weights = [meta((64, 3, 7, 7)), meta((256, 64, 1, 1)), meta((512, 256, 3, 3))]
    plan = launch_plan("weight_mean", weights, backend="triton", sms=SMS)
    assert [launch["kernel"] for launch in plan] == ["weight_mean_fwd_kernel", "weight_mean_bwd_kernel"]
    assert plan[0]["grid"] == (512 // 8, 3, 1)  # tiles of the weight with the most rows (GPU ROWS = 8), weights
    assert all(launch["chain"] <= 64 for launch in plan)


# ---------------------------------------------------------------------------------------------
# Finding 1: the merges of per-chunk partials are parallel fixed-order trees, not chunk-by-chunk chains
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", OPS)
def test_merge_chains_are_short_where_chunks_are_many(op):
    # (64, 256, 56, 56) channels-last: 784 BatchNorm chunks, 251 residual chunks (the old merges: a
    # chain of 784 / 251 dependent steps); CIFAR-width bf16: 392 / 784 chunks in one program
    assert op in MERGES, (
        f"{op}: name the kernels that merge its per-chunk partials: PLAN_MERGES in tests/ops/test_{op}.py"
    )
    for shape, cl, dtype in [((64, 256, 56, 56), True, torch.float32), ((64, 32, 56, 56), True, torch.bfloat16)]:
        merges = [launch for launch in plan_of(op, shape, cl, dtype) if launch["kernel"] in MERGES[op]]
        assert merges, f"{op} plans no merge at {shape}"
        assert all(launch["chain"] <= 64 for launch in merges), merges


def test_batch_norm_merge_chain_at_most_chunks():
    # every chunk count up to MAX_CHUNKS (1024 on a GPU) merges within 64 dependent steps, and the
    # old serial merge (chain = chunks) would not
    p = bn._plan(meta((1024 * 16 * 16, 64), False), False, bn.GPU)
    assert p["n_chunks"] == bn.GPU.MAX_CHUNKS
    args = (
        meta((1024 * 16 * 16, 64)),
        meta((1024 * 16 * 16, 64)),
        vec(64),
        None,
        None,
        None,
        None,
        True,
        0.1,
        1e-5,
        False,
    )
    plan = bn.launch_plan(*args)
    finals = [launch for launch in plan if launch["kernel"].endswith("finalize_kernel")]
    assert len(finals) == 2 and max(launch["chain"] for launch in finals) <= 64 < p["n_chunks"]


def test_merge_chain_formula():
    assert red.chain_of(1) == 1 + 5 and red.chain_of(32) == 1 + 5 and red.chain_of(33) == 2 + 5
    assert red.chain_of(1024) == 32 + 5


# ---------------------------------------------------------------------------------------------
# Finding 2: the multistep backward tile follows the shape
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("S", [49, 196, 784, 3136, 2, 9])
def test_multistep_planes_tile_uses_its_lanes(S):
    # the old fixed (2, 256) planes tile used 49 of 256 lanes per row at S = 49 (19 %)
    block_c, block_s = ms.backward_tile(2048, S, False, sizes=ms.GPU)
    assert block_c * block_s == ms.GPU.TILE
    assert min(S, block_s) / block_s >= 0.5, (block_c, block_s)


def test_multistep_last_stage_plan():
    plan = plan_of("multistep_update", (256, 2048, 7, 7), False, torch.float32)
    bwd = next(launch for launch in plan if launch["kernel"] == "multistep_bwd_kernel")
    assert bwd["grid"][0] == 256 * (2048 // 8)  # (8, 64) tiles at S = 49
    fin = next(launch for launch in plan if launch["kernel"] == "multistep_finalize_kernel")
    assert fin["grid"][0] > 1 and fin["chain"] <= 64  # was one program walking N x C


def test_multistep_rows_tile_requests_128_bytes_in_bf16():
    # channels-last bf16 at LM-ResNet-50's last stage: 32 channels x 2 B = 64-byte requests before
    plan = plan_of("multistep_update", (64, 2048, 7, 7), True, torch.bfloat16)
    bwd = next(launch for launch in plan if launch["kernel"] == "multistep_bwd_kernel")
    assert bwd["request_bytes"] >= 128
    assert ms.backward_tile(2048, 49, True, 2, ms.GPU) == (64, 8)
    # where the wide tiles leave too few programs, the positions are split: (64, 256, 56, 56) has 2 x 256
    # programs of 64 channels (it had 512 of 32 channels, 64-byte requests)
    bp = ms.backward_plan(64, 256, 3136, True, 2, ms.GPU)
    assert (bp["BLOCK_C"], bp["BLOCK_S"], bp["splits"], bp["programs"]) == (64, 8, 2, 512)


@pytest.mark.parametrize("op", ["residual_update", "batch_norm_residual_update"])
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("shape", [(128, 16, 32, 32), (128, 64, 8, 8)])
def test_cifar_backward_reductions_fill_the_gpu(op, cl, shape):
    # CIFAR widths: 8-40 MB reductions ran on 128-256 programs (MIN_CHUNK 16384, 32-row tiles)
    for launch in plan_of(op, shape, cl, torch.float32):
        if launch["bytes"] >= 8 << 20:
            assert launch["grid"][0] * launch["grid"][1] >= 2 * SMS, launch


@pytest.mark.parametrize("C,S,cl", [(3, 49, False), (5, 2, False), (3, 1, False), (19, 7, True), (2, 300, False)])
def test_multistep_tiles_within_bounds(C, S, cl):
    for sizes in (ms.GPU, ms.SMALL):
        block_c, block_s = ms.backward_tile(C, S, cl, sizes=sizes)
        assert block_c >= 2 and block_s >= 1 and block_c * block_s <= sizes.TILE
        assert block_c & (block_c - 1) == 0 and block_s & (block_s - 1) == 0


# ---------------------------------------------------------------------------------------------
# The kernels under the interpreter: several merge tiles, a short last chunk, determinism
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def small_sizes(monkeypatch):
    """The modules' small test sizes: merges of 2-chunk x 4-channel tiles, BatchNorm's 32-element
    tiles and <= 3 chunks, multistep's 32-element tiles and 4-wide finalize tiles."""
    monkeypatch.setattr(red, "BLOCK_K", 2)
    monkeypatch.setattr(red, "BLOCK_C", 4)
    monkeypatch.setattr(bn, "RUN", bn.SMALL)
    monkeypatch.setattr(ms, "RUN", ms.SMALL)


@needs_interpreter
@pytest.mark.parametrize("chunks,C", [(1, 3), (2, 5), (7, 9), (5, 1), (0, 3)])
def test_sum_chunks_matches_and_is_deterministic(small_sizes, chunks, C):
    torch.manual_seed(chunks * 10 + C)
    part = torch.randn(chunks, C)
    out, again = torch.empty(C), torch.empty(C)
    red.sum_chunks(part, out)
    red.sum_chunks(part, again)
    torch.testing.assert_close(out, part.sum(0), atol=1e-6, rtol=1e-6)
    assert torch.equal(out, again)


def bn_case(shape, cl, offset=0.5):
    torch.manual_seed(0)
    C = shape[1]
    y = torch.randn(shape)
    x = offset + 2 * torch.randn(shape)
    if cl:
        y, x = y.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    return y, x, torch.rand(C) + 0.1, torch.zeros(C), torch.ones(C), torch.randn(C) + 1, torch.randn(C)


@needs_interpreter
@pytest.mark.parametrize("shape,cl,offset", [((10, 3, 5, 3), False, 0.5), ((7, 6, 5, 3), True, 0.5),
                                             ((7, 6, 5, 3), True, 1000.0)])
def test_batch_norm_merge_over_several_tiles_with_a_short_last_chunk(small_sizes, shape, cl, offset):
    y, x, dt, rm, rv, w, b = bn_case(shape, cl, offset)
    p = bn._plan(y.contiguous(memory_format=torch.channels_last) if cl else y, cl)
    assert p["n_chunks"] > bn.RUN.FINAL_BLOCK_K, "the merge must span several chunk tiles"
    assert p["A"] % p["a_per"] != 0, "the last chunk must be short"
    op = torch.ops.tsc.batch_norm_residual_update_triton
    runs = []
    for _ in range(2):
        x_ = x.clone().requires_grad_()
        out, mean, invstd = op(y, x_, dt, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, True)
        g = torch.randn_like(out, memory_format=torch.preserve_format) if not runs else runs[0][-1]
        grads = torch.ops.tsc.batch_norm_residual_update_backward_triton(g, x, dt, w, b, mean, invstd, out, True)
        runs.append((out, mean, invstd, *grads, g))
    ref = reference.batch_norm_residual_update(y, x, dt, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, True)
    torch.testing.assert_close(runs[0][0], ref, atol=1e-4, rtol=1e-4)
    dims = [0] + list(range(2, x.dim()))
    torch.testing.assert_close(runs[0][1], x.mean(dim=dims), atol=1e-4 * max(1.0, offset), rtol=1e-5)
    torch.testing.assert_close(runs[0][2], 1 / torch.sqrt(x.var(dim=dims, unbiased=False) + 1e-5), atol=1e-4, rtol=1e-3)
    for a, b_ in zip(runs[0][:-1], runs[1][:-1]):
        assert torch.equal(a, b_), "two runs must be bitwise equal"


@needs_interpreter
@pytest.mark.parametrize(
    "shape,cl", [((3, 5, 7, 7), False), ((3, 5, 7, 7), True), ((2, 3, 2), False), ((3, 37, 3, 1), False)]
)
def test_multistep_backward_matches_and_is_deterministic(small_sizes, shape, cl):
    torch.manual_seed(1)
    u, up, f = (torch.randn(shape) for _ in range(3))
    if cl and len(shape) == 4:
        u, up, f = (t.to(memory_format=torch.channels_last) for t in (u, up, f))
    k, dt, keep = torch.tensor([0.3]), torch.rand(shape[1]) + 0.1, torch.rand(shape[0])
    out = reference.multistep_update(u, up, f, k, dt, keep, relu=True)
    g = torch.randn(shape)
    run = lambda: torch.ops.tsc.multistep_update_backward_triton(g, u, up, f, k, dt, keep, out)  # noqa: E731
    first, second = run(), run()
    gm = torch.where(out > 0, g, 0.0)
    dims = [0] + list(range(2, len(shape)))
    torch.testing.assert_close(first[3], (gm * (up - u)).sum().reshape(1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        first[4], (gm * f * keep.view(-1, *[1] * (len(shape) - 1))).sum(dim=dims), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        first[5],
        (gm * f * dt.view(1, -1, *[1] * (len(shape) - 2))).sum(dim=list(range(1, len(shape)))),
        atol=1e-4,
        rtol=1e-4,
    )
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_interpreter
def test_ode_combine_dc_is_deterministic_over_several_programs(small_sizes, monkeypatch):
    # 6 programs of partials (165 values, 32 each), merged by _reduce in 3 tiles of 2 chunks
    monkeypatch.setattr(tsc_kernels._triton.ode_combine, "BWD_BLOCK", 32)
    torch.manual_seed(2)
    g = torch.randn(3, 5, 11)
    stages = [torch.randn(3, 5, 11) for _ in range(3)]
    c = torch.tensor([0.5, -1.0, 2.0])
    run = lambda: torch.ops.tsc.ode_combine_backward_triton(g, stages, c)  # noqa: E731
    (_, dc), (_, dc2) = run(), run()
    torch.testing.assert_close(dc, torch.stack([(g * k).sum() for k in stages]), atol=1e-4, rtol=1e-4)
    assert torch.equal(dc, dc2)

