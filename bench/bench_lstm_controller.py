"""Controller fwd+bwd including the weight means (issue 3): fused (NetworkController: one
weight_mean + one batched controller launch) vs the eager loop (nn.Linear / nn.LSTMCell per block).

usage: .venv/bin/pytest bench/bench_lstm_controller.py --benchmark-only [--benchmark-json out.json]
       .venv/bin/python bench/bench_lstm_controller.py      (kernel counts and a quick timing table)

Networks: ResNet-50 (bottlenecks, C = 256..2048, L = 3/4/6/3, r = 8, D = 1.25C), ResNet-18
(basic blocks, C = 64..512, L = 2, r = 4, D = 18C) and CIFAR ResNet-56 (C = 16/32/64, L = 9).
Conv weights have their real shapes (the weight means read and write all of them).
Also prints the NetworkController forward against its two kernels alone (host-side cost).
Targets (docs/performance.md, issue 3): ResNet-50 <= 20 kernels per step (eager: 977) and >= 5x faster than eager.
Gradients are set to None after each step (optimizer.zero_grad() default), so every step allocates
them as a training step does. With conv grads (the default, as in a training step), every conv
weight also receives a full-size gradient standing for its conv's (ConvGradient): autograd adds the
weight means' gradient into it in place (the fused op's stride-0 dW view is added without ever
being written out; the eager mean's backward writes a full-size dW first). Without them
(`grads="means"`), the weight means' gradient is the weights' only one.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
from torch import nn

import _impls  # noqa: F401  (glibc keeps freed memory: the same allocator settings as every op bench)
import tsc_kernels
from tsc_kernels.nn import NetworkController, TSCController
from tsc_kernels.profiling import count_kernels

# (C_in of the network's first stage, [(C, L)], block kind)
NETWORKS = {
    "resnet50": (64, [(256, 3), (512, 4), (1024, 6), (2048, 3)], "bottleneck"),
    "resnet18": (64, [(64, 2), (128, 2), (256, 2), (512, 2)], "basic"),
    "cifar_resnet56": (16, [(16, 9), (32, 9), (64, 9)], "basic"),
}


def build(name: str):
    """(NetworkController, weights[s][d] = the block's chosen conv weights as Parameters)."""
    c_in, stages, kind = NETWORKS[name]
    ctrls, weights = [], []
    for C, L in stages:
        blocks = []
        for d in range(L):
            cin = c_in if d == 0 else C
            if kind == "bottleneck":  # conv1 (C/4, C_in, 1, 1) and conv3 (C, C/4, 1, 1)
                shapes = [(C // 4, cin, 1, 1), (C, C // 4, 1, 1)]
            else:  # conv1 (C, C_in, 3, 3) and conv2 (C, C, 3, 3)
                shapes = [(C, cin, 3, 3), (C, C, 3, 3)]
            blocks.append([nn.Parameter(torch.randn(s) * 0.05) for s in shapes])
        D = sum(s[0] * s[2] * s[3] for s in shapes)
        ctrls.append(TSCController(D, C, reduction=8 if kind == "bottleneck" else 4))
        weights.append(blocks)
        c_in = C
    return NetworkController(ctrls), weights


def eager_dt(network: NetworkController, weights) -> list[torch.Tensor]:
    """The naive controller: weight means and nn.Linear / nn.LSTMCell calls block by block."""
    out = []
    for ctrl, blocks in zip(network.stages, weights):
        state, dts = None, []
        for ws in blocks:
            wbar = torch.cat([w.mean(dim=1).reshape(-1) for w in ws])
            state = ctrl.lstm(torch.relu(ctrl.fc_in(wbar[None])), state)
            dts.append(torch.sigmoid(ctrl.fc_out(state[0])))
        out.append(torch.cat(dts))
    return out


GRADS = ("conv", "means")


class ConvGradient(torch.autograd.Function):
    """Stands in for a conv in the backward pass: hands its weight a full-size gradient that nothing
    else references, as a conv's backward does, so that autograd adds the weight means' gradient
    into it in place (a gradient passed to backward() as a root cotangent is still referenced by the
    caller and the graph root, and autograd would add out of place). Costs one 0-dim tensor per
    weight forward and nothing backward: each step reuses the gradient the previous step left."""

    @staticmethod
    def forward(ctx, weight, handed):
        ctx.handed = handed  # a one-element list: the gradient to hand over
        return weight.new_empty(())  # allocation only: no kernel

    @staticmethod
    def backward(ctx, grad):
        return ctx.handed.pop(), None


def make_step(name: str, impl: str, grads: str = "conv"):
    network, weights = build(name)
    convs = [w for b in weights for ws in b for w in ws]
    leaves = convs + list(network.parameters())
    forward = network if impl == "fused" else (lambda ws: eager_dt(network, ws))
    cotangents = [torch.randn(len(b), ctrl.channels) for b, ctrl in zip(weights, network.stages)]
    conv_grads = [[torch.randn_like(w)] for w in convs] if grads == "conv" else []
    one = torch.ones(())

    def step():
        dts = list(forward(weights))
        # after the controller, as a network's convs run after it: their gradients come first
        roots = [ConvGradient.apply(w, g) for w, g in zip(convs, conv_grads)]
        torch.autograd.backward(dts + roots, cotangents + [one] * len(roots))
        for p, g in zip(convs, conv_grads):  # the next step's conv gradients
            g.append(p.grad)
        for p in leaves:
            p.grad = None

    step()  # warm-up: lazy initialisation, first allocations
    return step


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("grads", GRADS)
@pytest.mark.parametrize("name", list(NETWORKS))
def test_controller_fwd_bwd(benchmark, name, grads, impl):
    step = make_step(name, impl, grads)
    benchmark.group = f"controller fwd+bwd {name} ({grads} grads)"
    benchmark.extra_info.update(impl=impl, grads=grads, kernels=count_kernels(step), threads=torch.get_num_threads())
    benchmark(step)


def seconds(fn, repeat: int) -> list[float]:
    """Wall time of each of `repeat` calls of fn."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_ms(step, repeat: int = 30) -> float:
    return statistics.median(seconds(step, repeat)) * 1e3


def forward_overhead(name: str, repeat: int = 300) -> tuple[float, float]:
    """(µs of the whole NetworkController forward, with autograd recording, as a training step runs
    it; µs of its two kernels alone, below autograd): the difference is the host-side Python and
    autograd cost every eager step pays (min of `repeat` calls after a tenth as many to warm up)."""
    network, weights = build(name)
    flat = [w.detach() for b in weights for ws in b for w in ws]
    params = [p.detach() for ctrl in network.stages for p in ctrl.lstm_params()]
    blocks = [len(b) for b in weights]
    whole = min(seconds(lambda: network(weights), repeat)[repeat // 10:]) * 1e6
    def both_kernels():
        return torch.ops.tsc.lstm_controller(torch.ops.tsc.weight_mean(flat), blocks, params)

    kernels = min(seconds(both_kernels, repeat)[repeat // 10:]) * 1e6
    return whole, kernels


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend {tsc_kernels.get_backend()}")
    # first, while the process is fresh (after the step benches its host time reads 1.5-2x higher)
    if tsc_kernels.get_backend() in ("auto", "cpu") and "cpu" in tsc_kernels.available_backends():  # the C++ kernels
        print(f"{'network':16s} {'forward us':>11s} {'kernels us':>11s}   "
              "(NetworkController forward vs its two kernels alone)")
        for name in NETWORKS:
            whole, kernels = forward_overhead(name)
            print(f"{name:16s} {whole:11.0f} {kernels:11.0f}")
        print()
    print(f"{'network':16s} {'grads':>6s} {'fused ms':>9s} {'eager ms':>9s} {'speed-up':>9s} {'fused kernels':>14s} "
          f"{'eager kernels':>14s}")
    for name in NETWORKS:
        for grads in GRADS:
            fused, eager = make_step(name, "fused", grads), make_step(name, "eager", grads)
            kf, ke = count_kernels(fused), count_kernels(eager)
            # alternating rounds, best median of three: the machine is shared and noisy
            tf, te = [min(ts) for ts in zip(*((median_ms(fused), median_ms(eager)) for _ in range(3)))]
            print(f"{name:16s} {grads:>6s} {tf:9.2f} {te:9.2f} {te / tf:8.2f}x {kf:14d} {ke:14d}")


if __name__ == "__main__":
    main()
