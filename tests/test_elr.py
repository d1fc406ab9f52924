"""Early-learning regularization (Liu et al. 2020; issue 17): the loss, the targets, bad input, resume, the grid.

The hand-checked case: 2 examples, 3 classes, softmax outputs p0 = (1/2, 1/4, 1/4)
(logits log p0) and p1 = (1/3, 1/3, 1/3) (logits 0), given labels 1 and 2,
beta 1/2, lambda 2; example 0's target was (0.4, 0.4, 0.2) before the step,
example 1 is seen for the first time (target 0).
"""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from toys import assert_one_line_error

from memloc import DataConfig, RunDir, TrainConfig, build_model, load_data
from memloc.cli import main
from memloc.core.errors import ConfigError
from memloc.core.files import load_state, save_state
from memloc.core.training import ELR_STATE, Trainer, elr_regularizer
from memloc.study.grid import grid_cells
from memloc.tasks.experiment import ModelConfig, RunConfig, run_training


def _case():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1.0, 1.0, 1.0]])).requires_grad_(True)  # (2, 3)
    targets = torch.tensor([[0.4, 0.4, 0.2], [0.0, 0.0, 0.0], [0.1, 0.2, 0.7]])  # (N=3, C=3); row 2 not in the batch
    return logits, targets, torch.tensor([0, 1])


# ----------------------------------------------------------------------------- (a), (b): hand-checked numbers

def test_target_update_by_hand():
    logits, targets, idx = _case()
    elr_regularizer(logits, targets, idx, beta=0.5)
    # t0 = 1/2 (0.4, 0.4, 0.2) + 1/2 (1/2, 1/4, 1/4) = (0.45, 0.325, 0.225); t1 = 1/2 (1/3, 1/3, 1/3) (first visit)
    expected = torch.tensor([[0.45, 0.325, 0.225], [1 / 6, 1 / 6, 1 / 6], [0.1, 0.2, 0.7]])
    assert torch.allclose(targets, expected, atol=1e-7)
    assert torch.equal(targets[2], torch.tensor([0.1, 0.2, 0.7]))  # examples not in the batch keep their target
    assert not targets.requires_grad  # no gradient through the targets

    # the softmax is clamped to [1e-4, 1 - 1e-4] and renormalized before it enters the target
    t = torch.zeros(1, 3)
    elr_regularizer(torch.tensor([[100.0, 0.0, 0.0]]), t, torch.tensor([0]), beta=0.7)
    clamped = torch.tensor([1 - 1e-4, 1e-4, 1e-4], dtype=torch.float64)
    assert torch.allclose(t[0].double(), 0.3 * clamped / clamped.sum(), atol=1e-7)


