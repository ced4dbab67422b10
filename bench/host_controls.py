"""Where the controller's host cost sits: tsc-bench's host step (batch 2, 8x8, one thread) with the
controller taken apart, interleaved round by round against plain of the same mode.

usage: python bench/host_controls.py [--model cifar_resnet56] [--rounds 200] [--compile]

Variants (each a TSC network of tsc-bench's host configuration, its Δt from an instance
``block_step_sizes``, as tsc-bench's tsc-leafdt):
  plain        the plain step
  tsc          TSC_LSTM on `auto`: weight passes, LSTM, its 24 parameters (tsc-bench's tsc-fused)
  tsc-leafdt   Δt from one trained leaf: the fused tails and Δt's gradient, no controller
  lstm-only    the LSTM op and its parameters on a constant w̄: the controller without its passes over
               the conv weights (tsc against it: the passes and w̄'s autograd)
  lstm-flat    lstm-only with the 24 parameters as views of one flat Parameter, cut per step: what
               a packed controller would save (in the optimizer, the accumulation, the compiled
               graph's inputs), less the views' cost
  params-24    tsc-leafdt whose Δt also adds 0 x the sum of the 24 controller parameters: what the
               parameters cost by entering the step and getting gradients, without the LSTM (with
               --compile; eagerly the 24 sums and 27 adds are ops of their own)
  params-flat  the same with one flat Parameter of the same values in place of the 24
Each row: median ms of step, forward, backward, optimizer, and the median of per-round ratios
against plain (docs/performance.md, issue 21's ninth round).
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

import tsc_kernels
from tsc_kernels import backend as backend_mod
from tsc_kernels import bench
from tsc_kernels.ops import lstm_controller as controller_ops

VARIANTS = ("plain", "tsc", "tsc-leafdt", "lstm-only", "lstm-flat", "params-24", "params-flat")


def _controller_parameters(variant: bench.HostVariant, flat: bool) -> list[torch.Tensor]:
    """The 24 parameters of ``variant``'s controller, in the LSTM op's order; ``flat``: instead one
    flat Parameter of their values, which replaces them in the optimizer."""
    params = [p for c in variant.model.tsc_controller.stages for p in c.lstm_params()]
    if not flat:
        return params
    packed = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    ids = {id(p) for p in params}
    for group in variant.opt.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    variant.opt.add_param_group({"params": [packed]})
    return [packed]


def _constant_wbar_controller(variant: bench.HostVariant, flat: bool) -> None:
    """Make ``variant``'s network take Δt from the LSTM op on its w̄ at build time (constant: no
    weight pass, no w̄ gradient) and its own controller parameters; ``flat``: those parameters
    as views of one flat Parameter, which replaces them in the optimizer."""
    model = variant.model
    weights = [w for stage in model.controller_inputs() for ws in stage for w in ws]
    wbar = tsc_kernels.weight_mean(weights).detach()  # every block's w̄, packed as the controller reads it
    stages = list(model.tsc_controller.stages)
    blocks = [len(stage) for stage in model.tsc_stages()]
    sizes = [c.channels for c, L in zip(stages, blocks) for _ in range(L)]
    params = _controller_parameters(variant, flat=False)
    if flat:
        shapes, numels = [p.shape for p in params], [p.numel() for p in params]
        packed, = _controller_parameters(variant, flat=True)

        def current():
            return [t.view(s) for t, s in zip(torch.split_with_sizes(packed, numels), shapes)]
    else:
        def current():
            return params

    def block_step_sizes():
        views, out, start = torch.split_with_sizes(controller_ops._run(wbar, blocks, current()), sizes), [], 0
        for n in blocks:
            out.append(views[start:start + n])
            start += n
        return out

    model.block_step_sizes = block_step_sizes  # the instance attribute shadows the method


def _parameters_into_leaf_step_sizes(variant: bench.HostVariant, flat: bool) -> None:
    """Make tsc-leafdt's ``variant`` add 0 x (sum of its 24 controller parameters) to every block's Δt,
    so that they enter the step and get (zero) gradients; ``flat``: one flat Parameter of their values
    in their place, also in the optimizer (as lstm-flat)."""
    model = variant.model
    params = _controller_parameters(variant, flat)
    leaf_step_sizes = model.block_step_sizes

    def block_step_sizes():
        zero = sum(p.sum() for p in params) * 0.0
        return [[dt + zero for dt in stage] for stage in leaf_step_sizes()]

    model.block_step_sizes = block_step_sizes


def build(args, compiled: bool) -> list[bench.HostVariant]:
    bench_args = bench.parse_args(["--host-only", "--model", args.model])
    variants = []
    for name in VARIANTS:
        leaf = name.startswith("params-")  # built as tsc-leafdt, then given the parameters
        v = bench.HostVariant(bench_args, "tsc-leafdt" if leaf else name, None if name == "plain" else "lstm", "auto",
                              compiled)
        v.name = name
        if name in ("lstm-only", "lstm-flat"):
            _constant_wbar_controller(v, flat=name == "lstm-flat")
        elif leaf:
            _parameters_into_leaf_step_sizes(v, flat=name == "params-flat")
        variants.append(v)
    return variants


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cifar_resnet56")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--compile", action="store_true", help="the variants under torch.compile instead")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        variants = build(args, args.compile)
        for v in variants:
            with backend_mod.use_backend(v.backend_name):
                for _ in range(4):  # warm-up (and the compiled variants' compiles)
                    v.step()
        bench.run_rounds(variants, args.rounds)
    finally:
        torch.set_num_threads(threads)
    plain = variants[0]
    mode = "compiled" if args.compile else "eager"
    print(f"host controls: {args.model}, {mode}, {args.rounds} rounds, interleaved; ms (vs plain)")
    for v in variants:
        print(f"{v.name:11s} " + "  ".join(
            f"{p} {statistics.median(v.parts[p]):7.3f} ({bench.paired_overhead_pct(v.parts[p], plain.parts[p]):+5.1f}%)"
            for p in bench.PHASES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
