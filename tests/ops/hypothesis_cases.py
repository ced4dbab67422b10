"""What the hypothesis property tests of every op share (tests/ops/test_properties.py runs them; each
op's case strategy, fp64 check and properties are in its tests/ops/test_<op>.py, PROPERTY_STRATEGY and
PROPERTIES): shapes with channel counts that are not powers of two, tiny ones for the Triton
interpreter, and small helpers. Not a test module (no test_ prefix)."""
import torch
from hypothesis import strategies as st

from conftest import TOLERANCES

CHANNELS, TINY_CHANNELS = [3, 5, 6, 7, 9, 11, 13], [3, 5, 6, 7]
SEED = st.integers(0, 2**31 - 1)
LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]  # what the fp64 criterion is for


@st.composite
def activation_shapes(draw, small, min_spatial=0):
    """(N, C, *spatial): N in 1..3, C not a power of two, 0-3 odd spatial dims (0-2 on the interpreter)."""
    spatial = draw(st.lists(st.sampled_from([1, 3, 5] if small else [1, 3, 5, 7]), min_size=min_spatial,
                            max_size=2 if small else 3))
    return (draw(st.integers(1, 3)), draw(st.sampled_from(TINY_CHANNELS if small else CHANNELS)), *spatial)


@st.composite
def elementwise_cases(draw, small):
    """shape, dtype, channels_last, relu, seed."""
    return (draw(activation_shapes(small)), draw(st.sampled_from(LOW_PRECISION)), draw(st.booleans()),
            draw(st.booleans()), draw(SEED))


def _leaves(*ts):
    return tuple(None if t is None else t.detach().clone().requires_grad_() for t in ts)


def _permute(t, perm, dim=1):
    return None if t is None else t.index_select(dim, perm)


def _grads(out, inputs, grad):
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return torch.autograd.grad(out, wrt, grad)


def _close(got, want, dtype, scale=1.0, msg=""):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got, want, atol=atol * scale, rtol=rtol, msg=lambda m: f"{msg}: {m}" if msg else m)
