"""CUDA launch plans of residual_update, scale_concat, the BatchNorm tail, multistep_update,
ode_combine and weight_mean (issue 22, CUDA side), checked on the CPU.

The plans come from the host code the CUDA launchers run (csrc/launch_geometry.h, csrc/*_plan.h,
answered by tsc::cuda_launch_plan), so each finding of the issue is a property of a plan here:
  1. per-channel merges / chunk sums / partial sums are fixed-order folds of at most 64 dependent steps;
  2. the contiguous multistep backward reads 32 adjacent positions per warp (>= 128-byte requests);
  3. the planes kernels flatten (sample, position): every warp full on a 7x7 map;
  4. the channels-last rows kernels get ~1024 blocks (>= 2 * SMs), not a fixed 64 chunks;
  8. bf16 / half reductions load pairs (4-byte lanes, 128-byte requests); their walk over items (a
     plane's odd head or tail value alone) runs on the host too (tsc::_channel_reduction_walk) and is
     compared with a twin written out in Python over odd sizes.
The fixed merge order of the BatchNorm statistics runs on the host too (tsc::_bn_merge_chunks) and
is compared with the statistics of the data, as is one statistics thread's shifted-sums accumulation
(tsc::_bn_shifted_moments). No GPU is needed: tensors live on the meta device.
"""
from __future__ import annotations

import math

import pytest
import torch

import tsc_kernels  # noqa: F401  (loads tsc_kernels._C: the planners and tsc::cuda_launch_plan)
from tsc_kernels._launch_plan import launch_plan
from tsc_kernels.launch_rules import (MAX_CHAIN, batch_norm_args, meta_tensor, multistep_args, ode_args, residual_args,
                                      scale_concat_args)

SMS = 132


def flatten(args):
    """launch_plan.h's flattening of forward arguments given in schema order, by Python type (here
    rather than through launch_plan, whose schema-based flattening does not take Tensor? yet)."""
    tensors, ints, floats = [], [], []
    for a in args:
        if isinstance(a, list):
            ints.append(len(a))
            tensors.extend(a)
        elif a is None or isinstance(a, torch.Tensor):
            tensors.append(a)
        elif isinstance(a, (bool, int)):
            ints.append(int(a))
        else:
            floats.append(float(a))
    return tensors, ints, floats


def plan_of(case, sms=SMS):
    op, args = case
    names, f = torch.ops.tsc.cuda_launch_plan(op, *flatten(args), sms)
    return [
        dict(
            kernel=n.split(":", 1)[1],
            phase=n.split(":", 1)[0],
            grid=tuple(f[8 * i : 8 * i + 3]),
            threads=f[8 * i + 3],
            bytes=f[8 * i + 4],
            chain=f[8 * i + 5],
            request_bytes=f[8 * i + 6],
            smem=f[8 * i + 7],
        )
        for i, n in enumerate(names)
    ]


def test_launch_plan_answers_with_the_cuda_planner():
    case = residual_args((64, 32, 56, 56), torch.bfloat16, True)
    assert launch_plan(case[0], *case[1], backend="cuda", sms=SMS) == plan_of(case)


def launch(plan, kernel):
    found = [p for p in plan if p["kernel"] == kernel]
    assert len(found) == 1, f"{kernel} expected once in {[p['kernel'] for p in plan]}"
    return found[0]


def blocks(p):
    return math.prod(p["grid"])


# -- finding 4: channels-last rows kernels fill the GPU ---------------------------------------------
ROWS = [
    ("residual", residual_args((64, 32, 56, 56), torch.bfloat16, True), "residual_backward_kernel"),
    ("resnet18", residual_args((64, 64, 56, 56), torch.bfloat16, True), "residual_backward_kernel"),
    (
        "densenet40-k12",
        scale_concat_args((64, 148, 32, 32), (64, 12, 32, 32), torch.bfloat16, True),
        "scale_concat_backward_kernel",
    ),
    (
        "densenet121-k32",
        scale_concat_args((64, 224, 56, 56), (64, 32, 56, 56), torch.bfloat16, True),
        "scale_concat_backward_kernel",
    ),
]


