"""Plumbing of `make gpu-check` (tsc_kernels/gpu_check*.py) on the CPU: the no-GPU exit, the step
runner and the report writer; the op table (every registered op, its builders, minimum bytes,
timing, flags and rendering) and the network checks (every network's training step, the
sync-debug and graph-replay comparisons) run here on tiny shapes with device="cpu", a no-op guard
and an eager stand-in for the capture. Every CUDA entry point they could reach raises here
(no_cuda_calls), so these paths provably never touch torch.cuda."""
import contextlib
import json

import pytest
import torch

import tsc_kernels
from tsc_kernels import gpu_check, gpu_check_cases, gpu_check_networks as nets, gpu_check_ops
from tsc_kernels.ops.registry import OPS

CPU_FUSED = [b for b in tsc_kernels.available_backends("cpu") if b != "torch"]
# the networks' steps: the C++ ops where built, else the reference (never the Triton interpreter:
# minutes per ResNet-50 step)
CPU_BACKEND = "cpu" if "cpu" in CPU_FUSED else "torch"


@pytest.fixture
def no_cuda_calls(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a CPU path of gpu-check called a CUDA API")
    for name in ("synchronize", "Event", "Stream", "CUDAGraph", "graph", "set_sync_debug_mode", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, boom)


def test_exits_2_with_a_clear_message_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--skip-build"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_a_failing_step_is_recorded_and_does_not_stop_the_others(tmp_path):
    results = []
    gpu_check.run_step("ok", lambda: ("passed", {"x": 1}, ""), results)
    gpu_check.run_step("boom", lambda: 1 / 0, results)
    gpu_check.run_step("skip", lambda: ("skipped", {}, "needs 2 CUDA devices"), results)
    assert [r["status"] for r in results] == ["passed", "failed", "skipped"]
    assert "ZeroDivisionError" in results[1]["reason"]
    j, t = gpu_check.write_report(results, tmp_path / "out", {"torch": torch.__version__})
    data = json.loads(j.read_text())
    assert data["status"] == "failed" and [s["name"] for s in data["steps"]] == ["ok", "boom", "skip"]
    text = t.read_text()
    assert text.startswith("tsc-kernels gpu-check: FAILED") and "needs 2 CUDA devices" in text and "x: 1" in text


def test_report_passes_when_every_step_passed_or_skipped(tmp_path):
    results = [dict(name="a", status="passed", numbers={}, reason="", seconds=0.1),
               dict(name="b", status="skipped", numbers={}, reason="r", seconds=0.0)]
    j, _ = gpu_check.write_report(results, tmp_path, {})
    assert json.loads(j.read_text())["status"] == "passed"


def test_report_states_the_total_against_the_budget(tmp_path):
    """The check must fit in gpu_check.BUDGET_SECONDS (8.5 minutes): the report says whether it did; an
    overrun is flagged but is not a failed proof."""
    fast = [dict(name="a", status="passed", numbers={}, reason="", seconds=100.0)]
    slow = [dict(name="a", status="passed", numbers={}, reason="", seconds=300.0),
            dict(name="b", status="passed", numbers={}, reason="", seconds=gpu_check.BUDGET_SECONDS - 299.0)]
    j, t = gpu_check.write_report(fast, tmp_path / "fast", {})
    data = json.loads(j.read_text())
    assert data["within_budget"] and data["total_seconds"] == 100.0 and "OVER BUDGET" not in t.read_text()
    j, t = gpu_check.write_report(slow, tmp_path / "slow", {})
    data = json.loads(j.read_text())
    assert data["status"] == "passed" and not data["within_budget"] and "OVER BUDGET" in t.read_text()


def test_every_step_has_an_estimate_and_the_estimates_fit_the_budget(tmp_path):
    steps = ["build", "tests", "sync_debug", "cuda_graph", "reduce_overhead", "ops", "bench", "host_bound"]
    assert set(gpu_check.ESTIMATE_SECONDS) == set(steps)
    assert sum(gpu_check.ESTIMATE_SECONDS.values()) <= gpu_check.BUDGET_SECONDS  # estimates: never measured on a GPU
    results = [dict(name="ops", status="passed", numbers={}, reason="", seconds=1.0)]
    _, t = gpu_check.write_report(results, tmp_path, {})
    assert f"(est. {gpu_check.ESTIMATE_SECONDS['ops']} s)" in t.read_text()


def _bench_json(rows, host_rows, batch=128):
    return dict(config=dict(batch=batch, host_batch=2),
                rows=[dict(variant=v, mode=mode, overhead_time_pct=pct) for v, mode, pct in rows],
                host_rows=[dict(variant=v, mode=mode, overhead_pct={"step": pct, "fwd": 0.0})
                           for v, mode, pct in host_rows])


def test_host_bound_judges_each_row_against_its_target():
    data = _bench_json([("plain", "eager", None), ("tsc-fused", "eager", 1.9), ("tsc-auto-c", "compiled", 2.1)],
                       [("tsc-fused", "eager", 2.0), ("tsc-fixed", "eager", 0.4), ("tsc-ref", "eager", 50.0)])
    lines, missed = gpu_check.host_bound_verdicts(data)
    assert lines == [
        "batch 128 eager: tsc-fused +1.9 % vs plain (target <= +2 %): met",
        "batch 128 compiled: tsc-auto-c +2.1 % vs plain-c (target <= +2 %): MISSED",
        "host (batch 2) eager: tsc-fused +2.0 % vs plain (target <= +2 %): met",
        "host (batch 2) eager: tsc-fixed +0.4 % vs plain (target <= +0 %): MISSED"]
    assert missed == [lines[1], lines[3]]  # tsc-ref is not judged; compiled host rows absent: not judged
    assert gpu_check.host_bound_verdicts(_bench_json([], [])) == ([], [])


def test_host_bound_step_runs_tsc_bench_and_judges_its_json():
    """The step's own command on the CPU (a small network, a few rounds): every eager row it judges is
    there, and the status follows the verdicts (the numbers themselves are this CPU's, not a GPU's)."""
    status, numbers, reason = gpu_check.step_host_bound(quick=True, full=False, device="cpu", model="cifar_resnet20",
                                                        batch=4, extra=("--host-steps", "2"))
    targets = numbers["targets"]
    assert [t.split(":")[0] + ":" + t.split(":")[1].split()[0] for t in targets] == [
        "batch 4 eager:tsc-fused", "host (batch 2) eager:tsc-fused", "host (batch 2) eager:tsc-fixed"]
    assert "tsc-bench --host: cifar_resnet20" in numbers["tsc-bench"]
    missed = [t for t in targets if t.endswith("MISSED")]
    assert (status, bool(reason)) == (("failed", True) if missed else ("passed", False))
    assert all(m in reason for m in missed)


def test_host_bound_step_fails_with_tsc_bench_error():
    status, numbers, reason = gpu_check.step_host_bound(quick=True, full=False, device="cpu", model="no_such_model",
                                                        batch=4)
    assert status == "failed" and numbers == {} and "no_such_model" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_module_entry_point_exit_status_without_gpu():
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "tsc_kernels.gpu_check", "--skip-build"], capture_output=True, text=True)
    assert p.returncode == 2 and "no CUDA device" in p.stderr and "Traceback" not in p.stderr


