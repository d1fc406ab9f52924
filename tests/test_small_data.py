"""Small tabular sets and 1-D signals trained to memorization (issue #35): --epochs auto, the small models' recipes,
and the rough edges a new user hit (output piped to a file, the study's bar, the export's normalization, --augment
on 1-D data)."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from toys import assert_one_line_error

from memloc.cli import build_parser, main, run_config, study_settings
from memloc.core.runs import RunDir
from memloc.core.training import (
    MEMORIZED,
    PAPER_RECIPE,
    TrainConfig,
    auto_learning_rate,
    learning_rate,
    memorized,
    recipe_batch,
)

HERE = Path(__file__).parent


def features(path: Path, n: int = 160, f: int = 12, k: int = 3, *, seed: int = 0) -> Path:
    """(n, f) float features: a prototype per class plus noise, easy to learn and quick to memorize."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    x = (rng.uniform(-3, 3, (k, f))[y] + rng.normal(0, 1, (n, f))).astype(np.float32)
    np.savez(path, x=x, y=y)
    return path


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- --epochs auto

def test_epochs_auto_stops_settle_epochs_after_the_threshold(tmp_path, capsys, one_thread):
    """The bare command on the user's features: the mlp's recipe, trained until noisy-train reaches 90%, then
    --settle-epochs more with the rate annealed to 0; a checkpoint per epoch actually trained."""
    data = features(tmp_path / "feat.npz")
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "train", "--dataset", data, "--noise", "0.2", "--out", out, "--quiet")
    assert code == 0, err
    assert not err.strip(), err  # memorized: no warning
    cfg = json.loads((out / "config.json").read_text())["train"]
    assert cfg["epochs"] == "auto" and cfg["recipe"] == "mlp" and cfg["weight_decay"] == 0.0
    assert cfg["batch_size"] == 32 and cfg["lr"] == PAPER_RECIPE["lr"]  # 128 training examples: batches of 32
    metrics = RunDir.open(out).read_metrics()
    reached = next(m["epoch"] for m in metrics if m["noisy_train_acc"] >= MEMORIZED)
    assert len(metrics) == reached + cfg["settle_epochs"]
    assert f"epochs auto: noisy-train {100 * metrics[reached - 1]['noisy_train_acc']:.1f}% >= 90% at epoch " \
           f"{reached}: 5 more epochs" in stdout
    assert "training: mlp's recipe: lr 0.1, batch 32, weight decay 0; epochs auto" in stdout
    assert metrics[-1]["lr"] < 1e-3 * cfg["lr"]  # annealed to (almost) 0 on the last step
    run = RunDir.open(out)
    assert run.saved_epochs() == list(range(len(metrics) + 1))  # the checkpoints follow the actual epochs
    assert run.stage("train")["status"] == "done" and run.stage("train")["epochs"] == len(metrics)
    assert np.load(out / "examples.npz")["loss"].shape[0] == len(metrics)
    assert np.load(out / "gradients.npz")["cosine"].shape[1] == len(metrics)


def test_epochs_auto_stops_at_the_cap_and_says_so(tmp_path, capsys, one_thread):
    data = features(tmp_path / "feat.npz", n=100)
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "train", "--dataset", data, "--noise", "0.2", "--lr", "0.0001", "--max-epochs", "3",
                            "--out", out, "--quiet")
    assert code == 0, err
    assert "epochs auto: stopped at the cap of 3 epochs (--max-epochs) with noisy-train" in stdout
    assert "warning: the model did not memorize its noisy examples" in err
    run = RunDir.open(out)
    assert len(run.read_metrics()) == 3 and run.saved_epochs()[-1] == 3


def test_the_threshold_without_known_noise_is_every_example_right():
    assert memorized({"noisy_train_acc": 0.9}) and not memorized({"noisy_train_acc": 0.89})
    assert not memorized({"noisy_train_acc": None, "clean_train_acc": 0.99})  # noise unknown: clean-train is all
    assert memorized({"noisy_train_acc": None, "clean_train_acc": 1.0})


