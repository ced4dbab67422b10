# tsc-kernels: `make bench` (the main job) and `make test`; both set everything up on a fresh machine.
#   TSC_BUILD_CUDA=auto|0|1   build the CUDA kernels (auto: when torch is a CUDA build and nvcc exists)
#   TORCH_CUDA_ARCH_LIST      default "8.0;9.0+PTX" (PTX: GPUs newer than sm_90 JIT it); gpu-check builds the local arch only
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX

.PHONY: venv build lint test test-compat fuzz bench bench-ops gpu-report gpu-check clean

$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.deps

# Editable install: builds tsc_kernels._C in place and maps triton_kernels/ to tsc_kernels._triton.
# The full compiler output (ptxas -v register/spill figures included) stays in build/build.log.
build/.built: $(VENV)/.deps setup.py pyproject.toml $(wildcard csrc/*)
	mkdir -p build
	$(PY) -m pip install --no-build-isolation --no-deps -v -e . > build/build.log 2>&1 || (tail -60 build/build.log; exit 1)
	grep -E "Compiling entry function|ptxas info *: Used|spill" build/build.log | sed 's/^ *//' > build/ptxas.txt || true
	touch $@

build: build/.built

# Static checks (ruff, configured in pyproject.toml; clang-format, .clang-format, on csrc/); .ci/run runs them
# before the tests. `$(VENV)/bin/clang-format -i csrc/*` applies the C++ format.
lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror csrc/*

# The whole suite on the CPU, the Triton kernels under the interpreter.
# Inductor's cache lives in the build folder: its key ignores custom-op schemas, so a cache shared
# with another checkout (default /tmp/torchinductor_$USER) can replay a graph compiled for an
# older schema of a tsc op.
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/build/inductor-cache

# TEST_WORKERS pytest processes (pytest-xdist; 0: one process): the suite is mostly single-threaded
# interpreter and Python work, so a second worker uses a 2-core machine's second core (24:46 -> 16:15).
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist worksteal

test: build/.built
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -q $(XDIST) tests

# The oldest supported torch/Triton (requirements-compat.txt: torch 2.11 + Triton 3.6) in a second venv:
# the extension built CPU-only against it in a copy of the tree (an in-place build would overwrite
# .venv's tsc_kernels/_C*.so), then the suite under the interpreter with TSC_REQUIRE_EXTENSION=1,
# so a _C that fails to load under that torch fails the run instead of falling back. Skipped here:
# test_cuda_build (no CUDA build), and the suites of tools the compat venv does not install
# (timm, scikit-learn/mnist1d experiments).
COMPAT_VENV ?= .venv-compat
COMPAT_SRC := build/compat/src
COMPAT_SKIP := --ignore=tests/tooling/test_cuda_build.py --ignore=tests/models/test_timm.py --ignore=tests/models/test_experiments.py

$(COMPAT_VENV)/.deps: requirements-compat.txt
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q -r requirements-compat.txt
	touch $@

test-compat: $(COMPAT_VENV)/.deps
	rm -rf $(COMPAT_SRC) && mkdir -p $(COMPAT_SRC)
	git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C $(COMPAT_SRC)
	cd $(COMPAT_SRC) && TSC_BUILD_CUDA=0 $(CURDIR)/$(COMPAT_VENV)/bin/python -m pip install --no-build-isolation --no-deps -v -e . \
		> build.log 2>&1 || (tail -60 build.log; exit 1)
	cd $(COMPAT_SRC) && $(CURDIR)/$(COMPAT_VENV)/bin/tsc-info
	cd $(COMPAT_SRC) && TRITON_INTERPRET=1 TSC_REQUIRE_EXTENSION=1 TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/$(COMPAT_SRC)/inductor-cache \
		$(CURDIR)/$(COMPAT_VENV)/bin/pytest -q -p no:cacheprovider $(XDIST) tests $(COMPAT_SKIP)

# Many more property-test examples than `make test` runs (hypothesis; every backend vs the reference).
fuzz: build/.built
	TRITON_INTERPRET=1 TSC_FUZZ_EXAMPLES=2000 $(VENV)/bin/pytest -q tests/ops/test_properties.py

# The main job: TSC's overhead against the plain network, eager and compiled (tsc-bench; CIFAR ResNet-56,
# batch 32, CPU); each run appends its rows to bench/results/history.csv.
bench: build/.built
	$(VENV)/bin/tsc-bench --compile --steps 40 --host --json build/tsc-bench.json --history bench/results/history.csv

# Per-op pytest-benchmark suites (fused vs eager vs torch.compile vs bandwidth), JSON in build/, and
# each suite's ratio table (bench/ratios.py).
BENCH_ARGS = -q -p no:cacheprovider --benchmark-min-rounds=5 --benchmark-max-time=0.5 --benchmark-columns=median,iqr,rounds
define bench_suite
	$(VENV)/bin/pytest bench/bench_$(1).py $(BENCH_ARGS) --benchmark-json=build/bench_$(1).json
	$(PY) bench/ratios.py build/bench_$(1).json
endef
define bench_own_table
	$(VENV)/bin/pytest bench/bench_$(1).py -q -p no:cacheprovider --benchmark-columns=median,iqr,rounds \
		--benchmark-json=build/bench_$(1).json
	$(PY) bench/bench_$(1).py
endef
define newline


endef

# The suites are every bench/bench_<op>.py (a glob, never a hand list: a new op's suite runs once its
# file exists; tests/tooling/test_op_list.py checks every registered op has one or is benchmarked in another's).
# The controller's suite (weight_mean + lstm_controller) is the exception named here: it runs with
# pytest-benchmark's default rounds and prints its own table (kernel counts) instead of ratios.py's.
BENCH_OWN_TABLE := lstm_controller
BENCH_SUITES := $(filter-out $(BENCH_OWN_TABLE),$(patsubst bench/bench_%.py,%,$(sort $(wildcard bench/bench_*.py))))

bench-ops: build/.built
	$(foreach suite,$(BENCH_SUITES),$(call bench_suite,$(suite))$(newline))
	$(foreach suite,$(BENCH_OWN_TABLE),$(call bench_own_table,$(suite))$(newline))

# GPU evidence without a GPU: Triton AOT compiles for sm_80/sm_90, CUDA ptxas figures, bytes moved.
gpu-report: build/.built
	env -u TRITON_INTERPRET $(PY) -m tsc_kernels.gpu_report --json build/gpu_report.json

# On a machine WITH a GPU: build for the local arch, run the CUDA/Triton tests, sync-debug and CUDA-graph
# checks of five networks (ResNet-20, LM-ResNet-56, DenseNet-40, an RK4 ODE net, ResNet-50 channels_last
# bf16), every op's fwd+bwd against copy_ on both backends in one table, tsc-bench (ResNet-50) and CIFAR
# ResNet-56's host-bound step judged against the host targets of docs/performance.md (docs/gpu.md).
# Uses the machine's own Python (no venv, no registry); the report lands in build/gpu_check/. Exit 2
# without a CUDA device. GPU_CHECK_ARGS=--full adds tsc-bench's torch.compile rows (over the budget).
gpu-check:
	$(PYTHON) -m tsc_kernels.gpu_check --out build/gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf build tsc_kernels/_C*.so tsc_kernels/_build_info.py *.egg-info
