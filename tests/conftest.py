"""Runs trained once per test session and shared: each test module copies what it writes into.

The smoke run (`memloc train --preset smoke`), the digits run the layer sweeps use, and the smoke study
(`memloc run --preset smoke`) are each trained once; `copy_of` gives a module or a test its own copy.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `pytest -n 2` (CI's command) each worker, and every process a test starts, computes on one thread: two
    # processes of one thread each on two cores, not four threads fighting for them. Measured on the 2-core machine,
    # one thread runs these small models about as fast as two (a 94 s group of tests took 98 s).
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from memloc.cli import main


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skipped, with the reason, on a machine without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def copy_of(master: Path, dst: Path) -> Path:
    """A copy of a shared run or study at `dst`, to write into."""
    shutil.copytree(master, dst)
    return dst


@pytest.fixture(scope="session")
def smoke_master(tmp_path_factory) -> Path:
    """`memloc train --preset smoke`: a small CNN on 1,000 real digits, 6 epochs. Read only: copy it to write."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    assert main(["train", "--preset", "smoke", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="session")
def digits_master(tmp_path_factory) -> Path:
    """The smoke preset on 8x8 digits for speed, 3 epochs: 4 layers x 4 checkpoints. Read only."""
    out = tmp_path_factory.mktemp("digits") / "run"
    assert main(["train", "--preset", "smoke", "--dataset", "digits", "--train-size", "600", "--epochs", "3",
                 "--batch-size", "64", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_lm_master(tmp_path_factory) -> Path:
    """A 1-epoch language-model run on 64 sequences of 16 tokens (a 1-block GPT of width 8): nothing memorized, no
    class labels. Read only: copy it to write."""
    out = tmp_path_factory.mktemp("tinylm") / "run"
    assert main(["train", "--task", "lm", "--sequences", "64", "--block-size", "16", "--prefix-tokens", "4",
                 "--suffix-tokens", "4", "--canaries", "1", "--repeats", "2", "--canary-formats", "random",
                 "--epochs", "1", "--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--out", str(out), "--quiet",
                 "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="session")
def mnist5k_master(tmp_path_factory) -> Path:
    """ResNet-9 at width 0.25 on 2,000 mnist5k digits with 10% noise, 25 epochs at batch 128, final checkpoint only:
    it memorizes every noisy label (about 2.5 min on 2 CPU cores). For slow tests; read only: copy it to write."""
    out = tmp_path_factory.mktemp("mnist5k") / "run"
    assert main(["train", "--dataset", "mnist5k", "--train-size", "2000", "--model", "resnet9", "--width", "0.25",
                 "--epochs", "25", "--batch-size", "128", "--device", "cpu", "--no-gradient-accounting",
                 "--checkpoint-every", "25", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def smoke_study_master(tmp_path_factory) -> Path:
    """`memloc run --preset smoke`: the whole study, once per session, its output going to a file as under nohup or
    SLURM (no --quiet; kept beside it as `console.log`). Read only: copy it to write."""
    import contextlib
    out = tmp_path_factory.mktemp("study") / "s"
    with open(out.parent / "console.log", "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        assert main(["run", "--preset", "smoke", "--out", str(out)]) == 0
    return out


@pytest.fixture
def one_thread():
    """Run the test on one CPU thread (small models: threads only add overhead), the caller's count restored."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
