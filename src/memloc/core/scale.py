"""Scale-out: a probe's work in shards (`--shard I/N`), run by worker processes, joined exactly (`memloc merge`).

The primitive is the shard: `memloc flip RUN --shard I/N` (also `rewind`,
`retrain`) does a deterministic 1/N of the probe's items (every N-th example or
layer from the I-th) and keeps them in RUN/probes/<name>/shards/I-of-N/,
atomically and resumably, with its own lock, so that shards run side by side on
any scheduler (a SLURM array, a shell loop over GPUs); `memloc merge RUN` joins
them into the files one process would have written (`probes.engine.merge_shards`).

A grid's or a study's cells split the same way (`memloc dropout-grid` and
`memloc run --seeds/--noise/--grid` with `--shard I/N`): each cell is a run
directory of its own, each shard keeps its stages in FOLDER/shards/I-of-N/, and
`memloc merge FOLDER` writes what one process writes last (grid.merge_grid,
study.merge_study).

`--executor processes --devices cpu,cpu` (or `0,1,2,3`: GPU ids) is the
scheduler built in: one worker process per device (spawned with the same
command and `--shard I/N --device ...`, a GPU worker pinned by
CUDA_VISIBLE_DEVICES, CPU workers sharing the cores), shards pulled from a
queue, a shard whose worker dies run again (it resumes from its saved part),
then the merge. Bad input stops everything at the first worker's one-line error.
`--executor ray` hands the same shards to Ray as tasks (a cluster at
`--address`, or one started here on the loopback), which places and retries them.
"""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .errors import ConfigError, RunError

if TYPE_CHECKING:
    from .runs import RunDir

EXECUTORS = ("local", "processes", "ray")
RETRIES = 2  # a shard whose worker dies is run again this many times before the driver gives up
# flags of the driver that a worker does not take (it gets its own --shard and --device)
_DRIVER_FLAGS = {"--executor": True, "--devices": True, "--shards": True, "--device": True, "--shard": True,
                 "--address": True, "--gpus-per-task": True, "--quiet": False}


def parse_devices(text: str) -> list[str]:
    """"cpu,cpu" or "0,1" (GPU ids) -> the workers' devices, checked against this machine."""
    devices = [d.strip() for d in str(text).split(",") if d.strip()]
    if not devices:
        raise ConfigError("--devices lists no device: pass e.g. --devices cpu,cpu or --devices 0,1")
    gpus = [d for d in devices if d != "cpu"]
    if any(not d.isdigit() for d in gpus):
        bad = next(d for d in gpus if not d.isdigit())
        raise ConfigError(f"--devices {text}: {bad!r} is neither cpu nor a GPU id: pass e.g. cpu,cpu or 0,1")
    if gpus:
        import torch
        have = torch.cuda.device_count()
        missing = [d for d in gpus if int(d) >= have]
        if missing:
            raise ConfigError(f"--devices {text}: this machine has {have} GPU(s), no GPU {missing[0]}: "
                              f"pass ids below {have}, or cpu")
    return devices


def worker_argv(argv: Sequence[str]) -> list[str]:
    """The driver's command line without the flags only a driver takes (a worker gets its own shard and device)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in _DRIVER_FLAGS:
            skip = _DRIVER_FLAGS[name] and "=" not in a
            continue
        out.append(a)
    return out


def _die_with_parent() -> None:
    """In a worker, before it starts: on Linux, be killed when the driver dies, even by SIGKILL (no orphan keeps a
    shard's lock; the driver run again resumes it)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def run_processes(argv: Sequence[str], devices: Sequence[str], shards: int | None = None, *, label: str = "shards",
                  progress: bool = True, log: Callable[[str], None] | None = None, retries: int = RETRIES) -> int:
    """Run `memloc <argv> --shard I/N --device D` for I = 0..N-1 on worker processes, one per device at a time.

    N = `shards` (default: one per device). A worker that fails with a memloc error (exit 2: bad input) stops
    the run with its line; one that dies otherwise (killed, out of memory) has its shard run again, up to
    `retries` times. Returns N. The workers are stopped if the driver stops.
    """
    log = log or (lambda s: None)
    n = shards or len(devices)
    if n < 1:
        raise ConfigError(f"--shards {n} must be at least 1")
    cpu_workers = sum(d == "cpu" for d in devices)
    threads = max(1, (os.cpu_count() or 1) // max(1, cpu_workers))
    queue, free = collections.deque(range(n)), list(devices)
    running: dict[subprocess.Popen, tuple[int, str, Path]] = {}
    tries: collections.Counter = collections.Counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc=label, unit="shard", dynamic_ncols=True, leave=False)
    with tempfile.TemporaryDirectory(prefix="memloc-workers-") as tmp:
        try:
            while queue or running:
                while queue and free:
                    i, dev = queue.popleft(), free.pop(0)
                    env = dict(os.environ)
                    if dev == "cpu":
                        env["OMP_NUM_THREADS"] = str(threads)
                        device = "cpu"
                    else:
                        env["CUDA_VISIBLE_DEVICES"] = dev
                        device = "cuda"
                    err = Path(tmp) / f"shard-{i}-try-{tries[i]}.err"
                    cmd = [sys.executable, "-m", "memloc.cli", *argv, "--shard", f"{i}/{n}", "--device", device,
                           "--quiet"]
                    with err.open("w") as fh:
                        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=fh,
                                                preexec_fn=_die_with_parent)
                    running[proc] = (i, dev, err)
                time.sleep(0.05)
                for proc in [p for p in running if p.poll() is not None]:
                    i, dev, err = running.pop(proc)
                    free.append(dev)
                    if proc.returncode == 0:
                        if bar is not None:
                            bar.update(1)
                        continue
                    lines = [l for l in err.read_text(errors="replace").splitlines() if l.strip()]
                    last = lines[-1] if lines else f"exit {proc.returncode}"
                    if proc.returncode == 2 and last.startswith("memloc: error: "):  # bad input: the same everywhere
                        raise RunError(f"shard {i}/{n}: {last[len('memloc: error: '):]}")
                    tries[i] += 1
                    if tries[i] > retries:
                        raise RunError(f"shard {i}/{n} failed {tries[i]} times (last on {dev}: {last}): see the "
                                       "message, then run the same command again (finished shards are kept)")
                    log(f"shard {i}/{n} on {dev} stopped ({last}); running it again (it resumes)")
                    queue.appendleft(i)
        finally:
            for proc in running:  # the driver stopped: its workers stop too (a rerun resumes their shards)
                proc.kill()
            for proc in running:
                proc.wait()
            if bar is not None:
                bar.close()
    return n


