"""Triton < 3.7's interpreter under NumPy 2: scalars that a kernel loads or computes at run time
(`n = tl.load(table + i)`, `tl.program_id(0) * 2`) are 1-element arrays there, and using one as a
Python index (the bound of a `for ... in range(0, n)` loop) calls `int()` on that array, which NumPy 2
refuses ("only 0-dimensional arrays can be converted to Python scalars"). Triton 3.8's interpreter
squeezes the array first; the GPU compiler of every version takes such loops as they are (an scf.for
with run-time bounds), so the kernels stay as they are and this gives the older interpreter the same
`__index__` as the newer one. Only the interpreter (TRITON_INTERPRET=1, CPU tests) is touched.
"""
from __future__ import annotations

import os


def _squeezed_index(self) -> int:
    return int(self.handle.data.squeeze())


def install() -> bool:
    """Patch the interpreter's tensor `__index__` when it lacks the squeeze; True when patched."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_tsc_squeezed_index", False):
        return False  # a Triton whose interpreter is laid out otherwise: nothing known to mend

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # Set through the same scope, so the interpreter restores the original after the launch.
        scope.set_attr(tensor, "__index__", _squeezed_index)

    patch_lang_tensor._tsc_squeezed_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
