"""`python -m tsc_kernels` runs tsc-bench."""
import sys

from .bench import main

sys.exit(main())
