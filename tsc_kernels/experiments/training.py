"""Models, the training recipe and the cache of trained models shared by the subcommands.

Recipe (the paper's CIFAR recipe, scaled down): SGD with Nesterov momentum 0.9, weight decay 1e-4
(on every parameter, the controllers' too: recipe "paper"), learning rate 0.1 divided by 10 at 50 % and 75 % of
the epochs, batch 64 (digits) / 128 (mnist1d), cross-entropy, random-shift augmentation (data.py). Deterministic: the
model's initialisation comes from ``torch.manual_seed(seed)`` and the shuffling / augmentation from
a generator seeded with ``seed``, so one seed gives the same conv initialisation to every variant
(the variants of one seed are paired).

Recipe "ctrl_nowd" (issue 24, ``--recipe``): the same, except that the Δt controller's parameters
(``model.tsc_controller``) get no weight decay. Weight decay pulls the controller's weights (indp: θ)
towards 0, where its sigmoid outputs exactly 0.5, Δt's initial value; this recipe tests whether that
pull is what keeps the learned Δt at 0.5.

Every run of a TSC network records Δt per block after every epoch (``TrainedRun.dt_trajectory``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from . import data as data_mod

# variant name -> builder keyword arguments (tsc mode and fixed step size)
VARIANTS: dict[str, dict] = {
    "plain": {"tsc": None},
    "tsc_lstm": {"tsc": "lstm"},
    "tsc_2fc": {"tsc": "2fc"},
    "tsc_indp": {"tsc": "indp"},
    "dt=1": {"tsc": "fixed", "dt": 1.0},
    "dt=0.01": {"tsc": "fixed", "dt": 0.01},
    # the controllers' initial value as a constant (issue 24): does the learned Δt beat its own start?
    "dt=0.5": {"tsc": "fixed", "dt": 0.5},
}
WEIGHT_DECAY = 1e-4
# training recipe -> weight decay of the controller's parameters (every other parameter: WEIGHT_DECAY)
RECIPES: dict[str, dict] = {
    "paper": {"controller_weight_decay": WEIGHT_DECAY},
    "ctrl_nowd": {"controller_weight_decay": 0.0},
}
TSC_VARIANTS = ("tsc_lstm", "tsc_2fc", "tsc_indp")  # learned step sizes
MNIST1D_WIDTH = 16  # 1-D ResNet width (stages 16/32/64 channels, as the CIFAR ResNets)


# --arch (digits only): the architecture of the accuracy, noise and stepsizes runs. depth and ode study
# ResNets whatever the arch. DenseNets train at DenseNet-40 (k = 12, the TSC paper's), whatever the budget's
# depth; LM-ResNets are pre-activation with stochastic depth (survival 0.8 at the last block, as the
# LM-ResNet paper's depth-56 network).
ARCHS = ("resnet", "lm_resnet", "densenet")
ARCH_DEPTH = {"densenet": 40}
LM_SURVIVAL = 0.8


def model_name(dataset: str, depth: int, arch: str = "resnet") -> str:
    if data_mod.family(dataset) == "mnist1d":
        return f"resnet1d{depth}(width {MNIST1D_WIDTH})"
    return {"resnet": f"cifar_resnet{depth}", "lm_resnet": f"cifar_lm_resnet{depth}(survival {LM_SURVIVAL})",
            "densenet": f"cifar_densenet{depth}(k=12)"}[arch]


def build_model(dataset: str, variant: str, depth: int, num_classes: int = 10, arch: str = "resnet") -> nn.Module:
    """digits: CIFAR ResNet (basic blocks at every depth, 1 input channel), LM-ResNet or DenseNet (arch);
    mnist1d: 1-D ResNet."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    fam = data_mod.family(dataset)
    if arch != "resnet" and fam != "digits":
        raise ValueError(f"arch {arch!r} is built for digits only (mnist1d uses 1-D ResNets), got dataset {dataset!r}")
    kwargs = VARIANTS[variant]
    if arch == "lm_resnet":
        return models.cifar_lm_resnet(depth, num_classes=num_classes, in_channels=1, bottleneck=False,
                                      stochastic_depth=LM_SURVIVAL, **kwargs)
    if arch == "densenet":
        return models.cifar_densenet(depth, 12, num_classes=num_classes, in_channels=1, **kwargs)
    if fam == "digits":
        return models.cifar_resnet(depth, num_classes=num_classes, in_channels=1, bottleneck=False, **kwargs)
    return models.resnet1d(depth, num_classes=num_classes, in_channels=1, width=MNIST1D_WIDTH, **kwargs)


