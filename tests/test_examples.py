"""The runnable examples, on tiny settings: each exits 0 and writes what its docstring promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_every_example_states_command_and_runtime():
    for path in EXAMPLES.glob("*.py"):
        doc = path.read_text().split('"""')[1]
        assert f"python examples/{path.name}" in doc and "Expected runtime" in doc, path.name


@pytest.mark.slow  # trains a model in a subprocess (10-30 s on 2 cores)
def test_find_mislabeled(tmp_path):
    out = tmp_path / "suspects.csv"
    r = _run("find_mislabeled.py", "--out", str(out), "--train-size", "300", "--epochs", "2")
    assert r.returncode == 0, r.stderr
    lines = out.read_text().splitlines()
    assert lines[0].startswith("rank,index,given_label,predicted_label") and len(lines) == 301
    assert "really mislabeled" in r.stdout


@pytest.mark.slow  # trains a model in a subprocess (10-30 s on 2 cores)
def test_add_example_tied_dropout(tmp_path):
    r = _run("add_example_tied_dropout.py", "--out", str(tmp_path / "etd"), "--train-size", "300", "--epochs", "2")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "etd" / "dropout.json").read_text())
    assert set(result) >= {"tied", "drop"} and (tmp_path / "etd" / "model.safetensors").exists()


@pytest.mark.slow  # trains a model in a subprocess (10-30 s on 2 cores)
def test_resnet18_own_npz(tmp_path):
    pytest.importorskip("torchvision")
    out = tmp_path / "r18"
    r = _run("resnet18_own_npz.py", "--demo-npz", str(tmp_path / "demo.npz"), "--out", str(out),
             "--train-size", "64", "--test-size", "64", "--epochs", "1", "--flip-examples", "1")
    assert r.returncode == 0, r.stderr
    for f in ("checkpoints/epoch_001.safetensors", "probes/flipping/summary.json", "probes/rewinding/summary.json",
              "probes/detection/summary.json", "report/report.html"):
        assert (out / f).exists(), f
    # the same run again is refused, in one line, without --overwrite
    again = _run("resnet18_own_npz.py", "--npz", str(tmp_path / "demo.npz"), "--out", str(out), "--epochs", "1")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already exists" in again.stderr


def test_resnet18_missing_npz_fails_in_one_line(tmp_path):
    r = _run("resnet18_own_npz.py", "--npz", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    assert not (tmp_path / "r").exists()


def test_cifar10_study_without_the_data_fails_in_one_line(tmp_path):
    out = tmp_path / "study"
    r = _run("cifar10_study.py", "--data-root", str(tmp_path / "no-cifar"), "--out", str(out), timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr and "--data-root" in r.stderr
    assert not out.exists()
