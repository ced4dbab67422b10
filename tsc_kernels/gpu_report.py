"""GPU build report: the GPU evidence this project can produce without a GPU (docs/performance.md).

    python -m tsc_kernels.gpu_report [--build-log build/build.log] [--json PATH]

1. Every Triton kernel compiled ahead of time for sm_80 and sm_90 (tsc_kernels._triton.aot):
   registers per thread, spilled bytes and shared memory per kernel and config.
2. The CUDA kernels' ptxas figures (registers, spills, shared memory per kernel and arch) from the
   extension build log (`make build` keeps it in build/build.log; nvcc runs with -Xptxas -v).
3. Per op, the bytes the fused kernels move against the minimum of docs/ops.md, at a reference shape.
4. Per op and GPU backend, the launch plans of tsc_kernels.launch_rules' table of real shapes
   (docs/gpu.md, launch plans): launches, the fewest blocks of a launch moving >= 8 MB, the longest
   dependent chain, the smallest request of a big launch, the most shared memory, rule violations.
Must run without TRITON_INTERPRET=1. Exits 1 when a Triton kernel fails to compile or spills (beyond
the explained entries of aot.KNOWN_SPILLS), or a plan breaks a rule.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def cuda_ptxas_figures(build_log: str) -> list[dict]:
    """(kernel, arch, registers, spill bytes, smem bytes) for every CUDA kernel in an nvcc -Xptxas -v log."""
    rows, current = [], None
    for line in open(build_log, errors="replace"):
        if m := _ENTRY.search(line):
            current = dict(kernel=m.group(1), arch=m.group(2), registers=None, spills=None, smem=0)
            rows.append(current)
        elif current is not None and (m := _SPILL.search(line)):
            current["spills"] = int(m.group(1)) + int(m.group(2))
        elif current is not None and (m := _USED.search(line)):
            current["registers"] = int(m.group(1))
            current["smem"] = int(m.group(2) or 0)
    for row, name in zip(rows, demangle([r["kernel"] for r in rows])):
        # keep the name and template arguments, drop the return type and the parameter list
        row["kernel"] = re.sub(r"\(.*", "", name.replace("(anonymous namespace)::", "").removeprefix("void "))
    return rows


def residual_traffic(shape=(8, 256, 56, 56), elem_bytes=4) -> list[dict]:
    """Bytes moved by the fused residual-update kernels (their loads and stores as written in
    csrc/ and triton_kernels/) against docs/ops.md's minimum, N elements per tensor."""
    n = 1
    for s in shape:
        n *= s
    b = n * elem_bytes
    return [
        dict(op="residual_update fwd", fused=3 * b, minimum=3 * b, note="reads y, f; writes out"),
        dict(op="residual_update bwd", fused=3 * b, minimum=3 * b, note="reads g, f; writes df (dy is g)"),
        dict(op="residual_update bwd, ReLU fused", fused=5 * b, minimum=3 * b,
             note="also reads out for the mask and writes the masked dy"),
    ]


def launch_plan_summary() -> list[dict]:
    """One row per (op, backend) over every case of launch_rules' table: the figures, the rules'
    violations (a planner that fails is one) and, apart, those of launch_rules.KNOWN_VIOLATIONS."""
    from . import launch_rules
    from ._launch_plan import BACKENDS, launch_plan

    rows: dict = {}
    for case_id, op, args in launch_rules.cases():
        for backend in BACKENDS:
            r = rows.setdefault((op, backend), dict(op=op, backend=backend, cases=0, launches=0, min_big_blocks=None,
                                                    max_chain=0, min_big_request=None, max_smem=0, violations=[],
                                                    known=[]))
            r["cases"] += 1
            try:
                plan = launch_plan(op, *args, backend=backend, sms=launch_rules.SMS)
            except Exception as e:  # a planner that fails is reported, not hidden
                r["violations"].append(f"no plan: {type(e).__name__}: {e}")
                continue
            r["launches"] += len(plan)
            for launch in plan:
                r["max_chain"] = max(r["max_chain"], launch["chain"])
                r["max_smem"] = max(r["max_smem"], launch["smem"])
                if launch["bytes"] >= launch_rules.BIG:
                    blocks = launch["grid"][0] * launch["grid"][1] * launch["grid"][2]
                    r["min_big_blocks"] = min(blocks, r["min_big_blocks"] or blocks)
                    r["min_big_request"] = min(launch["request_bytes"], r["min_big_request"] or launch["request_bytes"])
            found = launch_rules.violations(op, args, plan)
            # a defect already listed in launch_rules.KNOWN_VIOLATIONS is reported apart, not failed again
            r["known" if (op, backend, case_id) in launch_rules.KNOWN_VIOLATIONS else "violations"] += found
    return list(rows.values())


def format_launch_plans(rows: list[dict]) -> str:
    lines = [f"  {'op':28s} {'backend':7s} {'cases':>5s} {'launches':>8s} {'min blocks':>10s} {'max chain':>9s} "
             f"{'min request':>11s} {'max smem':>8s}  violations (known)"]
    for r in rows:
        lines.append(f"  {r['op']:28s} {r['backend']:7s} {r['cases']:5d} {r['launches']:8d} "
                     f"{r['min_big_blocks']!s:>10s} {r['max_chain']:9d} {r['min_big_request']!s:>11s} "
                     f"{r['max_smem']:8d}  {len(r['violations'])} ({len(r['known'])})")
        lines += [f"      {v}" for v in r["violations"][:3]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build-log", default=os.path.join("build", "build.log"))
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    from ._triton import aot

    triton_rows = aot.compile_all()
    print("Triton kernels, compiled ahead of time\n" + aot.format_table(triton_rows))
    missing = aot.uncovered_kernels()
    cuda_rows = cuda_ptxas_figures(args.build_log) if os.path.exists(args.build_log) else []
    print(f"\nCUDA kernels (ptxas -v, from {args.build_log})")
    if not cuda_rows:
        print("  none found: build with CUDA (TSC_BUILD_CUDA=1 make build) to list them")
    for r in cuda_rows:
        print(f"  {r['kernel'][:90]:90s} {r['arch']:6s} regs {r['registers']!s:>4} "
              f"spill {r['spills']!s:>4} B smem {r['smem']:>6} B")
    traffic = residual_traffic()
    print("\nBytes moved per call at (8, 256, 56, 56) fp32")
    for t in traffic:
        print(f"  {t['op']:34s} fused {t['fused'] / 2**20:8.1f} MiB  "
              f"minimum {t['minimum'] / 2**20:8.1f} MiB  ({t['note']})")
    plans = launch_plan_summary()
    print("\nLaunch plans at the real shapes of tsc_kernels.launch_rules (sms=132; blocks and requests of"
          " launches moving >= 8 MB; chain: dependent steps in one thread or program)")
    print(format_launch_plans(plans))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(triton=triton_rows, triton_uncovered=missing, triton_known_spills=aot.KNOWN_SPILLS,
                           cuda=cuda_rows, traffic=traffic, launch_plans=plans), fh, indent=1)
    bad = [r for r in triton_rows if aot.is_bad(r)] + [r for r in cuda_rows if r["spills"]]
    bad += [r for r in plans if r["violations"]]
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
