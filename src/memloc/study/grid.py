"""The paper's robustness grid: example-tied dropout over (p_gen, p_mem) pairs, with matched baselines.

For every pair one model is trained with example-tied dropout and evaluated
before ("tied") and after ("drop") removing its memorization units. For every
distinct expected fraction of active units ``a = p_gen + (1 - p_gen) * p_mem``
two baselines are trained the same way: standard dropout keeping each unit with
probability ``a`` at training (identity at test), and a fixed sparse network
keeping a seeded fraction ``a`` of the units at training and test. Baselines
have nothing to drop, so their "before" and "after" are both their eval-mode
accuracies.

With `elr` (lambda, beta) two more cells give the comparison of preventing
memorization with localizing it (issue 17): "plain" (no per-block layer, plain
cross-entropy) and "elr-LAMBDA-BETA" (the plain model trained with early-learning
regularization, docs/elr.md), on the same data, noise and training settings.
Like the baselines they have nothing to drop; read them beside an example-tied
cell's "after" columns: clean_after, noisy_after (given label),
noisy_true_after, test_drop.

Layout: ``DIR/grid.json`` (the base config and the cells), one run directory per
cell (``DIR/etd-0.4-0.1/``, ``DIR/dropout-0.46/``, ``DIR/sparse-0.46/``) and
``DIR/grid.csv`` (one row per cell, rewritten after every cell). Re-running the
same command resumes: finished cells are read back, a killed one is resumed
from its newest checkpoint.

Choosing p_gen (measured on mnist5k, 10% noise; README): the generalization
units must be able to fit the clean data on their own, so the smaller or less
residual the network, the larger p_gen must be. ResNet-9 at full width works at
p_gen 0.3; at width 0.25 it needs 0.4 (0.2 collapses clean accuracy after the
drop); a plain 3-layer CNN loses far more clean accuracy at any p_gen. Too
large a p_gen (or p_mem) lets the generalization units memorize too, and the
noisy examples survive the drop. Run the grid on a subset to choose.
"""

from __future__ import annotations

import copy
import csv
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..core.dropout import expected_active_fraction
from ..core.errors import ConfigError, RunError
from ..core.files import _jsonable, is_empty, write_json, write_text
from ..core.runs import RunDir, exclusive, remove_memloc_files
from ..core.training import elr_setting
from ..tasks.experiment import ModelConfig, RunConfig, make_model, open_run, resume_training, run_training

__all__ = ["DEFAULT_PAIRS", "GRID_COLUMNS", "GridCell", "grid_cells", "check_grid", "dropout_grid", "merge_grid"]

# The paper's 12 pairs: p_gen in {0.2, 0.3, 0.4, 0.5} x p_mem in {0.05, 0.1, 0.2}.
DEFAULT_PAIRS: tuple[tuple[float, float], ...] = tuple(
    (g, m) for g in (0.2, 0.3, 0.4, 0.5) for m in (0.05, 0.1, 0.2))

GRID_COLUMNS = ("cell", "method", "p_gen", "p_mem", "active_fraction", "clean_before", "noisy_before",
                "clean_after", "noisy_after", "noisy_true_after", "test_eval", "test_drop", "forgotten_clean",
                "epochs", "run")
# a language model's grid (memorization sinks): the canaries repeated >= 16 times, tied -> drop; percentages,
# losses in nats per secret token, perplexity of the held-out text
LM_GRID_COLUMNS = ("cell", "method", "p_gen", "p_mem", "active_fraction", "extracted_before", "extracted_after",
                   "in_context_before", "in_context_after", "loss_gap_before", "loss_gap_after", "gap_closed",
                   "exposure_before", "exposure_after", "perplexity_eval", "perplexity_drop", "epochs", "run")


