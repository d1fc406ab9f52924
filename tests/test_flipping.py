"""Greedy unit removal: a hand-set model with a known answer, the engine's guarantees, the CLI, the paper's
direction."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_of
from torch import nn
from toys import assert_one_line_error

from memloc.cli import main
from memloc.core.errors import ConfigError, DataError
from memloc.core.precision import native_bf16
from memloc.core.units import UnitMasks
from memloc.probes import flipping
from memloc.probes.flipping import FlipConfig, flip_units, select_examples
from memloc.tasks.classification.data import Dataset, model_input
from memloc.tasks.experiment import open_run

# ----------------------------------------------------------------------------- a model whose answer is known by hand

def _hand_model() -> nn.Module:
    """h = relu(W z) with h0 = relu(z_a), h1 = relu(z_b), h2 = relu(-z_a); logit0 = 2 h0, logit1 = 1."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
        model[1].bias.zero_()
        model[3].weight.copy_(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
        model[3].bias.copy_(torch.tensor([0.0, 1.0]))
    model.input_shape = (1, 1, 2)
    return model.eval()


def _hand_data() -> Dataset:
    # model inputs z = 2x - 1 (memloc normalizes [0, 1] images with mean 0.5, std 0.5)
    z = torch.tensor([[1.0, 0.0],    # 0: class 0 through h0 alone; zeroing unit 0 flips it
                      [1.0, 0.0],    # 1: labelled 1 (noisy): already predicted wrongly
                      [-1.0, 0.0],   # 2: labelled 1, h0 = 0: no removal can flip it
                      [-1.0, 0.5], [-1.0, -0.5], [-0.5, 0.5], [-0.8, 0.0]])  # others, class 1
    y = torch.tensor([0, 1, 1, 1, 1, 1, 1])
    y_true = torch.tensor([0, 0, 1, 1, 1, 1, 1])
    x = ((z + 1) / 2).view(-1, 1, 1, 2)
    return Dataset(name="hand", x_train=x, y_train=y, y_true=y_true, is_noisy=y != y_true,
                   is_rare=torch.zeros(7, dtype=torch.bool), x_test=x[:2].clone(), y_test=torch.tensor([0, 0]),
                   num_classes=2)


def _hand_cfg(**kw) -> FlipConfig:
    return FlipConfig(**{"indices": (0, 1, 2), "others": 4, "max_units": 2, "device": "cpu", **kw})


@pytest.mark.parametrize("sequential", [False, True])
def test_hand_model_known_answer(sequential):
    model, data = _hand_model(), _hand_data()
    res = flip_units(model, data, _hand_cfg(sequential=sequential))
    a = res.arrays
    assert a["index"].tolist() == [0, 1, 2]
    # example 0: exactly one unit, unit 0 of layer 0
    assert a["flipped"][0] and a["num_units"][0] == 1 and (a["unit_layer"][0, 0], a["unit_index"][0, 0]) == (0, 0)
    # example 1: already wrong -> 0 units
    assert a["already_wrong"][1] and a["num_units"][1] == 0 and a["flipped"][1]
    # example 2: cannot flip -> stops at the cap, recorded as not flipped
    assert not a["flipped"][2] and a["num_units"][2] == 2
    assert res.rows[0]["units"] == "0:0"
    # without h0 the model predicts class 1 everywhere: the clean example 0 is lost, the noisy example 1 is "won"
    assert a["clean_train_acc_after"][0] == pytest.approx(5 / 6)
    assert a["noisy_train_acc_after"][0] == 1.0 and a["train_acc_after"][0] == pytest.approx(6 / 7)
    assert res.summary["accuracy_before"]["train_acc"] == pytest.approx(6 / 7)
    assert res.summary["candidate_units"] == 3  # the classifier's units are not candidates
    # per kind: the already-wrong noisy example 1 is counted apart, not as "flipped"; shares are of the searched
    noisy, clean = res.summary["kinds"]["noisy"], res.summary["kinds"]["clean"]
    assert (noisy["examples"], noisy["already_wrong"], noisy["searched"], noisy["flipped"]) == (1, 1, 0, 0)
    assert noisy["flipped_share"] is None  # nothing searched: no share (not 1.0 from the already-wrong one)
    assert (clean["examples"], clean["searched"], clean["flipped"], clean["flipped_share"]) == (2, 2, 1, 0.5)


def test_no_input_noise_and_classifier_included():
    model, data = _hand_model(), _hand_data()
    res = flip_units(model, data, _hand_cfg(input_noise=0.0, include_classifier=True, indices=(0,)))
    assert res.arrays["num_units"][0] == 1 and res.summary["candidate_units"] == 5


def test_model_unchanged_and_hooks_removed_even_on_error(monkeypatch):
    model, data = _hand_model(), _hand_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    original = flipping._Flipper.step

    def broken(self, *args, **kw):
        original(self, *args, **kw)
        raise RuntimeError("boom")
    monkeypatch.setattr(flipping._Flipper, "step", broken)
    with pytest.raises(RuntimeError, match="boom"):
        flip_units(model, data, _hand_cfg())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())
    assert not model.training
    monkeypatch.undo()
    assert flip_units(model, data, _hand_cfg()).arrays["num_units"].tolist() == [1, 0, 2]


