"""What tsc-train leaves in --out besides the checkpoints: metrics.csv, report.json, folded.pt, the Δt plot.

Rank 0 alone writes. metrics.csv is rewritten whole (atomically) after every epoch from the rows
kept in the checkpoint, so after a resume it holds exactly the rows of an uninterrupted run.
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import sys

import torch

from . import checkpoint as ckpt

METRICS = ("epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "seconds", "images_per_s")


def args_dict(args) -> dict:
    """The resolved flags as plain values (what checkpoints and report.json store)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}


def write_metrics(path: str, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(METRICS)
    for row in rows:  # repr: every digit, so two runs' rows compare exactly
        w.writerow([row["epoch"]] + [repr(float(row[k])) for k in METRICS[1:]])
    ckpt.atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def _versions() -> dict:
    import tsc_kernels

    v = {"python": platform.python_version(), "torch": torch.__version__, "tsc_kernels": tsc_kernels.__version__,
         "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    for name in ("torchvision", "timm", "triton"):
        mod = sys.modules.get(name)
        v[name] = getattr(mod, "__version__", None) if mod else None
    return v


def _step_size_stats(model) -> dict:
    from ..diagnostics import evolution_time, step_sizes
    from ..models import is_tsc_network

    if not is_tsc_network(model):
        return {}
    blocks = {name: {"mean": float(dt.mean()), "std": float(dt.std()) if dt.numel() > 1 else 0.0,
                     "min": float(dt.min()), "max": float(dt.max()), "channels": dt.numel()}
              for name, dt in step_sizes(model).items()}
    return {"blocks": blocks, "evolution_time": evolution_time(model)}


def finish(run, model, data, val_loader, device, autocast, rows, best, evaluate) -> None:
    """After the last epoch: fold and evaluate the folded network (every rank, on its shard), then rank 0
    writes folded.pt, report.json and the Δt plot."""
    from .. import backend
    from ..fold import fold
    from ..models import is_tsc_network

    args = run.args
    model.eval()
    folded, fold_error = model, None
    if is_tsc_network(model):
        try:
            folded = fold(model)
        except (TypeError, ValueError) as e:  # a block whose tail cannot absorb Δt: say so, keep the rest
            folded, fold_error = None, str(e)
    last = rows[-1]  # the last epoch's validation is the final model's: nothing changed it since
    folded_val = None
    if folded is model:  # the plain network is its own folded form
        folded_val = {"top1": last["val_top1"], "top5": last["val_top5"], "loss": last["val_loss"],
                      "max_abs_logit_diff": 0.0}
    elif folded is not None:
        folded_val = evaluate(folded.eval(), val_loader, device, autocast, args.channels_last, run.distributed,
                              reference=model)
    if not run.main:
        return
    out = run.out
    if folded is not None:
        ckpt.save({"format": "tsc-train/folded/1", "model": args.model, "num_classes": data.num_classes,
                   "in_channels": data.in_channels, "state_dict": folded.state_dict()},
                  os.path.join(out, "folded.pt"))
    plot = None
    if is_tsc_network(model):
        try:
            from ..diagnostics import plot_step_sizes

            fig = plot_step_sizes(model)
            plot = "step_sizes.png"
            ckpt.atomic_write(os.path.join(out, plot), lambda f: fig.savefig(f, format="png", dpi=120))
        except ImportError:  # matplotlib is optional
            plot = None
    report = {
        "command": ["tsc-train"] + list(run.argv), "args": args_dict(args),
        "world_size": run.world_size, "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "versions": _versions(),
        "tsc_backend": {"selected": backend.get_backend(), "resolved": backend.resolve(device)},
        "data": data.description, "epochs": len(rows),
        "final": {k: last[k] for k in ("epoch", "val_top1", "val_top5", "val_loss", "train_top1", "train_loss")},
        "best": best,
        "folded": None if folded is None else {
            "file": "folded.pt", "val_top1": folded_val["top1"], "val_top5": folded_val["top5"],
            "val_loss": folded_val["loss"], "max_abs_logit_diff": folded_val["max_abs_logit_diff"],
            "params": sum(p.numel() for p in folded.parameters())},
        "fold_error": fold_error,
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": sum(r["seconds"] for r in rows),
        "images_per_s": sum(r["images_per_s"] for r in rows) / len(rows),
        "step_sizes": _step_size_stats(model), "step_size_plot": plot,
    }
    text = json.dumps(report, indent=2, default=str) + "\n"
    ckpt.atomic_write(os.path.join(out, "report.json"), lambda f: f.write(text.encode()))
    print(f"tsc-train: done: val top-1 {last['val_top1']:.2f} % (best {best['val_top1']:.2f} % at epoch "
          f"{best['epoch']})" + (f", folded {folded_val['top1']:.2f} %" if folded_val else "") + f"; {out}",
          flush=True)
