"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 without spilling (docs/performance.md).

Runs `python -m tsc_kernels._triton.aot` in a subprocess with TRITON_INTERPRET removed from the
environment: the interpreter (on in the rest of the suite) accepts code the GPU compiler rejects,
and the launchers choose their GPU tile sizes only when it is off. No GPU is needed: triton
compiles to PTX and ptxas assembles it for the target.
"""
import importlib
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def aot_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "tsc_kernels._triton.aot", "--targets", "80,90", "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=900)
    if not out.exists():
        pytest.fail(f"the AOT compile did not run (exit {res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res, json.loads(out.read_text())


def test_every_kernel_has_an_aot_config(aot_report):
    _, report = aot_report
    assert report["uncovered"] == [], "these kernels are never compiled ahead of time: add them to their module's AOT_CONFIGS"


@pytest.mark.parametrize("module", ["weight_mean", "lstm_controller", "residual_update", "batch_norm_residual_update", "scale_concat"])
def test_module_kernels_are_compiled_for_both_targets(aot_report, module):
    _, report = aot_report
    mod = importlib.import_module(f"tsc_kernels._triton.{module}")
    names = {cfg["name"] for cfg in mod.AOT_CONFIGS}
    targets = {(r["config"], r["target"]) for r in report["rows"]}
    assert names, f"{module}.AOT_CONFIGS is empty"
    assert {(n, t) for n in names for t in ("sm_80", "sm_90")} <= targets


def test_compiles_without_errors_or_spills(aot_report):
    res, report = aot_report
    failed = [f"{r['config']}@{r['target']}: {r['error']}" for r in report["rows"] if r["error"]]
    spilled = [f"{r['config']}@{r['target']}: {r['spills']} B ({r['registers']} regs)" for r in report["rows"] if not r["error"] and r["spills"]]
    assert not failed, "compile errors:\n" + "\n".join(failed)
    assert not spilled, "register spills:\n" + "\n".join(spilled)
    assert res.returncode == 0, res.stdout + res.stderr