def test_config_and_selection_errors():
    with pytest.raises(ConfigError, match="unknown kind"):
        FlipConfig(kinds=("weird",))
    with pytest.raises(ConfigError, match="twice"):
        FlipConfig(indices=(1, 1))
    with pytest.raises(ConfigError, match="budget"):
        FlipConfig(budget=0)
    data = _hand_data()
    with pytest.raises(DataError, match="more than the 1 noisy"):
        select_examples(data, ["noisy"], 2)
    data.is_noisy[:] = False
    with pytest.raises(DataError, match="no noisy"):
        select_examples(data, ["noisy"], 1)
    data.noise_known = False
    with pytest.raises(DataError, match="no known noise mask"):
        select_examples(data, ["clean"], 1)
    idx, kinds = select_examples(_hand_data(), ["noisy", "clean"], 1, seed=3)
    assert kinds == ["noisy", "clean"] and idx[0] == 1 and len(set(idx)) == 2
    with pytest.raises(DataError, match="--others 10"):
        flip_units(_hand_model(), _hand_data(), _hand_cfg(others=10))
    with pytest.raises(DataError, match="outside"):
        flip_units(_hand_model(), _hand_data(), _hand_cfg(indices=(0, 99)))


# ----------------------------------------------------------------------------- a trained smoke model

@pytest.fixture(scope="module")
def smoke_run(smoke_master, tmp_path_factory):
    return copy_of(smoke_master, tmp_path_factory.mktemp("flip") / "run")


def _small(**kw) -> FlipConfig:
    return FlipConfig(**{"examples": 3, "others": 32, "eval_subsample": 100, "seed": 1, "device": "cpu",
                         "batch_examples": 4, **kw})


