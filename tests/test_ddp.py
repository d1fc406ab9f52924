"""Data-parallel training under torchrun gives the run of one process with the same global batch.

Two gloo processes on the loopback interface only (nothing connects outside 127.0.0.1)
train a tiny GPT; one plain process trains the same config; the weights, the
per-example records, the gradient accounting and the epoch losses agree, and the run
records its two processes. 57 sequences in batches of 7: the processes take 4 + 3 of
each batch, and of the short last batch of 1 the second takes none.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

HERE = Path(__file__).parent
TINY_LM = ["train", "--task", "lm", "--sequences", "57", "--block-size", "48", "--prefix-tokens", "8",
           "--suffix-tokens", "16", "--canaries", "1", "--repeats", "1,3", "--canary-formats", "secret,random",
           "--secret-digits", "3", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--epochs", "2",
           "--batch-size", "7", "--lr", "1e-2", "--optimizer", "adamw", "--weight-decay", "0.1", "--clip", "1.0",
           "--precision", "fp32", "--device", "cpu", "--quiet"]  # the GPT has no dropout (GPTShape.dropout 0)
TORCHRUN = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo",
            "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memloc(*argv, processes: int = 1, prefix: tuple[str, ...] = ("-m", "memloc")) -> subprocess.CompletedProcess:
    """`memloc ARGV` in one plain process, or in two under torchrun (loopback only)."""
    launch = [*TORCHRUN, "--master-port", str(_free_port())] if processes > 1 else []
    res = subprocess.run([sys.executable, *launch, *prefix, *map(str, argv)], capture_output=True, text=True,
                         env=_env(), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    memloc(*TINY_LM, "--out", out)
    return out


def assert_same_run(one: Path, many: Path) -> None:
    for epoch in (0, 1, 2):
        a = load_file(one / "checkpoints" / f"epoch_{epoch:03d}.safetensors")
        b = load_file(many / "checkpoints" / f"epoch_{epoch:03d}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            # the attention's key bias has a zero true gradient (softmax ignores a shift of all scores): AdamW
            # turns its float rounding noise, summed in another order across processes, into steps of ~lr
            atol = 1e-4 if k.endswith("attn.qkv.bias") else 1e-5
            assert np.allclose(a[k], b[k], rtol=1e-4, atol=atol), (epoch, k, float(np.abs(a[k] - b[k]).max()))
    ea, eb = np.load(one / "examples.npz"), np.load(many / "examples.npz")
    assert np.allclose(ea["loss"].astype(np.float32), eb["loss"].astype(np.float32), rtol=2e-3, atol=1e-3)
    assert np.allclose(ea["margin"].astype(np.float32), eb["margin"].astype(np.float32), rtol=2e-3, atol=1e-3)
    assert np.array_equal(ea["correct_bits"], eb["correct_bits"])
    assert (ea["loss"] > 0).all()  # every example recorded in every epoch, by whichever process trained it
    ga, gb = np.load(one / "gradients.npz"), np.load(many / "gradients.npz")
    for k in ("clean_norm", "noisy_norm", "cosine"):
        assert np.allclose(ga[k], gb[k], rtol=1e-4, atol=1e-6), (k, float(np.abs(ga[k] - gb[k]).max()))
    assert (ga["noisy_norm"] > 0).all()  # the canaries' share was accounted
    ma = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(line) for line in (many / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in ma] == [m["epoch"] for m in mb] == [1, 2]
    for r, s in zip(ma, mb):
        assert s["train_loss"] == pytest.approx(r["train_loss"], rel=1e-5)
        assert s["train_acc"] == pytest.approx(r["train_acc"], abs=1e-9)


def test_two_processes_train_as_one(single, tmp_path):
    many = tmp_path / "ddp"
    res = memloc(*TINY_LM, "--out", many, processes=2)
    assert "x 2 processes (torchrun)" in res.stdout + res.stderr
    assert res.stdout.count("done:") == 1  # one voice: rank 0's
    assert_same_run(single, many)
    env = json.loads((many / "env.json").read_text())
    assert env["distributed"] == {"world_size": 2, "backend": "gloo", "global_batch_size": 7,
                                  "per_process_batch_size": 4}
    stage = json.loads((many / "run.json").read_text())["stages"]["train"]
    assert stage["status"] == "done" and stage["world_size"] == 2 and stage["global_batch_size"] == 7
    assert json.loads((many / "config.json").read_text())["train"]["batch_size"] == 7  # the global batch
    assert "distributed" not in json.loads((single / "env.json").read_text())  # one process: as before


def test_two_processes_resume_a_run_one_process_began(single, tmp_path):
    cut = tmp_path / "cut"
    killed = subprocess.run([sys.executable, str(HERE / "fault_driver.py"), "epoch:1", "--", *TINY_LM, "--out",
                             str(cut)], capture_output=True, text=True, env=_env(), timeout=600)
    assert killed.returncode != 0 and (cut / "checkpoints" / "epoch_001.safetensors").exists()
    memloc("train", "--resume", cut, "--quiet", processes=2)
    assert_same_run(single, cut)
    stage = json.loads((cut / "run.json").read_text())["stages"]["train"]
    assert stage["status"] == "done" and stage["world_size"] == 2


def test_only_training_runs_under_torchrun(monkeypatch, tmp_path, capsys):
    """A probe or a study started by torchrun would run once per process on the same files: one line, exit 2."""
    from toys import assert_one_line_error

    from memloc.cli import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv in (["flip", str(tmp_path)], ["run", "--preset", "smoke", "--out", str(tmp_path / "s")]):
        assert_one_line_error(main(argv), capsys.readouterr().err, "only `memloc train`", "without torchrun")
    assert not (tmp_path / "s").exists()
