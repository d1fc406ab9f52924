"""The public Python API on models memloc has never seen: every probe, ResNet-18, an MLP, and bad inputs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from toys import toy_model

import memloc
from memloc import ConfigError, DataError, MemlocError, RunError

# ----------------------------------------------------------------------------- models defined here, unknown to memloc

class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.act(self.norm(self.conv(x)))  # a residual connection


class ResLNNet(nn.Module):
    """Conv stem, one residual block, a LayerNorm'd hidden layer, a linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.block = Block(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(16, 32)
        self.ln = nn.LayerNorm(32)
        self.gelu = nn.GELU()
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.block(self.relu(self.bn(self.stem(x))))
        x = self.pool(x).flatten(1)
        return self.head(self.gelu(self.ln(self.fc1(x))))


def mlp(in_features: int, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 32), nn.ReLU(), nn.Linear(32, num_classes))


@pytest.fixture(scope="module")
def digits():
    return memloc.load_data(memloc.DataConfig(dataset="digits", noise=0.1, seed=0, train_size=600))


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """ResLNNet trained 3 epochs through the API, with its initialization, history and run directory."""
    run_path = tmp_path_factory.mktemp("api") / "run"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ResLNNet()
    init = copy.deepcopy(model.state_dict())
    history = memloc.train(model, digits, epochs=3, batch_size=64, device="cpu", run=run_path)
    return model, init, history, memloc.RunDir.open(run_path)


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- data

def test_wrap_data_known_noise_from_true_labels():
    x = np.zeros((6, 1, 4, 4), dtype=np.uint8)
    given = np.array([0, 1, 2, 0, 1, 2])
    true = np.array([0, 1, 2, 1, 1, 0])
    ds = memloc.wrap_data(x, given, x[:2], given[:2], true_labels=true)
    assert ds.noise_known and ds.num_classes == 3 and ds.input_shape == (1, 4, 4)
    assert ds.is_noisy.tolist() == [False, False, False, True, False, True]
    unknown = memloc.wrap_data(x, given)
    assert not unknown.noise_known and not unknown.is_noisy.any() and len(unknown.x_test) == 0


def test_from_torch_dataset_materializes_pairs():
    tds = torch.utils.data.TensorDataset(torch.rand(12, 3, 8, 8), torch.arange(12) % 4)
    ds = memloc.from_torch_dataset(tds, tds, noise_mask=np.arange(12) < 2)
    assert ds.x_train.shape == (12, 3, 8, 8) and ds.num_classes == 4 and int(ds.is_noisy.sum()) == 2
    with pytest.raises(DataError, match="max_examples"):
        memloc.from_torch_dataset(tds, max_examples=5)


# ----------------------------------------------------------------------------- each probe on a model defined here

def test_layers_resolve_on_residual_layernorm_model(trained):
    model, *_ = trained
    found = memloc.layers(model)
    assert [(l.name, l.kind, l.units) for l in found] == [
        ("stem", "conv", 16), ("block.conv", "conv", 16), ("fc1", "linear", 32), ("head", "linear", 10)]
    assert found[0].modules == ("stem", "bn", "relu") and found[2].modules == ("fc1", "ln", "gelu")


def test_train_writes_history_and_run(trained, digits):
    model, init, history, run = trained
    assert len(history.metrics) == 3 and history.records["loss"].shape == (3, digits.num_train)
    assert history.gradients["cosine"].shape == (4, 3)
    assert run.saved_epochs() == [0, 1, 2, 3]
    assert _same(run.load_checkpoint(0), init)


def test_flip_on_own_model(trained, digits):
    model, *_ = trained
    before = _state(model)
    res = memloc.flip(model, digits, examples=2, kinds=("clean", "noisy"), others=64, eval_subsample=64,
                      layers=("stem", "fc1"))
    assert res.probe == "flipping" and len(res.arrays["index"]) == 4
    assert list(res.arrays["layer_names"]) == ["stem", "fc1"]
    searched = ~res.arrays["already_wrong"]
    assert (res.arrays["num_units"][searched & res.arrays["flipped"]] >= 1).all()
    assert _same(before, _state(model))


def test_rewind_on_own_model_needs_history(trained, digits):
    model, init, history, run = trained
    with pytest.raises(RunError, match="training history"):
        memloc.rewind(model, digits)
    res = memloc.rewind(model, digits, states=run, layers=["head"])
    assert res.arrays["accuracy"].shape == (1, 4, 4)  # layers x epochs 0..3 x subsets (clean, noisy, rare, test)
    # rewinding to the final epoch is the final model
    final = res.summary["final"]
    assert res.arrays["accuracy"][0, -1, 0] == pytest.approx(final["clean_train_acc"], abs=1e-6)
    same = memloc.rewind(model, digits, states={0: init, 3: run.load_checkpoint(3)}, layers=["head"])
    np.testing.assert_allclose(same.arrays["accuracy"][0], res.arrays["accuracy"][0, [0, 3]], atol=1e-6)


