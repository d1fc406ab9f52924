"""Any data a user brings (docs/your-data.md): small images, 1-D signals and features, their own test split, a model
chosen by the input shape, a normalization that fits the values, and a report that draws whatever shape it gets."""

import json

import numpy as np
import pytest
import torch
from toys import assert_one_line_error

import memloc
from memloc.cli import main
from memloc.core.dropout import example_indices, memorization_mask
from memloc.core.figures import gallery_figure, png
from memloc.tasks.classification.data import DataConfig, Normalization, load, model_input, standardize_stats
from memloc.tasks.classification.models import MODELS, ChannelsLast, SmallCNN1d, build_model, default_model, layers
from memloc.tasks.experiment import ModelConfig, open_run


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def features(path, n=600, f=40, k=4, *, seed=0, test=0):
    """(n, f) float features in [-5, 5]: a prototype per class plus noise (and `test` more as x_test / y_test)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n + test)
    protos = rng.uniform(-3, 3, (k, f))
    x = np.clip(protos[y] + rng.normal(0, 1, (n + test, f)), -5, 5).astype(np.float32)
    arrays = {"x": x[:n], "y": y[:n]}
    if test:
        arrays.update(x_test=x[n:], y_test=y[n:])
    np.savez(path, **arrays)
    return path


# ----------------------------------------------------------------------------- a model that fits the data

@pytest.mark.parametrize("shape,device,expected", [
    ((1, 28, 28), "cpu", ("resnet9", 0.25)), ((3, 32, 32), "cuda", ("resnet9", 1.0)),
    ((1, 11, 11), "cpu", ("resnet9", 0.25)), ((1, 8, 8), "cpu", ("cnn", 1.0)), ((3, 10, 12), "cuda", ("cnn", 1.0)),
    ((1, 2, 2), "cpu", ("mlp", 1.0)), ((2, 40), "cpu", ("cnn1d", 1.0)), ((1, 3), "cpu", ("mlp", 1.0)),
    ((40,), "cpu", ("mlp", 1.0)),
])
def test_default_model_by_input_shape(shape, device, expected):
    assert default_model(shape, device_type=device) == expected
    cfg = ModelConfig().resolved(torch.device(device), input_shape=shape)  # what a run without --model builds
    assert (cfg.name, cfg.width) == expected and MODELS[cfg.name].fits(shape)
    build_model(cfg.name, input_shape=shape, num_classes=3, width=0.25)  # and it builds


def test_model_choice_waits_for_the_shape_and_keeps_named_models():
    cpu = torch.device("cpu")
    assert ModelConfig().resolved(cpu).name is None  # a study resolves before the data is loaded: chosen later
    assert ModelConfig(name="resnet9").resolved(cpu).width == 0.25  # the CPU default's width, as before
    assert ModelConfig(name="cnn").resolved(cpu, input_shape=(40,)).name == "cnn1d"
    assert ModelConfig(name="cnn").resolved(cpu, input_shape=(1, 8, 8)).name == "cnn"
    assert ModelConfig(name="mlp", width=0.5).resolved(cpu, input_shape=(1, 8, 8)).width == 0.5
    assert isinstance(build_model("cnn", input_shape=(2, 30), num_classes=3), SmallCNN1d)


def test_train_digits_without_model_prints_the_choice(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--dataset", "digits", "--epochs", "1", "--out", str(out), "--quiet")
    assert code == 0, err
    assert stdout.count("model: cnn (chosen for 1x8x8 images; --model to override)") == 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["name"] == "cnn" and cfg["model"]["width"] == 1.0
    assert cfg["data"]["normalize"] == "pixels" and cfg["data"]["norm_mean"] is None
    assert open_run(out).model().__class__.__name__ == "SmallCNN"


def test_run_digits_with_the_default_preset_without_model(tmp_path, capsys, one_thread):
    """`memloc run --dataset digits` as a new user types it: the default preset, the model chosen by shape
    (about 35 s on one thread)."""
    out = tmp_path / "study"
    code, stdout, err = run_cli(capsys, "run", "--dataset", "digits", "--out", str(out), "--quiet")
    assert code == 0, err
    assert "model: cnn (chosen for 1x8x8 images; --model to override)" in stdout
    base = json.loads((out / "base" / "config.json").read_text())
    assert base["model"]["name"] == "cnn" and base["model"]["width"] == 1.0
    assert json.loads((out / "dropout" / "config.json").read_text())["model"]["name"] == "cnn"
    assert (out / "base" / "probes" / "flipping" / "summary.json").exists()  # it memorized: every probe ran
    assert (out / "report" / "report.html").exists()


# ----------------------------------------------------------------------------- 1-D data end to end

def test_flat_features_run_the_smoke_study_end_to_end(tmp_path, capsys, one_thread):
    """(N, 40) floats in [-5, 5]: standardized, the smoke preset's small CNN in its 1-D form, every probe, report."""
    data = features(tmp_path / "feat.npz")
    out = tmp_path / "study"
    code, stdout, err = run_cli(capsys, "run", "--preset", "smoke", "--dataset", str(data), "--out", str(out),
                                "--quiet")
    assert code == 0, err
    assert "model: cnn1d (--model cnn on 40 features is its 1-D form)" in stdout
    assert f"no x_test in {data}: holding out 20% of the training examples as the test split (--holdout)" in stdout
    assert "normalize: standardize (inferred for features with values in [-5, 5]" in stdout
    cfg = json.loads((out / "base" / "config.json").read_text())
    assert cfg["model"]["name"] == "cnn1d" and cfg["data"]["normalize"] == "standardize"
    assert len(cfg["data"]["norm_mean"]) == 40
    for probe in ("rewinding", "retraining", "flipping", "detection"):
        assert (out / "base" / "probes" / probe / "summary.json").exists(), probe
    assert (out / "dropout" / "probes" / "dropout" / "summary.json").exists()  # example-tied dropout in cnn1d
    page = (out / "report" / "report.html").read_text()
    assert (out / "report" / "figures" / "detection_suspects.png").exists() and "detection_suspects" in page