@dataclass(frozen=True)
class RunKey:
    dataset: str
    variant: str
    depth: int
    seed: int
    epochs: int
    train_subset: int | None = None  # None: the whole training set
    batch_size: int = 64
    arch: str = "resnet"
    recipe: str = "paper"


@dataclass
class TrainedRun:
    key: RunKey
    model: nn.Module
    test_acc: float
    test_loss: float
    train_loss: list[float] = field(default_factory=list)  # mean loss per epoch
    train_s: float = 0.0
    # TSC networks: {"blocks": [name, ...], "mean": [[Δt channel mean per block] per epoch],
    # "std": (same, channel std)}, epoch 0 = initialisation, so epochs + 1 rows; None for plain networks
    dt_trajectory: dict | None = None


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in eval mode without autograd."""
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits = model(x[i:i + batch])
            loss += float(F.cross_entropy(logits, y[i:i + batch], reduction="sum"))
            correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    return correct / len(x), loss / len(x)


def controller_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The Δt controller's parameters (``model.tsc_controller``; none for plain and fixed-Δt networks)."""
    ctrl = getattr(model, "tsc_controller", None)
    return [] if ctrl is None else list(ctrl.parameters())


def param_groups(model: nn.Module, recipe: str = "paper") -> list[dict]:
    """SGD parameter groups of ``recipe``: the network's parameters at WEIGHT_DECAY, then (if it has any)
    the controller's at the recipe's controller weight decay. Empty groups are left out."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    ctrl = {id(p) for p in controller_parameters(model)}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ctrl], "weight_decay": WEIGHT_DECAY,
               "name": "network"},
              {"params": [p for p in model.parameters() if id(p) in ctrl],
               "weight_decay": RECIPES[recipe]["controller_weight_decay"], "name": "controller"}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, lr: float = 0.1, recipe: str = "paper") -> torch.optim.SGD:
    return torch.optim.SGD(param_groups(model, recipe), lr=lr, momentum=0.9, nesterov=True)


def fit(model: nn.Module, ds: "data_mod.Dataset", epochs: int, batch_size: int, seed: int, lr: float = 0.1,
        on_step=None, recipe: str = "paper", on_epoch=None) -> list[float]:
    """Train ``model`` in place with ``recipe`` (module docstring); the batch order and augmentation
    come from a generator seeded with ``seed``. ``on_step(model, x, y)`` runs after every optimiser
    step (the ODE experiment's step adaptation), ``on_epoch(model, epoch)`` after every epoch
    (epoch = 1, 2, ...). Returns the mean training loss per epoch."""
    opt = make_optimizer(model, lr, recipe)
    milestones = sorted({max(1, round(epochs * 0.5)), max(1, round(epochs * 0.75))})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    gen = torch.Generator().manual_seed(seed)
    n = len(ds.x_train)
    losses = []
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2:  # BatchNorm needs 2 samples in training mode
                continue
            x, y = data_mod.random_shift(ds.x_train[idx], ds.max_shift, gen), ds.y_train[idx]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step(model, x, y)
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        sched.step()
        losses.append(total / max(count, 1))
        if on_epoch is not None:
            on_epoch(model, len(losses))
    return losses


class DtRecorder:
    """``on_epoch`` callback of ``fit``: Δt per block (channel mean and std) of a TSC network, read from
    its weights (diagnostics.step_sizes); call it once before training for the initial row."""

    def __init__(self):
        self.blocks: list[str] = []
        self.mean: list[list[float]] = []
        self.std: list[list[float]] = []

    def __call__(self, model: nn.Module, epoch: int = 0) -> None:
        from .. import diagnostics

        dts = diagnostics.step_sizes(model)
        self.blocks = list(dts)
        self.mean.append([float(d.double().mean()) for d in dts.values()])
        self.std.append([float(d.double().std()) if d.numel() > 1 else 0.0 for d in dts.values()])

    def to_json(self) -> dict:
        return {"blocks": self.blocks, "mean": self.mean, "std": self.std}


def train(key: RunKey, lr: float = 0.1) -> TrainedRun:
    ds = data_mod.load(key.dataset).subset(key.train_subset, None)
    torch.manual_seed(key.seed)
    model = build_model(key.dataset, key.variant, key.depth, ds.num_classes, key.arch)
    recorder = DtRecorder() if models.is_tsc_network(model) else None
    if recorder is not None:
        recorder(model, 0)  # the initial Δt (outside the timed training)
    start = time.perf_counter()
    losses = fit(model, ds, key.epochs, key.batch_size, key.seed, lr, recipe=key.recipe, on_epoch=recorder)
    train_s = time.perf_counter() - start
    acc, test_loss = evaluate(model, ds.x_test, ds.y_test)
    if not math.isfinite(test_loss):
        test_loss = float("inf")
    return TrainedRun(key, model, acc, test_loss, losses, train_s,
                      None if recorder is None else recorder.to_json())


class Context:
    """What a subcommand gets: the parsed options, the budget, and ``trained(key)`` (cached)."""

    def __init__(self, args, budget, progress: bool = True):
        self.args = args
        self.budget = budget
        self.show_progress = progress
        self._cache: dict[RunKey, TrainedRun] = {}

    def trained(self, key: RunKey) -> TrainedRun:
        if key not in self._cache:
            self._cache[key] = train(key)
        return self._cache[key]

    @property
    def arch(self) -> str:
        return getattr(self.args, "arch", "resnet")

    @property
    def recipe(self) -> str:
        return getattr(self.args, "recipe", "paper")

    def key(self, dataset: str, variant: str, seed: int, depth: int | None = None, epochs: int | None = None,
            recipe: str | None = None) -> RunKey:
        """The run of the budget's accuracy setting (with --arch), or a ResNet of another depth / epoch count;
        trained with ``recipe`` (default: --recipe)."""
        b = self.budget
        recipe = self.recipe if recipe is None else recipe
        if depth is not None:
            return RunKey(dataset, variant, depth, seed, b.epochs[dataset] if epochs is None else epochs,
                          b.train_subset[dataset], b.batch_size[dataset], recipe=recipe)
        return RunKey(dataset, variant, ARCH_DEPTH.get(self.arch, b.depth[dataset]), seed,
                      b.epochs[dataset] if epochs is None else epochs, b.train_subset[dataset], b.batch_size[dataset],
                      self.arch, recipe)

    def accuracy_runs(self, variants, recipe: str | None = None) -> dict:
        """{dataset: {variant: [TrainedRun per seed]}} of the accuracy setting (trained once, shared)."""
        keys = [self.key(d, v, s, recipe=recipe) for d in self.args.datasets for v in variants
                for s in range(self.budget.seeds)]
        runs = dict(zip(keys, self.train_all(keys, "train")))
        return {d: {v: [runs[self.key(d, v, s, recipe=recipe)] for s in range(self.budget.seeds)] for v in variants}
                for d in self.args.datasets}

    def train_all(self, keys: list[RunKey], desc: str) -> list[TrainedRun]:
        """Train (or fetch) every key, with a tqdm bar over the runs not yet cached."""
        todo = [k for k in keys if k not in self._cache]
        if todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=desc, unit="run", disable=not self.show_progress, leave=False)
            for k in todo:
                bar.set_postfix_str(f"{k.dataset} {k.variant} d{k.depth} s{k.seed}")
                self.trained(k)
                bar.update(1)
            bar.close()
        return [self._cache[k] for k in keys]
