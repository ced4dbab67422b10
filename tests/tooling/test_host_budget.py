"""The host's budget of a TSC step (issue 21): on a GPU a CIFAR-size step is bound by the host, so
what TSC adds in Python calls and dispatcher ops is what it costs there (`tsc-bench --host`).

These tests count calls, never time: Python-level calls with sys.setprofile (every function frame
entered, torch's own included) and operator calls with torch.profiler. A change that puts an
argument check, a backend resolution or a per-block controller op back on the per-step path fails
here instead of silently costing every user's step.
"""
import collections
import gc
import sys

import pytest
import torch
from torchvision.models.resnet import BasicBlock

import tsc_kernels
from tsc_kernels import models, reference
from tsc_kernels.profiling import count_ops

pytestmark = pytest.mark.cpu_only

TSC_DIR = tsc_kernels.__file__.rsplit("/", 1)[0]


def python_calls(fn) -> collections.Counter:
    """(file, function) -> number of Python frames entered during fn() (C functions not counted).
    The garbage collector is run before and held off during fn(): a collection that fell inside it
    would count the finalizers and weakref callbacks of other tests' objects (a CI run counted two
    calls more for one of two identical measurements)."""
    calls = collections.Counter()

    def profile(frame, event, arg):
        if event == "call":
            calls[(frame.f_code.co_filename, frame.f_code.co_name)] += 1

    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
        if enabled:
            gc.enable()
    return calls


def differ(a: collections.Counter, b: collections.Counter) -> dict:
    """The calls a and b count differently: {(file, function): (in a, in b)}."""
    return {k: (a[k], b[k]) for k in a.keys() | b.keys() if a[k] != b[k]}


def ours(calls: collections.Counter) -> int:
    return sum(n for (path, _), n in calls.items() if path.startswith(TSC_DIR))


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    plain = models.cifar_resnet(20, tsc=None)
    fixed = models.cifar_resnet(20, tsc="fixed")
    lstm = models.cifar_resnet(20, tsc="lstm")
    deep = models.cifar_resnet(56, tsc="lstm")
    x = torch.randn(2, 3, 8, 8)
    for m in (plain, fixed, lstm, deep):
        m(x).sum().backward()  # warm: plans, caches, lazy initialisation
    return plain, fixed, lstm, deep


def test_a_tsc_block_makes_no_more_python_calls_than_the_plain_block(nets):
    """A TSC basic block's forward (fused BatchNorm tail, the C++ op of `auto`) against
    torchvision's BasicBlock with the same convs: no more Python calls in all (today 43 against
    56) and at most 4 frames of ours (forward, _branch_before_tail, batch_norm_tail, eager_op's
    cache lookup): no argument checks, no backend resolution, no wrapper between the block and the op."""
    plain, fixed, _, _ = nets
    pb, tb = plain.layer2[1], fixed.layer2[1]
    assert type(pb) is BasicBlock
    x = torch.randn(2, 32, 4, 4, requires_grad=True)
    dt = torch.full((32,), 0.5)
    tb(x, dt), pb(x)
    plain_calls, tsc_calls = python_calls(lambda: pb(x)), python_calls(lambda: tb(x, dt))
    assert sum(tsc_calls.values()) <= sum(plain_calls.values()), (tsc_calls, plain_calls)
    assert ours(tsc_calls) <= 4, {k: v for k, v in tsc_calls.items() if k[0].startswith(TSC_DIR)}


def test_a_tsc_block_launches_fewer_top_level_ops_than_the_plain_block(nets):
    """BN + add_ + relu_ become one fused op (num_batches_tracked's add_ stays, as in BatchNorm)."""
    plain, fixed, _, _ = nets
    pb, tb = plain.layer2[1], fixed.layer2[1]
    x = torch.randn(2, 32, 4, 4, requires_grad=True)
    dt = torch.full((32,), 0.5)
    _, plain_top = count_ops(lambda: pb(x))
    _, tsc_top = count_ops(lambda: tb(x, dt))
    assert tsc_top <= plain_top - 2, (tsc_top, plain_top)


@pytest.mark.parametrize("mode", ["lstm", "fixed"])
def test_the_controller_costs_the_same_python_calls_at_any_depth(nets, mode):
    """Every block's Δt of a training step: the same Python calls for ResNet-20 and ResNet-56 (no
    call per block or per weight: checks, gathering and the split are done once per step), a
    constant budget of ours, and a handful of ops: weight_mean, lstm_controller, one split."""
    _, fixed, lstm, deep = nets
    shallow = lstm if mode == "lstm" else fixed
    deep = deep if mode == "lstm" else models.cifar_resnet(56, tsc="fixed")
    def step(net):  # what a training forward runs for its Δt (_TSCNetwork._forward_stages)
        return net._step_sizes(aliased=True)

    step(shallow), step(deep)  # other tests in this worker may have run either since the fixture
    a, b = python_calls(lambda: step(shallow)), python_calls(lambda: step(deep))
    assert sum(a.values()) == sum(b.values()), differ(a, b)
    # lstm 16: _step_sizes, _planned_step_sizes, _run_plan, _controller_tensors, _runs_network_dt,
    # tsc_stages, 5 comprehensions, matches, run, eager_op x2, training_weight_mean; fixed 12 (no
    # weight is read)
    assert ours(b) <= (16 if mode == "lstm" else 12), {k: v for k, v in b.items() if k[0].startswith(TSC_DIR)}
    _, top = count_ops(lambda: step(deep))
    # weight_mean (with the weights' aliases) + lstm_controller + split; fixed: full + split
    assert top <= (3 if mode == "lstm" else 2), top