def test_batched_equals_sequential_and_is_deterministic(smoke_run):
    loaded = open_run(smoke_run, device="cpu")
    model = loaded.model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # in the same arithmetic (batched "auto" would take bf16 on a CPU that has it natively)
    seq = flip_units(model, loaded.data, _small(sequential=True, precision="fp32"))
    bat = flip_units(model, loaded.data, _small(precision="fp32"))
    again = flip_units(model, loaded.data, _small(batch_examples=2, precision="fp32"))
    assert seq.summary["precision"] == bat.summary["precision"] == "fp32"
    assert [r["units"] for r in seq.rows] == [r["units"] for r in bat.rows] == [r["units"] for r in again.rows]
    assert seq.arrays["num_units"].sum() > 0
    np.testing.assert_allclose(seq.arrays["train_acc_after"], bat.arrays["train_acc_after"], atol=0.011)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bf16_scores_pick_a_near_best_unit(smoke_run):
    """bf16 (the batched default on a GPU or a CPU with native bf16) scores the units as fp32 does, up to rounding."""
    loaded = open_run(smoke_run, device="cpu")
    model, data = loaded.model(), loaded.data
    assert not flipping.use_bf16(FlipConfig(sequential=True), torch.device("cpu"))  # the CPU baseline is fp32
    assert flipping.use_bf16(FlipConfig(), torch.device("cpu")) == native_bf16(torch.device("cpu"))
    picked = {}
    for precision in ("fp32", "bf16"):
        cfg = _small(precision=precision)
        cands, budget, idx, _, others, ev_tr, ev_te = flipping._plan(model, data, cfg)
        fl = flipping._Flipper(model, data, cfg, cands, others, ev_tr, ev_te, budget)
        assert fl.bf16 == (precision == "bf16")
        g = torch.Generator().manual_seed(0)
        masks = (torch.rand(len(idx), fl.masks.total, generator=g) > 0.1).float()  # (B, U): 10% removed
        labels = data.y_train[torch.as_tensor(idx)]
        with fl.masks.installed():
            _, scores = fl.step(list(idx), labels, masks, [0] * len(idx),
                                lambda p: torch.ones_like(p, dtype=torch.bool))
        picked[precision] = scores
    fp, bf = picked["fp32"], picked["bf16"]
    live = torch.isfinite(fp)
    assert torch.equal(live, torch.isfinite(bf))  # removed units are never scored
    scale = fp[live].abs().max()
    assert not torch.equal(bf[live], fp[live])  # the bf16 path really ran in bf16
    assert (bf[live] - fp[live]).abs().max() < 0.05 * scale  # bf16 keeps ~3 significant digits
    best = fp.max(1).values
    chosen = fp.gather(1, bf.argmax(1, keepdim=True)).squeeze(1)
    assert ((best - chosen) <= 0.02 * scale).all()  # the bf16 choice is the fp32 best or within rounding of it
    assert (bf.argmax(1) == fp.argmax(1)).float().mean() >= 0.5


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_bad_inputs_leave_the_run_intact(smoke_run, tmp_path, capsys):
    before = _digest(smoke_run)
    small = ["--others", "16", "--eval-subsample", "50", "--quiet", "--device", "cpu"]
    code, _, err = _cli(capsys, "flip", str(smoke_run), "--layers", "nope", *small)
    assert_one_line_error(code, err, "unknown layer 'nope'")
    code, _, err = _cli(capsys, "flip", str(smoke_run), "--kind", "noisy", "--examples", "5000", *small)
    assert_one_line_error(code, err, "noisy training examples available")
    code, _, err = _cli(capsys, "flip", str(smoke_run), "--precision", "fp16", *small)
    assert_one_line_error(code, err, "unknown precision 'fp16'")
    code, _, err = _cli(capsys, "flip", str(smoke_run), "--kind", "rare", *small)
    assert_one_line_error(code, err, "no rare")
    code, _, err = _cli(capsys, "flip", str(smoke_run), "--indices", str(tmp_path / "missing.npy"), *small)
    assert_one_line_error(code, err, "does not exist")
    assert _digest(smoke_run) == before
    bare = tmp_path / "bare"
    shutil.copytree(smoke_run, bare)
    shutil.rmtree(bare / "checkpoints")
    code, _, err = _cli(capsys, "flip", str(bare), *small)
    assert_one_line_error(code, err, "no checkpoints")
    assert not (bare / "probes").exists()


