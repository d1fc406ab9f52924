"""Shards and merge: a probe's work split by item (`--shard I/N`), joined by `memloc merge` into the files one process
writes; the process executor with 2 CPU workers, one of them killed mid-way; every broken split named in one line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_of
from toys import assert_one_line_error

from memloc.cli import main
from memloc.core.files import load_npz

FLIP = ["--examples", "5", "--others", "64", "--eval-subsample", "200", "--batch-examples", "4"]
RETRAIN = ["--epochs", "2"]
REWIND = ["--every", "2"]
# wall times and the run's path: differ between any runs
TIMING = {"elapsed_s", "scoring_s", "examples_per_s", "seconds", "run"}


@pytest.fixture(scope="module")
def master(digits_master, tmp_path_factory):
    return digits_master


def _run(master: Path, tmp: Path, name: str) -> Path:
    return copy_of(master, tmp / name)


def assert_same_result(a: Path, b: Path, probe: str) -> None:
    """The probe's files of runs a and b are the same: every array, the CSV, the summary but for wall times."""
    da, db = a / "probes" / probe, b / "probes" / probe
    assert sorted(p.name for p in da.iterdir()) == sorted(p.name for p in db.iterdir())
    za, zb = load_npz(da / "arrays.npz"), load_npz(db / "arrays.npz")
    assert sorted(za) == sorted(zb)
    for k in za:
        np.testing.assert_array_equal(za[k], zb[k], err_msg=k)
    csv_name = f"{probe}.csv"
    assert (da / csv_name).read_text() == (db / csv_name).read_text()
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (da, db))
    assert {k: v for k, v in sa.items() if k not in TIMING} == {k: v for k, v in sb.items() if k not in TIMING}


@pytest.mark.parametrize("command,probe,flags,n", [
    ("flip", "flipping", FLIP, 1), ("flip", "flipping", FLIP, 2), ("flip", "flipping", FLIP, 3),
    ("retrain", "retraining", RETRAIN, 2), ("rewind", "rewinding", REWIND, 3)])
def test_merged_shards_equal_one_process(master, tmp_path, capsys, one_thread, command, probe, flags, n):
    whole, split = _run(master, tmp_path, "whole"), _run(master, tmp_path, "split")
    assert main([command, str(whole), *flags, "--quiet"]) == 0
    for i in reversed(range(n)):  # any order
        assert main([command, str(split), *flags, "--shard", f"{i}/{n}", "--quiet"]) == 0
        assert f"shard {i}/{n} of {probe}" in capsys.readouterr().out
        assert not (split / "probes" / probe / "summary.json").exists()  # nothing looks finished before the merge
    assert main(["merge", str(split), "--quiet"]) == 0
    assert_same_result(whole, split, probe)
    assert not (split / "probes" / probe / "shards").exists()
    stages = json.loads((split / "run.json").read_text())["stages"]
    assert stages[probe]["status"] == "done"


def test_a_shard_resumes_and_is_marked_complete_at_its_end(master, tmp_path, one_thread):
    from memloc.core.runs import RunDir
    from memloc.probes.engine import Partial
    run = _run(master, tmp_path, "r")
    assert main(["flip", str(run), *FLIP, "--shard", "1/2", "--quiet"]) == 0
    got = Partial(RunDir.open(run), "flipping", shard=(1, 2))._read()
    assert got["complete"] and len(got["state"]["records"]) == 5  # examples 1, 3, 5, 7, 9 of the 10 chosen
    # the same shard again: nothing left to do, the same records
    assert main(["flip", str(run), *FLIP, "--shard", "1/2", "--quiet"]) == 0
    assert Partial(RunDir.open(run), "flipping", shard=(1, 2))._read()["state"]["records"] == got["state"]["records"]


def test_broken_splits_are_named_in_one_line(master, tmp_path, capsys, one_thread):
    run = _run(master, tmp_path, "r")
    assert_one_line_error(main(["merge", str(run)]), capsys.readouterr().err, "no shards to merge", "--shard I/N")
    assert main(["flip", str(run), *FLIP, "--shard", "0/3", "--quiet"]) == 0
    capsys.readouterr()
    code = main(["merge", str(run)])
    assert_one_line_error(code, capsys.readouterr().err, "shard 1/3", "missing", "--shard 1/3")
    assert not (run / "probes" / "flipping" / "summary.json").exists()
    # a shard of another split beside it
    assert main(["flip", str(run), *FLIP, "--shard", "1/2", "--quiet"]) == 0
    capsys.readouterr()
    assert_one_line_error(main(["merge", str(run)]), capsys.readouterr().err, "2 different splits", "N = 2, 3")
    # an unfinished shard (as a killed worker leaves it)
    import shutil
    shutil.rmtree(run / "probes" / "flipping" / "shards" / "1-of-2")
    for i in (1, 2):
        assert main(["flip", str(run), *FLIP, "--shard", f"{i}/3", "--quiet"]) == 0
    from memloc.core.runs import RunDir
    from memloc.probes.engine import Partial
    p = Partial(RunDir.open(run), "flipping", shard=(2, 3))
    got = p._read()
    p.settings = got["settings"]
    p.save(got["arrays"], {"records": got["state"]["records"][:1]})  # complete=False
    capsys.readouterr()
    assert_one_line_error(main(["merge", str(run)]), capsys.readouterr().err, "shard 2/3", "not finished")
    # bad shard flags: one line from the parser, exit 2
    for bad in (["--shard", "3/3"], ["--shard", "x"], ["--shard", "0/0"]):
        assert main(["flip", str(run), *FLIP, *bad]) == 2
        err = capsys.readouterr().err
        assert "--shard" in err and ("I/N" in err or "0..N-1" in err), err
    code = main(["flip", str(run), *FLIP, "--devices", "cpu,cpu"])
    assert_one_line_error(code, capsys.readouterr().err, "--executor processes")


def _memloc(*args: str, env_extra: dict | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "memloc.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _workers(run: Path) -> list[int]:
    """PIDs of the worker processes (`--shard` in their command line) working on `run`."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--shard" in cmd and str(run).encode() in cmd:
            pids.append(int(d.name))
    return pids


def test_process_executor_with_two_cpu_workers_one_killed(master, tmp_path):
    """2 CPU workers (one thread each) over 4 shards; one worker SIGKILLed mid-shard: the shard is run again and the
    merged result equals one process on one thread."""
    whole, split = _run(master, tmp_path, "whole"), _run(master, tmp_path, "split")
    ref = _memloc("flip", str(whole), *FLIP, "--quiet", env_extra={"OMP_NUM_THREADS": "1"})
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    driver = _memloc("flip", str(split), *FLIP, "--executor", "processes", "--devices", "cpu,cpu", "--shards", "4")
    killed = None
    deadline = time.time() + 120
    while killed is None and time.time() < deadline and driver.poll() is None:
        pids = _workers(split)
        if pids:
            time.sleep(1.0)  # mid-way: the worker has started its shard
            try:
                os.kill(pids[0], signal.SIGKILL)
                killed = pids[0]
            except ProcessLookupError:
                continue
        time.sleep(0.05)
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, err
    assert killed is not None, "no worker was seen to kill"
    assert "running it again" in out + err
    assert_same_result(whole, split, "flipping")
    assert not _workers(split)  # no worker outlives the driver