def test_gpu_tests_cover_every_op():
    """gpu-check runs each registered op's test file on CUDA tensors (TSC_TEST_DEVICE=cuda), and
    every file it names exists."""
    files = {f"tests/ops/test_{name}.py" for name in OPS if name not in gpu_check.TESTED_WITH}
    files |= {f"tests/ops/test_{other}.py" for other in gpu_check.TESTED_WITH.values()}
    assert files <= set(gpu_check.TEST_FILES), files - set(gpu_check.TEST_FILES)
    assert set(gpu_check.TESTED_WITH) <= set(OPS), "TESTED_WITH names an op that is not registered"
    assert [f for f in gpu_check.TEST_FILES if not (gpu_check.ROOT / f).is_file()] == []
    not_per_op = {"tests/tooling/test_gpu_ready.py", "tests/ops/test_common.py", "tests/models/test_mixed_precision.py"}
    assert not_per_op <= set(gpu_check.TEST_FILES)


@pytest.mark.parametrize(
    "device, message",
    [
        ("tpu", "TSC_TEST_DEVICE must be 'cpu' or 'cuda'"),
        pytest.param(
            "cuda", "needs a CUDA device", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")
        ),
    ],
)
def test_test_device_is_checked_before_any_test_runs(device, message):
    """A bad or unavailable TSC_TEST_DEVICE stops pytest with a usage error instead of silently
    running the CPU tests (which is what gpu-check's tests step did before conftest read it)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TSC_TEST_DEVICE=device)
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "tests/tooling/test_registry.py", "-p", "no:cacheprovider"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=gpu_check.ROOT,
    )
    assert res.returncode != 0 and message in res.stdout + res.stderr, res.stdout[-2000:] + res.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# The op table
# ---------------------------------------------------------------------------------------------
def test_op_cases_are_the_registry():
    """One case per registered op, no more: the table's op list is the registry's."""
    assert set(gpu_check_cases.CASES) == set(OPS)


def test_an_op_without_a_case_is_an_error_row_not_a_silent_gap(no_cuda_calls):
    rows = gpu_check_ops.run_table("cpu", [CPU_BACKEND], tiny=True, ops=["not_an_op"])
    assert [r["flag"] for r in rows] == ["ERROR"] and "gpu_check_cases.py" in rows[0]["error"]
    assert gpu_check_ops.summary(rows)[0] == "failed"


@pytest.mark.skipif(not CPU_FUSED, reason="needs a fused CPU backend (the C++ extension, or Triton's interpreter)")
def test_tiny_table_covers_every_op_layout_and_dtype(no_cuda_calls):
    """The table on the CPU at the tiny specs: every op of the registry, each layout and dtype its
    case declares, every backend, no row failing; then its rendering."""
    rows = gpu_check_ops.run_table("cpu", CPU_FUSED, tiny=True, reps=1)
    errors = [(r["op"], r["layout"], r["dtype"], r["backend"], r["error"]) for r in rows if r.get("error")]
    assert not errors, errors
    expected = sum(len(c.tiny) * len(c.layouts) * len(c.dtypes) for c in gpu_check_cases.CASES.values()) * len(
        CPU_FUSED
    )
    assert len(rows) == expected and {r["op"] for r in rows} == set(OPS)
    for name, case in gpu_check_cases.CASES.items():
        got = {(r["layout"], r["dtype"]) for r in rows if r["op"] == name}
        assert got == {(lay, str(dt).removeprefix("torch.")) for lay in case.layouts for dt in case.dtypes}, name
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["min_bytes"] > r["fwd_bytes"] > 0 for r in rows)
    assert {r["flag"] for r in rows if r["op"] == "lstm_controller"} == {"n/m"}
    lines = gpu_check_ops.render(rows)
    assert len(lines) == len(rows) + 1 + 1 + len(gpu_check_ops.FLAGS)
    assert all(any(line.startswith(name) for line in lines) for name in OPS)


def _row(**kw):
    row = dict(op="residual_update", shape="(1, 2, 3, 4)", layout="contiguous", dtype="float32", backend="cuda",
               meaningful=True, fwd_bytes=300, min_bytes=800)
    row.update(kw)
    return row


@pytest.mark.parametrize("both_ms, host_bound, meaningful, flag", [
    (1.5, False, True, "LOW"),          # copy 1.0 ms / 1.5 ms = 67 % < 70 %
    (1.4, False, True, ""),             # 71 %
    (1.0 / gpu_check_ops.TARGET, False, True, ""),  # exactly at the target: not flagged
    (1.5, True, True, "host-bound"),    # the host's time, not the kernels'
    (1.5, False, False, "n/m"),         # the recurrence: no bandwidth claim
])
def test_flag_from_synthetic_timings(both_ms, host_bound, meaningful, flag):
    row = gpu_check_ops.finish_row(_row(meaningful=meaningful), fwd_s=0.5e-3, both_s=both_ms * 1e-3, copy_s=1e-3,
                                   host_bound=host_bound)
    assert row["flag"] == flag
    assert row["fraction"] == pytest.approx(1.0 / both_ms)
    # the forward's share of the copy: 300 of 800 bytes -> 0.375 ms against its 0.5 ms
    assert row["fwd_fraction"] == pytest.approx(0.375 / 0.5)


def test_summary_fails_on_low_and_error_rows_only():
    ok = gpu_check_ops.finish_row(_row(), 0.5e-3, 1.2e-3, 1e-3, False)
    host = gpu_check_ops.finish_row(_row(), 0.5e-3, 3e-3, 1e-3, True)
    low = gpu_check_ops.finish_row(_row(backend="triton"), 0.5e-3, 3e-3, 1e-3, False)
    err = _row(error="RuntimeError: boom", flag="ERROR")
    assert gpu_check_ops.summary([ok, host])[0] == "passed"
    status, reason = gpu_check_ops.summary([ok, host, low, err])
    assert status == "failed" and "1 LOW" in reason and "1 ERROR" in reason and "1 host-bound" in reason
    lines = gpu_check_ops.render([ok, low, err])
    assert "LOW" in lines[2] and "33%" in lines[2] and "ERROR: RuntimeError: boom" in lines[3]
    assert any("below 70%" in line for line in lines) and any(line.startswith("n/m:") for line in lines)


def test_report_prints_a_table_and_keeps_its_rows_in_the_json(tmp_path):
    rows = [gpu_check_ops.finish_row(_row(), 0.5e-3, 1.2e-3, 1e-3, False)]
    results = [dict(name="ops", status="passed", numbers={"table": gpu_check_ops.render(rows), "rows": rows},
                    reason="", seconds=1.0)]
    j, t = gpu_check.write_report(results, tmp_path, {})
    text = t.read_text()
    assert gpu_check_ops.render(rows)[1] in text and "rows: 1 entries in gpu_check.json" in text
    assert json.loads(j.read_text())["steps"][0]["numbers"]["rows"][0]["fraction"] == pytest.approx(1 / 1.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minimum_bytes_follow_docs_ops(dtype):
    """docs/ops.md's minimum traffic, N elements of e bytes: residual 3N + 5N (ReLU), BatchNorm tail
    4N + 8N, multistep 4N + 8N, ode_combine (s+2)N + (2s+1)N, scale_concat 2(Cx+k)P + 3kP."""
    cases = gpu_check_cases.CASES
    shape = (3, 5, 7, 9)
    n = 3 * 5 * 7 * 9
    e = torch.empty(0, dtype=dtype).element_size()
    for name, (fwd, bwd) in {"residual_update": (3, 5), "batch_norm_residual_update": (4, 8),
                             "multistep_update": (4, 8)}.items():
        assert cases[name].min_bytes(cases[name].build(shape, dtype, False)) == (fwd * n * e, bwd * n * e), name
    s = 4
    assert cases["ode_combine"].min_bytes(cases["ode_combine"].build((shape, s), dtype, True)) == (
        (s + 2) * n * e,
        (2 * s + 1) * n * e,
    )
    k, pixels = 3, 3 * 7 * 9
    assert cases["scale_concat"].min_bytes(cases["scale_concat"].build((shape, k), dtype, False)) == (
        2 * (5 + k) * pixels * e, 3 * k * pixels * e)


def test_weight_mean_and_controller_bytes_read_the_network():
    """weight_mean moves every conv weight once plus w̄ (fp32) each way; the controller every tensor it
    reads or writes; both from the network's real weights and controller."""
    model = gpu_check_cases.controller_network("resnet1d")
    weights = [w for stage in model.controller_inputs() for ws in stage for w in ws]
    (args,) = gpu_check_cases.CASES["weight_mean"].build("resnet1d", torch.bfloat16, True)
    assert [tuple(w.shape) for w in args] == [tuple(w.shape) for w in weights]
    packed = sum(w.shape[0] * w.shape[2] for w in weights) * 4  # Conv1d weights (C_out, C_in, 3)
    assert gpu_check_cases.CASES["weight_mean"].min_bytes((args,)) == (
        sum(w.numel() for w in weights) * 2 + packed,
        2 * packed,
    )
    wbar, blocks, params = gpu_check_cases.CASES["lstm_controller"].build("resnet1d", torch.float32, False)
    assert blocks == [len(stage) for stage in model.controller_inputs()] and len(params) == 8 * len(blocks)
    fwd, bwd = gpu_check_cases.CASES["lstm_controller"].min_bytes((wbar, blocks, params))
    assert fwd > 4 * (wbar.numel() + sum(p.numel() for p in params)) and bwd > fwd