def test_cli_end_to_end_and_resume(smoke_run, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    args = ["flip", str(run), "--examples", "2", "--others", "16", "--eval-subsample", "50", "--batch-examples", "2",
            "--seed", "1", "--device", "cpu", "--quiet"]
    # a probe killed after its first chunk of examples ...
    original, calls = flipping._Flipper.accuracies, []

    def dies(self, masks):
        calls.append(1)
        if len(calls) == 3:  # the base model, chunk 1, then killed at chunk 2
            raise KeyboardInterrupt
        return original(self, masks)
    monkeypatch.setattr(flipping._Flipper, "accuracies", dies)
    assert _cli(capsys, *args)[0] == 130
    with np.load(run / "probes" / "flipping" / "partial.npz") as z:  # the engine's resumable progress
        state = json.loads(str(z["__state__"]))
    assert len(state["records"]) == 2
    assert not (run / "probes" / "flipping" / "summary.json").exists()
    monkeypatch.undo()
    # ... continues with the examples not done
    code, out, err = _cli(capsys, *args)
    assert code == 0, err
    assert "(2 already done)" in out and "noisy" in out and "done:" in out
    d = run / "probes" / "flipping"
    summary = json.loads((d / "summary.json").read_text())
    assert set(summary["kinds"]) == {"clean", "noisy"} and summary["examples"] == 4
    with np.load(d / "arrays.npz") as z:
        assert len(set(z["index"].tolist())) == 4 and z["unit_layer"].shape[0] == 4
    rows = (d / "flipping.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("index,kind,label")
    first = {r["index"]: r["units"] for r in state["records"]}
    loaded = open_run(run, device="cpu")
    fresh = flip_units(loaded.model(), loaded.data, _small(examples=2, others=16, eval_subsample=50, batch_examples=2))
    by_index = {int(i): u for i, u in zip(fresh.arrays["index"], fresh.rows)}
    for i, units in first.items():
        assert by_index[i]["units"] == " ".join(f"{a}:{b}" for a, b in units)
    # other settings over an existing probe need --overwrite
    code, _, err = _cli(capsys, *args[:-1], "--others", "8", "--quiet")
    assert_one_line_error(code, err, "--overwrite")
    assert _cli(capsys, *args[:-1], "--others", "8", "--quiet", "--overwrite")[0] == 0


# ----------------------------------------------------------------------------- the paper's direction (slow)

@pytest.mark.study  # ~4-5 min on the 2-core AMD machine without bf16: outside CI's budget (README); `pytest -m study`
def test_paper_direction_on_mnist5k(mnist5k_master, tmp_path):
    # resnet9 at width 0.25 memorizes the 10% noisy labels of 2000 mnist5k examples (batch 128, 25 epochs): the
    # session's run (conftest), shared with the depth probe's slow test; flipping writes, so into a copy. 30
    # examples per kind (50 took 376 s on the 2-core AMD machine without bf16; 30 take about 250 s)
    from conftest import copy_of
    out = copy_of(mnist5k_master, tmp_path / "run")
    res = flipping.flip(out, FlipConfig(examples=30, others=128, eval_subsample=500, device="cpu"), progress=False)
    k = res.summary["kinds"]
    c, n = k["clean"], k["noisy"]
    assert res.summary["accuracy_before"]["noisy_train_acc"] > 0.9  # the noisy labels are memorized
    assert n["median_units"] < c["median_units"]
    assert n["share_flipped_under_10"] > c["share_flipped_under_10"]
    assert n["mean_train_acc_drop"] < c["mean_train_acc_drop"]
    assert c["layers_used"] > 1 and n["layers_used"] > 1


# ----------------------------------------------------------------------------- the fast accuracy path == full forwards

def _random_resnet9(data: Dataset) -> nn.Module:
    """An untrained resnet9 at width 0.125 with random BatchNorm statistics (so its predictions vary)."""
    from memloc.tasks.classification.models import build_model
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same weights whichever tests ran before
        model = build_model("resnet9", input_shape=tuple(data.x_train.shape[1:]), num_classes=data.num_classes,
                            width=0.125)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
    return model.eval()


def _masks_from_layer(fl, j: int, k: int, seed: int) -> torch.Tensor:
    """k masks (k, U) whose first edited candidate layer is j: 30% of the units of layers j.. removed."""
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(k, fl.masks.total, generator=g) > 0.3).float()
    m[:, :int(fl.masks.offsets[j])] = 1
    m[:, int(fl.masks.offsets[j])] = 0  # surely edited at layer j
    return m


@pytest.fixture(scope="module")
def models_with_skips(smoke_run):
    loaded = open_run(smoke_run, device="cpu")
    return loaded.data, {"cnn": loaded.model(), "resnet9": _random_resnet9(loaded.data)}


@pytest.mark.parametrize("name", ["cnn", "resnet9"])
def test_split_with_mask_hooks_equals_full_forward(models_with_skips, name):
    data, models = models_with_skips
    model = models[name]
    cfg = _small()
    cands, budget, _, _, others, ev_tr, ev_te = flipping._plan(model, data, cfg)
    fl = flipping._Flipper(model, data, cfg, cands, others, ev_tr[:8], ev_te[:0], budget)
    x = model_input(data.x_train[:8], fl.device)  # (8, C, H, W)
    with fl.masks.installed():
        for j in range(len(cands)):
            prefix, suffix, k = fl._split(j)
            m = _masks_from_layer(fl, j, 1, seed=j).expand(8, -1)  # (8, U)
            fl.masks.rows = m
            full = fl.model(x)  # the search's own copy (norms folded), which carries the hooks
            fl.masks.rows = None
            live = list(prefix(x))
            # the hook of layer j is not in the suffix: apply its mask to the cached activations by hand
            dim = 1 if cands[j].kind == "conv" else -1
            shape = [8] + [1] * (live[k].dim() - 1)
            shape[dim % live[k].dim()] = cands[j].units
            live[k] = live[k] * m[:, fl.masks.offsets[j]:fl.masks.offsets[j + 1]].reshape(shape)
            fl.masks.rows = m  # the hooks of the later layers fire inside the suffix
            cut = suffix(*live)
            torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-5)
            fl.masks.rows = None
            assert not torch.allclose(fl.model(x), full)  # the masks did edit the model
            torch.testing.assert_close(fl.model(x), model(x), rtol=1e-4, atol=1e-5)  # folding keeps the function


