"""Data for tsc-train: CIFAR-10/100 (torchvision's on-disk format), ImageFolder, digits, MNIST-1D.

Augmentation is the paper's: CIFAR pad-4 random crop (zero padding, as torchvision's
``RandomCrop(32, padding=4)``) and horizontal flip; ImageNet-style folders a random-resized 224 crop
(torchvision's ``RandomResizedCrop`` parameters, the PyTorch ImageNet example) and flip, evaluated
on one centre crop after resizing the short side to size/0.875 (256 for 224); digits / MNIST-1D the
random shifts of ``tsc_kernels.experiments.data``.

Every random choice of a training example comes from a generator seeded with (seed, epoch, index)
alone. The sampler yields ``(index, epoch)`` pairs, so an example's augmentation does not depend on
which DataLoader worker draws it, on the number of workers, on the world size, or on whether the
epoch was resumed half way: resuming replays exactly the batches an uninterrupted run would see.
The order is ``DistributedSampler``'s (a permutation seeded with seed + epoch, split across ranks),
with the first ``start`` examples of this rank skipped when resuming mid-epoch.
"""
from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, DistributedSampler

from ..experiments.data import random_shift

DATASETS = ("cifar10", "cifar100", "imagefolder", "digits", "mnist1d")
_CIFAR = {  # folder, train files, test files, label key, mean, std
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels",
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels",
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(ValueError):
    """The data directory is missing or has the wrong layout (tsc-train reports it against --data)."""


@dataclass
class Data:
    train: Dataset  # indexed by (index, epoch): augmented
    val: Dataset    # indexed by index: no augmentation
    num_classes: int
    in_channels: int
    description: str


def _seeded(seed: int, epoch: int, index: int) -> torch.Generator:
    # one generator per (seed, epoch, example); the large odd multipliers keep nearby triples apart
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 2_147_483_647 + index) & (2**63 - 1))


class _Augmented(Dataset):
    def __init__(self, n: int, get: Callable[[int, torch.Generator | None], tuple], seed: int):
        self.n, self.get, self.seed = n, get, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        index, epoch = key
        return self.get(index, _seeded(self.seed, epoch, index))


class _Plain(Dataset):
    def __init__(self, n: int, get: Callable[[int, torch.Generator | None], tuple]):
        self.n, self.get = n, get

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        return self.get(index, None)


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


