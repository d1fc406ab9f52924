"""One lifecycle for every probe: on a run directory or on a model in hand, checked, resumable, saved.

A probe is a `Probe`: a name, a config dataclass and `compute(model, data, cfg, ctx)
-> ProbeResult`. `run_probe` is the only code that knows how a probe meets a run
directory:

- the target is a run (a path, a RunDir or an open run from `memloc.open_run`):
  it opens the run (model at the config's epoch, data rebuilt and checked),
  runs the probe's `check` before anything is written, then, holding the run's
  lock, marks the stage running, hands the probe its partial progress of an
  interrupted call with the same settings (`Context.partial`), saves the result
  into RUN/probes/<name>/, clears the partial progress and marks the stage done;
  a failure marks it failed. A probe that `guards` its results refuses to
  replace one made with other settings unless `overwrite`.
- the target is a model: the model is checked against the data (`prepare`), and
  the probe computes with what the caller passed (`sources`, e.g. per-epoch
  states); nothing is written.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import DataError, RunError
from ..experiment import LoadedRun, open_run
from ..options import replaced
from ..options import settings as settings_of
from ..precision import arithmetic, choose, current_or_none
from ..runs import RunDir, load_npz, save_npz
from ..training import prepare
from .base import ProbeResult, register


@dataclass
class Partial:
    """A probe's resumable progress (RUN/probes/<name>/partial.npz), valid only for the settings it was made with.

    `arrays` are numpy arrays (e.g. one per finished layer); `state` is JSON (e.g. records).
    Without a run, nothing is kept.
    """

    run: RunDir | None = None
    probe: str = ""
    settings: dict = field(default_factory=dict)

    @property
    def path(self) -> Path | None:
        return None if self.run is None else self.run.path / "probes" / self.probe / "partial.npz"

    def _read(self) -> dict | None:
        if self.path is None or not self.path.exists():
            return None
        try:
            z = load_npz(self.path)
            return {"settings": json.loads(str(z.pop("__settings__"))), "state": json.loads(str(z.pop("__state__"))),
                    "arrays": z}
        except (RunError, KeyError, ValueError):  # a corrupt or foreign leftover is just recomputed
            return None

    def exists_with_other_settings(self) -> bool:
        got = self._read()
        return got is not None and got["settings"] != _jsonable(self.settings)

    def load(self) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, state) of an interrupted call with the same settings; ({}, {}) otherwise."""
        got = self._read()
        if got is None or got["settings"] != _jsonable(self.settings):
            return {}, {}
        return got["arrays"], got["state"]

    def save(self, arrays: dict[str, np.ndarray] | None = None, state: dict | None = None) -> None:
        """Atomically record the progress so far (the resume point)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_npz(self.path, __settings__=np.array(json.dumps(_jsonable(self.settings))),
                 __state__=np.array(json.dumps(state or {})), **(arrays or {}))

    def clear(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


@dataclass
class Context:
    """What a probe may use besides its model, data and config."""

    run: RunDir | None = None  # the run directory the probe works on (None: a model in hand)
    loaded: LoadedRun | None = None  # the open run: its config, data, and its model at any saved epoch
    sources: dict = field(default_factory=dict)  # what an API caller passed instead of a run (states, init_state, ...)
    progress: bool = False
    log: Callable[[str], None] = lambda s: None
    partial: Partial = field(default_factory=Partial)
    epoch: int | None = None  # the saved epoch of the model (on a run)
    overwrite: bool = False  # the caller's --overwrite, for a probe that runs another one


@dataclass
class Probe:
    """A probe as the engine, the CLI and the report see it. Registered by name on creation."""

    name: str  # its folder under RUN/probes/ and its stage in run.json
    command: str  # its `memloc` subcommand
    config: type  # its config dataclass (fields made with `options.option` become the command's flags)
    compute: Callable[..., ProbeResult]  # compute(model, data, cfg, ctx) -> ProbeResult
    help: str = ""  # one line for `memloc --help`
    check: Callable[..., None] | None = None  # check(model, data, cfg, ctx): bad input fails here, nothing written
    describe: Callable[[ProbeResult], list[str]] | None = None  # the console's lines for a finished result
    guards: bool = False  # results made with other settings are replaced only with `overwrite`
    overwrite_help: str | None = None  # the command's --overwrite flag, where it has one
    layers_option: str | None = None  # the config field naming layers, checked by `prepare` on a model

    def __post_init__(self) -> None:
        register(self)


def _arithmetic(model: Any, data: Any, precision: str):
    """The arithmetic of `precision` for `model` on its device (`precision.choose`)."""
    from ..tasks import task_of
    device = next(model.parameters()).device
    return choose(precision, device, model, task_of(data).example_input(2, device))


def is_run(target: Any) -> bool:
    return isinstance(target, (str, Path, RunDir, LoadedRun))


def run_probe(probe: Probe, target: Any, data: Any = None, cfg: Any = None, *, sources: dict | None = None,
              overwrite: bool = False, save: bool = True, progress: bool = False,
              log: Callable[[str], None] | None = None, **options: Any) -> ProbeResult:
    """Run `probe` on a run directory (saved into it when `save`) or on a model with its data (`sources`)."""
    cfg = replaced(probe.config, cfg, options)
    log = log or (lambda s: None)
    if not is_run(target):
        if data is None:
            raise DataError(f"the {probe.name} probe on a model needs its data: pass the Dataset the model was "
                            "trained on (memloc.wrap_data(...) or memloc.load_data(...))")
        layers = getattr(cfg, probe.layers_option) if probe.layers_option else None
        prepare(target, data, layers=layers)
        ctx = Context(sources={k: v for k, v in (sources or {}).items() if v is not None}, progress=progress, log=log,
                      overwrite=overwrite)
        if probe.check:
            probe.check(target, data, cfg, ctx)
        # the caller's arithmetic where one is in force, else "auto" for this model (its layout is left alone)
        with arithmetic(current_or_none() or _arithmetic(target, data, "auto")):
            return probe.compute(target, data, cfg, ctx)

    loaded = target if isinstance(target, LoadedRun) else open_run(
        target.path if isinstance(target, RunDir) else target, device=getattr(cfg, "device", "auto"))
    run = loaded.run
    saved = run.saved_epochs()
    if not saved:
        raise RunError(f"{run.path} has no checkpoints: train it with `memloc train` first")
    epoch = getattr(cfg, "epoch", None)
    epoch = saved[-1] if epoch is None else epoch
    model = loaded.model(epoch)
    arith = loaded.arithmetic(model)  # the arithmetic the run trained in (the model is in its layout already)
    ctx = Context(run=run, loaded=loaded, sources={k: v for k, v in (sources or {}).items() if v is not None},
                  progress=progress, log=log, epoch=epoch, overwrite=overwrite)
    if probe.check:
        probe.check(model, loaded.data, cfg, ctx)  # every bad input fails here, before anything is written
    if not save:
        with arithmetic(arith):
            return probe.compute(model, loaded.data, cfg, ctx)
    ctx.partial = Partial(run, probe.name, {**settings_of(cfg), "epoch": epoch})
    d = run.path / "probes" / probe.name
    with run.exclusive():
        other = ctx.partial.exists_with_other_settings()
        if probe.guards and not overwrite:
            if not other and not ctx.partial.path.exists() and (d / "summary.json").exists():
                other = ProbeResult.load(run, probe.name).summary.get("settings") != _jsonable(ctx.partial.settings)
            if other:
                raise RunError(f"{d} holds a {probe.name} probe with other settings: pass --overwrite to replace it")
        if other:
            ctx.partial.clear()
        if (d / "summary.json").exists():
            (d / "summary.json").unlink()  # replaced: never leave the old result looking finished
        t0 = time.perf_counter()
        with run.working(probe.name), arithmetic(arith):
            result = probe.compute(model, loaded.data, cfg, ctx)
            result.summary["settings"] = _jsonable(ctx.partial.settings)
            result.summary["run"] = str(run.path)
            result.save(run)
            if not probe.guards:  # a guarded probe keeps its progress: a rerun with the same settings is instant
                ctx.partial.clear()
            run.set_stage(probe.name, "done", seconds=round(time.perf_counter() - t0, 2))
    return result
