"""Example-tied dropout: evaluation before/after the drop, export, bad input, and the paper's claim (slow)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from memloc.cli import main
from memloc.core.dropout import ExampleTiedDropout, dropout_mode
from memloc.core.errors import ConfigError, RunError
from memloc.core.runs import RunDir
from memloc.core.training import evaluate
from memloc.probes.base import ProbeResult
from memloc.probes.dropout_eval import evaluate_dropout, plain_accuracies
from memloc.study.export import UnitScale, load_exported, remove_memorization
from memloc.tasks.classification.data import normalize
from memloc.tasks.experiment import ModelConfig, open_run


@pytest.fixture(scope="module")
def etd_run(tmp_path_factory):
    """A smoke-sized run with example-tied dropout (2 epochs: fast, and the checks below need no accuracy)."""
    out = tmp_path_factory.mktemp("etd") / "run"
    assert main(["train", "--preset", "smoke", "--epochs", "2", "--train-size", "512",
                 "--example-tied-dropout", "0.4,0.1", "--no-gradient-accounting", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "run"
    assert main(["train", "--preset", "smoke", "--epochs", "1", "--train-size", "256", "--no-gradient-accounting",
                 "--out", str(out), "--quiet"]) == 0
    return out


# ----------------------------------------------------------------------------- hand-checked cases

def test_remove_memorization_hand_case():
    # 4 units, p_gen 0.5 -> units 0, 1 are generalization units; matched factor (0.5 + 0.5 * 0.5) / 0.5 = 1.5.
    model = nn.Sequential(nn.Linear(3, 4), ExampleTiedDropout(0.5, 0.5, seed=3))
    x = torch.randn(5, 3)
    with torch.no_grad():
        h = model[0](x)
    remove_memorization(model, (3,))
    assert isinstance(model[1], UnitScale)
    assert model[1].scale.tolist() == [1.5, 1.5, 0.0, 0.0]
    torch.testing.assert_close(model(x), h * torch.tensor([1.5, 1.5, 0.0, 0.0]))
    with pytest.raises(RunError, match="no example-tied dropout"):
        remove_memorization(nn.Sequential(nn.Linear(3, 4)), (3,))


def test_unit_scale_is_per_channel_on_images():
    m = UnitScale(2)
    m.scale.copy_(torch.tensor([0.0, 2.0]))
    x = torch.ones(1, 2, 3, 3)
    y = m(x)
    assert y[0, 0].eq(0).all() and y[0, 1].eq(2).all()


def test_all_generalization_units_means_nothing_is_dropped(etd_run):
    # p_gen = 1: every unit is always on, so tied, eval and drop are the same function.
    loaded = open_run(etd_run, device="cpu")
    loaded.config = replace(loaded.config, model=replace(loaded.config.model, p_gen=1.0, p_mem=0.5))
    s = evaluate_dropout(loaded, save=False).summary
    assert s["clean_before"] == s["clean_after"] and s["noisy_before"] == s["noisy_after"]
    assert s["test_eval"] == s["test_drop"] and s["forgotten_clean"] == 0
    acc = evaluate(loaded.model(), loaded.data)
    assert s["clean_before"] == acc["clean_train_acc"] and s["test_eval"] == acc["test_acc"]


def test_keep_all_memorization_units_makes_tied_equal_eval(etd_run):
    # p_mem = 1: every example keeps every unit, and eval mode scales memorization units by p_mem = 1.
    loaded = open_run(etd_run, device="cpu")
    loaded.config = replace(loaded.config, model=replace(loaded.config.model, p_gen=0.4, p_mem=1.0))
    r = evaluate_dropout(loaded, save=False)
    acc = evaluate(loaded.model(), loaded.data)
    assert r.summary["clean_before"] == acc["clean_train_acc"]
    assert r.summary["noisy_before"] == acc["noisy_train_acc"]


# ----------------------------------------------------------------------------- end to end

def test_evaluate_end_to_end(etd_run, capsys):
    assert main(["evaluate", str(etd_run), "--drop-memorization"]) == 0
    assert "tied -> drop" in capsys.readouterr().out
    run = RunDir.open(etd_run)
    r = ProbeResult.load(run, "dropout")
    s, a = r.summary, r.arrays
    loaded = open_run(etd_run, device="cpu")
    data = loaded.data
    y, noisy = data.y_train.cpu().numpy(), data.is_noisy.cpu().numpy()
    before, after = a["pred_before"], a["pred_after"]
    # the saved predictions reproduce the summary and the index lists
    assert s["clean_before"] == pytest.approx(float((before == y)[~noisy].mean()))
    assert s["noisy_after"] == pytest.approx(float((after == y)[noisy].mean()))
    expected = np.flatnonzero(~noisy & (before == y) & (after != y))
    assert np.array_equal(a["forgotten_clean"], expected) and s["forgotten_clean"] == len(expected)
    assert np.array_equal(a["noisy_true_after"], np.flatnonzero(noisy & (after == data.y_true.cpu().numpy())))
    assert [row["mode"] for row in r.rows] == ["tied", "drop", "eval", "drop"]
    # "before" really is each example through its own mask: recompute tied predictions by hand for a few
    model = loaded.model()
    idx = torch.arange(16)
    from memloc.core.dropout import example_indices
    with torch.no_grad(), dropout_mode(model, "tied"), example_indices(model, idx):
        manual = model(normalize(data.x_train[:16])).argmax(1).numpy()
    assert np.array_equal(manual, before[:16])


def test_export_equals_drop_mode(etd_run, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    assert main(["export", str(etd_run), "--drop-memorization", "--out", str(out)]) == 0
    exported = load_exported(out)
    assert not any(isinstance(m, ExampleTiedDropout) for m in exported.modules())
    loaded = open_run(etd_run, device="cpu")
    model = loaded.model()
    x = normalize(torch.cat([loaded.data.x_train[:100], loaded.data.x_test[:100]]))
    with torch.no_grad(), dropout_mode(model, "drop"):
        want = model(x)
    with torch.no_grad():
        got = exported(x)
    torch.testing.assert_close(got, want)
    # the file refuses to be overwritten silently
    assert main(["export", str(etd_run), "--drop-memorization", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_plain_accuracies_of_plain_run(plain_run):
    acc = plain_accuracies(open_run(plain_run, device="cpu"))
    assert set(acc) == {"clean", "noisy", "noisy_true", "test"} and 0 <= acc["test"] <= 1


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("pair", ["1.5,0.1", "0,0.1", "0.4,0", "0.4,-0.1"])
def test_fraction_outside_range_is_one_line(pair, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--example-tied-dropout", pair, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memloc: error:") and "(0, 1]" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_model_without_a_place_for_the_layer(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--model", "resnet50", "--example-tied-dropout", "0.4,0.1",
                 "--out", str(out), "--quiet"]) == 2
    assert "no place for a per-block layer" in capsys.readouterr().err
    assert not out.exists()


def test_train_mode_forward_without_indices(etd_run):
    model = open_run(etd_run, device="cpu").model().train()
    with pytest.raises(ConfigError, match="needs example indices"):
        model(torch.zeros(2, 1, 28, 28))


def test_drop_memorization_on_plain_run(plain_run, tmp_path, capsys):
    assert main(["evaluate", str(plain_run), "--drop-memorization"]) == 2
    err = capsys.readouterr().err
    assert "without example-tied dropout" in err and len(err.strip().splitlines()) == 1
    assert not (plain_run / "probes" / "dropout").exists()
    assert main(["export", str(plain_run), "--drop-memorization", "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "without example-tied dropout" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()
    # without the flag evaluate just reports the run's accuracies
    assert main(["evaluate", str(plain_run)]) == 0
    assert "test_acc" in capsys.readouterr().out


def test_export_needs_the_flag_and_a_safetensors_name(etd_run, tmp_path, capsys):
    assert main(["export", str(etd_run), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "--drop-memorization" in capsys.readouterr().err
    assert main(["export", str(etd_run), "--drop-memorization", "--out", str(tmp_path / "m.pt")]) == 2
    assert ".safetensors" in capsys.readouterr().err


def test_baseline_config_validation():
    assert ModelConfig(baseline="dropout", active_fraction=0.46).active_fraction == 0.46
    with pytest.raises(ConfigError, match="unknown baseline"):
        ModelConfig(baseline="magic", active_fraction=0.5)
    with pytest.raises(ConfigError, match="in \\(0, 1\\]"):
        ModelConfig(baseline="sparse", active_fraction=1.5)
    with pytest.raises(ConfigError, match="not both"):
        ModelConfig(p_gen=0.4, p_mem=0.1, baseline="dropout", active_fraction=0.46)
    with pytest.raises(ConfigError, match="without a baseline"):
        ModelConfig(active_fraction=0.46)


# ----------------------------------------------------------------------------- the paper's claim (slow)

# CI preset: half of mnist5k (2,000 training examples, 10% noise), the CPU default
# ResNet-9 at width 0.25, batch 128 so that 20 epochs give enough steps to memorize.
SCIENCE = {"data": {"dataset": "mnist5k", "train_size": 2000, "noise": 0.1},
           "model": {"name": "resnet9", "width": 0.25},
           "train": {"epochs": 20, "batch_size": 128, "gradient_accounting": False, "checkpoint_every": 20,
                     "device": "cpu"}}


@pytest.fixture(scope="module")
def science_grid(tmp_path_factory):
    """One example-tied run (p_gen 0.4, p_mem 0.1) and its fixed sparse baseline at a = 0.46, trained once (standard
    dropout at that fraction barely trains at width 0.25 on a CPU — ~20% clean after 20 epochs — so its check here
    would hold vacuously: it is measured at full width, RESULTS.md)."""
    from memloc.core.training import TrainConfig
    from memloc.study.grid import dropout_grid
    from memloc.tasks.classification.data import DataConfig
    from memloc.tasks.experiment import ModelConfig, RunConfig
    base = RunConfig(data=DataConfig(**SCIENCE["data"]), model=ModelConfig(**SCIENCE["model"]),
                     train=TrainConfig(**SCIENCE["train"]))
    rows = dropout_grid(base, tmp_path_factory.mktemp("science") / "grid", pairs=[(0.4, 0.1)], baselines=("sparse",))
    return {r["method"]: r for r in rows}


@pytest.mark.slow
def test_example_tied_dropout_localizes_memorization(science_grid):
    r = science_grid["example_tied"]
    # if the masks were not tied to the examples, the noisy labels could not be fitted
    assert r["noisy_before"] >= 90.0
    # if drop mode did nothing, noisy accuracy would stay near noisy_before
    assert r["noisy_after"] <= 10.0
    assert r["clean_before"] - r["clean_after"] <= 5.0
    # ... and the test accuracy barely moves: measured 2.5 points in bf16 (the default on a CPU with AMX since
    # 2026-11-28; under 2 in fp32): inside the seed-to-seed spread of the clean cost (2.7-5.6 points over three
    # seeds, RESULTS.md); a drop mode that removed general features would also fail the clean bound above
    assert abs(r["test_eval"] - r["test_drop"]) <= 3.0
    # the forgotten noisy examples mostly fall back to their true class (the paper's point)
    assert r["noisy_true_after"] >= 50.0


@pytest.mark.slow
def test_baselines_do_not_localize(science_grid):
    # The bound: at test time a baseline that fits the clean data (>= 90%) still fits the noisy
    # labels (>= 50%). Standard dropout keeping 46% of the units after every block barely trains at
    # width 0.25 (measured: ~20% clean after 20 epochs), so for it the bound would hold vacuously and it is not
    # trained here; the fixed sparse network trains, and must fit the clean data, so the check is never vacuous.
    # At full width on a GPU (RESULTS.md) standard dropout at a = 0.46 trains (94% clean) and fits none of
    # the noisy labels: there the bound fails for it, which this CPU preset cannot show.
    assert "dropout" not in science_grid
    r = science_grid["sparse"]
    assert r["clean_after"] >= 90.0, r
    assert r["noisy_after"] >= 50.0, f"the sparse baseline localized memorization: {r}"