def test_sequences_are_read_as_channels_and_get_the_1d_cnn(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(3, 2, (60, 2, 30)).astype(np.float32)  # (N, C, L): not square, not uint8 -> sequences
    np.savez(tmp_path / "seq.npz", x=x, y=np.arange(60) % 3)
    cfg = DataConfig(dataset=str(tmp_path / "seq.npz"))
    ds = load(cfg)
    assert ds.input_shape == (2, 30) and default_model(ds.input_shape) == ("cnn1d", 1.0)
    assert any("read as sequences of shape (2, 30)" in n for n in ds.notes)
    # standardize: per channel, over the training split, recorded in the config
    assert cfg.normalize == "standardize" and len(cfg.norm_mean) == 2
    z = model_input(ds.x_train, torch.device("cpu"), ds.normalization)
    assert torch.allclose(z.mean((0, 2)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(z.std((0, 2), unbiased=False), torch.ones(2), atol=1e-4)
    square = load(DataConfig(dataset=str(tmp_path / "seq.npz"), layout="images"))
    assert square.input_shape == (1, 2, 30)  # --layout images: (N, H, W)


def test_cnn1d_layers_units_and_example_tied_dropout_per_channel():
    from memloc.core.dropout import ExampleTiedDropout
    after = lambda pos, units: ExampleTiedDropout(0.5, 0.3, seed=0, layer_id=pos)  # noqa: E731
    m = build_model("cnn1d", input_shape=(2, 30), num_classes=3, width=0.25, after_block=after)
    ls = layers(m)
    assert [l.kind for l in ls] == ["conv"] * 3 + ["linear"] and [l.units for l in ls] == [8, 16, 32, 3]
    # each conv with its BatchNorm1d (rewound and retrained with it) and its ReLU (whose output holds the units)
    assert ls[0].modules == ("block1.0", "block1.1", "block1.2") and ls[0].unit_dim == 1
    assert ls[0].buffers == ("block1.1.running_mean", "block1.1.running_var")
    seen = {}
    m.drop1.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0], y=out))
    assert isinstance(m.drop1, ChannelsLast)
    idx = torch.arange(5) + 100
    m.train()
    with example_indices(m, idx):
        m(torch.randn(5, 2, 30))
    x, y = seen["x"], seen["y"]  # (B, C, L)
    kept = memorization_mask(idx, 8, p_gen=0.5, p_mem=0.3, seed=0, layer_id=0)  # (B, C)
    assert torch.equal(y, x * kept[:, :, None].to(x.dtype))  # one decision per channel, every position