def test_auto_schedule_cycles_restart_and_anneal_to_zero():
    cfg = TrainConfig(epochs="auto", lr=0.1, batch_size=32, weight_decay=0.0, auto_cycle=4, settle_epochs=2)
    spe = 5
    first = [auto_learning_rate(s, spe, cfg) for s in range(4 * spe)]
    assert first == [learning_rate(s, 4 * spe, cfg) for s in range(4 * spe)]  # the fixed recipe's 4-epoch cosine
    assert auto_learning_rate(4 * spe, spe, cfg) == pytest.approx(0.1)  # the next cycle starts at the peak again
    assert auto_learning_rate(12 * spe - 1, spe, cfg) < 0.002  # ... and lasts twice as long (epochs 5-12)
    assert auto_learning_rate(12 * spe, spe, cfg) == pytest.approx(0.1)  # then 16 epochs
    # reached at the end of epoch 6: epochs 7 and 8 anneal from the rate of epoch 6's last step to 0
    before = auto_learning_rate(6 * spe - 1, spe, cfg)
    settle = [auto_learning_rate(s, spe, cfg, settle_from=6) for s in range(6 * spe, 8 * spe)]
    assert settle[0] == pytest.approx(before, rel=0.1) and settle[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(settle, settle[1:]))
    constant = TrainConfig(epochs="auto", schedule="constant", lr=0.05)
    assert auto_learning_rate(123, spe, constant, settle_from=3) == 0.05


def test_epochs_auto_where_it_does_not_fit_is_one_line(tmp_path, capsys):
    data = features(tmp_path / "feat.npz")
    for argv, words in [
        (["--epochs", "auto", "--schedule", "onecycle"], "--schedule onecycle needs a fixed length"),
        (["--epochs", "auto", "--example-tied-dropout", "0.4,0.1"], "an example-tied model measures"),
        (["--epochs", "12", "--max-epochs", "30"], "--max-epochs is for --epochs auto"),
        (["--epochs", "often"], "--epochs takes a number of epochs or auto"),
    ]:
        code, out, err = cli(capsys, "train", "--dataset", data, *argv, "--out", tmp_path / "r", "--quiet")
        assert_one_line_error(code, err, words)
        assert not (tmp_path / "r").exists()
    code, _, err = cli(capsys, "train", "--task", "lm", "--epochs", "auto", "--out", tmp_path / "r", "--quiet")
    assert_one_line_error(code, err, "--epochs auto stops on noisy-train accuracy, which --task lm does not have")


def test_epochs_auto_is_the_default_for_your_own_data_only(tmp_path):
    data = str(features(tmp_path / "feat.npz"))
    parser = build_parser()

    def train_epochs(*argv):
        return run_config(parser.parse_args(["train", *argv])).train.epochs

    def study_epochs(*argv):
        return study_settings(parser.parse_args(["run", *argv])).base.train.epochs
    assert train_epochs("--dataset", data) == "auto" and study_epochs("--dataset", data) == "auto"
    assert train_epochs("--dataset", data, "--epochs", "12") == 12 and study_epochs("--dataset", data,
                                                                                    "--epochs", "12") == 12
    assert train_epochs("--dataset", data, "--preset", "smoke") == 6  # a preset keeps its epochs
    assert study_epochs("--dataset", data, "--preset", "paper") == 50
    assert train_epochs("--dataset", "digits") == 40 and study_epochs() == 40  # built-in data: the fixed recipe
    assert train_epochs("--dataset", "digits", "--epochs", "auto") == "auto"


def test_recipes_fill_only_what_was_not_given():
    cfg = TrainConfig()
    mlp = cfg.with_recipe("mlp", 142)
    assert (mlp.lr, mlp.batch_size, mlp.weight_decay, mlp.recipe) == (0.1, 32, 0.0, "mlp")
    assert cfg.with_recipe("cnn1d", 4000).batch_size == 128 and cfg.with_recipe("cnn1d", 1e6).batch_size == 512
    paper = cfg.with_recipe("resnet9", 4000)
    assert (paper.lr, paper.batch_size, paper.weight_decay, paper.recipe) == (0.1, 512, 5e-4, "paper")
    given = TrainConfig(lr=0.02, weight_decay=1e-4).with_recipe("mlp", 142)
    assert (given.lr, given.batch_size, given.weight_decay) == (0.02, 32, 1e-4)
    done = TrainConfig(lr=0.02, weight_decay=1e-4, batch_size=8)
    assert done.with_recipe("mlp", 142) is done  # nothing left to a recipe
    assert [recipe_batch(n) for n in (10, 142, 455, 1437, 4000, 50_000)] == [32, 32, 32, 64, 128, 512]


# ----------------------------------------------------------------------------- resume after a kill

def _driver(kill_at: str, *argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(HERE / "fault_driver.py"), kill_at, "--", *map(str, argv)],
                          capture_output=True, text=True, env=env, timeout=600)


