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

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..core.errors import ConfigError, DataError, RunError
from ..core.files import load_npz, save_npz, write_json
from ..core.options import replaced
from ..core.options import settings as settings_of
from ..core.precision import arithmetic, current_or_none
from ..core.runs import RunDir, exclusive, remove_memloc_files, shard_split
from ..core.training import prepare
from ..tasks.experiment import LoadedRun, arithmetic_for, open_run
from .base import ProbeResult, register


@dataclass
class Partial:
    """A probe's resumable progress (RUN/probes/<name>/partial.npz), valid only for the settings it was made with.

    `arrays` are numpy arrays (e.g. one per finished layer); `state` is JSON (e.g. records).
    Without a run, nothing is kept. With a `shard` (i, n) the call does the i-th of n
    shares of the work (`mine`) and keeps its progress in RUN/probes/<name>/shards/<i>-of-<n>/
    instead: `memloc merge` joins the shards' progress into the probe's own, which
    the probe then finishes with nothing left to compute (`merge_shards`).
    """

    run: RunDir | None = None
    probe: str = ""
    settings: dict = field(default_factory=dict)
    shard: tuple[int, int] | None = None

    @property
    def folder(self) -> Path | None:
        if self.run is None:
            return None
        d = self.run.path / "probes" / self.probe
        return d if self.shard is None else d / SHARDS / shard_name(*self.shard)

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / "partial.npz"

    @property
    def sharded(self) -> bool:
        return self.shard is not None

    def mine(self, items: Sequence) -> list:
        """The work items of this call, in their order: all of them, or with a shard (i, n) every n-th from the
        i-th (deterministic, and interleaved so that each shard gets a like share of every kind)."""
        items = list(items)
        return items if self.shard is None else items[self.shard[0]::self.shard[1]]

    def _read(self) -> dict | None:
        if self.path is None or not self.path.exists():
            return None
        try:
            z = load_npz(self.path)
            complete = json.loads(str(z.pop("__complete__", np.array("false"))))
            return {"settings": json.loads(str(z.pop("__settings__"))), "state": json.loads(str(z.pop("__state__"))),
                    "arrays": z, "complete": complete}
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

    def save(self, arrays: dict[str, np.ndarray] | None = None, state: dict | None = None, *,
             complete: bool = False) -> None:
        """Atomically record the progress so far (the resume point); `complete`: the call's work is all done."""
        if self.path is None:
            return
        done = {"__complete__": np.array(json.dumps(True))} if complete else {}  # only a finished shard says so
        save_npz(self.path, __settings__=np.array(json.dumps(_jsonable(self.settings))),
                 __state__=np.array(json.dumps(state or {})), **done, **(arrays or {}))

    def finish(self) -> None:
        """Mark the progress complete (a shard whose every item is done)."""
        arrays, state = self.load()
        self.save(arrays, state, complete=True)

    def clear(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()


SHARDS = "shards"  # RUN/probes/<name>/shards/<i>-of-<n>/: one shard's progress and config


def shard_name(i: int, n: int) -> str:
    return f"{i}-of-{n}"


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" -> (I, N) with 0 <= I < N (a SLURM array's task id runs 0..N-1 with --array=0-(N-1))."""
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ValueError(f"takes I/N, e.g. 0/4 (shard I of N, I from 0 to N-1), not {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"{text!r}: I must lie in 0..N-1 (N >= 1), e.g. 0/4 .. 3/4")
    return i, n


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
    # what was decided for the caller (a default count shrunk to the data): the caller's log, or None for a Python
    # warning where the caller gave no log (`options.fitted`)
    note: Callable[[str], None] | None = None
    partial: Partial = field(default_factory=Partial)
    epoch: int | None = None  # the saved epoch of the model (on a run)
    overwrite: bool = False  # the caller's --overwrite, for a probe that runs another one
    # what `check` computed that `compute` may reuse in the same call (same model, same data): e.g. localization's
    # extraction of every training row, a whole pass over the data at a language model's size
    scratch: dict = field(default_factory=dict)

    @property
    def shard(self) -> tuple[int, int] | None:
        """(i, n) when this call does only the i-th of n shares of the work (`Partial.mine`)."""
        return self.partial.shard


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
    # the probe splits its work by item (`--shard I/N`): its compute does only `ctx.partial.mine(items)` and keeps
    # them in `ctx.partial`, returning None in a shard; `merge_state` joins the shards' JSON states (None: the
    # progress is arrays only, one key per item, joined by key); `split_when`: those settings only (cfg -> bool),
    # named for the user by `split_when_text`
    shards: bool = False
    merge_state: Callable[[list[dict]], dict] | None = None
    split_when: Callable[[Any], bool] | None = None
    split_when_text: str = ""

    def __post_init__(self) -> None:
        register(self)


def is_run(target: Any) -> bool:
    return isinstance(target, (str, Path, RunDir, LoadedRun))


def run_probe(probe: Probe, target: Any, data: Any = None, cfg: Any = None, *, sources: dict | None = None,
              overwrite: bool = False, save: bool = True, progress: bool = False,
              log: Callable[[str], None] | None = None, shard: tuple[int, int] | None = None,
              check_only: bool = False, **options: Any) -> ProbeResult | None:
    """Run `probe` on a run directory (saved into it when `save`) or on a model with its data (`sources`).

    `shard` (i, n): do only the i-th of n shares of the probe's work on a run directory and keep it in
    RUN/probes/<name>/shards/ (returns None); `merge_shards` makes the result once every shard is done.
    `check_only`: open and check everything, compute nothing (returns None).
    """
    cfg = replaced(probe.config, cfg, options)
    note, log = log, log or (lambda s: None)
    if shard is not None and not probe.shards:
        raise ConfigError(f"the {probe.name} probe does not split its work into shards: drop --shard")
    if shard is not None and probe.split_when is not None and not probe.split_when(cfg):
        raise ConfigError(f"the {probe.name} probe splits into shards only {probe.split_when_text}: drop --shard "
                          "(and the executor), or change the setting")
    if shard is not None and not (is_run(target) and save):
        raise ConfigError("--shard works on a run directory, whose folder keeps each shard's part: pass the run")
    if not is_run(target):
        if data is None:
            raise DataError(f"the {probe.name} probe on a model needs its data: pass the Dataset the model was "
                            "trained on (memloc.wrap_data(...) or memloc.load_data(...))")
        layers = getattr(cfg, probe.layers_option) if probe.layers_option else None
        prepare(target, data, layers=layers)
        ctx = Context(sources={k: v for k, v in (sources or {}).items() if v is not None}, progress=progress, log=log,
                      note=note, overwrite=overwrite)
        if probe.check:
            probe.check(target, data, cfg, ctx)
        # the caller's arithmetic where one is in force, else "auto" for this model (its layout is left alone)
        with arithmetic(current_or_none() or arithmetic_for("auto", target, data)):
            return probe.compute(target, data, cfg, ctx)

    loaded = target if isinstance(target, LoadedRun) else open_run(
        target.path if isinstance(target, RunDir) else target, device=getattr(cfg, "device", "auto"))
    run = loaded.run
    saved = loaded.epochs()
    if not saved:
        raise RunError(f"{run.path} has no checkpoints: train it with `memloc train` first")
    epoch = getattr(cfg, "epoch", None)
    epoch = saved[-1] if epoch is None else epoch
    model = loaded.model(epoch)
    arith = loaded.arithmetic(model)  # the arithmetic the run trained in (the model is in its layout already)
    ctx = Context(run=run, loaded=loaded, sources={k: v for k, v in (sources or {}).items() if v is not None},
                  progress=progress, log=log, note=note, epoch=epoch, overwrite=overwrite)
    if probe.check:
        probe.check(model, loaded.data, cfg, ctx)  # every bad input fails here, before anything is written
    if check_only:
        return None
    if not save:
        with arithmetic(arith):
            return probe.compute(model, loaded.data, cfg, ctx)
    if shard is not None:
        _run_shard(probe, model, loaded, cfg, ctx, arith, shard, overwrite=overwrite)
        return None
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


def _run_shard(probe: Probe, model, loaded: LoadedRun, cfg: Any, ctx: Context, arith, shard: tuple[int, int], *,
               overwrite: bool) -> None:
    """One shard: its own lock and folder (shards run side by side: the run's lock is not taken), resumable like
    the whole probe, marked complete at the end; its config kept for `merge_shards`."""
    run = loaded.run
    ctx.partial = Partial(run, probe.name, {**settings_of(cfg), "epoch": ctx.epoch}, shard=shard)
    folder = ctx.partial.folder
    with exclusive(folder):
        if ctx.partial.exists_with_other_settings():
            if probe.guards and not overwrite:
                raise RunError(f"{folder} holds a shard made with other settings: pass --overwrite to replace it")
            ctx.partial.clear()
        write_json(folder / "config.json", {"probe": probe.name, "shard": list(shard),
                                            "config": _jsonable(dataclasses.asdict(cfg))})
        with arithmetic(arith):
            probe.compute(model, loaded.data, cfg, ctx)
        ctx.partial.finish()


def _shard_parts(run: RunDir, probe: Probe) -> tuple[list[dict], dict, int]:
    """Every shard of `probe` in `run`, checked: (their progress, the config they ran with, N)."""
    root = run.path / "probes" / probe.name / SHARDS
    found, n = shard_split(root, f"{run.path} has no shards of the {probe.name} probe: run `memloc {probe.command} "
                                 f"{run.path} --shard I/N` for I = 0..N-1 first")
    missing = [i for i in range(n) if i not in found]
    if missing:
        raise RunError(f"shard {missing[0]}/{n} of the {probe.name} probe is missing in {root}: run `memloc "
                       f"{probe.command} {run.path} --shard {missing[0]}/{n}` (with the other shards' flags) first")
    parts, config = [], None
    for i in range(n):
        p = Partial(run, probe.name, shard=(i, n))
        got = p._read()
        if got is None or not got["complete"]:
            raise RunError(f"shard {i}/{n} of the {probe.name} probe is not finished: run `memloc {probe.command} "
                           f"{run.path} --shard {i}/{n}` again with its flags (it resumes), then merge")
        try:
            cfg_i = json.loads((p.folder / "config.json").read_text())["config"]
        except (OSError, ValueError, KeyError):
            raise RunError(f"{p.folder / 'config.json'} is missing or damaged: run shard {i}/{n} again") from None
        if parts and got["settings"] != parts[0]["settings"]:
            raise RunError(f"shard {i}/{n} of the {probe.name} probe was run with other settings than shard 0/{n}: "
                           f"run it again with the same flags (--overwrite) and merge")
        config = config or cfg_i
        parts.append(got)
    return parts, config, n


def merge_shards(target: Any, probes: Sequence[str] | None = None, *, overwrite: bool = False,
                 progress: bool = False, log: Callable[[str], None] | None = None) -> list[ProbeResult]:
    """Join the shards of each probe of a run (`memloc merge RUN`) into the result one process would have written.

    Each probe's shards (`run_probe(..., shard=(i, n))` for i = 0..n-1) must all be finished, with the same
    settings; their progress becomes the probe's own, the probe runs with nothing left to compute, and the
    shards' folder is removed. Default: every probe with shards. A missing, unfinished or foreign shard is
    named in one line and nothing is written.
    """
    from .base import registered
    run = target.run if isinstance(target, LoadedRun) else (target if isinstance(target, RunDir)
                                                            else RunDir.open(target))
    names = list(probes) if probes else sorted(d.parent.name for d in (run.path / "probes").glob(f"*/{SHARDS}")
                                               if d.is_dir())
    if not names:
        raise RunError(f"{run.path} has no shards to merge: run a probe with --shard I/N first")
    known = registered()
    results = []
    for name in names:
        probe = known.get(name) or next((p for p in known.values() if p.command == name), None)
        if probe is None or not probe.shards:
            raise ConfigError(f"no probe {name!r} splits into shards: choose from "
                              f"{', '.join(p.name for p in known.values() if p.shards)}")
        parts, config, n = _shard_parts(run, probe)
        arrays: dict[str, np.ndarray] = {}
        for part in parts:
            twice = sorted(set(arrays) & set(part["arrays"]))
            if twice:
                raise RunError(f"two shards of the {probe.name} probe both hold {twice[0]!r}: they come from "
                               "different runs of the split; run the shards again with --overwrite")
            arrays.update(part["arrays"])
        states = [part["state"] for part in parts]
        state = probe.merge_state(states) if probe.merge_state else {}
        try:
            cfg = probe.config(**config)
        except (TypeError, ConfigError) as err:
            raise RunError(f"the shards' config.json does not fit this memloc's {probe.name} probe ({err})") from None
        settings = {k: v for k, v in parts[0]["settings"].items() if k != "epoch"}
        if {k: v for k, v in _jsonable(settings_of(cfg)).items() if k != "epoch"} != settings:
            raise RunError(f"the shards' config.json does not give the settings they ran with: run the {probe.name} "
                           "shards again with --overwrite")
        with run.exclusive():
            Partial(run, probe.name, parts[0]["settings"]).save(arrays, state)
        result = run_probe(probe, run, cfg=cfg, overwrite=overwrite, progress=progress, log=log)
        remove_memloc_files(run.path / "probes" / probe.name / SHARDS)
        (log or (lambda s: None))(f"{probe.name}: merged {n} shards")
        results.append(result)
    return results