def test_retrain_on_own_model_needs_init(trained, digits, tmp_path):
    model, init, history, run = trained
    with pytest.raises(RunError, match="initialization"):
        memloc.retrain(model, digits)
    before = _state(model)
    res = memloc.retrain(model, digits, init, epochs=2, peak_epoch=1, layers=["fc1"])
    assert res.arrays["accuracy"].shape == (1, 3, 4)
    four = memloc.retrain(model, digits, init, epochs=4, layers=["fc1"])  # the peak follows the epochs (2 of 4)
    assert four.arrays["accuracy"].shape == (1, 5, 4) and four.summary["peak_epoch"] == 2
    assert _same(before, _state(model))
    # a result of your own model saves into a fresh directory and loads back
    out = memloc.RunDir.create(tmp_path / "mine")
    res.save(out)
    back = memloc.ProbeResult.load(out, "retraining")
    np.testing.assert_array_equal(back.arrays["accuracy"], res.arrays["accuracy"])


def test_detect_with_and_without_history(trained, digits):
    model, init, history, run = trained
    plain = memloc.detect(model, digits)
    assert list(plain.arrays["score_names"]) == ["aum", "final_loss"]
    assert plain.summary["quality"] is not None and "eval-mode" in plain.summary["records"]
    full = memloc.detect(model, digits, history=history, rank_by="forgetting")
    assert list(full.arrays["score_names"]) == ["aum", "final_loss", "mean_loss", "forgetting", "first_learned"]
    from_run = memloc.detect(model, digits, history=run)
    np.testing.assert_allclose(from_run.arrays["raw"], memloc.detect(model, digits, history=history).arrays["raw"])


def test_detect_scores_by_hand():
    """The identity model's logits are the normalized inputs: clean margin +2, noisy -2."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 3).reshape(6, 1, 1, 2)
    true = torch.tensor([0, 1] * 3)
    given = true.clone()
    given[:2] = 1 - given[:2]
    ds = memloc.wrap_data(x, given, true_labels=true)
    res = memloc.detect(toy_model(), ds)
    raw = dict(zip(res.arrays["score_names"], res.arrays["raw"].T))
    np.testing.assert_allclose(raw["aum"], [-2, -2, 2, 2, 2, 2], atol=1e-5)
    np.testing.assert_allclose(raw["final_loss"][:2], math.log(1 + math.exp(2)), atol=1e-5)
    assert set(res.arrays["ranking"][:2]) == {0, 1}
    assert res.summary["quality"][0]["auroc"] == 1.0


def test_run_directory_entry_points_match_cli(tmp_path):
    """A probe given a run directory is the CLI's probe (saved into the run)."""
    from memloc.cli import main
    out = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--out", str(out), "--quiet", "--device", "cpu",
                 "--epochs", "2"]) == 0
    res = memloc.rewind(out, layers=["0"])
    assert res.summary["run"] == str(out)
    assert memloc.ProbeResult.load(memloc.RunDir.open(out), "rewinding").arrays["accuracy"].shape == (1, 3, 4)
    assert memloc.build_report(out).exists()


# ----------------------------------------------------------------------------- models memloc has never seen

def test_torchvision_resnet18_layers_and_flip():
    tv = pytest.importorskip("torchvision")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tv.models.resnet18(num_classes=10).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 32, 32, generator=gen)
    y = torch.arange(16) % 10
    ds = memloc.wrap_data(x, y, noise_mask=torch.arange(16) < 4)
    found = memloc.prepare(model, ds)
    assert len(found) == 21 and found[0].name == "conv1" and found[-1].name == "fc"
    # torchvision's BasicBlock calls one ReLU twice: no one's unit output, so the chain stops at the norm
    assert found[1].name == "layer1.0.conv1" and found[1].modules == ("layer1.0.conv1", "layer1.0.bn1")
    names = [l.name for l in found]
    assert names.index("layer2.0.downsample.0") < names.index("layer2.1.conv1")  # forward order
    res = memloc.flip(model, ds, examples=2, kinds=("noisy",), others=8, eval_subsample=8, copies=1,
                      layers=("layer4.1.conv2",), max_units=3)
    assert len(res.arrays["index"]) == 2 and (res.arrays["num_units"] <= 3).all()


