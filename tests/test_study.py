"""`memloc run`: the whole study on the smoke preset, resume after a kill, and its bad inputs."""

import errno
import json
import os
import signal
import subprocess
import sys

import pytest

import browser
from memloc.cli import main


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "s"
    assert main(["run", "--preset", "smoke", "--out", str(out), "--quiet"]) == 0
    return out


def test_smoke_study_makes_every_stage_and_the_report(smoke_study):
    info = json.loads((smoke_study / "study.json").read_text())
    assert info["finished"] is True
    for stage in ("train", "rewinding", "retraining", "flipping", "dropout_train", "dropout_eval", "detection", "report"):
        assert info["stages"][stage]["status"] == "done", stage
    for probe in ("rewinding", "retraining", "flipping", "detection"):
        assert (smoke_study / "base" / "probes" / probe / "summary.json").exists(), probe
    assert (smoke_study / "dropout" / "probes" / "dropout" / "summary.json").exists()
    figures = {p.stem for p in (smoke_study / "report" / "figures").iterdir()}
    assert {"learning_curves", "gradient_norms", "gradient_cosine", "rewinding", "retraining", "flipping",
            "detection_roc", "dropout_learning_curves"} <= figures
    claims = (smoke_study / "report" / "tables" / "summary_claims.csv").read_text()
    for words in ("gradient norm", "rewinding", "retraining", "units zeroed", "example-tied dropout"):
        assert words in claims, words
    html = (smoke_study / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(figures)


def test_rebuilding_the_study_report_gives_the_same_files(smoke_study):
    rep = smoke_study / "report"
    before = {p.relative_to(rep): p.read_bytes() for p in rep.rglob("*") if p.is_file()}
    assert main(["report", str(smoke_study)]) == 0
    after = {p.relative_to(rep): p.read_bytes() for p in rep.rglob("*") if p.is_file()}
    assert before == after


@pytest.mark.skipif(not browser.available(), reason="needs Debian's chromium and chromium-driver, and selenium")
def test_study_report_in_headless_chromium(smoke_study):
    seen = browser.inspect_page(smoke_study / "report" / "report.html")
    n = len(list((smoke_study / "report" / "figures").iterdir()))
    assert len(seen["images"]) == n and all(seen["decoded"])
    assert all(i["complete"] and i["width"] > 50 for i in seen["images"])
    assert not [m for m in seen["console"] if m.get("level") in ("SEVERE", "ERROR")]


def test_resume_of_a_finished_or_foreign_study_is_refused(smoke_study, tmp_path, capsys):
    assert main(["run", "--resume", str(smoke_study), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "finished" in err and err.count("\n") == 1
    assert main(["run", "--resume", str(tmp_path), "--quiet"]) == 2
    assert "not a memloc study" in capsys.readouterr().err
    assert main(["run", "--preset", "smoke", "--out", str(smoke_study), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_report_without_disk_space_fails_cleanly_and_keeps_the_old_report(smoke_study, monkeypatch, capsys):
    rep = smoke_study / "report"
    before = {p.relative_to(rep): p.read_bytes() for p in rep.rglob("*") if p.is_file()}
    import memloc.report as report_mod

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report_mod, "atomic_write", full)
    monkeypatch.setattr(report_mod, "write_text", lambda p, t: full(p, None))
    assert main(["report", str(smoke_study)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1
    assert before == {p.relative_to(rep): p.read_bytes() for p in rep.rglob("*") if p.is_file()}


def test_killed_study_resumes_without_redoing_finished_stages(tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "memloc.cli", "run", "--preset", "smoke", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("stage retraining ..."):  # train and rewinding are done: kill inside retraining
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    info = json.loads((out / "study.json").read_text())
    assert info["stages"]["train"]["status"] == "done" and info["stages"]["rewinding"]["status"] == "done"
    assert info["stages"]["retraining"]["status"] == "running"
    ckpt = out / "base" / "checkpoints" / "epoch_006.safetensors"
    stamp = (ckpt.stat().st_mtime_ns, info["stages"]["train"]["updated"], info["stages"]["rewinding"]["updated"])
    res = subprocess.run([sys.executable, "-m", "memloc.cli", "run", "--resume", str(out), "--quiet"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    assert "stage train ..." not in res.stdout and "stage rewinding ..." not in res.stdout
    assert "stage retraining ..." in res.stdout
    info = json.loads((out / "study.json").read_text())
    assert info["finished"] is True
    assert (ckpt.stat().st_mtime_ns, info["stages"]["train"]["updated"], info["stages"]["rewinding"]["updated"]) == stamp