def test_full_specs_are_the_tables_largest_shapes():
    cases = gpu_check_cases.CASES
    for name in ("residual_update", "batch_norm_residual_update", "multistep_update"):
        assert cases[name].full == ((64, 256, 56, 56), (256, 2048, 7, 7))
    assert cases["scale_concat"].full == (((64, 64 + 5 * 32, 56, 56), 32),)  # DenseNet-121, k = 32
    assert cases["ode_combine"].full[0][1] == 4
    assert cases["weight_mean"].full == cases["lstm_controller"].full == ("resnet50",)


# ---------------------------------------------------------------------------------------------
# The networks
# ---------------------------------------------------------------------------------------------
TINY = dict(batch=2, image=(3, 16, 16))
# ResNet-50 divides by 32: at 16 x 16 its last stages' BatchNorms see 2 values a channel, and the
# step's gradients reach 1e16 and the second loss is NaN on every backend (the reference too)
TINY_IMAGE = {"resnet50_cl_bf16": (3, 64, 64)}


def test_networks_cover_the_issue():
    assert [n.name for n in nets.NETWORKS] == [
        "resnet20",
        "lm_resnet56",
        "densenet40",
        "odenet_rk4",
        "resnet50_cl_bf16",
    ]
    r50 = nets.network("resnet50_cl_bf16")
    assert r50.channels_last and r50.autocast == torch.bfloat16
    with pytest.raises(ValueError, match="network must be one of"):
        nets.network("vgg")


