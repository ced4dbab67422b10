"""The two data sets, as float tensors, with their augmentation (docs/experiments.md).

- digits: scikit-learn's 8x8 handwritten digits (1797 images, bundled with scikit-learn, no
  download), a stratified 80/20 split with a fixed seed: 1437 train, 360 test; (N, 1, 8, 8).
  Augmentation: random shifts by up to one pixel in each direction (zero padding).
- mnist1d: ``mnist1d.data.make_dataset(get_dataset_args())`` (generated, no download): 4000 train,
  1000 test sequences of length 40; (N, 1, 40). Augmentation: random shifts by up to two steps.

Inputs are standardised with the training set's mean and std (one scalar each), so the noise
experiment's σ is in units of the data's standard deviation.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DATASETS = ("digits", "mnist1d")


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    max_shift: int  # augmentation: random shift of up to this many pixels / steps

    @property
    def num_classes(self) -> int:
        return int(self.y_train.max()) + 1

    def subset(self, train: int | None, test: int | None) -> "Dataset":
        """The first ``train`` / ``test`` examples (None: all); the splits are already shuffled."""
        return Dataset(self.name, self.x_train[:train], self.y_train[:train], self.x_test[:test], self.y_test[:test],
                       self.max_shift)


def _standardise(x_train, x_test):
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, (x_test - mean) / std


@functools.lru_cache(maxsize=None)
def load(name: str) -> Dataset:
    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x_tr, x_te, y_tr, y_te = train_test_split(d.images, d.target, test_size=0.2, stratify=d.target, random_state=0)
        x_tr, x_te = (torch.tensor(a, dtype=torch.float32).unsqueeze(1) / 16.0 for a in (x_tr, x_te))
        x_tr, x_te = _standardise(x_tr, x_te)
        return Dataset(name, x_tr, torch.tensor(y_tr), x_te, torch.tensor(y_te), max_shift=1)
    if name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        d = make_dataset(get_dataset_args())  # deterministic: the args carry the seed
        x_tr, x_te = (torch.tensor(d[k], dtype=torch.float32).unsqueeze(1) for k in ("x", "x_test"))
        x_tr, x_te = _standardise(x_tr, x_te)
        return Dataset(name, x_tr, torch.tensor(d["y"]).long(), x_te, torch.tensor(d["y_test"]).long(), max_shift=2)
    raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Every example shifted by its own random offset in [-max_shift, max_shift] per spatial dim,
    zero-padded (in standardised units, 0 is the data mean)."""
    if max_shift == 0:
        return x
    n, spatial = x.shape[0], x.shape[2:]
    padded = F.pad(x, (max_shift, max_shift) * len(spatial))
    offsets = torch.randint(0, 2 * max_shift + 1, (len(spatial), n), generator=generator)
    batch = torch.arange(n)
    if len(spatial) == 1:
        idx = offsets[0][:, None] + torch.arange(spatial[0])  # (N, L)
        return padded[batch[:, None], :, idx].permute(0, 2, 1)
    rows = (offsets[0][:, None] + torch.arange(spatial[0]))[:, :, None]  # (N, H, 1)
    cols = (offsets[1][:, None] + torch.arange(spatial[1]))[:, None, :]  # (N, 1, W)
    return padded[batch[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