# ----------------------------------------------------------------------------- the user's test split, normalization

def test_npz_with_x_test_uses_it(tmp_path, capsys, one_thread):
    data = features(tmp_path / "split.npz", n=400, test=100)
    ds = load(DataConfig(dataset=str(data)))
    assert ds.num_train == 400 and len(ds.x_test) == 100 and len(ds.y_test) == 100
    assert not any("holding out" in n for n in ds.notes)
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--dataset", str(data), "--epochs", "1", "--out", str(out), "--quiet")
    assert code == 0, err
    assert "holding out" not in stdout and "model: mlp (chosen for 40 features; --model to override)" in stdout
    assert len(np.load(out / "data.npz")["test_labels"]) == 100


def test_standardize_statistics_are_recorded_and_reused(tmp_path, capsys, one_thread):
    data = features(tmp_path / "feat.npz", n=200)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--dataset", str(data), "--epochs", "1", "--out", str(out), "--quiet")
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    loaded = open_run(out)
    x = loaded.data.x_train.numpy().astype(np.float64)
    np.testing.assert_allclose(cfg["data"]["norm_mean"], x.mean(0), atol=1e-6)
    np.testing.assert_allclose(cfg["data"]["norm_std"], x.std(0), atol=1e-6)
    assert loaded.data.normalization == Normalization("standardize", tuple(cfg["data"]["norm_mean"]),
                                                      tuple(cfg["data"]["norm_std"]))
    # the recorded statistics are what a reopened run normalizes with, not a recomputation
    cfg["data"]["norm_mean"] = [0.0] * 40
    cfg["data"]["norm_std"] = [2.0] * 40
    (out / "config.json").write_text(json.dumps(cfg))
    again = open_run(out).data
    z = model_input(again.x_train[:3], torch.device("cpu"), again.normalization)
    assert torch.equal(z, again.x_train[:3] / 2)


def test_normalize_choices_and_hand_checked_stats():
    x = np.array([[0.0, 10.0], [2.0, 10.0], [4.0, 10.0]], dtype=np.float32)  # (N, F): feature 1 is constant
    norm = standardize_stats(x)
    assert norm.mean == (2.0, 10.0) and norm.std[0] == pytest.approx(np.sqrt(8 / 3)) and norm.std[1] == 1.0
    out = norm(torch.from_numpy(x))
    assert torch.allclose(out[:, 1], torch.zeros(3)) and torch.allclose(out[:, 0].mean(), torch.tensor(0.0))
    raw = torch.tensor([[3.0, -7.0]])
    assert torch.equal(Normalization("none")(raw), raw)
    assert torch.equal(Normalization()(torch.tensor([[0, 255]], dtype=torch.uint8)), torch.tensor([[-1.0, 1.0]]))
    digits = load(DataConfig(dataset="digits", normalize="standardize"))
    assert len(digits.normalization.mean) == 1 and digits.x_train.dtype == torch.uint8  # per channel, stored as is


def test_wrap_data_takes_any_finite_floats_and_1d_shapes():
    rng = np.random.default_rng(0)
    x = rng.uniform(-5, 5, (30, 40)).astype(np.float32)
    ds = memloc.wrap_data(x, np.arange(30) % 3)
    assert ds.input_shape == (40,) and ds.normalization.kind == "standardize"
    seq = memloc.wrap_data(rng.normal(size=(30, 2, 16)), np.arange(30) % 3)
    assert seq.input_shape == (2, 16) and len(seq.normalization.mean) == 2
    images = memloc.wrap_data(rng.integers(0, 256, (30, 1, 8, 8)).astype(np.uint8), np.arange(30) % 3)
    assert images.normalization.kind == "pixels"
    with pytest.raises(memloc.DataError, match="normalize='pixels'"):
        memloc.wrap_data(x, np.arange(30) % 3, normalize="pixels")


# ----------------------------------------------------------------------------- the report draws any shape

