"""The batched TSC_LSTM controller (docs/tsc.md, docs/ops.md): public entry points and the torch.library glue.

Schemas (csrc/lstm_controller_cpu.cpp, TORCH_LIBRARY_FRAGMENT, and the declaration below):

    tsc::lstm_controller(Tensor wbar_packed, int[] blocks, Tensor[] params) -> (Tensor, Tensor)
    tsc::lstm_controller_backward(Tensor grad, Tensor dt_packed, Tensor wbar_packed, int[] blocks,
                                  Tensor[] params, Tensor saved) -> (Tensor, Tensor[])

Every stage s of the network in one op (GPU backends: 4 launches over every stage, the recurrent cell one
program / thread block per stage; docs/ops.md), S = len(blocks):
  blocks[s] = L_s, the stage's number of blocks (>= 0).
  params: 8 tensors per stage, stage after stage, in this order (nn.Linear / nn.LSTMCell layouts):
      fc_in.weight (H, D), fc_in.bias (H), weight_ih (4H, H), weight_hh (4H, H), bias_ih (4H),
      bias_hh (4H), fc_out.weight (C, H), fc_out.bias (C); D, H, C may differ per stage.
  wbar_packed: 1-D, stage after stage, each stage's (L_s, D_s) w̄ matrix row-major (what
      tsc::weight_mean returns for the network's chosen conv weights in block order).
  All tensors fp32 (fp64 for gradcheck), one dtype, one device.
Outputs:
  dt_packed: 1-D, stage after stage, each stage's (L_s, C_s) Δt row-major.
  saved: 1-D, per stage 7 * L_s * H_s values, laid out as x (L, H) = relu(fc_in(w̄)), the activated
      gates (L, 4H) = sigmoid(i), sigmoid(f), tanh(g), sigmoid(o) per block, the cell states c (L, H)
      and the hidden states h (L, H). Only the backward of the same backend reads it.
Backward: grad (1-D like dt_packed) and the forward's dt_packed and saved -> (grad of wbar_packed
  (1-D), grads of params (in params' order and shapes)): BPTT over the blocks of every stage.

Ops:
  tsc::lstm_controller / tsc::lstm_controller_backward                 C++ (CPU) and CUDA, csrc/lstm_controller_*
                                                                       (autograd: csrc/lstm_controller_autograd.cpp)
  tsc::lstm_controller_triton / tsc::lstm_controller_backward_triton   Triton, triton_kernels/lstm_controller.py
  tsc::lstm_controller_torch                                           the reference (below: the spec) per stage,
                                                                       CompositeImplicitAutograd; returns dt_packed only
"""
from __future__ import annotations

from operator import is_
from typing import Sequence

import torch
import torch.nn.functional as F

from . import weight_mean as _weight_mean
from ._common import accumulation_dtype, same_device, tensor
from ._shapes import NETWORKS, Network, RealShapes, nbytes
from .registry import OpDef, define, dispatch, eager_op

PARAMS_PER_STAGE = 8
SAVED_PER_UNIT = 7  # x, i, f, g, o, c, h per hidden unit and block
CONTROLLER_DTYPES = (torch.float32, torch.float64)
LSTM_PARAM_NAMES = ("fc_in_weight", "fc_in_bias", "weight_ih", "weight_hh", "bias_ih", "bias_hh",
                    "fc_out_weight", "fc_out_bias")


def reference(
    wbar: torch.Tensor,
    fc_in_weight: torch.Tensor,
    fc_in_bias: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor,
    bias_hh: torch.Tensor,
    fc_out_weight: torch.Tensor,
    fc_out_bias: torch.Tensor,
) -> torch.Tensor:
    """TSC_LSTM for one stage: ``wbar (L, D) -> dt (L, C)``.

    ``x_d = relu(fc_in(w̄_d))``; ``h_d, c_d = LSTMCell(x_d, (h_{d-1}, c_{d-1}))`` with gate order
    (i, f, g, o) and ``h_0 = c_0 = 0``; ``dt_d = sigmoid(fc_out(h_d))``.
    """
    x = torch.relu(F.linear(wbar, fc_in_weight, fc_in_bias))
    hidden = weight_hh.shape[1]
    h = wbar.new_zeros(hidden)
    c = wbar.new_zeros(hidden)
    hs = []
    for d in range(wbar.shape[0]):
        gates = F.linear(x[d], weight_ih, bias_ih) + F.linear(h, weight_hh, bias_hh)
        i, fg, g, o = gates.chunk(4)
        c = torch.sigmoid(fg) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        hs.append(h)
    return torch.sigmoid(F.linear(torch.stack(hs), fc_out_weight, fc_out_bias))