# ----------------------------------------------------------------------------------------------------------------
# CIFAR: torchvision's pickled batches, read directly (torchvision's class insists on their md5 sums)
# ----------------------------------------------------------------------------------------------------------------
def _read_cifar(root: str, name: str, files: list[str], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for f in files:
        path = os.path.join(root, f)
        try:
            with open(path, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            data = torch.as_tensor(entry["data"]).to(torch.uint8).reshape(-1, 3, 32, 32)
            lab = torch.as_tensor(entry[label_key], dtype=torch.int64)
        except Exception as e:  # any unreadable batch: say which file and why
            raise DataError(f"cannot read {name} batch {path}: {type(e).__name__}: {e}") from e
        if len(lab) != len(data):
            raise DataError(f"{path} has {len(data)} images but {len(lab)} labels")
        images.append(data)
        labels.append(lab)
    return torch.cat(images), torch.cat(labels)


def download(name: str, data_dir: str) -> None:
    """Fetch CIFAR-10/100 into ``data_dir`` with torchvision (which checks the md5 sums)."""
    if name not in _CIFAR:
        raise DataError(f"only CIFAR downloads, not {name}")
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        cls(data_dir, train=True, download=True)
    except Exception as e:  # network, disk or checksum failures
        raise DataError(f"downloading {name} into {data_dir} failed: {type(e).__name__}: {e}") from e


def cifar(name: str, data_dir: str, seed: int) -> Data:
    folder, train_files, test_files, key, mean, std = _CIFAR[name]
    root = os.path.join(data_dir, folder)
    missing = [f for f in train_files + test_files if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise DataError(f"{data_dir} is not torchvision's {name} layout: {root}/ lacks {', '.join(missing)} "
                        f"(expected {folder}/{{{','.join(train_files + test_files)}}}; --download fetches it)")
    xtr, ytr = _read_cifar(root, name, train_files, key)
    xte, yte = _read_cifar(root, name, test_files, key)
    classes = 10 if name == "cifar10" else 100
    for what, y in (("training", ytr), ("test", yte)):
        if len(y) == 0 or int(y.min()) < 0 or int(y.max()) >= classes:
            raise DataError(f"{root}: {what} labels must lie in [0, {classes}) and not be empty")

    def train_item(i, gen):
        x = random_shift(xtr[i:i + 1].float() / 255, 4, gen)[0]  # pad 4 with black, random 32x32 crop
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        return _normalise(x, mean, std), ytr[i]

    def val_item(i, _):
        return _normalise(xte[i].float() / 255, mean, std), yte[i]

    return Data(_Augmented(len(ytr), train_item, seed), _Plain(len(yte), val_item), classes, 3,
                f"{name} ({len(ytr)} train, {len(yte)} test images)")


# ----------------------------------------------------------------------------------------------------------------
# ImageNet-style folders: DIR/train/<class>/*, DIR/val/<class>/*
# ----------------------------------------------------------------------------------------------------------------
def _resized_crop_params(width: int, height: int, gen: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, drawing from ``gen`` instead of the global generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=gen, dtype=torch.float64)))
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u)
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (), generator=gen))
            j = int(torch.randint(0, width - w + 1, (), generator=gen))
            return i, j, h, w
    in_ratio = width / height  # fallback: the central crop of the closest allowed aspect ratio
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def image_folder(data_dir: str, seed: int, size: int) -> Data:
    import torchvision
    from torchvision.transforms import functional as TF

    folders = {}
    for split in ("train", "val"):
        path = os.path.join(data_dir, split)
        if not os.path.isdir(path):
            raise DataError(f"{data_dir} is not an ImageFolder layout: {path}/ is missing "
                            "(expected DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg)")
        try:
            folders[split] = torchvision.datasets.ImageFolder(path)
        except (FileNotFoundError, RuntimeError) as e:  # no class folders / no images in them
            raise DataError(f"{path}: {e}") from e
    train, val = folders["train"], folders["val"]
    if train.classes != val.classes:  # labels are class indices: both splits must list the same classes
        only = sorted(set(train.classes) ^ set(val.classes))
        raise DataError(f"{data_dir}: train/ and val/ must hold the same class folders; "
                        f"in only one of them: {', '.join(only[:5])}{' ...' if len(only) > 5 else ''}")
    resize = round(size / 0.875)

    def to_tensor(img):
        return _normalise(TF.pil_to_tensor(img).float() / 255, IMAGENET_MEAN, IMAGENET_STD)

    def train_item(i, gen):
        path, label = train.samples[i]
        img = train.loader(path)
        top, left, h, w = _resized_crop_params(img.width, img.height, gen)
        img = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
        if torch.rand((), generator=gen) < 0.5:
            img = TF.hflip(img)
        return to_tensor(img), label

    def val_item(i, _):
        path, label = val.samples[i]
        img = TF.center_crop(TF.resize(val.loader(path), resize, antialias=True), [size, size])
        return to_tensor(img), label

    return Data(_Augmented(len(train), train_item, seed), _Plain(len(val), val_item), len(train.classes), 3,
                f"ImageFolder {data_dir} ({len(train.classes)} classes, {len(train)} train, {len(val)} val images)")


# ----------------------------------------------------------------------------------------------------------------
# digits / MNIST-1D: the experiments' tensors (no download), their random shifts
# ----------------------------------------------------------------------------------------------------------------
def small(name: str, seed: int) -> Data:
    from ..experiments import data as exp_data

    try:
        ds = exp_data.load(name)
    except ImportError as e:
        raise DataError(f"--dataset {name} needs the experiments extra: pip install 'tsc-kernels[experiments]' "
                        f"({e})") from e

    def train_item(i, gen):
        return random_shift(ds.x_train[i:i + 1], ds.max_shift, gen)[0], ds.y_train[i]

    def val_item(i, _):
        return ds.x_test[i], ds.y_test[i]

    return Data(_Augmented(len(ds.y_train), train_item, seed), _Plain(len(ds.y_test), val_item), ds.num_classes,
                ds.x_train.shape[1], f"{name} ({len(ds.y_train)} train, {len(ds.y_test)} test examples)")


def load(name: str, data_dir: str | None, seed: int, image_size: int) -> Data:
    """The data set ``name`` (module docstring); raises DataError for a missing or malformed directory."""
    if name in ("digits", "mnist1d"):
        return small(name, seed)
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    if not data_dir:
        raise DataError(f"--dataset {name} needs --data DIR")
    if not os.path.isdir(data_dir):
        raise DataError(f"directory {data_dir} does not exist")
    if name == "imagefolder":
        return image_folder(data_dir, seed, image_size)
    return cifar(name, data_dir, seed)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (this rank's share of a seed + epoch permutation) that yields
    ``(index, epoch)`` for the augmentation and can skip the first ``start`` examples (resume)."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        epoch = self.epoch
        for k, index in enumerate(super().__iter__()):
            if k >= self.start:
                yield index, epoch

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def val_shard(n: int, rank: int, world: int) -> list[int]:
    """Rank ``rank``'s share of the validation set: every example exactly once over all ranks
    (DistributedSampler would pad with repeats, which would skew the accuracy)."""
    return list(range(rank, n, world))
