"""gpu-check's whole-network checks (docs/gpu.md): a training step (forward, backward, SGD) of each
network in NETWORKS, per backend, under ``torch.cuda.set_sync_debug_mode("error")`` (step
``sync_debug``) and captured into a CUDA graph whose replays must match the same steps run eagerly
(step ``cuda_graph``); ``torch.compile(mode="reduce-overhead")`` of ResNet-20 (step ``reduce_overhead``).

The networks cover every op and both layouts and dtypes a model runs: ResNet-20 (residual update /
BatchNorm tail, fp32 NCHW), LM-ResNet-56 (multistep_update with stochastic depth's keep mask),
DenseNet-40 (scale_concat), an RK4 ODE net (ode_combine, Euler-free), and torchvision's ResNet-50
converted, channels_last under bf16 autocast (the BatchNorm tail's rows path); every TSC network
also runs weight_mean and lstm_controller.

Every function takes the device, and the CUDA-only parts (the sync-debug guard, the graph capture)
are arguments: the CPU tests run the same steps with a no-op guard and an eager "capture".
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

# Estimated H100 time (gpu_check.ESTIMATE_SECONDS): sync_debug ~60 s for 5 networks x 2 backends
# (model builds, and the first-call Triton JIT of every kernel the networks' shapes and dtypes need;
# the compute is milliseconds), cuda_graph ~20 s (the kernels are compiled by then: two models, 3
# warm-up steps, a capture, 3 replays and 3 eager steps each), reduce_overhead ~60 s (two inductor
# builds of ResNet-20).


@dataclass(frozen=True)
class Network:
    name: str
    build: Callable[[], torch.nn.Module]  # builds on the current default device
    image: tuple[int, int, int]  # (C, H, W) of the GPU step's input
    classes: int = 10
    batch: int = 8
    channels_last: bool = False
    autocast: torch.dtype | None = None
    loss_tol: float = 1e-4  # graph replay vs eager: loss rtol (atol a tenth of it)
    param_tol: float = 1e-3  # and the largest parameter difference after the steps


def _resnet20():
    from . import models
    return models.cifar_resnet(20, num_classes=10, tsc="lstm")


def _lm_resnet56():
    from . import models
    return models.cifar_lm_resnet(56, tsc="lstm", stochastic_depth=0.8)  # the paper's p_L for LM-ResNet-56


def _densenet40():
    from . import models
    return models.cifar_densenet(40, 12, tsc="lstm")


def _odenet():
    from . import ode
    return ode.odenet(3, 10, widths=(16, 32), solver="rk4", step_size=0.5)  # two RK4 steps a block


def _resnet50():
    import torchvision

    from . import convert
    return convert(torchvision.models.resnet50(weights=None))


NETWORKS = (
    Network("resnet20", _resnet20, (3, 32, 32)),
    Network("lm_resnet56", _lm_resnet56, (3, 32, 32)),
    Network("densenet40", _densenet40, (3, 32, 32)),
    Network("odenet_rk4", _odenet, (3, 32, 32)),
    # bf16: a replay and an eager step may round differently where cuDNN picks other algorithms
    Network("resnet50_cl_bf16", _resnet50, (3, 160, 160), classes=1000, channels_last=True, autocast=torch.bfloat16,
            loss_tol=2e-2, param_tol=2e-3),
)


def network(name: str) -> Network:
    for net in NETWORKS:
        if net.name == name:
            return net
    raise ValueError(f"network must be one of {[n.name for n in NETWORKS]}, got {name!r}")


def training_step(net: Network, backend: str, device, compile_mode: str | None = None, batch: int | None = None,
                  image: tuple[int, int, int] | None = None, seed: int = 0):
    """(model, step) of `net` on `device`: step() runs forward (under net.autocast), backward and SGD
    on fixed data and returns the loss. The same seed gives the same weights and data. With
    compile_mode, the forward is torch.compile(model, mode=compile_mode)."""
    import tsc_kernels
    device = torch.device(device)
    torch.manual_seed(seed)
    with torch.device(device):
        model = net.build()
    fmt = torch.channels_last if net.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(batch or net.batch, *(image or net.image), device=device).contiguous(memory_format=fmt)
    target = torch.randint(0, net.classes, (x.shape[0],), device=device)
    forward = model if compile_mode is None else torch.compile(model, mode=compile_mode)

    def step():
        with tsc_kernels.use_backend(backend):
            opt.zero_grad(set_to_none=False)  # a captured graph keeps its gradient buffers
            # cache_enabled=False: autocast's cast cache must not outlive a CUDA graph capture
            with torch.autocast(device.type, dtype=net.autocast or torch.bfloat16, enabled=net.autocast is not None,
                                cache_enabled=False):
                loss = torch.nn.functional.cross_entropy(forward(x), target)
            loss.backward()
            opt.step()
        return loss
    return model, step


@contextlib.contextmanager
def cuda_sync_debug_error():
    """Any synchronising CUDA call inside raises (torch.cuda.set_sync_debug_mode("error"))."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def check_no_sync(net: Network, backend: str, device, guard=cuda_sync_debug_error, **sizes) -> str:
    """A second training step inside `guard` (the first builds tables, JIT-compiles, initialises)."""
    _, step = training_step(net, backend, device, **sizes)
    step()
    with guard():
        step()
    return "no sync"


