"""Every tensor a C++/CUDA backward reads must be on the op's device: a CPU tensor among CUDA ones
would hand the kernel a host pointer and kill the CUDA context. The checks live in the argument
preparation the CPU and CUDA kernels share (csrc/<op>_layout.h), so they are exercised here by calling
the CPU kernel directly (below the dispatcher, which would otherwise route a meta tensor to the fake)
with one argument on the meta device."""
import pytest
import torch

from tsc_kernels import _extension

pytestmark = pytest.mark.skipif(not _extension.has_cpp_ops(), reason="the C++ extension is not built (make build)")

CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def _cpu_kernel(name):
    return getattr(torch.ops.tsc, name).default.redispatch


def _bn_backward_args(relu_out):
    x = torch.randn(2, 3, 4)
    dt, mean, invstd = torch.rand(3), torch.zeros(3), torch.ones(3)
    return (torch.randn(2, 3, 4), x, dt, torch.ones(3), torch.zeros(3), mean, invstd, relu_out, True)


def _multistep_backward_args(grad, relu_out):
    u = torch.randn(2, 3, 4)
    return (
        grad,
        u,
        torch.randn(2, 3, 4),
        torch.randn(2, 3, 4),
        torch.tensor(0.3),
        torch.rand(3),
        torch.ones(2),
        relu_out,
    )


def test_batch_norm_backward_rejects_relu_out_on_another_device():
    run = _cpu_kernel("batch_norm_residual_update_backward")
    run(CPU, *_bn_backward_args(torch.randn(2, 3, 4)))  # all on the CPU: accepted
    with pytest.raises(RuntimeError, match="relu_out must be on x's device"):
        run(CPU, *_bn_backward_args(torch.empty(2, 3, 4, device="meta")))


@pytest.mark.parametrize("which", ["grad", "relu_out"])
def test_multistep_backward_rejects_grad_or_relu_out_on_another_device(which):
    run = _cpu_kernel("multistep_update_backward")
    run(CPU, *_multistep_backward_args(torch.randn(2, 3, 4), torch.randn(2, 3, 4)))  # accepted
    meta = torch.empty(2, 3, 4, device="meta")
    args = _multistep_backward_args(meta, torch.randn(2, 3, 4)) if which == "grad" else \
        _multistep_backward_args(torch.randn(2, 3, 4), meta)
    with pytest.raises(RuntimeError, match=f"{which} must be on u's device"):
        run(CPU, *args)
