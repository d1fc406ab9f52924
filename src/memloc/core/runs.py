"""The run directory: the one on-disk format every command writes into and reads from.

    RUN/
      run.json          format_version, memloc version, created, status of each stage
      config.json       the resolved config, written before any compute
      env.json          versions, device
      metrics.jsonl     one line per epoch
      data.npz          is_noisy, is_rare, given and true labels, split indices
      checkpoints/epoch_000.safetensors ...   model state (BatchNorm buffers included)
      checkpoints/optimizer.safetensors       momentum of the newest checkpoint (for --resume)
      examples.npz      per-example records (epochs x N)
      gradients.npz     layers x epochs: clean norm, noisy norm, cosine
      probes/<probe>/   rewinding, retraining, flipping, dropout, detection
      report/           report.html, figures/*.png, tables/*.csv

Every write goes to a temporary file in the same folder and is renamed into
place, so a killed process never leaves a half-written file behind; the
temporary files of a killed process are removed by the next command that
takes the directory's lock. A command that writes into a run holds its lock
(`exclusive`) for its whole life: a second writer gets one line and exit 2,
readers are never blocked. `--overwrite` deletes only the files memloc itself
writes, and only in a directory that proves to be memloc's (`memloc_kind`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .errors import RunError
from .files import (
    _UMASK,
    LOCK_NAME,
    MANIFEST,
    _held,
    _held_guard,
    _inside,
    _jsonable,
    _manifest_lines,
    _recorded,
    _remove_stale_tmp,
    _rmdir_if_empty,
    is_empty,
    load_npz,
    load_state,
    memloc_kind,
    prepare_write,
    save_npz,
    save_state,
    write_json,
    write_text,
)

FORMAT_VERSION = 1
_CKPT = re.compile(r"^epoch_(\d{3,})\.safetensors$")


# ----------------------------------------------------------------------------- the lock



def _holder_text(fd: int | None, lock: Path) -> str:
    try:
        if fd is not None:
            os.lseek(fd, 0, os.SEEK_SET)
            raw = os.read(fd, 4096)
        else:
            raw = lock.read_bytes()
        h = json.loads(raw.decode() or "{}")
    except (OSError, ValueError, UnicodeDecodeError):
        return "another memloc command"
    return (f"another memloc command (pid {h.get('pid')} on {h.get('host')}, `{h.get('command')}`, "
            f"since {h.get('since')})")


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def _acquire(path: Path) -> int:
    """Take the exclusive lock of directory `path`; return the lock file's descriptor."""
    lock = path / LOCK_NAME
    holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "command": " ".join(["memloc", *sys.argv[1:]]) if sys.argv else "memloc",
                         "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    busy = f"{path} is in use by {{}}: wait for it to finish or stop it, or use another folder"
    for _ in range(100):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666 & ~_UMASK)
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            raise RunError(f"{lock} is a symbolic link: memloc never writes through one: delete the link") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = _holder_text(fd, lock)
            os.close(fd)
            raise RunError(busy.format(text)) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return _acquire_by_pid(path, holder, busy)
        # the holder before us may have removed the file between our open and our flock: the lock
        # counts only if the file we hold is still the one at the path
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, holder.encode())
            return fd
        os.close(fd)
    raise RunError(busy.format("other memloc commands"))


def _acquire_by_pid(path: Path, holder: str, busy: str) -> int:
    """Where the file system has no flock: an O_EXCL lock file; one whose process is gone is stale."""
    lock = path / LOCK_NAME
    for _ in range(100):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666 & ~_UMASK)
        except FileExistsError:
            try:
                info = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                info = {}
            if info.get("host") == socket.gethostname() and not _pid_alive(info.get("pid")):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()  # stale: its process no longer exists
                continue
            raise RunError(busy.format(_holder_text(None, lock))) from None
        os.write(fd, holder.encode())
        return fd
    raise RunError(busy.format("other memloc commands"))


