"""Triton kernels of tsc_kernels, installed as tsc_kernels._triton (one file per op)."""
from . import _interpreter_compat

_interpreter_compat.install()
