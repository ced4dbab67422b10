"""tsc-train (issue 23): the training command on fake CIFAR-10 and a tiny ImageFolder, 2 processes under
torchrun, kill-and-resume bitwise equality, corrupt checkpoints, bad flags, folded.pt.

Every data set is made here in a temporary directory: a CIFAR-10 of random images in torchvision's
pickled format (64 train, 32 test) and an ImageFolder of random 32x32 PNGs. The numbers (accuracies of
random labels) mean nothing; what is tested is that the runs are wired right and exactly repeatable.
Subprocesses run with one thread; in-process runs get one thread through a fixture.
"""
import csv
import importlib.util
import json
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from tsc_kernels.train import checkpoint, cli, load_folded, loop, main
from tsc_kernels.train import data as data_mod

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMING = ("seconds", "images_per_s")  # the only columns that may differ between two runs


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    cifar = root / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)

    def batch(n):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist(),
                "batch_label": "fake", "filenames": [f"{i}.png" for i in range(n)]}

    for i, n in enumerate((13, 13, 13, 13, 12), 1):  # 64 training images over torchvision's 5 files
        with open(cifar / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(n), f)
    with open(cifar / "test_batch", "wb") as f:
        pickle.dump(batch(32), f)
    from PIL import Image

    folder = root / "folder"
    for split, n in (("train", 12), ("val", 4)):  # 36 training, 12 validation images, 3 classes
        for c in ("cat", "dog", "emu"):
            (folder / split / c).mkdir(parents=True)
            for k in range(n):
                size = (32 + k % 3 * 4, 32)  # not all square: the random-resized crop sees several shapes
                Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
                    folder / split / c / f"{k}.png")
    return {"cifar": str(root / "cifar"), "folder": str(folder)}


def cifar_args(datasets, out, *extra, model="cifar_resnet20"):
    return ["--dataset", "cifar10", "--data", datasets["cifar"], "--model", model, "--epochs", "2",
            "--batch", "16", "--workers", "0", "--no-progress", "--out", str(out), *extra]


def env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def cli_run(args, timeout=300, **extra_env):
    return subprocess.run([sys.executable, "-m", "tsc_kernels.train", "--threads", "1", *args], cwd=ROOT,
                          env=env(**extra_env), capture_output=True, text=True, timeout=timeout, check=False)


def metric_rows(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def model_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def val_logits(model, dataset):
    with torch.no_grad():
        x = torch.stack([dataset[i][0] for i in range(len(dataset))])
        y = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
        return model.eval()(x), y


# --------------------------------------------------------------------------------------------------
# the two data layouts, 2 epochs of cifar_resnet20 each (in process)
# --------------------------------------------------------------------------------------------------
def test_cifar_run_writes_every_output(datasets, tmp_path, one_thread):
    out = tmp_path / "run"
    assert main(cifar_args(datasets, out)) == 0
    expected = {"metrics.csv", "last.pt", "best.pt", "report.json", "folded.pt"}
    # The Δt plot needs matplotlib (optional: the oldest-torch venv of make test-compat has none).
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert expected | ({"step_sizes.png"} if has_matplotlib else set()) <= set(os.listdir(out))
    assert has_matplotlib or "step_sizes.png" not in os.listdir(out)
    rows = metric_rows(out)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
                             "seconds", "images_per_s"]
    # paper-cifar: lr 0.1 divided by 10 at 50 % of the epochs
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.1, 0.01])
    for r in rows:
        assert float(r["images_per_s"]) > 0 and 0 <= float(r["val_top1"]) <= float(r["val_top5"]) <= 100

    report = json.loads((out / "report.json").read_text())
    assert report["args"]["recipe"] == "paper-cifar" and report["args"]["nesterov"] is True
    assert report["args"]["wd"] == 1e-4 and report["args"]["momentum"] == 0.9
    assert report["versions"]["torch"] == torch.__version__
    assert report["best"]["val_top1"] == pytest.approx(max(float(r["val_top1"]) for r in rows))
    blocks = report["step_sizes"]["blocks"]
    assert len(blocks) == 9 and all(0 < b["min"] <= b["mean"] <= b["max"] < 1 for b in blocks.values())

    last = checkpoint.load(str(out / "last.pt"))
    assert (last["epoch"], last["step"], last["batch_in_epoch"]) == (2, 8, 0)  # 64 images / 16 = 4 steps an epoch
    for key in ("optimizer", "scheduler", "scaler", "ranks"):
        assert key in last
    assert {"python", "numpy", "torch"} <= set(last["ranks"][0]["rng"])

    # folded.pt: the plain network, with the trained network's logits (report and recomputed here)
    assert report["folded"]["val_top1"] == report["final"]["val_top1"]
    assert report["folded"]["max_abs_logit_diff"] < 1e-4
    folded = load_folded(out / "folded.pt")
    assert not any(k.startswith("tsc_controller") for k in folded.state_dict())
    trained = loop.models_mod.build("cifar_resnet20", "lstm", 10)
    trained.load_state_dict(last["model"])
    val = data_mod.load("cifar10", datasets["cifar"], 0, 32).val
    got, y = val_logits(folded, val)
    want, _ = val_logits(trained, val)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert 100 * float((got.argmax(1) == y).float().mean()) == pytest.approx(report["folded"]["val_top1"])
    assert 100 * float((want.argmax(1) == y).float().mean()) == pytest.approx(report["final"]["val_top1"])


