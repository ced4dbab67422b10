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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_module_entry_point_exit_status_without_gpu():
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "tsc_kernels.gpu_check", "--skip-build"], capture_output=True, text=True)
    assert p.returncode == 2 and "no CUDA device" in p.stderr
