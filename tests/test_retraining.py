"""Layer retraining: a hand-computed SGD step, only the layer changes, only clean examples, scoping, resume, CLI."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import copy_of
from torch import nn
from toys import assert_one_line_error, digest, toy_data, toy_model

from memloc.cli import main
from memloc.core.errors import ConfigError, DataError
from memloc.probes import Partial
from memloc.probes.base import ProbeResult
from memloc.probes.retraining import RetrainConfig, retrain_model
from memloc.probes.sweep import layer_keys
from memloc.tasks.classification.models import NORM_TYPES, layers
from memloc.tasks.experiment import make_model, open_run


@pytest.fixture(scope="module")
def smoke_run(digits_master, tmp_path_factory):
    """The smoke preset (CLI) on 8x8 digits for speed, 3 epochs (conftest's, copied)."""
    return copy_of(digits_master, tmp_path_factory.mktemp("retrain") / "run")


def test_toy_retraining_known_by_hand():
    data, model = toy_data(), toy_model()
    init = {"1.weight": torch.full((2, 2), 7.0), "2.weight": torch.zeros(2, 2)}
    cfg = RetrainConfig(epochs=2, lr=1.0, peak_epoch=0, batch_size=8, momentum=0.0, weight_decay=0.0)  # 8 clean
    seen = []

    def spy(idx):
        seen.append(idx.clone())
        if len(seen) == 2:  # after exactly one SGD step on layer "2"
            # at zero logits d(CE)/d(logits) = softmax - onehot = -+0.5; both clean classes give the same
            # outer product [[-.5, .5], [.5, -.5]], so W2 = -lr * mean = [[.5, -.5], [-.5, .5]]. Had the two
            # noisy examples been trained on, it would be 0.6 times that.
            torch.testing.assert_close(model[2].weight.detach(), torch.tensor([[0.5, -0.5], [-0.5, 0.5]]),
                                       rtol=0, atol=1e-7)
            assert torch.equal(model[1].weight.detach(), torch.eye(2))  # the other layer stays final

    res = retrain_model(model, data, init, cfg, layers=["2"], on_step=spy)
    assert [sorted(s.tolist()) for s in seen] == [list(range(2, 10))] * 2  # clean positions only, all of them
    acc = res.arrays["accuracy"]  # (1, 3, 4)
    # after the reset W2 = 0: every logit ties, argmax says class 0: half of each subset is class 0
    np.testing.assert_array_equal(acc[0, 0], [0.5, 0.5, np.nan, 0.5])
    # after training: clean and test right, the noisy examples get their true (not their given) label
    np.testing.assert_array_equal(acc[0, 2], [1.0, 0.0, np.nan, 1.0])
    assert torch.equal(model[2].weight, torch.eye(2)) and torch.equal(model[1].weight, torch.eye(2))  # restored
    assert all(p.requires_grad for p in model.parameters())


def test_stop_at_is_the_prefix_of_the_full_schedule():
    """--stop-at 1.0 stops after the epoch where clean-train accuracy reaches 100%; later rows repeat that model."""
    data, model = toy_data(), toy_model()
    init = {"1.weight": torch.full((2, 2), 7.0), "2.weight": torch.zeros(2, 2)}
    cfg = RetrainConfig(epochs=3, lr=1.0, peak_epoch=0, batch_size=8, momentum=0.0, weight_decay=0.0)
    full = retrain_model(model, data, init, cfg, layers=["2"]).arrays["accuracy"][0]
    assert full[1, 0] == 1.0  # one step (the hand-computed one above) puts every clean example right
    steps = []
    res = retrain_model(model, data, init, replace(cfg, stop_at=1.0), layers=["2"],
                        on_step=lambda idx: steps.append(1))
    assert len(steps) == 1  # epochs 2 and 3 never ran
    acc = res.arrays["accuracy"][0]
    np.testing.assert_array_equal(acc[:2], full[:2])
    np.testing.assert_array_equal(acc[2], acc[1]) and np.testing.assert_array_equal(acc[3], acc[1])
    assert res.summary["stopped_at_epoch"] == {"2": 1} and res.summary["stop_at"] == 1.0
    full_run = retrain_model(model, data, init, cfg, layers=["2"])
    assert full_run.summary["stop_at"] is None and "stopped_at_epoch" not in full_run.summary


def test_bn_train_mode_reestimates_every_norm(smoke_run):
    """--bn-mode train: the whole model in train mode; other norms' statistics move, their parameters do not."""
    loaded = open_run(smoke_run)
    model = loaded.model()
    final = {k: v.clone() for k, v in model.state_dict().items()}
    init = loaded.run.load_checkpoint(0)
    layer = layers(model)[-1]  # the head: every BatchNorm belongs to another layer
    norms = [n for n, m in model.named_modules() if isinstance(m, NORM_TYPES)]
    assert norms
    seen = []

    def spy(idx):
        seen.append(1)
        assert all(m.training for m in model.modules())
        state = model.state_dict()
        assert all(torch.equal(state[n], final[n]) for n, _ in model.named_parameters() if n not in layer.params)
        if len(seen) == 2:
            moved = [n for n in norms if not torch.equal(state[f"{n}.running_mean"], final[f"{n}.running_mean"])]
            assert moved == norms  # every other norm re-estimated its statistics on the first batch

    cfg = RetrainConfig(epochs=1, peak_epoch=0, batch_size=128, bn_mode="train")
    res = retrain_model(model, loaded.data, init, cfg, layers=[layer.name], on_step=spy)
    assert seen and res.summary["bn_mode"] == "train"
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in final.items()) and not model.training  # restored
    frozen = retrain_model(model, loaded.data, init, replace(cfg, bn_mode="frozen"), layers=[layer.name])
    assert not np.array_equal(frozen.arrays["accuracy"], res.arrays["accuracy"])  # the mode changes the outcome


