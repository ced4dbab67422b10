"""tsc-bench, the main job: end to end in --quick mode, and its compute figures (paper convention)."""
import json

import pytest
import torch

from tsc_kernels import bench, models
from tsc_kernels.ops.weight_mean import reference as weight_mean_reference

FIELDS = {"variant", "backend", "params_train", "params_infer", "gmac_train", "gmac_infer", "step_ms", "step_iqr_ms",
          "kernels", "peak_mb", "infer_ms", "overhead_time_pct", "overhead_kernels_pct", "step_times_ms", "mode"}


def test_cli_quick_end_to_end(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert (
        bench.main(["--model", "cifar_resnet20", "--batch", "4", "--quick", "--steps", "2", "--json", str(path)]) == 0
    )
    table = capsys.readouterr().out
    for variant in ("plain", "tsc-eager", "tsc-fused"):
        assert variant in table
    data = json.loads(path.read_text())
    assert {"torch", "platform", "backends", "triton"} <= set(data["machine"])
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"plain", "tsc-eager", "tsc-fused"}
    for r in rows.values():
        assert set(r) == FIELDS
        assert r["step_ms"] > 0 and r["kernels"] > 0 and r["peak_mb"] > 0 and r["infer_ms"] > 0
        assert len(r["step_times_ms"]) == 2
    plain, eager, fused = rows["plain"], rows["tsc-eager"], rows["tsc-fused"]
    assert plain["overhead_time_pct"] is None
    # the controllers are trained, then folded away: inference is the plain network
    assert eager["params_train"] == fused["params_train"] > plain["params_train"]
    assert eager["params_infer"] == fused["params_infer"] == plain["params_infer"]
    assert fused["gmac_infer"] == pytest.approx(plain["gmac_infer"])
    assert eager["backend"] == "torch"
    # fusing removes kernels: the fused TSC step launches fewer than the eager one
    assert fused["kernels"] < eager["kernels"]


@pytest.mark.parametrize("model", ["cifar_densenet40", "cifar_lm_resnet20"])
def test_new_model_families_run(model, capsys):
    """tsc-bench takes the DenseNet (head `classifier`, not `fc`) and LM-ResNet builders by name."""
    assert bench.main(["--model", model, "--batch", "2", "--quick", "--steps", "1"]) == 0
    table = capsys.readouterr().out
    assert model in table and "tsc-fused" in table


def test_compiled_rows_and_history(tmp_path, capsys):
    """--compile adds the three compiled variants (interleaved, same step); --history appends CSV rows."""
    history = tmp_path / "results" / "history.csv"
    argv = ["--model", "cifar_resnet8", "--batch", "2", "--quick", "--steps", "1", "--compile",
            "--compile-backend", "aot_eager", "--history", str(history)]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    for variant in ("plain-c", "tsc-ref-c", "tsc-auto-c"):
        assert variant in out
    assert "vs tsc-ref-c" in out
    assert bench.main(argv) == 0  # a second run appends below the first
    lines = history.read_text().splitlines()
    assert lines[0].split(",") == list(bench.HISTORY_FIELDS)
    assert len(lines) == 1 + 2 * 6
    modes = [line.split(",")[8] for line in lines[1:7]]
    assert modes == ["eager"] * 3 + ["compiled"] * 3


@pytest.mark.parametrize("name, gmac", [("resnet18", 1.81), ("resnet50", 4.09)])
def test_gmacs_follow_the_paper_convention(name, gmac):
    model = getattr(models, name)(tsc=None).eval()
    assert bench.gmacs(model, torch.randn(1, 3, 224, 224)) == pytest.approx(gmac, rel=0.01)


def test_bad_arguments_are_reported():
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch", "0"])
    with pytest.raises(ValueError, match="--model must be"):
        bench.build_model("vgg16", None, None)


def test_overhead_is_the_median_of_per_round_ratios():
    # Round 3 caught the TSC step in a slow moment that the plain step of its round escaped: the
    # ratio of the medians would read +203 %, the per-round ratios say +1 %.
    plain = [100.0, 100.0, 100.0, 300.0, 300.0]
    tsc = [101.0, 101.0, 303.0, 303.0, 303.0]
    assert bench.paired_overhead_pct(tsc, plain) == pytest.approx(1.0)
    assert bench.paired_overhead_pct(plain, plain) == 0.0
    rows = [bench.Row("plain", "-", 1, 1, 0.1, 0.1, 200.0, 1.0, 10, 1.0, 1.0, step_times_ms=plain),
            bench.Row("tsc-fused", "cpu", 1, 1, 0.1, 0.1, 303.0, 1.0, 12, 1.0, 1.0, step_times_ms=tsc)]
    bench.add_overheads(rows)
    assert rows[1].overhead_time_pct == pytest.approx(1.0) and rows[1].overhead_kernels_pct == pytest.approx(20.0)
    with pytest.raises(ValueError, match="must pair up round by round"):
        bench.paired_overhead_pct(tsc[:4], plain)


