"""``python -m tsc_kernels.train`` (and ``torchrun ... -m tsc_kernels.train``)."""
import sys

from .cli import main

sys.exit(main())
