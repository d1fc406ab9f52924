"""Layer rewinding: a hand-checked toy, equality with the naive full-forward sweep, scoping, resume, CLI and bad
input."""

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import copy_of
from toys import assert_one_line_error, digest, toy_data, toy_model

from memloc.cli import main
from memloc.core.cutting import split_at
from memloc.core.errors import ConfigError, RunError
from memloc.core.files import load_into
from memloc.core.training import evaluate
from memloc.probes.base import ProbeResult
from memloc.probes.rewinding import choose_epochs, rewind, rewind_model
from memloc.probes.sweep import layer_keys, sweep_states
from memloc.tasks import ClassificationTask
from memloc.tasks.classification.models import build_model, layers
from memloc.tasks.experiment import open_run

# ----------------------------------------------------------------------------- shared fixtures

@pytest.fixture(scope="module")
def smoke_run(digits_master, tmp_path_factory):
    """The smoke preset (CLI) on 8x8 digits for speed, 3 epochs: 4 layers x 4 checkpoints (conftest's, copied)."""
    return copy_of(digits_master, tmp_path_factory.mktemp("rewind") / "run")


# ----------------------------------------------------------------------------- known answers

def test_toy_rewinding_known_by_hand():
    data, model = toy_data(), toy_model()
    final = {k: v.clone() for k, v in model.state_dict().items()}
    flipped = {"1.weight": -torch.eye(2), "2.weight": torch.eye(2)}  # epoch 0: the first layer negates
    res = rewind_model(model, data, {0: flipped, 1: final}, layers=None)
    acc = res.arrays["accuracy"]  # (L=2, E=2, S=4)
    assert list(res.arrays["layer_names"]) == ["1", "2"] and list(res.arrays["epochs"]) == [0, 1]
    # layer "1" at epoch 0: W2 W1 = -I, every prediction flips: clean 0/8, noisy 2/2 (their wrong label), test 0
    np.testing.assert_array_equal(acc[0, 0], [0.0, 1.0, np.nan, 0.0])
    # the final state and layer "2" (never changed): clean 8/8, noisy 0/2, test 10/10
    for li, e in [(0, 1), (1, 0), (1, 1)]:
        np.testing.assert_array_equal(acc[li, e], [1.0, 0.0, np.nan, 1.0])
    np.testing.assert_array_equal(res.arrays["final"], [1.0, 0.0, np.nan, 1.0])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in final.items())  # the model is back
    rows = res.rows
    assert {r["subset"] for r in rows} == {"clean_train", "noisy_train", "test"}  # empty rare subset left out
    assert len(rows) == 2 * 2 * 3


def test_subset_accuracy_counts():
    data = toy_data(n_noisy=2)
    hits = torch.ones(1, data.num_train, dtype=torch.bool)  # (1, N): every given label predicted
    hits_test = torch.zeros(1, len(data.y_test), dtype=torch.bool)  # (1, N_test): all wrong
    acc = ClassificationTask(data).accuracy(hits, hits_test)
    np.testing.assert_array_equal(acc, [[1.0, 1.0, np.nan, 0.0]])
    unknown = replace(data, noise_known=False)
    acc = ClassificationTask(unknown).accuracy(hits, hits_test)
    assert acc[0, 0] == 1.0 and np.isnan(acc[0, 1])  # without a noise mask: clean = all, noisy not measured
    hits[0, 0] = False  # one noisy example (index 0) no longer predicted as given: noisy 1/2, clean 8/8
    np.testing.assert_array_equal(ClassificationTask(data).accuracy(hits, hits_test), [[1.0, 0.5, np.nan, 0.0]])


def test_choose_epochs():
    saved = [0, 1, 2, 3, 4, 5, 6]
    assert choose_epochs(saved) == saved
    assert choose_epochs(saved, every=4) == [0, 4, 6]
    assert choose_epochs(saved, epochs=[4, 0]) == [0, 4]
    with pytest.raises(RunError, match="epoch 9 was not saved"):
        choose_epochs(saved, epochs=[0, 9])
    with pytest.raises(ConfigError):
        choose_epochs(saved, every=0)


# ----------------------------------------------------------------------------- the fast path equals the naive one

def test_split_equals_full_forward_resnet9():
    # residual blocks: the suffix needs the block input besides the layer's own input
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("resnet9", input_shape=(1, 28, 28), num_classes=10, width=0.125).eval()
        x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        for layer in layers(model):
            parts = split_at(model, layer)
            assert parts is not None, layer.name
            torch.testing.assert_close(parts[1](*parts[0](x)), ref, rtol=0, atol=0)


