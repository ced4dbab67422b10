"""The fused BatchNorm tail on every backend vs the reference (docs/ops.md).

Accuracy is judged against an fp64 evaluation of the reference: a backend's error in a dtype may be
at most twice the reference's own error in that dtype plus a small absolute slack.
"""
import re

import pytest
import torch

import tsc_kernels
from tsc_kernels import reference
from conftest import FUSED_BACKENDS, TOLERANCES, count_triton_launches

# Not powers of two; 0-3 spatial dims.
SHAPES = [(3, 7, 5, 4), (2, 5, 9), (4, 3, 2, 3, 5), (5, 6)]
OP_NAMES = {"cpu": "batch_norm_residual_update", "torch": "batch_norm_residual_update_torch",
            "triton": "batch_norm_residual_update_triton"}


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def channels_last(t):
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def make_inputs(shape, dtype, affine=True, running=True, x_cl=False, y_cl=False, training=True, relu=True):
    """(y, x, dt, running_mean, running_var, weight, bias); y is nudged so that no pre-ReLU sum is
    within 0.1 of the kink (where the fp64 and low-precision masks could disagree)."""
    C = shape[1]
    acc = acc_dtype(dtype)
    x = torch.randn(shape, dtype=torch.float64) * 1.5 + 0.7
    y = torch.randn(shape, dtype=torch.float64)
    dt = torch.rand(C, dtype=torch.float64) + 0.2
    rm = torch.randn(C, dtype=torch.float64) * 0.3 if running else None
    rv = torch.rand(C, dtype=torch.float64) + 0.5 if running else None
    w = torch.rand(C, dtype=torch.float64) + 0.5 if affine else None
    b = torch.randn(C, dtype=torch.float64) * 0.2 if affine else None
    if relu:
        pre = reference.batch_norm_residual_update(y, x.to(dtype).double(), dt, None if rm is None else rm.clone(),
                                                   None if rv is None else rv.clone(), w, b, training or rm is None, 0.1, 1e-5, False)
        y = y + 0.1 * torch.sign(pre)
    y, x = y.to(dtype), x.to(dtype)
    if y_cl:
        y = channels_last(y)
    if x_cl:
        x = channels_last(x)
    cast = [None if t is None else t.to(acc) for t in (dt, rm, rv, w, b)]
    return (y, x, *cast[:1], *cast[1:3], *cast[3:])