def test_the_controller_backward_makes_no_op_per_weight(nets):
    """weight_mean's backward (C++ autograd) hands each conv weight its dW as an alias of one packed
    buffer, not as narrow + view + expand ops (162 top-level ops of a ResNet-56 step): the same ops
    at depth 20 and 56. The gradients stay the reference's, also with create_graph (there the views
    are ops, so they stay differentiable)."""
    _, _, lstm, deep = nets
    counts = []
    for net in (lstm, deep):
        weights = [w for s in net.controller_inputs() for ws in s for w in ws]
        wbar = tsc_kernels.weight_mean(weights)
        grad = torch.randn_like(wbar)
        _, top = count_ops(lambda: torch.autograd.grad(wbar, weights, grad, retain_graph=True))
        counts.append(top)
        got = torch.autograd.grad(wbar, weights, grad, retain_graph=True)
        want = torch.autograd.grad(reference.weight_mean(weights), weights, grad)
        for g, w in zip(got, want):
            assert g.stride(1) == 0
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        graph = torch.autograd.grad(wbar, weights, grad, create_graph=True)
        for g, w in zip(graph, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert counts[0] == counts[1] <= 3, counts


def test_the_controller_fast_path_gives_the_checked_path_s_step_sizes(nets):
    """block_step_sizes (the plan) and compute_step_sizes (network_dt, checked) agree bitwise, and
    so do their gradients."""
    _, _, lstm, _ = nets
    fast = lstm.block_step_sizes()
    slow = [d.unbind(0) for d in lstm.compute_step_sizes()]
    params = list(lstm.tsc_controller.parameters()) + [w for s in lstm.controller_inputs() for ws in s for w in ws]
    g_fast = torch.autograd.grad(sum((d * (i + 1)).sum() for i, d in enumerate(x for s in fast for x in s)), params)
    g_slow = torch.autograd.grad(sum((d * (i + 1)).sum() for i, d in enumerate(x for s in slow for x in s)), params)
    for f, s in zip((x for s in fast for x in s), (x for s in slow for x in s)):
        assert torch.equal(f, s)
    for f, s in zip(g_fast, g_slow):
        assert torch.equal(f, s)


def test_a_replaced_weight_or_controller_forward_is_seen(nets):
    """The plan is reused only while it describes the network: a conv weight replaced by another
    tensor, or a controller whose forward is replaced, take the checked path."""
    _, _, lstm, _ = nets
    net = models.cifar_resnet(8, tsc="lstm")
    before = [d.clone() for s in net.block_step_sizes() for d in s]
    conv = net.layer1[0].conv1
    conv.weight = torch.nn.Parameter(conv.weight.detach() * 3)
    after = [d for s in net.block_step_sizes() for d in s]
    assert not torch.equal(before[0], after[0])
    torch.testing.assert_close(after[0], net.compute_step_sizes()[0][0], rtol=0, atol=0)
    net.tsc_controller.forward = lambda weights: [torch.full((len(s), s[0][-1].shape[0]), 0.25) for s in weights]
    assert all(torch.equal(d, torch.full_like(d, 0.25)) for s in net.block_step_sizes() for d in s)


def test_a_fixed_plan_is_rechecked_when_the_network_changes():
    """A "fixed" network's plan is reused without reading its conv weights, yet a changed network
    is seen: another dtype (moved in place), a replaced block, a new step size, a hooked controller."""
    import copy

    net = models.cifar_resnet(8, tsc="fixed")
    first = net.block_step_sizes()
    assert net.block_step_sizes()[0][0] is first[0][0]  # the plan's constants, reused
    net.double()
    assert all(d.dtype == torch.float64 for s in net.block_step_sizes() for d in s)
    net.layer2[0] = copy.deepcopy(net.layer2[0])
    plan = net.tsc_controller.__dict__["_plan"]
    net.block_step_sizes()
    assert net.tsc_controller.__dict__["_plan"] is not plan
    for c in net.tsc_controller.stages:
        c.dt = 0.125
    assert all(torch.equal(d, torch.full_like(d, 0.125)) for s in net.block_step_sizes() for d in s)
    net.tsc_controller.register_forward_hook(lambda m, i, o: [torch.full_like(t, 2.0) for t in o])
    assert all(torch.equal(d, torch.full_like(d, 2.0)) for s in net.block_step_sizes() for d in s)


def test_a_block_still_names_a_bad_argument(nets):
    """Skipping the per-call checks keeps their protection: what the caller can get wrong fails
    the op, and the public op's checks then name the argument."""
    _, fixed, _, _ = nets
    block = fixed.layer2[1]
    x = torch.randn(2, 32, 4, 4)
    with pytest.raises(ValueError, match=r"dt must have shape \(C,\) = \(32,\)"):
        block(x, torch.ones(16))
    with pytest.raises(TypeError, match="dt must be a torch.Tensor"):
        block(x, 0.5)
    with pytest.raises(TypeError, match="dt must have dtype"):
        block(x, torch.ones(32, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="needs its step sizes"):
        block(x)
    with pytest.raises(ValueError, match="expected 4D input"):  # BatchNorm2d's own check
        fixed.layer2[1].bn2.train()
        from tsc_kernels.models.blocks import batch_norm_tail
        batch_norm_tail(block.bn2, x[0], x[0], torch.ones(32), True)


def test_compiled_tsc_steps_add_no_graph_break_and_no_recompile(nets):
    """Under torch.compile our ops trace into one graph (fullgraph) and, after warm-up, a training
    step neither recompiles nor fails a guard: the host pays the graph's call, never a re-trace."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = models.cifar_resnet(8, tsc="lstm")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(compiled(x), y).backward()
        opt.step()

    for _ in range(2):
        step()
    frames = counter.frame_count
    assert frames == 1
    for _ in range(3):
        step()
    assert counter.frame_count == frames, "a compiled TSC step recompiled after warm-up"
    torch._dynamo.reset()