def _cpu_bf16(device, *, cache=True):
    """What `precision.autocast` does on a GPU, on the CPU: bf16 autocast, which caches each weight's cast."""
    return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache)


@pytest.mark.parametrize("bf16", [False, True])
def test_rewinding_equals_naive_sweep(smoke_run, monkeypatch, bf16):
    if bf16:  # the GPU's arithmetic: a sweep that kept the first state's cached bf16 weights fails here
        import memloc.core.inference
        import memloc.probes.sweep
        monkeypatch.setattr(memloc.probes.sweep, "autocast", _cpu_bf16)
        monkeypatch.setattr(memloc.core.inference, "autocast", _cpu_bf16)
    loaded = open_run(smoke_run)
    data = replace(loaded.data, x_train=loaded.data.x_train[:150], y_train=loaded.data.y_train[:150],
                   y_true=loaded.data.y_true[:150], is_noisy=loaded.data.is_noisy[:150],
                   is_rare=loaded.data.is_rare[:150], x_test=loaded.data.x_test[:100], y_test=loaded.data.y_test[:100])
    assert bool(data.is_noisy.any())
    model = loaded.model()
    epochs = loaded.run.saved_epochs()
    res = rewind_model(model, data, loaded.run.load_checkpoint, epochs=epochs, batch_size=64)
    # naive: a fresh final model per (layer, epoch), layer tensors loaded, the trainer's own evaluate()
    ckpt = {e: loaded.run.load_checkpoint(e) for e in epochs}
    m = loaded.model()
    for li, layer in enumerate(layers(model)):
        keys = layer_keys(model, layer)
        for ei, e in enumerate(epochs):
            state = dict(ckpt[epochs[-1]])
            state.update({k: ckpt[e][k] for k in keys})
            load_into(m, state, source="test")
            ev = evaluate(m, data, batch_size=64)
            want = [ev["clean_train_acc"], ev["noisy_train_acc"], ev["rare_train_acc"], ev["test_acc"]]
            want = np.array([np.nan if v is None else v for v in want])
            np.testing.assert_allclose(res.arrays["accuracy"][li, ei], want, atol=1e-6, err_msg=f"{layer.name} ep{e}")
    # the full-forward fallback gives the very same numbers
    slow = rewind_model(model, data, loaded.run.load_checkpoint, epochs=epochs, batch_size=64, split=False)
    np.testing.assert_array_equal(slow.arrays["accuracy"], res.arrays["accuracy"])


def test_keep_bn_stats_restores_weights_only(smoke_run):
    loaded = open_run(smoke_run)
    model = loaded.model()
    layer = layers(model)[0]
    with_stats = layer_keys(model, layer)
    without = layer_keys(model, layer, buffers=False)
    assert (any(k.endswith("running_mean") for k in with_stats)
            and any(k.endswith("num_batches_tracked") for k in with_stats))
    assert not any("running" in k or "num_batches" in k for k in without)
    assert set(layer.params) <= set(without)
    a = rewind_model(model, loaded.data, loaded.run.load_checkpoint, epochs=[0], layers=[layer.name])
    b = rewind_model(model, loaded.data, loaded.run.load_checkpoint, epochs=[0], layers=[layer.name],
                     keep_bn_stats=True)
    assert a.summary["keep_bn_stats"] is False and b.summary["keep_bn_stats"] is True
    assert not np.array_equal(a.arrays["accuracy"], b.arrays["accuracy"])  # the statistics matter


# ----------------------------------------------------------------------------- scoped and reversible

def test_sweep_restores_model_even_on_error(smoke_run):
    loaded = open_run(smoke_run)
    model = loaded.model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    layer = layers(model)[1]
    states = [{k: loaded.run.load_checkpoint(0)[k] for k in layer_keys(model, layer)}] * 2
    calls = []

    def boom(n):
        calls.append(n)
        raise RuntimeError("killed mid-sweep")

    with pytest.raises(RuntimeError, match="killed"):
        sweep_states(model, ClassificationTask(loaded.data), "train", layer, states, batch_size=64, on_batch=boom)
    assert calls
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())  # train/eval flags back as they were


