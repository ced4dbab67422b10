"""Ahead-of-time compile of every Triton kernel of tsc_kernels for sm_80 and sm_90 (docs/performance.md:
static GPU evidence on machines without a GPU).

    python -m tsc_kernels._triton.aot [--targets 80,90] [--only NAME] [--json FILE]

prints one row per (kernel config, target): registers per thread, spilled bytes, static shared
memory. Run it WITHOUT TRITON_INTERPRET: the interpreter accepts code the compiler rejects, and the
launchers pick their GPU tile sizes only when not interpreting (the configs below use them).

KERNELS is collected from the op modules: each exposes `AOT_CONFIGS`, a list of
    dict(kernel=<@triton.jit fn>, name=str, signature={arg: "*fp32" | "i32" | ... | "constexpr"},
         constexprs={arg: value}, num_warps=int (optional, default 4), num_stages=int (optional, default 3))
MODULES is derived from the op registry (every registered op's Triton module, tsc_kernels/ops/registry.py)
plus the shared helper modules that hold kernels of their own (HELPER_MODULES), so a new op's module is
picked up without naming it here (tests/tooling/test_op_list.py). The exit status is 1 when a compile fails,
spills, or a @triton.jit function named *_kernel has no config (uncovered_kernels).

Registers and spills come from ptxas itself: CompiledKernel.n_regs / n_spills are only filled in
when the binary is loaded on a GPU, so the PTX Triton produced is assembled once more with
`ptxas -v` (same arch) and its report is parsed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import tempfile

# Not ops, but modules with @triton.jit kernels of their own that the op modules launch: _reduce's
# fixed-order merge of partial sums (residual_update, scale_concat, multistep_update, ode_combine).
# Named so that uncovered_kernels also scans them (a kernel added there without a config is found).
HELPER_MODULES = ("_reduce",)


def modules(ops=None) -> tuple[str, ...]:
    """The Triton modules (names under tsc_kernels._triton) whose kernels are compiled: each op's of
    `ops` (default: the registry, read now: tsc_kernels.ops.registry.OPS), in declaration order,
    then HELPER_MODULES."""
    import tsc_kernels  # noqa: F401  (declares every op)
    from tsc_kernels.ops import registry

    ops = registry.OPS if ops is None else ops
    names = [op.module.rsplit(".", 1)[1] for op in ops.values()]
    return tuple(dict.fromkeys([*names, *HELPER_MODULES]))


MODULES = modules()


def _collect(names=None) -> list[dict]:
    """Every AOT config of the modules `names` (default MODULES), each once: a helper's configs that
    an op module re-exports (residual_update's list carries _reduce's) keep that op module's name."""
    kernels, seen = [], set()
    for name in MODULES if names is None else names:
        try:
            mod = importlib.import_module(f"tsc_kernels._triton.{name}")  # the installed name (pyproject.toml)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.endswith(f".{name}"):
                continue  # that op has no Triton module (yet); anything else failing inside is a real error
            raise
        for cfg in getattr(mod, "AOT_CONFIGS", []):
            key = (id(cfg["kernel"]), cfg["name"])
            if key not in seen:
                seen.add(key)
                kernels.append(dict(module=name, **cfg))
    return kernels


# Spills known and accepted ("config@target": bytes), which no cheap retuning removed: the worst-case
# (unaligned, i64) variant of the BatchNorm tail's eval-mode backward reduction over channels-last
# rows. At 4 warps its aligned JIT variant spilled 16 B on sm_80 instead; 8 warps (REDUCE_WARPS) move
# an 8 B spill to the variant that rarely runs. ptxas runs with --regAllocOptLevel=2, as Triton's JIT
# does (its ptxas 13 workaround). Anything new, or larger, is an error.
_KNOWN_SPILLS = {"batch_norm_bwd_reduce_fp32_rows_relu0_eval@sm_90": 8}
# Per Triton release, on top: Triton 3.6 (the oldest supported, make test-compat) gives the worst-case
# (i64, unaligned) fp16 forward of multistep_update a 16 B stack frame on sm_90 (48 registers, no
# pressure: 3.8 compiles the same kernel without one); its @jit variant, what runs below 2^31
# elements, does not spill. Triton 3.6 also gives the BatchNorm statistics finalize over transposed
# (C, chunks) partials (channels-last rows with >= 64 chunks, issue 22), worst case without running
# statistics, 12 B on sm_90 (40 registers); 3.8 none, nor 3.6's @jit variant.
_KNOWN_SPILLS_BY_TRITON = {
    "3.6": {"multistep_fwd_fp16_relu0_dt1_keep1@sm_90": 16, "multistep_fwd_fp16_relu1_dt1_keep1@sm_90": 16,
            "batch_norm_stats_finalize_running0_t1@sm_90": 12},
}


def _triton_release() -> str | None:
    import importlib.metadata

    try:
        return ".".join(importlib.metadata.version("triton").split(".")[:2])
    except importlib.metadata.PackageNotFoundError:
        return None


KNOWN_SPILLS = {**_KNOWN_SPILLS, **_KNOWN_SPILLS_BY_TRITON.get(_triton_release(), {})}


def is_bad(row: dict) -> bool:
    """A compile error, or more spilled bytes than KNOWN_SPILLS allows (0 for every other config)."""
    return bool(row["error"]) or row["spills"] > KNOWN_SPILLS.get(f"{row['config']}@{row['target']}", 0)


