"""A training step on the controller's plan (eager, C++ backends): the convs read their weights through
aliases made by w̄'s autograd node, which adds each weight's w̄ gradient into its conv's gradient
itself (csrc/weight_mean_autograd.cpp, NetworkPlan.run, _TSCNetwork._forward_stages). Against the
general path (a hooked controller: network_dt, w̄'s gradient added by autograd): the same gradients
bitwise, one op per weight fewer, the Parameters back in their modules after every forward, and the
saved-tensor checks kept.
"""
import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import tsc_kernels
from tsc_kernels import models
from tsc_kernels.profiling import count_ops

pytestmark = pytest.mark.cpu_only


def _general_path(net):
    """A copy of net whose controller is hooked: network_dt every step, no aliases."""
    twin = copy.deepcopy(net)
    twin.tsc_controller.register_forward_hook(lambda *args: None)
    return twin


def _graph_names(out: torch.Tensor) -> set:
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack += [n for n, _ in node.next_functions]
    return {n.name() for n in seen}


def _weights(net) -> list:
    return [w for s in net.controller_inputs() for ws in s for w in ws]


def _params(net) -> dict:
    return dict(net.named_parameters())


@pytest.mark.parametrize("variant", ["fp32", "fp64", "channels_last"])
def test_the_convs_read_their_weights_through_the_node_of_wbar(variant):
    torch.manual_seed(0)
    net = models.cifar_resnet(20, tsc="lstm")
    x = torch.randn(3, 3, 10, 10)
    if variant == "fp64":
        net, x = net.double(), x.double()
    elif variant == "channels_last":  # the convs' gradients are channels-last: added as autograd would
        net = net.to(memory_format=torch.channels_last)
    twin = _general_path(net)
    params = _params(net)
    tops, outs = [], []
    for m in (net, twin):
        out = m(x).square().mean()
        outs.append(out)
        tops.append(count_ops(lambda: torch.autograd.backward(out, retain_graph=True))[1])
    assert "WeightMeanAliasedBackward" in _graph_names(outs[0])
    assert "WeightMeanBackward" in _graph_names(outs[1])
    if variant != "channels_last":
        assert tops[1] - tops[0] >= len(_weights(net)) == 18, tops
    assert _params(net) == params and all(type(p) is torch.nn.Parameter for p in params.values())
    # a second backward of the same graph adds the same gradients again
    for out in outs:
        out.backward()
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        assert p.grad is not None, name
        assert torch.equal(p.grad, q.grad), name


def test_timm_networks_read_the_aliases_too():
    """timm ResNets run their stages through _TSCNetwork._forward_stages (timm's own block loop,
    grad checkpointing included): the same aliases and gradients."""
    timm = pytest.importorskip("timm", reason="timm is an optional dependency")
    torch.manual_seed(2)
    net = tsc_kernels.convert(timm.create_model("resnet26", pretrained=False, num_classes=5))
    twin = _general_path(net)
    x = torch.randn(2, 3, 32, 32)
    outs = [m(x).square().mean() for m in (net, twin)]
    assert "WeightMeanAliasedBackward" in _graph_names(outs[0])
    assert "WeightMeanAliasedBackward" not in _graph_names(outs[1])
    for out in outs:
        out.backward()
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), name
    net.set_grad_checkpointing(True)
    assert "WeightMeanAliasedBackward" in _graph_names(net(x).sum())


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_checkpointed_block_gets_the_same_gradients(reentrant):
    """A checkpointed block recomputes its forward in the backward, after the aliases are gone:
    reentrant, its convs' gradients then reach the weights without w̄'s node (the node hands those
    weights w̄'s gradient alone); non-reentrant, the recomputation only refills saved tensors."""
    torch.manual_seed(1)
    net = models.cifar_resnet(8, tsc="lstm")
    twin = _general_path(net)
    for m in (net, twin):
        block = m.layer2[0]
        block.forward = lambda x, dt, f=block.forward: checkpoint(f, x, dt, use_reentrant=reentrant)
    x = torch.randn(2, 3, 8, 8, requires_grad=reentrant)  # reentrant: an input that requires grad
    for m in (net, twin):
        m(x).square().mean().backward()
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_the_aliases_keep_the_saved_tensor_checks():
    """A weight changed in place between the forward and the backward (here by the optimizer) is
    an error, as for any tensor autograd saved: the aliases share the weights' version counters."""
    net = models.cifar_resnet(8, tsc="lstm")
    x = torch.randn(2, 3, 8, 8)
    net(x).sum().backward()  # gradients for the optimizer
    loss = net(x).sum()
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_failing_forward_puts_the_parameters_back():
    net = models.cifar_resnet(8, tsc="lstm")
    params = _params(net)
    block = net.layer2[0]
    block.forward = lambda *args: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        net(torch.randn(2, 3, 8, 8))
    assert _params(net) == params and all(type(p) is torch.nn.Parameter for p in params.values())


def test_no_aliases_off_the_training_path():
    """Without autograd (training or eval), under another backend and with a frozen conv the convs
    read their Parameters; a differentiable forward on the C++ backend reads the aliases (eval mode
    too)."""
    seen = []
    net = models.cifar_resnet(8, tsc="lstm")
    net.layer1[0].conv1.register_forward_pre_hook(lambda m, args: seen.append(type(m.weight)))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        net(x)
        net.eval()(x)
    net.train()
    with tsc_kernels.use_backend("torch"):
        net(x)
    assert seen == [torch.nn.Parameter] * 3
    net(x)
    net.eval()(x)
    assert seen[3:] == [torch.Tensor] * 2
    net.layer3[0].conv2.weight.requires_grad_(False)  # a frozen conv: w̄'s gradient through autograd
    net(x).sum().backward()
    assert seen[5] is torch.nn.Parameter and net.layer3[0].conv2.weight.grad is None