@pytest.mark.parametrize("name", [n.name for n in nets.NETWORKS])
def test_network_checks_run_on_the_cpu(name, no_cuda_calls):
    """The sync-debug and graph-replay checks of every network with device="cpu", a no-op guard and
    the eager stand-in of the capture: the models build, train in their layout and dtype, and the
    replay comparison (same weights, data and stochastic-depth masks) holds."""
    net = nets.network(name)
    sizes = dict(TINY, image=TINY_IMAGE.get(name, TINY["image"]))
    assert nets.check_no_sync(net, CPU_BACKEND, "cpu", guard=contextlib.nullcontext, **sizes) == "no sync"
    got = nets.check_graph_replay(net, CPU_BACKEND, "cpu", capture=nets.eager_capture, warm_up=1, replays=2, **sizes)
    assert got.startswith("replay == eager")


def test_training_step_uses_the_networks_layout_and_dtype(no_cuda_calls):
    model, step = nets.training_step(nets.network("resnet50_cl_bf16"), CPU_BACKEND, "cpu", **TINY)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    model.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    assert torch.isfinite(step()) and seen == [torch.bfloat16]


def test_graph_replay_check_catches_a_replay_that_does_not_train(no_cuda_calls):
    def stale_capture(step, warm_up):
        warm_up()
        loss = step()
        return (lambda: None), (lambda: loss)  # the "replay" runs nothing: the loss never changes
    with pytest.raises(AssertionError):
        nets.check_graph_replay(nets.network("resnet20"), CPU_BACKEND, "cpu", capture=stale_capture, warm_up=1,
                                replays=2, **TINY)


def test_graph_replay_check_names_a_diverged_setup(no_cuda_calls):
    """A NaN loss on the eager side is the check's own setup failing, said so (not "nan != nan")."""
    with pytest.raises(AssertionError, match="eager loss is not finite"):
        nets.check_graph_replay(nets.network("resnet50_cl_bf16"), CPU_BACKEND, "cpu", capture=nets.eager_capture,
                                warm_up=1, replays=1, batch=2, image=(3, 16, 16))


def test_per_network_records_each_failure_and_goes_on():
    def check(net, be, device):
        if net.name == "densenet40" and be == "b":
            raise RuntimeError("synchronising call")
        return "ok"
    status, numbers, reason = nets.per_network(check, ["a", "b"], "cpu")
    assert status == "failed" and reason == "failed: densenet40 b"
    assert numbers["densenet40 b"].startswith("FAILED RuntimeError") and numbers["odenet_rk4 b"] == "ok"
    assert len(numbers) == 2 * len(nets.NETWORKS)
    assert nets.per_network(check, [], "cpu")[0] == "skipped"