def jit_variant(cfg: dict) -> dict:
    """The binary Triton's JIT builds for the usual arguments of a CNN: every integer argument an i32
    (the JIT types a Python int by its value: i32 below 2**31) and, like every pointer (tensors from
    torch's caching allocator are 16-byte aligned), divisible by 16 (``tt.divisibility=16``, which
    the JIT adds to each int that is: numel, channel and plane sizes of most layers). Only with
    these does the compiler emit vector loads. The config as written (i64, nothing divisible) is the
    worst case: shapes past 2**31, odd sizes, misaligned views. Both are compiled, so the register
    and spill figures cover what really runs."""
    names = cfg["kernel"].arg_names
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, t in cfg["signature"].items()
             if t.startswith("*") or t in ("i32", "i64")}
    signature = {k: "i32" if t == "i64" else t for k, t in cfg["signature"].items()}
    constexprs = cfg.get("constexprs", {})
    if "INDEX_64" in constexprs:  # the launchers pass INDEX_64=False below 2**31 elements (_launch.index_64)
        constexprs = dict(constexprs, INDEX_64=False)
    return dict(cfg, name=cfg["name"] + "@jit", signature=signature, attrs=attrs, constexprs=constexprs)


def uncovered_kernels() -> list[str]:
    """`module.name` of every @triton.jit function named *_kernel in MODULES that no KERNELS config
    compiles: a kernel added without an AOT config would otherwise go unchecked."""
    import triton

    covered = {id(k["kernel"]) for k in KERNELS}
    missing = []
    for name in MODULES:
        try:
            mod = importlib.import_module(f"tsc_kernels._triton.{name}")
        except ModuleNotFoundError:
            continue
        for attr, obj in vars(mod).items():
            if attr.endswith("_kernel") and isinstance(obj, triton.runtime.JITFunction) and id(obj) not in covered:
                missing.append(f"{name}.{attr}")
    return missing


def _guard_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("tsc_kernels._triton.aot must run without TRITON_INTERPRET=1 "
                           "(unset it before importing triton)")


def _ptxas_report(ptx: str, capability: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(capability).path, "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(capability)}", src, "-o", os.path.join(tmp, "k.cubin")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        raise RuntimeError(f"could not parse the ptxas report:\n{log}")
    return dict(registers=int(regs.group(1)), spills=int(spill.group(1)) + int(spill.group(2)), ptxas_log=log)


def compile_one(cfg: dict, capability: int) -> dict:
    """Compile one config for one compute capability; raises on a compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=cfg["kernel"], signature=cfg["signature"], constexprs=cfg.get("constexprs", {}),
                    attrs=cfg.get("attrs"))
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 3)})
    rep = _ptxas_report(compiled.asm["ptx"], capability)
    ptx = compiled.asm["ptx"]
    return dict(registers=rep["registers"], spills=rep["spills"], shared=int(compiled.metadata.shared),
                vector_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]\.", ptx)),
                int64_divisions=len(re.findall(r"\b(?:div|rem)\.[su]64\b", ptx)))


# Every kernel config of the project (module, kernel, name, signature, constexprs, num_warps), each
# as written (i64, unaligned: the worst case) and as the JIT builds it for usual arguments (jit_variant).
KERNELS: list[dict] = [v for cfg in _collect() for v in (cfg, jit_variant(cfg))]


def compile_all(targets=((80, "sm_80"), (90, "sm_90")), kernels: list[dict] | None = None) -> list[dict]:
    """Every config of `kernels` (default KERNELS) for every target: dict(kernel, config, target,
    registers, spills, shared, num_warps, error); error is None, or the message (and the figures
    None) where the compile failed."""
    _guard_interpreter()
    results = []
    for cfg in KERNELS if kernels is None else kernels:
        for capability, label in targets:
            row = dict(kernel=cfg["kernel"].__name__, config=cfg["name"], target=label,
                       num_warps=cfg.get("num_warps", 4))
            try:
                row.update(compile_one(cfg, capability), error=None)
            except Exception as exc:  # reported per row: one failing kernel must not hide the others
                row.update(registers=None, spills=None, shared=None, vector_loads=None, int64_divisions=None,
                           error=f"{type(exc).__name__}: {exc}")
            results.append(row)
    return results


def format_table(rows: list[dict]) -> str:
    head = f"{'config':<44} {'target':<6} {'warps':>5} {'regs':>5} {'spill B':>7} {'smem B':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["error"]:
            lines.append(f"{r['config']:<44} {r['target']:<6} FAILED: {r['error'].splitlines()[0]}")
        else:
            lines.append(f"{r['config']:<44} {r['target']:<6} {r['num_warps']:>5} {r['registers']:>5} "
                         f"{r['spills']:>7} {r['shared']:>7}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated")
    parser.add_argument("--only", default="", help="compile only configs whose name contains this")
    parser.add_argument("--json", default="", help="also write the rows and uncovered kernels to this file")
    args = parser.parse_args(argv)
    _guard_interpreter()
    kernels = [k for k in KERNELS if args.only in k["name"]]
    rows = compile_all(tuple((int(c), f"sm_{c}") for c in args.targets.split(",")), kernels)
    missing = uncovered_kernels()
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, uncovered=missing, known_spills=KNOWN_SPILLS), f, indent=1)
    bad = [r for r in rows if is_bad(r)]
    if bad:
        print(f"\n{len(bad)} of {len(rows)} compiles failed or spill: "
              + ", ".join(f"{r['config']}@{r['target']}" for r in bad))
    if missing:
        print(f"\nkernels without an AOT config: {', '.join(missing)}")
    return 1 if bad or missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
