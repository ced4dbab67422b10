"""How much each experiment trains: the full run (docs/experiments.md's tables) and --quick (CI).

The full run (``tsc-experiment all``) took 14 minutes at one thread for accuracy, noise, depth (one
seed) and stepsizes (2026-11-29, 2-core VM). The recorded run (three depth seeds, the ode experiment;
docs/experiments.md) took 24 minutes for digits and 33 for mnist1d, as two one-thread processes side by side
(``--datasets digits`` / ``--datasets mnist1d``, joined by ``python -m tsc_kernels.experiments.report
a.json b.json --merged``), on a machine partly shared with builds: inside the 45-minute target on 2 cores.
The issue-24 budget (5 seeds, four data sets, the Δt = 0.5 / indp controls, trajectory; depths 20 and 56)
was recorded on 2026-12-06 as two one-thread processes (``--datasets digits,mnist1d_hard`` and ``--datasets
mnist1d,digits_small``, ``all --skip ode``): 29.1 and 30.8 minutes of CPU each (56 / 58 minutes of wall time on a
machine shared with builds; about 31 minutes on an idle 2-core machine). --quick runs the whole suite in
well under 3 minutes (71 s on a shared 2-core machine, with 2 seeds so the paired statistics run): a smoke
test of every path and a first look, not evidence.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Budget:
    seeds: int  # seeds 0 .. seeds-1 for accuracy / noise / stepsizes
    epochs: dict  # dataset -> epochs of the accuracy runs
    depth: dict  # dataset -> depth of the accuracy runs
    depths: dict  # dataset -> depths of the depth experiment
    depth_epochs: dict  # dataset -> epochs of the depth runs
    depth_seeds: int
    noise_sigmas: tuple  # σ of the Gaussian input noise, in units of the data's std
    train_subset: dict  # dataset -> number of training examples (None: all)
    batch_size: dict  # dataset -> batch size
    # ode (docs/ode.md): the XOR toy, ODE-nets with / without step adaptation, consistency curves
    ode_xor_iters: int  # full-batch Adam iterations of each XOR model
    ode_xor_steps: tuple  # Euler steps over [0, 1] of the XOR models (coarse, fine)
    ode_eval_steps: tuple  # steps over [0, 1] at which the ODE models are tested
    ode_epochs: dict  # dataset -> epochs of the ODE-net runs
    ode_adapt_every: int  # iterations between step-adaptation decisions
    ode_depth: dict  # dataset -> depth of the ResNets whose consistency curves are measured
    ode_factors: tuple  # refinement factors of the consistency curves

    def to_json(self) -> dict:
        return asdict(self)

    def with_overrides(self, seeds: int | None = None, epochs: int | None = None) -> "Budget":
        """--seeds / --epochs (epochs applies to every dataset and to the depth and ODE-net runs)."""
        b = self
        if seeds is not None:
            b = replace(b, seeds=seeds, depth_seeds=min(b.depth_seeds, seeds))
        if epochs is not None:
            b = replace(b, epochs={k: epochs for k in b.epochs}, depth_epochs={k: epochs for k in b.depth_epochs},
                        ode_epochs={k: epochs for k in b.ode_epochs})
        return b


FULL = Budget(
    seeds=5,
    epochs={"digits": 20, "mnist1d": 15, "digits_small": 40, "mnist1d_hard": 30},
    depth={"digits": 20, "mnist1d": 20, "digits_small": 20, "mnist1d_hard": 20},
    depths={"digits": (20, 56), "mnist1d": (20, 56), "digits_small": (20, 56), "mnist1d_hard": (20, 56)},
    # the harder sets' depth runs take about as many SGD steps as the base sets' (fewer examples per epoch)
    depth_epochs={"digits": 8, "mnist1d": 5, "digits_small": 30, "mnist1d_hard": 20},
    depth_seeds=5,
    noise_sigmas=(0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5),
    train_subset={"digits": None, "mnist1d": None, "digits_small": None, "mnist1d_hard": None},
    batch_size={"digits": 64, "mnist1d": 128, "digits_small": 64, "mnist1d_hard": 128},
    ode_xor_iters=400,
    ode_xor_steps=(2, 256),
    ode_eval_steps=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    ode_epochs={"digits": 20, "mnist1d": 10, "digits_small": 40, "mnist1d_hard": 20},
    ode_adapt_every=50,
    ode_depth={"digits": 56, "mnist1d": 56, "digits_small": 56, "mnist1d_hard": 56},
    ode_factors=(1, 2, 4, 8, 16),
)

QUICK = Budget(
    seeds=2,  # two seeds, so that the paired statistics (t-test, intervals) run in CI too
    epochs={"digits": 2, "mnist1d": 1, "digits_small": 2, "mnist1d_hard": 1},
    depth={"digits": 8, "mnist1d": 8, "digits_small": 8, "mnist1d_hard": 8},
    depths={"digits": (8, 20), "mnist1d": (8, 20), "digits_small": (8,), "mnist1d_hard": (8,)},
    depth_epochs={"digits": 1, "mnist1d": 1, "digits_small": 1, "mnist1d_hard": 1},
    depth_seeds=2,
    noise_sigmas=(0.0, 0.5, 1.0),
    train_subset={"digits": None, "mnist1d": 1000, "digits_small": None, "mnist1d_hard": 500},
    batch_size={"digits": 64, "mnist1d": 128, "digits_small": 64, "mnist1d_hard": 128},
    ode_xor_iters=20,
    ode_xor_steps=(2, 16),
    ode_eval_steps=(1, 2, 4, 16),
    ode_epochs={"digits": 1, "mnist1d": 1, "digits_small": 1, "mnist1d_hard": 1},
    ode_adapt_every=5,
    ode_depth={"digits": 8, "mnist1d": 8, "digits_small": 8, "mnist1d_hard": 8},
    ode_factors=(1, 2, 4),
)