def test_reinit_draws_a_fresh_seeded_layer(smoke_run):
    """--reset reinit: the layer starts from neither its initialization nor its final value, seeded, restored."""
    loaded = open_run(smoke_run)
    model = loaded.model()
    final = {k: v.clone() for k, v in model.state_dict().items()}
    init = loaded.run.load_checkpoint(0)
    layer = layers(model)[0]
    key = layer.params[0]
    first = {}

    def grab(tag):
        def spy(idx):
            if tag not in first:
                first[tag] = model.state_dict()[key].clone()
        return spy

    clean = int((~loaded.data.is_noisy).sum())  # one batch of every clean example
    cfg = RetrainConfig(epochs=1, peak_epoch=0, batch_size=clean, lr=1e-12, momentum=0.0, weight_decay=0.0)
    retrain_model(model, loaded.data, init, cfg, layers=[layer.name], on_step=grab("init"))
    for tag, seed in (("a", 0), ("b", 0), ("c", 1)):
        retrain_model(model, loaded.data, init, replace(cfg, reset="reinit", seed=seed), layers=[layer.name],
                      on_step=grab(tag))
    torch.testing.assert_close(first["init"], init[key].to(first["init"].dtype))
    assert not torch.equal(first["a"], init[key]) and not torch.equal(first["a"], final[key])
    assert torch.equal(first["a"], first["b"]) and not torch.equal(first["a"], first["c"])  # seeded by --seed
    assert first["a"].std() > 0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in final.items())


def test_retrain_config_checks():
    assert RetrainConfig().schedule().warmup == 0.5
    assert RetrainConfig().peak_epoch == 10 and RetrainConfig(epochs=4).peak_epoch == 2  # the peak follows the epochs
    with pytest.raises(ConfigError, match=r"peak_epoch \(--peak-epoch\) 10 must lie in \[0, 10\)"):
        RetrainConfig(epochs=10, peak_epoch=10)
    with pytest.raises(ConfigError):
        RetrainConfig(epochs=0)
    with pytest.raises(ConfigError):
        RetrainConfig(lr=-1)