def test_resume_skips_finished_layers(smoke_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir)
    import memloc.probes.rewinding as rw
    real = rw.sweep_accuracy
    seen = []

    def dies_on_third_layer(model, task, layer, *a, **k):
        seen.append(layer.name)
        if len(set(seen)) == 3:
            raise KeyboardInterrupt
        return real(model, task, layer, *a, **k)

    monkeypatch.setattr(rw, "sweep_accuracy", dies_on_third_layer)
    with pytest.raises(KeyboardInterrupt):
        rewind(run_dir, epochs=[0, 3])
    assert (run_dir / "probes" / "rewinding" / "partial.npz").exists()
    assert not (run_dir / "probes" / "rewinding" / "summary.json").exists()
    seen.clear()
    res = rewind(run_dir, epochs=[0, 3])
    names = [l for l in res.summary["layers"]]
    assert sorted(set(seen)) == sorted(names[2:])  # only the unfinished layers were swept again
    assert not (run_dir / "probes" / "rewinding" / "partial.npz").exists()
    monkeypatch.setattr(rw, "sweep_accuracy", real)
    fresh = rewind(open_run(run_dir), epochs=[0, 3], save=False)
    np.testing.assert_array_equal(fresh.arrays["accuracy"], res.arrays["accuracy"])


# ----------------------------------------------------------------------------- CLI end to end and bad input

def test_cli_rewind_end_to_end(smoke_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir)
    code = main(["rewind", str(run_dir), "--every", "2", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "done:" in out and "rewound to epoch 0" in out
    res = ProbeResult.load(open_run(run_dir).run, "rewinding")
    assert list(res.arrays["epochs"]) == [0, 2, 3]  # every 2nd saved epoch, and the last
    assert res.arrays["accuracy"].shape == (4, 3, len(ClassificationTask.subsets))  # layers x epochs x subsets
    assert (run_dir / "probes" / "rewinding" / "rewinding.csv").read_text().startswith("layer,layer_index,epoch,subset")
    assert open_run(run_dir).run.stage("rewinding")["status"] == "done"


@pytest.mark.parametrize("argv,words", [
    (["--layers", "nope"], ["unknown layer 'nope'"]),
    (["--epochs", "0,7"], ["epoch 7 was not saved"]),
    (["--epochs", "a,b"], ["--epochs takes comma-separated integers"]),
    (["--every", "0"], ["--every takes an integer of at least 1, not 0"]),
])
def test_cli_rewind_bad_input(smoke_run, tmp_path, capsys, argv, words):
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir)
    before = digest(run_dir)
    code = main(["rewind", str(run_dir), "--quiet", *argv])
    assert_one_line_error(code, capsys.readouterr()[1], *words)
    assert digest(run_dir) == before


def test_cli_rewind_needs_per_epoch_checkpoints(smoke_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir)
    for f in (run_dir / "checkpoints").glob("epoch_00[012].safetensors"):
        f.unlink()  # an imported run: the final checkpoint only
    before = digest(run_dir)
    code = main(["rewind", str(run_dir), "--quiet"])
    assert_one_line_error(code, capsys.readouterr()[1], "per-epoch checkpoints", "--checkpoint-every 1")
    assert digest(run_dir) == before
    shutil.rmtree(run_dir / "checkpoints")
    code = main(["rewind", str(run_dir), "--quiet"])
    assert_one_line_error(code, capsys.readouterr()[1], "no checkpoints", "memloc train")


def test_cli_rewind_not_a_run(tmp_path, capsys):
    code = main(["rewind", str(tmp_path), "--quiet"])
    assert_one_line_error(code, capsys.readouterr()[1], "not a memloc run")


@pytest.mark.gpu
def test_cuda_rewinding_to_the_final_epoch_is_the_final_model(tmp_path):
    """On a GPU (bf16 autocast) every layer rewound to the final epoch is the final model, and the grid is the CPU's."""
    out = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--dataset", "digits", "--train-size", "600", "--epochs", "3",
                 "--batch-size", "64", "--out", str(out), "--quiet", "--device", "cuda"]) == 0
    grids = {}
    for dev in ("cuda", "cpu"):
        loaded = open_run(out, device=dev)
        res = rewind_model(loaded.model(), loaded.data, loaded.run.load_checkpoint, epochs=loaded.run.saved_epochs())
        grids[dev] = res.arrays["accuracy"]  # (L, E, S)
        last = grids[dev][:, -1]
        np.testing.assert_allclose(last, np.broadcast_to(res.arrays["final"], last.shape), atol=0.01)
    # bf16 against fp32: a few near-ties may move; a stale weight would move whole columns
    np.testing.assert_allclose(grids["cuda"], grids["cpu"], atol=0.03)
