"""Scale-out beyond one probe: a dropout grid and a multi-seed study in shards (`--shard I/N`), joined by
`memloc merge` into the files one process writes; every broken split named in one line; a driver killed and run
again; Ray on a local cluster bound to the loopback (slow tier, with `memloc[ray]`)."""

import importlib.util
import ipaddress
import json
import os
import shutil
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

GRID = ["--preset", "smoke", "--dataset", "digits", "--train-size", "300", "--epochs", "1", "--batch-size", "64",
        "--no-gradient-accounting", "--pairs", "0.4,0.1;0.5,0.2", "--quiet"]
STUDY = ["--preset", "smoke", "--dataset", "digits", "--train-size", "300", "--epochs", "2", "--batch-size", "64",
         "--seeds", "0,1", "--flip-examples", "3", "--grid", "--quiet"]
FLIP = ["--examples", "6", "--others", "64", "--eval-subsample", "200", "--batch-examples", "2"]


def assert_same_files(a: Path, b: Path, *, skip: tuple[str, ...] = ()) -> None:
    """Every array, weight file and CSV under a and b is the same (NaN equals NaN); the same files exist. A probe's
    kept progress (partial.npz) holds its wall time: only its presence is compared."""
    def files(root: Path) -> list[Path]:
        return sorted(p.relative_to(root) for p in root.rglob("*")
                      if p.is_file() and not p.name.startswith(".") and not any(s in p.parts for s in skip))
    fa, fb = files(a), files(b)
    assert fa == fb
    for f in fa:
        if f.suffix == ".npz" and f.name != "partial.npz":
            za, zb = load_npz(a / f), load_npz(b / f)
            assert sorted(za) == sorted(zb), f
            for k in za:
                np.testing.assert_array_equal(za[k], zb[k], err_msg=f"{f}: {k}")
        elif f.suffix in (".safetensors", ".csv"):
            assert (a / f).read_bytes() == (b / f).read_bytes(), f


# ----------------------------------------------------------------------------- a dropout grid in shards

