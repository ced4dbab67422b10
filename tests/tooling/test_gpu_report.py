"""The GPU build report (python -m tsc_kernels.gpu_report): Triton AOT figures, the CUDA kernels'
ptxas figures from the build log, bytes moved against docs/ops.md's minimum."""
import json
import os
import subprocess
import sys

import pytest

from tsc_kernels import _extension, gpu_report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD_LOG = os.path.join(ROOT, "build", "build.log")


def test_report_end_to_end(tmp_path):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "tsc_kernels.gpu_report", "--build-log", BUILD_LOG, "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {r["target"] for r in report["triton"]} == {"sm_80", "sm_90"}
    known = report["triton_known_spills"]
    assert all(
        r["error"] is None and r["spills"] <= known.get(f"{r['config']}@{r['target']}", 0) for r in report["triton"]
    )
    assert report["triton_uncovered"] == []
    fwd = next(t for t in report["traffic"] if t["op"] == "residual_update fwd")
    assert fwd["fused"] == fwd["minimum"] == 3 * 8 * 256 * 56 * 56 * 4


@pytest.mark.skipif(not _extension.has_cuda_kernels(), reason="tsc_kernels._C was built without CUDA kernels (no nvcc)")
@pytest.mark.skipif(
    not os.path.exists(BUILD_LOG), reason="no build/build.log: the extension was not built by `make build`"
)
def test_cuda_kernels_have_ptxas_figures_for_both_archs():
    rows = gpu_report.cuda_ptxas_figures(BUILD_LOG)
    kernels = {r["kernel"].split("<")[0] for r in rows}
    assert {
        "tsc::residual_forward_kernel",
        "tsc::residual_backward_kernel",
        "tsc::lstm_controller_recurrent_kernel",
    } <= kernels
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert all(r["registers"] is not None and r["spills"] == 0 for r in rows), [r for r in rows if r["spills"]]


def test_ptxas_log_parsing(tmp_path):
    log = tmp_path / "log"
    log.write_text(
        "ptxas info    : Compiling entry function '_ZN3tsc12_GLOBAL__N_16kernelIfEEvPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _ZN3tsc12_GLOBAL__N_16kernelIfEEvPf\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 432 bytes cmem[0]\n")
    (row,) = gpu_report.cuda_ptxas_figures(str(log))
    assert row == dict(kernel="tsc::kernel<float>", arch="sm_90", registers=40, spills=8, smem=1024)