@pytest.mark.parametrize("examples", [
    np.random.default_rng(0).normal(size=(5, 40)),  # features: line plots
    np.random.default_rng(0).normal(size=(5, 2, 30)).astype(np.float32),  # sequences: a line per channel
    np.random.default_rng(0).uniform(-2, 2, size=(5, 3, 8, 8)),  # standardized images
    np.random.default_rng(0).integers(0, 256, size=(5, 2, 6, 6)).astype(np.uint8),  # 2-channel images
    np.arange(5.0),  # one value each: text
    np.zeros((5, 2, 2, 2, 2)),  # anything else: text
])
def test_gallery_draws_any_shape(examples):
    data = png(gallery_figure(examples, [f"#{i}" for i in range(len(examples))], columns=4))
    assert data.startswith(b"\x89PNG")


# ----------------------------------------------------------------------------- errors: one line, exit 2

@pytest.mark.parametrize("case,args,words", [
    ("nan", [], ["NaN", "clean"]),
    ("feat", ["--normalize", "pixels"], ["--normalize pixels", "--normalize standardize"]),
    ("feat", ["--model", "resnet9"], ["resnet9 cannot take inputs of shape (40,)", "memloc then chooses mlp"]),
    ("no_y_test", [], ["has x_test but no y_test"]),
    ("test_shape", [], ["x_test examples have shape (30,)", "same example shape"]),
    ("five_d", [], ["(N, F) features, (N, C, L) sequences"]),
    ("feat", ["--layout", "sequences"], ["--layout sequences reads a 3-D x", "drop --layout"]),
])
def test_bad_data_is_one_line_exit_2(tmp_path, capsys, case, args, words):
    x = np.zeros((20, 40), dtype=np.float32)
    y = np.arange(20) % 2
    files = {"feat": dict(x=x + np.linspace(-5, 5, 40, dtype=np.float32), y=y),
             "nan": dict(x=np.where(np.arange(40) == 3, np.nan, x), y=y),
             "no_y_test": dict(x=x, y=y, x_test=x[:5]),
             "test_shape": dict(x=x, y=y, x_test=x[:5, :30], y_test=y[:5]),
             "five_d": dict(x=np.zeros((20, 1, 2, 2, 2)), y=y)}
    np.savez(tmp_path / "d.npz", **files[case])
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--dataset", str(tmp_path / "d.npz"), *args, "--epochs", "1",
                           "--out", str(out), "--quiet")
    assert_one_line_error(code, err, *words)
    assert not out.exists()


def test_images_on_a_raw_scale_say_the_inferred_normalization_and_warn(tmp_path):
    """8x8 digits stored as 0..16 fit neither pixel scale: the inferred normalization names the range and a warning
    says what to pass (issue #37); the built-in copy, scaled to 0..255, does not warn."""
    from sklearn.datasets import load_digits
    digits = load_digits()  # 8x8 images stored as 0..16
    np.savez(tmp_path / "d016.npz", x=digits.images[:300], y=digits.target[:300])
    data = load(DataConfig(dataset=str(tmp_path / "d016.npz")))
    assert "normalize: pixels (inferred for images with values in [0, 16]; --normalize pixels|standardize|none to " \
           "choose)" in data.notes
    (line,) = [n for n in data.notes if n.startswith("warning:")]
    assert "[0, 16] fit neither pixels in [0, 1] nor in [0, 255]" in line and "--normalize standardize" in line
    chosen = load(DataConfig(dataset=str(tmp_path / "d016.npz"), normalize="standardize"))
    assert not [n for n in chosen.notes if n.startswith(("warning:", "normalize:"))]
    fine = load(DataConfig(dataset="digits"))  # the built-in copy is scaled to 0..255
    assert "normalize: pixels (inferred for uint8 images with values in [0, 255]; --normalize pixels|standardize|" \
           "none to choose)" in fine.notes and not [n for n in fine.notes if n.startswith("warning:")]
    with pytest.warns(UserWarning, match=r"uint8 images with values in \[0, 16\] fit neither .* normalize="
                                         r"'standardize'"):
        memloc.wrap_data(digits.images[:50, None].astype(np.int64), digits.target[:50])  # integers: 8-bit