@pytest.mark.parametrize("case,kernel", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_rows_kernels_fill_the_gpu(case, kernel):
    """A fixed 64 chunks gave DenseNet's k = 12-32 64 blocks and ResNet-18's C = 64 128 blocks on 132 SMs."""
    p = launch(plan_of(case), kernel)
    assert p["threads"] == 256 and p["grid"][0] * 32 * 2 >= case[1][1].shape[1]  # 32 lanes of bf16 channel pairs
    assert blocks(p) >= 2 * SMS, p


# -- finding 3: planes kernels keep every lane busy on small maps -----------------------------------
PLANES = [
    ("residual-7x7", residual_args((256, 2048, 7, 7), torch.float32, False), "residual_backward_kernel"),
    (
        "densenet121-block4",
        scale_concat_args((64, 992, 7, 7), (64, 32, 7, 7), torch.float32, False),
        "scale_concat_backward_kernel",
    ),
    ("cifar-8x8", residual_args((128, 64, 8, 8), torch.float32, False), "residual_backward_kernel"),
]


@pytest.mark.parametrize("case,kernel", [r[1:] for r in PLANES], ids=[r[0] for r in PLANES])
def test_planes_kernels_flatten_samples_and_positions(case, kernel):
    """Walking one 7x7 plane per step left 207 of 256 threads idle and a 17-lane warp (68-byte requests)."""
    p = launch(plan_of(case), kernel)
    assert p["request_bytes"] >= 128, p
    assert p["chain"] <= MAX_CHAIN


# -- finding 1: parallel, fixed-order finalizes ---------------------------------------------------
FOLDS = [
    # (id, case, the reduction whose chunks are folded, the fold)
    (
        "bn-forward-cl-bf16",
        batch_norm_args((64, 32, 56, 56), torch.bfloat16, True),
        "bn_stats_kernel",
        "bn_forward_channels_kernel",
    ),
    (
        "bn-backward-cl",
        batch_norm_args((64, 256, 56, 56), torch.float32, True),
        "bn_backward_sums_kernel",
        "bn_backward_channels_kernel",
    ),
    (
        "bn-planes-c12",
        batch_norm_args((128, 12, 32, 32), torch.float32, False),
        "bn_stats_kernel",
        "bn_forward_channels_kernel",
    ),
    (
        "residual-cl",
        residual_args((64, 256, 56, 56), torch.float32, True),
        "residual_backward_kernel",
        "fold_chunks_kernel",
    ),
    (
        "residual-cl-c32",
        residual_args((64, 32, 56, 56), torch.bfloat16, True),
        "residual_backward_kernel",
        "fold_chunks_kernel",
    ),
    (
        "scale-concat-cl",
        scale_concat_args((64, 148, 32, 32), (64, 12, 32, 32), torch.float32, True),
        "scale_concat_backward_kernel",
        "fold_chunks_kernel",
    ),
    (
        "ode",
        ode_args((64, 256, 56, 56), torch.float32, False),
        "ode_combine_backward_kernel",
        "ode_combine_sum_partials_kernel",
    ),
]


@pytest.mark.parametrize("case,reduction,fold", [f[1:] for f in FOLDS], ids=[f[0] for f in FOLDS])
def test_folds_are_short_chains(case, reduction, fold):
    """Many chunks (> 64, so a thread walking them in a row would break the rule), folded in <= 64 steps."""
    plan = plan_of(case)
    r, f = launch(plan, reduction), launch(plan, fold)
    chunks = r["grid"][1] if fold != "ode_combine_sum_partials_kernel" else r["grid"][0]
    assert chunks > MAX_CHAIN, r
    assert f["chain"] == math.ceil(chunks / 32) + 5 <= MAX_CHAIN, f
    assert r["chain"] <= MAX_CHAIN


@pytest.mark.parametrize("shape", [(64, 256, 56, 56), (256, 2048, 7, 7), (64, 2048, 7, 7)])
def test_multistep_finalize_is_parallel(shape):
    """The one-block finalize walked N * C / 256 values (dk), N (ddt) and C (dkeep) in a row."""
    plan = plan_of(multistep_args(shape, torch.float32, False))
    N, C = shape[:2]
    fold, dk = launch(plan, "multistep_fold_kernel"), launch(plan, "multistep_dk_kernel")
    assert blocks(fold) == math.ceil(C / 8) + N  # a warp per channel, a block per sample (keep given)
    assert max(fold["chain"], dk["chain"]) <= MAX_CHAIN
    assert max(fold["chain"], dk["chain"]) < min(N * C // 256, C)


# -- finding 2: coalesced multistep backward for contiguous tensors --------------------------------
@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(64, 256, 56, 56), (64, 2048, 7, 7)])
def test_multistep_backward_coalesced(shape, cl):
    p = launch(plan_of(multistep_args(shape, torch.float32, cl)), "multistep_backward_kernel")
    assert p["request_bytes"] >= 128, p  # lanes S elements apart gave 4-byte requests
    assert blocks(p) >= 2 * SMS