# ----------------------------------------------------------------------------- Ray

# a cluster started here: bound to the loopback, no dashboard, a small object store (the shards return two
# values; their results are files), no usage reports sent anywhere
LOCAL_RAY = {"include_dashboard": False, "_node_ip_address": "127.0.0.1", "object_store_memory": 512 * 2 ** 20,
             "logging_level": "ERROR", "log_to_driver": False}

# Ray (2.60) starts a dashboard process even without the dashboard, and its usage module asks the clouds' metadata
# servers (169.254.169.254, metadata.google.internal) which cloud it is on, usage reports off or not. The processes
# of a cluster started here are given a proxy that nothing answers (the loopback's closed discard port) for plain
# HTTP and HTTPS, every loopback address exempt: such a question is refused on this machine and no packet leaves it.
NO_HTTP = "http://127.0.0.1:9"
LOOPBACK_HOSTS = "127.0.0.1,localhost,::1"


@contextlib.contextmanager
def _offline_cluster():
    """The environment in which a cluster's processes start (they keep it), the driver's own restored after."""
    keys = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: LOOPBACK_HOSTS if "no_" in k.lower() else NO_HTTP for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _on_loopback(address: str) -> bool:
    """Whether a Ray address HOST:PORT names this machine's loopback (127.0.0.0/8, ::1, localhost)."""
    import ipaddress
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reachable(address: str) -> None:
    """A Ray address HOST:PORT that nothing answers on: one line at once (Ray itself would retry for minutes)."""
    import socket
    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            return
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot reach the Ray cluster at --address {address} ({err}): start it (`ray start "
                          "--head`) or pass its HOST:PORT; without --address memloc starts one on this machine") \
            from None