def test_loss_and_gradient_by_hand():
    logits, targets, idx = _case()
    labels = torch.tensor([1, 2])
    lam = 2.0
    reg = elr_regularizer(logits, targets, idx, beta=0.5)  # (2,)
    # <t0, p0> = 0.45/2 + 0.325/4 + 0.225/4 = 0.3625; <t1, p1> = 3 * 1/6 * 1/3 = 1/6
    assert reg.tolist() == pytest.approx([math.log(1 - 0.3625), math.log(5 / 6)], abs=1e-6)
    loss = (F.cross_entropy(logits, labels, reduction="none") + lam * reg).mean()  # the Trainer's objective
    assert float(loss.detach()) == pytest.approx((math.log(4) + math.log(3)) / 2 + (math.log(0.6375) + math.log(5 / 6)),
                                        abs=1e-6)
    loss.backward()
    # d/dz_j of lam/B log(1 - s), s = <t, p>: -lam/B p_j (t_j - s) / (1 - s) (softmax Jacobian; t is a constant)
    #   example 0: p (t - s) = (0.5 * 0.0875, 0.25 * -0.0375, 0.25 * -0.1375) = (0.04375, -0.009375, -0.034375),
    #              / 0.6375, times -1; example 1: t_j = s for every j, so 0
    # cross-entropy: (p - onehot) / B: (0.25, -0.375, 0.125) and (1/6, 1/6, -1/3)
    expected = torch.tensor([[0.25 - 0.04375 / 0.6375, -0.375 + 0.009375 / 0.6375, 0.125 + 0.034375 / 0.6375],
                             [1 / 6, 1 / 6, -1 / 3]])
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_bf16_logits_under_autocast_keep_float32_targets():
    """The GPU path runs the model under bf16 autocast; the regularizer works in float32 on its outputs."""
    layer = torch.nn.Linear(4, 3)
    targets = torch.zeros(5, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(torch.randn(2, 4, generator=torch.Generator().manual_seed(0)))
        assert logits.dtype == torch.bfloat16
        reg = elr_regularizer(logits, targets, torch.tensor([3, 1]), beta=0.7)
    assert reg.dtype == torch.float32 and targets.dtype == torch.float32
    reg.mean().backward()
    assert torch.isfinite(layer.weight.grad).all()
    assert torch.allclose(targets[[1, 3]].sum(1), torch.full((2,), 0.3))


# ----------------------------------------------------------------------------- the Trainer

@pytest.fixture(scope="module")
def tiny_data():
    return load_data(DataConfig(dataset="digits", noise=0.2, train_size=96, seed=1))


def _model(data):
    torch.manual_seed(0)
    return build_model("cnn", input_shape=data.input_shape, num_classes=10, width=0.25)


def test_trainer_targets_are_running_averages_and_lambda_zero_is_plain_training(tiny_data):
    cfg = TrainConfig(epochs=2, batch_size=32, device="cpu", elr=(0.0, 0.6))
    model = _model(tiny_data)
    hist = Trainer(model, tiny_data, cfg, progress=False).fit()
    t = hist.elr_targets
    assert t.shape == (96, 10) and t.dtype == np.float32
    # every example is seen once per epoch: its target sums to (1 - beta)(1 + beta) after two epochs
    assert np.allclose(t.sum(1), 0.4 * 1.6, atol=1e-5)
    assert "train_elr" in hist.metrics[-1] and hist.metrics[-1]["train_elr"] < 0
    # lambda 0: the regularizer adds nothing to the step; the records hold the plain cross-entropy either way
    plain = _model(tiny_data)
    hp = Trainer(plain, tiny_data, TrainConfig(epochs=2, batch_size=32, device="cpu"), progress=False).fit()
    for p1, p2 in zip(model.parameters(), plain.parameters()):
        assert torch.allclose(p1, p2, atol=1e-6)
    assert np.allclose(hist.records["loss"].astype(np.float32), hp.records["loss"].astype(np.float32), atol=1e-3)
    assert hp.elr_targets is None and "train_elr" not in hp.metrics[-1]


def test_elr_changes_training_and_works_with_augmentation(tiny_data):
    cfg = TrainConfig(epochs=1, batch_size=32, device="cpu", augment=True, gradient_accounting=True)
    plain, elr = _model(tiny_data), _model(tiny_data)
    Trainer(plain, tiny_data, cfg, progress=False).fit()
    hist = Trainer(elr, tiny_data, TrainConfig(**{**vars(cfg), "elr": (3.0, 0.7)}), progress=False).fit()
    assert hist.gradients is not None and np.isfinite(hist.gradients["noisy_norm"]).all()
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), elr.parameters()))


# ----------------------------------------------------------------------------- (c) bad input: one line, exit 2

@pytest.mark.parametrize("argv, words", [
    (["--elr", "3"], ["--elr takes 2"]),
    (["--elr=-1,0.5"], ["lambda -1", ">= 0"]),
    (["--elr", "-1,0.5"], ["--elr"]),  # argparse reads -1,0.5 as a flag: still one line
    (["--elr", "3,1.0"], ["beta 1", "[0, 1)"]),
    (["--elr", "nan,0.5"], ["--elr LAMBDA takes a finite number, not nan"]),
    (["--task", "lm", "--elr", "3,0.7"], ["--elr", "classification"]),
])
def test_bad_elr_is_one_line_and_writes_nothing(tmp_path, capsys, argv, words):
    out = tmp_path / "run"
    code = main(["train", "--preset", "smoke", *argv, "--out", str(out), "--quiet", "--device", "cpu"])
    assert_one_line_error(code, capsys.readouterr().err, *words)
    assert not out.exists()


