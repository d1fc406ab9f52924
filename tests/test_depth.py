"""Layer-wise decodability and prediction depth: a network whose depth is known, the k-NN probe against
scikit-learn's, bad input, the smoke run through the CLI (with detection and the report), and mnist5k (slow)."""

import json

import numpy as np
import pytest
import torch
from conftest import copy_of
from torch import nn
from toys import assert_one_line_error

from memloc.cli import main
from memloc.core.errors import ConfigError
from memloc.core.runs import RunDir
from memloc.probes.depth import DepthConfig, knn_predict, pooled, prediction_depth, prediction_depths
from memloc.report.paper_claims import claims
from memloc.tasks.classification.data import Dataset

# ----------------------------------------------------------------------------- a network whose depth is known

GROUPS = 4  # 4 groups x (2 class-0 + 2 class-1 examples) = 16 examples


def grouped_data() -> Dataset:
    """G groups of four 1x1xG 'images': e_g x 0.5 (class 0, twice) and e_g x 1.0 (class 1, twice)."""
    x, y = [], []
    for g in range(GROUPS):
        for c in (0, 0, 1, 1):
            v = torch.zeros(GROUPS)
            v[g] = 0.5 * (c + 1)
            x.append(v)
            y.append(c)
    x = torch.stack(x).reshape(-1, 1, 1, GROUPS)
    y = torch.tensor(y)
    n = len(y)
    return Dataset("grouped", x, y, y.clone(), torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool),
                   x.clone(), y.clone(), 2)


def separating_at(k: int) -> nn.Module:
    """Layers 0..k-1 keep each example on its group's direction (class only in the norm: cosine 1 within a group);
    layer k maps class 0 to (0.25, 0) and class 1 to (0, 0.25); one more layer and the identity head keep that.

    With k = 3 neighbours, a query's neighbours before layer k are exactly the other three of its group (cosine 1,
    every other group 0): two of the other class, one of its own, so every vote is wrong; from layer k on, every
    neighbour has its class. The final prediction is always right, so every example's depth is exactly k.
    """
    g = GROUPS
    first = nn.Linear(g, g)  # undoes the normalization (2x - 1): every value exact in float32
    mods: list[nn.Module] = [nn.Flatten(), first]
    with torch.no_grad():
        first.weight.copy_(0.5 * torch.eye(g))
        first.bias.fill_(0.5)
        for _ in range(k - 1):
            same = nn.Linear(g, g)
            same.weight.copy_(torch.eye(g))
            same.bias.zero_()
            mods += [same, nn.ReLU()]
        split = nn.Linear(g, 2)  # the sum is 0.5 (class 0) or 1.0 (class 1)
        split.weight.copy_(torch.stack([-torch.ones(g), torch.ones(g)]))
        split.bias.copy_(torch.tensor([0.75, -0.75]))
        mods += [split, nn.ReLU()]
        hidden, head = nn.Linear(2, 2), nn.Linear(2, 2)  # one more hidden layer, then the head (logits)
        for keep in (hidden, head):
            keep.weight.copy_(torch.eye(2))
            keep.bias.zero_()
        mods += [hidden, nn.ReLU(), head]
    model = nn.Sequential(*mods)
    model.input_shape = (1, 1, g)
    return model.eval()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_depth_is_the_first_separating_layer(k, one_thread):
    data, model = grouped_data(), separating_at(k)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    res = prediction_depth(model, data, k=3, support=100, save=False)
    P = k + 3
    assert res.summary["num_layers"] == P
    assert (res.arrays["predicted"] == data.y_train.numpy()).all()
    assert (res.arrays["depth"] == k).all(), res.arrays["depth"]
    acc = res.arrays["knn_given_acc"][:, 3]  # every example
    assert acc.tolist() == [0.0] * k + [1.0] * (P - k)
    assert res.summary["depth"]["clean"]["median"] == k and res.summary["depth"]["noisy"] is None
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())  # the probe's hooks are gone
    assert [r["depth"] for r in res.rows] == [k] * 16


def test_depths_by_hand():
    final = np.array([0, 1, 2, 0])
    knn = np.array([[0, 1, 2, 1],   # layer 0
                    [1, 1, 2, 0],   # layer 1
                    [0, 1, 0, 0]])  # layer 2
    # example 0: layer 1 disagrees -> 2; example 1: all agree -> 0; example 2: layer 2 disagrees -> 3 (output only)
    assert prediction_depths(knn, final).tolist() == [2, 0, 3, 1]


def test_pooling_averages_all_but_the_units():
    a = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)  # (B, C, H, W)
    assert torch.equal(pooled(a, 1), a.mean((2, 3)))
    t = torch.randn(2, 5, 4)  # (B, T, F): a linear layer per token
    assert torch.allclose(pooled(t, -1), t.mean(1))


# ----------------------------------------------------------------------------- the k-NN probe against scikit-learn

@pytest.mark.parametrize("k", [1, 6, 7])
def test_knn_matches_scikit_learn(k):
    from sklearn.neighbors import KNeighborsClassifier
    rng = np.random.default_rng(0)
    support = rng.normal(size=(200, 8))
    labels = rng.integers(0, 5, size=200)
    query = rng.normal(size=(60, 8))
    sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(support, labels)
    ours = knn_predict(torch.tensor(query), torch.tensor(support), torch.tensor(labels), k, 5)
    assert ours.tolist() == sk.predict(query).tolist()  # even k: tied votes go to the smallest class in both

    # each support example as a query leaves itself out: scikit-learn fit on the other 199
    ours = knn_predict(torch.tensor(support), torch.tensor(support), torch.tensor(labels), k, 5,
                       exclude=torch.arange(200))
    for i in range(0, 200, 7):
        rest = np.arange(200) != i
        sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(support[rest], labels[rest])
        assert int(ours[i]) == int(sk.predict(support[i:i + 1])[0]), i


