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
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .errors import RunError

FORMAT_VERSION = 1
_CKPT = re.compile(r"^epoch_(\d{3,})\.safetensors$")
_TMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what atomic_write's mkstemp names look like
_UMASK = os.umask(0)
os.umask(_UMASK)
LOCK_NAME = ".memloc.lock"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary path beside `path`, then rename it over `path` (a symbolic link there is
    replaced, never followed). Inside a memloc folder the write is recorded as memloc's and refused through a
    symbolic link (`prepare_write`)."""
    path = Path(path)
    place = prepare_write(path, record=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # after the write: mkstemp makes 0600, and some writers (safetensors) create the file anew
        os.chmod(tmp, 0o666 & ~_UMASK)
        if place is not None:  # recorded once written (a failed write leaves the manifest as it was)
            _record(*place)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and not err.filename and err.errno:  # writers to file objects name no path
            raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(path)) from None
        raise


@contextlib.contextmanager
def atomic_folder(path: Path):
    """Yield a new temporary folder beside `path`; on success it replaces `path` (a previous folder there is
    removed only after the new one is complete); on error it is removed and `path` is untouched."""
    path = Path(path)
    place = prepare_write(path, record=False)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if place is not None:  # inside a memloc folder, the folder's files are memloc's
            owner, rel = place
            for f in sorted(tmp.rglob("*")):
                if not f.is_dir():
                    _record(owner, f"{rel}/{f.relative_to(tmp).as_posix()}")
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")  # out of the way first: a crash now leaves the new folder in tmp
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(o):
    if isinstance(o, (np.integer, np.floating, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o)}")


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(path, write)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise RunError(f"{path} is missing: the run has not produced it yet") from None
    except (ValueError, OSError, EOFError) as err:
        raise RunError(f"{path} is corrupt ({err}): delete it and rerun the stage that writes it") from None


def save_state(path: Path, state: dict[str, torch.Tensor], *, metadata: dict[str, str] | None = None) -> None:
    """Tensors (any device) as a safetensors file, atomically."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    def write(p: Path) -> None:
        try:
            save_file(tensors, str(p), metadata=metadata)
        except Exception as err:  # safetensors reports a full disk as its own error type: make it an OSError
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
    atomic_write(path, write)


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise RunError(f"checkpoint {path} is missing") from None
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise RunError(f"checkpoint {path} is corrupt or not a safetensors file ({err})") from None


def state_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """How `state` fails to fit `model` in words (tensors missing, unexpected, or of another shape), None if it fits."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    extra = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing:
        return f"missing {missing[:3]}"
    if extra:
        return f"unexpected {extra[:3]}"
    if wrong:
        return f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, the model has {tuple(own[wrong[0]].shape)}"
    return None


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load `state` into `model` exactly; a checkpoint of another model fails with one clear line."""
    detail = state_mismatch(model, state)
    if detail:
        raise RunError(f"checkpoint {source} does not fit this model ({detail}): it comes from another model or width")
    model.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------- what is memloc's

# Every file memloc writes into a memloc folder (a run, a study, a grid, a shard's folder) is recorded, once written
# and before it is renamed into place, as one line of its path relative to the folder in the folder's manifest;
# `--overwrite` deletes exactly these files and nothing else, so files of the user's inside memloc's own folders
# stay, whatever their names.
MANIFEST = ".memloc.files"
MARKERS = ("run.json", "study.json", "grid.json", "shard.json")  # the records of the memloc folders' kinds
_MANIFEST_MAX = 64 << 20  # bytes of a manifest memloc reads (a tampered one may be huge)
_recorded: dict[str, tuple[int, int, set[str]]] = {}  # manifest's real path -> (inode, size, its lines)


def _owner(path: Path) -> Path | None:
    """The memloc folder a write to `path` lands in: the nearest folder above it whose lock this process holds, or
    that holds a manifest or a memloc record; None outside memloc's folders (an export's --out, say)."""
    for d in Path(os.path.abspath(path)).parents:
        with _held_guard:
            held = bool(_held) and os.path.realpath(d) in _held
        if held or any(os.path.lexists(d / m) for m in (MANIFEST, *MARKERS)):
            return d
    return None


