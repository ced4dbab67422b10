"""tsc-train: the paper's training recipes for TSC networks, one GPU to many nodes (docs/training.md).

    tsc-train --recipe paper-cifar --data ~/data --model cifar_resnet56          # one GPU (or the CPU)
    torchrun --nproc-per-node 8 -m tsc_kernels.train --recipe paper-imagenet --data /imagenet --model resnet50

Modules: ``cli`` (flags, recipes, input checks), ``common`` (what ``cli`` and ``loop`` share),
``data`` (data sets, augmentation, resumable sampler), ``models`` (networks by name,
``load_folded``), ``checkpoint`` (atomic files, RNG states), ``loop`` (the run), ``outputs``
(metrics.csv, report.json, folded.pt, the Δt plot).
"""
from .cli import RECIPES, main
from .models import build as build_model
from .models import load_folded

__all__ = ["RECIPES", "build_model", "load_folded", "main"]
