"""TSC models under torch.autocast("cpu", dtype=torch.bfloat16) (issue 6).

What autocast must give: convolutions (and so F and the shortcut) in bf16, the residual update in
bf16 with fp32 Δt and fp32 accumulation, the controller (w̄, LSTM / 2fc / indp) in fp32; a training
step's gradients then match the fp32 step within bf16 tolerance.
"""
import pytest
import torch

import tsc_kernels
from tsc_kernels import models
from tsc_kernels.models import blocks as model_blocks  # the TSC blocks call blocks.residual_update


def _model(mode, seed=0, preact=False):
    torch.manual_seed(seed)
    return models.cifar_resnet(8, tsc=mode, preact=preact)


def _step_grads(model, x, target, autocast):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), target)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# The Triton interpreter takes ~20 s per case here: it runs the lstm post-activation case only
BIG = pytest.mark.big_for_interpreter


@pytest.mark.parametrize("preact", [False, pytest.param(True, marks=BIG)])
@pytest.mark.parametrize("mode", ["lstm", pytest.param("2fc", marks=BIG), pytest.param("indp", marks=BIG)])
def test_autocast_step_matches_fp32(backend, mode, preact, monkeypatch):
    model = _model(mode, preact=preact)  # train mode: BN uses (bf16) batch statistics
    torch.manual_seed(1)
    x, target = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))

    # every residual update (or fused BatchNorm tail) must see bf16 activations and fp32 Δt
    # (the blocks' call sites: residual_tail and batch_norm_tail go straight to the ops)
    seen = []
    original, original_tail = model_blocks.residual_tail, model_blocks.batch_norm_tail

    def spy(y, f, dt, relu):
        seen.append((y.dtype, f.dtype, dt.dtype))
        return original(y, f, dt, relu)

    def spy_tail(bn, y, x, dt, relu):
        seen.append((y.dtype, x.dtype, dt.dtype))
        return original_tail(bn, y, x, dt, relu)

    monkeypatch.setattr(model_blocks, "residual_tail", spy)
    monkeypatch.setattr(model_blocks, "batch_norm_tail", spy_tail)
    loss_bf16, grads_bf16 = _step_grads(model, x, target, autocast=True)
    assert len(seen) == 3 and all(s == (torch.bfloat16, torch.bfloat16, torch.float32) for s in seen), seen
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dts = model.compute_step_sizes()
    assert all(dt.dtype == torch.float32 for dt in dts), "the controller must run in fp32 under autocast"
    with torch.no_grad():
        torch.testing.assert_close(dts, model.compute_step_sizes(), atol=1e-6, rtol=1e-6)

    seen.clear()
    loss_fp32, _ = _step_grads(model, x, target, autocast=False)
    assert all(s == (torch.float32,) * 3 for s in seen)
    torch.testing.assert_close(loss_bf16, loss_fp32, atol=0.05, rtol=0.02)

    # Gradients: in eval mode (BN on running statistics), where bf16 batch statistics do not add
    # their own noise. "bf16 tolerance" = what autocast does to the plain network's gradients on the
    # same data (~5-10 % relative L2 over all parameters on this tiny net), so TSC must not be much
    # worse than plain, and every parameter's gradient must point the same way as in fp32.
    model.eval()
    _, grads_bf16 = _step_grads(model, x, target, autocast=True)
    _, grads_fp32 = _step_grads(model, x, target, autocast=False)
    plain = models.cifar_resnet(8, tsc=None, preact=preact).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("tsc_controller.")})
    _, plain_bf16 = _step_grads(plain, x, target, autocast=True)
    _, plain_fp32 = _step_grads(plain, x, target, autocast=False)
    assert _global_rel(grads_bf16, grads_fp32) <= 1.5 * _global_rel(plain_bf16, plain_fp32) + 0.01
    for name, g32 in grads_fp32.items():
        g16 = grads_bf16[name]
        assert g16.dtype == torch.float32, f"{name}: parameters stay fp32, so do their gradients"
        if not bool(g32.any()):  # e.g. weight_hh of a one-block stage (h_0 = 0): exactly 0 both ways
            assert not bool(g16.any()), name
            continue
        cos = float(torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0))
        # Controller gradients come from ddt = Σ_{n,spatial} g·f, sums with heavy cancellation of
        # bf16-rounded g and f: the noisiest gradients of the net (0.89-0.99 seen across backends,
        # whose bf16 roundings differ); a wrong or missing Δt gradient gives ~0 or negative.
        bound = 0.8 if name.startswith("tsc_controller.") else 0.95
        assert cos > bound, f"{name}: bf16 gradient points elsewhere than the fp32 one (cosine {cos:.3f})"
    ctrl = {n: g for n, g in grads_bf16.items() if n.startswith("tsc_controller.")}
    assert ctrl and any(bool(g.any()) for g in ctrl.values()), "controller gets gradients under autocast"


def _global_rel(a, b):
    """Relative L2 distance of two gradient dicts, all parameters concatenated."""
    a, b = (torch.cat([d[n].flatten() for n in sorted(b)]) for d in (a, b))
    return float((a - b).norm() / b.norm())


def test_autocast_block_fed_fp32_shortcut(backend):
    """A TSC block called directly on fp32 activations under autocast: its convs give bf16 while the
    identity shortcut stays fp32. torchvision's `out += identity` gives the branch's bf16; the TSC
    block does the same instead of failing residual_update's same-dtype check."""
    torch.manual_seed(0)
    plain = models.cifar_resnet(8, tsc=None).layer1[0]
    tsc = tsc_kernels.convert(models.cifar_resnet(8, tsc=None)).layer1[0]
    tsc.load_state_dict(plain.state_dict())
    x = torch.randn(2, 16, 6, 6)
    dt = torch.ones(16)  # Δt = 1: the TSC block is the plain block
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = plain(x)
        got = tsc(x, dt)
    assert want.dtype == got.dtype == torch.bfloat16
    # the fused op adds in fp32 and rounds once, torchvision's bf16 add rounds the same sum: equal
    # up to one bf16 rounding
    torch.testing.assert_close(got, want, atol=1.6e-2, rtol=1.6e-2)
    with pytest.raises(TypeError, match="f must have y's dtype"):  # outside autocast a mismatch is an error
        tsc_kernels.residual_update(x, x.bfloat16(), dt)