@dataclass(frozen=True)
class GridCell:
    """One trained model of the grid. method: "example_tied", "dropout", "sparse", "plain" or "elr"
    (language models: also "dedup"); `elr`: the "elr" cell's (lambda, beta)."""

    name: str
    method: str
    p_gen: float | None
    p_mem: float | None
    active_fraction: float
    elr: tuple[float, float] | None = None

    def model_config(self, base: ModelConfig) -> ModelConfig:
        if self.method == "example_tied":
            return replace(base, p_gen=self.p_gen, p_mem=self.p_mem, baseline=None, active_fraction=None)
        if self.method in UNMASKED or self.method == "elr":
            return replace(base, p_gen=None, p_mem=None, baseline=None, active_fraction=None)
        return replace(base, p_gen=None, p_mem=None, baseline=self.method, active_fraction=self.active_fraction)

    def run_config(self, base: RunConfig) -> RunConfig:
        """The cell's whole config: its model layer; "dedup" also its data (each canary written once); "elr" also
        its training's early-learning regularization."""
        cfg = copy.deepcopy(base)
        cfg.model = self.model_config(base.model)
        if self.method == "dedup":
            cfg.data = replace(cfg.data, dedup=True)
        if self.method == "elr":
            cfg.train = replace(cfg.train, elr=self.elr)
        return cfg


# cells without a per-block layer (language models): the plain model, and the plain model on deduplicated data
UNMASKED = ("plain", "dedup")


def grid_cells(pairs=DEFAULT_PAIRS, *, baselines: bool | tuple[str, ...] = True, task: str = "classification",
               elr=None) -> list[GridCell]:
    """The cells for `pairs` ((p_gen, p_mem), ...): one per pair, then two baselines per distinct fraction
    (`baselines` True: standard dropout and the fixed sparse network; or a tuple naming which of them; language
    models: also the plain model and the plain model on deduplicated data); with `elr` (lambda, beta), last, the
    plain model and the plain model with early-learning regularization (classification)."""
    elr = elr_setting(elr)
    if elr is not None and task != "classification":
        raise ConfigError(f"--elr (early-learning regularization) is for classification, not --task {task}: drop it")
    pairs = [tuple(float(v) for v in p) for p in pairs]
    if not pairs:
        raise ConfigError("the grid has no (p_gen, p_mem) pairs: pass e.g. --pairs '0.4,0.1;0.3,0.1'")
    if len(set(pairs)) != len(pairs):
        raise ConfigError("a (p_gen, p_mem) pair is listed twice: list each pair once")
    cells, fractions = [], []
    for pair in pairs:
        if len(pair) != 2:
            raise ConfigError(f"a grid pair takes two numbers P_GEN,P_MEM, not {pair}: pass e.g. 0.4,0.1")
        p_gen, p_mem = pair
        a = round(expected_active_fraction(p_gen, p_mem), 6)  # validates both fractions in (0, 1]
        cells.append(GridCell(f"etd-{p_gen:g}-{p_mem:g}", "example_tied", p_gen, p_mem, a))
        if a not in fractions:
            fractions.append(a)
    if baselines:
        for method in ("dropout", "sparse") if baselines is True else baselines:
            if method not in ("dropout", "sparse"):
                raise ConfigError(f"unknown baseline {method!r}: choose dropout or sparse")
            cells += [GridCell(f"{method}-{a:g}", method, None, None, a) for a in fractions]
        if task == "lm":
            # a language model's dropout cell also drops the neurons of the first pair of its fraction (are its
            # canaries there? they should not be), so it keeps that pair
            first = {}
            for c in cells:
                first.setdefault(c.active_fraction, (c.p_gen, c.p_mem))
            cells = [replace(c, p_gen=first[c.active_fraction][0], p_mem=first[c.active_fraction][1])
                     if c.method == "dropout" else c for c in cells]
            cells += [GridCell(m, m, None, None, 1.0) for m in UNMASKED]
    if elr is not None:  # prevention beside localization, on the same data: plain and ELR, nothing to drop
        cells += [GridCell("plain", "plain", None, None, 1.0),
                  GridCell(f"elr-{elr[0]:g}-{elr[1]:g}", "elr", None, None, 1.0, elr=elr)]
    return cells


