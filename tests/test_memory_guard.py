"""What cannot fit is refused in one line before any work (issue 36), and every validation message names the flag
as the user typed it.

The memory estimate (`memloc.core.budget`) is checked against the real thing: three small training runs, each in its
own process, whose peak RSS growth from just before the model is built to the end of the run is measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from toys import assert_one_line_error

from memloc.cli import main
from memloc.core import budget
from memloc.core.errors import ConfigError

TINY_LM = ["--task", "lm", "--sequences", "64", "--block-size", "16", "--prefix-tokens", "4", "--suffix-tokens", "4",
           "--canaries", "1", "--repeats", "2", "--canary-formats", "random", "--epochs", "1", "--n-layer", "1",
           "--n-head", "1", "--n-embd", "8", "--device", "cpu", "--quiet"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- refused before any work

def test_a_language_model_that_cannot_fit_is_one_line_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--task", "lm", "--n-embd", "100000", "--out", out)
    assert_one_line_error(code, err, "training this model needs about", "TB", "the CPU has", "GB free",
                          "lower --n-embd / --n-layer", "or pass --force")
    assert not out.exists()


def test_a_classifier_that_cannot_fit_is_one_line_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "run"  # ResNet-9 at 16 times its width on 64 images of 384x384 in one batch: about 850 GB
    code, _, err = run_cli(capsys, "train", "--dataset", "synthetic", "--synthetic-shape", "1,384,384",
                           "--synthetic-size", "64", "--synthetic-test-size", "8", "--model", "resnet9", "--width",
                           "16", "--batch-size", "64", "--out", out)
    assert_one_line_error(code, err, "training this model needs about", "GB, the CPU has",
                          "lower --batch-size or --width, or pass --force")
    assert not out.exists()


@pytest.fixture
def little_memory(monkeypatch):
    """The CPU has 1 MB free: anything is refused (nothing is allocated to find out)."""
    monkeypatch.setattr(budget, "free_memory", lambda device: 1_000_000)


def test_force_skips_the_guard(tmp_path, capsys, little_memory):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY_LM, "--out", out)
    assert_one_line_error(code, err, "the CPU has 1 MB free", "--force")
    assert not out.exists()
    code, _, err = run_cli(capsys, "train", *TINY_LM, "--out", out, "--force")
    assert code == 0, err
    assert (out / "checkpoints" / "epoch_001.safetensors").exists()


@pytest.mark.parametrize("task", [["--task", "lm"], ["--dataset", "digits", "--model", "mlp"]])
def test_a_study_that_cannot_fit_writes_nothing(tmp_path, capsys, little_memory, task):
    out = tmp_path / "study"
    code, _, err = run_cli(capsys, "run", *task, "--out", out)
    assert_one_line_error(code, err, "training this model needs about", "the CPU has 1 MB free", "--force")
    assert not out.exists()


def test_forced_lets_the_library_through(little_memory):
    need = budget.Need({"model": 10**9})
    with pytest.raises(ConfigError, match="lower --width"):
        budget.check(need, "cpu", what="training this model needs", model_flags="--width")
    with budget.forced():
        budget.check(need, "cpu", what="training this model needs", model_flags="--width")
    with budget.forced(False):
        with pytest.raises(ConfigError):
            budget.check(need, "cpu", what="training this model needs")


def test_a_model_folder_is_counted_from_its_files(tmp_path, capsys):
    """A Hugging Face folder is never loaded to count it: its safetensors header says 5e10 parameters."""
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 300, "n_positions": 64,
                                                    "n_layer": 2, "n_head": 4, "n_embd": 32}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [50_000, 1_000_000], "data_offsets": [0, 0]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    shape = budget.folder_shape(folder, block=64)
    assert shape["params"] == 50_000 * 1_000_000 + 300 * 32  # GPT-2 ties its head: memloc unties it
    code, _, err = run_cli(capsys, "train", "--task", "lm", "--model", f"hf:{folder}", "--out", tmp_path / "run")
    assert_one_line_error(code, err, "TB", "choose a smaller model, or pass --force")
    assert not (tmp_path / "run").exists()


def test_exact_exposure_beyond_the_memory_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY_LM, "--block-size", "64", "--canary-formats", "secret",
                           "--secret-digits", "12", "--out", run)
    assert code == 0, err
    code, _, err = run_cli(capsys, "memorization", run, "--exact-up-to", str(10**12))
    assert_one_line_error(code, err, "exposure by enumeration of the 1,000,000,000,000 candidate secrets needs about",
                          "TB", "lower --exact-up-to below 1,000,000,000,000")
    assert "--force" not in err
    assert not (run / "probes").exists()
    # 10^6 candidates of 6 digits: measured 31.5 MB of peak RSS growth on the host
    assert budget.exact_exposure_need(10**6, 6, 10).total == 32_000_000


# ----------------------------------------------------------------------------- the estimate against the real peak

MEASURE = r"""
import json, re, sys
import memloc.core.budget as budget
import memloc.tasks.experiment as experiment
from memloc.cli import main
from memloc.core.errors import ConfigError

