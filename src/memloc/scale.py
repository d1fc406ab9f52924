"""Scale-out: a probe's work in shards (`--shard I/N`), run by worker processes, joined exactly (`memloc merge`).

The primitive is the shard: `memloc flip RUN --shard I/N` (also `rewind`,
`retrain`) does a deterministic 1/N of the probe's items (every N-th example or
layer from the I-th) and keeps them in RUN/probes/<name>/shards/I-of-N/,
atomically and resumably, with its own lock, so that shards run side by side on
any scheduler (a SLURM array, a shell loop over GPUs); `memloc merge RUN` joins
them into the files one process would have written (`probes.engine.merge_shards`).

`--executor processes --devices cpu,cpu` (or `0,1,2,3`: GPU ids) is the
scheduler built in: one worker process per device (spawned with the same
command and `--shard I/N --device ...`, a GPU worker pinned by
CUDA_VISIBLE_DEVICES, CPU workers sharing the cores), shards pulled from a
queue, a shard whose worker dies run again (it resumes from its saved part),
then the merge. Bad input stops everything at the first worker's one-line error.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from .errors import ConfigError, RunError

EXECUTORS = ("local", "processes")
RETRIES = 2  # a shard whose worker dies is run again this many times before the driver gives up
# flags of the driver that a worker does not take (it gets its own --shard and --device)
_DRIVER_FLAGS = {"--executor": True, "--devices": True, "--shards": True, "--device": True, "--shard": True,
                 "--quiet": False}


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
                        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=fh)
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