@contextlib.contextmanager
def exclusive(path: str | Path, *, wait: float = 0.0) -> Iterator[Path]:
    """Hold the exclusive lock of the directory `path` (made if missing) while inside.

    One writer per directory: a second process gets a RunError naming the holder (after trying for
    `wait` seconds: shards that only check or write a folder's shared record take turns). The lock is
    re-entrant within a process, released when the process dies (flock; the lock file of a
    killed process is taken over), and on first taking it the temporary files of a killed
    writer are removed.
    """
    path = Path(path)
    made = not path.exists()
    prepare_write(path / LOCK_NAME, record=False)  # its folders, never through a link inside a memloc folder
    key = os.path.realpath(path)
    with _held_guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is None:
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    fd = _acquire(path)
                    break
                except RunError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.05)
        except BaseException:
            if made:
                _rmdir_if_empty(path)
            raise
        with _held_guard:
            _held[key] = entry = [fd, 1]
        _remove_stale_tmp(path, recursive=True)
    try:
        yield path
    finally:
        with _held_guard:
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                del _held[key]
        if last:
            with contextlib.suppress(OSError):
                os.unlink(path / LOCK_NAME)  # while still holding it: see the inode check in _acquire
            os.close(entry[0])
            if made and is_empty(path):  # a command that failed before writing leaves no folder behind
                with contextlib.suppress(OSError):
                    os.unlink(path / MANIFEST)
                _recorded.pop(os.path.realpath(path / MANIFEST), None)
                _rmdir_if_empty(path)


def holds_lock(path: str | Path) -> bool:
    """Whether this process holds the lock of `path`."""
    with _held_guard:
        return os.path.realpath(path) in _held


# each kind's record: format version, stages, (study) config; a shard of a study or grid (`--shard I/N`) keeps its
# own stages in RUN/shards/I-of-N/shard.json until `memloc merge`
def clear_memloc_files(path: str | Path) -> list[Path]:
    """Delete what memloc wrote into the memloc directory `path` (its manifests say what), nothing else; return
    the files kept (the user's own).

    The user's files stay, whatever their names and wherever they are, and so do the folders that hold them.
    Symbolic links are removed as links, never followed. The caller holds the directory's lock; each memloc
    folder inside is locked in turn, so a run another command is writing is never touched. A run made before
    memloc kept manifests cannot tell its files from the user's: it is refused.
    """
    path = Path(path)
    if memloc_kind(path) is None:
        raise RunError(f"{path} is not a memloc run: refusing to delete anything in it")
    if not os.path.lexists(path / MANIFEST):
        raise RunError(f"{path} was made by an older memloc that did not record which files are its own: "
                       "refusing to guess: delete the folder yourself, or choose another --out")
    remove_memloc_files(path)
    kept = []
    for root, dirs, files in os.walk(path):  # os.walk never enters a symbolic link
        kept += [Path(root) / f for f in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]
                 if f != LOCK_NAME]
    return sorted(kept)


def remove_memloc_files(folder: str | Path) -> None:
    """Delete every file memloc recorded in the manifests in and below `folder` (never through a symbolic link),
    the manifests themselves, a killed writer's temporary files, and the folders this leaves empty that memloc
    made; a file of the user's keeps its folder. Memloc folders below (a study's runs, shards) are locked in turn."""
    folder = Path(folder)
    for root, dirs, files in os.walk(folder, topdown=False):  # deepest first; links to folders are not entered
        d = Path(root)
        if MANIFEST not in files:
            continue
        own = d != folder  # a folder with a manifest is one a writer held the lock of (a study's run, a shard)
        with exclusive(d) if own else contextlib.nullcontext():
            emptied = {d}
            for rel in _manifest_lines(d):
                f = _inside(d, rel)
                if f is not None:
                    with contextlib.suppress(FileNotFoundError):
                        f.unlink()
                    emptied.update(p for p in f.parents if p != d and d in p.parents)
            _remove_stale_tmp(d, recursive=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d / MANIFEST)
            _recorded.pop(os.path.realpath(d / MANIFEST), None)
            for e in sorted(emptied, key=lambda p: len(p.parts), reverse=True):
                if e != folder and not (e == d and own):
                    _rmdir_if_empty(e)
        if own:
            _rmdir_if_empty(d)  # after its lock is gone
    _remove_stale_tmp(folder, recursive=True)
    _rmdir_if_empty(folder)  # not while its lock file is there (`clear_memloc_files`' caller holds it)


