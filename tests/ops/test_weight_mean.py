"""The weight-mean projection (the TSC controller's first kernel; docs/tsc.md, docs/ops.md) on every
backend vs tsc_kernels.reference, and its Triton kernel under the interpreter. Its use inside the
controller (opcheck of both ops, torch.compile of the network) is in test_lstm_controller.py."""
import importlib.util
import math
import os

import pytest
import torch

import tsc_kernels
from tsc_kernels import _extension
from tsc_kernels import reference
from conftest import TOLERANCES


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_weight_mean_matches_reference(backend, dtype):
    ws = [torch.randn(8, 5, 3, 3, dtype=dtype), torch.randn(6, 3, 1, 1, dtype=dtype), torch.randn(4, 7, 3, dtype=dtype),
          torch.randn(3, 2, 2, 3, 2, dtype=dtype),  # conv3d
          torch.randn(5, 6, 3, 3, dtype=dtype).to(memory_format=torch.channels_last),
          torch.randn(4, 9, 5, 5, dtype=dtype)[:, ::2],  # non-contiguous C_in
          # C_in past the CPU kernel's vector runs (lcm(K, lanes) values) with rows left over
          torch.randn(7, 19, 3, 3, dtype=dtype), torch.randn(5, 21, 3, dtype=dtype), torch.randn(3, 11, 5, 5, dtype=dtype),
          torch.randn(4, 13, 2, 2, dtype=dtype)]
    ws = [w.requires_grad_() for w in ws]
    out = tsc_kernels.weight_mean(ws)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ref = reference.weight_mean([w.to(acc) for w in ws])
    assert out.dtype == acc and out.shape == (sum(w.shape[0] * math.prod(w.shape[2:]) for w in ws),)
    # fp32 accumulation on every backend; the torch backend rounds fp16/bf16 means to the input dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, ws, grad)
    want = torch.autograd.grad(reference.weight_mean(ws).to(acc), ws, grad)
    for i, (g, w, x) in enumerate(zip(got, want, ws)):
        assert g.dtype == x.dtype and g.shape == x.shape, i
        torch.testing.assert_close(g, w, msg=lambda m: f"weights[{i}]: {m}")
    if backend != "torch":  # dW is a stride-0 view over C_in: no full-size dW is written
        assert all(g.stride(1) == 0 for g in got)