def _pct(v: float | None) -> float | None:
    return None if v is None else round(100.0 * v, 2)


def _lm_row(cell: GridCell, loaded, row: dict) -> dict:
    """A language model's cell: its canaries before (tied) and after (drop) the sinks go; any cell alike (a model
    without sinks has nothing to drop: before equals after). Saved as the cell run's dropout probe."""
    from ..methods.sinks import evaluate_sinks
    same = (cell.p_gen, cell.p_mem) if cell.method == "dropout" else None
    result = evaluate_sinks(loaded.model(), loaded.data, drop_units=same)
    result.save(loaded.run)
    s = result.summary
    b, a = s["repeated_before"], s["repeated_after"]
    row.update(extracted_before=_pct(b["extracted"]), extracted_after=_pct(a["extracted"]),
               in_context_before=_pct(b["in_context"]), in_context_after=_pct(a["in_context"]),
               loss_gap_before=b["loss_gap"], loss_gap_after=a["loss_gap"], gap_closed=_pct(s["gap_closed"]),
               exposure_before=b["exposure"], exposure_after=a["exposure"],
               perplexity_eval=s["heldout_perplexity_eval"], perplexity_drop=s["heldout_perplexity_drop"])
    return {k: row.get(k) for k in LM_GRID_COLUMNS}


def _row(cell: GridCell, run: RunDir, epochs: int) -> dict:
    """Train-set and test accuracies of a finished cell, in percent."""
    from ..probes.dropout_eval import evaluate_dropout, plain_accuracies
    loaded = open_run(run.path)
    pct = _pct
    row = {"cell": cell.name, "method": cell.method, "p_gen": cell.p_gen, "p_mem": cell.p_mem,
           "active_fraction": cell.active_fraction, "epochs": epochs, "run": run.path.name}
    if loaded.config.task == "lm":
        return _lm_row(cell, loaded, row)
    if cell.method == "example_tied":
        result = evaluate_dropout(loaded, save=True)
        s = result.summary
        row.update(clean_before=pct(s["clean_before"]), noisy_before=pct(s["noisy_before"]),
                   clean_after=pct(s["clean_after"]), noisy_after=pct(s["noisy_after"]),
                   noisy_true_after=pct(s["noisy_true_after"]), test_eval=pct(s["test_eval"]),
                   test_drop=pct(s["test_drop"]), forgotten_clean=s["forgotten_clean"])
    else:
        acc = plain_accuracies(loaded)  # the baselines' test-time model: nothing to drop
        row.update(clean_before=pct(acc["clean"]), noisy_before=pct(acc["noisy"]), clean_after=pct(acc["clean"]),
                   noisy_after=pct(acc["noisy"]), noisy_true_after=pct(acc["noisy_true"]),
                   test_eval=pct(acc["test"]), test_drop=pct(acc["test"]), forgotten_clean=0)
    return {k: row.get(k) for k in GRID_COLUMNS}