def test_plain_mlp_on_feature_vectors():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(40, 6, generator=gen)
    y = (x[:, 0] > 0.5).long()
    ds = memloc.wrap_data(x, y, x[:10], y[:10], noise_mask=torch.arange(40) < 4)
    assert ds.input_shape == (6,)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    hist = memloc.train(model, ds, epochs=2, batch_size=16, device="cpu")
    assert [l.units for l in memloc.layers(model)] == [8, 2]
    res = memloc.flip(model, ds, examples=1, others=8, copies=1)
    assert len(res.arrays["index"]) == 2
    assert memloc.detect(model, ds, history=hist).arrays["raw"].shape == (40, 5)


# ----------------------------------------------------------------------------- bad input, before any long work

class MatmulOnly(nn.Module):
    """Parameters, but no conv or linear module: nothing memloc can call a unit."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(10, 64))

    def forward(self, x):
        return x.flatten(1) @ self.w.T


def test_model_without_conv_or_linear_layers(digits):
    with pytest.raises(ConfigError, match="no conv or linear"):
        memloc.train(nn.Sequential(nn.Flatten()), digits, epochs=1)
    with pytest.raises(ConfigError, match="no conv or linear"):
        memloc.flip(MatmulOnly(), digits)
    with pytest.raises(ConfigError, match="no conv or linear"):
        memloc.train(MatmulOnly(), digits, epochs=1)


def test_unknown_layer_names(trained, digits):
    model, init, history, run = trained
    for call in (lambda: memloc.flip(model, digits, layers=("nope",)),
                 lambda: memloc.rewind(model, digits, states=run, layers=["nope"]),
                 lambda: memloc.retrain(model, digits, init, layers=["nope"])):
        with pytest.raises(ConfigError, match="unknown layer 'nope'"):
            call()


def test_data_that_does_not_fit_the_model(digits):
    with pytest.raises(ConfigError, match="cannot take"):
        memloc.train(ResLNNet(in_channels=3), digits, epochs=1)  # digits are 1x8x8
    with pytest.raises(ConfigError, match="10 classes"):
        memloc.flip(ResLNNet(num_classes=4), digits)
    with pytest.raises(ConfigError, match="cannot take"):
        memloc.train(mlp(20), digits, epochs=1)  # 64 features, not 20


def test_noise_mask_of_the_wrong_length():
    x = np.zeros((5, 1, 2, 2), dtype=np.uint8)
    with pytest.raises(DataError, match="noise_mask has length 4 but there are 5"):
        memloc.wrap_data(x, [0, 1, 0, 1, 0], noise_mask=[0, 1, 0, 0])
    with pytest.raises(DataError, match="labels must lie in 0..1"):
        memloc.wrap_data(x, [0, 1, 0, 1, 2], num_classes=2)
    with pytest.raises(DataError, match="one label per example"):
        memloc.wrap_data(x, [0, 1])
    with pytest.raises(MemlocError):
        memloc.wrap_data(x, [0, 1, 0, 1, 0], x[:, :, :1], [0, 1, 0, 1, 0])  # test shape differs
    # floats outside the pixel ranges (e.g. already centred images) are accepted and standardized (issue #20)
    centred = memloc.wrap_data(x.astype(np.float32) - 0.5, [0, 1, 0, 1, 0])
    assert centred.normalization.kind == "standardize"


def test_retrain_refuses_unknown_noise(digits):
    x, y = digits.x_train, digits.y_train
    ds = memloc.wrap_data(x, y)
    with pytest.raises(DataError, match="noisy examples are not"):
        memloc.retrain(ResLNNet(), ds, ResLNNet().state_dict())


def test_help_memloc_is_a_quick_start_without_inherited_module_noise():
    import pydoc
    text = pydoc.render_doc(memloc, renderer=pydoc.plaintext)
    assert "Quick start" in memloc.__doc__ and "memloc run --preset smoke" in memloc.__doc__
    assert "inherited from torch.nn" not in text  # the nn.Module layers stay importable, out of __all__
    assert len(text.splitlines()) < 2500
    assert memloc.ExampleTiedDropout is memloc.core.dropout.ExampleTiedDropout and memloc.UnitScale
    assert all(hasattr(memloc, n) for n in memloc.__all__)


def test_no_public_name_hides_a_module_of_the_package():
    """`import memloc.X` gives module X for every module of the package: no re-exported function carries a module's
    name (memloc.bench_localize, the function, hid the module of the same name until it was renamed)."""
    import importlib
    import pkgutil
    import types
    for info in pkgutil.iter_modules(memloc.__path__):
        if info.name == "__main__":  # the command line itself
            continue
        module = importlib.import_module(f"memloc.{info.name}")
        assert isinstance(getattr(memloc, info.name), types.ModuleType), info.name
        assert getattr(memloc, info.name) is module, info.name
    import memloc.bench.benchmarks as bench
    assert memloc.bench_localize is bench.bench_localize and bench.BenchConfig is memloc.BenchConfig