# ----------------------------------------------------------------------------- bad input

def test_bad_settings_fail_when_built():
    with pytest.raises(ConfigError, match=r"k \(--k\) takes an integer of at least 1, not 0"):
        DepthConfig(k=0)
    with pytest.raises(ConfigError, match=r"support \(--support\) takes an integer of at least 2, not 1"):
        DepthConfig(support=1)


@pytest.fixture(scope="module")
def smoke_run(smoke_master, tmp_path_factory):
    return copy_of(smoke_master, tmp_path_factory.mktemp("depth") / "run")


@pytest.fixture(scope="module")
def lm_run(tiny_lm_master):
    """A 1-epoch language-model run: no class labels (read only: depth refuses it before writing)."""
    return tiny_lm_master


@pytest.mark.parametrize("argv,words", [
    (["--k", "1000"], ["--k 1000", "support set (1000 examples", "--k 999"]),
    (["--k", "40", "--support", "40"], ["--k 40", "support set (40 examples"]),
    (["--layers", "nope"], ["unknown layer 'nope'", "block1.0"]),
    (["--k", "0"], ["--k takes an integer of at least 1, not 0"]),
])
def test_bad_input_is_one_line_exit_2(smoke_run, capsys, argv, words):
    code = main(["depth", str(smoke_run), "--quiet", *argv])
    assert_one_line_error(code, capsys.readouterr().err, *words)
    assert not (smoke_run / "probes" / "depth").exists()


def test_language_model_run_is_refused(lm_run, capsys):
    code = main(["depth", str(lm_run), "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, "classifier", "lm")
    assert not (lm_run / "probes" / "depth").exists()


def test_rank_by_depth_needs_the_depth_probe(smoke_master, tmp_path, capsys):
    run = copy_of(smoke_master, tmp_path / "run")
    code = main(["detect", str(run), "--quiet", "--rank-by", "prediction_depth"])
    assert_one_line_error(code, capsys.readouterr().err, "memloc depth")


# ----------------------------------------------------------------------------- the smoke run through the CLI

def test_smoke_run_end_to_end(smoke_run, capsys):
    run = smoke_run
    assert main(["detect", str(run), "--quiet"]) == 0
    before = json.loads((run / "probes" / "detection" / "summary.json").read_text())
    assert "prediction_depth" not in before["scores"]  # detection is unchanged without a depth probe

    assert main(["depth", str(run), "--quiet", "--linear"]) == 0
    out = capsys.readouterr().out
    assert "prediction depth" in out and "noisy" in out
    d = run / "probes" / "depth"
    summary = json.loads((d / "summary.json").read_text())
    arrays = np.load(d / "arrays.npz")
    n, P = 1000, summary["num_layers"]
    assert P == 4 and summary["support"] == 1000 and summary["k"] == 30 and summary["linear"]
    assert arrays["depth"].shape == (n,) and arrays["depth"].min() >= 0 and arrays["depth"].max() <= P
    assert arrays["knn_given_acc"].shape == (P, 4) and arrays["linear_true_acc"].shape == (P, 4)
    assert arrays["is_noisy"].sum() == 100 and summary["depth"]["noisy"]["n"] == 100
    assert len((d / "depth.csv").read_text().splitlines()) == n + 1
    # the depth is recomputable from the saved k-NN predictions
    assert (prediction_depths(arrays["knn_given"], arrays["predicted"]) == arrays["depth"]).all()

    assert main(["detect", str(run), "--quiet"]) == 0
    after = json.loads((run / "probes" / "detection" / "summary.json").read_text())
    rows = {r["score"]: r for r in after["quality"]}
    assert rows["prediction_depth"]["auroc"] is not None and rows["prediction_depth"]["n"] == n
    # every other score is judged exactly as before
    assert [r for r in after["quality"] if r["score"] != "prediction_depth"] == before["quality"]

    assert main(["report", str(run)]) == 0
    page = (run / "report" / "report.html").read_text()
    assert "Layer-wise decodability and prediction depth" in page
    for f in ("figures/depth_curves.png", "figures/depth_histogram.png", "tables/depth_layers.csv",
              "tables/summary_depth.csv", "tables/depth_correlations.csv"):
        assert (run / "report" / f).exists(), f
    assert "aum (detection suspicion)" in (run / "report" / "tables" / "depth_correlations.csv").read_text()
    rows = [r for r in claims(RunDir.open(run), None) if "Stephenson" in r["claim"]]
    assert len(rows) == 1 and "median prediction depth" in rows[0]["ours"]


# ----------------------------------------------------------------------------- mnist5k, 10% noise (slow)

@pytest.mark.slow
def test_noisy_examples_are_deeper_on_mnist5k(mnist5k_master):
    """Baldock et al.'s finding on a run that memorizes its noisy labels (measured: median depth 7 noisy vs 1 clean
    of 0..9; noisy given labels k-NN-decodable from conv4.0, the 8th of 9 layers)."""
    res = prediction_depth(mnist5k_master, device="cpu", save=False)
    s = res.summary
    assert s["final_accuracy"]["noisy"] > 0.9  # the premise: the noisy labels are memorized
    d = s["depth"]
    assert d["noisy"]["n"] == 200 and d["clean"]["n"] == 1800
    assert d["noisy"]["median"] > d["clean"]["median"], d