def run_ray(task: Callable[[list[str]], tuple[int, str]], argv: Sequence[str], shards: int | None = None, *,
            address: str | None = None, gpus_per_task: float | None = None, num_cpus: int | None = None,
            label: str = "shards", progress: bool = True, log: Callable[[str], None] | None = None,
            retries: int = RETRIES) -> int:
    """Run `memloc <argv> --shard I/N --device D` for I = 0..N-1 as Ray tasks; returns N.

    `task(argv)` runs one command in a Ray worker and returns (exit code, its last line on stderr): the CLI's
    `ray_shard`, passed in so that this module does not import the CLI that imports it.
    Each task asks for `gpus_per_task` GPUs (default: 1 where the cluster has GPUs, else a CPU task); a task whose
    worker dies is run again by Ray up to `retries` times (the shard resumes from its saved part). N = `shards`,
    default as many as the cluster runs at once. Without `address` a cluster is started here on the loopback
    (`num_cpus`, default all) and stopped at the end. A request for GPUs on a cluster without any fails at once.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray would otherwise report usage over the network
    if not address or _on_loopback(address):
        # a cluster of this machine: its node address the loopback (Ray's switch, read when ray is first imported,
        # and by the processes it starts), not the address other machines would reach it at; a driver that took
        # the machine's network address would not find the raylet of a cluster started on the loopback and wait
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address and "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get(
            "RAY_AUTH_TOKEN_PATH") or (Path.home() / ".ray" / "auth_token").exists()):
        # `ray start` makes a cluster that wants its token (kept in ~/.ray/auth_token), and a driver sends it only in
        # token mode (a cluster without authentication accepts it too)
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'memloc[ray]' (or use --executor processes)") \
            from None
    log = log or (lambda s: None)
    if address:
        _reachable(address)
    here = not ray.is_initialized()
    if here:
        if address:
            try:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            except ConnectionError as err:
                raise ConfigError(f"cannot connect to the Ray cluster at --address {address} ({err}); a cluster made "
                                  "by `ray start` wants its token: RAY_AUTH_TOKEN, or ~/.ray/auth_token as on its "
                                  "head node") from None
        else:
            with _offline_cluster():
                ray.init(num_cpus=num_cpus or os.cpu_count(), **LOCAL_RAY)
    refs: dict = {}
    bar = None
    try:
        have = ray.cluster_resources()
        gpus, cpus = float(have.get("GPU", 0)), float(have.get("CPU", 0))
        gpus_per_task = (1.0 if gpus else 0.0) if gpus_per_task is None else float(gpus_per_task)
        if gpus_per_task < 0:
            raise ConfigError(f"--gpus-per-task {gpus_per_task:g} must be 0 (CPU tasks) or more")
        if gpus_per_task > gpus:
            raise ConfigError(f"--gpus-per-task {gpus_per_task:g}: the Ray cluster has {gpus:g} GPUs, so no task "
                              "would ever start: pass --gpus-per-task 0 for CPU tasks, or a cluster with GPUs")
        n = shards or max(1, int(gpus // gpus_per_task) if gpus_per_task else int(cpus))
        if n < 1:
            raise ConfigError(f"--shards {n} must be at least 1")
        device = "cuda" if gpus_per_task > 0 else "cpu"
        remote = ray.remote(task).options(num_cpus=1, num_gpus=gpus_per_task, max_retries=retries)
        refs = {remote.remote([*argv, "--shard", f"{i}/{n}", "--device", device, "--quiet"]): i for i in range(n)}
        log(f"{n} shards as Ray tasks ({gpus_per_task:g} GPU each; the cluster has {cpus:g} CPUs, {gpus:g} GPUs)")
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=n, desc=label, unit="shard", dynamic_ncols=True, leave=False)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                i = refs.pop(ref)
                try:
                    code, last = ray.get(ref)
                except ray.exceptions.RayError as err:  # its worker died more than `retries` times
                    line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    raise RunError(f"shard {i}/{n} failed {retries + 1} times ({line}): see the message, then run "
                                   "the same command again (finished shards are kept)") from None
                if code != 0:
                    if last.startswith("memloc: error: "):
                        raise RunError(f"shard {i}/{n}: {last[len('memloc: error: '):]}")
                    raise RunError(f"shard {i}/{n} stopped ({last}): run the same command again (finished shards "
                                   "are kept)")
                if bar is not None:
                    bar.update(1)
    finally:
        for ref in refs:  # the driver stopped or a shard failed: the rest stop too (a rerun resumes them)
            ray.cancel(ref, force=True)
        if bar is not None:
            bar.close()
        if here:
            ray.shutdown()
    return n


# ----------------------------------------------------------------------------- shards of cells (grids, studies)
# A grid's or a study's cells are independent run directories: shard I of N trains every N-th cell from the I-th
# in place, and keeps its own record of stages in FOLDER/shards/I-of-N/shard.json ("complete" once all its cells
# are), so that shards never write the same file; `memloc merge FOLDER` checks the split and writes what one
# process writes last (grid.csv; a study's record and report).

SHARDS = "shards"


def mine(items: Sequence, shard: tuple[int, int] | None) -> list:
    """Shard I of N's items: every N-th from the I-th (all of them without a shard)."""
    if shard is None:
        return list(items)
    i, n = shard
    return list(items)[i::n]


def join_shard(root: Path, shard: tuple[int, int], **record) -> "RunDir":
    """The record of shard `shard` of the cells in `root` (made on first use; `record` joins it)."""
    from .runs import RunDir, exclusive
    i, n = shard
    folder = Path(root) / SHARDS / f"{i}-of-{n}"
    with exclusive(folder):
        if not (folder / "shard.json").exists():
            RunDir.create(folder, kind="shard", shard=[i, n], complete=False, **record)
    return RunDir(folder, "shard")


def finished_shards(root: Path, what: str, rerun: str) -> list["RunDir"]:
    """Every shard record of the cells in `root`, checked to be one whole, finished split; `rerun` is the command
    that runs a shard, with "{shard}" where its I/N goes. A missing, unfinished or mixed shard: one line."""
    from .runs import RunDir, shard_split
    base = Path(root) / SHARDS
    found, n = shard_split(base, f"{root} has no shards to merge: run {rerun.format(shard='I/N')} for I = 0..N-1 "
                                 "first")
    records = []
    for i in range(n):
        if i not in found:
            raise RunError(f"shard {i}/{n} of {what} is missing in {base}: run {rerun.format(shard=f'{i}/{n}')} "
                           "(with the other shards' flags) first")
        record = RunDir(found[i], "shard")
        if not record.info.get("complete"):
            raise RunError(f"shard {i}/{n} of {what} is not finished: run {rerun.format(shard=f'{i}/{n}')} again "
                           "with its flags (it resumes), then merge")
        records.append(record)
    return records