def test_only_the_layer_changes_and_only_clean_examples(smoke_run):
    loaded = open_run(smoke_run)
    data = loaded.data
    model = loaded.model()
    final = {k: v.clone() for k, v in model.state_dict().items()}
    init = loaded.run.load_checkpoint(0)
    modules = dict(model.named_modules())
    clean = set(torch.nonzero(~data.is_noisy).flatten().tolist())
    for layer in (layers(model)[0], layers(model)[-1]):  # a conv with its BatchNorm, the linear head
        mine = set(layer_keys(model, layer))
        steps = []

        def spy(idx):
            assert set(idx.tolist()) <= clean  # never a noisy example
            steps.append(idx.clone())
            state = model.state_dict()
            for k, v in final.items():  # every tensor outside the layer is bit-identical to the final model
                if k not in mine:
                    assert torch.equal(state[k], v), k
            for name, m in modules.items():  # only the layer's own norm updates statistics
                if isinstance(m, NORM_TYPES) or isinstance(m, nn.Dropout):
                    assert m.training == (name in layer.modules), name
            assert all(p.requires_grad == (n in layer.params) for n, p in model.named_parameters())
            if len(steps) == 3:  # the layer itself does train (weights and, for a conv, its statistics)
                for k in layer.params + layer.buffers:
                    assert not torch.equal(state[k], init[k].to(state[k].dtype)), k

        cfg = RetrainConfig(epochs=2, peak_epoch=1, batch_size=128)
        res = retrain_model(model, data, init, cfg, layers=[layer.name], on_step=spy)
        per_epoch = len(steps) // 2
        for e in range(2):  # each epoch sees every clean example exactly once
            got = torch.cat(steps[e * per_epoch:(e + 1) * per_epoch]).tolist()
            assert sorted(got) == sorted(clean)
        assert res.arrays["accuracy"].shape == (1, 3, 4)
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in final.items())  # the model is back to final
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_the_published_codes_two_deviations_as_controls(smoke_run):
    """--trainable all: every parameter trains (the reset layer with them), nothing is cached, and the whole model is
    back afterwards; --examples all: the noisy examples enter the batches too, with their given (noisy) labels."""
    loaded = open_run(smoke_run)
    data = loaded.data
    model = loaded.model()
    final = {k: v.clone() for k, v in model.state_dict().items()}
    init = loaded.run.load_checkpoint(0)
    layer = layers(model)[-1]  # the head
    noisy = set(torch.nonzero(data.is_noisy).flatten().tolist())
    assert noisy
    seen, moved = [], []

    def spy(idx):
        seen.append(set(idx.tolist()))
        assert all(p.requires_grad for p in model.parameters())
        if len(seen) == 3:  # a layer other than the reset one has moved off its final value
            state = model.state_dict()
            moved.extend(k for k, _ in model.named_parameters() if k not in layer.params
                         and not torch.equal(state[k], final[k]))

    cfg = RetrainConfig(epochs=1, peak_epoch=0, batch_size=128, trainable="all")
    res = retrain_model(model, data, init, cfg, layers=[layer.name], on_step=spy)
    assert moved and not (set().union(*seen) & noisy)  # every layer trains, on clean examples only
    assert res.summary["trainable"] == "all" and res.summary["trained_on"] == "clean"
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in final.items())  # every tensor restored
    assert all(p.requires_grad for p in model.parameters())

    seen.clear()
    got = retrain_model(model, data, init, RetrainConfig(epochs=1, peak_epoch=0, batch_size=128, examples="all"),
                        layers=[layer.name], on_step=lambda idx: seen.append(idx.tolist()))
    order = [i for batch in seen for i in batch]
    assert sorted(order) == list(range(len(data.is_noisy)))  # one epoch: every example once, the noisy ones too
    assert got.summary["num_trained_on"] == len(order) and got.summary["num_clean_trained_on"] == len(order) - \
        len(noisy)
    assert got.summary["trained_on"].startswith("all (clean and noisy")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in final.items())


