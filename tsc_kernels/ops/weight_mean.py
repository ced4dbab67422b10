"""The weight-mean projection w̄ (docs/tsc.md): public entry point and the torch.library glue.

Schemas (csrc/weight_mean_cpu.cpp, TORCH_LIBRARY_FRAGMENT, and the declaration below):

    tsc::weight_mean(Tensor[] weights) -> Tensor
    tsc::weight_mean_backward(Tensor grad, Tensor[] weights) -> Tensor

weight_mean: every given conv weight (C_out, C_in, *k) (1-3 kernel dims, one floating dtype for
all) is averaged over C_in and flattened in (C_out, *k) order; the results are concatenated in
list order into one 1-D tensor of length sum(C_out * prod(k)), dtype fp32 (fp64 for fp64 weights),
in one launch. Called with every chosen conv of every block of every stage, in block order, it
returns the whole network's w̄ packed exactly as tsc::lstm_controller reads it.
weight_mean_backward: grad (that 1-D length, fp32/fp64) -> grad / C_in of each weight's slice,
packed the same way, in one launch; weights are read for C_in only. The autograd formula returns
dW[o, i, *k] = out[o, *k] as a view expanded over C_in (stride 0): no full-size dW is written
(37 MB per ResNet-50 step), autograd adds it straight into each conv's own gradient.

Ops:
  tsc::weight_mean / tsc::weight_mean_backward               C++ (CPU) and CUDA kernels, csrc/weight_mean_*
  tsc::weight_mean_triton / tsc::weight_mean_backward_triton  Triton, triton_kernels/weight_mean.py
  tsc::weight_mean_torch                                     the reference (below: the spec) in the
                                                             accumulation dtype, CompositeImplicitAutograd
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ._common import accumulation_dtype, same_device, tensor
from ._layout import to_layout
from ._shapes import NETWORKS, Network, RealShapes, nbytes
from .registry import OpDef, define, dispatch


def reference(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """w̄ of one block: each conv weight ``(C_out, C_in, *k)`` averaged over C_in, flattened, concatenated."""
    return torch.cat([w.mean(dim=1).reshape(-1) for w in weights])


def conv_weights(weights: object, name: str = "weights") -> list:
    """A non-empty list of conv weights (C_out, C_in, *k), 1-3 kernel dims, one floating dtype, one device."""
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of conv weight tensors, got {type(weights).__name__}")
    if len(weights) == 0:
        raise ValueError(f"{name} must hold at least one conv weight, got an empty {type(weights).__name__}")
    for i, w in enumerate(weights):
        tensor(w, f"{name}[{i}]")
        if not 3 <= w.dim() <= 5:
            raise ValueError(f"{name}[{i}] must be a conv weight (C_out, C_in, *k) with 1 to 3 kernel dims, "
                             f"got shape {tuple(w.shape)}")
        if w.dtype != weights[0].dtype:
            raise TypeError(f"{name}[{i}] must have {name}[0]'s dtype {weights[0].dtype}, got {w.dtype}")
    same_device({f"{name}[{i}]": w for i, w in enumerate(weights)})
    return list(weights)


def conv_in_channels(weights: list, name: str = "weights") -> None:
    """Every conv weight needs C_in >= 1: w̄ is a mean over C_in (0/0 otherwise) and dW divides by C_in."""
    for i, w in enumerate(weights):
        if w.shape[1] < 1:
            raise ValueError(f"{name}[{i}] must have at least one input channel (C_out, C_in >= 1, *k) "
                             f"to average over, got shape {tuple(w.shape)}")


def check_args(weights: object, name: str = "weights") -> list:
    """weight_mean's argument: conv_weights and conv_in_channels; returns the weights as a list."""
    weights = conv_weights(weights, name)
    conv_in_channels(weights, name)
    return weights


def conv_weights_like(weights: object, first: torch.Tensor) -> bool:
    """Whether `weights` passes conv_weights and conv_in_channels with `first`'s dtype and device.
    The per-step fast path of network_dt (one predicate per block); it never raises: on False the
    caller runs the checks that do, for the message."""
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)) or not weights:
        return False
    dtype, device = first.dtype, first.device
    for w in weights:
        if not (isinstance(w, torch.Tensor) and w.dtype == dtype and 3 <= w.dim() <= 5 and w.shape[1] >= 1
                and w.device == device):
            return False
    return True


