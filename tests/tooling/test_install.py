"""A degraded install always says so: an _C that fails to load (built for another torch), an _C never
built, `auto` running the reference on CUDA tensors; and the build always uses the torch it installs
beside (docs: README "Install")."""
import json
import os
import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import torch

import tsc_kernels
from tsc_kernels import _extension, _info, backend

ROOT = Path(__file__).resolve().parents[2]

# Makes `import tsc_kernels._C` fail the way a _C built against torch 2.14 fails under torch 2.11.
_BREAK_C = """
import sys
class _Broken:
    def find_spec(self, name, path=None, target=None):
        if name == "tsc_kernels._C":
            raise ImportError("tsc_kernels/_C.so: undefined symbol: _ZN3c104cuda19CUDAErrorLogCaptureC1Ev")
sys.meta_path.insert(0, _Broken())
"""


def _import_with_broken_c(env: dict, code: str = "") -> subprocess.CompletedProcess:
    script = _BREAK_C + "import warnings\nwarnings.simplefilter('always')\nimport tsc_kernels\n" + code
    full_env = {k: v for k, v in os.environ.items() if k not in ("TSC_REQUIRE_EXTENSION", "TSC_BACKEND")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", script], env=full_env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not _extension.has_cpp_ops(), reason="needs a built _C on disk (make build)")
def test_broken_extension_warns_at_import_naming_both_torches_and_the_fix():
    p = _import_with_broken_c({}, "print('BACKENDS', tsc_kernels.available_backends('cpu'))")
    assert p.returncode == 0, p.stderr
    assert "RuntimeWarning" in p.stderr and "failed to load" in p.stderr
    assert f"torch {torch.__version__}" in p.stderr  # the torch running
    if _extension.BUILT_FOR_TORCH is not None:
        assert f"built for torch {_extension.BUILT_FOR_TORCH}" in p.stderr
    assert "undefined symbol" in p.stderr and "--no-build-isolation" in p.stderr
    assert p.stderr.count("failed to load") == 1  # once, not per op
    assert "BACKENDS ['torch']" in p.stdout or "BACKENDS ['triton', 'torch']" in p.stdout


@pytest.mark.skipif(not _extension.has_cpp_ops(), reason="needs a built _C on disk (make build)")
def test_require_extension_turns_the_warning_into_an_import_error():
    p = _import_with_broken_c({"TSC_REQUIRE_EXTENSION": "1"})
    assert p.returncode != 0
    assert "ImportError" in p.stderr and "TSC_REQUIRE_EXTENSION=1" in p.stderr and "failed to load" in p.stderr


@pytest.mark.skipif(not _extension.has_cpp_ops(), reason="needs a built _C on disk (make build)")
def test_choosing_the_reference_backend_keeps_the_import_quiet():
    p = _import_with_broken_c({"TSC_BACKEND": "torch"})
    assert p.returncode == 0, p.stderr
    assert "failed to load" not in p.stderr


@pytest.mark.parametrize("case", ["never_built", "fails_to_load", "other_torch", "healthy"])
def test_problem_names_each_degraded_state(monkeypatch, case):
    other = "2.10.0+test"  # a torch that is never the running one
    monkeypatch.setattr(_extension, "BUILT_FOR_TORCH", other if case != "healthy" else torch.__version__)
    if case == "never_built":
        monkeypatch.setattr(_extension, "_C", None)
        monkeypatch.setattr(_extension, "LOAD_ERROR", "No module named 'tsc_kernels._C'")
        monkeypatch.setattr(_extension, "_candidates", lambda: [])
    elif case == "fails_to_load":
        monkeypatch.setattr(_extension, "_C", None)
        monkeypatch.setattr(_extension, "LOAD_ERROR", "undefined symbol: X")
        monkeypatch.setattr(_extension, "_candidates", lambda: ["/x/_C.cpython-311-x86_64-linux-gnu.so"])
    elif case in ("other_torch", "healthy"):
        monkeypatch.setattr(_extension, "_C", object())
    message = _extension.problem()
    if case == "healthy":
        assert message is None
        return
    assert f"torch {torch.__version__}" in message and "--no-build-isolation" in message
    if case == "never_built":
        assert "not built" in message
    else:
        assert f"built for torch {other}" in message
        assert ("failed to load" in message) == (case == "fails_to_load")


def test_info_reports_versions_extension_and_every_backend():
    report = tsc_kernels.info()
    json.dumps(report)  # serialisable: pasteable into a bug report
    assert report["versions"]["torch"] == torch.__version__
    assert report["versions"]["tsc_kernels"] == tsc_kernels.__version__
    assert report["extension"]["loaded"] == _extension.has_cpp_ops()
    assert report["extension"]["problem"] == _extension.problem()
    available = backend.available_backends()
    assert set(report["backends"]) == set(backend.BACKENDS[1:])
    for name, reason in report["backends"].items():
        assert (reason is None) == (name in available), (name, reason)
        assert reason is None or isinstance(reason, str) and reason
    assert report["default"]["cpu"] == backend.resolve(torch.device("cpu"))


def test_info_command_prints_the_same_report(capsys):
    assert _info.main() == 0
    assert json.loads(capsys.readouterr().out)["backends"] == tsc_kernels.info()["backends"]


def test_auto_running_the_reference_on_cuda_warns_once(monkeypatch):
    reasons = {"cuda": "no CUDA kernels (test)", "triton": "triton is not installed (test)"}
    monkeypatch.setattr(backend, "_usable", lambda name, device: reasons.get(name))
    monkeypatch.setattr(backend, "_WARNED_REFERENCE_ON_CUDA", False)
    with backend.use_backend("auto"):
        with pytest.warns(RuntimeWarning, match="pure-PyTorch reference on CUDA tensors.*no CUDA kernels"):
            assert backend.resolve(torch.device("cuda")) == "torch"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert backend.resolve(torch.device("cuda")) == "torch"  # once per process
            assert backend.resolve(torch.device("cpu")) in ("cpu", "torch")  # CPU tensors never warn


def test_build_requirements_do_not_pin_a_torch():
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert not [r for r in build if re.match(r"torch\b", r)], build
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch>=2.11" in deps


def test_setup_without_torch_fails_in_one_line_naming_no_build_isolation():
    script = ("import sys\n"
              "class _NoTorch:\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name == 'torch' or name.startswith('torch.'):\n"
              "            raise ModuleNotFoundError(\"No module named 'torch'\")\n"
              "sys.meta_path.insert(0, _NoTorch())\n"
              "sys.argv = ['setup.py', '--version']\n"
              "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))\n")
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "--no-build-isolation" in lines[0] and "torch" in lines[0], p.stderr


def test_every_documented_install_line_builds_without_isolation():
    """A `pip install` of this package (".", "-e .", "tsc-kernels[...]") anywhere in the README or docs
    must carry --no-build-isolation: an isolated build compiles _C against another torch."""
    offenders = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in path.read_text().splitlines():
            for cmd in re.findall(r"pip install[^`\n]*", line):
                installs_us = re.search(r"(\s\.(\s|$|\[)|\s-e\s+\.|tsc-kernels|\s'\.\[|\s\"\.\[)", cmd + " ")
                if installs_us and "--no-build-isolation" not in cmd:
                    offenders.append(f"{path.name}: {cmd}")
    assert not offenders, offenders


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject.toml lists packages by hand (triton_kernels/ installs as tsc_kernels._triton): a
    subpackage missing there works in the editable checkout and is absent from a built wheel."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "tsc_kernels").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
    assert "tsc_kernels._triton" in listed
