"""The fault suite: what a hostile user, a kill, a second command or a full disk does to memloc.

Every class of failure found by trying to break memloc has a test here (issue 19):
data loss and mixed results (--overwrite, two writers), stuck after a kill, tracebacks
where one line is promised (read-only and full disks, damaged run files, bad flags),
resource exhaustion by input, and a report that must not run a tampered run's script.
Real kills come from tests/fault_driver.py (SIGKILL at an exact boundary of the
on-disk state); full and read-only disks are a small tmpfs where the machine allows a
mount, and an injected ENOSPC/EROFS writer everywhere.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from toys import assert_one_line_error, digest

from memloc.cli import main
from memloc.core import files, runs
from memloc.core.files import LOCK_NAME

HERE = Path(__file__).parent
DRIVER = [sys.executable, str(HERE / "fault_driver.py")]
TINY = ["--preset", "smoke", "--train-size", "300", "--epochs", "3"]  # about 4 s on 2 cores
TINY_STUDY = ["run", *TINY, "--flip-examples", "2"]  # about 20 s on 2 cores
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
    [str(HERE.parent / "src"), str(HERE), os.environ.get("PYTHONPATH", "")])}


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def driver(kill_at: str, *argv, timeout: int = 600) -> subprocess.CompletedProcess:
    """`memloc ARGV` in a subprocess that SIGKILLs itself at `kill_at` (see fault_driver.py)."""
    return subprocess.run([*DRIVER, kill_at, "--", *map(str, argv)], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


TIMING = {"updated", "created", "seconds", "elapsed_s", "scoring_s", "examples_per_s", "epoch_time_s", "eval_time_s",
          "run"}


def _untimed(obj):
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def comparable(root: Path) -> dict:
    """Every result file under `root`, with wall-clock times and the directory's own name left out."""
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name in ("env.json", "report.html", runs.MANIFEST):  # the manifest: which files
            continue
        key = str(p.relative_to(root))
        if p.suffix == ".json":
            out[key] = _untimed(json.loads(p.read_text()))
        elif p.suffix == ".jsonl":
            out[key] = [_untimed(json.loads(l)) for l in p.read_text().splitlines()]
        elif p.name == "partial.npz":  # a probe's kept progress: its JSON state holds the search time
            with np.load(p) as z:
                out[key] = {k: (_untimed(json.loads(str(z[k]))) if k.startswith("__") else z[k].tobytes())
                            for k in z.files}
        elif p.suffix == ".csv":
            rows = list(csv.DictReader(io.StringIO(p.read_text())))
            out[key] = [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
        else:
            out[key] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One finished tiny smoke run (3 epochs, 300 digits); tests copy it."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["train", *TINY, "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


@pytest.fixture(scope="module")
def killed_tiny(tmp_path_factory) -> Path:
    """The tiny run killed (SIGKILL) right after it saved epoch 1: its lock file names a dead process."""
    out = tmp_path_factory.mktemp("killed") / "run"
    res = driver("epoch:1", "train", *TINY, "--out", out, "--quiet")
    assert res.returncode == -signal.SIGKILL, res.stderr
    return out


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> Path:
    """One uninterrupted tiny study, trained in a subprocess like the killed ones it is compared with."""
    out = tmp_path_factory.mktemp("study") / "s"
    res = driver("none", *TINY_STUDY, "--out", out, "--quiet")
    assert res.returncode == 0, res.stderr
    return out


# ----------------------------------------------------------------------------- data loss and mixed results

def test_overwrite_never_touches_a_folder_whose_run_json_is_not_memlocs(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "run.json").write_text('{"experiment": "mine"}')
    (out / "notes.txt").write_text("three months of notes")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "epoch_000.safetensors").write_bytes(b"my own weights")
    before = digest(out)
    code, _, err = cli(capsys, "train", *TINY, "--out", out, "--overwrite", "--quiet")
    assert_one_line_error(code, err, "not a memloc run")
    assert digest(out) == before and sorted(p.name for p in out.iterdir()) == ["checkpoints", "notes.txt", "run.json"]


def test_overwrite_deletes_only_memlocs_own_files(run_copy, tmp_path, capsys):
    """A real run with the user's files beside memloc's: --overwrite replaces the run, keeps theirs."""
    mine = {"notes.txt": b"keep", "probes/mine/summary.txt": b"keep too", "checkpoints/README": b"mine",
            "report/figures/my_plot.svg": b"<svg/>", "data/raw.bin": b"\x00\x01"}
    for rel, content in mine.items():
        (run_copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (run_copy / rel).write_bytes(content)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "summary.json").write_text('{"theirs": true}')
    (run_copy / "probes" / "linked").symlink_to(outside, target_is_directory=True)  # never followed
    code, _, err = cli(capsys, "train", *TINY, "--seed", "1", "--out", run_copy, "--overwrite", "--quiet")
    assert code == 0, err
    for rel, content in mine.items():
        assert (run_copy / rel).read_bytes() == content, rel
    assert ((outside / "summary.json").read_text() == '{"theirs": true}'
            and (run_copy / "probes" / "linked").is_symlink())
    assert json.loads((run_copy / "config.json").read_text())["train"]["seed"] == 1
    assert not (run_copy / "probes" / "rewinding").exists()  # the old run's results went with it
    assert not list(run_copy.rglob(LOCK_NAME)) and not list(run_copy.rglob("*.tmp"))


def test_overwrite_through_a_symlink_replaces_the_run_it_points_to(run_copy, tmp_path, capsys):
    link = tmp_path / "latest"
    link.symlink_to(run_copy, target_is_directory=True)
    code, _, err = cli(capsys, "train", *TINY, "--seed", "2", "--out", link, "--overwrite", "--quiet")
    assert code == 0, err
    assert link.is_symlink() and json.loads((run_copy / "config.json").read_text())["train"]["seed"] == 2


