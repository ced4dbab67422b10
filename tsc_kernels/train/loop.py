"""The training run of tsc-train: set-up, the epoch loop, checkpoints and resume, the final outputs.

Order of a run: every input is checked (data, model, checkpoint) before the output folder is made;
then the loop. Resume is exact: the checkpoint holds the model, optimizer, scheduler and scaler,
the position (epoch, batch within it, global step), the metric rows so far, each rank's running
sums of the epoch and each rank's RNG states (gathered to rank 0, which alone writes). The batch
order and augmentation are functions of (seed, epoch, index) (data.py), so the resumed run sees
the same batches in the same order: on the CPU it ends bitwise equal to an uninterrupted one.

Test hooks (environment variables, used by tests/models/test_train.py only):
  TSC_TRAIN_KILL_AFTER_STEP=k  the process SIGKILLs itself right after optimizer step k (and after
                               that step's checkpoint, when one is due): a crash at a known point.
  TSC_TRAIN_DIGEST_DIR=DIR     every rank writes DIR/rank<r>.json: a SHA-256 of its final model state
                               and the files it wrote, so a test can see that all ranks ended with
                               the same weights and that rank 0 alone wrote the outputs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import data as data_mod
from . import models as models_mod
from . import outputs
from .common import RESUME_KEYS, UsageError, world

_SUMS = 3  # running sums of a training epoch: loss * n, top-1 correct, n


class Run:
    """Everything one process holds during a run."""

    def __init__(self, args, argv):
        self.args, self.argv = args, argv
        self.rank, self.local_rank, self.world_size = world()
        self.distributed = self.world_size > 1
        self.main = self.rank == 0
        self.out = args.out
        self.last = os.path.join(self.out, "last.pt")


def _device(args, local_rank: int) -> torch.device:
    if args.device:
        try:
            dev = torch.device(args.device)
        except RuntimeError as e:
            raise UsageError(f"--device: {e}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device: {args.device} asked for, but CUDA is not available")
        return dev
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_resume(run: Run, blob: dict) -> None:
    old = blob["args"]
    for key in RESUME_KEYS:
        a, b = old.get(key), getattr(run.args, key)
        if a != b:
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag}: {run.last} was written with {flag} {a}, not {b}; rerun with the same flags "
                             "or choose another --out")
    if blob["world_size"] != run.world_size:
        raise UsageError(f"--out: {run.last} was written by {blob['world_size']} process(es), this run has "
                         f"{run.world_size}; resume with the same world size (torchrun --nproc-per-node/--nnodes)")


def _load_resume(run: Run) -> dict | None:
    """Rank 0 reads last.pt (when there is one) and hands it to every rank; UsageError on all ranks if bad."""
    blob, error = None, None
    if run.main and os.path.exists(run.last):
        try:
            blob = ckpt.load(run.last)
            _check_resume(run, blob)
        except ckpt.CheckpointError as e:
            error = (f"--out: {e}; it was left as it is: restore a good copy or delete it to start over")
        except UsageError as e:
            error = str(e)
    if run.distributed:  # multi-node: only rank 0 need see the output folder
        box = [error, blob]
        dist.broadcast_object_list(box, src=0)
        error, blob = box
    if error is not None:
        raise UsageError(error)
    return blob


def _evaluate(model, loader, device, autocast, channels_last, distributed, reference=None):
    """Validation (loss, top-1 %, top-5 %, n) over every rank's shard; with ``reference``, also the largest
    |logit difference| between ``model`` and ``reference`` (the folded network against the trained one)."""
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top1, top5, n, max |diff|
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = model(x).float()
                if reference is not None:
                    ref = reference(x).float()
                    sums[4] = torch.maximum(sums[4], (logits - ref).abs().max().double())
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top == y[:, None]
            sums[:4] += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), hit[:, 0].sum().double(),
                                     hit.any(1).sum().double(),
                                     torch.tensor(len(y), dtype=torch.float64, device=device)])
    if distributed:
        dist.all_reduce(sums[:4])
        dist.all_reduce(sums[4:], op=dist.ReduceOp.MAX)
    loss, top1, top5, n, diff = sums.tolist()
    return {"loss": loss / max(n, 1), "top1": 100 * top1 / max(n, 1), "top5": 100 * top5 / max(n, 1), "n": int(n),
            "max_abs_logit_diff": diff}


def state_digest(model) -> str:
    """SHA-256 over every state_dict entry's name and bytes."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run(args, argv) -> int:
    r = Run(args, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args, r.local_rank)
    if r.distributed:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(args.dist_backend or ("nccl" if device.type == "cuda" else "gloo"))
    try:
        data, model, per_rank, steps_per_epoch = _inputs(r, device)
        return _train(r, data, model, device, per_rank, steps_per_epoch)
    finally:
        if r.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _inputs(r: Run, device):
    """The data and the model, each checked (UsageError naming the flag); nothing is written."""
    args = r.args
    try:
        if args.download:  # one download per machine, the other processes wait for it
            if r.local_rank == 0:
                data_mod.download(args.dataset, args.data)
            if r.distributed:
                dist.barrier()
        data = data_mod.load(args.dataset, args.data, args.seed, args.image_size)
    except data_mod.DataError as e:
        raise UsageError(f"--data: {e}") from None
    if args.channels_last and data.val[0][0].dim() != 3:
        raise UsageError(f"--channels-last: needs 2-D images, --dataset {args.dataset} has 1-D sequences")
    per_rank = args.batch // r.world_size
    steps_per_epoch = math.ceil(len(data.train) / r.world_size) // per_rank
    if steps_per_epoch == 0:
        raise UsageError(f"--batch: {args.batch} is larger than the training set ({len(data.train)} examples)")
    _seed_everything(args.seed)  # the model's initialisation is a function of the seed (the same on every rank)
    try:
        model = models_mod.build(args.model, None if args.tsc == "none" else args.tsc, data.num_classes,
                                 data.in_channels, args.dt)
    except (ValueError, TypeError) as e:  # unknown name, bad depth, a network convert cannot handle
        msg = str(e)
        raise UsageError("--" + msg if msg.startswith("model:") else f"--model: {args.model}: {msg}") from None
    return data, model, per_rank, steps_per_epoch