@pytest.mark.parametrize("shape,cl", [((64, 32, 56, 56), True), ((16, 2048, 7, 7), False), ((8, 64, 56, 56), True)])
def test_multistep_backward_fills_the_gpu_at_small_n_c(shape, cl):
    """A block per (sample, 32 channels) gave (64, 32, 56, 56) channels-last 64 blocks: positions are
    split into chunks when N * channel tiles is small (shape-only), and the fold covers every chunk's row."""
    plan = plan_of(multistep_args(shape, torch.bfloat16, cl))
    p, fold = launch(plan, "multistep_backward_kernel"), launch(plan, "multistep_fold_kernel")
    assert blocks(p) >= 2 * SMS, p
    assert fold["chain"] <= MAX_CHAIN


def test_multistep_backward_grid_has_no_65535_cap():
    """(sample, channel tile) flattened on grid x: C = 2^20 channel-first 3x3 needs 65536 blocks (channel groups
    of 32 adjacent channels' 36-byte planes per block, 128-byte requests)."""
    p = launch(plan_of(multistep_args((2, 1 << 20, 3, 3), torch.float32, False)), "multistep_backward_kernel")
    assert p["grid"][0] == 2 * (1 << 20) // 32 > 65535 and p["grid"][1:] == (1, 1)
    assert p["request_bytes"] == 128 and p["chain"] == 9


# -- finding 8: bf16 / half reductions load pairs (4-byte lanes, 128-byte warp requests) ----------
PAIRS = [
    ("residual-nchw", residual_args((64, 256, 56, 56), torch.bfloat16, False), "residual_backward_kernel"),
    ("residual-cl", residual_args((64, 64, 56, 56), torch.bfloat16, True), "residual_backward_kernel"),
    ("bn-stats-nchw", batch_norm_args((128, 16, 32, 32), torch.bfloat16, False), "bn_stats_kernel"),
    ("bn-stats-cl", batch_norm_args((256, 2048, 7, 7), torch.bfloat16, True), "bn_stats_kernel"),
    ("bn-sums-nchw", batch_norm_args((64, 64, 56, 56), torch.bfloat16, False), "bn_backward_sums_kernel"),
    ("bn-sums-cl", batch_norm_args((64, 256, 56, 56), torch.bfloat16, True), "bn_backward_sums_kernel"),
    (
        "scale-concat-nchw",
        scale_concat_args((64, 224, 56, 56), (64, 32, 56, 56), torch.bfloat16, False),
        "scale_concat_backward_kernel",
    ),
    # rows of C = 16 (CIFAR's first stage, channels-last): 8 lanes of pairs x 4 rows per warp (fp32: 16 x 2)
    ("residual-cl-c16", residual_args((128, 16, 32, 32), torch.bfloat16, True), "residual_backward_kernel"),
    ("bn-sums-cl-c16", batch_norm_args((128, 16, 32, 32), torch.bfloat16, True), "bn_backward_sums_kernel"),
]


@pytest.mark.parametrize("case,kernel", [p[1:] for p in PAIRS], ids=[p[0] for p in PAIRS])
def test_half_precision_reductions_load_pairs(case, kernel):
    """One 2-byte value per lane gave 64-byte warp requests; pairs give 128 (fp32's), with a shared
    slot per channel of a pair (twice fp32's shared memory per thread, one acc type)."""
    op, args = case
    p = launch(plan_of(case), kernel)
    assert p["request_bytes"] == 128, p
    fp32 = launch(plan_of((op, tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a
                                      for a in args))), kernel)
    assert fp32["request_bytes"] == 128 and p["smem"] == 2 * fp32["smem"]
    assert p["chain"] <= MAX_CHAIN and blocks(p) >= 2 * SMS