def test_overwrite_keeps_the_users_files_even_inside_memlocs_folders_and_named_like_memlocs(run_copy, capsys):
    """--overwrite deletes what memloc recorded writing (RUN/.memloc.files), nothing else: files of the user's
    named as memloc names its own, inside memloc's own folders, survive byte for byte; one line says so."""
    for argv in (["rewind", run_copy, "--quiet"], ["report", run_copy]):
        code, _, err = cli(capsys, *argv)
        assert code == 0, err
    assert (run_copy / "probes" / "rewinding" / "summary.json").exists()
    mine = {"probes/mine/notes.csv": b"a,b\n1,2\n", "probes/mine/summary.json": b'{"mine": 1}',
            "probes/mine/arrays.npz": b"PK not really", "report/figures/my_plot.png": b"\x89PNG mine",
            "report/tables/mine.csv": b"x\n", "probes/rewinding/my_notes.csv": b"inside memloc's folder",
            "checkpoints/epoch_999.safetensors": b"my own weights", "report/report-draft.html": b"<p>mine</p>"}
    for rel, content in mine.items():
        (run_copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (run_copy / rel).write_bytes(content)
    memlocs = [l for l in (run_copy / runs.MANIFEST).read_text().splitlines() if (run_copy / l).exists()]
    assert "probes/rewinding/summary.json" in memlocs and any(l.startswith("report/figures/") for l in memlocs)
    code, out, err = cli(capsys, "train", *TINY, "--seed", "1", "--out", run_copy, "--overwrite", "--quiet")
    assert code == 0, err
    for rel, content in mine.items():
        assert (run_copy / rel).read_bytes() == content, rel
    old_results = [l for l in memlocs if l.startswith(("probes/", "report/"))]
    assert old_results and not any((run_copy / l).exists() for l in old_results)  # the old run's results went
    assert sorted(p.name for p in (run_copy / "report" / "figures").iterdir()) == ["my_plot.png"]
    assert sorted(os.listdir(run_copy / "probes" / "rewinding")) == ["my_notes.csv"]
    assert f"kept {len(mine)} of yours" in out and "probes/mine/notes.csv" in out


def test_overwrite_refuses_a_run_that_recorded_no_files(run_copy, capsys):
    """A run made before memloc kept a manifest cannot tell its files from the user's: refused, untouched."""
    (run_copy / runs.MANIFEST).unlink()
    (run_copy / "probes" / "mine").mkdir(parents=True)
    (run_copy / "probes" / "mine" / "summary.json").write_text("{}")
    before = digest(run_copy)
    code, _, err = cli(capsys, "train", *TINY, "--out", run_copy, "--overwrite", "--quiet")
    assert_one_line_error(code, err, "older memloc", "delete the folder yourself")
    assert digest(run_copy) == before


def test_no_write_follows_a_symbolic_link_out_of_a_run(run_copy, killed_tiny, tmp_path, capsys):
    """A symlinked lock, report folder or probe folder is refused in one line with its target unchanged; a
    symlinked checkpoint or manifest entry is replaced as a link, never written through."""
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "precious.txt"
    target.write_text("precious")
    (run_copy / LOCK_NAME).symlink_to(target)
    code, _, err = cli(capsys, "rewind", run_copy, "--quiet")
    assert_one_line_error(code, err, LOCK_NAME, "symbolic link")
    assert target.read_text() == "precious" and sorted(os.listdir(outside)) == ["precious.txt"]
    (run_copy / LOCK_NAME).unlink()

    elsewhere = outside / "report"
    elsewhere.mkdir()
    (elsewhere / "report.html").write_text("their page")
    shutil.rmtree(run_copy / "report", ignore_errors=True)
    (run_copy / "report").symlink_to(elsewhere, target_is_directory=True)
    code, _, err = cli(capsys, "report", run_copy)
    assert_one_line_error(code, err, "symbolic link", str(run_copy / "report"))
    assert sorted(os.listdir(elsewhere)) == ["report.html"] and (elsewhere / "report.html").read_text() == "their page"

    (run_copy / "probes").mkdir(exist_ok=True)
    (run_copy / "probes" / "rewinding").symlink_to(elsewhere, target_is_directory=True)
    code, _, err = cli(capsys, "rewind", run_copy, "--quiet")
    assert_one_line_error(code, err, "symbolic link", "rewinding")
    assert sorted(os.listdir(elsewhere)) == ["report.html"]

    resumed = tmp_path / "resumed"  # stopped after epoch 1: resuming writes epoch 2's checkpoint over a link
    shutil.copytree(killed_tiny, resumed)
    ckpt = resumed / "checkpoints" / "epoch_002.safetensors"
    ckpt.symlink_to(target)
    code, _, err = cli(capsys, "train", "--resume", resumed, "--quiet")
    assert code == 0, err
    assert target.read_text() == "precious" and not ckpt.is_symlink() and ckpt.stat().st_size > 100


def test_a_study_keeps_its_runs_to_itself_between_stages(tiny_study, tmp_path, capsys):
    """A second writer into the study's run while the study is between two stages is refused; the study's later
    stages use its own model (its final checkpoint's hash unchanged) and reach the uninterrupted result."""
    out, go = tmp_path / "s", tmp_path / "go"
    study = subprocess.Popen([*DRIVER, f"gap:rewinding:{go}", "--", *TINY_STUDY, "--out", str(out), "--quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        for line in study.stdout:
            if line.strip() == "paused":
                break
        final = max((out / "base" / "checkpoints").glob("epoch_*.safetensors"))
        before = digest(out / "base")
        second = driver("none", "train", *TINY, "--seed", "5", "--out", out / "base", "--overwrite", "--quiet")
        assert_one_line_error(second.returncode, second.stderr, "in use", str(study.pid))
        code, _, err = cli(capsys, "dropout-grid", "--out", out / "dropout", *TINY, "--pairs", "0.5,0.5",
                           "--no-baselines", "--quiet")
        assert code == 2 and "in use" in err, err
        assert digest(out / "base") == before
    finally:
        go.touch()
        study.wait(timeout=600)
    assert study.returncode == 0, study.stderr.read()
    assert hashlib.sha256(final.read_bytes()).hexdigest() == before[str(final.relative_to(out / "base"))]
    assert comparable(out) == comparable(tiny_study)


def test_a_second_writer_is_refused_while_the_first_holds_the_run(tiny_run, tmp_path, capsys):
    """Two `train --overwrite` into one run: the second gets one line and exit 2; the first finishes
    and equals an uninterrupted run. Readers are not blocked meanwhile."""
    go = tmp_path / "go"
    run_copy = tmp_path / "run"  # a finished run of seed 1, overwritten by seed 0 while seed 1 tries again
    assert main(["train", *TINY, "--seed", "1", "--out", str(run_copy), "--quiet"]) == 0
    # the seed left at its default 0, as tiny_run's was: config.json records which settings were typed
    first = subprocess.Popen([*DRIVER, f"pause:1:{go}", "--", "train", *TINY, "--out", str(run_copy),
                              "--overwrite", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=ENV)
    try:
        for line in first.stdout:  # epoch 1 saved, the lock held
            if line.strip() == "paused":
                break
        lock = json.loads((run_copy / LOCK_NAME).read_text())
        assert lock["pid"] == first.pid
        second = driver("none", "train", *TINY, "--seed", "1", "--out", run_copy, "--overwrite", "--quiet")
        assert_one_line_error(second.returncode, second.stderr, "in use", str(first.pid))
        for argv in (["evaluate", run_copy], ["report", run_copy]):  # concurrent readers stay allowed
            code, _, err = cli(capsys, *argv)
            assert code == 0, err
        code, _, err = cli(capsys, "rewind", run_copy, "--quiet")  # another writer: refused, run untouched
        assert_one_line_error(code, err, "in use")
    finally:
        go.touch()
        first.wait(timeout=300)
    assert first.returncode == 0, first.stderr.read()

    def results(d):
        return {k: v for k, v in comparable(d).items() if not k.startswith("report/")}
    assert results(run_copy) == results(tiny_run)
    assert not (run_copy / LOCK_NAME).exists()


def test_the_lock_of_a_killed_writer_is_taken_over(killed_tiny, tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(killed_tiny, out)
    lock = json.loads((out / LOCK_NAME).read_text())  # left behind by the kill, naming a dead process
    with pytest.raises(ProcessLookupError):
        os.kill(lock["pid"], 0)
    code, _, err = cli(capsys, "train", "--resume", out, "--quiet")
    assert code == 0, err
    assert not (out / LOCK_NAME).exists()
    assert comparable(out) == comparable(tiny_run)


def test_the_lock_without_flock_detects_a_stale_holder_by_pid(tmp_path, monkeypatch):
    """File systems without flock: an O_EXCL lock file; its holder's PID decides whether it is stale."""
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(runs.fcntl, "flock", no_flock)
    d = tmp_path / "run"
    d.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (d / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": runs.socket.gethostname()}))
    with runs.exclusive(d):
        assert json.loads((d / LOCK_NAME).read_text())["pid"] == os.getpid()
    (d / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": runs.socket.gethostname()}))  # alive
    with pytest.raises(runs.RunError, match="in use"):
        with runs.exclusive(d):
            pass


def test_the_lock_is_reentrant_in_a_process_and_removes_a_killed_writers_temporary_files(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / ".metrics.jsonl.a1b2c3d4.tmp").write_text("half")
    (d / "notes.tmp").write_text("the user's, not memloc's")
    with runs.exclusive(d):
        with runs.exclusive(d):
            assert runs.holds_lock(d)
        assert runs.holds_lock(d)
        assert not (d / ".metrics.jsonl.a1b2c3d4.tmp").exists() and (d / "notes.tmp").exists()
    assert not runs.holds_lock(d) and not (d / LOCK_NAME).exists()


# ----------------------------------------------------------------------------- stuck after a kill

def test_a_study_killed_at_every_stage_boundary_resumes_to_the_uninterrupted_result(tiny_study, tmp_path):
    """One chain of real kills: at each stage boundary (and once inside a stage) the process dies, `run --resume`
    goes on to the next without redoing a finished stage; a failed stage is retried; the end equals an
    uninterrupted study."""
    out = tmp_path / "s"
    res = driver("created:base", *TINY_STUDY, "--out", out, "--quiet")  # base/run.json exists, nothing else
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert sorted(p.name for p in (out / "base").iterdir() if p.name not in (LOCK_NAME, runs.MANIFEST)) == ["run.json"]
    points = ["done:train", "done:rewinding", "partial:retraining", "fail:retraining", "done:retraining",
              "done:flipping", "created:dropout", "done:dropout_train", "done:dropout_eval", "done:detection"]

    def finished() -> dict:
        stages = json.loads((out / "study.json").read_text())["stages"]
        return {k: v["updated"] for k, v in stages.items() if v["status"] == "done"}
    for point in points:
        before = finished()
        res = driver(point, "run", "--resume", out, "--quiet")
        assert {k: v for k, v in finished().items() if k in before} == before  # nothing finished was redone
        assert not [k for k in before if f"stage {k} ..." in res.stdout]
        if point.startswith("fail:"):  # a stage that raises: one line, recorded as failed, retried by resume
            assert_one_line_error(res.returncode, res.stderr, "stage retraining broke")
            stage = json.loads((out / "study.json").read_text())["stages"]["retraining"]
            assert stage["status"] == "failed" and stage["reason"] == "stage retraining broke"
            continue
        assert res.returncode == -signal.SIGKILL, (point, res.stderr)
        if point.startswith("partial:"):  # killed inside the stage: its finished layers are kept for the resume
            assert (out / "base" / "probes" / "retraining" / "partial.npz").exists()
    res = driver("none", "run", "--resume", out, "--quiet")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert comparable(out) == comparable(tiny_study)
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(LOCK_NAME))


def test_train_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_again(tmp_path, capsys):
    out = tmp_path / "run"
    assert driver("created:run", "train", *TINY, "--out", out, "--quiet").returncode == -signal.SIGKILL
    code, _, err = cli(capsys, "train", "--resume", out, "--quiet")  # no config.json: says how to start again
    assert_one_line_error(code, err, "--overwrite")
    code, _, err = cli(capsys, "train", *TINY, "--out", out, "--overwrite", "--quiet")
    assert code == 0, err


def test_a_failed_stage_is_recorded_failed_with_its_reason(run_copy, capsys):
    ckpt = run_copy / "checkpoints" / "epoch_001.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # a corrupt middle checkpoint
    code, _, err = cli(capsys, "rewind", run_copy, "--quiet")
    assert_one_line_error(code, err, "epoch_001")
    stage = json.loads((run_copy / "run.json").read_text())["stages"]["rewinding"]
    assert stage["status"] == "failed" and "epoch_001" in stage["reason"]
    shutil.copy(run_copy / "checkpoints" / "epoch_002.safetensors", ckpt)  # mended: the stage runs again
    code, _, err = cli(capsys, "rewind", run_copy, "--quiet")
    assert code == 0, err
    stage = json.loads((run_copy / "run.json").read_text())["stages"]["rewinding"]
    assert stage["status"] == "done" and "reason" not in stage


# ----------------------------------------------------------------------------- full and read-only disks

@contextlib.contextmanager
def small_disk(path: Path, size_kb: int):
    """A tmpfs of `size_kb` at `path`; skips where this machine allows no mount."""
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True)
    if res.returncode != 0:
        pytest.skip("no tmpfs mount here (needs root); the injected-writer tests cover the same paths")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


def _finish_after_a_failure(out: Path, capsys) -> None:
    """What the error line tells the user: resume; where the run never got its config, --overwrite."""
    if not out.exists() or not (out / "run.json").exists():  # full before anything was written: no folder left
        assert not out.exists() or not [p for p in out.iterdir() if p.name != LOCK_NAME]
        code, _, err = cli(capsys, "train", *TINY, "--out", out, "--quiet")
    else:
        code, _, err = cli(capsys, "train", "--resume", out, "--quiet")
        if code == 2 and "--overwrite" in err:
            code, _, err = cli(capsys, "train", *TINY, "--out", out, "--overwrite", "--quiet")
    assert code == 0, err


@pytest.mark.parametrize("size_kb", [32, 96, 160])  # full at the first writes, at epoch 1, at epoch 2-3
def test_training_on_a_full_disk_stops_in_one_line_and_resumes_to_the_same_weights(tiny_run, tmp_path, capsys,
                                                                                   size_kb):
    with small_disk(tmp_path / "disk", size_kb) as disk:
        out = disk / "run"
        code, _, err = cli(capsys, "train", *TINY, "--out", out, "--quiet")
        assert_one_line_error(code, err, "No space left on device", str(out), "memloc train --resume")
        remount(disk, "size=8m")
        _finish_after_a_failure(out, capsys)
        assert comparable(out) == comparable(tiny_run)
        assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("argv", [["rewind", "RUN", "--quiet"],
                                  ["flip", "RUN", "--examples", "2", "--others", "64", "--quiet"],
                                  ["evaluate", "RUN", "--drop-memorization"],
                                  ["retrain", "RUN", "--epochs", "2", "--peak-epoch", "1", "--quiet"],
                                  ["detect", "RUN", "--quiet"], ["report", "RUN"]])
def test_probes_on_a_read_only_disk_say_so_in_one_line_and_change_nothing(tiny_run, tmp_path, capsys, argv):
    with small_disk(tmp_path / "disk", 4096) as disk:
        run = disk / "run"
        shutil.copytree(tiny_run, run)
        remount(disk, "ro")
        before = digest(run)
        code, _, err = cli(capsys, *[str(run) if a == "RUN" else a for a in argv])
        assert_one_line_error(code, err)
        if argv[0] != "evaluate":  # evaluate of a plain model says it has no example-tied dropout: also one line
            assert "Read-only file system" in err and "writable folder" in err
        assert digest(run) == before


def test_train_into_a_read_only_disk_is_one_line(tmp_path, capsys):
    with small_disk(tmp_path / "disk", 1024) as disk:
        remount(disk, "ro")
        code, _, err = cli(capsys, "train", *TINY, "--out", disk / "run", "--quiet")
        assert_one_line_error(code, err, "Read-only file system")


class _Failing:
    """Stands in for `tempfile` in memloc.core.files: write number `at` (from 0) fails with `code`, or every
    write from it on with `every`. A full disk frees the failed write's space, so the writes after
    it (the failed stage's record) usually succeed: that is the default."""

    def __init__(self, code: int, at: int, *, every: bool = False):
        self.code, self.at, self.every, self.calls = code, at, every, 0

    def mkstemp(self, *a, **k):
        self.calls += 1
        if self.calls - 1 == self.at or (self.every and self.calls - 1 > self.at):
            raise OSError(self.code, os.strerror(self.code), k.get("dir"))
        import tempfile
        return tempfile.mkstemp(*a, **k)


@pytest.mark.parametrize("at", [0, 4, 9, 19])  # run.json, checkpoint 0, mid-training, the end
def test_injected_full_disk_during_training_then_resume(tiny_run, tmp_path, capsys, monkeypatch, at):
    """Where no tmpfs can be mounted (and everywhere): every write goes through memloc.core.runs, which fails."""
    out = tmp_path / "run"
    monkeypatch.setattr(files, "tempfile", _Failing(errno.ENOSPC, at))
    code, _, err = cli(capsys, "train", *TINY, "--out", out, "--quiet")
    assert_one_line_error(code, err, "No space left on device", "free some space")
    monkeypatch.undo()
    stage = json.loads((out / "run.json").read_text())["stages"].get("train") if (out / "run.json").exists() else None
    if stage:
        assert stage["status"] == "failed" and "No space" in stage["reason"]
    _finish_after_a_failure(out, capsys)
    assert comparable(out) == comparable(tiny_run)


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
@pytest.mark.parametrize("argv", [["rewind", "RUN", "--quiet"],
                                  ["flip", "RUN", "--examples", "2", "--others", "64", "--quiet"],
                                  ["report", "RUN"], ["train", "--resume", "RUN", "--quiet"]])
def test_injected_read_only_or_full_disk_for_every_writer(tiny_run, killed_tiny, tmp_path, capsys, monkeypatch, argv,
                                                         code):
    """Every write fails (and, read-only, the lock too): one line, nothing changed; then the same command
    on a mended disk finishes."""
    run_copy = tmp_path / "run"  # resume needs a run stopped after epoch 1; the others a finished one
    shutil.copytree(killed_tiny if argv[0] == "train" else tiny_run, run_copy)
    (run_copy / LOCK_NAME).unlink(missing_ok=True)
    before = digest(run_copy)

    def read_only(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path / LOCK_NAME))
    monkeypatch.setattr(files, "tempfile", _Failing(code, 0, every=True))
    if code == errno.EROFS:
        monkeypatch.setattr(runs, "_acquire", read_only)
    argv = [str(run_copy) if a == "RUN" else a for a in argv]
    rc, _, err = cli(capsys, *argv)
    assert_one_line_error(rc, err, os.strerror(code), "writable folder" if code == errno.EROFS else "free some space")
    assert digest(run_copy) == before
    monkeypatch.undo()
    rc, _, err = cli(capsys, *argv)
    assert rc == 0, err


# ----------------------------------------------------------------------------- damaged run files

def _damage(run: Path, what: str) -> None:
    if what == "run.json is a list":
        (run / "run.json").write_text("[1, 2]")
    elif what == "run.json without stages":
        info = json.loads((run / "run.json").read_text())
        del info["stages"]
        (run / "run.json").write_text(json.dumps(info))
    elif what == "run.json is not JSON":
        (run / "run.json").write_bytes(b"\xff\xfe{")
    elif what == "config.json is a list":
        (run / "config.json").write_text("[]")
    elif what == "config.json with a wrong section":
        cfg = json.loads((run / "config.json").read_text())
        cfg["train"] = "fast"
        (run / "config.json").write_text(json.dumps(cfg))
    elif what == "data.npz without is_noisy":
        z = dict(np.load(run / "data.npz"))
        del z["is_noisy"]
        np.savez(run / "data.npz", **z)
    elif what == "garbled metrics.jsonl":
        with open(run / "metrics.jsonl", "a") as f:
            f.write("{garbled\n")
    elif what == "examples.npz without loss":
        z = dict(np.load(run / "examples.npz"))
        del z["loss"]
        np.savez(run / "examples.npz", **z)
    elif what == "truncated checkpoint":
        p = run / "checkpoints" / "epoch_003.safetensors"
        p.write_bytes(p.read_bytes()[:64])
    elif what == "a probe summary that is a list":
        (run / "probes").mkdir(exist_ok=True)
        (run / "probes" / "rewinding").mkdir(exist_ok=True)
        (run / "probes" / "rewinding" / "summary.json").write_text("[]")
        np.savez(run / "probes" / "rewinding" / "arrays.npz", a=np.zeros(1))


DAMAGE = {
    "run.json is a list": ["evaluate", "rewind", "report", "resume", "flip", "detect"],
    "run.json without stages": ["evaluate", "rewind", "report", "resume"],
    "run.json is not JSON": ["evaluate", "report", "resume"],
    "config.json is a list": ["evaluate", "rewind", "report", "detect"],
    "config.json with a wrong section": ["evaluate", "retrain"],
    "data.npz without is_noisy": ["evaluate", "rewind", "detect", "retrain"],
    "garbled metrics.jsonl": ["report"],
    "examples.npz without loss": ["detect"],
    "truncated checkpoint": ["evaluate", "flip"],
    "a probe summary that is a list": ["report"],
}
COMMANDS = {"evaluate": ["evaluate", "RUN"], "rewind": ["rewind", "RUN", "--quiet"], "report": ["report", "RUN"],
            "resume": ["train", "--resume", "RUN", "--quiet"],
            "flip": ["flip", "RUN", "--examples", "2", "--others", "64", "--quiet"],
            "detect": ["detect", "RUN", "--quiet"],
            "retrain": ["retrain", "RUN", "--epochs", "2", "--peak-epoch", "1", "--quiet"]}


@pytest.mark.parametrize("what,command", [(w, c) for w, cs in DAMAGE.items() for c in cs])
def test_damaged_run_files_give_one_line(run_copy, capsys, what, command):
    _damage(run_copy, what)
    if command == "resume":  # an unfinished run, so that resume reads the damaged file
        with contextlib.suppress(Exception):
            info = json.loads((run_copy / "run.json").read_text())
            info["stages"]["train"]["status"] = "running"
            (run_copy / "run.json").write_text(json.dumps(info))
    before = digest(run_copy)
    code, _, err = cli(capsys, *[str(run_copy) if a == "RUN" else a for a in COMMANDS[command]])
    assert_one_line_error(code, err)
    assert str(run_copy) in err
    changed = {k for k in set(digest(run_copy)) | set(before) if digest(run_copy).get(k) != before.get(k)}
    assert changed <= {"run.json"}  # at most the stage is recorded as failed
    assert not (run_copy / LOCK_NAME).exists()


def test_a_damaged_study_json_gives_one_line(tiny_study, tmp_path, capsys):
    study = tmp_path / "s"
    shutil.copytree(tiny_study, study)
    for text in ("[]", '{"format_version": 1, "kind": "study"}', "{not json"):
        (study / "study.json").write_text(text)
        for argv in (["run", "--resume", study, "--quiet"], ["report", study]):
            code, _, err = cli(capsys, *argv)
            assert_one_line_error(code, err, "study.json")


# ----------------------------------------------------------------------------- bad flags and inputs

@pytest.mark.parametrize("argv,flag", [
    (["train", "--noise", "abc"], "--noise"),
    (["train", "--example-tied-dropout", "0.4"], "--example-tied-dropout"),
    (["train", "--schedule", "bogus"], "--schedule"),
    (["train", "--epochs", "1.5"], "--epochs"),
    (["train", "--bogus-flag"], "--bogus-flag"),
    (["dropout-grid", "--out", "x", "--pairs", "abc"], "--pairs"),
    (["run", "--seeds", "abc"], "--seeds"),
    (["run", "--noise", "0.1,x"], "--noise"),
    (["flip", "RUN", "--examples", "many"], "--examples"),
    (["rewind"], "RUN"),
    (["export", "RUN", "--drop-memorization"], "--out"),
    (["nonsense"], "nonsense"),
])
def test_bad_flags_are_one_line_naming_the_flag(tmp_path, capsys, argv, flag):
    code = main([str(tmp_path) if a == "RUN" else a for a in argv])
    out, err = capsys.readouterr()
    assert_one_line_error(code, err, flag, "--help")
    assert out == "" and "usage:" not in err


def test_a_huge_label_is_refused_in_one_line_without_allocating_for_it(tmp_path, capsys):
    x = np.random.default_rng(0).integers(0, 255, (60, 1, 8, 8)).astype(np.uint8)
    y = np.arange(60) % 3
    y[7] = 10 ** 12
    np.savez(tmp_path / "ids.npz", x=x, y=y)
    high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    code, _, err = cli(capsys, "train", "--dataset", tmp_path / "ids.npz", "--model", "mlp", "--out", tmp_path / "r",
                       "--quiet")
    assert time.perf_counter() - t0 < 10  # one line, not minutes of swapping (the bound is loose on purpose)
    assert_one_line_error(code, err, "1000000000000", "--num-classes")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - high < 512 * 1024  # KiB: no class-sized allocation
    assert not (tmp_path / "r").exists()
    y[7] = 40  # ids that look like classes only with --num-classes
    np.savez(tmp_path / "sparse.npz", x=x, y=y)
    code, _, err = cli(capsys, "train", "--dataset", tmp_path / "sparse.npz", "--model", "mlp", "--epochs", "1",
                       "--out", tmp_path / "r", "--quiet")
    assert_one_line_error(code, err, "--num-classes")
    code, _, err = cli(capsys, "train", "--dataset", tmp_path / "sparse.npz", "--model", "mlp", "--epochs", "1",
                       "--num-classes", "41", "--out", tmp_path / "r", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["data"]["num_classes"] == 41


def test_sizes_from_input_are_checked_before_allocation(tmp_path, capsys):
    import zipfile

    import numpy.lib.format as npformat
    x = np.zeros((20, 1, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "ok.npz", x=x, y=np.arange(20) % 2)
    with zipfile.ZipFile(tmp_path / "ok.npz") as zin, zipfile.ZipFile(tmp_path / "lying.npz", "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name == "x.npy":  # a header that promises 6.4 TB
                buf = io.BytesIO()
                npformat.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False,
                                                      "shape": (10 ** 11, 1, 8, 8)})
                data = buf.getvalue() + data[data.index(b"\n") + 1:]
            zout.writestr(name, data)
    for argv, words in ((["--dataset", tmp_path / "lying.npz"], ["claims shape"]),
                        (["--dataset", "synthetic", "--synthetic-size", str(10 ** 12)], ["GiB", "--synthetic-size"]),
                        (["--dataset", "synthetic", "--synthetic-size", "0"], ["--synthetic-size"]),
                        (["--dataset", "synthetic", "--synthetic-classes", "1"], ["--synthetic-classes"]),
                        (["--num-classes", "0"], ["--num-classes"])):
        code, _, err = cli(capsys, "train", *argv, "--model", "mlp", "--out", tmp_path / "r", "--quiet")
        assert_one_line_error(code, err, *words)
        assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- smaller

SCRIPT = "<script>alert(1)</script>"


def _leaves(obj, path=()):
    """Field paths of a config: every value that is not an object (a list of numbers is one field)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    else:
        yield path


def _set(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _tampered_report(src: Path, dst: Path, meta: str, section: str | None, fields) -> tuple[int, Path]:
    """Copy `src` (without its report), set each field path of `fields` to a script, build the report."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("report"))
    obj = json.loads((dst / meta).read_text())
    target = obj if section is None else obj[section]
    for path in fields:
        _set(target, path, SCRIPT)
    (dst / meta).write_text(json.dumps(obj))
    code = main(["report", str(dst)])
    return code, dst / "report" / "report.html"


def _check_tampered(code: int, page: Path, capsys) -> bool:
    """Built and escaped (True), or refused in one line with no page (False); never the script."""
    err = capsys.readouterr().err
    if code == 0:
        assert "<script" not in page.read_text().lower()
        return True
    assert_one_line_error(code, err)
    assert not page.exists()
    return False


# the study fields the report prints: each alone, so that a validation of another field cannot hide them
STUDY_SHOWN = [("preset",), ("seeds",), ("noise_levels",), ("base", "model", "name"), ("base", "model", "width"),
               ("base", "data", "dataset"), ("example_tied_dropout",)]


def test_the_report_escapes_a_script_in_the_config(tiny_study, tmp_path, capsys):
    """A shared, tampered run or study folder cannot put markup into report.html. A field whose type
    memloc checks makes it refuse the file in one line instead; it never runs the script."""
    run_cfg = json.loads((tiny_study / "base" / "config.json").read_text())
    study_cfg = json.loads((tiny_study / "study.json").read_text())["config"]
    # every field of config.json at once: the run report reads it raw, so it is built and escaped
    assert _check_tampered(*_tampered_report(tiny_study / "base", tmp_path / "r-all", "config.json", None,
                                             list(_leaves(run_cfg))), capsys)
    # every field of the study's config at once: its types are checked, so it is refused
    assert not _check_tampered(*_tampered_report(tiny_study, tmp_path / "s-all", "study.json", "config",
                                                 list(_leaves(study_cfg))), capsys)
    built = 0
    for i, path in enumerate(STUDY_SHOWN):
        built += _check_tampered(*_tampered_report(tiny_study, tmp_path / f"s{i}", "study.json", "config", [path]),
                                 capsys)
    assert built >= 3  # names, widths and the dataset are free text: shown, escaped


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def test_every_file_gets_the_umask_mode(run_copy):
    want = 0o666 & ~runs._UMASK
    modes = {p.relative_to(run_copy): stat.S_IMODE(p.stat().st_mode) for p in run_copy.rglob("*") if p.is_file()}
    assert modes and all(m == want for m in modes.values()), modes


def test_a_resumed_flip_counts_the_time_of_every_part(run_copy, capsys, monkeypatch):
    from memloc.probes import Partial
    calls = []
    real = Partial.save

    def stop_after_first_chunk(self, arrays=None, state=None):
        real(self, arrays, state)
        calls.append(state)
        if len(calls) == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(Partial, "save", stop_after_first_chunk)
    argv = ["flip", run_copy, "--examples", "4", "--batch-examples", "2", "--others", "64", "--eval-subsample", "100",
            "--quiet"]
    assert cli(capsys, *argv)[0] == 130
    first = calls[0]
    assert len(first["records"]) in (2, 4) and first["seconds"] > 0
    assert json.loads((run_copy / "run.json").read_text())["stages"]["flipping"]["status"] == "interrupted"
    monkeypatch.undo()
    code, _, err = cli(capsys, *argv)
    assert code == 0, err
    s = json.loads((run_copy / "probes" / "flipping" / "summary.json").read_text())
    assert s["elapsed_s"] >= first["seconds"]
    assert s["examples_per_s"] == pytest.approx(s["examples"] / s["elapsed_s"], rel=1e-2)


def test_the_cifar_binary_reader_names_the_binary_folder(tmp_path):
    from memloc.core.errors import DataError
    from memloc.tasks.classification.readers import read_cifar
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    (d / "data_batch_1.bin").write_bytes(b"\x00" * 3073)
    with pytest.raises(DataError) as err:
        read_cifar(tmp_path, split="train")
    assert "cifar-10-batches-bin/" in str(err.value) and "cifar-10-batches-py/" not in str(err.value)


# ----------------------------------------------------------------------------- a folder is data, never code

EVIL_PY = '''
import pathlib
pathlib.Path({marker!r}).write_text("the folder's code ran")
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
class EvilConfig(GPT2Config):
    model_type = "evil"
class EvilModel(GPT2LMHeadModel):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
'''
NO_HUB = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}  # memloc must set it


def _gpt2_folder(folder: Path, **config) -> Path:
    """A tiny GPT-2 saved as save_pretrained writes it, its config.json then edited with `config`."""
    import transformers
    cfg = transformers.GPT2Config(vocab_size=300, n_positions=128, n_layer=1, n_head=2, n_embd=16, bos_token_id=299,
                                  eos_token_id=299)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(folder))
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder


def _tokenizer_folder(folder: Path) -> Path:
    from transformers import PreTrainedTokenizerFast

    from memloc.tasks.lm.sources import bible_verses
    from memloc.tasks.lm.tokenizers import BPETokenizer
    inner = BPETokenizer.train(bible_verses()[:400], 400).tokenizer
    PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<|endoftext|>").save_pretrained(str(folder))
    return folder


def _ask_for_code(folder: Path, config: str, entry: dict, marker: Path) -> None:
    path = folder / config
    path.write_text(json.dumps({**json.loads(path.read_text()), **entry}))
    (folder / "evil.py").write_text(EVIL_PY.format(marker=str(marker)))


def _said_yes(*argv) -> subprocess.CompletedProcess:
    """`memloc ARGV` with "y" typed at any question, the hub's offline mode not set by the environment."""
    return subprocess.run([sys.executable, "-m", "memloc.cli", *map(str, argv)], input="y\ny\ny\n",
                          capture_output=True, text=True, env=NO_HUB, timeout=600)


LM_TINY = ["train", "--task", "lm", "--preset", "smoke", "--epochs", "1", "--sequences", "200", "--quiet"]


@pytest.fixture(scope="module")
def hf_tok_run(tmp_path_factory) -> Path:
    """A one-epoch language-model run whose tokenizer came from a Hugging Face folder."""
    root = tmp_path_factory.mktemp("hf_tok_run")
    out = root / "run"
    assert main([*LM_TINY, "--tokenizer", f"hf:{_tokenizer_folder(root / 'tok')}", "--out", str(out)]) == 0
    return out


def test_a_model_folder_asking_for_its_own_code_is_refused_even_after_a_yes(tmp_path):
    marker = tmp_path / "ran"
    model = _gpt2_folder(tmp_path / "model", model_type="evil")
    _ask_for_code(model, "config.json", {"auto_map": {"AutoConfig": "evil.EvilConfig",
                                                      "AutoModelForCausalLM": "evil.EvilModel"}}, marker)
    res = _said_yes(*LM_TINY, "--model", f"hf:{model}", "--out", tmp_path / "run")
    assert_one_line_error(res.returncode, res.stderr, str(model / "config.json"), "auto_map", "never runs code")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_tokenizer_folder_asking_for_its_own_code_is_refused_even_after_a_yes(tmp_path):
    marker = tmp_path / "ran"
    tok = _tokenizer_folder(tmp_path / "tok")
    _ask_for_code(tok, "tokenizer_config.json", {"tokenizer_class": "EvilTokenizer",
                                                 "auto_map": {"AutoTokenizer": [None, "evil.EvilTokenizer"]}}, marker)
    res = _said_yes(*LM_TINY, "--tokenizer", f"hf:{tok}", "--out", tmp_path / "run")
    assert_one_line_error(res.returncode, res.stderr, str(tok / "tokenizer_config.json"), "auto_map")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_reading_a_run_whose_tokenizer_asks_for_code_runs_none(hf_tok_run, tmp_path):
    """A run shared by a colleague: its tokenizer is read from its tokenizer.json alone; a run in the older
    layout (transformers' files) is read with no code, and one asking for code is refused."""
    marker = tmp_path / "ran"
    run = tmp_path / "run"
    shutil.copytree(hf_tok_run, run)
    (run / "tokenizer" / "tokenizer_config.json").write_text("{}")
    _ask_for_code(run / "tokenizer", "tokenizer_config.json", {
        "tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": [None, "evil.EvilTokenizer"]}}, marker)
    res = _said_yes("evaluate", run)
    assert res.returncode == 0, res.stderr
    assert not marker.exists()
    meta = run / "tokenizer" / "memloc_tokenizer.json"  # the older layout: no eos id, transformers' files
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "eos_id"}))
    res = _said_yes("evaluate", run)
    assert_one_line_error(res.returncode, res.stderr, "tokenizer_config.json", "auto_map")
    assert not marker.exists()


