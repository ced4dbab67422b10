"""tsc-experiment: the TSC paper's experiments at CPU scale on real data (docs/experiments.md).

    tsc-experiment {accuracy,noise,depth,stepsizes,all} [--quick] [--json PATH] [--out DIR] ...
    python -m tsc_kernels.experiments ...

Subcommands live in a registry (``registry.SUBCOMMANDS``): every module of this package that calls
``register(Subcommand(...))`` at import is a subcommand, so a new experiment is one new file here
(for example ``ode.py``) and no other edit. Needs the ``experiments`` extra
(scikit-learn, mnist1d, matplotlib, tqdm).
"""
from .registry import SUBCOMMANDS, Subcommand, register

__all__ = ["SUBCOMMANDS", "Subcommand", "register", "main"]


def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)