def like_first_weight(weights: list, first: torch.Tensor, name: str, first_name: str) -> None:
    """Every weight of a block with the network's first weight's dtype and device."""
    for i, w in enumerate(weights):
        if w.dtype != first.dtype:
            raise TypeError(f"{name}[{i}] must have {first_name}'s dtype {first.dtype}, got {w.dtype}")
        if w.device != first.device:
            raise ValueError(f"all tensors must be on one device, got {first_name} on {first.device}, "
                             f"{name}[{i}] on {w.device}")


def _weight_mean_torch(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    # The op's output dtype is the accumulation dtype (fp32 for fp16/bf16 weights) on every backend.
    return reference(weights).to(accumulation_dtype(weights[0].dtype))


def packed_length(weights: Sequence[torch.Tensor]) -> int:
    """Length of the packed w̄ of `weights`: sum(C_out * prod(k))."""
    return sum(w.shape[0] * math.prod(w.shape[2:]) for w in weights)


def _fake_forward(weights):
    return weights[0].new_empty(packed_length(weights), dtype=accumulation_dtype(weights[0].dtype))


def _fake_backward(grad, weights):
    return torch.empty_like(grad)


def _setup_context(ctx, inputs, output):
    (weights,) = inputs
    # Only shapes are read by backward; saving the tensors keeps no extra memory.
    ctx.save_for_backward(*weights)


def _backward(backward_op, ctx, grad):
    """dW = broadcast(dw̄) / C_in as a stride-0 view over C_in of the packed dw̄ / C_in (one launch):
    autograd adds it into each conv's own gradient without a full-size dW ever being written.
    (The Triton op's formula; the C++ op carries the same one in csrc/weight_mean_autograd.cpp.)"""
    weights = ctx.saved_tensors
    # cast the packed values once (fp16/bf16 weights), not each expanded dW
    scaled = backward_op(grad, list(weights)).to(weights[0].dtype)
    pieces = scaled.split([packed_length([w]) for w in weights])
    return ([p.view(w.shape[0], 1, *w.shape[2:]).expand(w.shape) for p, w in zip(pieces, weights)],)


OP = define(OpDef(
    name="weight_mean",
    schema="(Tensor[] weights) -> Tensor",
    backward_schema="(Tensor grad, Tensor[] weights) -> Tensor",
    reference=_weight_mean_torch,
    fake=_fake_forward,
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
    cpp_autograd=True,  # csrc/weight_mean_autograd.cpp: the same formula, without a Python call per weight
    # Under torch.compile with `auto`, the reference: inductor folds its backward (dW = broadcast(dw̄) /
    # C_in) into the add of each conv's own weight gradient, which the fused op's packed backward
    # output cannot join. tsc-bench --host (CIFAR ResNet-56, batch 2, one thread, compiled step vs
    # compiled plain): +27 % to +36 % with the fused op, +4.8 % with the reference (lstm_controller fused).
    when_compiling="reference",
))


def packed(weights: Sequence[torch.Tensor], name: str) -> torch.Tensor:
    """w̄ of any number of conv weights in one launch on the current backend (validated; see the module docstring)."""
    weights = check_args(weights, name)
    return dispatch("weight_mean", weights[0].device)(weights)


def weight_mean(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """w̄ of one block (docs/tsc.md): each conv weight (C_out, C_in, *k) averaged over C_in, flattened, concatenated.

    Args:
        weights: the block's chosen conv weights in order (basic block: conv1, conv2; bottleneck:
            conv1, conv3), each (C_out, C_in, *k) with 1-3 kernel dims, one floating dtype, one device.
    Returns:
        1-D tensor of length sum(C_out * prod(k)), fp32 (fp64 for fp64 weights). Differentiable:
        dW = broadcast(dw̄) / C_in.
    """
    return packed(weights, "weights")


# --- Real shapes (tsc_kernels/ops/_shapes.py): launch plans and gpu-check; specs name TSC networks ---
def example_inputs(network: Network, dtype, channels_last=False, device=None, requires_grad=False) -> tuple:
    """(weights,): the network's conv weights the controller reads, in `dtype` and the layout."""
    return ([to_layout(w.detach().to(device=device, dtype=dtype), channels_last).requires_grad_(requires_grad)
             for w in network.weights],)


def _min_bytes(args):
    """Forward every weight + w̄ (fp32), backward dw̄ in, dw̄ / C_in out (dW is a stride-0 view: never written)."""
    (weights,) = args
    packed = 4 * packed_length(weights)  # w̄ is fp32
    return sum(nbytes(w) for w in weights) + packed, 2 * packed


REAL_SHAPES = RealShapes(launch=tuple((name, name) for name in NETWORKS), full=("resnet50",), tiny=("resnet1d",),
                         min_bytes=_min_bytes, network=True, note="the controller's conv weights")