def test_rounds_run_mode_by_mode_in_a_shuffled_order():
    """run_rounds: every variant once per round; the eager variants' rounds before the compiled
    variants' (no step right after one of the other mode); the order within a round varies from round
    to round (no variant always first, or always after the same one), the same in every run."""
    class Fake:
        def __init__(self, name, compiled):
            self.name, self.compiled = name, compiled

        def timed_step(self):
            log.append(self.name)

    def run():
        variants = [Fake(n, False) for n in "abcd"] + [Fake(n, True) for n in "XYZ"]
        log.clear()
        bench.run_rounds(variants, 12)
        return list(log)

    log = []
    first = run()
    assert first == run()  # seeded
    eager, compiled = first[:48], first[48:]
    rounds = [eager[i:i + 4] for i in range(0, 48, 4)] + [compiled[i:i + 3] for i in range(0, 36, 3)]
    assert all(sorted(r) == list("abcd") for r in rounds[:12]) and all(sorted(r) == list("XYZ") for r in rounds[12:])
    assert len({tuple(r) for r in rounds[:12]}) > 3 and len({r[0] for r in rounds[:12]}) > 2
    # each variant's predecessor varies too
    assert all(len({eager[i - 1] for i in range(1, 48) if eager[i] == v}) > 1 for v in "abcd")


def test_compiled_variants_keep_their_own_compiled_code():
    """Compiled variants whose networks share a class get a forward code object each, so that
    dynamo's entries (and their guard checks per call) are not shared between them: each pays for
    its own guards only, as a user's one compiled network does."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    torch._dynamo.reset()
    args = bench.parse_args(["--model", "cifar_resnet8", "--host-only", "--compile", "--compile-backend", "aot_eager"])
    variants = [bench.HostVariant(args, name, tsc, "auto", True)
                for name, tsc in (("plain-c", None), ("tsc-auto-c", "lstm"))]
    for v in variants:
        v.step(), v.step()
    assert type(variants[0].model).forward is type(variants[1].model).forward  # one class's forward
    assert not _debug_get_cache_entry_list(type(variants[0].model).forward.__code__)
    for v in variants:
        own = v.model.__dict__["forward"].__func__.__code__
        assert len(_debug_get_cache_entry_list(own)) == 1
    torch._dynamo.reset()


def test_host_rows_and_the_weight_passes(capsys):
    """--host-only: every host variant, interleaved; plain+pass is the plain step plus the passes
    TSC's controller makes over the conv weights (weight_mean before the forward, its backward in
    the same backward pass), on the weights the TSC network reads, with the plain step's result."""
    assert bench.main(["--model", "cifar_resnet8", "--host-only", "--host-steps", "2", "--quick"]) == 0
    out = capsys.readouterr().out
    for variant in ("plain", "tsc-fused", "tsc-fixed", "tsc-ref", "plain+pass", "tsc-leafdt"):
        assert f"\n{variant} " in out
    assert "tsc-fused vs plain+pass" in out and "tsc-fused vs tsc-leafdt" in out

    args = bench.parse_args(["--model", "cifar_resnet8", "--host-only"])
    v = bench.HostVariant(args, "plain+pass", None, "auto", False)
    tsc_model, _ = bench.build_model("cifar_resnet8", "lstm", None)
    names = {id(p): n for n, p in v.model.named_parameters()}
    want = [n for n, p in tsc_model.named_parameters()
            if any(p is w for s in tsc_model.controller_inputs() for ws in s for w in ws)]
    assert [names[id(w)] for w in v.passes] == want and len(want) == 6
    # the passes leave the step's result unchanged: w̄'s gradient is zero
    plain = bench.HostVariant(args, "plain", None, "auto", False)
    for a in (v, plain):
        a.opt.zero_grad(set_to_none=True)
    v.step(), plain.step()
    for (n, p), q in zip(v.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, msg=n)
    with torch.profiler.profile() as prof:
        v.step()
    assert {"tsc::weight_mean", "tsc::weight_mean_backward"} <= {e.name for e in prof.events()}


