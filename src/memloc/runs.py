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
place, so a killed process never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import RunError

FORMAT_VERSION = 1
_CKPT = re.compile(r"^epoch_(\d{3,})\.safetensors$")
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary path beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a finished file gets the usual permissions
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
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
    raise TypeError(f"not JSON serialisable: {type(o)}")


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


def save_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p)))


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise RunError(f"checkpoint {path} is missing") from None
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise RunError(f"checkpoint {path} is corrupt or not a safetensors file ({err})") from None


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load `state` into `model` exactly; a checkpoint of another model fails with one clear line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    extra = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                  else f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, the model has {tuple(own[wrong[0]].shape)}")
        raise RunError(f"checkpoint {source} does not fit this model ({detail}): it comes from another model or width")
    model.load_state_dict(state, strict=False)


class RunDir:
    """A run directory on disk. Create with :meth:`create`, open an existing one with :meth:`open`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- creation and validation
    @classmethod
    def create(cls, path: str | Path, *, overwrite: bool = False, kind: str = "run") -> "RunDir":
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            if not overwrite:
                raise RunError(f"{path} already exists: choose another --out, pass --overwrite to replace it, or --resume it")
            if not (path / "run.json").exists() and not (path / "study.json").exists():
                raise RunError(f"{path} exists and is not a memloc run: refusing to delete it even with --overwrite")
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        from . import __version__
        write_json(run.path / "run.json", {"format_version": FORMAT_VERSION, "kind": kind, "memloc_version": __version__,
                                           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": {}})
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        path = Path(path)
        if not path.is_dir():
            raise RunError(f"{path} is not a directory: pass a run directory made by `memloc train`")
        meta = path / "run.json"
        if not meta.exists():
            raise RunError(f"{path} is not a memloc run (no run.json): pass a run directory made by `memloc train`")
        try:
            info = json.loads(meta.read_text())
        except json.JSONDecodeError:
            raise RunError(f"{meta} is corrupt: it is not valid JSON") from None
        version = info.get("format_version")
        if version != FORMAT_VERSION:
            raise RunError(f"{path} has run format version {version}, this memloc reads version {FORMAT_VERSION}: "
                           "use the memloc version that wrote it")
        return cls(path)

    # -- metadata
    def read_json(self, name: str) -> Any:
        p = self.path / name
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            raise RunError(f"{p} is missing: the run is incomplete") from None
        except json.JSONDecodeError:
            raise RunError(f"{p} is corrupt: it is not valid JSON") from None

    def write_json(self, name: str, obj: Any) -> None:
        write_json(self.path / name, obj)

    @property
    def info(self) -> dict:
        return self.read_json("run.json")

    def set_stage(self, stage: str, status: str, **details: Any) -> None:
        info = self.info
        info["stages"][stage] = {"status": status, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **details}
        self.write_json("run.json", info)

    def stage(self, stage: str) -> dict:
        return self.info["stages"].get(stage, {})

    @property
    def config(self) -> dict:
        return self.read_json("config.json")

    # -- metrics
    def read_metrics(self) -> list[dict]:
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def write_metrics(self, records: list[dict]) -> None:
        write_text(self.path / "metrics.jsonl", "".join(json.dumps(r, default=_jsonable) + "\n" for r in records))

    # -- arrays
    def save_arrays(self, name: str, **arrays: np.ndarray) -> None:
        save_npz(self.path / name, **arrays)

    def load_arrays(self, name: str) -> dict[str, np.ndarray]:
        return load_npz(self.path / name)

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
        d.mkdir(parents=True, exist_ok=True)
        return d


def _ranges(xs: list[int]) -> str:
    if len(xs) <= 6:
        return ", ".join(map(str, xs))
    return f"{xs[0]}, {xs[1]}, ..., {xs[-1]} ({len(xs)} in all)"


def default_out(dataset: str, model: str, noise: float, *, root: str | Path = "runs") -> Path:
    stem = Path(dataset).stem if ("/" in dataset or "." in dataset) else dataset
    return Path(root) / f"{stem}-{model}-{noise:g}-{time.strftime('%Y%m%d-%H%M%S')}"