META = {"run": "run.json", "study": "study.json", "shard": "shard.json"}


class RunDir:
    """A run or study directory on disk: one record of stages, one lock, one layout.

    A run (`memloc train`) keeps its record in run.json; a study (`memloc run`) in study.json, with its
    config and one run directory per trained model (`study_cells`). Create with :meth:`create`, open
    an existing one with :meth:`open`.
    """

    def __init__(self, path: str | Path, kind: str = "run"):
        self.path = Path(path)
        self.kind = kind

    @property
    def meta(self) -> str:
        """The name of the directory's record: run.json or study.json."""
        return META[self.kind]

    # -- creation and validation
    @classmethod
    def create(cls, path: str | Path, *, overwrite: bool = False, kind: str = "run",
               log: Callable[[str], None] | None = None, **record: Any) -> "RunDir":
        """A new run (or study) directory at `path`; `record` joins its run.json / study.json (a study's config).

        An existing non-empty one is refused, or with `overwrite` cleared of memloc's own files when it
        proves to be memloc's (anything else is refused); `log` hears which files of the user's were kept."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunError(f"{path} exists and is not a directory: choose another --out")
        with exclusive(path):
            if not is_empty(path):
                if not overwrite:
                    resume = "`memloc run --resume`" if kind == "study" else "--resume"
                    raise RunError(f"{path} already exists: choose another --out, "
                                   + (f"continue it with {resume} {path}, or start it again with --overwrite"
                                      if kind == "study" else "pass --overwrite to replace it, or --resume it"))
                if memloc_kind(path) is None:
                    raise RunError(f"{path} exists and is not a memloc run: "
                                   "refusing to delete it even with --overwrite")
                kept = clear_memloc_files(path)
                if kept and log is not None:
                    names = ", ".join(str(f.relative_to(path)) for f in kept[:5])
                    log(f"{path}: replaced memloc's files, kept {len(kept)} of yours ({names}"
                        + (f", and {len(kept) - 5} more)" if len(kept) > 5 else ")"))
            run = cls(path, kind)
            from .._version import __version__
            write_json(run.path / run.meta, {"format_version": FORMAT_VERSION, "kind": kind,
                                             "memloc_version": __version__,
                                             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record, "stages": {}})
        return run

    @classmethod
    def open(cls, path: str | Path, *, kind: str | None = None) -> "RunDir":
        """The run or study at `path` (`kind` to insist on one)."""
        path = Path(path)
        what = {"study": "a study made by `memloc run`"}.get(kind or "", "a run directory made by `memloc train`")
        if not path.is_dir():
            raise RunError(f"{path} is not a directory: pass {what}")
        found = "study" if (path / "study.json").exists() else "run" if (path / "run.json").exists() else None
        if found is None or (kind is not None and found != kind):
            noun = "study" if kind == "study" else "run"
            raise RunError(f"{path} is not a memloc {noun} (no {META[kind or 'run']}): pass {what}")
        run = cls(path, found)
        info = run.info
        version = info.get("format_version")
        if version != FORMAT_VERSION or info.get("kind", "run") != found:
            raise RunError(f"{path} has {found} format version {version}, this memloc reads version {FORMAT_VERSION}: "
                           "use the memloc version that wrote it")
        return run

    def exclusive(self):
        """Hold this run's lock while inside (see :func:`exclusive`)."""
        return exclusive(self.path)

    # -- metadata
    def read_json(self, name: str, *, kind: type = dict) -> Any:
        """The JSON file `name` of the run, which must hold a `kind` (an object by default)."""
        p = self.path / name
        try:
            obj = json.loads(p.read_text())
        except FileNotFoundError:
            raise RunError(f"{p} is missing: the run is incomplete") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunError(f"{p} is corrupt: it is not valid JSON") from None
        if not isinstance(obj, kind):
            raise RunError(f"{p} is damaged: it holds a {type(obj).__name__}, not a JSON "
                           f"{'object' if kind is dict else kind.__name__}")
        return obj

    def write_json(self, name: str, obj: Any) -> None:
        write_json(self.path / name, obj)

    @property
    def info(self) -> dict:
        info = self.read_json(self.meta)
        if not isinstance(info.get("stages"), dict):
            raise RunError(f"{self.path / self.meta} is damaged: it has no 'stages' record")
        if self.kind == "study" and not isinstance(info.get("config"), dict):
            raise RunError(f"{self.path / self.meta} is damaged: it has no study config")
        return info

    def update_info(self, **values: Any) -> None:
        """Set top-level values of the record (e.g. a study's `finished`)."""
        with self.exclusive():
            info = self.info
            info.update(values)
            self.write_json(self.meta, info)

    def set_stage(self, stage: str, status: str, *, keep: bool = False, **details: Any) -> None:
        """Record the status of `stage` with `details`; `keep` keeps the details recorded before
        (a failed training keeps its last checkpoint), except an old failure's reason."""
        with self.exclusive():
            info = self.info
            old = info["stages"].get(stage) if keep else None
            old = {k: v for k, v in old.items() if k != "reason"} if isinstance(old, dict) else {}
            info["stages"][stage] = {**old, "status": status, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                     **details}
            self.write_json(self.meta, info)

    def stage(self, stage: str) -> dict:
        st = self.info["stages"].get(stage, {})
        return st if isinstance(st, dict) else {}

    @contextlib.contextmanager
    def working(self, stage: str, **details: Any) -> Iterator["RunDir"]:
        """Hold the run's lock and mark `stage` running while inside; the body marks it done.

        A body that raises leaves the stage "failed" with the one-line reason (or "interrupted"),
        never "running"; a kill leaves "running" with no lock held, which resume treats as unfinished.
        """
        with self.exclusive():
            self.set_stage(stage, "running", keep=True, **details)
            try:
                yield self
            except BaseException as err:
                mark_failed(self.set_stage, stage, err)
                raise

    @property
    def config(self) -> dict:
        """The resolved config: a run's config.json, a study's config in study.json."""
        return self.info["config"] if self.kind == "study" else self.read_json("config.json")

    # -- metrics
    def read_metrics(self) -> list[dict]:
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return []
        out = []
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if not isinstance(rec, dict) or not isinstance(rec.get("epoch"), int):
                raise RunError(f"{p} is damaged at line {i}: rerun training into a new --out (or --overwrite)")
            out.append(rec)
        return out

    def write_metrics(self, records: list[dict]) -> None:
        write_text(self.path / "metrics.jsonl", "".join(json.dumps(r, default=_jsonable) + "\n" for r in records))

    # -- arrays
    def save_arrays(self, name: str, **arrays: np.ndarray) -> None:
        save_npz(self.path / name, **arrays)

    def load_arrays(self, name: str, *required: str) -> dict[str, np.ndarray]:
        """The arrays of `name`; each of `required` must be among them."""
        arrays = load_npz(self.path / name)
        missing = [k for k in required if k not in arrays]
        if missing:
            raise RunError(f"{self.path / name} is damaged: it has no {missing[0]!r} array; "
                           "delete it and rerun the stage that writes it")
        return arrays

    def has(self, name: str) -> bool:
        return (self.path / name).exists()

    # -- checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint_path(self, epoch: int) -> Path:
        return self.checkpoint_dir / f"epoch_{epoch:03d}.safetensors"

    def saved_epochs(self) -> list[int]:
        if not self.checkpoint_dir.exists():
            return []
        return sorted(int(m.group(1)) for f in self.checkpoint_dir.iterdir() if (m := _CKPT.match(f.name)))

    def save_checkpoint(self, epoch: int, model: torch.nn.Module) -> None:
        save_state(self.checkpoint_path(epoch), model.state_dict())

    def load_checkpoint(self, epoch: int) -> dict[str, torch.Tensor]:
        if epoch not in self.saved_epochs():
            saved = self.saved_epochs()
            have = f"saved epochs are {_ranges(saved)}" if saved else "the run has no checkpoints"
            raise RunError(f"epoch {epoch} was not saved in {self.path}: {have}")
        return load_state(self.checkpoint_path(epoch))

    def probe_dir(self, probe: str) -> Path:
        d = self.path / "probes" / probe
        prepare_write(d / "summary.json", record=False)  # its folders, never through a link
        return d