def test_epochs_auto_killed_after_the_threshold_resumes_to_the_same_weights(tmp_path, capsys, one_thread):
    """SIGKILL after the epoch that reached the threshold: the resumed run finds that epoch again in its metrics,
    so it anneals over the same epochs and ends bit for bit where the uninterrupted run did (one thread here and
    in the killed process)."""
    data = features(tmp_path / "feat.npz", n=120)
    args = ["train", "--dataset", data, "--noise", "0.2", "--settle-epochs", "2", "--quiet"]
    code, _, err = cli(capsys, *args, "--out", tmp_path / "whole")
    assert code == 0, err
    metrics = RunDir.open(tmp_path / "whole").read_metrics()
    reached = next(m["epoch"] for m in metrics if m["noisy_train_acc"] >= MEMORIZED)
    killed = _driver(f"epoch:{reached}", *args, "--out", tmp_path / "cut")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = _driver("none", "train", "--resume", tmp_path / "cut", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    a, b = RunDir.open(tmp_path / "whole"), RunDir.open(tmp_path / "cut")
    assert a.saved_epochs() == b.saved_epochs() == list(range(reached + 3))
    for key, t in a.load_checkpoint(reached + 2).items():
        assert torch.equal(t, b.load_checkpoint(reached + 2)[key]), key
    untimed = lambda ms: [{k: v for k, v in m.items() if not k.endswith("time_s")} for m in ms]  # noqa: E731
    assert untimed(a.read_metrics()) == untimed(b.read_metrics())


# ----------------------------------------------------------------------------- rough edges

def test_study_bar_never_runs_past_its_total():
    """The study's bar is moved by float costs: their sum once rounded, it ran past its total at the end (tqdm's
    'clamping frac' warning and an ETA of <-00:00)."""
    from tqdm import tqdm

    from memloc.study.run import advance
    costs = [40, 0.11 * 9 * 21, 0.45 * 9 * 10, 0.043 * 2 * 100, 0.62 * 40, 0.6, 0.2, 0.5, 0.6]
    out = io.StringIO()
    bar = tqdm(total=sum(costs), file=out, bar_format="{n:.3f}/{total:.3f} [{elapsed}<{remaining}]")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for c in costs + [1.0]:  # one more than the total held
            advance(bar, c)
        bar.close()
    assert bar.n <= bar.total and math.isclose(bar.n, bar.total) and "<-" not in out.getvalue()


def test_piped_study_output_is_plain_lines(smoke_study_master):
    """`memloc run` without --quiet, its output going to a file (nohup, SLURM, CI logs): no progress bars, no
    cursor codes, one line per stage and epoch, the data and model lines once."""
    log = (smoke_study_master.parent / "console.log").read_text()
    assert "\x1b" not in log and "\r" not in log
    assert "TqdmWarning" not in log and "%|" not in log
    lines = log.splitlines()
    assert sum(line.startswith("epoch   1 ") for line in lines) == 2  # the plain and the example-tied model
    assert sum(line.startswith("stage train ...") for line in lines) == 1
    assert sum(line.startswith("run directory ") for line in lines) == 2
    assert lines[-1].startswith("done: ")


def test_augment_on_1d_data_is_refused_before_anything_is_written(tmp_path, capsys):
    data = features(tmp_path / "feat.npz")
    code, _, err = cli(capsys, "train", "--dataset", data, "--augment", "--out", tmp_path / "r", "--quiet")
    assert_one_line_error(code, err, "--augment (random crop and flip) is for images, not 12 features")
    assert not (tmp_path / "r").exists()


def test_export_records_the_runs_normalization(tmp_path, capsys, one_thread):
    """A standardized run's export says so (it said pixels), with the statistics to apply."""
    from memloc.study.export import exported_normalization, load_exported
    from memloc.tasks.experiment import open_run
    data = features(tmp_path / "feat.npz")
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--dataset", data, "--epochs", "1", "--example-tied-dropout", "0.4,0.1",
                       "--out", run, "--quiet")
    assert code == 0, err
    code, _, err = cli(capsys, "export", run, "--drop-memorization", "--out", tmp_path / "m.safetensors")
    assert code == 0, err
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["memloc"])
    cfg = json.loads((run / "config.json").read_text())["data"]
    assert meta["normalization"] == {"kind": "standardize", "mean": cfg["norm_mean"], "std": cfg["norm_std"]}
    assert "pixels" not in meta["inputs"] and "0.5" not in meta["inputs"]
    loaded = open_run(run)
    norm = exported_normalization(tmp_path / "m.safetensors")
    assert norm == loaded.data.normalization
    x = loaded.data.x_train[:4]
    assert load_exported(tmp_path / "m.safetensors")(norm(x)).shape == (4, 3)
