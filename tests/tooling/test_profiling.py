"""Kernel counting (tsc_kernels.profiling): leaf compute ops, multi-tensor ops as their GPU launches."""
import pytest
import torch

from tsc_kernels.profiling import count_kernels, kernel_names, multi_tensor_launches

KB = 65536  # elements per multi_tensor_apply block


@pytest.mark.parametrize("numels, depth, launches", [
    ([7] * 200, 2, 4),           # 64 tensors per launch with two lists: 64+64+64+8
    ([7] * 200, 1, 2),           # 110 with one list
    ([7] * 110, 1, 1),           # exactly one full table
    ([0, 0, 5], 3, 1),           # empty tensors take no slot
    ([320 * KB], 2, 1),          # exactly one full block table
    ([320 * KB + 1], 2, 2),      # one element over: the tensor straddles two launches
    ([300 * KB, 30 * KB], 2, 2),  # the second tensor's chunks spill into a second launch
    ([], 2, 0),
])
def test_multi_tensor_launches_follow_multi_tensor_apply(numels, depth, launches):
    assert multi_tensor_launches(numels, depth) == launches


def test_foreach_ops_count_their_launches_not_their_cpu_loop():
    a = [torch.randn(3, 5) for _ in range(130)]
    b = [torch.randn(3, 5) for _ in range(130)]

    def foreach():
        torch._foreach_add_(a, b, alpha=0.5)  # two lists: 64 + 64 + 2
        torch._foreach_mul_(a, 0.9)           # one list: 110 + 20

    def loop():
        for x, y in zip(a, b):
            x.add_(y, alpha=0.5)

    assert kernel_names(foreach) == {"aten::_foreach_add_": 3, "aten::_foreach_mul_": 2}
    assert count_kernels(loop) == 130


def test_leaf_ops_and_metadata_ops():
    x = torch.randn(4, 6, requires_grad=True)

    def step():
        y = x.view(6, 4).t().relu().sum()  # view, t (and sum's backward expand) are metadata
        y.backward()

    step()
    names = kernel_names(step)
    assert not {"aten::view", "aten::t", "aten::expand"} & set(names)
    # relu runs as clamp_min, its backward as threshold_backward; relu itself has a compute op
    # beneath it and is not counted
    assert names["aten::clamp_min"] == 1 and names["aten::threshold_backward"] == 1
    assert "aten::relu" not in names
    assert count_kernels(step) == sum(names.values())


def test_an_sgd_step_costs_a_few_launches_not_three_per_parameter():
    model = torch.nn.Sequential(*[torch.nn.Linear(5, 5) for _ in range(40)])  # 80 parameters
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    model(torch.randn(2, 5)).sum().backward()
    opt.step()  # the momentum buffers exist from here on
    names = kernel_names(opt.step)
    # mul_(bufs), add_(bufs, grads), add_(params, bufs): 1 + 2 + 2 launches for 80 tensors
    assert names == {"aten::_foreach_mul_": 1, "aten::_foreach_add_": 4}
