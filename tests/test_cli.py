"""The command line: the smoke preset end to end, and every bad input of the core as one line + exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from toys import assert_one_line_error

from memloc.cli import build_parser, main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_smoke_preset_end_to_end(tmp_path, capsys):
    code, out, err = run_cli(capsys, "train", "--preset", "smoke", "--out", str(tmp_path / "run"), "--quiet")
    assert code == 0, err
    run = tmp_path / "run"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["name"] == "cnn" and cfg["train"]["epochs"] == 6 and cfg["data"]["noise"] == 0.1
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(0 <= m["test_acc"] <= 1 for m in metrics)
    assert metrics[-1]["test_acc"] > 0.4  # the smoke model learns (chance is 0.1)
    assert (sorted(p.name for p in (run / "checkpoints").glob("epoch_*"))
            == [f"epoch_{i:03d}.safetensors" for i in range(7)])
    assert "epoch   6" in out and "done:" in out


def test_console_script_runs_and_lists(tmp_path):
    exe = Path(sys.executable).parent / "memloc"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "memloc.cli"]
    res = subprocess.run(cmd + ["models"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "resnet9" in res.stdout and "width 0.25 on CPU" in res.stdout
    res = subprocess.run(cmd + ["datasets"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "mnist5k" in res.stdout and "cifar10" in res.stdout
    res = subprocess.run(cmd + ["train", "--dataset", "nope", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "unknown dataset 'nope'" in res.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args,words", [
    (["--dataset", "imagenet"], ["unknown dataset"]),
    (["--model", "vgg19"], ["unknown model"]),
    (["--noise", "1.5"], ["--noise takes a number in [0, 1), not 1.5"]),
    (["--noise", "-0.2"], ["--noise takes a number in [0, 1), not -0.2"]),
    (["--dataset", "cifar10", "--data-root", "/nonexistent/folder"], ["does not exist"]),
    (["--dataset", "mnist", "--data-root", "CORRUPT"], ["truncated"]),
    (["--dataset", "digits", "--model", "resnet9"], ["cannot take images of shape (1, 8, 8)"]),
    (["--dataset", "synthetic", "--synthetic-shape", "1,28,20", "--model", "vit"], ["square"]),
    (["--dataset", "NAN"], ["NaN"]),
    (["--dataset", "BADLABELS"], ["labels"]),
    (["--dataset", "digits", "--labels", "SHORT"], ["3 values"]),
    (["--dataset", "digits", "--noise-mask", "SHORT"], ["3 values"]),
    (["--example-tied-dropout", "0,0.1"], ["--example-tied-dropout P_GEN takes a number in (0, 1], not 0.0"]),
    (["--epochs", "0"], ["epochs"]),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, words):
    short = tmp_path / "short.npy"
    np.save(short, np.zeros(3, dtype=int))
    nan = tmp_path / "nan.npz"
    x = np.zeros((20, 1, 8, 8), dtype=np.float32)
    x[0, 0, 0, 0] = np.nan
    np.savez(nan, x=x, y=np.arange(20) % 2)
    bad = tmp_path / "badlabels.npz"
    np.savez(bad, x=np.zeros((20, 1, 8, 8), dtype=np.uint8), y=np.arange(20) - 1)
    corrupt = tmp_path / "corrupt" / "MNIST" / "raw"
    corrupt.mkdir(parents=True)
    for split in ("train", "t10k"):
        (corrupt / f"{split}-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + (100).to_bytes(4, "big")
                                                             + (28).to_bytes(4, "big") * 2 + b"\x00" * 50)
        (corrupt / f"{split}-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (100).to_bytes(4, "big")
                                                             + b"\x00" * 100)
    subst = {"SHORT": str(short), "NAN": str(nan), "BADLABELS": str(bad), "CORRUPT": str(tmp_path / "corrupt")}
    args = [subst.get(a, a) for a in args]
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *args, "--out", str(out),
                           "--epochs" if "--epochs" not in args else "--quiet",
                           *(["1"] if "--epochs" not in args else []), "--quiet")
    assert_one_line_error(code, err, *words)
    assert not out.exists()


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "train", "--preset", "smoke", "--out", str(out), "--quiet")
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"
    code, _, err = run_cli(capsys, "train", "--preset", "smoke", "--out", str(out), "--overwrite", "--quiet")
    assert_one_line_error(code, err, "not a memloc run")  # --overwrite never deletes a foreign folder
    assert (out / "precious.txt").read_text() == "keep me"


def test_resume_refuses_unknown_format_and_finished_runs(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, "train", "--preset", "smoke", "--epochs", "1", "--out", str(out), "--quiet")[0] == 0
    code, _, err = run_cli(capsys, "train", "--resume", str(out), "--quiet")
    assert_one_line_error(code, err, "finished")
    info = json.loads((out / "run.json").read_text())
    info["format_version"] = 99
    (out / "run.json").write_text(json.dumps(info))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = run_cli(capsys, "train", "--resume", str(out), "--quiet")
    assert_one_line_error(code, err, "format version 99")
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = run_cli(capsys, "train", "--resume", str(tmp_path), "--quiet")
    assert_one_line_error(code, err, "not a memloc run")


def test_killed_process_resumes_to_the_same_weights(tmp_path):
    """A real SIGKILL mid-training, then `memloc train --resume`: same final weights as an uninterrupted run."""
    import signal
    import time

    from memloc.core.files import load_state
    from memloc.core.runs import RunDir
    base = [sys.executable, "-m", "memloc.cli", "train", "--dataset", "digits", "--train-size", "256", "--model", "cnn",
            "--width", "0.25", "--epochs", "4", "--batch-size", "32", "--device", "cpu", "--quiet"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    assert subprocess.run(base + ["--out", str(tmp_path / "full")], env=env, capture_output=True,
                          timeout=300).returncode == 0
    proc = subprocess.Popen(base + ["--out", str(tmp_path / "cut")], env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # kill as soon as epoch 2 is reported: mid-way through saving or epoch 3
        if line.startswith("epoch   2"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    time.sleep(0.1)
    res = subprocess.run([sys.executable, "-m", "memloc.cli", "train", "--resume", str(tmp_path / "cut"), "--quiet"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    a = load_state(RunDir(tmp_path / "full").checkpoint_path(4))
    b = load_state(RunDir(tmp_path / "cut").checkpoint_path(4))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_every_long_command_takes_quiet_and_export_and_report_are_silent_with_it(tmp_path, capsys):
    """The same output flags on every long command (issue #37): `export --quiet` and `report --quiet` print nothing."""
    run = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--dataset", "digits", "--train-size", "200", "--epochs", "1",
                 "--example-tied-dropout", "0.5,0.2", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--drop-memorization", "--out", str(tmp_path / "m.safetensors"), "--quiet"]) == 0
    assert main(["report", str(run), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == ("", "") and (tmp_path / "m.safetensors").exists()
    assert main(["export", str(run), "--drop-memorization", "--out", str(tmp_path / "n.safetensors")]) == 0
    assert capsys.readouterr().out.startswith("done: ")
    parser = build_parser()._subparsers._group_actions[0].choices
    for command in ("train", "run", "audit", "evaluate", "export", "report", "dropout-grid", "bench-localize",
                    "flip", "merge"):
        assert "--quiet" in parser[command]._option_string_actions, command
