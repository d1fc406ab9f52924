"""What every probe shares: one result type, and scoped, reversible interventions on a model.

A probe writes into `RUN/probes/<name>/`: `summary.json` (settings and headline
numbers), `arrays.npz` (the full result), and a tidy `<name>.csv`. Interventions
(putting other weights into a layer here; zeroing units in `memloc.core.units`) happen
inside context managers that restore the model in `finally`, even when the body raises.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..core.errors import RunError
from ..core.files import load_npz, save_npz, write_json, write_text
from ..core.runs import RunDir


@dataclass
class ProbeResult:
    """One probe's output: a JSON-able summary, named arrays, rows for a tidy CSV, and other text files."""

    probe: str
    summary: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # name -> text, e.g. detection's suspects.csv

    def save(self, run: RunDir) -> Path:
        with run.exclusive():  # one writer per run
            d = run.probe_dir(self.probe)
            save_npz(d / "arrays.npz", **self.arrays)
            if self.rows:
                buf = io.StringIO()
                writer = csv.DictWriter(buf, fieldnames=list(self.rows[0]))
                writer.writeheader()
                writer.writerows(self.rows)
                write_text(d / f"{self.probe}.csv", buf.getvalue())
            for name, text in self.files.items():
                write_text(d / name, text)
            write_json(d / "summary.json", self.summary)  # last: its presence means the probe finished
        return d

    @classmethod
    def load(cls, run: RunDir, probe: str) -> "ProbeResult":
        d = run.path / "probes" / probe
        if not (d / "summary.json").exists():
            raise RunError(f"{run.path} has no finished {probe} probe: "
                           f"run `memloc {probe_command(probe)} {run.path}` first")
        try:
            summary = json.loads((d / "summary.json").read_text())
        except (ValueError, UnicodeDecodeError):
            summary = None
        if not isinstance(summary, dict):
            raise RunError(f"{d / 'summary.json'} is damaged: rerun `memloc {probe_command(probe)} {run.path}`")
        arrays = _Arrays(load_npz(d / "arrays.npz"))
        arrays.source = (f"{d / 'arrays.npz'} is damaged: it has no {{!r}} array; "
                         f"rerun `memloc {probe_command(probe)} {run.path}`")
        rows = []
        if (d / f"{probe}.csv").exists():
            rows = list(csv.DictReader(io.StringIO((d / f"{probe}.csv").read_text())))
        return cls(probe, summary, arrays, rows)


class _Arrays(dict):
    """A probe's arrays: a missing one (a damaged or foreign file) is a RunError naming the file."""

    source = "a probe's arrays.npz is damaged: it has no {!r} array"

    def __missing__(self, key):
        raise RunError(self.source.format(key))


_REGISTRY: dict[str, object] = {}  # probe name -> its Probe (memloc.probes.engine), filled as the probes import


def register(probe) -> None:
    """Called by every `Probe` on creation: the CLI, the report and messages find probes here."""
    _REGISTRY[probe.name] = probe


def registered() -> dict[str, object]:
    """Every registered probe by name, in registration order."""
    return dict(_REGISTRY)


def probe_command(probe: str) -> str:
    """The command that makes a probe's result, for messages."""
    spec = _REGISTRY.get(probe)
    return getattr(spec, "command", probe)


@contextlib.contextmanager
def swapped_state(model: nn.Module, state: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Put the tensors of `state` (parameter and buffer names) into the model while inside; restore after."""
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise RunError(f"the model has no tensor named {unknown[0]!r}: the state comes from another model")
    saved = {k: own[k].detach().clone() for k in state}
    try:
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v.to(own[k].device, own[k].dtype))
        yield model
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                own[k].copy_(v)