@pytest.mark.parametrize("attention", ["kernels-community/flash-attn2", "flash_attention_2"])
def test_a_config_naming_a_hub_kernel_sends_no_request(tmp_path, attention):
    """A local fake hub at HF_ENDPOINT counts requests: a kernel repository is refused in one line, and a
    flash-attention name (which transformers would fetch as a kernel) loads with memloc's own attention: none."""
    import http.server
    import threading
    hits = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()
        do_HEAD = do_POST = do_GET

        def log_message(self, *a):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        model = _gpt2_folder(tmp_path / "model", attn_implementation=attention)
        res = subprocess.run([sys.executable, "-m", "memloc.cli", *LM_TINY, "--model", f"hf:{model}", "--out",
                              str(tmp_path / "run")], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             env={**NO_HUB, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"},
                             timeout=600)
    finally:
        server.shutdown()
    assert hits == []
    if "/" in attention:
        assert_one_line_error(res.returncode, res.stderr, "attention kernel", "never downloads")
        assert not (tmp_path / "run").exists()
    else:
        assert res.returncode == 0, res.stderr


def test_pickled_weights_with_a_payload_are_one_line(tmp_path):
    """A pytorch_model.bin that torch.load(weights_only=True) refuses: its payload does not run, one line says
    why and how to convert a trusted one, nothing is written."""
    import torch
    import transformers
    marker = tmp_path / "ran"
    model = tmp_path / "model"
    cfg = transformers.GPT2Config(vocab_size=300, n_positions=128, n_layer=1, n_head=2, n_embd=16, bos_token_id=299,
                                  eos_token_id=299)
    cfg.save_pretrained(str(model))
    state = dict(transformers.GPT2LMHeadModel(cfg).state_dict())
    state["payload"] = _Payload(str(marker))
    torch.save(state, model / "pytorch_model.bin")
    code = main([*LM_TINY, "--model", f"hf:{model}", "--out", str(tmp_path / "run")])
    assert code == 2 and not marker.exists() and not (tmp_path / "run").exists()
    res = _said_yes(*LM_TINY, "--model", f"hf:{model}", "--out", tmp_path / "run")
    assert_one_line_error(res.returncode, res.stderr, str(model), "refused unread", "safetensors")
    assert not marker.exists() and not (tmp_path / "run").exists()


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("value", [["x"], [1.5], [-1], [2 ** 64], "12", None])
def test_a_damaged_lm_study_json_is_one_line(hf_tok_run, tmp_path, capsys, value):
    run = tmp_path / "run"
    shutil.copytree(hf_tok_run, run)
    study = {"flip_examples": 2, "flip_indices": value} if value is not None else {"retrain_epochs": "two"}
    (run / "lm_study.json").write_text(json.dumps(study))
    before = digest(run)
    code, _, err = cli(capsys, "run", "--resume", run, "--quiet")
    assert_one_line_error(code, err, str(run / "lm_study.json"), "damaged")
    assert digest(run) == before