def test_edited_flags_name_exactly_the_layers_with_a_removed_unit(models_with_skips):
    data, models = models_with_skips
    cands = flipping.candidate_layers(models["resnet9"], FlipConfig())
    um = UnitMasks(models["resnet9"], cands)
    L, off = len(cands), um.offsets
    assert um.edited_of(torch.ones(3, um.total)) == [False] * L
    for j in range(L):
        for unit in (int(off[j]), int(off[j + 1]) - 1):  # the first and the last unit of layer j
            m = torch.ones(2, um.total)
            m[1, unit] = 0
            assert um.edited_of(m) == [i == j for i in range(L)], (j, unit)
    m = torch.ones(2, um.total)
    m[0, int(off[1])], m[1, int(off[L - 1])] = 0, 0  # different rows, different layers
    assert um.edited_of(m) == [i in (1, L - 1) for i in range(L)]


@pytest.mark.parametrize("name,precision", [("cnn", "fp32"), ("resnet9", "fp32"), ("resnet9", "bf16")])
def test_cached_accuracies_equal_full_forward_accuracies(models_with_skips, name, precision):
    data, models = models_with_skips
    model = models[name]
    cfg = _small(eval_subsample=120, eval_rows=300)  # several data chunks and mask chunks per group
    cands, budget, _, _, others, ev_tr, ev_te = flipping._plan(model, data, cfg)
    fast = flipping._Flipper(model, data, _small(eval_subsample=120, eval_rows=300, precision=precision),
                             cands, others, ev_tr, ev_te, budget)
    slow = flipping._Flipper(model, data, _small(eval_subsample=120, eval_rows=300, sequential=True),
                             cands, others, ev_tr, ev_te, budget)
    assert fast.cache and not slow.cache
    masks = torch.cat([_masks_from_layer(fast, j, 2, seed=10 + j) for j in range(len(cands))]
                      + [torch.ones(2, fast.masks.total)])  # every first edited layer, and the unedited model
    masks = masks[torch.randperm(len(masks), generator=torch.Generator().manual_seed(0))]
    with fast.masks.installed():
        a = fast.accuracies(masks)
    with slow.masks.installed():
        b = slow.accuracies(masks)
    # the batched mode runs a copy with BatchNorm folded into the convs: the same function up to float
    # rounding, which may move one near-tied example (1/120) across a decision boundary; bf16 rounds coarser
    ties = 1 if precision == "fp32" else 3
    one = {k: (ties + 0.01) / max(1.0, float(n)) for k, n in zip(fast.set_names, fast.sets.sum(1))}
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert (ra[k] is None) == (rb[k] is None)
            if ra[k] is not None:
                assert abs(ra[k] - rb[k]) <= one[k], (k, ra[k], rb[k])
    if precision == "fp32":
        assert sum(ra == rb for ra, rb in zip(a, b)) >= len(a) - 2
    assert len({r["train_acc"] for r in a}) > 3  # the edits change the accuracy: the comparison is not vacuous