def _seeded(step, seed: int):
    torch.manual_seed(seed)  # the same stochastic-depth masks for a replay and its eager twin
    return step()


def cuda_graph_capture(step, warm_up):
    """(replay, loss) of step captured in a CUDA graph after warm_up() on a side stream (as
    torch.cuda.graphs requires); loss() is the captured loss tensor, rewritten by each replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm_up()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    return graph.replay, lambda: loss


def eager_capture(step, warm_up):
    """The CPU stand-in of cuda_graph_capture: a "replay" runs step eagerly (the tests)."""
    warm_up()
    last = {}

    def replay():
        last["loss"] = step()
    return replay, lambda: last["loss"]


def check_graph_replay(net: Network, backend: str, device, capture=cuda_graph_capture, warm_up: int = 3,
                       replays: int = 3, **sizes) -> str:
    """Replays of a captured training step give the losses and parameters of the same steps run
    eagerly on a twin model (same weights, data and random masks)."""
    model, step = training_step(net, backend, device, **sizes)
    twin, twin_step = training_step(net, backend, device, **sizes)
    twin.load_state_dict(model.state_dict())

    def warm():
        for i in range(warm_up):
            _seeded(step, i), _seeded(twin_step, i)
    replay, loss = capture(step, warm)
    for i in range(warm_up, warm_up + replays):
        torch.manual_seed(i)
        replay()
        want = _seeded(twin_step, i)
        if not torch.isfinite(want).item():
            raise AssertionError(f"{net.name} on {backend}: the eager loss is not finite at step {i}: the check's "
                                 "setup diverged (input too small for BatchNorm, or the learning rate)")
        torch.testing.assert_close(loss().detach(), want.detach(), rtol=net.loss_tol, atol=net.loss_tol / 10)
    diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), twin.parameters()))
    if not diff < net.param_tol:
        raise AssertionError(
            f"{net.name} on {backend}: parameters after {replays} replays differ from eager by {diff:.3g}")
    return f"replay == eager (max param diff {diff:.2e})"


def per_network(check, backends, device, networks=NETWORKS, **kwargs) -> tuple[str, dict, str]:
    """check(net, backend, device, **kwargs) for every network and backend: (status, numbers, reason);
    a failing pair is recorded with its error and does not stop the others."""
    numbers, failed = {}, []
    for net in networks:
        for be in backends:
            try:
                numbers[f"{net.name} {be}"] = check(net, be, device, **kwargs)
            except Exception as exc:
                numbers[f"{net.name} {be}"] = f"FAILED {type(exc).__name__}: {exc}"[:600]
                failed.append(f"{net.name} {be}")
    if not backends:
        return "skipped", numbers, "no fused CUDA backend available"
    return ("failed" if failed else "passed"), numbers, (f"failed: {', '.join(failed)}" if failed else "")


def _host_ms(fn, reps: int = 20) -> float:
    """Wall time per call of fn() with the device drained before and after (ms)."""
    import time
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def check_reduce_overhead(net: Network, backend: str, device) -> str:
    """torch.compile(mode="reduce-overhead") of a training step against eager and a hand-captured
    CUDA graph of the same step: equal losses, no recompile after warm-up, and the host time per step
    of the three ways to run it."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    _, compiled_step = training_step(net, backend, device, compile_mode="reduce-overhead")
    _, eager_step = training_step(net, backend, device)
    for _ in range(3):  # warm-up: compile, record the CUDA graphs
        compiled_step(), eager_step()
    frames = counters["frames"]["ok"]
    for _ in range(3):
        got, want = compiled_step(), eager_step()
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-3, atol=1e-3)
    if counters["frames"]["ok"] != frames:
        raise AssertionError(f"{backend}: reduce-overhead recompiled after warm-up")
    replay, _ = cuda_graph_capture(eager_step, lambda: [eager_step() for _ in range(3)])
    try:
        return (f"host ms per step: eager {_host_ms(eager_step):.2f}, reduce-overhead "
                f"{_host_ms(compiled_step):.2f}, captured replay {_host_ms(replay):.2f}; no recompile")
    finally:
        torch._dynamo.reset()
