"""`memloc audit --weights FILE.safetensors --dataset ...`: a classifier memloc did not train (a plain PyTorch loop in
the test, on scikit-learn's 8x8 digits with 10% of the labels flipped), audited on its training data: it finds the
mislabeled examples the model memorized, where, rewinds its layers to the checkpoints given; bad input in one line;
--resume redoes only what is missing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memloc.cli import main

N_TRAIN, NOISY = 700, 70


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A registry mlp trained outside memloc until it fits its 70 flipped labels; its weights at epochs 10 and 30
    and at the end, as safetensors; the data as a .npz (already scaled: audited with --normalize none)."""
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    from memloc.tasks.classification.models import build_model
    d = tmp_path_factory.mktemp("outside")
    digits = load_digits()
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(digits.target))
    x, y = (digits.data[perm] / 16.0).astype(np.float32), digits.target[perm].astype(np.int64)
    xtr, ytr = x[:N_TRAIN], y[:N_TRAIN]
    noisy = np.zeros(N_TRAIN, dtype=bool)
    noisy[rng.choice(N_TRAIN, NOISY, replace=False)] = True
    given = ytr.copy()
    given[noisy] = (ytr[noisy] + rng.integers(1, 10, NOISY)) % 10
    np.savez(d / "digits.npz", x=xtr, y=ytr, x_test=x[1400:], y_test=y[1400:])
    np.save(d / "labels.npy", given)
    np.savez(d / "as-trained.npz", x=xtr, y=given, x_test=x[1400:], y_test=y[1400:])  # the labels it saw, only
    np.save(d / "noisy.npy", noisy.astype(np.uint8))
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(64,), num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    X, Y = torch.from_numpy(xtr), torch.from_numpy(given)
    for epoch in range(1, 81):
        model.train()
        for b in torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(epoch)).split(32):
            opt.zero_grad()
            F.cross_entropy(model(X[b]), Y[b]).backward()
            opt.step()
        if epoch in (10, 30):
            save_file(model.state_dict(), str(d / f"epoch{epoch}.safetensors"))
    # as DistributedDataParallel saves it: the audit strips the wrapper's prefix
    save_file({f"module.{k}": v for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    model.eval()
    with torch.no_grad():
        fit = (model(X).argmax(1) == Y).numpy()
    assert fit[noisy].mean() >= 0.9  # the model memorized its flipped labels: something to find
    return d


def _args(d: Path, *more: str) -> list[str]:
    return ["audit", "--weights", str(d / "model.safetensors"), "--model", "mlp", "--dataset", str(d / "digits.npz"),
            "--normalize", "none", "--flip-examples", "16", "--quiet", *more]


@pytest.fixture(scope="module")
def audited(outside, tmp_path_factory):
    out = tmp_path_factory.mktemp("audits") / "known"
    ckpts = f"{outside / 'epoch10.safetensors'},{outside / 'epoch30.safetensors'}"
    assert main(_args(outside, "--labels", str(outside / "labels.npy"), "--noise-mask", str(outside / "noisy.npy"),
                      "--checkpoints", ckpts, "--out", str(out))) == 0
    return out


def test_the_audit_finds_the_memorized_mislabeled_examples_and_where(audited, outside):
    from safetensors.torch import load_file
    run = json.loads((audited / "run.json").read_text())
    assert {k for k, v in run["stages"].items() if v["status"] == "done"} >= {"train", "depth", "flipping",
                                                                              "detection", "rewinding"}
    info = json.loads((audited / "audit.json").read_text())
    assert info["kind"] == "classifier" and len(info["checkpoints"]) == 2 and len(info["sha256"]) == 64
    # the states copied in as epochs 1..3, the audited model last, byte for byte the user's tensors
    mine = load_file(str(audited / "checkpoints" / "epoch_003.safetensors"))
    theirs = load_file(str(outside / "model.safetensors"))
    assert all(torch.equal(mine[k], theirs[f"module.{k}"]) for k in mine)
    metrics = [json.loads(line) for line in (audited / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3] and metrics[-1]["noisy_train_acc"] >= 0.9
    det = json.loads((audited / "probes" / "detection" / "summary.json").read_text())
    best = max(r["auroc"] for r in det["quality"] if r["auroc"] is not None)
    assert det["num_noisy"] == NOISY and best >= 0.9, det["quality"]  # measured 0.99 (mean loss over the states)
    flip = json.loads((audited / "probes" / "flipping" / "summary.json").read_text())
    noisy, clean = flip["kinds"]["noisy"], flip["kinds"]["clean"]
    assert noisy["searched"] and noisy["median_units"] <= clean["median_units"], flip["kinds"]
    rew = np.load(audited / "probes" / "rewinding" / "arrays.npz")
    assert list(rew["epochs"])[:2] == [1, 2]  # each layer back to each earlier state given
    html = (audited / "report" / "report.html").read_text()
    assert "Audit: which training examples the classifier memorizes, and where" in html
    assert "known mislabeled" in html and "Layer rewinding" in html


def test_probe_commands_and_resume_work_on_the_audit(audited, tmp_path):
    copy = tmp_path / "audit"
    shutil.copytree(audited, copy)
    before = json.loads((copy / "probes" / "detection" / "summary.json").read_text())
    shutil.rmtree(copy / "probes" / "detection")
    run = json.loads((copy / "run.json").read_text())
    run["stages"]["detection"]["status"] = "running"  # killed while detecting
    (copy / "run.json").write_text(json.dumps(run))
    flips = (copy / "probes" / "flipping" / "arrays.npz").stat().st_mtime_ns
    assert main(["audit", "--resume", str(copy), "--quiet"]) == 0
    after = json.loads((copy / "probes" / "detection" / "summary.json").read_text())
    assert after["quality"] == before["quality"]  # the same result
    assert (copy / "probes" / "flipping" / "arrays.npz").stat().st_mtime_ns == flips  # done stages kept
    assert main(["detect", str(copy), "--rank-by", "mean_loss", "--overwrite", "--quiet"]) == 0
    assert main(["report", str(copy)]) == 0
    run = json.loads((copy / "run.json").read_text())
    run["stages"]["train"]["status"] = "running"  # killed while its states were copied in
    (copy / "run.json").write_text(json.dumps(run))
    assert main(["audit", "--resume", str(copy), "--quiet"]) == 2  # one line: start again, nothing half-done used


def test_noise_unknown_ranks_every_example(outside, tmp_path):
    """Only the labels the model saw (no true labels, no mask): nothing is known to be mislabeled, so the flipping
    probe takes a seeded sample of all examples, detection ranks them without a quality table, and rewinding
    measures what it can (training and test accuracy)."""
    out = tmp_path / "unknown"
    args = _args(outside, "--checkpoints", str(outside / "epoch30.safetensors"), "--out", str(out))
    args[args.index(str(outside / "digits.npz"))] = str(outside / "as-trained.npz")
    assert main(args) == 0
    det = json.loads((out / "probes" / "detection" / "summary.json").read_text())
    flip = json.loads((out / "probes" / "flipping" / "summary.json").read_text())
    assert det["quality"] is None and det["num_examples"] == N_TRAIN
    assert sum(k["searched"] for k in flip["kinds"].values()) >= 1
    assert json.loads((out / "run.json").read_text())["stages"]["rewinding"]["status"] == "done"
    html = (out / "report" / "report.html").read_text()
    assert "of its training examples with their given label" in html


@pytest.mark.parametrize("case,match", [
    ("pickle", "is a pickle, which can run code"),
    ("width", "does not hold the weights of mlp (width 2)"),
    ("model", "does not hold the weights of cnn1d"),
    ("no-data", "needs --dataset"),
    ("lm-flag", "--sequences is for a language model's audit"),
    ("not-safetensors", "is not a readable .safetensors file"),
])
def test_bad_input_one_line_nothing_written(outside, tmp_path, capsys, case, match):
    w = outside / "model.safetensors"
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, pt)
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not tensors")
    args = {"pickle": ["--weights", str(pt), "--dataset", str(outside / "digits.npz")],
            "width": ["--weights", str(w), "--width", "2", "--dataset", str(outside / "digits.npz")],
            "model": ["--weights", str(w), "--model", "cnn", "--dataset", str(outside / "digits.npz")],
            "no-data": ["--weights", str(w)],
            "lm-flag": ["--weights", str(w), "--dataset", str(outside / "digits.npz"), "--sequences", "s.txt"],
            "not-safetensors": ["--weights", str(junk), "--dataset", str(outside / "digits.npz")]}[case]
    out = tmp_path / "run"
    assert main(["audit", *args, "--normalize", "none", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert not out.exists()


def test_a_torchvision_model_is_audited_by_its_name(tmp_path):
    """`--model torchvision:resnet18`: torchvision builds the architecture (random init, nothing downloaded), the
    user's weights go in, every stage runs; a name torchvision does not have is one line."""
    torchvision = pytest.importorskip("torchvision")
    from safetensors.torch import save_file
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    y = rng.integers(0, 4, 64)
    np.savez(tmp_path / "imgs.npz", x=x, y=y, x_test=x[:16], y_test=y[:16])
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", weights=None, num_classes=4)
    save_file(model.state_dict(), str(tmp_path / "r18.safetensors"))
    out = tmp_path / "audit"
    base = ["audit", "--weights", str(tmp_path / "r18.safetensors"), "--dataset", str(tmp_path / "imgs.npz"),
            "--flip-examples", "2", "--quiet"]
    assert main([*base, "--model", "torchvision:resnet18", "--out", str(out)]) == 0
    stages = json.loads((out / "run.json").read_text())["stages"]
    assert all(stages[s]["status"] == "done" for s in ("depth", "flipping", "detection"))
    assert json.loads((out / "config.json").read_text())["model"]["name"] == "torchvision:resnet18"
    assert main([*base, "--model", "torchvision:resnet18x", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