def run(fn, y, x, dt, rm, rv, w, b, training, relu, grad):
    """out, running stats and the gradients of (y, x, dt, w, b) of fn on leaf copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (y, x, dt, w, b)]
    ly, lx, ldt, lw, lb = leaves
    rm, rv = (None if t is None else t.clone() for t in (rm, rv))
    out = fn(ly, lx, ldt, rm, rv, lw, lb, training, 0.1, 1e-5, relu)
    diff = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, diff, grad.to(out.dtype))
    return out.detach(), rm, rv, grads


def check_against_fp64(shape, dtype, training, affine=True, running=True, relu=True, x_cl=False, y_cl=False):
    inputs = make_inputs(shape, dtype, affine, running, x_cl, y_cl, training, relu)
    y, x = inputs[:2]
    grad = torch.randn(shape, dtype=torch.float64)
    got = run(tsc_kernels.batch_norm_residual_update, *inputs, training, relu, grad)
    ref = run(reference.batch_norm_residual_update, *inputs, training, relu, grad)
    exact = run(reference.batch_norm_residual_update, *(None if t is None else t.double() for t in inputs), training, relu, grad)
    assert got[0].dtype == y.dtype and got[0].stride() == ref[0].stride(), "out keeps y's dtype and memory format"
    atol = TOLERANCES[dtype][0]
    values = y.numel() // shape[1]
    names = ["out", "running_mean", "running_var", "dy", "dx", "ddt"] + (["dweight", "dbias"] if affine else [])
    flat = [[*result[:3], *result[3]] for result in (got, ref, exact)]
    for name, g, r, e in zip(names, *flat):
        if e is None:
            assert g is None and r is None, name
            continue
        assert g.dtype == r.dtype and g.shape == r.shape, name
        scale = values ** 0.5 if name in ("ddt", "dweight", "dbias") else 1.0  # sums over N * spatial values
        err = (g.double() - e).abs().max().item() if g.numel() else 0.0
        ref_err = (r.double() - e).abs().max().item() if r.numel() else 0.0
        assert err <= 2 * ref_err + atol * scale * max(1.0, e.abs().max().item()), f"{name}: error {err:.3g} vs reference's {ref_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, shape, training, dtype):
    check_against_fp64(shape, dtype, training)


@pytest.mark.parametrize("affine, running, relu", [(False, True, True), (True, False, True), (False, False, False), (True, True, False)])
@pytest.mark.parametrize("shape", [(3, 7, 5, 4), (5, 6)])
def test_options_match_reference(backend, shape, affine, running, relu):
    check_against_fp64(shape, torch.float32, True, affine=affine, running=running, relu=relu)
    if running:
        check_against_fp64(shape, torch.float32, False, affine=affine, running=running, relu=relu)


@pytest.mark.parametrize("x_cl, y_cl", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(3, 7, 5, 4), (2, 5, 9), (4, 3, 2, 3, 5)])
def test_channels_last_matches_reference(backend, shape, training, x_cl, y_cl):
    check_against_fp64(shape, torch.float32, training, x_cl=x_cl, y_cl=y_cl)
    check_against_fp64(shape, torch.bfloat16, training, x_cl=x_cl, y_cl=y_cl, relu=False)


@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_running_statistics_after_three_steps(backend, buffer_dtype):
    C = 6
    got = [torch.zeros(C, dtype=buffer_dtype), torch.ones(C, dtype=buffer_dtype)]
    want = [t.clone() for t in got]
    dt = torch.rand(C)
    for step in range(3):
        y, x = torch.randn(4, C, 3, 5), torch.randn(4, C, 3, 5) * (step + 1) + step
        tsc_kernels.batch_norm_residual_update(y, x, dt, *got, None, None, True, 0.2, 1e-5, True)
        reference.batch_norm_residual_update(y, x, dt, *want, None, None, True, 0.2, 1e-5, True)
    atol, rtol = TOLERANCES[buffer_dtype]
    for g, w in zip(got, want):
        assert g.dtype == buffer_dtype
        torch.testing.assert_close(g, w, atol=max(atol, 1e-5), rtol=max(rtol, 1e-5))
    # eval reads them back
    y, x = torch.randn(2, C, 4), torch.randn(2, C, 4)
    torch.testing.assert_close(tsc_kernels.batch_norm_residual_update(y, x, dt, *got, None, None, False, 0.2, 1e-5, True),
                               reference.batch_norm_residual_update(y, x, dt, *got, None, None, False, 0.2, 1e-5, True))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_gradcheck_fp64(backend, training, relu):
    for shape, cl in (((2, 3, 4, 5), False), ((3, 4, 2, 3), True)):
        y, x, dt, rm, rv, w, b = make_inputs(shape, torch.float64, x_cl=cl, training=training, relu=relu)
        if training:
            rm = rv = None  # batch statistics only: the function is then pure

        def fn(y, x, dt, w, b):
            return tsc_kernels.batch_norm_residual_update(y, x, dt, rm, rv, w, b, training, 0.1, 1e-5, relu)

        inputs = tuple(t.requires_grad_() for t in (y, x, dt, w, b))
        assert torch.autograd.gradcheck(fn, inputs)


def _register_triton():
    y, x, dt, rm, rv, w, b = make_inputs((2, 3, 4), torch.float32)
    tsc_kernels.batch_norm_residual_update(y, x, dt, rm, rv, w, b, True, 0.1, 1e-5, True)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu, affine", [(True, True), (False, False)])
def test_opcheck(backend, training, relu, affine):
    if backend == "triton":
        _register_triton()
    forward = getattr(torch.ops.tsc, OP_NAMES[backend])
    for cl in (False, True):
        y, x, dt, rm, rv, w, b = make_inputs((2, 5, 3, 4), torch.float32, affine=affine, x_cl=cl, y_cl=cl)
        args = (y, x, dt, rm, rv, w, b, training, 0.1, 1e-5, relu)
        torch.library.opcheck(forward, args)
        if backend == "torch":  # no separate backward op: autograd derives it
            continue
        out, mean, invstd = forward(*args)
        backward = getattr(torch.ops.tsc, OP_NAMES[backend].replace("update", "update_backward"))
        torch.library.opcheck(backward, (torch.randn_like(out), x, dt, w, b, mean, invstd, out if relu else None, training))


def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    y, x, dt, rm, rv, w, b = make_inputs((2, 6, 5, 3), torch.float32)

    def step(fn, y, x, dt, rm, rv, w, b):
        return fn(y, x * 2.0, dt, rm, rv, w, b, True, 0.1, 1e-5, True).sum()

    leaves = [t.clone().requires_grad_() for t in (y, x, dt, w, b)]
    ref_leaves = [t.clone().requires_grad_() for t in (y, x, dt, w, b)]
    stats, ref_stats = (rm.clone(), rv.clone()), (rm.clone(), rv.clone())
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    lp = leaves
    loss = compiled(tsc_kernels.batch_norm_residual_update, lp[0], lp[1], lp[2], *stats, lp[3], lp[4])
    rl = ref_leaves
    ref_loss = step(reference.batch_norm_residual_update, rl[0], rl[1], rl[2], *ref_stats, rl[3], rl[4])
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    for g, r in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(ref_loss, ref_leaves)):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    for s, r in zip(stats, ref_stats):  # the in-place running update survives functionalisation
        torch.testing.assert_close(s, r)


def test_eval_empty_batch(backend):
    y, x, dt, rm, rv, w, b = make_inputs((0, 4, 3, 3), torch.float32, relu=False)
    leaves = [t.requires_grad_() for t in (y, x, dt, w, b)]
    out = tsc_kernels.batch_norm_residual_update(y, x, dt, rm, rv, w, b, False, 0.1, 1e-5, True)
    assert out.shape == (0, 4, 3, 3)
    for g in torch.autograd.grad(out.sum(), leaves[2:]):
        assert torch.equal(g, torch.zeros(4))


@pytest.mark.big_for_interpreter
@pytest.mark.parametrize("fused", FUSED_BACKENDS)
def test_deterministic_across_runs_and_threads(fused):
    """The fused ops' results are bitwise the same across calls and thread counts (fixed-order
    reductions; ATen's own batch norm, the reference, is not). The planes (2, 3, 131, 129) are
    longer than one chunk of the CPU kernel; the rows case is channels-last."""
    threads = torch.get_num_threads()
    for cl in (False, True):
        y, x, dt, rm, rv, w, b = make_inputs((2, 3, 131, 129), torch.float32, x_cl=cl, y_cl=cl)
        grad = torch.randn_like(y)
        results = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            try:
                with tsc_kernels.use_backend(fused):
                    results.append(run(tsc_kernels.batch_norm_residual_update, y, x, dt, rm, rv, w, b, True, True, grad))
            finally:
                torch.set_num_threads(threads)
        for other in results[1:]:
            assert torch.equal(other[0], results[0][0])
            for g, g0 in zip(other[3], results[0][3]):
                assert torch.equal(g, g0)


@pytest.mark.parametrize(
    "change, exc, words",
    [
        ({"x": torch.randn(2, 3, 5)}, ValueError, "x must have y's shape"),
        ({"x": torch.randn(2, 3, 4).double()}, TypeError, "x must have y's dtype"),
        ({"dt": torch.rand(4)}, ValueError, "dt must have shape (C,)"),
        ({"weight": torch.rand(4)}, ValueError, "weight must have shape (C,)"),
        ({"bias": torch.rand(3, 1)}, ValueError, "bias must have shape (C,)"),
        ({"weight": torch.ones(3, dtype=torch.int64)}, TypeError, "weight must have dtype"),
        ({"running_var": None}, ValueError, "running_mean and running_var must both"),
        ({"running_mean": None, "running_var": None, "training": False}, ValueError, "training=False (running statistics) needs"),
        ({"running_var": torch.ones(3).double()}, TypeError, "running_var must have running_mean's dtype"),
        ({"running_mean": torch.zeros(3, device="meta")}, ValueError, "one device"),
        ({"y": torch.randn(1, 3), "x": torch.randn(1, 3)}, ValueError, "training needs more than 1 value per channel"),
        ({"y": torch.randn(1, 3, 1, 1), "x": torch.randn(1, 3, 1, 1)}, ValueError, "training needs more than 1 value per channel"),
        ({"momentum": 1.5}, ValueError, "momentum must be in [0, 1]"),
        ({"eps": 0.0}, ValueError, "eps must be > 0"),
        ({"eps": "1e-5"}, TypeError, "eps must be a float"),
        ({"training": 1}, TypeError, "training must be a bool"),
        ({"relu": None}, TypeError, "relu must be a bool"),
        ({"y": None}, TypeError, "y must be a torch.Tensor"),
    ],
)
def test_bad_input(backend, change, exc, words):
    args = dict(y=torch.randn(2, 3, 4), x=torch.randn(2, 3, 4), dt=torch.rand(3), running_mean=torch.zeros(3),
                running_var=torch.ones(3), weight=torch.ones(3), bias=torch.zeros(3), training=True, momentum=0.1,
                eps=1e-5, relu=True)
    args.update(change)
    with pytest.raises(exc, match=re.escape(words)):
        tsc_kernels.batch_norm_residual_update(**args)


def test_eval_allows_one_value_per_channel(backend):
    y, x, dt, rm, rv, w, b = make_inputs((1, 3), torch.float32, training=False)
    out = tsc_kernels.batch_norm_residual_update(y, x, dt, rm, rv, w, b, False, 0.1, 1e-5, True)
    torch.testing.assert_close(out, reference.batch_norm_residual_update(y, x, dt, rm, rv, w, b, False, 0.1, 1e-5, True))


@pytest.mark.cpu_only
@pytest.mark.parametrize("relu", [False, True])
def test_fused_op_is_one_kernel_each_way(backend, relu):
    """docs/performance.md: the fused op is one kernel forward and one backward; the reference is several."""
    from tsc_kernels.profiling import count_kernels

    y, x, dt, rm, rv, w, b = make_inputs((2, 6, 5, 3), torch.float32)
    leaves = [t.requires_grad_() for t in (y, x, dt, w, b)]
    grad = torch.randn(2, 6, 5, 3)

    def fwd():
        return tsc_kernels.batch_norm_residual_update(y, x, dt, rm, rv, w, b, True, 0.1, 1e-5, relu)

    def bwd_only():
        torch.autograd.grad(out, leaves, grad, retain_graph=True)

    fwd()
    out = fwd()
    bwd_only()
    count = count_triton_launches if backend == "triton" and tsc_kernels.backend.TRITON_INTERPRET else count_kernels
    n_fwd, n_bwd = count(fwd), count(bwd_only)
    if backend == "torch":
        assert n_fwd > 1 and n_bwd > 1, (n_fwd, n_bwd)
    elif backend == "triton":  # launches: a statistics and an apply kernel may be separate
        assert 1 <= n_fwd <= 3 and 1 <= n_bwd <= 3, (n_fwd, n_bwd)
    else:
        assert (n_fwd, n_bwd) == (1, 1), (n_fwd, n_bwd)