@pytest.fixture(scope="module")
def whole_grid(tmp_path_factory):
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("grid") / "whole"
    try:
        assert main(["dropout-grid", *GRID, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    return out


@pytest.mark.parametrize("n", [1, 3])
def test_grid_in_shards_merges_to_one_process(whole_grid, tmp_path, capsys, one_thread, n):
    split = tmp_path / "split"
    for i in reversed(range(n)):  # any order
        assert main(["dropout-grid", *GRID, "--out", str(split), "--shard", f"{i}/{n}"]) == 0
        assert f"shard {i}/{n} of the grid" in capsys.readouterr().out
        assert not (split / "grid.csv").exists()  # nothing looks finished before the merge
    assert main(["merge", str(split)]) == 0
    assert "grid.csv (6 cells)" in capsys.readouterr().out
    assert (split / "grid.csv").read_text() == (whole_grid / "grid.csv").read_text()
    assert not (split / "shards").exists()
    assert_same_files(whole_grid, split)


def test_grid_shards_refuse_mixed_settings_and_broken_splits(tmp_path, capsys, one_thread):
    out = tmp_path / "g"
    # shard 1/3 trains cells 1 and 4 only (of etd-0.4-0.1, etd-0.5-0.2, dropout-0.46, dropout-0.6, sparse-0.46, ...)
    assert main(["dropout-grid", *GRID, "--out", str(out), "--shard", "1/3"]) == 0
    capsys.readouterr()
    trained = sorted(p.name for p in out.iterdir() if (p / "cell.json").exists())
    assert trained == ["etd-0.5-0.2", "sparse-0.46"]
    assert_one_line_error(main(["merge", str(out)]), capsys.readouterr().err, "shard 0/3", "missing", "--shard 0/3")
    # another shard with other cells (another pair): refused before anything is trained
    code = main(["dropout-grid", *GRID[:-3], "--pairs", "0.4,0.1", "--quiet", "--out", str(out), "--shard", "0/3"])
    assert_one_line_error(code, capsys.readouterr().err, "other settings")
    assert not (out / "shards" / "0-of-3").exists()
    # shards of another split beside it
    assert main(["dropout-grid", *GRID, "--out", str(out), "--shard", "0/2"]) == 0
    capsys.readouterr()
    assert_one_line_error(main(["merge", str(out)]), capsys.readouterr().err, "2 different splits")
    assert not (out / "grid.csv").exists()
    # a shard killed before its end is not finished
    shutil.rmtree(out / "shards" / "0-of-2")
    for i in (0, 2):
        assert main(["dropout-grid", *GRID, "--out", str(out), "--shard", f"{i}/3"]) == 0
    record = out / "shards" / "2-of-3" / "shard.json"
    info = json.loads(record.read_text())
    record.write_text(json.dumps({**info, "complete": False}))
    capsys.readouterr()
    assert_one_line_error(main(["merge", str(out)]), capsys.readouterr().err, "shard 2/3", "not finished")
    # run again, it reads its cells back and is finished; then the merge writes the table
    assert main(["dropout-grid", *GRID, "--out", str(out), "--shard", "2/3"]) == 0
    assert main(["merge", str(out)]) == 0
    assert (out / "grid.csv").exists()
    # flags of the executors without one: one line
    code = main(["dropout-grid", *GRID, "--out", str(tmp_path / "x"), "--devices", "cpu,cpu"])
    assert_one_line_error(code, capsys.readouterr().err, "--executor processes or ray")
    code = main(["dropout-grid", *GRID, "--out", str(tmp_path / "x"), "--executor", "processes", "--devices",
                 "cpu", "--address", "127.0.0.1:1"])
    assert_one_line_error(code, capsys.readouterr().err, "--address", "--executor ray")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- a study in shards

@pytest.mark.slow
def test_multi_seed_study_in_shards_merges_to_one_process(tmp_path, capsys, one_thread):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["run", *STUDY, "--out", str(whole)]) == 0
    for i in (1, 0):
        assert main(["run", *STUDY, "--out", str(split), "--shard", f"{i}/2"]) == 0
        assert f"shard {i}/2 of the study" in capsys.readouterr().out
    assert not (split / "report").exists() and not json.loads((split / "study.json").read_text()).get("finished")
    # one seed per shard: the other's runs were not touched by it
    assert main(["merge", str(split)]) == 0
    assert (split / "report" / "report.html").exists()
    sa, sb = (json.loads((d / "study.json").read_text()) for d in (whole, split))
    assert sb["finished"] and {k: v["status"] for k, v in sa["stages"].items()} == \
        {k: v["status"] for k, v in sb["stages"].items()}
    assert not (split / "shards").exists()
    assert_same_files(whole, split, skip=("report",))
    # the study is finished: a shard has nothing left
    code = main(["run", *STUDY, "--out", str(split), "--shard", "0/2"])
    assert_one_line_error(code, capsys.readouterr().err, "is finished")
    # the same study by the process executor: 2 CPU workers of one thread, then the merge
    driver = _memloc("run", *STUDY, "--out", str(tmp_path / "workers"), "--executor", "processes", "--devices",
                     "cpu,cpu")
    out, err = driver.communicate(timeout=600)
    assert driver.returncode == 0, err
    assert "merged 2 shards" in out + err and (tmp_path / "workers" / "report" / "report.html").exists()
    assert_same_files(whole, tmp_path / "workers", skip=("report",))


def test_study_shards_refuse_what_would_lose_work(tmp_path, capsys):
    out = tmp_path / "s"
    code = main(["run", *STUDY, "--shard", "0/2"])
    assert_one_line_error(code, capsys.readouterr().err, "--out")
    code = main(["run", *STUDY, "--out", str(out), "--shard", "0/2", "--overwrite"])
    assert_one_line_error(code, capsys.readouterr().err, "--overwrite", "other shards")
    code = main(["run", *STUDY, "--out", str(out), "--executor", "processes", "--devices", "cpu", "--overwrite"])
    assert_one_line_error(code, capsys.readouterr().err, "--overwrite", "other shards")
    (out / "mine.txt").parent.mkdir()
    (out / "mine.txt").write_text("the user's")
    code = main(["run", *STUDY, "--out", str(out), "--shard", "0/2"])
    assert_one_line_error(code, capsys.readouterr().err, "not a study")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    code = main(["run", "--task", "lm", "--preset", "smoke", "--out", str(tmp_path / "lm"), "--shard", "0/2"])
    assert_one_line_error(code, capsys.readouterr().err, "does not split into shards")
    code = main(["merge", str(out)])
    assert_one_line_error(code, capsys.readouterr().err, "not a memloc run, study or dropout grid")


# ----------------------------------------------------------------------------- the driver killed, run again

def _memloc(*args: str, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "memloc.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _pids(*needles: str) -> list[int]:
    """PIDs of this machine's processes whose command line holds every needle."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(n in cmd for n in needles):
            pids.append(int(d.name))
    return pids


def _finished_shards(run: Path) -> int:
    from memloc.core.runs import RunDir
    from memloc.probes.engine import Partial
    done = 0
    for d in (run / "probes" / "flipping" / "shards").glob("*-of-*"):
        i, n = (int(v) for v in d.name.split("-of-"))
        got = Partial(RunDir.open(run), "flipping", shard=(i, n))._read()
        done += bool(got and got["complete"])
    return done


@pytest.mark.slow
def test_driver_killed_then_run_again_continues_with_the_shards_left(digits_master, tmp_path):
    whole, split = copy_of(digits_master, tmp_path / "whole"), copy_of(digits_master, tmp_path / "split")
    ref = _memloc("flip", str(whole), *FLIP, "--quiet", env_extra={"OMP_NUM_THREADS": "1"})
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    command = ["flip", str(split), *FLIP, "--executor", "processes", "--devices", "cpu,cpu", "--shards", "6"]
    driver = _memloc(*command)
    deadline = time.time() + 180
    while _finished_shards(split) < 2 and time.time() < deadline and driver.poll() is None:
        time.sleep(0.05)
    assert driver.poll() is None, "the driver finished before it could be killed"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 30
    while _pids("--shard", str(split)) and time.time() < deadline:  # its workers die with it
        time.sleep(0.1)
    assert not _pids("--shard", str(split))
    kept = _finished_shards(split)
    assert 2 <= kept < 6 and not (split / "probes" / "flipping" / "summary.json").exists()
    again = _memloc(*command)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    from test_shards import assert_same_result
    assert_same_result(whole, split, "flipping")


# ----------------------------------------------------------------------------- Ray, on the loopback only

def _connections(pids: set[int], *, listening: bool = False) -> list[tuple[str, str]]:
    """(local, peer) addresses of the TCP connections of `pids` (or the sockets they listen on), from `ss -tnp`."""
    out = subprocess.run(["ss", "-tlnpH" if listening else "-tnpH"], capture_output=True, text=True).stdout
    conns = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 6 and any(f"pid={p}," in parts[5] for p in pids):
            conns.append((parts[3], parts[4]))
    return conns


def _loopback(addr: str) -> bool:
    """Whether `ss`'s ADDRESS:PORT is on the loopback (127.0.0.0/8, ::1, or IPv4 127.x mapped into IPv6)."""
    host = addr.rsplit(":", 1)[0].strip("[]").split("%")[0]
    if host in ("*", "0.0.0.0", "::"):
        return False
    ip = ipaddress.ip_address(host)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += children.get(p, [])
    return out


RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
# found, not imported: memloc sets Ray's loopback switch before it first imports ray (here: in the drivers)
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (memloc[ray])")


@pytest.mark.slow
@needs_ray
def test_ray_cluster_on_the_loopback_flips_in_shards_with_a_worker_killed(digits_master, tmp_path):
    whole, split = copy_of(digits_master, tmp_path / "whole"), copy_of(digits_master, tmp_path / "split")
    ref = _memloc("flip", str(whole), *FLIP, "--quiet", env_extra={"OMP_NUM_THREADS": "1"})
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    driver = _memloc("flip", str(split), *FLIP, "--executor", "ray", "--shards", "3", env_extra=RAY_ENV)
    killed, peers, bound = None, set(), set()
    deadline = time.time() + 240
    while driver.poll() is None and time.time() < deadline:
        family = _descendants(driver.pid)  # the driver, the cluster it started, the cluster's workers
        peers |= {peer for _, peer in _connections(family)}
        bound |= {local for local, _ in _connections(family, listening=True)}
        if killed is None:
            shards = list((split / "probes" / "flipping" / "shards").glob("*/partial.npz"))
            workers = _pids("ray::ray_shard")
            if shards and workers:  # a task has saved part of its shard: kill its worker mid-way
                os.kill(workers[0], signal.SIGKILL)
                killed = workers[0]
        time.sleep(0.05)
    out, err = driver.communicate(timeout=60)
    assert driver.returncode == 0, err
    assert killed is not None, "no Ray worker was seen to kill"
    from test_shards import assert_same_result
    assert_same_result(whole, split, "flipping")
    assert peers, "no connection of the cluster was seen"
    outside = sorted(p for p in peers if p != "*:*" and not _loopback(p))
    assert not outside, f"the Ray cluster connected outside the loopback: {outside}"
    assert bound, "no listening socket of the cluster was seen"
    open_ = sorted(a for a in bound if not _loopback(a))
    assert not open_, f"the Ray cluster listens beyond the loopback: {open_}"


@pytest.mark.slow
@needs_ray
def test_a_ray_cluster_started_here_asks_no_cloud_metadata_server(tmp_path, monkeypatch):
    """Ray's dashboard process asks 169.254.169.254 and metadata.google.internal which cloud it runs on (usage
    reports off or not; a CI run saw the connection). The cluster memloc starts sends those questions to a loopback
    address that nothing answers. Here two recorders stand on the loopback: one at that address, which must receive
    the questions, and one as the user's own proxy, which must not (nor lose its place in the driver's settings)."""
    import socket
    import threading

    from memloc.core import scale
    enough = tmp_path / "asked"

    def recorder() -> tuple[socket.socket, list[str]]:
        srv, asked = socket.socket(), []
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)

        def record():
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                with conn:
                    first = conn.recv(4096).decode(errors="replace").splitlines()
                    asked.append(first[0] if first else "")
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                if sum("169.254.169.254" in a or "metadata.google" in a for a in asked) >= 2:
                    enough.touch()
        threading.Thread(target=record, daemon=True).start()
        return srv, asked

    (sink, asked), (users, users_asked) = recorder(), recorder()
    monkeypatch.setattr(scale, "NO_HTTP", f"http://127.0.0.1:{sink.getsockname()[1]}")
    for k, v in RAY_ENV.items():
        monkeypatch.setenv(k, v)
    proxies = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY")
    for k in proxies:
        monkeypatch.delenv(k, raising=False)
    users_proxy = f"http://127.0.0.1:{users.getsockname()[1]}"
    monkeypatch.setenv("http_proxy", users_proxy)

    def shard(argv, flag=str(enough)):  # waits (at most 60 s) for the cluster's questions before Ray stops it
        import os as os_
        import time as time_
        deadline = time_.time() + 60
        while not os_.path.exists(flag) and time_.time() < deadline:
            time_.sleep(0.2)
        return 0, ""

    try:
        assert scale.run_ray(shard, ["x"], 1, num_cpus=1, progress=False) == 1
    finally:
        sink.close()
        users.close()
    assert not users_asked, f"the cluster used the user's proxy: {users_asked}"
    assert {k: os.environ[k] for k in proxies if k in os.environ} == {"http_proxy": users_proxy}
    if not asked:
        pytest.skip(f"this Ray ({importlib.import_module('ray').__version__}) asked no metadata server")
    assert any("169.254.169.254" in a for a in asked), asked


@pytest.mark.slow
@needs_ray
def test_ray_runs_a_small_grid_and_refuses_what_cannot_run(whole_grid, tmp_path, capsys, monkeypatch):
    out = tmp_path / "g"
    driver = _memloc("dropout-grid", *GRID, "--out", str(out), "--executor", "ray", "--shards", "2",
                     env_extra=RAY_ENV)
    stdout, err = driver.communicate(timeout=400)
    assert driver.returncode == 0, err
    assert (out / "grid.csv").read_text() == (whole_grid / "grid.csv").read_text()
    # GPUs asked of a cluster without any: one line at once (a Ray task would wait forever)
    for k, v in RAY_ENV.items():
        monkeypatch.setenv(k, v)
    code = main(["dropout-grid", *GRID, "--out", str(tmp_path / "x"), "--executor", "ray", "--gpus-per-task", "0.5"])
    assert_one_line_error(code, capsys.readouterr().err, "--gpus-per-task 0.5", "0 GPUs")
    import ray
    assert not ray.is_initialized()  # the cluster it started is stopped again
    # a cluster that cannot be reached: one line, exit 2, nothing written
    code = main(["dropout-grid", *GRID, "--out", str(tmp_path / "y"), "--executor", "ray", "--address",
                 "127.0.0.1:9"])
    assert_one_line_error(code, capsys.readouterr().err, "cannot reach the Ray cluster", "127.0.0.1:9")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ----------------------------------------------------------------------------- localize: greedy removal by sequence

def test_greedy_localization_in_shards_merges_to_one_process(tiny_lm_master, tmp_path, capsys, one_thread):
    whole, split = copy_of(tiny_lm_master, tmp_path / "whole"), copy_of(tiny_lm_master, tmp_path / "split")
    idx = tmp_path / "idx.txt"
    idx.write_text("0\n1\n2\n3\n4\n")
    flags = ["--method", "greedy", "--indices", str(idx), "--k", "3", "--quiet"]
    assert main(["localize", str(whole), *flags]) == 0
    for i in (1, 0):
        assert main(["localize", str(split), *flags, "--shard", f"{i}/2"]) == 0
    assert main(["merge", str(split), "--quiet"]) == 0
    from test_shards import assert_same_result
    assert_same_result(whole, split, "localize")
    # the other methods learn one mask for every sequence: nothing to split, one line before any work
    capsys.readouterr()
    for extra in (["--shard", "0/2"], ["--executor", "processes", "--devices", "cpu"]):
        code = main(["localize", str(split), "--method", "zero-out", "--indices", str(idx), "--quiet", *extra])
        assert_one_line_error(code, capsys.readouterr().err, "only with --method greedy")
    assert not (split / "probes" / "localize" / "shards").exists()


@pytest.mark.slow
@needs_ray
def test_ray_cluster_at_an_address_started_by_ray_start(digits_master, tmp_path):
    """A cluster the user started (`ray start --head`, on the loopback here; token authentication on, as Ray 2.5x
    makes it) runs the shards of `--executor ray --address HOST:PORT`, and is left running."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, **RAY_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    start = subprocess.run([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                            "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        whole, split = copy_of(digits_master, tmp_path / "whole"), copy_of(digits_master, tmp_path / "split")
        ref = _memloc("flip", str(whole), *FLIP, "--quiet", env_extra={"OMP_NUM_THREADS": "1"})
        assert ref.wait(timeout=300) == 0, ref.stderr.read()
        driver = _memloc("flip", str(split), *FLIP, "--executor", "ray", "--address", f"127.0.0.1:{port}",
                         "--shards", "2", env_extra=RAY_ENV)
        out, err = driver.communicate(timeout=300)
        assert driver.returncode == 0, err
        from test_shards import assert_same_result
        assert_same_result(whole, split, "flipping")
        assert _pids("gcs_server")  # the user's cluster is still there
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)