def mark_failed(set_status: Callable[..., None], stage: str, err: BaseException) -> None:
    """Record why `stage` stopped (best effort: a full disk may refuse this write too)."""
    from .errors import MemlocError
    if isinstance(err, KeyboardInterrupt):
        status, reason = "interrupted", "interrupted by the user"
    else:
        status = "failed"
        reason = str(err) if isinstance(err, (MemlocError, OSError)) else f"{type(err).__name__}: {err}"
    with contextlib.suppress(Exception):
        set_status(stage, status, keep=True, reason=reason.splitlines()[0] if reason else type(err).__name__)


# ----------------------------------------------------------------------------- the study layout

# The stages of one cell of a study (a seed and a noise level), in order; a study's own stages are these per
# cell (prefixed "s<seed>-n<noise>/" when there are several cells), then "grid" (with --grid) and "report".
STUDY_STAGES = ("train", "rewinding", "retraining", "flipping", "dropout_train", "dropout_eval", "depth", "detection")


def shard_split(base: Path, none: str) -> tuple[dict[int, Path], int]:
    """The shard folders `I-of-N` under `base` of its one split: ({I: folder}, N). No shard at all raises `none`
    as the error; shards of two splits side by side are named in one line."""
    found = {}
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        try:
            i, n = (int(v) for v in d.name.split("-of-"))
        except ValueError:
            continue
        found[(i, n)] = d
    if not found:
        raise RunError(none)
    splits = sorted({n for _, n in found})
    if len(splits) > 1:
        raise RunError(f"{base} holds shards of {len(splits)} different splits (N = {', '.join(map(str, splits))}): "
                       "keep one split (delete the other shards' folders) and merge again")
    return {i: d for (i, _), d in found.items()}, splits[0]


