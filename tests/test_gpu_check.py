"""Plumbing of `make gpu-check` (tsc_kernels/gpu_check.py) on the CPU: the no-GPU exit, the step
runner and the report writer. The GPU steps themselves run only where a GPU is."""
import json

import pytest
import torch

from tsc_kernels import gpu_check


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
    """The check must fit in gpu_check.BUDGET_SECONDS (8 minutes): the report says whether it did; an
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_module_entry_point_exit_status_without_gpu():
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "tsc_kernels.gpu_check", "--skip-build"], capture_output=True, text=True)
    assert p.returncode == 2 and "no CUDA device" in p.stderr


def test_gpu_tests_cover_every_op():
    """gpu-check runs each registered op's test file on CUDA tensors (TSC_TEST_DEVICE=cuda)."""
    from tsc_kernels.ops.registry import OPS

    files = {f"tests/test_{name}.py" for name in OPS if name != "weight_mean"}  # weight_mean: test_lstm_controller.py
    assert files <= set(gpu_check.TEST_FILES), files - set(gpu_check.TEST_FILES)


@pytest.mark.parametrize("device, message", [
    ("tpu", "TSC_TEST_DEVICE must be 'cpu' or 'cuda'"),
    pytest.param("cuda", "needs a CUDA device", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")),
])
def test_test_device_is_checked_before_any_test_runs(device, message):
    """A bad or unavailable TSC_TEST_DEVICE stops pytest with a usage error instead of silently
    running the CPU tests (which is what gpu-check's tests step did before conftest read it)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TSC_TEST_DEVICE=device)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_registry.py", "-p", "no:cacheprovider"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=gpu_check.ROOT)
    assert res.returncode != 0 and message in res.stdout + res.stderr, res.stdout[-2000:] + res.stderr[-2000:]
