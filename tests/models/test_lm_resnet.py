"""LM-ResNets (docs/lm_resnet.md): architecture, k_n, stochastic depth, TSC inside the two-step
scheme, convert / fold, diagnostics, backends."""
import copy

import pytest
import torch
from torch import nn

import tsc_kernels
from tsc_kernels import models
from tsc_kernels.models import lm_resnet

from conftest import randomize  # noqa: E402  (non-trivial BN statistics and controller weights)


def small_input(n=2, size=8):
    return torch.randn(n, 3, size, size)


def test_lm_resnet56_parameter_count():
    """LM-ResNet-56 (pre-act) = ResNet-56 (pre-act) + one k_n per multi-step block (27 blocks minus
    the 3 stage-opening Euler blocks): 855,578 + 24 = 855,602 (the paper's 0.85 M)."""
    lm = models.cifar_lm_resnet(56)
    plain = models.cifar_resnet(56, preact=True, tsc=None)
    count = sum(p.numel() for p in lm.parameters())
    assert count == sum(p.numel() for p in plain.parameters()) + 24
    assert count == 855_602
    assert len(tsc_kernels.lm_coefficients(lm)) == 24


def test_k_init_and_euler_blocks():
    model = models.cifar_lm_resnet(56)
    for name in model.stage_names:
        stage = getattr(model, name)
        assert not hasattr(stage[0], "lm_k"), "the first block of a stage takes the Euler step"
        for block in stage[1:]:
            assert isinstance(block.lm_k, nn.Parameter) and block.lm_k.dim() == 0
    ks = torch.tensor(list(tsc_kernels.lm_coefficients(model).values()))
    assert bool(((ks >= -0.1) & (ks <= 0.0)).all())
    assert float(ks.std()) > 0.01  # sampled, not a constant


def test_survival_schedule():
    model = models.cifar_lm_resnet(20, stochastic_depth=0.5)
    p = model.lm_survival
    assert len(p) == 9
    assert p[-1] == pytest.approx(0.5) and p[0] == pytest.approx(1 - 0.5 / 9)
    diffs = [a - b for a, b in zip(p, p[1:])]
    assert all(d == pytest.approx(0.5 / 9) for d in diffs)  # linear decay
    assert models.cifar_lm_resnet(20, stochastic_depth=None).lm_survival == (1.0,) * 9


def _record_keeps(model, x, monkeypatch):
    seen = []
    original = lm_resnet.multistep_update

    def recording(u, u_prev, f, k, dt=None, keep=None, relu=False):
        seen.append(keep)
        return original(u, u_prev, f, k, dt, keep, relu)

    monkeypatch.setattr(lm_resnet, "multistep_update", recording)
    with torch.no_grad():
        model(x)
    return seen


def test_stochastic_depth_training_mask_follows_schedule(monkeypatch):
    """Training: keep = η_l ~ Bernoulli(p_l) per sample; its mean matches p_l (1024 samples per
    block: the std of the mean is <= 0.016, the tolerance 0.06 is ~4 std)."""
    torch.manual_seed(1)
    model = models.cifar_lm_resnet(20, stochastic_depth=0.3).train()
    keeps = [_record_keeps(model, small_input(512, 4), monkeypatch) for _ in range(2)]
    for l, p in enumerate(model.lm_survival):
        eta = torch.cat([keeps[0][l], keeps[1][l]])
        assert set(eta.unique().tolist()) <= {0.0, 1.0}
        assert abs(float(eta.mean()) - p) < 0.06, (l, float(eta.mean()), p)
    overall = torch.stack([torch.cat([k0, k1]).mean() for k0, k1 in zip(*keeps)]).mean()
    assert abs(float(overall) - sum(model.lm_survival) / 9) < 0.02


def test_stochastic_depth_eval_uses_expectation(monkeypatch):
    model = models.cifar_lm_resnet(20, stochastic_depth=0.3).eval()
    keeps = _record_keeps(model, small_input(3), monkeypatch)
    for keep, p in zip(keeps, model.lm_survival):
        assert torch.equal(keep, torch.full((3,), p))
    x = small_input(3)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # deterministic in eval
    # without stochastic depth no mask is passed at all
    assert all(
        k is None for k in _record_keeps(models.cifar_lm_resnet(20, stochastic_depth=None).eval(), x, monkeypatch)
    )


def test_stochastic_depth_training_is_random():
    model = models.cifar_lm_resnet(20, stochastic_depth=0.5).train()
    x = small_input(4)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("preact", [True, False])
