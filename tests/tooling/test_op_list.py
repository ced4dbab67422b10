"""One op list (issue 25): every list of ops is derived from the registry (tsc_kernels/ops/registry.py
OPS) or from a glob over files named after ops, never written by hand, and the C++ schemas
(csrc/<op>_cpu.cpp) are the registry's. docs/adding_an_op.md lists the files a new op needs.

The derived lists: the Triton modules the AOT compile covers (triton_kernels/aot.py MODULES, and so
tests/tooling/test_triton_aot.py), gpu-check's test files (tsc_kernels/gpu_check.py TEST_FILES) and its op
table (gpu_check_ops.run_table), the launchers tests/tooling/test_gpu_ready.py checks (triton_launchers),
and the Makefile's bench-ops suites (bench/bench_<op>.py). A dummy op in a temporary registry shows
each of them picks a new op up.
"""
import re
import shutil
import subprocess

import pytest
import torch

import tsc_kernels  # noqa: F401  (declares every op)
from tsc_kernels import _extension, gpu_check, gpu_check_cases, gpu_check_ops
from tsc_kernels.ops.registry import OPS, OpDef

ROOT = gpu_check_cases.ROOT
NAMES = sorted(OPS)
needs_cpp = pytest.mark.skipif(
    not _extension.has_cpp_ops(),
    reason=f"tsc_kernels._C is not loaded, so no C++ schema to compare: {_extension.problem()}",
)
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make (the Makefile's bench-ops)")

# Ops benchmarked inside another op's suite (bench/bench_<that op>.py) instead of one of their own:
# weight_mean is the controller's first kernel, timed (and its launches counted) by bench_lstm_controller.py.
BENCHED_WITH = {"weight_mean": "lstm_controller"}
# tsc:: operators the C++ library defines that are not ops of the registry: the CUDA planners' entry
# point (docs/gpu.md, launch plans). Names starting with "_" are private helpers of one op's plans
# or tests (tsc::_bn_merge_chunks, tsc::_lstm_controller_cuda_plan_on_cpu) and are not ops either.
CPP_NOT_OPS = {"cuda_launch_plan"}


def _dummy(name="dummy_op", **kw) -> OpDef:
    """An op declared only as an OpDef (never define()d: nothing reaches torch.library)."""
    fn = lambda *args: None  # noqa: E731
    return OpDef(name=name, schema="(Tensor x) -> Tensor", backward_schema="(Tensor grad) -> Tensor", reference=fn,
                 fake=fn, fake_backward=fn, setup_context=fn, backward=fn, **kw)


@pytest.fixture
def dummy_registry():
    """The registry holding only a dummy op, restored afterwards: every derived list then names
    that op (and the extras each list declares as not ops), nothing else."""
    saved = dict(OPS)
    OPS.clear()
    OPS["dummy_op"] = _dummy()
    try:
        yield OPS["dummy_op"]
    finally:
        OPS.clear()
        OPS.update(saved)


@pytest.fixture
def aot():
    """triton_kernels/aot.py, imported with the real registry (its MODULES and KERNELS are built at
    import): tests taking it and dummy_registry name it first."""
    pytest.importorskip("triton")
    from tsc_kernels._triton import aot

    return aot


@pytest.fixture
def gpu_ready():
    """tests/tooling/test_gpu_ready.py as a module, imported with the real registry (skips without Triton)."""
    return gpu_check_cases.tests_module("test_gpu_ready")


def _bench_ops_commands(cwd) -> str:
    """What `make bench-ops` would run in `cwd` (dry run; build/.built taken as up to date)."""
    res = subprocess.run(
        ["make", "-n", "-o", "build/.built", "-f", str(ROOT / "Makefile"), "-C", str(cwd), "bench-ops"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


# ---------------------------------------------------------------------------------------------
# A new op is picked up by every derived list
# ---------------------------------------------------------------------------------------------
def test_aot_modules_pick_up_a_new_op(aot, dummy_registry):
    assert aot.modules() == ("dummy_op", *aot.HELPER_MODULES)
    ops = {
        "a": _dummy("a"),
        "b": _dummy("b", triton_module="shared_kernels"),
        "c": _dummy("c", triton_module="shared_kernels"),
    }
    assert aot.modules(ops) == ("a", "shared_kernels", *aot.HELPER_MODULES)


def test_gpu_check_test_files_pick_up_a_new_op(dummy_registry, monkeypatch):
    assert gpu_check.test_files() == (*gpu_check.TEST_FILES_BEFORE_OPS, "tests/ops/test_dummy_op.py",
                                      *gpu_check.TEST_FILES_AFTER_OPS)
    ops = {"weight_mean": _dummy("weight_mean"), "lstm_controller": _dummy("lstm_controller")}
    per_op = ("tests/ops/test_weight_mean.py", "tests/ops/test_lstm_controller.py")
    assert [f for f in gpu_check.test_files(ops) if f in per_op] == list(per_op)  # one file per op
    monkeypatch.setattr(gpu_check, "TESTED_WITH", {"weight_mean": "lstm_controller"})
    # an op tested in another's file: that file named once
    assert [f for f in gpu_check.test_files(ops) if f in per_op] == ["tests/ops/test_lstm_controller.py"]


def test_gpu_check_op_table_picks_up_a_new_op(dummy_registry):
    """The op table runs every registered op: the dummy is there, as an ERROR row saying it has no
    case in gpu_check_cases.py (a gap the table reports instead of skipping)."""
    rows = gpu_check_ops.run_table("cpu", [], tiny=True, reps=1)
    assert [(r["op"], r["flag"]) for r in rows] == [("dummy_op", "ERROR")]
    assert "gpu_check_cases.py" in rows[0]["error"]


def test_gpu_ready_launchers_pick_up_a_new_op(gpu_ready, dummy_registry):
    assert gpu_ready.triton_launchers() == ["dummy_op_triton", "dummy_op_backward_triton"]


@needs_make
def test_bench_ops_picks_up_a_new_op(tmp_path):
    """The suites are a glob over bench/bench_<op>.py: a new op's file is run, with its ratio table."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "bench_dummy_op.py").write_text("")
    out = _bench_ops_commands(tmp_path)
    assert "pytest bench/bench_dummy_op.py" in out and "bench/ratios.py build/bench_dummy_op.json" in out


# ---------------------------------------------------------------------------------------------
# The derived lists of this tree
# ---------------------------------------------------------------------------------------------
def test_aot_modules_are_the_registrys(aot):
    assert aot.MODULES == aot.modules()
    assert {OPS[name].module.rsplit(".", 1)[1] for name in NAMES} | set(aot.HELPER_MODULES) == set(aot.MODULES)


def test_every_op_has_a_bench_suite():
    """bench/bench_<op>.py for every registered op (or the suite BENCHED_WITH names), and no suite
    named after an op that is not registered."""
    suites = {p.stem.removeprefix("bench_") for p in (ROOT / "bench").glob("bench_*.py")}
    missing = [name for name in NAMES if BENCHED_WITH.get(name, name) not in suites]
    assert not missing, f"no bench/bench_<op>.py for {missing}: `make bench-ops` would not benchmark them"
    assert suites <= set(OPS), f"bench suites named after no registered op: {suites - set(OPS)}"
    assert set(BENCHED_WITH) <= set(OPS)


@needs_make
def test_bench_ops_runs_every_op_suite():
    out = _bench_ops_commands(ROOT)
    for name in NAMES:
        suite = BENCHED_WITH.get(name, name)
        assert f"pytest bench/bench_{suite}.py" in out, f"make bench-ops does not run bench/bench_{suite}.py ({name})"
    # the controller's suite prints its own table (kernel counts), the others bench/ratios.py's
    assert "bench/bench_lstm_controller.py\n" in out and "ratios.py build/bench_lstm_controller.json" not in out
    assert out.count("bench/ratios.py") == len({BENCHED_WITH.get(n, n) for n in NAMES}) - 1


# ---------------------------------------------------------------------------------------------
# The C++ schemas are the registry's
# ---------------------------------------------------------------------------------------------
def schema_mismatch(qualified: str, declared: str, registered) -> str | None:
    """None when the schema the dispatcher holds for `qualified` (tsc::<op>) is the declared one, both
    parsed (so spacing and formatting never matter: names, types, defaults, aliasing and returns do);
    else both, for the failure message."""
    want = torch._C.parse_schema(f"{qualified}{declared}")
    if registered == want:
        return None
    return f"{qualified}:\n  C++ (csrc/*_cpu.cpp): {registered}\n  OpDef:              {want}"


def cpp_defined_ops() -> set[str]:
    """Names of the tsc:: operators whose schema the C++ library (tsc_kernels._C) defined: the
    dispatcher records the source file of each definition (torch.library's for the Python ones)."""
    names = set()
    for qualified in torch._C._dispatch_get_all_op_names():
        if qualified.startswith("tsc::"):
            where = re.search(r"^debug: registered at (\S+?):\d+", torch._C._dispatch_dump(qualified), re.M)
            if where and where.group(1).endswith((".cpp", ".cu", ".cc")):
                names.add(qualified.removeprefix("tsc::"))
    return names


@needs_cpp
@pytest.mark.parametrize("name", NAMES)
def test_cpp_schemas_are_the_declared_ones(name):
    """The forward and backward schemas the C++ library registered equal the OpDef's: the two copies
    (csrc/<op>_cpu.cpp and tsc_kernels/ops/<op>.py) cannot drift apart."""
    op = OPS[name]
    for suffix, declared in (("", op.schema), ("_backward", op.backward_schema)):
        assert hasattr(torch.ops.tsc, name + suffix), \
            f"the C++ library defines no tsc::{name}{suffix} (csrc/<op>_cpu.cpp)"
        assert schema_mismatch(f"tsc::{name}{suffix}", declared, op.op(suffix).default._schema) is None, \
            schema_mismatch(f"tsc::{name}{suffix}", declared, op.op(suffix).default._schema)


@needs_cpp
def test_every_cpp_op_is_declared():
    """Every op the C++ library defines is a registered op's forward or backward (or a named non-op):
    a C++ op without an OpDef would have no fake, no autograd, no reference and no tests."""
    cpp = cpp_defined_ops()
    declared = {name + suffix for name in NAMES for suffix in ("", "_backward")}
    assert declared <= cpp, f"declared but not defined in C++: {declared - cpp}"
    undeclared = {n for n in cpp - declared if not n.startswith("_") and n not in CPP_NOT_OPS}
    assert not undeclared, f"C++ ops without an OpDef (tsc_kernels/ops/<op>.py): {undeclared}"
    assert CPP_NOT_OPS <= cpp


def test_schema_comparison_sees_every_difference():
    """The comparison above fails on a renamed argument, a changed type, default, alias annotation or
    return, and ignores formatting."""
    registered = torch._C.parse_schema("tsc::x(Tensor y, Tensor(a!)? m, float eps=1e-05) -> (Tensor, Tensor)")
    assert (
        schema_mismatch("tsc::x", "( Tensor y,Tensor(a!)?  m, float eps=1e-05 )->(Tensor, Tensor)", registered) is None
    )
    for drifted in ("(Tensor z, Tensor(a!)? m, float eps=1e-05) -> (Tensor, Tensor)",
                    "(Tensor y, Tensor? m, float eps=1e-05) -> (Tensor, Tensor)",
                    "(Tensor y, Tensor(a!) m, float eps=1e-05) -> (Tensor, Tensor)",
                    "(Tensor y, Tensor(a!)? m, float eps=1e-04) -> (Tensor, Tensor)",
                    "(Tensor y, Tensor(a!)? m, float eps=1e-05) -> Tensor"):
        assert schema_mismatch("tsc::x", drifted, registered) is not None, drifted