def study_cells(study: RunDir) -> list[tuple[int, float, str, Path, Path]]:
    """(seed, noise, stage prefix, base run dir, dropout run dir) of every cell of a study, in order."""
    cfg = study.config
    try:
        cells = [(int(s), float(n)) for s in cfg["seeds"] for n in cfg["noise_levels"]]
        if not cells:
            raise ValueError("no seeds or no noise levels")
    except (KeyError, TypeError, ValueError) as err:
        raise RunError(f"{study.path / study.meta} is damaged: its seeds and noise levels are unreadable "
                       f"({err})") from None
    out = []
    for seed, noise in cells:
        tag = f"s{seed}-n{noise:g}"
        if len(cells) == 1:
            out.append((seed, noise, "", study.path / "base", study.path / "dropout"))
        else:
            out.append((seed, noise, f"{tag}/", study.path / f"base-{tag}", study.path / f"dropout-{tag}"))
    return out


def study_stages(study: RunDir) -> list[str]:
    """The stage keys a study runs, in order (its report, which it always rebuilds, left out)."""
    cfg = study.config
    stages = [s for s in STUDY_STAGES if s != "detection" or cfg.get("detection", True)]
    keys = [prefix + st for _, _, prefix, _, _ in study_cells(study) for st in stages]
    return keys + (["grid"] if cfg.get("grid") else [])


def _ranges(xs: list[int]) -> str:
    if len(xs) <= 6:
        return ", ".join(map(str, xs))
    return f"{xs[0]}, {xs[1]}, ..., {xs[-1]} ({len(xs)} in all)"


def default_out(dataset: str, model: str, noise: float | None, *, root: str | Path = "runs") -> Path:
    """runs/<data>-<model>-<noise>-<time> (a language model: runs/<corpus>-<model>-lm-<time>)."""
    stem = Path(dataset).stem if ("/" in dataset or "." in dataset) else dataset
    tag = "lm" if noise is None else f"{noise:g}"
    return Path(root) / f"{stem}-{model}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}"