def test_restored_even_on_error(smoke_run):
    loaded = open_run(smoke_run)
    model = loaded.model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = []

    def dies(idx):
        n.append(1)
        if len(n) == 4:
            raise RuntimeError("killed mid-training")

    with pytest.raises(RuntimeError, match="killed"):
        retrain_model(model, loaded.data, loaded.run.load_checkpoint(0), RetrainConfig(epochs=2, peak_epoch=1),
                      layers=["0"], on_step=dies)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules()) and all(p.requires_grad for p in model.parameters())


def test_unknown_noise_is_refused(smoke_run):
    loaded = open_run(smoke_run)
    data = replace(loaded.data, noise_known=False)
    with pytest.raises(DataError, match="clean examples only"):
        retrain_model(loaded.model(), data, loaded.run.load_checkpoint(0))


def test_resume_skips_finished_layers(smoke_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir)
    loaded = open_run(run_dir)
    cfg = RetrainConfig(epochs=2, peak_epoch=1, batch_size=256)
    names = [l.name for l in layers(loaded.model())]
    steps = -(-int((~loaded.data.is_noisy).sum()) // 256)  # per epoch
    seen = []

    def dies_in_third_layer(idx):
        seen.append(1)
        if len(seen) == steps * 2 * 2 + 1:  # 2 epochs, 2 finished layers
            raise KeyboardInterrupt

    partial = Partial(loaded.run, "retraining", {"settings": "these"})
    with pytest.raises(KeyboardInterrupt):
        retrain_model(loaded.model(), loaded.data, loaded.run.load_checkpoint(0), cfg, partial=partial,
                      on_step=dies_in_third_layer)
    assert (run_dir / "probes" / "retraining" / "partial.npz").exists()
    seen.clear()
    res = retrain_model(loaded.model(), loaded.data, loaded.run.load_checkpoint(0), cfg, partial=partial,
                        on_step=lambda idx: seen.append(1))
    assert len(seen) == (len(names) - 2) * steps * 2  # only the two unfinished layers were trained
    fresh = retrain_model(loaded.model(), loaded.data, loaded.run.load_checkpoint(0), cfg)
    np.testing.assert_array_equal(fresh.arrays["accuracy"], res.arrays["accuracy"])  # seeded: same as uninterrupted
    # a different setting does not reuse the partial record
    seen.clear()
    retrain_model(loaded.model(), loaded.data, loaded.run.load_checkpoint(0), replace(cfg, lr=0.05),
                  partial=Partial(loaded.run, "retraining", {"settings": "others"}), layers=[names[0]],
                  on_step=lambda idx: seen.append(1))
    assert len(seen) == steps * 2


def test_cli_retrain_end_to_end_and_imported_run(smoke_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir)
    code = main(["retrain", str(run_dir), "--layers", "0,linear", "--epochs", "2", "--peak-epoch", "1", "--quiet",
                 "--bn-mode", "train", "--reset", "reinit", "--stop-at", "1.0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "done:" in out and "->" in out
    res = ProbeResult.load(open_run(run_dir).run, "retraining")
    assert res.arrays["accuracy"].shape == (2, 3, 4) and list(res.arrays["epochs"]) == [0, 1, 2]
    assert res.summary["init"] == "epoch 0 checkpoint" and res.summary["epochs"] == 2
    assert (res.summary["bn_mode"], res.summary["reset"], res.summary["stop_at"]) == ("train", "reinit", 1.0)
    assert open_run(run_dir).run.stage("retraining")["status"] == "done"
    # an imported run: the final checkpoint only; the initialization is rebuilt from the seed and equals epoch 0
    loaded = open_run(run_dir)
    with torch.random.fork_rng():
        torch.manual_seed(loaded.config.train.seed)
        rebuilt = make_model(loaded.config.model, loaded.data).state_dict()
    ckpt0 = loaded.run.load_checkpoint(0)
    assert all(torch.equal(rebuilt[k], ckpt0[k]) for k in ckpt0)
    for f in (run_dir / "checkpoints").glob("epoch_00[012].safetensors"):
        f.unlink()
    code = main(["retrain", str(run_dir), "--layers", "linear", "--epochs", "1", "--peak-epoch", "0", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert ProbeResult.load(open_run(run_dir).run, "retraining").summary["init"].startswith("rebuilt")


@pytest.mark.parametrize("argv,words", [
    (["--layers", "block9"], ["unknown layer 'block9'"]),
    (["--epochs", "4", "--peak-epoch", "4"], ["peak_epoch (--peak-epoch) 4"]),
    (["--lr", "0"], ["--lr takes a finite number above 0, not 0.0"]),
    (["--stop-at", "1.5"], ["--stop-at takes a number in (0, 1], not 1.5"]),
    (["--bn-mode", "eval"], ["--bn-mode", "frozen"]),
])
def test_cli_retrain_bad_input(smoke_run, tmp_path, capsys, argv, words):
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir)
    before = digest(run_dir)
    code = main(["retrain", str(run_dir), "--quiet", *argv])
    assert_one_line_error(code, capsys.readouterr()[1], *words)
    assert digest(run_dir) == before


def test_cli_retrain_without_checkpoints(smoke_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    before = digest(run_dir)
    code = main(["retrain", str(run_dir), "--quiet"])
    assert_one_line_error(code, capsys.readouterr()[1], "no checkpoints")
    assert digest(run_dir) == before


def _ablation():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "studies" / "retraining_ablation.py"
    spec = importlib.util.spec_from_file_location("retraining_ablation", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ablation_reads_recovery_and_the_early_stop_off_the_trajectory():
    abl = _ablation()
    subsets = ["clean_train", "noisy_train", "rare_train", "test"]
    # layer a: lost at the reset (20%), clean at 100% from epoch 2 when noisy is 60%, ends at 95%: recovered
    # layer b: kept through the reset (95%), ends at 92%: back, but never lost; clean never reaches 100%
    a = [[0.5, 0.2, -1, 0.5], [0.9, 0.4, -1, 0.9], [1.0, 0.6, -1, 0.9], [1.0, 0.95, -1, 0.9]]
    b = [[0.9, 0.95, -1, 0.9], [0.99, 0.9, -1, 0.9], [0.99, 0.91, -1, 0.9], [0.99, 0.92, -1, 0.9]]
    cell = {"accuracy": [a, b], "subsets": subsets}
    end, stop = abl.outcome(cell, False), abl.outcome(cell, True)
    np.testing.assert_allclose(end["noisy"], [0.95, 0.92])
    np.testing.assert_allclose(stop["noisy"], [0.6, 0.92]) and np.testing.assert_array_equal(stop["epoch"], [2, 3])
    assert list(abl.recovered(end)) == [True, False] and list(abl.recovered(stop)) == [False, False]
    # the claim as stated: 1 erased layer (a), back at the end (1 of 1, holds); b never lost, not counted
    assert abl.claim(end) == {"erased": 1, "back": 1, "kept": 1, "share": 1.0, "verdict": "holds"}
    assert abl.claim(stop)["share"] == 0.0 and abl.claim(stop)["verdict"] == "does not hold"


def test_ablation_study_end_to_end(smoke_run, tmp_path, monkeypatch, capsys):
    abl = _ablation()
    out = tmp_path / "abl"
    argv = ["retraining_ablation.py", "--runs", str(smoke_run), "--out", str(out), "--epochs", "2", "--layers",
            "linear", "--variants", "paper,with-noisy", "--quiet"]
    monkeypatch.setattr("sys.argv", argv)
    abl.main()
    cells = sorted(p.name for p in (out / "cells").glob("*.json"))
    assert len(cells) == 2 and cells[1].endswith("__with-noisy.json")
    noisy_cell = json.loads((out / "cells" / cells[1]).read_text())
    assert noisy_cell["options"]["examples"] == "all"
    table = (out / "ablation.md").read_text()
    assert "| paper | " in table and "| with-noisy + until 100% | " in table and "| lr-0.01 |" not in table
    assert "erased, then back" in table and "Noisy-train % per layer (width" in table
    capsys.readouterr()
    abl.main()  # finished cells are not run again
    assert "layers back" not in capsys.readouterr()[0].split("| variant")[0]