SCALE_CONCAT_PACKS = [  # (x, f, layout, dtype, elements per thread expected)
    ((64, 148, 32, 32), (64, 12, 32, 32), False, torch.bfloat16, 8),
    ((64, 992, 7, 7), (64, 32, 7, 7), False, torch.bfloat16, 8),   # 7x7 planes: 992 * 49 and 32 * 49 are multiples of 8
    ((64, 148, 32, 32), (64, 12, 32, 32), True, torch.bfloat16, 2),  # rows of 148 + 12: 16-byte packs would straddle
    ((64, 148, 32, 32), (64, 12, 32, 32), True, torch.float32, 4),
    ((8, 3, 7, 7), (8, 5, 7, 7), False, torch.bfloat16, 1),         # odd shares of a row: one element at a time
    ((8, 3, 7, 7), (8, 5, 7, 7), False, torch.float32, 1),
]


@pytest.mark.parametrize("x,f,cl,dtype,per", SCALE_CONCAT_PACKS)
def test_scale_concat_forward_packs_never_straddle(x, f, cl, dtype, per):
    """The forward's packs (scale_concat_pack): the widest of 16 bytes, a bf16 / half pair or one element
    dividing both x's and f's share of an out row, so no pack holds values of both; a warp moves 32 packs."""
    p = launch(plan_of(scale_concat_args(x, f, dtype, cl)), "scale_concat_forward_kernel")
    es = torch.empty((), dtype=dtype).element_size()
    assert p["request_bytes"] == 32 * per * es, p
    inner = 1 if cl else math.prod(x[2:])
    assert (x[1] * inner) % per == 0 and (f[1] * inner) % per == 0


def group_twin(outer, C, inner, es):
    """launch_geometry.h's plan_channel_groups written out: (group, pack) where a block covers `group` adjacent
    channels' planes of each sample (planes under 128 bytes, C a whole group, the columns within 48 KB), else None."""
    if inner == 1 or inner * es >= 128:
        return None
    pack = 2 if es == 2 and (C * inner) % 2 == 0 else 1
    group = 1
    while (group * inner) % (32 * pack):
        group *= 2
    acc = 8 if es == 8 else 4
    if C < group or (256 * (2 if es == 2 else 1) + group * inner) * 3 * acc > 48 * 1024:
        return None
    return group, pack