def test_multistep_matches_manual_scheme(preact):
    """layer1 by hand: u1 = act(S(u0) + f(u0)) (Euler), then u_{n+1} = act((1 - k)·S(u_n) + k·S(u_{n-1}) + f(u_n))."""
    model = models.cifar_lm_resnet(20, stochastic_depth=None, preact=preact).eval()
    act = torch.relu if not preact else (lambda t: t)
    stem = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        u, prev = stem, None
        for block in model.layer1:
            s, f = lm_resnet._branch(block, u)
            k = getattr(block, "lm_k", None)
            u = act(s + f) if k is None else act((1 - k) * s + k * prev + f)
            prev = s
        model.stage_names = ("layer1",)  # instance attribute: run the first stage only
        got = model._forward_stages(stem)
    torch.testing.assert_close(got, u, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tsc", [None, "lstm", "indp"])
@pytest.mark.parametrize("preact", [True, False])
def test_k_and_dt_get_gradients(tsc, preact):
    model = models.cifar_lm_resnet(20, preact=preact, tsc=tsc).train()
    model(small_input(4)).sum().backward()
    for name, k in ((n, p) for n, p in model.named_parameters() if n.endswith("lm_k")):
        assert k.grad is not None and k.grad.abs() > 0, name
    if tsc:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.tsc_controller.parameters())


@pytest.mark.parametrize("preact", [True, False])
@pytest.mark.parametrize("mode", ["lstm", "2fc"])
def test_fold_gives_plain_lm_resnet(preact, mode):
    model = models.cifar_lm_resnet(20, preact=preact, tsc=mode, stochastic_depth=0.5)
    assert isinstance(model, models.TSCCIFARLMResNet) and model.tsc_mode == mode
    randomize(model)
    model.eval()
    x = small_input(3)
    ks = tsc_kernels.lm_coefficients(model)
    with torch.no_grad():
        want = model(x)
        folded = tsc_kernels.fold(model)
        got = folded(x)
    assert type(folded) is models.CIFARLMResNet
    assert tsc_kernels.lm_coefficients(folded) == ks, "fold keeps k_n"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    plain = models.cifar_lm_resnet(20, preact=preact, stochastic_depth=0.5)
    assert set(folded.state_dict()) == set(plain.state_dict())


def test_convert_plain_lm_resnet():
    model = models.cifar_lm_resnet(20)
    ks = tsc_kernels.lm_coefficients(model)
    tsc_kernels.convert(model, mode="indp")
    assert isinstance(model, models.TSCCIFARLMResNet)
    assert tsc_kernels.lm_coefficients(model) == ks
    dts = tsc_kernels.step_sizes(model)
    assert len(dts) == 9 and all(torch.allclose(d, torch.full_like(d, 0.5)) for d in dts.values())


def test_lm_coefficients_rejects_other_models():
    with pytest.raises(TypeError, match="lm_coefficients needs an LM network"):
        tsc_kernels.lm_coefficients(models.cifar_resnet(20, tsc=None))


@pytest.mark.parametrize("value, exc", [(1.5, ValueError), (0.0, ValueError), ("0.5", TypeError), (True, TypeError)])
def test_bad_stochastic_depth(value, exc):
    with pytest.raises(exc, match="stochastic_depth"):
        models.cifar_lm_resnet(20, stochastic_depth=value)


def test_backends_agree_on_a_training_step():
    """cpu (C++ kernels) and torch (reference) give the same loss and update (same masks: the
    Bernoulli draws happen in the model, before any backend runs)."""
    backends = [b for b in ("cpu", "torch") if b in tsc_kernels.available_backends("cpu")]
    if len(backends) < 2:
        pytest.skip("the C++ extension is not built")
    base = models.cifar_lm_resnet(20, tsc="lstm", stochastic_depth=0.5)
    x, y = small_input(4), torch.tensor([0, 1, 2, 3])
    results = {}
    for b in backends:
        model = copy.deepcopy(base).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(5)
        with tsc_kernels.use_backend(b):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
        opt.step()
        results[b] = (loss.detach(), {n: p.detach().clone() for n, p in model.named_parameters()})
    (l0, p0), (l1, p1) = results.values()
    torch.testing.assert_close(l0, l1, atol=1e-5, rtol=1e-5)
    for n in p0:
        torch.testing.assert_close(p0[n], p1[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("builder", ["lm_resnet18", "lm_resnet50"])
def test_torchvision_lm_builders(builder):
    model = getattr(models, builder)(num_classes=5)
    plain = getattr(models, builder.replace("lm_", ""))(tsc=None, num_classes=5)
    ks = tsc_kernels.lm_coefficients(model)
    # every stage's first block (and any projecting block) is Euler: layers [2,2,2,2] / [3,4,6,3]
    blocks = [len(getattr(model, n)) for n in model.stage_names]
    assert len(ks) == sum(blocks) - 4
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters()) + len(ks)
    model.eval()
    with torch.no_grad():
        assert model(small_input(1, 32)).shape == (1, 5)


def test_torchvision_lm_resnet_tsc_fold():
    model = models.lm_resnet18(tsc="lstm", num_classes=4, stochastic_depth=0.8)
    assert isinstance(model, models.TSCLMResNet)
    randomize(model)
    model.eval()
    x = small_input(2, 32)
    with torch.no_grad():
        want = model(x)
        folded = tsc_kernels.fold(model)
        got = folded(x)
    assert type(folded) is models.LMResNet
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
