"""TSC models under torch.autocast("cpu", dtype=torch.bfloat16) (issue 6).

What autocast must give: convolutions (and so F and the shortcut) in bf16, the residual update in
bf16 with fp32 Δt and fp32 accumulation, the controller (w̄, LSTM / 2fc / indp) in fp32; a training
step's gradients then match the fp32 step within bf16 tolerance.
"""
import pytest
import torch

import tsc_kernels
from tsc_kernels import models


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


@pytest.mark.parametrize("preact", [False, True])
@pytest.mark.parametrize("mode", ["lstm", "2fc", "indp"])
def test_autocast_step_matches_fp32(backend, mode, preact, monkeypatch):
    model = _model(mode, preact=preact)
    torch.manual_seed(1)
    x, target = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))

    # every residual update must see bf16 activations and fp32 Δt
    seen = []
    original = models.residual_update

    def spy(y, f, dt, relu=False):
        seen.append((y.dtype, f.dtype, dt.dtype))
        return original(y, f, dt, relu=relu)

    monkeypatch.setattr(models, "residual_update", spy)
    loss_bf16, grads_bf16 = _step_grads(model, x, target, autocast=True)
    assert len(seen) == 3 and all(s == (torch.bfloat16, torch.bfloat16, torch.float32) for s in seen), seen
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dts = model.compute_step_sizes()
    assert all(dt.dtype == torch.float32 for dt in dts), "the controller must run in fp32 under autocast"
    with torch.no_grad():
        torch.testing.assert_close(dts, model.compute_step_sizes(), atol=1e-6, rtol=1e-6)

    seen.clear()
    loss_fp32, grads_fp32 = _step_grads(model, x, target, autocast=False)
    assert all(s == (torch.float32,) * 3 for s in seen)
    torch.testing.assert_close(loss_bf16, loss_fp32, atol=0.05, rtol=0.02)
    for name, g32 in grads_fp32.items():
        g16 = grads_bf16[name]
        assert g16.dtype == torch.float32, f"{name}: parameters stay fp32, so do their gradients"
        # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per op); through a few layers of
        # convs the gradient as a whole stays within a few percent of the fp32 one
        rel = float((g16 - g32).norm() / g32.norm().clamp_min(1e-12))
        assert rel < 0.1, f"{name}: bf16 gradient is {rel:.3f} (relative L2) from the fp32 one"
    ctrl = {n: g for n, g in grads_bf16.items() if n.startswith("tsc_controller.")}
    assert ctrl and all(bool(g.abs().sum() > 0) for g in ctrl.values()), "controller gets gradients under autocast"


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