def test_weight_mean_gradient_reaches_only_weights_that_require_it(backend):
    ws = [torch.randn(4, 3, 3, 3, requires_grad=True), torch.randn(5, 4, 1, 1), torch.randn(2, 5, 3, requires_grad=True)]
    out = tsc_kernels.weight_mean(ws)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [ws[0], ws[2]], grad)
    want = torch.autograd.grad(reference.weight_mean(ws), [ws[0], ws[2]], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert ws[1].grad is None
    # accumulated into an existing gradient (a conv's), as in a training step
    ws[0].grad = torch.ones_like(ws[0])
    tsc_kernels.weight_mean(ws).backward(grad)
    torch.testing.assert_close(ws[0].grad, 1 + want[0])



@pytest.mark.parametrize("weights, error, match", [
    ([], ValueError, r"weights must hold at least one conv weight"),
    (torch.randn(4, 3, 3, 3), TypeError, r"weights must be a list or tuple"),
    ([torch.randn(4, 3)], ValueError, r"weights\[0\] must be a conv weight"),
    ([torch.randn(4, 3, 1, 1), torch.randn(4, 3, 1, 1, 1, 1)], ValueError, r"weights\[1\] must be a conv weight"),
    ([torch.randn(4, 3, 1, 1), torch.ones(4, 3, 1, 1, dtype=torch.int64)], TypeError, r"weights\[1\] must have dtype"),
    ([torch.randn(4, 3, 1, 1), torch.randn(4, 3, 1, 1).double()], TypeError, r"weights\[1\] must have weights\[0\]'s dtype"),
    ([torch.randn(4, 3, 1, 1), "conv"], TypeError, r"weights\[1\] must be a torch.Tensor"),
    ([torch.randn(4, 3, 1, 1), torch.randn(4, 0, 3, 3)], ValueError, r"weights\[1\] must have at least one input channel"),
])
def test_weight_mean_bad_inputs(backend, weights, error, match):
    with pytest.raises(error, match=match):
        tsc_kernels.weight_mean(weights)



@pytest.mark.skipif(not _extension.has_cpp_ops(), reason="the C++ ops are not built")
def test_cpp_weight_mean_rejects_what_it_cannot_average():
    # the op itself, below the public checks: a mean over no input channels is 0/0, never garbage
    with pytest.raises(RuntimeError, match=r"weights\[1\] must have C_in >= 1"):
        torch.ops.tsc.weight_mean([torch.randn(3, 4, 3), torch.randn(2, 0, 3, 3)])


# ---------------------------------------------------------------------------------------------
# The Triton kernel under the interpreter (from test_lstm_controller_triton.py).
# Every layout the kernel's (C_out, C_in, K) strided view must handle.
# ---------------------------------------------------------------------------------------------

TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
# the Triton kernels run on CPU only under the interpreter: TRITON_INTERPRET=1 before pytest starts
# (the AOT compile for sm_80/sm_90 is tests/tooling/test_triton_aot.py)
TRITON_ONLY = pytest.mark.skipif(not TRITON_INTERPRETED, reason="the Triton kernels run on CPU only under the "
                                 "interpreter: set TRITON_INTERPRET=1 before pytest starts")
if TRITON_INTERPRETED:
    import tsc_kernels._triton.weight_mean  # noqa: F401  (registers the tsc::*_triton ops)

    wm_op = torch.ops.tsc.weight_mean_triton


def conv_weights(dtype):
    """Every layout the kernel's (C_out, C_in, K) strided view must handle."""
    return [
        torch.randn(5, 7, 3, 3, dtype=dtype),                                     # 3x3, contiguous
        torch.randn(6, 37, 1, 1, dtype=dtype),                                    # 1x1, C_in spans tiles
        torch.randn(4, 3, 3, 3, dtype=dtype).to(memory_format=torch.channels_last),  # C_in innermost
        torch.randn(3, 4, 5, dtype=dtype),                                        # conv1d
        torch.randn(2, 3, 2, 2, 3, dtype=dtype),                                  # conv3d
        torch.randn(3, 2, 3, 6, dtype=dtype)[:, :, :, ::2],                       # kernel dims don't collapse
    ]



@TRITON_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_triton_weight_mean_matches_reference(dtype):
    weights = [w.requires_grad_() for w in conv_weights(dtype)]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = wm_op(weights)
    # The op returns the accumulation dtype: compare with the reference on upcast weights.
    ref = reference.weight_mean([w.to(acc) for w in weights])
    assert out.dtype == acc
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, weights, grad)
    want = torch.autograd.grad(ref, weights, grad)
    # dW is stored in the weight's dtype: fp16/bf16 allow one rounding of it (conftest.TOLERANCES).
    atol, rtol = TOLERANCES[dtype] if dtype in (torch.float16, torch.bfloat16) else (tol, tol)
    for w, g, r in zip(weights, got, want):
        assert g.dtype == w.dtype
        assert g.stride(1) == 0, "dW must be a view expanded over C_in (no full-size dW written)"
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol)



@TRITON_ONLY
def test_triton_weight_mean_opcheck():
    weights = [w.requires_grad_() for w in conv_weights(torch.float32)[:3]]
    torch.library.opcheck(wm_op, (weights,))
    ws = [w.detach() for w in weights]
    torch.library.opcheck(torch.ops.tsc.weight_mean_backward_triton, (torch.randn(wm_op(ws).shape), ws))



@TRITON_ONLY
def test_triton_weight_mean_rejects_bad_weights():
    with pytest.raises(ValueError, match="empty"):
        wm_op([])
    with pytest.raises(ValueError, match="dtype"):
        wm_op([torch.randn(2, 3, 3, 3), torch.randn(2, 3, 3, 3, dtype=torch.float64)])
    with pytest.raises(ValueError, match="conv weight"):
        wm_op([torch.randn(2, 3)])