def prepare_write(path: str | Path, *, record: bool = True) -> tuple[Path, str] | None:
    """Before memloc writes `path`: make its folders and, inside a memloc folder, record it as memloc's (`record`;
    `atomic_write` records only once the file is written). Returns (the memloc folder, `path` relative to it), or
    None outside memloc's folders.

    Inside a memloc folder no write passes through a symbolic link: every folder between the memloc folder and
    `path` must be a real folder (the memloc folder itself may be a link, as `--out` may be), else RunError in one
    line, before anything is written.
    """
    path = Path(path)
    owner = _owner(path)
    if owner is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        return None
    rel = Path(os.path.abspath(path)).relative_to(owner)
    d = owner
    for part in rel.parts[:-1]:
        d = d / part
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(d, 0o777 & ~_UMASK)
            st = os.lstat(d)
        if stat.S_ISLNK(st.st_mode):
            raise RunError(f"{d} is a symbolic link: memloc never writes through a link inside its folder "
                           f"{owner}: replace the link with a real folder (or move the run)")
        if not stat.S_ISDIR(st.st_mode):
            raise RunError(f"{d} is a file where memloc keeps a folder: move it out of {owner}")
    if record:
        _record(owner, rel.as_posix())
    return owner, rel.as_posix()


def _manifest_lines(folder: Path) -> list[str]:
    """The paths recorded in `folder`'s manifest (a truncated last line, from a kill mid-append, left out)."""
    try:
        fd = os.open(folder / MANIFEST, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return []
    try:
        raw = os.read(fd, _MANIFEST_MAX)
    finally:
        os.close(fd)
    lines = raw.decode("utf-8", errors="replace").split("\n")
    return [l for l in lines[:-1] if l]  # after the last newline: nothing, or a torn line


def _record(owner: Path, rel: str) -> None:
    if "\n" in rel or not rel:
        raise RunError(f"{owner / rel!r}: memloc does not write file names with a line break")
    manifest = owner / MANIFEST
    key = os.path.realpath(manifest)
    try:
        st = os.lstat(manifest)
        now = (st.st_ino, st.st_size)
    except FileNotFoundError:
        now = None
    cached = _recorded.get(key)
    if cached is None or now is None or cached[:2] != now:
        cached = (*now, set(_manifest_lines(owner))) if now else (0, 0, set())
    if rel in cached[2]:
        _recorded[key] = cached
        return
    try:
        fd = os.open(manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666 & ~_UMASK)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise RunError(f"{manifest} is a symbolic link: memloc never writes through one: delete it") from None
        raise
    try:
        os.write(fd, (rel + "\n").encode())
        st = os.fstat(fd)
    finally:
        os.close(fd)
    _recorded[key] = (st.st_ino, st.st_size, cached[2] | {rel})


def memloc_kind(path: str | Path) -> str | None:
    """"run", "study", "dropout-grid" or "shard" (a shard's record of a study or grid) when `path` is a directory
    memloc made (its marker file parses as memloc's own, with a format version), else None. A file merely named
    run.json is not proof."""
    path = Path(path)
    for name in ("run.json", "study.json", "grid.json", "shard.json"):
        try:
            info = json.loads((path / name).read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if not isinstance(info, dict):
            continue
        if name == "grid.json":
            if info.get("kind") == "dropout-grid" and isinstance(info.get("base"), dict):
                return "dropout-grid"
        elif isinstance(info.get("format_version"), int) and isinstance(info.get("stages"), dict) \
                and "memloc_version" in info and info.get("kind") in ("run", "study", "shard"):
            return info["kind"]
    return None


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


def _inside(folder: Path, rel: str) -> Path | None:
    """`folder / rel` when `rel` is a plain relative path whose every folder is a real one (no link, no ..), and
    what is there is a file or a link; else None."""
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or parts[-1] in (MANIFEST, LOCK_NAME):
        return None
    d = folder
    for part in parts[:-1]:
        d = d / part
        try:
            if not stat.S_ISDIR(os.lstat(d).st_mode):
                return None
        except OSError:
            return None
    f = d / parts[-1]
    try:
        return None if stat.S_ISDIR(os.lstat(f).st_mode) else f
    except OSError:
        return None


def is_empty(folder: Path) -> bool:
    """Whether `folder` holds nothing but memloc's lock, manifest and a killed writer's temporary files."""
    try:
        return all(p.name in (LOCK_NAME, MANIFEST) or _TMP.match(p.name) for p in Path(folder).iterdir())
    except FileNotFoundError:
        return True


def _rmdir_if_empty(d: Path) -> None:
    with contextlib.suppress(OSError):  # not empty: the user's files are in it
        d.rmdir()


def _remove_stale_tmp(path: Path, *, recursive: bool) -> None:
    """Remove the temporary files a killed writer left in `path` (and below, but not in other memloc dirs)."""
    try:
        entries = list(path.iterdir())
    except OSError:
        return
    for p in entries:
        if p.is_symlink():
            continue
        if p.is_file() and _TMP.match(p.name):
            with contextlib.suppress(OSError):
                p.unlink()
        elif recursive and p.is_dir() and memloc_kind(p) is None:
            _remove_stale_tmp(p, recursive=True)


# ----------------------------------------------------------------------------- the lock

_held: dict[str, list] = {}  # real path -> [fd, depth]: re-entrant within one process
_held_guard = threading.Lock()


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

