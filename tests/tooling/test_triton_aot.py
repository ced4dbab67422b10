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
from tsc_kernels._triton import aot  # noqa: E402  (its MODULES: every registered op's module, and the helpers)


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
    assert report["uncovered"] == [], (
        "these kernels are never compiled ahead of time: add them to their module's AOT_CONFIGS"
    )


@pytest.mark.parametrize("module", aot.MODULES)
def test_module_kernels_are_compiled_for_both_targets(aot_report, module):
    _, report = aot_report
    mod = importlib.import_module(f"tsc_kernels._triton.{module}")
    names = {cfg["name"] for cfg in mod.AOT_CONFIGS}
    targets = {(r["config"], r["target"]) for r in report["rows"]}
    assert names, f"{module}.AOT_CONFIGS is empty"
    assert {(n, t) for n in names for t in ("sm_80", "sm_90")} <= targets


def test_compiles_without_errors_or_spills(aot_report):
    """No compile error, no spill beyond aot.KNOWN_SPILLS (each one explained there, and it must not grow)."""
    res, report = aot_report
    failed = [f"{r['config']}@{r['target']}: {r['error']}" for r in report["rows"] if r["error"]]
    spilled = [f"{r['config']}@{r['target']}: {r['spills']} B ({r['registers']} regs)" for r in report["rows"]
               if not r["error"] and r["spills"] > report["known_spills"].get(f"{r['config']}@{r['target']}", 0)]
    assert not failed, "compile errors:\n" + "\n".join(failed)
    assert not spilled, "register spills:\n" + "\n".join(spilled)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_config_is_also_compiled_as_the_jit_builds_it(aot_report):
    """Each config as written (i64, no alignment: the worst case) and its `@jit` twin (i32, pointers
    and ints divisible by 16: what Triton's JIT builds for usual CNN arguments) are both compiled for
    both targets, so the register/spill evidence covers the binary that really runs."""
    _, report = aot_report
    rows = {(r["config"], r["target"]) for r in report["rows"]}
    written = {c for c, _ in rows if not c.endswith("@jit")}
    assert written and all((c + "@jit", t) in rows for c in written for t in ("sm_80", "sm_90"))


@pytest.mark.parametrize("prefix", ["residual_fwd_fp32", "residual_fwd_bf16", "multistep_fwd_fp32", "ode_combine_fwd"])
def test_jit_variant_of_elementwise_kernels_uses_vector_loads(aot_report, prefix):
    """The divisibility the JIT adds is what lets the compiler emit 16-byte loads (ld.global.v4 /
    .v2 of 32-bit words): the @jit twin of every elementwise forward has them, the worst-case config
    none. Without the attributes the AOT figures would describe a scalar-load kernel that never runs."""
    _, report = aot_report
    rows = [r for r in report["rows"] if r["config"].startswith(prefix) and not r["error"]]
    jit = [r for r in rows if r["config"].endswith("@jit")]
    worst = [r for r in rows if not r["config"].endswith("@jit")]
    assert jit and worst
    assert all(r["vector_loads"] > 0 for r in jit), [(r["config"], r["vector_loads"]) for r in jit]
    assert all(r["vector_loads"] == 0 for r in worst), [(r["config"], r["vector_loads"]) for r in worst]


@pytest.mark.parametrize("prefix", ["residual_fwd", "residual_bwd_planes", "multistep_fwd", "scale_concat_fwd",
                                    "scale_concat_bwd_planes"])
def test_jit_variant_of_per_element_kernels_divides_in_32_bits(aot_report, prefix):
    """The kernels that find each element's channel (or sample) by division run INDEX_64=False below
    2**31 elements (_launch.index_64): their @jit twin has no 64-bit div/rem (a long software routine
    on NVIDIA GPUs), while the worst-case configs (INDEX_64=True, i64 arguments) have them."""
    _, report = aot_report
    rows = [r for r in report["rows"] if r["config"].startswith(prefix) and not r["error"]]
    jit = [r for r in rows if r["config"].endswith("@jit")]
    worst = [r for r in rows if not r["config"].endswith("@jit")]
    assert jit and worst
    assert all(r["int64_divisions"] == 0 for r in jit), [(r["config"], r["int64_divisions"]) for r in jit]
    # (a multistep config without dt and keep divides nothing at all)
    assert any(r["int64_divisions"] > 0 for r in worst), [(r["config"], r["int64_divisions"]) for r in worst]
