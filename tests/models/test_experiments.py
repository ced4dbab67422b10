"""tsc-experiment (issue 11): plumbing on a tiny budget, fixed step sizes, 1-D ResNets, bad input, and
the fused (cpu) and torch backends training alike.

Every test is small (8x8 digits, one epoch, one seed): the experiments' numbers come from the full run
(docs/experiments.md), not from here.
"""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn", reason="experiments extra (scikit-learn) not installed")
pytest.importorskip("mnist1d", reason="experiments extra (mnist1d) not installed")

import tsc_kernels  # noqa: E402
from tsc_kernels import diagnostics, models  # noqa: E402
from tsc_kernels.convert import convert  # noqa: E402
from tsc_kernels.experiments import cli, data, registry, report as report_mod, training  # noqa: E402
from tsc_kernels.fold import fold  # noqa: E402
from tsc_kernels.nn import TSCController  # noqa: E402
from tsc_kernels.profiling import kernel_names  # noqa: E402
from conftest import TEST_BACKENDS  # noqa: E402


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def randomise_batchnorm(model, seed=0):
    """Non-trivial γ, β and running statistics, so that folding Δt into them is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                for t, lo in ((m.weight, 0.5), (m.running_var, 0.5)):
                    t.copy_(lo + torch.rand(t.shape, generator=g))
                for t in (m.bias, m.running_mean):
                    t.copy_(0.2 * torch.randn(t.shape, generator=g))
    return model


# --------------------------------------------------------------------------------------------------
# CLI plumbing
# --------------------------------------------------------------------------------------------------
def test_all_quick_writes_json_and_plots(tmp_path, one_thread):
    out = tmp_path / "plots"
    path = tmp_path / "r" / "results.json"
    rc = cli.main(["all", "--quick", "--epochs", "1", "--seeds", "1", "--datasets", "digits",
                   "--variants", "plain,tsc_lstm,dt=0.01", "--json", str(path), "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads(path.read_text())
    for field in ("command", "machine", "versions", "budget", "results", "plots", "wall_s", "backend"):
        assert field in report, field
    assert torch.__version__.startswith(report["versions"]["torch"].split("+")[0])
    assert report["machine"]["torch_threads"] == 1
    assert set(report["results"]) == {"accuracy", "noise", "depth", "stepsizes", "trajectory", "ode"}
    acc = report["results"]["accuracy"]["digits"]
    assert acc["model"] == "cifar_resnet8" and acc["epochs"] == 1
    assert list(acc["variants"]) == ["plain", "tsc_lstm", "dt=0.01"]
    for row in acc["variants"].values():
        assert 0.0 <= row["test_acc"]["mean"] <= 1.0 and len(row["test_acc"]["values"]) == 1
        assert row["test_acc"]["std"] == 0.0 and len(row["train_loss_curves"][0]) == 1
    noise = report["results"]["noise"]["digits"]
    assert noise["sigmas"][0] == 0.0
    # σ = 0 is the clean test set: the noise experiment reproduces the accuracy experiment
    assert noise["variants"]["tsc_lstm"]["test_acc"][0]["mean"] == acc["variants"]["tsc_lstm"]["test_acc"]["mean"]
    depth = report["results"]["depth"]["digits"]
    assert list(depth["variants"]) == ["plain", "tsc_lstm"] and depth["depths"] == [8, 20]
    steps = report["results"]["stepsizes"]["digits"]["variants"]
    assert set(steps) == {"tsc_lstm", "dt=0.01"}
    assert [b["block"] for b in steps["tsc_lstm"]["blocks"]] == ["layer1.0", "layer2.0", "layer3.0"]
    assert all(b["mean"]["mean"] == pytest.approx(0.01) for b in steps["dt=0.01"]["blocks"])
    assert steps["dt=0.01"]["evolution_time"]["layer1"]["mean"] == pytest.approx(0.01)
    assert all(b["mean"] > 1.0 for b in steps["tsc_lstm"]["stability_bound"].values())
    odes = report["results"]["ode"]
    assert list(odes["xor"]["models"]) == ["2", "16"] and odes["xor"]["eval_steps"] == [1, 2, 4, 16]
    adapt = odes["adaptation"]["digits"]["variants"]
    assert adapt["euler h=1/8"]["final_steps"] == [8] and adapt["euler h=1"]["decisions"] == []
    assert len(adapt["adaptive from h=1"]["decisions"][0]) == 23 // 5  # 23 iterations (1437 / 64), one decision every 5
    consistency = odes["consistency"]["digits"]
    # quick: both settings are depth 8, 1 epoch
    assert consistency["factors"] == [1, 2, 4] and len(consistency["runs"]) == 1
    assert list(consistency["runs"][0]["variants"]) == ["plain", "tsc_lstm", "dt=0.01"]
    # factor 1 is the model itself, and the depth experiment's model of the same depth and epochs (reused)
    assert consistency["runs"][0]["variants"]["plain"][0]["mean"] == depth["variants"]["plain"][0]["test_acc"]["mean"]
    pngs = ["accuracy.png", "depth.png", "noise.png", "ode.png", "stepsizes.png", "trajectory.png"]
    assert sorted(p.name for p in out.iterdir()) == pngs
    for p in out.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.stat().st_size < 150_000
    text = report_mod.markdown(report)  # docs/experiments.md's tables
    for section in ("### accuracy", "### noise", "### depth", "### stepsizes", "| `tsc_lstm` |", "T layer1", "### ode",
                    "**XOR toy**", "| `adaptive from h=1` |"):
        assert section in text
    again = report_mod.replot(report, str(tmp_path / "again"))  # plots drawn from the JSON alone
    assert sorted(p.rsplit("/", 1)[1] for p in again) == pngs


def test_subcommand_on_mnist1d_is_deterministic(tmp_path):
    args = ["accuracy", "--quick", "--epochs", "1", "--datasets", "mnist1d", "--variants", "tsc_indp", "--no-progress"]
    results = []
    for i in range(2):
        path = tmp_path / f"{i}.json"
        cli.main(args + ["--json", str(path)])
        results.append(json.loads(path.read_text())["results"])
    assert set(results[0]) == {"accuracy"}
    row = results[0]["accuracy"]["mnist1d"]["variants"]["tsc_indp"]
    assert results[0]["accuracy"]["mnist1d"]["model"].startswith("resnet1d8")
    assert row["test_acc"]["values"] == results[1]["accuracy"]["mnist1d"]["variants"]["tsc_indp"]["test_acc"]["values"]
    assert row["train_loss_curves"] == results[1]["accuracy"]["mnist1d"]["variants"]["tsc_indp"]["train_loss_curves"]


def test_report_merges_runs_of_different_datasets():
    a = {"datasets": ["digits"], "machine": {"cpu_count": 2}, "results": {"accuracy": {"digits": {"x": 1}}}}
    b = {"datasets": ["mnist1d"], "machine": {"cpu_count": 2}, "results": {"accuracy": {"mnist1d": {"x": 2}},
                                                                             "noise": {"mnist1d": {"y": 3}}}}
    m = report_mod.merge([a, b])
    assert m["results"] == {"accuracy": {"digits": {"x": 1}, "mnist1d": {"x": 2}}, "noise": {"mnist1d": {"y": 3}}}
    assert m["datasets"] == ["digits", "mnist1d"] and [r["datasets"] for r in m["runs"]] == [["digits"], ["mnist1d"]]
    with pytest.raises(ValueError, match="different data sets for each subcommand: accuracy on"):
        report_mod.merge([a, a])
    # another subcommand on the same data set joins (ode run after `all`)
    c = {"datasets": ["digits"], "results": {"ode": {"xor": {"z": 4}, "consistency": {"digits": {"w": 5}}}}}
    d = {"datasets": ["mnist1d"], "results": {"ode": {"xor": {"z": 6}, "consistency": {"mnist1d": {"w": 7}}}}}
    m = report_mod.merge([a, b, c, d])
    assert m["datasets"] == ["digits", "mnist1d"] and len(m["runs"]) == 4
    assert m["results"]["ode"] == {"xor": {"z": 4}, "consistency": {"digits": {"w": 5}, "mnist1d": {"w": 7}}}


def test_registry_holds_the_subcommands_and_rejects_duplicates():
    subs = cli.discover()
    assert list(subs) == ["accuracy", "noise", "depth", "stepsizes", "trajectory", "ode"]
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.Subcommand("accuracy", "again", lambda ctx: {}))
    with pytest.raises(ValueError, match="reserved"):
        registry.register(registry.Subcommand("all", "x", lambda ctx: {}))
    with pytest.raises(TypeError, match="Subcommand"):
        registry.register("noise")


@pytest.mark.parametrize("argv, message", [
    (["nope"], "invalid choice: 'nope'"),
    ([], "required"),
    (["accuracy", "--variants", "plain,resnet"], "unknown variant 'resnet'"),
    (["accuracy", "--datasets", "cifar10"], "unknown dataset 'cifar10'"),
    (["accuracy", "--variants", ","], "empty list"),
    (["depth", "--seeds", "0"], "positive integer"),
    (["noise", "--epochs", "two"], "positive integer"),
    (["accuracy", "--arch", "vgg"], "invalid choice"),
    (["accuracy", "--arch", "densenet"], "needs --datasets digits"),
    (["accuracy", "--arch", "densenet", "--datasets", "digits,mnist1d_hard"], "needs --datasets digits"),
    (["accuracy", "--recipe", "adam"], "invalid choice: 'adam'"),
    (["all", "--skip", "ode,nope"], "unknown subcommand 'nope'"),
    (["accuracy", "--skip", "ode"], "unrecognized arguments: --skip"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_dataset_and_variant_names():
    with pytest.raises(ValueError, match="dataset must be one of digits, mnist1d"):
        data.load("cifar10")
    with pytest.raises(ValueError, match="variant must be one of"):
        training.build_model("digits", "tsc_gru", 8)
    with pytest.raises(ValueError, match="dataset must be one of"):
        training.build_model("imagenet", "plain", 8)
    with pytest.raises(ValueError, match="arch must be one of"):
        training.build_model("digits", "plain", 8, arch="vgg")
    with pytest.raises(ValueError, match="digits only"):
        training.build_model("mnist1d", "plain", 8, arch="lm_resnet")
    with pytest.raises(ValueError, match="digits only"):
        training.build_model("mnist1d_hard", "plain", 8, arch="densenet")
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.family("mnist2d")
    with pytest.raises(ValueError, match="needs an MNIST-1D data set"):
        data.mnist1d_args("digits_small")
    with pytest.raises(ValueError, match="recipe must be one of paper, ctrl_nowd"):
        training.param_groups(models.cifar_resnet(8, in_channels=1), "no_wd")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        training.param_groups([torch.zeros(1)])


@pytest.mark.parametrize("arch, cls, depth", [("lm_resnet", "CIFARLMResNet", 8), ("densenet", "CIFARDenseNet", 40)])
def test_arch_trains_the_new_models_on_digits(arch, cls, depth, tmp_path, one_thread):
    """--arch: the accuracy runs use LM-ResNets (the budget's depth) / DenseNet-40 (TSC and fixed Δt variants too), the
    depth experiment stays on ResNets."""
    path = tmp_path / "r.json"
    assert cli.main(["accuracy", "--quick", "--epochs", "1", "--datasets", "digits", "--variants", "plain,dt=0.01",
                     "--arch", arch, "--json", str(path), "--no-progress"]) == 0
    report = json.loads(path.read_text())
    assert report["arch"] == arch and report["results"]["accuracy"]["digits"]["model"].startswith(
        f"cifar_{arch}{depth}"
    )
    args = cli.build_parser(cli.discover()).parse_args(["accuracy", "--arch", arch, "--quick"])
    ctx = training.Context(args, cli.budget_mod.QUICK)
    assert ctx.key("digits", "plain", 0).arch == arch and ctx.key("digits", "plain", 0, depth=8).arch == "resnet"
    plain = training.build_model("digits", "plain", depth, arch=arch)
    fixed = training.build_model("digits", "dt=0.01", depth, arch=arch)
    assert type(plain).__name__ == cls and type(fixed).__name__ == "TSC" + cls
    assert all(float(dt.min()) == float(dt.max()) == pytest.approx(0.01)
               for dt in tsc_kernels.step_sizes(fixed.eval()).values())


def test_random_shift_moves_each_example_within_bounds():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 4, 4] = 1.0
    shifted = data.random_shift(x, 1, g)
    where = shifted.flatten(1).argmax(1)
    rows, cols = where // 8, where % 8
    assert shifted.sum() == 64 and rows.sub(4).abs().max() == 1 and cols.sub(4).abs().max() == 1
    assert len(set(zip(rows.tolist(), cols.tolist()))) == 9  # all nine offsets occur
    seq = torch.zeros(64, 1, 40)
    seq[:, :, 20] = 1.0
    pos = data.random_shift(seq, 2, g).argmax(-1).flatten()
    assert set(pos.tolist()) == {18, 19, 20, 21, 22}


# --------------------------------------------------------------------------------------------------
# fixed step sizes
# --------------------------------------------------------------------------------------------------
def manual_cifar_forward(model, x, dt):
    """The CIFAR ResNet with out = relu(shortcut + bn2(conv2(...)) * dt) written out in torch ops."""
    x = F.relu(model.bn1(model.conv1(x)))
    for stage in (model.layer1, model.layer2, model.layer3):
        for b in stage:
            f = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x)))))
            shortcut = x if b.downsample is None else b.downsample(x)
            x = F.relu(shortcut + f * dt)
    return model.fc(x.mean((2, 3)))


@pytest.mark.parametrize("dt", [0.01, 0.37, 1.0, 2.5])
@pytest.mark.parametrize("train", [False, True])
def test_fixed_dt_equals_manual_computation(dt, train):
    torch.manual_seed(0)
    model = randomise_batchnorm(models.cifar_resnet(14, in_channels=1, tsc="fixed", dt=dt))
    model.train(train)
    ref = copy.deepcopy(model)
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(model(x), manual_cifar_forward(ref, x, dt), atol=1e-5, rtol=1e-5)
    steps = diagnostics.step_sizes(model)
    assert len(steps) == 6 and all(torch.equal(s, torch.full((s.numel(),), dt)) for s in steps.values())
    assert diagnostics.evolution_time(model) == pytest.approx({"layer1": 2 * dt, "layer2": 2 * dt, "layer3": 2 * dt})


@pytest.mark.cpu_only
def test_fixed_dt_has_no_parameters_and_launches_no_controller():
    torch.manual_seed(0)
    plain = models.cifar_resnet(8, in_channels=1, tsc=None)
    model = convert(copy.deepcopy(plain), mode="fixed", dt=0.5)
    assert n_params(model) == n_params(plain)
    assert set(model.state_dict()) == set(plain.state_dict())  # no tsc_controller.* entries
    x = torch.randn(3, 1, 8, 8)

    def step():
        model(x).sum().backward()

    names = kernel_names(step)
    assert not [n for n in names if "weight_mean" in n or "lstm_controller" in n], names
    # Δt = 1 is the plain network
    torch.manual_seed(0)
    one = models.cifar_resnet(8, in_channels=1, tsc="fixed", dt=1.0).eval()
    torch.testing.assert_close(one(x), plain.eval()(x), atol=1e-6, rtol=1e-6)


def test_fixed_controller_module():
    ctrl = TSCController(12, 5, mode="fixed", dt=0.2)
    assert list(ctrl.parameters()) == [] and "dt=0.2" in repr(ctrl)
    torch.testing.assert_close(ctrl(torch.randn(3, 12)), torch.full((3, 5), 0.2))
    assert TSCController(12, 5, mode="fixed").dt == 1.0
    with pytest.raises(ValueError, match=r"wbar must have shape"):
        ctrl(torch.randn(3, 11))


@pytest.mark.parametrize("dt, exc, match", [
    (0.0, ValueError, "finite float > 0"), (-0.1, ValueError, "finite float > 0"),
    (float("nan"), ValueError, "finite float > 0"), (float("inf"), ValueError, "finite float > 0"),
    ("0.1", TypeError, "dt must be a float"), (True, TypeError, "dt must be a float"),
    (torch.tensor(0.1), TypeError, "dt must be a float"),
])
def test_fixed_dt_rejects_bad_values(dt, exc, match):
    for build in (lambda: models.cifar_resnet(8, tsc="fixed", dt=dt),
                  lambda: models.resnet1d(8, tsc="fixed", dt=dt),
                  lambda: models.resnet18(tsc="fixed", dt=dt),
                  lambda: convert(models.cifar_resnet(8, tsc=None), mode="fixed", dt=dt),
                  lambda: TSCController(4, 4, mode="fixed", dt=dt)):
        with pytest.raises(exc, match=match):
            build()


def test_dt_only_with_fixed_mode_and_modes_listed():
    with pytest.raises(ValueError, match="dt only applies to tsc mode 'fixed'"):
        models.cifar_resnet(8, tsc="lstm", dt=0.5)
    with pytest.raises(ValueError, match="dt only applies"):
        convert(models.resnet1d(8, tsc=None), mode="indp", dt=0.5)
    with pytest.raises(ValueError, match="'lstm', '2fc', 'indp', 'fixed' or None"):
        models.resnet1d(8, tsc="euler")
    with pytest.raises(ValueError, match="'lstm', '2fc', 'indp', 'fixed'"):
        convert(models.resnet1d(8, tsc=None), mode="Fixed")


# --------------------------------------------------------------------------------------------------
# 1-D ResNets
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, dt", [("lstm", None), ("2fc", None), ("indp", None), ("fixed", 0.3)])
def test_resnet1d_convert_fold_equivalence(mode, dt):
    torch.manual_seed(1)
    plain = randomise_batchnorm(models.resnet1d(14, num_classes=7, in_channels=2, width=6, tsc=None))
    model = convert(copy.deepcopy(plain), mode=mode, dt=dt)
    assert isinstance(model, models.TSCResNet1d) and isinstance(model.layer2[0], models.TSCBasicBlock1d)
    # move Δt away from its initial value with one training step (BatchNorm1d statistics too)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(6, 2, 33)  # odd length: strides 2 round down
    model(x).logsumexp(1).mean().backward()
    opt.step()
    model.eval()
    folded = fold(model)
    assert type(folded) is models.ResNet1d and type(folded.layer1[0]) is models.BasicBlock1d
    assert n_params(folded) == n_params(plain)
    assert set(folded.state_dict()) == set(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(folded.eval()(x), model(x), atol=1e-5, rtol=1e-5)
    dts = diagnostics.step_sizes(model)
    assert list(dts) == [f"layer{s}.{d}" for s in (1, 2, 3) for d in (0, 1)]
    assert [t.numel() for t in dts.values()] == [6, 6, 12, 12, 24, 24]
    assert math.isfinite(diagnostics.stability_bound(model)) and diagnostics.stability_bound(model) > 1.0
    bounds = diagnostics.stage_stability_bounds(model)
    assert math.prod(bounds.values()) == pytest.approx(diagnostics.stability_bound(model), rel=1e-9)


def test_resnet1d_lstm_controller_shapes_and_gradients():
    torch.manual_seed(0)
    model = models.resnet1d(20, width=8)  # tsc="lstm" by default
    # w̄ of a 1-D basic block: conv1 then conv2, each C_out · k = 3C values
    assert [c.in_features for c in model.tsc_controller.stages] == [2 * 3 * 8, 2 * 3 * 16, 2 * 3 * 32]
    assert [c.hidden for c in model.tsc_controller.stages] == [2, 4, 8]
    model(torch.randn(4, 1, 40)).sum().backward()
    assert model.tsc_controller.stages[0].fc_in.weight.grad.abs().sum() > 0
    assert model.layer1[0].conv1.weight.grad is not None


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"depth": 21}, ValueError, "6n\\+2"), ({"depth": 8, "width": 0}, ValueError, "width must be >= 1"),
    ({"depth": 8, "in_channels": 1.0}, TypeError, "in_channels must be an int"),
    ({"depth": 8, "num_classes": 0}, ValueError, "num_classes"),
])
def test_resnet1d_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        models.resnet1d(**kwargs)


def test_cifar_resnet_in_channels():
    assert models.cifar_resnet(8, in_channels=1).conv1.weight.shape[1] == 1
    with pytest.raises(ValueError, match="in_channels must be >= 1"):
        models.cifar_resnet(8, in_channels=0)


# --------------------------------------------------------------------------------------------------
# Training: fused and reference backends give the same loss curve
# --------------------------------------------------------------------------------------------------
def loss_curve(backend_name, dtype, steps=50):
    ds = data.load("digits")
    torch.manual_seed(0)
    model = models.cifar_resnet(14, in_channels=1).to(dtype)  # TSC_LSTM, 2 blocks per stage
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    losses = []
    with tsc_kernels.use_backend(backend_name):
        for _ in range(steps):
            idx = torch.randint(0, len(ds.x_train), (32,), generator=gen)
            loss = F.cross_entropy(model(ds.x_train[idx].to(dtype)), ds.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.skipif("cpu" not in TEST_BACKENDS, reason="the C++ extension (cpu backend) is not built")
def test_fused_and_torch_backends_train_alike(one_thread):
    """50 SGD steps of a TSC ResNet-14 on digits: the fused C++ ops and the reference give one loss curve.

    fp64: equal to rounding over all 50 steps. fp32: rounding-order differences (~1e-7) are amplified
    by training (measured: <= 2e-6 up to step 30, ~1e-2 by step 50, the same size as changing the
    thread count or the batch order would cause), so fp32 is compared over the first 25 steps.
    """
    fused64, ref64 = loss_curve("cpu", torch.float64), loss_curve("torch", torch.float64)
    torch.testing.assert_close(fused64, ref64, atol=1e-10, rtol=1e-10)
    fused, ref = loss_curve("cpu", torch.float32), loss_curve("torch", torch.float32)
    torch.testing.assert_close(fused[:25], ref[:25], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused, fused64, atol=0.1, rtol=0.1)  # fp32 stays on the fp64 trajectory's scale
    for curve in (fused64, fused):
        assert curve[-5:].mean() < 0.25 * curve[:5].mean()  # the loss falls (2.1 -> ~0.2)


# --------------------------------------------------------------------------------------------------
# ode experiment pieces (the results come from the run, docs/experiments.md)
# --------------------------------------------------------------------------------------------------
def test_xor_data_and_solved_with_restores_the_solver():
    from tsc_kernels.experiments import ode as ode_exp

    x, y = ode_exp.xor_data(200, torch.Generator().manual_seed(0))
    assert x.shape == (200, 2) and x.abs().max() <= 1
    assert torch.equal(y, (x[:, 0] * x[:, 1] < 0).long())  # XOR of the signs
    model = ode_exp.xor_model(2)
    with ode_exp.solved_with(model, 7, "rk4"):
        assert model[0].steps == 7 and model[0].solver == "rk4"
    assert model[0].steps == 2 and model[0].solver == "euler"


def test_ode_summarises_seeds_whose_adapted_steps_differ(tmp_path, one_thread):
    """Two seeds: every result is a mean ± std over both, also where the step adaptation ended at
    different step sizes (the RK4 test at each model's own steps is one summary, not keyed by steps)."""
    path = tmp_path / "ode.json"
    assert cli.main(["ode", "--quick", "--seeds", "2", "--datasets", "digits", "--variants", "plain",
                     "--json", str(path), "--no-progress"]) == 0
    res = json.loads(path.read_text())["results"]["ode"]
    for row in [*res["xor"]["models"].values(), *res["adaptation"]["digits"]["variants"].values()]:
        assert len(row["rk4_own"]["values"]) == len(row["rk4_fine"]["values"]) == 2
        assert all(len(a["values"]) == 2 for a in row["euler"].values())
    assert [list(r["variants"]) for r in res["consistency"]["digits"]["runs"]] == [["plain"], ["plain"]]
    assert "| `adaptive from h=1` |" in report_mod.ode(res)


def test_fit_calls_on_step_once_per_optimiser_step(one_thread):
    ds = data.load("digits").subset(130, None)  # 3 batches of 64, the last of 2
    torch.manual_seed(0)
    model = training.build_model("digits", "plain", 8)
    seen = []
    losses = training.fit(model, ds, 2, 64, 0, on_step=lambda m, x, y: seen.append((m is model, len(x), len(y))))
    assert len(losses) == 2 and seen == [(True, 64, 64), (True, 64, 64), (True, 2, 2)] * 2


# --------------------------------------------------------------------------------------------------
# issue 24: the Δt = 0.5 control, harder data, paired statistics, Δt trajectories, the recipe variant
# --------------------------------------------------------------------------------------------------
def test_paired_statistics_on_a_hand_worked_example():
    """Differences 1, 2, 3, 4, 5: mean 3, sd sqrt(2.5), se sqrt(0.5), t = 3 / sqrt(0.5) = 4.2426; with
    t_0.975(4) = 2.7764 (tables) the 95 % interval is 3 ± 1.9632; two-sided p = 0.01324."""
    from tsc_kernels.experiments.stats import paired

    b = [0.5, -1.0, 2.0, 0.0, 10.0]  # any b: only the differences matter
    a = [x + d for x, d in zip(b, [1, 2, 3, 4, 5])]
    c = paired(a, {"values": b})  # a summary dict works too
    assert c["n"] == 5 and c["wins"] == 5 and c["diff"]["values"] == pytest.approx([1, 2, 3, 4, 5])
    assert c["diff"]["mean"] == pytest.approx(3.0) and c["diff"]["std"] == pytest.approx(math.sqrt(2.5))
    assert c["t"] == pytest.approx(4.242641, rel=1e-6)
    assert c["ci_t"] == pytest.approx([3 - 1.963243, 3 + 1.963243], abs=1e-5)
    assert c["p"] == pytest.approx(0.013236, abs=1e-5)
    lo, hi = c["ci_boot"]  # resampled means of five values in 1..5: inside the t interval here, around 3
    assert 1.0 <= lo < 3.0 < hi <= 5.0 and c["ci_boot"] == paired(a, b)["ci_boot"]  # seeded: repeatable
    noisy = [0.013, -0.002, 0.021, 0.007, 0.004]  # seeded: another seed resamples differently
    assert paired(noisy, [0] * 5, seed=1)["ci_boot"] != paired(noisy, [0] * 5)["ci_boot"]
    flipped = paired(b, a)
    assert flipped["t"] == pytest.approx(-c["t"]) and flipped["p"] == pytest.approx(c["p"]) and flipped["wins"] == 0
    assert flipped["ci_t"] == pytest.approx([-c["ci_t"][1], -c["ci_t"][0]])
    # no spread: no t statistic, a degenerate bootstrap interval; one seed: nothing but the difference
    same = paired([0.9, 0.8, 0.7], [0.8, 0.7, 0.6])
    assert same["t"] is same["p"] is same["ci_t"] is None and same["ci_boot"] == pytest.approx([0.1, 0.1])
    one = paired([0.9], [0.8])
    assert one["diff"]["mean"] == pytest.approx(0.1) and one["ci_boot"] is one["ci_t"] is None
    json.dumps(same, allow_nan=False)  # JSON-safe
    with pytest.raises(ValueError, match="paired by seed"):
        paired([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="paired by seed"):
        paired([], [])
    with pytest.raises(ValueError, match="confidence"):
        paired([1, 2], [0, 0], confidence=95)
    with pytest.raises(ValueError, match="n_boot"):
        paired([1, 2], [0, 0], n_boot=0)
    with pytest.raises(TypeError, match="sequences of numbers"):
        paired(3, [1])


def test_comparisons_take_the_pairs_present():
    from tsc_kernels.experiments.stats import comparisons

    values = {"plain": [0.9, 0.8], "tsc_lstm": [0.95, 0.82], "dt=0.5": [0.9, 0.81]}
    c = comparisons(values)
    assert list(c) == ["tsc_lstm - plain", "tsc_lstm - dt=0.5", "dt=0.5 - plain"]  # no tsc_indp: its pair is left out
    assert c["tsc_lstm - plain"]["diff"]["values"] == pytest.approx([0.05, 0.02])


def test_harder_data_passes_the_generator_arguments_through(monkeypatch):
    import mnist1d.data

    seen = []

    def fake_make_dataset(args):
        seen.append(dict(vars(args)) if not isinstance(args, dict) else dict(args))
        n_train = int(args.num_samples * args.train_split)
        x = torch.randn(args.num_samples, 40).numpy()
        y = (torch.arange(args.num_samples) % 10).numpy()
        return {"x": x[:n_train], "x_test": x[n_train:], "y": y[:n_train], "y_test": y[n_train:]}

    data.load.cache_clear()
    monkeypatch.setattr(mnist1d.data, "make_dataset", fake_make_dataset)
    try:
        hard = data.load("mnist1d_hard")
    finally:
        data.load.cache_clear()  # later tests must get the real data
    assert len(seen) == 1
    for k, v in data.MNIST1D_ARGS["mnist1d_hard"].items():
        assert seen[0][k] == v, k
    assert seen[0]["seed"] == 42 and seen[0]["final_seq_length"] == 40  # the package's defaults elsewhere
    assert hard.family == "mnist1d" and hard.max_shift == 2
    assert data.spec("mnist1d_hard")["args"]["iid_noise_scale"] == data.MNIST1D_ARGS["mnist1d_hard"]["iid_noise_scale"]
    # the hard setting is harder than the default on every argument it changes
    default = data.mnist1d_args("mnist1d")
    over = data.MNIST1D_ARGS["mnist1d_hard"]
    assert over["num_samples"] * over["train_split"] < default["num_samples"] * default["train_split"]
    assert all(over[k] > default[k] for k in ("iid_noise_scale", "corr_noise_scale", "shear_scale") if k in over)


def test_harder_data_sizes():
    small = data.load("digits_small")
    assert (len(small.x_train), len(small.x_test)) == (359, 1438) and small.family == "digits"
    assert set(small.y_train.tolist()) == set(range(10))  # stratified: every class in the small training set
    hard = data.load("mnist1d_hard")
    n = data.MNIST1D_ARGS["mnist1d_hard"]["num_samples"]
    assert len(hard.x_train) == round(n * data.MNIST1D_ARGS["mnist1d_hard"]["train_split"]) and \
        len(hard.x_train) + len(hard.x_test) == n
    assert hard.x_train.shape[1:] == (1, 40)
    assert training.model_name("mnist1d_hard", 20).startswith("resnet1d20")
    assert isinstance(training.build_model("digits_small", "plain", 8), models.CIFARResNet)


def test_fixed_half_has_no_controller_parameters_and_dt_exactly_half():
    torch.manual_seed(0)
    half = training.build_model("digits", "dt=0.5", 8)
    plain = training.build_model("digits", "plain", 8)
    assert training.controller_parameters(half) == [] and n_params(half) == n_params(plain)
    assert [g["name"] for g in training.param_groups(half, "ctrl_nowd")] == ["network"]
    dts = diagnostics.step_sizes(half)
    assert len(dts) == 3 and all(torch.equal(d, torch.full_like(d, 0.5)) for d in dts.values())
    assert "dt=0.5" in cli.build_parser(cli.discover()).parse_args(["depth"]).variants
    from tsc_kernels.experiments import depth as depth_exp
    assert depth_exp.DEPTH_VARIANTS == ("plain", "tsc_lstm", "dt=0.5", "tsc_indp")


@pytest.mark.parametrize("variant", ["tsc_lstm", "tsc_indp"])
def test_ctrl_nowd_takes_weight_decay_off_the_controller_only(variant):
    torch.manual_seed(0)
    model = training.build_model("digits", variant, 8)
    ctrl = {id(p) for p in model.tsc_controller.parameters()}
    assert ctrl
    for recipe, ctrl_wd in (("paper", 1e-4), ("ctrl_nowd", 0.0)):
        groups = training.make_optimizer(model, 0.1, recipe).param_groups
        assert [g["name"] for g in groups] == ["network", "controller"]
        assert {id(p) for p in groups[1]["params"]} == ctrl
        assert [id(p) for g in groups for p in g["params"]] == [id(p) for p in model.parameters()] or \
            sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in model.parameters())
        assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == ctrl_wd
    # and the optimiser really applies it: one step with zero gradients moves only decayed parameters
    for recipe in ("paper", "ctrl_nowd"):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p in m.parameters():
                p.fill_(1.0)
        opt = training.make_optimizer(m, 0.1, recipe)
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        c = next(iter(m.tsc_controller.parameters()))
        conv = m.layer1[0].conv1.weight
        assert torch.allclose(conv, torch.full_like(conv, 1 - 0.1 * 1e-4 * 1.9))  # Nesterov: lr·wd·(1 + momentum)
        expected = 1.0 if recipe == "ctrl_nowd" else 1 - 0.1 * 1e-4 * 1.9
        assert torch.allclose(c, torch.full_like(c, expected)), recipe


def test_dt_trajectory_is_recorded_every_epoch(one_thread):
    key = training.RunKey("digits", "tsc_indp", 8, 0, 3, 130, 64)
    run = training.train(key)
    traj = run.dt_trajectory
    assert traj["blocks"] == ["layer1.0", "layer2.0", "layer3.0"]
    assert len(traj["mean"]) == len(traj["std"]) == 4 and all(len(row) == 3 for row in traj["mean"])  # init + 3 epochs
    assert traj["mean"][0] == [0.5, 0.5, 0.5]  # indp: θ = 0 at initialisation
    final = diagnostics.step_sizes(run.model)
    assert traj["mean"][-1] == pytest.approx([float(d.double().mean()) for d in final.values()])
    assert traj["mean"][1] != traj["mean"][0]  # it is read after each epoch, not copied
    assert training.train(training.RunKey("digits", "plain", 8, 0, 1, 130, 64)).dt_trajectory is None
    nowd = training.train(training.RunKey("digits", "tsc_indp", 8, 0, 3, 130, 64, recipe="ctrl_nowd"))
    assert nowd.dt_trajectory["mean"][0] == traj["mean"][0] and nowd.dt_trajectory["mean"][-1] != traj["mean"][-1]


def test_quick_run_of_the_controls_on_harder_data(tmp_path, one_thread):
    """accuracy, noise, depth and trajectory with the issue-24 controls on digits_small, 2 seeds: every
    comparison is there, paired by seed, and the report prints the tables."""
    path = tmp_path / "r.json"
    assert cli.main(["all", "--quick", "--skip", "ode,stepsizes", "--seeds", "2", "--epochs", "1", "--datasets",
                     "digits_small", "--variants", "plain,tsc_lstm,tsc_indp,dt=0.5", "--json", str(path),
                     "--no-progress"]) == 0
    report = json.loads(path.read_text())
    res = report["results"]
    assert list(res) == ["accuracy", "noise", "depth", "trajectory"] and report["recipe"] == "paper"
    acc = res["accuracy"]["digits_small"]
    assert acc["train_size"] == 359 and acc["test_size"] == 1438 and acc["data"]["test_size"] == 0.8
    cmp = acc["comparisons"]["test_acc"]
    assert list(cmp) == ["tsc_lstm - plain", "tsc_lstm - dt=0.5", "tsc_lstm - tsc_indp", "dt=0.5 - plain"]
    v = acc["variants"]
    for pair, c in cmp.items():
        a, b = pair.split(" - ")
        assert c["diff"]["values"] == pytest.approx([x - y for x, y in zip(v[a]["test_acc"]["values"],
                                                                            v[b]["test_acc"]["values"])])
    assert len(v["tsc_lstm"]["dt_trajectories"]) == 2 and "dt_trajectories" not in v["plain"]
    depth = res["depth"]["digits_small"]
    assert list(depth["variants"]) == ["plain", "tsc_lstm", "dt=0.5", "tsc_indp"] and len(depth["comparisons"]) == 1
    assert len(res["noise"]["digits_small"]["comparisons"]) == len(res["noise"]["digits_small"]["sigmas"])
    traj = res["trajectory"]["digits_small"]
    assert list(traj["variants"]) == ["tsc_lstm", "tsc_indp"]
    for by_recipe in traj["variants"].values():
        assert list(by_recipe) == ["paper", "ctrl_nowd"]
        assert len(by_recipe["paper"]["mean"]) == 2 and len(by_recipe["paper"]["per_seed"]) == 2  # init + 1 epoch
    # the paper-recipe trajectory is the accuracy experiment's run (shared), seed by seed
    assert traj["variants"]["tsc_lstm"]["paper"]["per_seed"] == v["tsc_lstm"]["dt_trajectories"]
    assert list(traj["comparisons"]["tsc_indp"]) == ["ctrl_nowd - paper"]
    text = report_mod.markdown(report)
    for needle in ("| `tsc_lstm - dt=0.5` |", "95 % CI (t)", "### trajectory", "| `tsc_indp` | ctrl_nowd |",
                   "test_size=0.8", "| 8 | `dt=0.5 - plain` |"):
        assert needle in text, needle