def rss(key):
    return int(re.search(rf"{key}:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

seen = {}
check, fresh = budget.check, experiment._fresh_model

def counted(need, device, **kw):  # the guard's own estimate
    seen["need"] = need.total
    return check(need, device, **kw)

def built(cfg, data):  # the data is in memory: the model's growth starts here
    if "base" not in seen:
        open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM)
        seen["base"] = rss("VmRSS")
    return fresh(cfg, data)

budget.check, experiment._fresh_model = counted, built
code = main(sys.argv[1:])
print(json.dumps({"code": code, "need": seen.get("need"), "peak": rss("VmHWM") - seen.get("base", 0)}))
"""

LM = ["--task", "lm", "--preset", "smoke", "--canaries", "1", "--repeats", "1", "--canary-formats", "random"]
CONFIGS = {  # each a few seconds on 2 cores, its peak 0.45 to 0.7 GB
    "gpt-wide": [*LM, "--sequences", "8", "--batch-size", "2", "--block-size", "32", "--prefix-tokens", "8",
                 "--suffix-tokens", "16", "--n-embd", "768", "--n-layer", "2", "--n-head", "4"],  # the model's
    "gpt-long-batch": [*LM, "--sequences", "128", "--batch-size", "64", "--block-size", "128", "--n-embd", "128",
                       "--n-layer", "2", "--n-head", "4"],  # the batch's
    "cnn": ["--dataset", "mnist5k", "--train-size", "256", "--model", "cnn", "--width", "1",
            "--batch-size", "128"],  # the evaluation batch's (1,000 test digits)
}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures peak RSS through Linux's /proc")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_estimate_is_within_25_percent_of_the_measured_peak(tmp_path, name):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}  # the constants' machine: 2 threads
    res = subprocess.run([sys.executable, "-c", MEASURE, "train", *CONFIGS[name], "--epochs", "1", "--quiet",
                          "--device", "cpu", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["code"] == 0 and got["need"], got
    ratio = got["need"] / got["peak"]
    print(f"{name}: estimate {got['need'] / 1e6:.0f} MB, measured peak {got['peak'] / 1e6:.0f} MB ({ratio:.2f})")
    assert 0.75 <= ratio <= 1.25, got


# ----------------------------------------------------------------------------- the flag as typed

@pytest.mark.parametrize("command", ["train", "run"])
@pytest.mark.parametrize("typed,other", [("--memorization-sinks", "--example-tied-dropout"),
                                         ("--example-tied-dropout", "--memorization-sinks")])
@pytest.mark.parametrize("value,words", [(["2,3"], ["P_GEN takes a number in (0, 1], not 2.0"]),
                                         (["0.4"], ["takes 2 comma-separated numbers"]),
                                         (["a,b"], ["takes comma-separated numbers"]),
                                         ([], ["expected one argument"])])
def test_an_aliased_flag_is_named_as_typed(tmp_path, capsys, command, typed, other, value, words):
    code, _, err = run_cli(capsys, command, typed, *value, "--out", tmp_path / "x")
    assert_one_line_error(code, err, typed, *words)
    assert other not in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("typed,other", [("--memorization-sinks", "--example-tied-dropout"),
                                         ("--example-tied-dropout", "--memorization-sinks")])
def test_a_check_after_parsing_names_the_flag_as_typed(tmp_path, capsys, typed, other):
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "run", typed, "0.4,0.1")
    assert_one_line_error(code, err, f"{typed} would change them: drop {typed}")
    assert other not in err