def check_args(wbar: object, params: tuple) -> None:
    """wbar (L, D) with L >= 1 and the eight parameters of one stage with nn.Linear / nn.LSTMCell shapes."""
    tensor(wbar, "wbar", CONTROLLER_DTYPES)
    if wbar.dim() != 2 or wbar.shape[0] < 1:
        raise ValueError(f"wbar must have shape (L, D) with L >= 1 blocks, got shape {tuple(wbar.shape)}")
    named = dict(zip(LSTM_PARAM_NAMES, params))
    for n, p in named.items():
        tensor(p, n, CONTROLLER_DTYPES)
        if p.dtype != wbar.dtype:
            raise TypeError(f"{n} must have wbar's dtype {wbar.dtype}, got {p.dtype}")
    for n in ("fc_in_weight", "fc_out_weight"):
        if named[n].dim() != 2:
            raise ValueError(f"{n} must be 2-D (out_features, in_features), got shape {tuple(named[n].shape)}")
    h, d = named["fc_in_weight"].shape
    c = named["fc_out_weight"].shape[0]
    expected = {
        "fc_in_weight": (h, wbar.shape[1]), "fc_in_bias": (h,), "weight_ih": (4 * h, h), "weight_hh": (4 * h, h),
        "bias_ih": (4 * h,), "bias_hh": (4 * h,), "fc_out_weight": (c, h), "fc_out_bias": (c,),
    }
    for n, shape in expected.items():
        if tuple(named[n].shape) != shape:
            raise ValueError(f"{n} must have shape {shape} (D = {wbar.shape[1]} from wbar, H = {h} from fc_in_weight, "
                             f"C = {c} from fc_out_weight), got {tuple(named[n].shape)}")
    same_device({"wbar": wbar, **named})


