"""Files as memloc writes them: atomically (a temporary file in the same folder, renamed into place), arrays as
npz, weights as safetensors (never pickles), and the manifest of what memloc wrote into its own folders, which
is all that `--overwrite` may delete.

A killed process never leaves a half-written file behind; the temporary files of a killed process are removed by
the next command that takes the folder's lock (`memloc.core.runs.exclusive`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import RunError

_TMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what atomic_write's mkstemp names look like
_UMASK = os.umask(0)
os.umask(_UMASK)
LOCK_NAME = ".memloc.lock"
_held: dict[str, list] = {}  # real path -> [fd, depth] of the folders whose lock this process holds (runs.exclusive)
_held_guard = threading.Lock()

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