def test_bad_elr_in_the_library_and_the_grid(tmp_path, capsys):
    with pytest.raises(ConfigError, match="beta"):
        TrainConfig(elr=(3.0, -0.1))
    with pytest.raises(ConfigError, match="two numbers"):
        TrainConfig(elr=(3.0,))
    with pytest.raises(ConfigError, match="classification"):
        grid_cells([(0.4, 0.1)], task="lm", elr=(3, 0.7))
    out = tmp_path / "grid"
    code = main(["dropout-grid", "--preset", "smoke", "--pairs", "0.4,0.1", "--elr", "3", "--out", str(out), "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, "LAMBDA,BETA")
    assert not out.exists()


# ----------------------------------------------------------------------------- (d) resume, (e) the default path

def _config(**train):
    return RunConfig(data=DataConfig(dataset="digits", noise=0.1, train_size=128, seed=0),
                     model=ModelConfig(name="cnn", width=0.25),
                     train=TrainConfig(epochs=3, batch_size=32, device="cpu", checkpoint_every=2, **train))


class Interrupt(Exception):
    pass


def test_resume_after_a_kill_is_bit_identical(tmp_path, capsys):
    """Killed in epoch 3 (its work lost), resumed from epoch 2's checkpoint with `memloc train --resume`."""
    settings = {"elr": (3.0, 0.7), "augment": True}
    full = run_training(_config(**settings), tmp_path / "full", progress=False)

    def die_in_epoch_3(line: str):
        if line.startswith("epoch   3"):
            raise Interrupt

    with pytest.raises(Interrupt):
        run_training(_config(**settings), tmp_path / "cut", progress=False, log=die_in_epoch_3)
    cut = RunDir.open(tmp_path / "cut")
    assert cut.stage("train")["last_checkpoint"] == 2
    saved = load_state(cut.checkpoint_dir / "optimizer_002.safetensors")[ELR_STATE]
    assert saved.shape == (128, 10) and saved.dtype == torch.float32 and saved.abs().sum() > 0
    assert main(["train", "--resume", str(cut.path), "--quiet"]) == 0
    capsys.readouterr()
    a, b = full.load_checkpoint(3), cut.load_checkpoint(3)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = load_state(full.checkpoint_dir / "optimizer_003.safetensors")
    sb = load_state(cut.checkpoint_dir / "optimizer_003.safetensors")
    assert sa.keys() == sb.keys() and ELR_STATE in sa
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert full.read_metrics()[-1]["train_elr"] == cut.read_metrics()[-1]["train_elr"]
    ea, eb = full.load_arrays("examples.npz"), cut.load_arrays("examples.npz")
    assert np.array_equal(ea["loss"], eb["loss"]) and np.array_equal(ea["correct_bits"], eb["correct_bits"])
    assert json.loads((cut.path / "config.json").read_text())["train"]["elr"] == [3.0, 0.7]


def test_resume_without_saved_targets_is_one_line(tmp_path, capsys):
    def die_in_epoch_3(line: str):
        if line.startswith("epoch   3"):
            raise Interrupt

    with pytest.raises(Interrupt):
        run_training(_config(elr=(3.0, 0.7)), tmp_path / "cut", progress=False, log=die_in_epoch_3)
    state_file = tmp_path / "cut" / "checkpoints" / "optimizer_002.safetensors"
    state = load_state(state_file)
    del state[ELR_STATE]
    save_state(state_file, state)
    code = main(["train", "--resume", str(tmp_path / "cut"), "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, "ELR targets", "--overwrite")


def test_the_default_path_writes_no_elr_state(tmp_path):
    run = run_training(_config(), tmp_path / "plain", progress=False)
    assert ELR_STATE not in load_state(run.checkpoint_dir / "optimizer_003.safetensors")
    assert "elr" not in json.loads((run.path / "config.json").read_text())["train"]  # config.json as before
    assert all("train_elr" not in m for m in run.read_metrics())
    # and an explicit elr=None is the same run, bit for bit
    again = run_training(RunConfig.from_dict(json.loads((run.path / "config.json").read_text())),
                         tmp_path / "again", progress=False)
    a, b = run.load_checkpoint(3), again.load_checkpoint(3)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the grid's plain and ELR cells

def test_grid_cells_with_elr():
    cells = grid_cells([(0.4, 0.1)], elr=(3, 0.7))
    assert [c.name for c in cells] == ["etd-0.4-0.1", "dropout-0.46", "sparse-0.46", "plain", "elr-3-0.7"]
    base = RunConfig()
    plain, elr = cells[-2].run_config(base), cells[-1].run_config(base)
    assert plain.train.elr is None and elr.train.elr == (3.0, 0.7)
    for cfg in (plain, elr):
        assert not cfg.model.example_tied and cfg.model.baseline is None
    assert [c.method for c in grid_cells([(0.4, 0.1)])] == ["example_tied", "dropout", "sparse"]  # as before


def test_grid_with_elr_end_to_end(tmp_path, capsys):
    out = tmp_path / "g"
    argv = ["dropout-grid", "--preset", "smoke", "--dataset", "digits", "--epochs", "1", "--no-gradient-accounting",
            "--train-size", "256",
            "--pairs", "0.4,0.1", "--no-baselines", "--elr", "3,0.7", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "grid.csv").open()))
    assert [r["method"] for r in rows] == ["example_tied", "plain", "elr"]
    for r in rows[1:]:  # nothing to drop: before == after
        assert r["noisy_before"] == r["noisy_after"] and r["test_eval"] == r["test_drop"]
    assert json.loads((out / "elr-3-0.7" / "config.json").read_text())["train"]["elr"] == [3.0, 0.7]
    assert "elr" not in json.loads((out / "plain" / "config.json").read_text())["train"]
    assert "elr" not in json.loads((out / "grid.json").read_text())["base"]["train"]
    shutil.rmtree(out / "elr-3-0.7")  # resuming the grid trains the missing cell again, the others are read back
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("read back") == 2


# ----------------------------------------------------------------------------- (f) the bar (slow)

# Measured (2026-12, 2-core CPU, one thread, seed 0; docs/elr.md): mnist5k, 10% noise (400 noisy of 4,000), the
# registry MLP at width 1, 100 epochs, batch 128, lr 0.1 cosine. Plain: noisy-train (given) 97.0%, test 90.2%
# (57 s). ELR 3,0.9: noisy-train 12.0%, test 93.0% (61 s). CIFAR-10's 3,0.7 collapses here (clean-train 80.3%,
# test 76.2%) and 1,0.7 is too weak (noisy-train 83.8%): beta 0.9 (CIFAR-100's) with lambda 3.
MNIST5K_ELR = (3.0, 0.9)


@pytest.mark.slow
def test_elr_prevents_memorization_on_mnist5k(one_thread):
    """The issue's bar: ELR keeps noisy-train accuracy on the given labels below 30%, and costs at most 2 points of
    test accuracy against plain training with the same settings (it gains: measured +2.8)."""
    from memloc import train
    data = load_data(DataConfig(dataset="mnist5k", noise=0.1, seed=0))
    final = {}
    for name, elr in (("plain", None), ("elr", MNIST5K_ELR)):
        torch.manual_seed(0)
        model = build_model("mlp", input_shape=data.input_shape, num_classes=10, width=1.0)
        hist = train(model, data, epochs=100, batch_size=128, gradient_accounting=False, device="cpu", elr=elr)
        final[name] = {k: 100 * hist.metrics[-1][k] for k in ("clean_train_acc", "noisy_train_acc", "test_acc")}
    plain, elr = final["plain"], final["elr"]
    assert plain["noisy_train_acc"] >= 80.0, final  # plain training memorizes: the check below is not vacuous
    assert elr["noisy_train_acc"] < 30.0, final
    assert elr["test_acc"] >= plain["test_acc"] - 2.0, final
    assert elr["clean_train_acc"] >= 95.0, final  # it still fits the clean examples


def test_protection_notes_say_where_each_method_protects():
    """The report's grid notes: prevention (ELR) vs removable localization (example-tied dropout), with the numbers;
    nothing without a plain row to compare with."""
    from memloc.report.sections.grid import protection_notes
    rows = [{"cell": "plain", "method": "plain", "noisy_after": "97.0", "test_eval": "90.2"},
            {"cell": "elr-3-0.9", "method": "elr", "noisy_after": "12.0", "noisy_true_after": "84.25",
             "test_eval": "93.0"},
            {"cell": "etd-0.4-0.1", "method": "example_tied", "noisy_before": "100.0", "noisy_after": "1.75",
             "clean_after": "94.25", "test_drop": "89.9"},
            {"cell": "etd-0.3-0.1", "method": "example_tied", "noisy_before": "100.0", "noisy_after": "2.25",
             "clean_after": "94.0", "test_drop": "90.0"}]
    notes = protection_notes(rows)
    assert len(notes) == 3 and "97.0%" in notes[0]
    assert "prevents" in notes[1] and "12.0%" in notes[1] and "nothing to remove" in notes[1]
    assert "etd-0.4-0.1" in notes[2] and "1.8%" in notes[2] and "localizes" in notes[2]
    assert protection_notes(rows[1:]) == [] and protection_notes(rows[:1]) == []
    assert protection_notes([{"method": "plain", "noisy_after": ""}, rows[1]]) == []