def lstm_params_like(params: tuple, D: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether check_args would accept `params` for a w̄ (L, D) of `dtype` on `device`: the per-step
    fast path of network_dt; on False the caller runs check_args for the message."""
    if len(params) != len(LSTM_PARAM_NAMES) or dtype not in CONTROLLER_DTYPES:
        return False
    for p in params:
        if not (isinstance(p, torch.Tensor) and p.dtype == dtype and p.device == device):
            return False
    if params[0].dim() != 2 or params[6].dim() != 2:
        return False
    h, c = params[0].shape[0], params[6].shape[0]
    expected = ((h, D), (h,), (4 * h, h), (4 * h, h), (4 * h,), (4 * h,), (c, h), (c,))
    return all(p.shape == shape for p, shape in zip(params, expected))


def _stage_slices(blocks: Sequence[int], params: Sequence[torch.Tensor]):
    """(L, D, C, params of the stage) for every stage, from the packed arguments."""
    for s, L in enumerate(blocks):
        p = params[PARAMS_PER_STAGE * s: PARAMS_PER_STAGE * (s + 1)]
        yield L, p[0].shape[1], p[6].shape[0], p


def _lstm_controller_torch(wbar_packed: torch.Tensor, blocks: Sequence[int],
                           params: Sequence[torch.Tensor]) -> torch.Tensor:
    # The reference per stage on its slice of the packed input; outputs packed like the kernels'.
    sizes = [L * D for L, D, _, _ in _stage_slices(blocks, params)]
    outs = [reference(w.view(L, D), *p).reshape(-1)
            for w, (L, D, _, p) in zip(torch.split(wbar_packed, sizes), _stage_slices(blocks, params))]
    return torch.cat(outs)


def _fake_forward(wbar_packed, blocks, params):
    dt_numel = sum(L * C for L, _, C, _ in _stage_slices(blocks, params))
    saved_numel = sum(SAVED_PER_UNIT * L * p[0].shape[0] for L, _, _, p in _stage_slices(blocks, params))
    return wbar_packed.new_empty(dt_numel), wbar_packed.new_empty(saved_numel)


def _fake_backward(grad, dt_packed, wbar_packed, blocks, params, saved):
    return torch.empty_like(wbar_packed), [torch.empty_like(p) for p in params]


def _setup_context(ctx, inputs, output):
    wbar_packed, blocks, params = inputs
    dt_packed, saved = output
    # `saved` is an internal output: do not materialise a zero gradient for it (a wasted kernel).
    ctx.set_materialize_grads(False)
    ctx.blocks = list(blocks)
    ctx.num_params = len(params)
    ctx.save_for_backward(wbar_packed, dt_packed, saved, *params)


def _backward(backward_op, ctx, grad_dt, grad_saved):
    # `saved` is internal state, never used downstream, so grad_saved carries nothing.
    wbar_packed, dt_packed, saved, *params = ctx.saved_tensors
    if grad_dt is None:
        grad_dt = torch.zeros_like(dt_packed)
    dwbar, dparams = backward_op(grad_dt, dt_packed, wbar_packed, ctx.blocks, params, saved)
    return dwbar, None, list(dparams)


OP = define(OpDef(
    name="lstm_controller",
    schema="(Tensor wbar_packed, int[] blocks, Tensor[] params) -> (Tensor, Tensor)",
    backward_schema="(Tensor grad, Tensor dt_packed, Tensor wbar_packed, int[] blocks, Tensor[] params, "
                    "Tensor saved) -> (Tensor, Tensor[])",
    reference=_lstm_controller_torch,
    reference_schema="(Tensor wbar_packed, int[] blocks, Tensor[] params) -> Tensor",  # dt_packed only
    fake=_fake_forward,
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
    # csrc/lstm_controller_autograd.cpp: the same formula, without flattening 8 tensors per stage in Python
    cpp_autograd=True,
))


def _run(wbar_packed: torch.Tensor, blocks: list[int], params: list[torch.Tensor]) -> torch.Tensor:
    """dt_packed on the current backend (arguments already validated)."""
    op = dispatch("lstm_controller", wbar_packed.device)
    out = op(wbar_packed, blocks, params)
    # the fused ops also return what their backward reads; the reference returns Δt alone
    return out[0] if OP.returns_saved(op) else out


def lstm_controller(
    wbar: torch.Tensor,
    fc_in_weight: torch.Tensor,
    fc_in_bias: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor,
    bias_hh: torch.Tensor,
    fc_out_weight: torch.Tensor,
    fc_out_bias: torch.Tensor,
) -> torch.Tensor:
    """TSC_LSTM for one stage (docs/tsc.md): ``wbar (L, D) -> Δt (L, C)``, values in (0, 1).

    ``x_d = relu(fc_in(w̄_d))``; ``h_d, c_d = LSTMCell(x_d, (h_{d-1}, c_{d-1}))`` (gates i, f, g, o;
    ``h_0 = c_0 = 0``); ``Δt_d = sigmoid(fc_out(h_d))``. Parameters have the nn.Linear(D, H),
    nn.LSTMCell(H, H) and nn.Linear(H, C) layouts; all fp32 (fp64 for gradcheck), like wbar.
    Differentiable in wbar and every parameter (BPTT over the L blocks).
    """
    params = (fc_in_weight, fc_in_bias, weight_ih, weight_hh, bias_ih, bias_hh, fc_out_weight, fc_out_bias)
    check_args(wbar, params)
    dt = _run(wbar.reshape(-1), [wbar.shape[0]], list(params))
    return dt.view(wbar.shape[0], fc_out_weight.shape[0])


def network_dt(weights: Sequence[Sequence[Sequence[torch.Tensor]]],
               controllers: Sequence[torch.nn.Module]) -> list[torch.Tensor]:
    """Every block's Δt of a network: one weight_mean launch for all blocks, one controller launch for all lstm stages.

    Args:
        weights: weights[s][d] is the list of conv weights block d of stage s declares (docs/tsc.md).
        controllers: one tsc_kernels.nn.TSCController per stage. "lstm" stages run batched in one
            tsc::lstm_controller call; "2fc" and "indp" stages run their own (plain torch) forward
            on their slice of the packed w̄; "fixed" stages read no weights and launch nothing
            but a fill.
    Returns:
        one (L_s, C_s) Δt tensor per stage.
    """
    flat, lengths, first = _validated(weights, controllers)
    lstm = [s for s, c in enumerate(controllers) if c.mode == "lstm"]
    acc = accumulation_dtype(first.dtype)
    out: list[torch.Tensor | None] = [None] * len(controllers)
    for s, ctrl in enumerate(controllers):  # constant Δt: no weight_mean, no controller launch
        if ctrl.mode == "fixed":
            out[s] = ctrl.fixed_step_sizes(lengths[s][0], first.new_empty(0, dtype=acc))
    if not flat:  # every stage is fixed
        return out
    params_of = _check_lstm_params(controllers, lengths, first)
    # One launch for every block's w̄ (validated above); stage s's (L_s, D_s) rows follow stage s-1's
    # (fixed stages skipped).
    wbar_all = dispatch("weight_mean", first.device)(flat)
    read = [s for s, c in enumerate(controllers) if c.mode != "fixed"]
    wbars: dict[int, torch.Tensor] = {}  # each stage's (L_s, D_s) w̄, needed when some stage is not lstm
    if len(lstm) != len(read):
        pieces = torch.split(wbar_all, [lengths[s][0] * lengths[s][1] for s in read])
        wbars = {s: w.view(lengths[s]) for s, w in zip(read, pieces)}
    if lstm:
        params = [p for s in lstm for p in params_of[s]]
        # All-lstm networks (the default) pass the packed w̄ as it is; mixed ones gather the lstm stages.
        wbar_lstm = torch.cat([wbars[s].reshape(-1) for s in lstm]) if wbars else wbar_all
        blocks = [lengths[s][0] for s in lstm]
        dt_packed = _run(wbar_lstm, blocks, params)
        sizes = [lengths[s][0] * controllers[s].channels for s in lstm]
        for s, dt in zip(lstm, torch.split(dt_packed, sizes)):
            out[s] = dt.view(lengths[s][0], controllers[s].channels)
    for s, ctrl in enumerate(controllers):
        if out[s] is None:
            out[s] = ctrl(wbars[s])
    return out


def _validated(weights, controllers) -> tuple[list, list, torch.Tensor]:
    """network_dt's checks of weights against controllers: (flat list of the weights the non-fixed
    stages read, [(L_s, D_s)] per stage, the network's first conv weight)."""
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError("weights must be a list (stages) of lists (blocks) of lists of conv weights, "
                        f"got {type(weights).__name__}")
    if len(weights) != len(controllers):
        raise ValueError(f"weights has {len(weights)} stages but there are {len(controllers)} stage controllers")
    # Validation runs every training step: a fast predicate per block and per stage, and the checks
    # that name the argument only when it fails (a network's blocks share one dtype and device).
    flat, lengths = [], []  # lengths[s] = (L_s, D_s)
    first = None  # the network's first conv weight: every other one must match its dtype and device
    for s, (blocks, ctrl) in enumerate(zip(weights, controllers)):
        if isinstance(blocks, torch.Tensor) or not isinstance(blocks, (list, tuple)) or len(blocks) == 0:
            raise ValueError(f"weights[{s}] must be a non-empty list of blocks (each a list of conv weights)")
        for d, ws in enumerate(blocks):
            if first is None or not _weight_mean.conv_weights_like(ws, first):
                name = f"weights[{s}][{d}]"
                ws = _weight_mean.conv_weights(ws, name)
                _weight_mean.conv_in_channels(ws, name)
                first = first if first is not None else ws[0]
                _weight_mean.like_first_weight(ws, first, name, "weights[0][0][0]")
            D = _weight_mean.packed_length(ws)
            if D != ctrl.in_features:
                raise ValueError(f"weights[{s}][{d}] gives w̄ of length {D}, "
                                 f"but stage {s}'s controller has in_features={ctrl.in_features}")
            if ctrl.mode != "fixed":  # fixed stages read no weights
                flat.extend(ws)
        if ctrl.mode != "lstm" and len(blocks) != ctrl.num_blocks:
            raise ValueError(f"weights[{s}] has {len(blocks)} blocks "
                             f"but stage {s}'s {ctrl.mode!r} controller has num_blocks={ctrl.num_blocks}")
        lengths.append((len(blocks), ctrl.in_features))
    return flat, lengths, first


def _check_lstm_params(controllers, lengths: list, first: torch.Tensor) -> dict:
    """The lstm stages' parameters against their w̄ (dtype, device, shapes), before any launch:
    {stage: its 8 parameters}."""
    acc = accumulation_dtype(first.dtype)
    params_of = {s: c.lstm_params() for s, c in enumerate(controllers) if c.mode == "lstm"}
    for s, params in params_of.items():
        if not lstm_params_like(params, lengths[s][1], acc, first.device):
            stand_in = first.new_empty(1, dtype=acc).as_strided(lengths[s], (0, 0))  # w̄'s shape, no data
            check_args(stand_in, params)
    return params_of


def training_weight_mean(weights: list, op, checks: bool) -> tuple:
    """(w̄, aliases) of an eager training step, given weight_mean's ``eager_op(name, device)``: on
    the C++ backends (cpu; cuda) w̄ and an alias of every weight for the convs to read in this
    forward (tsc::_weight_mean_aliased: w̄'s autograd node then adds each weight's w̄ gradient into
    its conv's gradient itself, csrc/weight_mean_autograd.cpp, on a GPU in one launch for all of
    them; none without autograd or with a frozen weight); else op's w̄ and no aliases."""
    if checks:
        return torch.ops.tsc._weight_mean_aliased.default._op(weights)
    return op(weights), ()


class NetworkPlan:
    """network_dt's work for one network, checked once and reused every step while the network's
    conv weights and controller parameters are the same tensors (``matches``): the flat weight list,
    the stages' block counts, the controller parameters in the op's order and the per-block split.

    ``run`` does a training step's controller work in the fewest ops: one weight_mean launch for
    every conv, one controller launch for every stage, one split of the packed Δt into the blocks'
    (C_s,) views (its backward: one cat); "fixed" networks no op (their constant Δt, filled once,
    are kept while the controllers' ``dt`` stays the same; nothing writes to them). No per-step
    argument checks: the fused ops check shapes, dtypes and devices in C++, and a caller whose
    ``run`` fails runs network_dt, whose checks name the argument. Networks whose stages are all
    "lstm" or all "fixed" have a plan (``build`` returns None otherwise: network_dt runs every step).
    """

    def __init__(self, weights: list, params: list, controllers: Sequence[torch.nn.Module], lengths: list):
        self.weights, self.params = tuple(weights), tuple(params)
        self.fixed = controllers[0].mode == "fixed"
        self.blocks = [L for L, _ in lengths]
        self.channels = [c.channels for c in controllers]
        # Δt of block d of stage s: (C_s,) at its offset of the packed (Σ L_s C_s,) output
        self.block_sizes = [C for L, C in zip(self.blocks, self.channels) for _ in range(L)]
        self.dtype, self.device = self.weights[0].dtype, self.weights[0].device
        self.acc = accumulation_dtype(self.dtype)
        self.numel = sum(self.block_sizes)
        self.controllers = tuple(controllers) if self.fixed else ()
        self.fixed_values, self.fixed_dts = None, None
        self.network_blocks: tuple = ()  # the network's blocks per stage, set by the network that built it
        self.meta = self._meta(list(self.weights) + list(self.params))

    @classmethod
    def build(cls, weights: Sequence[Sequence[Sequence[torch.Tensor]]],
              controllers: Sequence[torch.nn.Module]) -> "NetworkPlan | None":
        """The plan of network_dt(weights, controllers), after network_dt's checks (raising as it does)."""
        flat, lengths, first = _validated(weights, controllers)
        modes = {c.mode for c in controllers}
        if modes == {"fixed"}:  # reads no weights; all of them identify the network's structure
            return cls([w for blocks in weights for ws in blocks for w in ws], [], controllers, lengths)
        if modes != {"lstm"}:
            return None
        params = [p for c in controllers for p in c.lstm_params()]
        _check_lstm_params(controllers, lengths, first)
        return cls(flat, params, controllers, lengths)

    def matches(self, weights: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> bool:
        """Whether the plan still describes these tensors (the same objects in the same order, the
        first weight's dtype and device unchanged)."""
        return (len(weights) == len(self.weights) and len(params) == len(self.params)
                and all(map(is_, weights, self.weights)) and all(map(is_, params, self.params))
                and weights[0].dtype == self.dtype and weights[0].device == self.device)

    def run(self, weights: Sequence[torch.Tensor], params: Sequence[torch.Tensor], aliased: bool = False):
        """Every block's Δt, (C_s,) each, in block order: the views of one packed tensor. Eager
        only (the ops come from eager_op; under torch.compile network_dt is traced instead).

        With ``aliased``: ``(Δt's, aliases)``, where aliases (empty, or one per weight) are what the
        convs must read as their weights in this forward: w̄'s autograd node then adds each weight's
        w̄ gradient into its conv's gradient itself (csrc/weight_mean_autograd.cpp, C++ CPU ops only)."""
        if self.fixed:  # constants: filled once (one fill, one split), kept while the step sizes are the same
            values = [c.dt for c in self.controllers]
            if values != self.fixed_values or self.fixed_dts is None:
                self.fixed_values = values
                if len(set(values)) == 1:
                    packed = torch.full((self.numel,), values[0], dtype=self.acc, device=self.device)
                else:
                    packed = torch.cat([torch.full((L * C,), v, dtype=self.acc, device=self.device)
                                        for v, L, C in zip(values, self.blocks, self.channels)])
                dts = torch.split_with_sizes(packed, self.block_sizes)
                if torch.is_inference_mode_enabled():  # inference tensors: never saved for a backward
                    return dts
                self.fixed_dts = dts
            return (self.fixed_dts, ()) if aliased else self.fixed_dts
        weights = weights if isinstance(weights, list) else list(weights)
        params = params if isinstance(params, list) else list(params)
        weight_mean, checks = eager_op("weight_mean", self.device)
        controller, controller_checks = eager_op("lstm_controller", self.device)
        if not (checks and controller_checks) and self._meta(weights + params) != self.meta:
            # The Triton launchers and the reference do not check every dtype and shape (a kernel
            # would read another dtype's bytes): a tensor changed in place since the plan's checks
            raise ValueError("the network's conv weights or controller parameters changed dtype, device or shape")
        if aliased:
            wbar, aliases = training_weight_mean(weights, weight_mean, checks)
        else:
            wbar, aliases = weight_mean(weights), ()
        out = controller(wbar, self.blocks, params)
        dts = torch.split_with_sizes(out[0] if isinstance(out, tuple) else out, self.block_sizes)
        return (dts, aliases) if aliased else dts

    @staticmethod
    def _meta(tensors: list) -> list:
        return [(t.dtype, t.device, t.shape) for t in tensors]


# --- Real shapes (tsc_kernels/ops/_shapes.py): launch plans and gpu-check; specs name TSC networks ---
def example_inputs(network: Network, dtype, channels_last=False, device=None, requires_grad=False) -> tuple:
    """(wbar_packed, blocks, params) of the network's controller: its w̄ (the reference's) and parameters."""
    wbar = _weight_mean.reference(list(network.weights)).detach().to(device=device, dtype=dtype)
    params = [p.detach().to(device=device, dtype=dtype).requires_grad_(requires_grad) for p in network.params]
    return wbar.requires_grad_(requires_grad), list(network.blocks), params


def _min_bytes(args):
    """Inputs read and outputs written once: forward wbar, params -> dt, saved; backward grad, dt,
    wbar, params, saved -> dwbar, dparams (output sizes from the op's fake)."""
    wbar, blocks, params = args
    dt, saved = _fake_forward(wbar, blocks, params)
    p = sum(nbytes(t) for t in params)
    return nbytes(wbar) + p + nbytes(dt) + nbytes(saved), 2 * nbytes(dt) + 2 * nbytes(wbar) + 2 * p + nbytes(saved)


# fp32 only (the controller runs fp32 under autocast); its recurrence, not its bytes, is its limit.
REAL_SHAPES = RealShapes(launch=tuple((f"{name}-controller", name) for name in NETWORKS), full=("resnet50",),
                         tiny=("resnet1d",), min_bytes=_min_bytes, network=True, layouts=False,
                         dtypes=(torch.float32,), bandwidth_meaningful=False,
                         note="fp32 (runs fp32 under autocast); recurrence-bound: % of copy_ not meaningful")
