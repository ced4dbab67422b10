"""Argument checks of every public function, gathered in one API layer (as flash-attention does).

Each raises TypeError (wrong kind of object or dtype) or ValueError (wrong shape or value) naming
the argument and what was expected, before any kernel runs.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(x: object, name: str, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(x.dtype).replace('torch.', '')}")
    return x


def flag(x: object, name: str) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return x


def same_device(named: dict) -> None:
    devices = {n: t.device for n, t in named.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")


def residual_update_args(y: object, f: object, dt: object, relu: object, f_name: str = "f") -> None:
    tensor(y, "y")
    tensor(f, f_name)
    flag(relu, "relu")
    if not 2 <= y.dim() <= 5:
        raise ValueError(f"y must have shape (N, C, *spatial) with 0 to 3 spatial dims, got shape {tuple(y.shape)}")
    if f.dtype != y.dtype:
        raise TypeError(f"{f_name} must have y's dtype {y.dtype}, got {f.dtype}")
    if f.shape != y.shape:
        raise ValueError(f"{f_name} must have y's shape {tuple(y.shape)}, got {tuple(f.shape)}")
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    tensor(dt, "dt", (acc,))
    if dt.dim() != 1 or dt.shape[0] != y.shape[1]:
        raise ValueError(f"dt must have shape (C,) = ({y.shape[1]},) matching y's channel dim 1, got {tuple(dt.shape)}")
    same_device({"y": y, f_name: f, "dt": dt})


def scale_concat_args(x: object, f: object, dt: object) -> None:
    """tsc_kernels.scale_concat: x (N, Cx, *spatial), f (N, k, *spatial) of x's dtype, dt (k,)."""
    tensor(x, "x")
    tensor(f, "f")
    if not 2 <= x.dim() <= 5:
        raise ValueError(f"x must have shape (N, Cx, *spatial) with 0 to 3 spatial dims, got shape {tuple(x.shape)}")
    if f.dtype != x.dtype:
        raise TypeError(f"f must have x's dtype {x.dtype}, got {f.dtype}")
    if f.dim() != x.dim() or f.shape[0] != x.shape[0] or f.shape[2:] != x.shape[2:]:
        raise ValueError(f"f must have shape (N, k, *spatial) = ({x.shape[0]}, k, {', '.join(map(str, x.shape[2:]))}) "
                         f"matching x's batch and spatial dims, got {tuple(f.shape)}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    tensor(dt, "dt", (acc,))
    if dt.dim() != 1 or dt.shape[0] != f.shape[1]:
        raise ValueError(f"dt must have shape (k,) = ({f.shape[1]},) matching f's channel dim 1, got {tuple(dt.shape)}")
    same_device({"x": x, "f": f, "dt": dt})


def multistep_update_args(u, u_prev, f, k, dt, keep, relu) -> None:
    """tsc_kernels.multistep_update's arguments: u, u_prev, f alike; k 0-d; dt (C,), keep (N,) or None."""
    tensor(u, "u")
    tensor(u_prev, "u_prev")
    tensor(f, "f")
    flag(relu, "relu")
    if not 2 <= u.dim() <= 5:
        raise ValueError(f"u must have shape (N, C, *spatial) with 0 to 3 spatial dims, got shape {tuple(u.shape)}")
    for name, t in (("u_prev", u_prev), ("f", f)):
        if t.dtype != u.dtype:
            raise TypeError(f"{name} must have u's dtype {u.dtype}, got {t.dtype}")
        if t.shape != u.shape:
            raise ValueError(f"{name} must have u's shape {tuple(u.shape)}, got {tuple(t.shape)}")
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    tensor(k, "k", (acc,))
    if k.dim() != 0:
        raise ValueError(f"k must be a 0-d tensor (one coefficient per block), got shape {tuple(k.shape)}")
    named = {"u": u, "u_prev": u_prev, "f": f, "k": k}
    for name, t, size, what in (("dt", dt, u.shape[1], "(C,)"), ("keep", keep, u.shape[0], "(N,)")):
        if t is None:
            continue
        tensor(t, name, (acc,))
        if t.dim() != 1 or t.shape[0] != size:
            raise ValueError(f"{name} must have shape {what} = ({size},) matching u, got {tuple(t.shape)}")
        named[name] = t
    same_device(named)


def batch_norm_residual_update_args(y, x, dt, running_mean, running_var, weight, bias, training, momentum, eps, relu) -> None:
    """The fused BatchNorm tail's arguments (tsc_kernels.batch_norm_residual_update)."""
    residual_update_args(y, x, dt, relu, f_name="x")  # y, x (as f), dt, relu: the update's own rules
    flag(training, "training")
    for name, value in (("momentum", momentum), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if not training and running_mean is None:
        raise ValueError("training=False (running statistics) needs running_mean and running_var, got None")
    channels = y.shape[1]
    named = {}
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        tensor(t, name, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
        if t.dim() != 1 or t.shape[0] != channels:
            raise ValueError(f"{name} must have shape (C,) = ({channels},) matching y's channel dim 1, got {tuple(t.shape)}")
        named[name] = t
    if running_mean is not None and running_var.dtype != running_mean.dtype:
        raise TypeError(f"running_var must have running_mean's dtype {running_mean.dtype}, got {running_var.dtype}")
    same_device({"y": y, **named})
    if training:
        values = y.numel() // channels if channels else 0
        if values <= 1:
            # F.batch_norm's own rule: the batch variance needs more than one value per channel
            raise ValueError(f"training needs more than 1 value per channel (N * spatial), got input shape {tuple(y.shape)}")


ODE_MAX_STAGES = 8  # csrc/ode_combine_math.h kOdeMaxStages


def ode_combine_args(z: object, stages: object, coeffs: object) -> None:
    """tsc_kernels.ode_combine: z, 1-8 stages of z's shape/dtype/device, coeffs (len(stages),) fp32 (fp64)."""
    tensor(z, "z")
    if isinstance(stages, torch.Tensor) or not isinstance(stages, (list, tuple)):
        raise TypeError(f"stages must be a list or tuple of tensors, got {type(stages).__name__}")
    if not 1 <= len(stages) <= ODE_MAX_STAGES:
        raise ValueError(f"stages must hold 1 to {ODE_MAX_STAGES} tensors, got {len(stages)}")
    for i, k in enumerate(stages):
        tensor(k, f"stages[{i}]")
        if k.dtype != z.dtype:
            raise TypeError(f"stages[{i}] must have z's dtype {z.dtype}, got {k.dtype}")
        if k.shape != z.shape:
            raise ValueError(f"stages[{i}] must have z's shape {tuple(z.shape)}, got {tuple(k.shape)}")
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    tensor(coeffs, "coeffs", (acc,))
    if coeffs.dim() != 1 or coeffs.shape[0] != len(stages):
        raise ValueError(f"coeffs must have shape (len(stages),) = ({len(stages)},), got {tuple(coeffs.shape)}")
    same_device({"z": z, **{f"stages[{i}]": k for i, k in enumerate(stages)}, "coeffs": coeffs})


# --- models, convert, fold, diagnostics (tsc_kernels.models / convert / fold / diagnostics) ---
TSC_MODES = ("lstm", "2fc", "indp", "fixed")  # "fixed": constant Δt = dt, no controller (docs/tsc.md)


def tsc_mode(mode: object, name: str = "mode", allow_none: bool = False) -> str | None:
    if mode is None and allow_none:
        return None
    if not isinstance(mode, str) or mode not in TSC_MODES:
        allowed = ", ".join(repr(m) for m in TSC_MODES) + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be one of {allowed}, got {mode!r}")
    return mode


def fixed_dt(dt: object, mode: object, name: str = "dt") -> float | None:
    """The constant step size of mode "fixed": a finite float > 0 (default 1.0); None for every other mode.

    Given together with another mode it is an error (it would be silently ignored).
    """
    if mode != "fixed":
        if dt is not None:
            raise ValueError(f"{name} only applies to tsc mode 'fixed' (a constant step size), got {name}={dt!r} with mode {mode!r}")
        return None
    if dt is None:
        return 1.0
    if isinstance(dt, bool) or not isinstance(dt, (float, int)):
        raise TypeError(f"{name} must be a float (the constant step size of mode 'fixed'), got {type(dt).__name__}")
    dt = float(dt)
    if not (0.0 < dt < float("inf")):
        raise ValueError(f"{name} must be a finite float > 0 (the constant step size of mode 'fixed'), got {dt}")
    return dt


def positive_int(x: object, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < 1:
        raise ValueError(f"{name} must be >= 1, got {x}")
    return x


def reduction(r: object) -> int | None:
    """Controller reduction ratio: None (the block's default) or a positive int."""
    return None if r is None else positive_int(r, "reduction")


def cifar_depth(depth: object, bottleneck: object) -> bool:
    """Checks a CIFAR ResNet depth; returns whether it uses bottleneck blocks (see models.cifar_resnet)."""
    positive_int(depth, "depth")
    if bottleneck is not None:
        flag(bottleneck, "bottleneck")
    basic_ok = depth >= 8 and (depth - 2) % 6 == 0
    bottleneck_ok = depth >= 11 and (depth - 2) % 9 == 0
    if bottleneck is None:
        if not (basic_ok or bottleneck_ok):
            raise ValueError(f"depth must be 6n+2 (basic blocks) or 9n+2 (bottlenecks) with n >= 1, got {depth}")
        return bottleneck_ok and (not basic_ok or depth > 110)
    if bottleneck and not bottleneck_ok:
        raise ValueError(f"a bottleneck CIFAR ResNet needs depth 9n+2 with n >= 1, got {depth}")
    if not bottleneck and not basic_ok:
        raise ValueError(f"a basic-block CIFAR ResNet needs depth 6n+2 with n >= 1, got {depth}")
    return bottleneck


def module(model: object, name: str) -> "torch.nn.Module":
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    return model


# --- weight_mean, lstm_controller (tsc_kernels.ops.weight_mean / lstm_controller) ---
CONTROLLER_DTYPES = (torch.float32, torch.float64)
LSTM_PARAM_NAMES = ("fc_in_weight", "fc_in_bias", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "fc_out_weight", "fc_out_bias")


def conv_weights(weights: object, name: str = "weights") -> list:
    """A non-empty list of conv weights (C_out, C_in, *k), 1-3 kernel dims, one floating dtype, one device."""
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of conv weight tensors, got {type(weights).__name__}")
    if len(weights) == 0:
        raise ValueError(f"{name} must hold at least one conv weight, got an empty {type(weights).__name__}")
    for i, w in enumerate(weights):
        tensor(w, f"{name}[{i}]")
        if not 3 <= w.dim() <= 5:
            raise ValueError(f"{name}[{i}] must be a conv weight (C_out, C_in, *k) with 1 to 3 kernel dims, got shape {tuple(w.shape)}")
        if w.dtype != weights[0].dtype:
            raise TypeError(f"{name}[{i}] must have {name}[0]'s dtype {weights[0].dtype}, got {w.dtype}")
    same_device({f"{name}[{i}]": w for i, w in enumerate(weights)})
    return list(weights)


def lstm_controller_args(wbar: object, params: tuple) -> None:
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
            raise ValueError(f"{n} must have shape {shape} (D = {wbar.shape[1]} from wbar, H = {h} from fc_in_weight, C = {c} from fc_out_weight), got {tuple(named[n].shape)}")
    same_device({"wbar": wbar, **named})


def conv_weights_like(weights: object, first: torch.Tensor) -> bool:
    """Whether `weights` passes conv_weights and conv_in_channels with `first`'s dtype and device.
    The per-step fast path of network_dt (one predicate per block); it never raises: on False the
    caller runs the checks that do, for the message."""
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)) or not weights:
        return False
    dtype, device = first.dtype, first.device
    for w in weights:
        if not (isinstance(w, torch.Tensor) and w.dtype == dtype and 3 <= w.dim() <= 5 and w.shape[1] >= 1 and w.device == device):
            return False
    return True


def like_first_weight(weights: list, first: torch.Tensor, name: str, first_name: str) -> None:
    """Every weight of a block with the network's first weight's dtype and device."""
    for i, w in enumerate(weights):
        if w.dtype != first.dtype:
            raise TypeError(f"{name}[{i}] must have {first_name}'s dtype {first.dtype}, got {w.dtype}")
        if w.device != first.device:
            raise ValueError(f"all tensors must be on one device, got {first_name} on {first.device}, {name}[{i}] on {w.device}")


def lstm_params_like(params: tuple, D: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether lstm_controller_args would accept `params` for a w̄ (L, D) of `dtype` on `device`:
    the per-step fast path of network_dt; on False the caller runs lstm_controller_args for the message."""
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


def conv_in_channels(weights: list, name: str = "weights") -> None:
    """Every conv weight needs C_in >= 1: w̄ is a mean over C_in (0/0 otherwise) and dW divides by C_in."""
    for i, w in enumerate(weights):
        if w.shape[1] < 1:
            raise ValueError(f"{name}[{i}] must have at least one input channel (C_out, C_in >= 1, *k) to average over, "
                             f"got shape {tuple(w.shape)}")


# --- tsc_kernels.nn: TSCController / NetworkController ---
def controller_config(in_features: object, channels: object, reduction: object, mode: object, num_blocks: object,
                      dt: object = None) -> float | None:
    """TSCController's constructor arguments: sizes >= 1, a known mode, num_blocks given for the per-block
    modes, dt only for mode "fixed". Returns the fixed step size (None for the other modes)."""
    positive_int(in_features, "in_features")
    positive_int(channels, "channels")
    positive_int(reduction, "reduction")
    tsc_mode(mode, "mode")
    dt = fixed_dt(dt, mode)
    if mode in ("2fc", "indp") and num_blocks is None:
        raise ValueError(f"num_blocks is required for mode {mode!r} (one set of parameters per block), got None")
    if num_blocks is not None:
        positive_int(num_blocks, "num_blocks")
    return dt


def controller_wbar(wbar: object, in_features: int, num_blocks: int | None, like: torch.Tensor) -> None:
    """A per-block (2fc / indp) controller's input: wbar (num_blocks, in_features), the parameters' dtype and device."""
    tensor(wbar, "wbar")
    if wbar.dim() != 2 or wbar.shape[1] != in_features or (num_blocks is not None and wbar.shape[0] != num_blocks):
        rows = "L" if num_blocks is None else str(num_blocks)
        raise ValueError(f"wbar must have shape (num_blocks, in_features) = ({rows}, {in_features}), got shape {tuple(wbar.shape)}")
    if wbar.dtype != like.dtype:
        raise TypeError(f"wbar must have the controller parameters' dtype {like.dtype}, got {wbar.dtype}")
    if wbar.device != like.device:
        raise ValueError(f"wbar must be on the controller parameters' device {like.device}, got {wbar.device}")


def module_list(modules: object, name: str, cls: type) -> list:
    """A non-empty list or tuple of `cls` modules."""
    if isinstance(modules, (torch.Tensor, str, cls)) or not hasattr(modules, "__iter__"):
        raise TypeError(f"{name} must be a list of {cls.__name__}, got {type(modules).__name__}")
    modules = list(modules)
    if len(modules) == 0:
        raise ValueError(f"{name} must hold at least one {cls.__name__}, got none")
    for i, m in enumerate(modules):
        if not isinstance(m, cls):
            raise TypeError(f"{name}[{i}] must be a {cls.__name__}, got {type(m).__name__}")
    return modules