def test_leaf_step_sizes_replace_the_controller():
    """tsc-leafdt: the TSC network's blocks read their Δt from one leaf (the controller's values at
    build time), which its gradient reaches and the optimizer updates; the controller never runs."""
    args = bench.parse_args(["--model", "cifar_resnet8", "--host-only"])
    v = bench.HostVariant(args, "tsc-leafdt", "lstm", "auto", False)
    fused = bench.HostVariant(args, "tsc-fused", "lstm", "auto", False)
    leaf = v.opt.param_groups[-1]["params"][0]
    assert leaf.is_leaf and leaf.requires_grad
    torch.testing.assert_close(leaf, torch.cat([d for s in fused.model.block_step_sizes() for d in s]).detach())
    with torch.profiler.profile() as prof:
        v.step()
    names = {e.name for e in prof.events()}
    assert "tsc::batch_norm_residual_update" in names
    assert not {"tsc::weight_mean", "tsc::lstm_controller"} & names
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_compiled_weight_passes(capsys):
    """--host-only --compile: plain+pass-c makes the passes inside the compiled network's graph, as
    tsc-auto-c does (the reference w̄, not the fused op, which inductor could not fold into the conv
    gradients), with the plain-c step's result; the summary sets tsc-auto-c against it."""
    argv = ["--model", "cifar_resnet8", "--host-only", "--host-steps", "1", "--quick", "--compile",
            "--compile-backend", "aot_eager"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "\nplain+pass-c " in out and "tsc-auto-c vs plain+pass-c" in out

    args = bench.parse_args(argv)
    v = bench.HostVariant(args, "plain+pass-c", None, "auto", True)
    plain = bench.HostVariant(args, "plain-c", None, "auto", True)
    v.step(), plain.step()
    for (n, p), q in zip(v.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, msg=n)
    with torch.profiler.profile() as prof:
        _, wbar = v.forward(v.x)
    torch.testing.assert_close(wbar, weight_mean_reference(v.passes))
    assert wbar.grad_fn is not None and "tsc::weight_mean" not in {e.name for e in prof.events()}


def _host_controls():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "bench" / "host_controls.py"
    spec = importlib.util.spec_from_file_location("host_controls", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_host_controls_take_the_controller_apart(capsys):
    """bench/host_controls.py (docs/performance.md, ninth round): lstm-only and lstm-flat give the
    blocks the Δt their own controller gives (same w̄, same parameters), lstm-flat's optimizer
    trains one flat parameter in place of the 24, params-24 / params-flat give the 24 parameters / the
    flat one their (zero) gradients, and the script prints every variant's row."""
    import argparse
    controls = _host_controls()
    variants = {v.name: v for v in controls.build(argparse.Namespace(model="cifar_resnet20"), compiled=False)}
    assert list(variants) == list(controls.VARIANTS)
    for name in ("lstm-only", "lstm-flat"):
        model = variants[name].model
        own = [d for stage in type(model).block_step_sizes(model) for d in stage]  # the class's: the controller
        taken = [d for stage in model.block_step_sizes() for d in stage]
        assert len(own) == len(taken) == 9
        torch.testing.assert_close(torch.cat(taken), torch.cat(own), rtol=1e-6, atol=1e-7)
    flat, only = variants["lstm-flat"], variants["lstm-only"]
    controller = [p for n, p in flat.model.named_parameters() if n.startswith("tsc_controller.")]
    trained = [p for g in flat.opt.param_groups for p in g["params"]]
    assert len(controller) == 24 and not {id(p) for p in controller} & {id(p) for p in trained}
    assert trained[-1].numel() == sum(p.numel() for p in controller)
    before = trained[-1].detach().clone()
    flat.step()
    only.step()
    assert not torch.equal(trained[-1].detach(), before)  # Δt's gradient reaches the flat parameter
    n = len(list(variants["params-24"].model.parameters()))
    # trained: the network's parameters and tsc-leafdt's Δt leaf; params-flat: the flat one in the 24's place
    for name, count, optimized in (("params-24", 24, n + 1), ("params-flat", 1, n - 24 + 2)):
        v = variants[name]
        v.step()
        trained = [p for g in v.opt.param_groups for p in g["params"]]
        zero = [p for p in trained if p.grad is not None and not p.grad.any()]
        assert len(zero) == count  # the controller's 24 parameters, or the flat one, got their zero gradients
        assert len(trained) == optimized
    assert controls.main(["--model", "cifar_resnet20", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{name:11s} step" in out for name in controls.VARIANTS)