def walk_twin(outer, C, inner, es, chunk, value_lanes, lanes, tiles, chunks):
    """launch_geometry.h's walk_reduction_items / walk_group_items written out directly: for every thread of
    the grid (tile, chunk, x, y, in the order tsc::_channel_reduction_walk lists them), its items in order:
    (channel of the first element, first element, count)."""
    groups = group_twin(outer, C, inner, es)
    if groups:
        group, pack = groups
        out = []
        for tile in range(tiles):
            for j in range(chunks):
                for x in range(lanes):
                    c0 = tile * group
                    run = min(group, C - c0) * inner
                    for s in range(x * pack, run, 256 * pack):
                        for o in range(j * chunk, min(outer, (j + 1) * chunk)):
                            out.append((tile, j, x, 0, c0 + s // inner, (o * C + c0) * inner + s, min(pack, run - s)))
        return out, pack, group * inner // pack, outer
    rows = inner == 1
    pack = 2 if es == 2 and (not rows or C % 2 == 0) else 1
    per_plane = 1 if rows else -(-inner // pack)
    items = outer * per_plane
    out = []
    for tile in range(tiles):
        for j in range(chunks):
            for x in range(lanes):
                for y in range(value_lanes):
                    c = (tile * lanes + x) * pack if rows else tile
                    if c >= C:
                        continue
                    for q in range(j * chunk + y, min(items, (j + 1) * chunk), value_lanes):
                        if rows:
                            out.append((tile, j, x, y, c, q * C + c, pack))
                            continue
                        o, k = divmod(q, per_plane)
                        base = (o * C + c) * inner
                        head = base % pack
                        lo, hi = max(0, k * pack - head), min(inner, k * pack + pack - head)
                        out.append((tile, j, x, y, c, base + lo, hi - lo))
    return out, pack, per_plane, items


WALKS = [  # (outer, C, inner, element size): planes of odd sizes (7x7, 3x3: planes start at odd elements), a
    # plane longer than the 256 value lanes, even planes; rows of an odd C (no pairs), a partial 64-channel tile;
    # channel groups (planes under 128 bytes, C >= a group): fp32 / bf16 / fp64 3x3 and bf16 7x7 runs, a shorter
    # last group, an odd C x inner (no pairs), several chunks of samples
    (200, 3, 49, 2), (64, 5, 9, 2), (3, 2, 1025, 2), (7, 4, 56, 2), (1, 3, 3, 2),
    (300, 130, 1, 2), (3000, 6, 1, 2), (500, 7, 1, 2), (40, 3, 49, 4), (300, 70, 1, 4), (50, 3, 49, 8),
    (3, 64, 9, 4), (2, 130, 9, 2), (3, 65, 9, 2), (2, 64, 49, 2), (5, 40, 7, 8), (4, 33, 3, 2), (9, 64, 9, 2),
]


@pytest.mark.parametrize("outer,C,inner,es", WALKS, ids=["x".join(map(str, w)) for w in WALKS])
def test_reduction_walk_pairs_cover_every_value_once(outer, C, inner, es):
    """The items the CUDA reduction kernels walk (run on the host by the same walk_reduction_items /
    walk_group_items): every value of the (outer, C, inner) view exactly once, pairs (2-byte types) start at
    even elements (4-byte aligned loads), an item never straddles two planes (channels, rows), except in
    channel groups, whose items are `pack` adjacent values of a run of adjacent channels' planes (a slot
    per value), and the walk is the one written out in walk_twin (a wrong head / tail split, chunk
    boundary or group differs there)."""
    walk, plan = torch.ops.tsc._channel_reduction_walk(outer, C, inner, es)
    lanes, value_lanes, tiles, chunks, chunk, pack, per_plane, items, rows, group = plan.tolist()
    groups = group_twin(outer, C, inner, es)
    assert group == (groups[0] if groups else 0)
    twin, t_pack, t_per_plane, t_items = walk_twin(outer, C, inner, es, chunk, value_lanes, lanes, tiles, chunks)
    assert (pack, per_plane, items, rows) == (t_pack, t_per_plane, t_items, int(inner == 1))
    assert [tuple(r) for r in walk.tolist()] == twin
    c, first, n = walk[:, 4], walk[:, 5], walk[:, 6]
    assert bool(((n >= 1) & (n <= pack)).all())
    if not group:
        assert pack == (2 if es == 2 and (inner > 1 or C % 2 == 0) else 1)
    assert bool((first[n == 2] % 2 == 0).all())  # pairs start at even elements
    last = first + n - 1
    if group:  # runs of whole warp windows (32 items of a full group: 128-byte requests), value j in slot j
        assert per_plane % 32 == 0 and (lanes, value_lanes) == (256, 1) and bool(((first // inner) % C == c).all())
        assert bool((first // (C * inner) == last // (C * inner)).all())  # one sample's run
    elif inner > 1:  # one plane, channel c, per item
        assert bool((first // inner == last // inner).all()) and bool(((first // inner) % C == c).all())
    else:  # the item's channels are the thread's c .. c + n - 1 of one row
        assert bool((first % C == c).all()) and bool((first // C == last // C).all())
    covered = torch.cat([first + k for k in range(pack)])[torch.cat([n > k for k in range(pack)])]
    assert torch.equal(covered.sort().values, torch.arange(outer * C * inner))
    if es == 2 and inner > 1 and not group:
        assert int((n == 1).sum()) == (outer * C if inner % 2 else 0)  # one single value per odd plane


def test_reduction_walk_bad_input():
    with pytest.raises(RuntimeError, match="small positive"):
        torch.ops.tsc._channel_reduction_walk(0, 3, 49, 2)


# -- determinism: reductions' partitions do not depend on the SM count ----------------------------
ALL = [
    residual_args((64, 256, 56, 56), torch.float32, True),
    residual_args((128, 16, 32, 32), torch.float32, False),
    batch_norm_args((64, 64, 56, 56), torch.bfloat16, True),
    scale_concat_args((64, 148, 32, 32), (64, 12, 32, 32), torch.float32, False),
    multistep_args((64, 256, 56, 56), torch.float32, False),
    ode_args((64, 256, 56, 56), torch.float32, False),
]
ELEMENTWISE = {"residual_forward_kernel", "bn_apply_kernel", "bn_backward_apply_kernel", "scale_concat_forward_kernel",
               "multistep_forward_kernel", "ode_combine_forward_kernel"}


@pytest.mark.parametrize("case", ALL, ids=[c[0] for c in ALL])
def test_only_elementwise_grids_follow_the_sm_count(case):
    small, large = plan_of(case, sms=20), plan_of(case, sms=SMS)
    assert [p["kernel"] for p in small] == [p["kernel"] for p in large]
    for a, b in zip(small, large):
        if a["kernel"] in ELEMENTWISE:
            assert blocks(a) <= 32 * 20 < blocks(b), (a, b)  # grid-stride caps: 32 blocks per SM
        else:
            assert a == b


# -- the BatchNorm merge order, run on the host ---------------------------------------------------
def chunk_moments(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    out = []
    for part in torch.split(x, sizes):
        mean = part.mean() if len(part) else torch.tensor(0.0, dtype=x.dtype)
        out.append(torch.stack([torch.tensor(float(len(part)), dtype=x.dtype), mean, ((part - mean) ** 2).sum()]))
    return torch.stack(out, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunks", [1, 5, 33, 100, 1000])
def test_bn_merge_tree_matches_the_statistics(chunks, dtype):
    """Chunks of uneven sizes (some empty), far from zero mean: the lane-then-tree Chan merge the
    CUDA per-channel kernel runs gives the data's count, mean and M2."""
    g = torch.Generator().manual_seed(chunks)
    sizes = torch.randint(0, 37, (chunks,), generator=g).tolist()
    sizes[0] = max(sizes[0], 2)
    x = (torch.randn(sum(sizes), generator=g, dtype=torch.float64) * 3 + 100).to(dtype)
    merged = torch.ops.tsc._bn_merge_chunks(chunk_moments(x, sizes))
    x64 = x.double()
    expected = torch.tensor(
        [float(len(x)), x64.mean().item(), ((x64 - x64.mean()) ** 2).sum().item()], dtype=torch.float64
    )
    tol = dict(rtol=1e-5, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(merged.double(), expected, **tol)


def test_bn_merge_tree_bad_input():
    with pytest.raises(RuntimeError, match="partial must be"):
        torch.ops.tsc._bn_merge_chunks(torch.zeros(2, 4))


# -- a statistics thread's shifted sums (bn_stats_kernel calls push_shifted / shifted_to_moments) ----------------
def welford32(x: torch.Tensor) -> tuple[float, float]:
    """The per-value Welford update the statistics kernel ran before (push_moment), in fp32: mean, M2."""
    one, n, mean, m2 = torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0)
    for v in x:
        n = n + one
        delta = v - mean
        mean = mean + delta / n
        m2 = m2 + delta * (v - mean)
    return mean.item(), m2.item()


@pytest.mark.parametrize(
    "mean, std, n",
    [(1e3, 1e-1, 300), (-4e4, 2.0, 257), (0.0, 1.0, 300), (1.0, 1e-4, 129), (5e2, 0.0, 65), (7.0, 3.0, 2)],
)
def test_bn_shifted_moments_match_fp64(mean, std, n):
    """Large |mean| / σ, tiny σ, a constant channel, two values: one thread's fp32 count, mean and M2 from sums
    around its first value (tsc::_bn_shifted_moments, the header functions bn_stats_kernel runs) are within a
    few fp32 ulps of the fp64 statistics of the same values, and M2 no worse than the per-value Welford update
    (1e-6 relative at most where Welford is better: a mean near 0)."""
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g, dtype=torch.float64) * std + mean).float()
    count, mu, m2 = torch.ops.tsc._bn_shifted_moments(x).tolist()
    x64 = x.double()
    mu64, m264 = x64.mean().item(), ((x64 - x64.mean()) ** 2).sum().item()
    assert count == n
    eps = torch.finfo(torch.float32).eps
    assert abs(mu - mu64) <= 4 * eps * abs(mu64) + 4 * eps * std, (mu, mu64)
    assert abs(m2 - m264) <= 1e-5 * m264 + 1e-30, (m2, m264)
    if std > 0:
        w_mu, w_m2 = welford32(x)
        assert abs(m2 - m264) <= max(abs(w_m2 - m264), 1e-6 * m264), (m2, w_m2, m264)
    else:
        assert m2 == 0.0 and mu == mean


def test_bn_shifted_moments_empty_and_bad_input():
    assert torch.ops.tsc._bn_shifted_moments(torch.zeros(0)).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(RuntimeError, match="values must be"):
        torch.ops.tsc._bn_shifted_moments(torch.zeros(2, 4))


# -- tsc::cuda_launch_plan itself -----------------------------------------------------------------
def test_cuda_launch_plan_bad_input():
    y = meta_tensor(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="no CUDA planner for op 'nope'"):
        torch.ops.tsc.cuda_launch_plan("nope", [y], [], [], SMS)
    with pytest.raises(RuntimeError, match="sms must be positive"):
        torch.ops.tsc.cuda_launch_plan("residual_update", [y, y, meta_tensor(3)], [1], [], 0)
    with pytest.raises(RuntimeError, match="expected 3 tensors"):
        torch.ops.tsc.cuda_launch_plan("residual_update", [y, y], [1], [], SMS)
    with pytest.raises(RuntimeError, match="dt must be"):  # the launcher's own checks run on the arguments
        torch.ops.tsc.cuda_launch_plan("residual_update", [y, y, meta_tensor(4)], [1], [], SMS)


def test_planner_is_host_code():
    """The planners run without a GPU (here, and in the CPU-only compat build): meta tensors, any SM count."""
    for case in ALL:
        plan = plan_of(case, sms=1)
        assert plan and all(p["phase"] in ("forward", "backward") for p in plan)
        assert all(p["smem"] <= 48 * 1024 and p["threads"] in (32, 64, 96, 128, 256) for p in plan)


def test_weight_mean_batches():
    """48 weights per launch (the kernel parameter holds their metadata): 100 weights -> 3 launches each phase;
    the forward has a warp per row (an output channel's contiguous (C_in, 3x3) values)."""
    weights = [meta_tensor(5 + i % 3, 4, 3, 3) for i in range(100)]
    plan = plan_of(("weight_mean", (weights,)))
    assert [p["kernel"] for p in plan] == ["weight_mean_kernel"] * 3 + ["weight_mean_backward_kernel"] * 3
    items = [sum(w.shape[0] for w in weights[i:i + 48]) for i in (0, 48, 96)]
    assert [p["grid"][0] for p in plan[:3]] == [min(math.ceil(n / 8), 32 * SMS) for n in items]


def test_weight_mean_aliased_adds_every_conv_gradient_in_one_launch_per_48_weights():
    """A training step's w̄ (tsc::_weight_mean_aliased): weight_mean's launches, then in the backward
    one grid-stride launch per 48 weights adding w̄'s gradients into the convs' dW (every value read
    and written once, a warp on 32 adjacent values) where autograd launches an add per weight:
    54 weights of CIFAR ResNet-56's widths take 2, 32 of ResNet-50's 1."""
    cifar = [meta_tensor(c, c, 3, 3) for c in (16, 32, 64) for _ in range(18)]
    plan = plan_of(("_weight_mean_aliased", (cifar,)))
    assert plan[:-2] == plan_of(("weight_mean", (cifar,)))
    adds = plan[-2:]
    assert [(p["kernel"], p["phase"]) for p in adds] == [("add_wbar_grads_kernel", "backward")] * 2
    values = [sum(w.numel() for w in cifar[i:i + 48]) for i in (0, 48)]
    assert [p["bytes"] for p in adds] == [2 * 4 * n for n in values]
    assert [p["grid"][0] for p in adds] == [min(math.ceil(n / 256), 32 * SMS) for n in values]
    assert all(p["request_bytes"] == 128 and p["chain"] <= 7 for p in adds)
    r50 = [meta_tensor(c, c, 3, 3, dtype=torch.bfloat16) for c in (64, 128, 256, 512) for _ in range(8)]
    assert [p["kernel"] for p in plan_of(("_weight_mean_aliased", (r50,)))][-2:] == [
        "weight_mean_backward_kernel", "add_wbar_grads_kernel"]