def _train(r: Run, data, model, device, per_rank: int, steps_per_epoch: int) -> int:
    args = r.args
    blob = _load_resume(r)
    if r.main:  # every input has been checked: from here on the run writes
        os.makedirs(r.out, exist_ok=True)
        ckpt.remove_stale_temporaries(r.out)

    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                          weight_decay=args.wd)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=args.milestone_epochs, gamma=args.gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    epoch, batch_in_epoch, step, rows, best = 0, 0, 0, [], None
    sums = torch.zeros(_SUMS, dtype=torch.float64, device=device)
    if blob is not None:
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        scaler.load_state_dict(blob["scaler"])
        epoch, batch_in_epoch, step, rows, best = (blob["epoch"], blob["batch_in_epoch"], blob["step"], blob["rows"],
                                                   blob["best"])
        sums = blob["ranks"][r.rank]["sums"].to(device)
        if r.main:
            what = (f"at epoch {epoch + 1}, step {step}" if epoch < args.epochs else
                    "(training is complete: only the final outputs are written again)")
            print(f"tsc-train: resuming {r.last} {what}", file=sys.stderr, flush=True)

    net = model
    if r.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if args.compile:
        net = torch.compile(net)

    workers = args.workers
    if workers is None:  # the machine's CPUs shared among the processes on it
        workers = min(8, max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
    loader_kw = {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0,
                 # DataLoader draws its workers' base seed from this generator, not from the global one,
                 # so creating a loader (again, on resume) leaves the global RNG where the run expects it
                 "generator": torch.Generator().manual_seed(args.seed)}
    sampler = data_mod.ResumableSampler(data.train, r.world_size, r.rank, args.seed)
    train_loader = torch.utils.data.DataLoader(data.train, batch_size=per_rank, sampler=sampler, drop_last=True,
                                               **loader_kw)
    val_set = torch.utils.data.Subset(data.val, data_mod.val_shard(len(data.val), r.rank, r.world_size))
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=max(per_rank, 64), shuffle=False, **loader_kw)

    if blob is not None:  # last, so that nothing above draws from the restored generators
        ckpt.set_rng_state(blob["ranks"][min(r.rank, len(blob["ranks"]) - 1)]["rng"])
    tb = None
    if args.tensorboard and r.main:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(os.path.join(r.out, "tensorboard"))
    kill_after = int(os.environ.get("TSC_TRAIN_KILL_AFTER_STEP", "0") or 0)

    def save_last():
        ranks = [{"rng": ckpt.rng_state(), "sums": sums.cpu()}]
        if r.distributed:  # every rank's RNG and running sums, so each resumes where it stopped
            gathered = [None] * r.world_size
            dist.all_gather_object(gathered, ranks[0])
            ranks = gathered
        if r.main:
            ckpt.save({"format": "tsc-train/1", "args": outputs.args_dict(args), "world_size": r.world_size,
                       "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                       "scaler": scaler.state_dict(), "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": step,
                       "rows": rows, "best": best, "ranks": ranks}, r.last)

    while epoch < args.epochs:
        model.train()
        sampler.set_position(epoch, batch_in_epoch * per_rank)
        lr = opt.param_groups[0]["lr"]
        progress = None
        if r.main and not args.no_progress:
            from tqdm import tqdm

            progress = tqdm(total=steps_per_epoch, initial=batch_in_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                            unit="step", file=sys.stderr, leave=False, dynamic_ncols=True)
        t0, images = time.perf_counter(), 0
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = net(x)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            # accumulated on the device: no host sync per step
            sums += torch.stack([loss.detach().double() * len(y), (logits.detach().argmax(1) == y).sum().double(),
                                 torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
            step += 1
            batch_in_epoch += 1
            images += len(y) * r.world_size
            if progress is not None:
                progress.update(1)
                if step % 20 == 0:
                    progress.set_postfix(loss=f"{float(loss):.3f}")
            if args.ckpt_every and step % args.ckpt_every == 0:
                save_last()
            if step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_s = time.perf_counter() - t0
        if progress is not None:
            progress.close()
        epoch_sums = sums.clone()
        if r.distributed:
            dist.all_reduce(epoch_sums)
            # DDP broadcasts rank 0's BatchNorm statistics at each forward; make every rank hold them now,
            # so the evaluation and the checkpoint see the statistics the next step would use
            for b in model.buffers():
                dist.broadcast(b, 0)
        val = _evaluate(model, val_loader, device, autocast, args.channels_last, r.distributed)
        seconds = time.perf_counter() - t0
        loss_sum, correct, n = epoch_sums.tolist()
        rows.append({"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / max(n, 1),
                     "train_top1": 100 * correct / max(n, 1), "val_loss": val["loss"], "val_top1": val["top1"],
                     "val_top5": val["top5"], "seconds": seconds, "images_per_s": images / max(train_s, 1e-9)})
        sched.step()
        epoch, batch_in_epoch = epoch + 1, 0
        sums.zero_()
        if best is None or val["top1"] > best["val_top1"]:
            best = {"epoch": epoch, "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"]}
            if r.main:
                ckpt.save({"format": "tsc-train/1", "args": outputs.args_dict(args), "epoch": epoch,
                           "model": model.state_dict(), **{k: v for k, v in best.items() if k != "epoch"}},
                          os.path.join(r.out, "best.pt"))
        if r.main:
            outputs.write_metrics(os.path.join(r.out, "metrics.csv"), rows)
        save_last()
        if r.main:
            row = rows[-1]
            print(f"tsc-train: epoch {row['epoch']}/{args.epochs} lr {row['lr']:.4g} | "
                  f"train loss {row['train_loss']:.4f} top-1 {row['train_top1']:.2f} | "
                  f"val loss {row['val_loss']:.4f} top-1 {row['val_top1']:.2f} "
                  f"top-5 {row['val_top5']:.2f} | {row['seconds']:.1f} s, {row['images_per_s']:.0f} images/s",
                  flush=True)
            if tb is not None:
                for k, v in row.items():
                    if k != "epoch":
                        tb.add_scalar(k, v, row["epoch"])
                tb.flush()

    outputs.finish(r, model, data, val_loader, device, autocast, rows, best, _evaluate)
    digest_dir = os.environ.get("TSC_TRAIN_DIGEST_DIR")
    if digest_dir:
        with open(os.path.join(digest_dir, f"rank{r.rank}.json"), "w") as f:
            json.dump({"sha256": state_digest(model), "wrote": sorted(set(ckpt.WRITTEN))}, f)
    if tb is not None:
        tb.close()
    return 0
