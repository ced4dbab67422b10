"""tsc-train's command line: flags, the paper's recipes, and every check made before anything is written.

Bad input (a missing data directory, a wrong layout, an unknown model, a batch the world size does
not divide, a flag out of range) ends the run with one line ``tsc-train: error: --flag: why`` and
exit status 2, before the output folder is created.
"""
from __future__ import annotations

import argparse
import os
import sys

from .common import RESUME_KEYS, UsageError, world  # noqa: F401  (RESUME_KEYS: cli's name too)

PROG = "tsc-train"

# The paper's recipes (docs/training.md). Every field is overridden by its flag. ``batch`` is the
# global batch (each of W processes gets batch / W) and ``lr`` the rate for that global batch.
RECIPES: dict[str, dict] = {
    "paper-cifar": {"dataset": "cifar10", "model": "cifar_resnet56", "epochs": 300, "batch": 64, "lr": 0.1,
                    "momentum": 0.9, "nesterov": True, "wd": 1e-4, "milestones": "50%,75%", "gamma": 0.1},
    "paper-imagenet": {"dataset": "imagefolder", "model": "resnet50", "epochs": 100, "batch": 256, "lr": 0.1,
                       "momentum": 0.9, "nesterov": True, "wd": 1e-4, "milestones": "every:30", "gamma": 0.1},
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block: the message names the flag
        raise UsageError(message)


def parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .models import TSC_MODES

    p = _Parser(prog=PROG, description="Train a TSC network with the paper's recipe, on one GPU or many (torchrun).",
                epilog="Recipes: " + "; ".join(f"{k}: " + ", ".join(f"{f}={v}" for f, v in r.items())
                                               for k, r in RECIPES.items()))
    a = p.add_argument
    a("--recipe", choices=sorted(RECIPES), help="the paper's hyper-parameters (default: paper-imagenet for "
      "--dataset imagefolder, else paper-cifar); each flag below overrides its field")
    a("--dataset", choices=DATASETS)
    a("--data", metavar="DIR", help="CIFAR: the folder holding cifar-10-batches-py/ (cifar-100-python/); "
      "imagefolder: the folder holding train/<class>/ and val/<class>/")
    a("--download", action="store_true", help="fetch CIFAR with torchvision into --data first")
    a("--model", help="cifar_resnetN, cifar_preact_resnetN, cifar_densenetN, cifar_lm_resnetN, resnet1dN, any "
      "tsc_kernels.models builder (resnet50, ...), torchvision:NAME or timm:NAME")
    a("--tsc", choices=TSC_MODES, default="lstm", help="step-size controller; none: the plain network")
    a("--dt", type=float, help="--tsc fixed: the constant step size (default 1.0)")
    a("--epochs", type=int)
    a("--batch", type=int, help="global batch; each process gets batch / world size")
    a("--lr", type=float, help="learning rate of the global batch")
    a("--momentum", type=float)
    a("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    a("--wd", type=float, help="weight decay (every parameter, the controllers' too)")
    a("--milestones", help="epochs at which lr *= gamma: '150,225', '50%%,75%%' (of --epochs) or 'every:30'")
    a("--gamma", type=float)
    a("--seed", type=int, default=0)
    a("--image-size", type=int, help="training crop / evaluation crop (default 32 for cifar_* models, else 224)")
    a("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype (fp16 with a GradScaler)")
    a("--channels-last", action="store_true")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--device", help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    a("--dist-backend", help="torch.distributed backend under torchrun (default nccl on CUDA, gloo on CPU)")
    a("--workers", type=int, help="DataLoader workers per process (default min(8, CPUs per process))")
    a("--threads", type=int, help="torch intra-op threads (default: torch's)")
    a("--out", metavar="DIR", help="output folder (default runs/<dataset>-<model>-<tsc>-seed<seed>); "
      "rerunning with the same --out resumes from its last.pt")
    a("--ckpt-every", type=int, default=0, metavar="N", help="also checkpoint every N optimizer steps")
    a("--no-progress", action="store_true", help="no progress bar")
    a("--tensorboard", action="store_true", help="TensorBoard scalars in OUT/tensorboard (needs tensorboard)")
    return p


def parse_milestones(spec: str, epochs: int) -> list[int]:
    """'150,225' (epochs), '50%,75%' (of ``epochs``, rounded, at least 1) or 'every:30' -> sorted epochs."""
    if not isinstance(spec, str):
        raise TypeError(f"milestones must be a string, got {type(spec).__name__}")
    spec = spec.strip()
    if spec in ("", "none"):
        return []
    if spec.startswith("every:"):
        step = int(spec[len("every:"):])
        if step < 1:
            raise ValueError(f"milestones: every:N needs N >= 1, got {spec!r}")
        return list(range(step, epochs, step))
    out = set()
    for item in spec.split(","):
        item = item.strip()
        if item.endswith("%"):
            frac = float(item[:-1]) / 100
            if not 0 < frac <= 1:
                raise ValueError(f"milestones: percentages must lie in (0, 100], got {item!r}")
            out.add(max(1, round(epochs * frac)))
        else:
            e = int(item)
            if e < 1:
                raise ValueError(f"milestones: epochs must be >= 1, got {item!r}")
            out.add(e)
    return sorted(out)


def resolve(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` and fill every unset field from the recipe; UsageError for bad flags (no data read)."""
    args = parser().parse_args(argv)
    if args.recipe is None:
        args.recipe = "paper-imagenet" if args.dataset == "imagefolder" else "paper-cifar"
    for field, value in RECIPES[args.recipe].items():
        if getattr(args, field) is None:
            setattr(args, field, value)
    _, _, world_size = world()
    for flag, value, ok, want in (
            ("--epochs", args.epochs, args.epochs >= 1, ">= 1"), ("--batch", args.batch, args.batch >= 1, ">= 1"),
            ("--lr", args.lr, args.lr > 0, "> 0"), ("--wd", args.wd, args.wd >= 0, ">= 0"),
            ("--momentum", args.momentum, args.momentum >= 0, ">= 0"), ("--gamma", args.gamma, args.gamma > 0, "> 0"),
            ("--ckpt-every", args.ckpt_every, args.ckpt_every >= 0, ">= 0 (0: epoch ends only)"),
            ("--workers", args.workers, args.workers is None or args.workers >= 0, ">= 0"),
            ("--threads", args.threads, args.threads is None or args.threads >= 1, ">= 1"),
            ("--image-size", args.image_size, args.image_size is None or args.image_size >= 8, ">= 8")):
        if not ok:
            raise UsageError(f"{flag}: must be {want}, got {value}")
    if args.dt is not None and args.tsc != "fixed":
        raise UsageError(f"--dt: only applies to --tsc fixed, got --tsc {args.tsc}")
    if args.dt is not None and not 0 < args.dt < float("inf"):
        raise UsageError(f"--dt: must be a finite step size > 0, got {args.dt}")
    if args.batch % world_size:
        raise UsageError(f"--batch: {args.batch} is not divisible by the world size {world_size} "
                         "(each process trains on batch / world size)")
    if args.batch // world_size < 2:
        raise UsageError(f"--batch: {args.batch} over {world_size} process(es) leaves fewer than 2 examples per "
                         "process (BatchNorm needs 2 in training)")
    try:
        args.milestone_epochs = parse_milestones(args.milestones, args.epochs)
    except ValueError as e:
        raise UsageError(f"--milestones: {e}") from None
    if args.dataset in ("cifar10", "cifar100", "imagefolder") and not args.data:
        raise UsageError(f"--data: --dataset {args.dataset} needs --data DIR")
    if args.data and not args.download and not os.path.isdir(args.data):
        raise UsageError(f"--data: directory {args.data} does not exist")
    if args.download and args.dataset not in ("cifar10", "cifar100"):
        raise UsageError(f"--download: only CIFAR downloads, not --dataset {args.dataset}")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out: {args.out} exists and is not a directory")
    if args.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise UsageError("--tensorboard: needs the tensorboard package (pip install tensorboard)") from None
    if args.image_size is None:
        from .models import is_cifar_style

        args.image_size = 32 if is_cifar_style(args.model) else 224
    if args.out is None:
        args.out = os.path.join("runs", f"{args.dataset}-{args.model.replace(':', '_')}-{args.tsc}-seed{args.seed}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tsc-train`` and ``python -m tsc_kernels.train``; returns the exit status."""
    from . import loop

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = resolve(argv)
        return loop.run(args, argv)
    except UsageError as e:
        _, local_rank, _ = world()
        if local_rank == 0:  # one line per machine, not one per GPU
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