def _write_table(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(GRID_COLUMNS if not rows or "clean_before" in rows[0]
                                                 else LM_GRID_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def _check_buildable(base: RunConfig, cells: list[GridCell]) -> None:
    """Build every kind of cell model once, so a model without a place for the layer fails before any training."""
    import torch

    from ..core.training import resolve_device
    from ..tasks.experiment import load_data
    device = resolve_device(base.train.device)
    model_cfg = base.model.resolved(device, base.task)
    data = load_data(base, device)
    seen = set()
    for cell in cells:
        if cell.method in seen:
            continue
        seen.add(cell.method)
        with torch.random.fork_rng(devices=[]):
            make_model(cell.model_config(model_cfg), data)


def dropout_grid(base: RunConfig, out_dir: str | Path, *, pairs=DEFAULT_PAIRS, baselines: bool | tuple[str, ...] = True,
                 elr=None, shard: tuple[int, int] | None = None, progress: bool = False,
                 log: Callable[[str], None] | None = None) -> list[dict]:
    """Train and evaluate every cell of the grid into `out_dir`; returns the rows of `grid.csv` (percentages).

    `base` gives the data, model and training settings shared by all cells (its
    example-tied dropout / baseline fields are replaced per cell). `elr`
    (lambda, beta, e.g. (3, 0.7)) adds a "plain" and an "elr" cell. Resumable:
    call again with the same arguments to finish an interrupted grid.
    `shard` (I, N): only every N-th cell from the I-th, side by side with the
    other shards in the same folder; returns its rows, and `merge_grid` writes
    grid.csv once all N are finished.
    """
    cells, spec = _grid_spec(base, pairs, baselines, elr)
    out_dir = Path(out_dir)
    log = log or (lambda s: None)
    if shard is None:
        with exclusive(out_dir):  # one writer per grid folder
            _open_grid(out_dir, spec, base, cells)
            rows = []
            for k, cell in enumerate(cells, 1):
                rows.append(_cell(cell, base, out_dir, f"[{k}/{len(cells)}]", progress, log))
                _write_table(out_dir / "grid.csv", rows)
        return rows
    from ..core.scale import join_shard, mine
    with exclusive(out_dir, wait=120):  # the shards take turns at the grid's record, then train side by side
        _open_grid(out_dir, spec, base, cells, same_cells=True)
    record = join_shard(out_dir, shard)
    with record.exclusive():
        mine_ = mine(cells, shard)
        rows = [_cell(cell, base, out_dir, f"[{k}/{len(mine_)} of shard {shard[0]}/{shard[1]}]", progress, log)
                for k, cell in enumerate(mine_, 1)]
        record.update_info(complete=True, cells=[c.name for c in mine_])
    return rows


def _grid_spec(base: RunConfig, pairs, baselines: bool | tuple[str, ...], elr) -> tuple[list[GridCell], dict]:
    """The grid's cells and its record (grid.json), its settings checked."""
    if base.model.example_tied or base.model.baseline is not None:
        raise ConfigError("the grid sets the per-block layer of each cell itself: leave out --example-tied-dropout")
    if elr is not None and base.train.elr is not None:
        raise ConfigError("the base config trains every cell with ELR already: leave it out of the base config to "
                          "compare a plain and an ELR cell")
    if base.train.auto:
        raise ConfigError("the grid's cells train for the same fixed epochs, and --epochs auto stops on an accuracy "
                          "an example-tied model measures with every unit on: pass --epochs N (e.g. the epochs your "
                          "plain run took to memorize)")
    cells = grid_cells(pairs, baselines=baselines, task=base.task, elr=elr)
    # through JSON, so that it compares equal to what grid.json holds (tuples become lists)
    spec = json.loads(json.dumps({"kind": "dropout-grid", "base": base.to_dict(), "cells": [c.name for c in cells]},
                                 default=_jsonable))
    return cells, spec


def check_grid(base: RunConfig, out_dir: str | Path, *, pairs=DEFAULT_PAIRS, baselines: bool = True,
               elr=None) -> None:
    """What a grid in shards checks before any worker starts: its cells, their models, and the folder (new, or
    this grid's with the same cells). Writes nothing."""
    cells, spec = _grid_spec(base, pairs, baselines, elr)
    _open_grid(Path(out_dir), spec, base, cells, same_cells=True, write=False)


def _open_grid(out_dir: Path, spec: dict, base: RunConfig, cells: list[GridCell], *, same_cells: bool = False,
               write: bool = True) -> None:
    """Check the grid folder (a new one, or this grid's: the same base settings, and with `same_cells` the same
    cells, as shards of one split need), the cells' models, then write grid.json."""
    grid_json = out_dir / "grid.json"
    if grid_json.exists():
        try:
            old = json.loads(grid_json.read_text())
        except (ValueError, UnicodeDecodeError):
            old = None
        if not isinstance(old, dict):
            raise ConfigError(f"{grid_json} is damaged: pass a new --out folder")
        if old.get("base") != spec["base"] or (same_cells and old.get("cells") != spec["cells"]):
            raise ConfigError(f"{out_dir} holds a grid with other settings: "
                              "pass another --out, or the same flags to resume it")
    elif not is_empty(out_dir):
        raise ConfigError(f"{out_dir} exists and is not a dropout grid: pass a new or empty --out folder")
    _check_buildable(base, cells)  # bad model or data: one line, before anything is written
    if write:
        write_json(grid_json, spec)


def _cell(cell: GridCell, base: RunConfig, out_dir: Path, tag: str, progress: bool,
          log: Callable[[str], None]) -> dict:
    """One cell's row: read back when finished before, else trained (or resumed) and evaluated."""
    path = out_dir / cell.name
    cfg = cell.run_config(base)
    if (path / "cell.json").exists():
        log(f"{tag} {cell.name}: done before, read back")
        return RunDir.open(path).read_json("cell.json")
    log(f"{tag} {cell.name}: training")
    if (path / "config.json").exists():
        run = RunDir.open(path)
        if run.stage("train").get("status") != "done":
            run = resume_training(path, progress=progress, log=log)
    else:
        run = run_training(cfg, path, overwrite=path.exists(), progress=progress, log=log)
    row = _row(cell, run, cfg.train.epochs)
    run.write_json("cell.json", row)  # last: its presence means the cell is finished
    log(f"{tag} {cell.name}: " + _cell_line(row))
    return row


def merge_grid(out_dir: str | Path, *, log: Callable[[str], None] | None = None) -> list[dict]:
    """Join a grid trained in shards (`memloc dropout-grid ... --shard I/N`): check that every shard of one split
    finished, write grid.csv (the rows in the grid's cell order, as one process writes it) and remove the shards'
    records. Returns the rows."""
    from ..core.scale import SHARDS, finished_shards
    out_dir = Path(out_dir)
    try:
        spec = json.loads((out_dir / "grid.json").read_text())
        names = list(spec["cells"])
    except (OSError, ValueError, KeyError, TypeError):
        raise RunError(f"{out_dir} is not a dropout grid (no readable grid.json): pass the --out folder of "
                       "`memloc dropout-grid`") from None
    with exclusive(out_dir, wait=120):
        records = finished_shards(out_dir, "the grid", f"`memloc dropout-grid ... --out {out_dir} --shard {{shard}}`")
        rows = []
        for name in names:
            path = out_dir / name / "cell.json"
            if not path.exists():
                raise RunError(f"cell {name} of {out_dir} is not finished although its shard says so: run its "
                               "shard again with the same flags, then merge")
            rows.append(RunDir.open(out_dir / name).read_json("cell.json"))
        _write_table(out_dir / "grid.csv", rows)
        remove_memloc_files(out_dir / SHARDS)  # their records; files of the user's there stay
    (log or (lambda s: None))(f"{out_dir}: merged {len(records)} shards, {len(rows)} cells")
    return rows


def _cell_line(row: dict) -> str:
    if "clean_before" in row:
        return (f"clean {row['clean_before']} -> {row['clean_after']}, noisy {row['noisy_before']} -> "
                f"{row['noisy_after']}, test {row['test_eval']} / {row['test_drop']}")
    return (f"repeated canaries extracted {row['extracted_before']} -> {row['extracted_after']}% "
            f"(in context {row['in_context_before']} -> {row['in_context_after']}%), loss gap "
            f"{row['loss_gap_before']} -> {row['loss_gap_after']} nats (closed {row['gap_closed']}%), "
            f"perplexity {row['perplexity_eval']} / {row['perplexity_drop']}")