def test_imagefolder_run(datasets, tmp_path, one_thread):
    out = tmp_path / "run"
    assert main(["--dataset", "imagefolder", "--data", datasets["folder"], "--model", "cifar_resnet20",
                 "--epochs", "2", "--batch", "16", "--workers", "0", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["args"]["recipe"] == "paper-imagenet" and report["args"]["image_size"] == 32
    assert "3 classes, 36 train, 12 val" in report["data"]
    rows = metric_rows(out)
    assert [float(r["lr"]) for r in rows] == [0.1, 0.1]  # paper-imagenet: lr / 10 every 30 epochs
    assert checkpoint.load(str(out / "last.pt"))["step"] == 4  # 36 images: 2 full batches of 16 an epoch
    assert report["folded"]["val_top1"] == report["final"]["val_top1"]


def test_imagefolder_augmentation_is_a_function_of_seed_epoch_index(datasets):
    ds = data_mod.load("imagefolder", datasets["folder"], 0, 24).train
    a, b = ds[(5, 1)][0], ds[(5, 1)][0]
    assert a.shape == (3, 24, 24) and torch.equal(a, b)  # same key: same crop, whichever worker draws it
    assert not torch.equal(a, ds[(5, 2)][0])  # another epoch: another crop
    other = data_mod.load("imagefolder", datasets["folder"], 1, 24).train
    assert not torch.equal(a, other[(5, 1)][0])  # another seed: another crop


# --------------------------------------------------------------------------------------------------
# kill and resume: bitwise the uninterrupted run
# --------------------------------------------------------------------------------------------------
def test_sigkill_and_resume_is_bitwise_equal(datasets, tmp_path):
    # 4 steps an epoch, a checkpoint every 3 steps: killed after step 7, the run resumes from step 6's
    # mid-epoch checkpoint (epoch 2, batch 2 of 4) and replays step 7. An LM-ResNet with stochastic depth
    # draws its per-sample masks from torch's global generator, so the replay is bitwise only if that
    # generator's state was saved and restored too (and the epoch's running sums, for the metrics).
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = ["--ckpt-every", "3"]
    done = cli_run(cifar_args(datasets, full, *args, model="cifar_lm_resnet20"))
    assert done.returncode == 0, done.stderr
    crash = cli_run(cifar_args(datasets, killed, *args, model="cifar_lm_resnet20"), TSC_TRAIN_KILL_AFTER_STEP="7")
    assert crash.returncode == -signal.SIGKILL, crash.stderr
    mid = checkpoint.load(str(killed / "last.pt"))
    assert (mid["epoch"], mid["batch_in_epoch"], mid["step"]) == (1, 2, 6)
    assert len(metric_rows(killed)) == 1 and not (killed / "report.json").exists()
    resumed = cli_run(cifar_args(datasets, killed, *args, model="cifar_lm_resnet20"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "step 6" in resumed.stderr
    assert_same_state(model_state(killed / "last.pt"), model_state(full / "last.pt"))
    assert without_timing(metric_rows(killed)) == without_timing(metric_rows(full))
    a, b = checkpoint.load(str(killed / "last.pt")), checkpoint.load(str(full / "last.pt"))
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert torch.equal(a["ranks"][0]["rng"]["torch"], b["ranks"][0]["rng"]["torch"])


# --------------------------------------------------------------------------------------------------
# torchrun, 2 processes over gloo
# --------------------------------------------------------------------------------------------------
def torchrun(datasets, out, digests, **extra_env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "localhost:0", "-m", "tsc_kernels.train", "--threads", "1",
           *cifar_args(datasets, out, "--ckpt-every", "3")]
    digests.mkdir(exist_ok=True)
    return subprocess.run(cmd, cwd=ROOT, env=env(TSC_TRAIN_DIGEST_DIR=str(digests), **extra_env), capture_output=True,
                          text=True, timeout=300, check=False)


def test_torchrun_two_processes_and_resume(datasets, tmp_path):
    out, digests = tmp_path / "ddp", tmp_path / "digests"
    proc = torchrun(datasets, out, digests)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = [json.loads((digests / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]  # every rank ends with the same weights and statistics
    model = loop.models_mod.build("cifar_resnet20", "lstm", 10)
    model.load_state_dict(model_state(out / "last.pt"))
    assert loop.state_digest(model) == ranks[0]["sha256"]  # and they are the checkpoint's
    assert ranks[1]["wrote"] == []  # rank 0 alone writes
    assert {os.path.basename(p) for p in ranks[0]["wrote"]} >= {"last.pt", "metrics.csv", "report.json", "folded.pt"}
    assert proc.stdout.count("tsc-train: epoch 1/2") == 1
    last = checkpoint.load(str(out / "last.pt"))
    assert last["world_size"] == 2 and len(last["ranks"]) == 2  # both ranks' RNG states and running sums
    assert last["step"] == 8  # each rank: 32 of the 64 images in batches of 16 / 2 = 8: 4 steps an epoch, 2 epochs
    assert json.loads((out / "report.json").read_text())["world_size"] == 2
    assert len(metric_rows(out)) == 2

    # both processes killed after step 7; the rerun resumes both from step 6 (rank 0 reads last.pt and
    # hands it to rank 1) and ends where the uninterrupted run ended
    killed = tmp_path / "killed"
    crash = torchrun(datasets, killed, tmp_path / "d2", TSC_TRAIN_KILL_AFTER_STEP="7")
    assert crash.returncode != 0
    assert checkpoint.load(str(killed / "last.pt"))["step"] == 6
    resumed = torchrun(datasets, killed, tmp_path / "d3")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_state(model_state(killed / "last.pt"), model_state(out / "last.pt"))
    assert without_timing(metric_rows(killed)) == without_timing(metric_rows(out))
    again = [json.loads((tmp_path / "d3" / f"rank{r}.json").read_text())["sha256"] for r in range(2)]
    assert again == [ranks[0]["sha256"]] * 2


# --------------------------------------------------------------------------------------------------
# corrupt checkpoints and bad input: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------------------
def test_corrupt_checkpoint_is_reported_and_kept(datasets, tmp_path, one_thread, capsys):
    out = tmp_path / "run"
    assert main(cifar_args(datasets, out, "--epochs", "1")) == 0
    last = out / "last.pt"
    blob = last.read_bytes()
    last.write_bytes(blob[: len(blob) // 2])  # truncated, as by a full disk
    before = {p: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(cifar_args(datasets, out, "--epochs", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tsc-train: error: --out: checkpoint ")
    assert str(last) in err[0] and "corrupt or truncated" in err[0]
    assert {p: p.read_bytes() for p in out.iterdir()} == before  # nothing replaced, nothing added


def test_resume_with_other_flags_is_refused(datasets, tmp_path, one_thread, capsys):
    out = tmp_path / "run"
    assert main(cifar_args(datasets, out, "--epochs", "1")) == 0
    capsys.readouterr()
    assert main(cifar_args(datasets, out, "--epochs", "1", "--lr", "0.05")) == 2
    assert capsys.readouterr().err.startswith("tsc-train: error: --lr: ")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save({"format": "tsc-train/1", "x": 1}, str(path))

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        checkpoint.atomic_write(str(path), fail)
    assert checkpoint.load(str(path))["x"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary left behind


@pytest.mark.parametrize("case", ["missing_dir", "cifar_layout", "folder_layout", "unknown_model", "indivisible_batch",
                                  "bad_epochs", "dt_without_fixed", "no_data"])
def test_bad_input_one_line_exit_2_nothing_written(datasets, tmp_path, monkeypatch, capsys, case):
    out = tmp_path / "out"
    base = {"--dataset": "cifar10", "--data": datasets["cifar"], "--model": "cifar_resnet20", "--epochs": "1",
            "--batch": "16", "--workers": "0", "--out": str(out)}
    flag, change = {
        "missing_dir": ("--data", {"--data": str(tmp_path / "nowhere")}),
        "cifar_layout": ("--data", {"--data": datasets["folder"]}),
        "folder_layout": ("--data", {"--dataset": "imagefolder"}),  # the CIFAR folder has no train/ val/
        "unknown_model": ("--model", {"--model": "cifar_resnet_nope"}),
        "indivisible_batch": ("--batch", {"--batch": "15"}),
        "bad_epochs": ("--epochs", {"--epochs": "0"}),
        "dt_without_fixed": ("--dt", {"--dt": "0.5"}),
        "no_data": ("--data", {"--data": None}),
    }[case]
    base.update(change)
    if case == "indivisible_batch":
        monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the check comes before any process group
    argv = [x for k, v in base.items() if v is not None for x in (k, v)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tsc-train: error: {flag}: "), err
    assert not out.exists()


def test_unknown_flag_and_bad_choice_are_one_line(capsys):
    assert main(["--dataset", "svhn"]) == 2
    assert main(["--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("tsc-train: error: ") for line in err)
    assert "--dataset" in err[0] and "--no-such-flag" in err[1]


def test_recipes_and_milestones():
    a = cli.resolve(["--recipe", "paper-imagenet", "--data", "."])
    assert (a.dataset, a.model, a.epochs, a.batch, a.lr, a.image_size) == (
        "imagefolder",
        "resnet50",
        100,
        256,
        0.1,
        224,
    )
    assert a.milestone_epochs == [30, 60, 90]
    b = cli.resolve(["--recipe", "paper-cifar", "--data", ".", "--epochs", "10", "--lr", "0.05", "--batch", "32"])
    assert (b.model, b.epochs, b.lr, b.batch, b.wd, b.momentum, b.nesterov) == ("cifar_resnet56", 10, 0.05, 32, 1e-4,
                                                                                 0.9, True)
    assert b.milestone_epochs == [5, 8] and cli.resolve(["--data", ".", "--no-nesterov"]).nesterov is False
    assert cli.parse_milestones("150,225", 300) == [150, 225] and cli.parse_milestones("50%,75%", 300) == [150, 225]
    with pytest.raises(ValueError, match="milestones"):
        cli.parse_milestones("every:0", 10)


def test_other_data_sets_and_modes(tmp_path, one_thread):
    """digits (shipped with scikit-learn) with the plain network, bf16 autocast and channels-last."""
    pytest.importorskip("sklearn", reason="experiments extra (scikit-learn) not installed")
    out = tmp_path / "digits"
    assert main(["--dataset", "digits", "--model", "cifar_resnet8", "--tsc", "none", "--epochs", "1", "--batch", "128",
                 "--amp", "bf16", "--channels-last", "--workers", "0", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["step_sizes"] == {} and report["args"]["amp"] == "bf16"
    assert report["final"]["val_top1"] > 20  # 10 classes: one epoch learns something
    # the plain network is saved as folded.pt unchanged: it reloads by name with last.pt's weights
    folded = load_folded(out / "folded.pt")
    assert_same_state(folded.state_dict(), model_state(out / "last.pt"))
