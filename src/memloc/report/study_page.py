"""A study's page: the claims of its first cell, each claim over seeds, the numbers over seeds, the base run's
sections, the dropout model and the grid."""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..core.figures import png
from ..core.runs import RunDir, study_cells, study_stages
from . import verdicts
from .html import Figure, Section, Table, write_report
from .paper_claims import _decided_claims, claims_section
from .sections.dropout import dropout_section
from .sections.generic import _load_probe
from .sections.grid import grid_tradeoff_figure, protection_notes
from .sections.registry import run_sections
from .sections.training import learning_curves
from .words import _subset_title, task_words


def _open_study(path: Path) -> tuple[RunDir, list[tuple[str, RunDir | None, RunDir | None]]]:
    study = RunDir.open(path, kind="study")
    cells = []
    for seed, noise, _, b, d in study_cells(study):
        cells.append((f"seed {seed}, noise {noise:g}", RunDir.open(b) if (b / "run.json").exists() else None,
                      RunDir.open(d) if (d / "run.json").exists() else None))
    return study, cells


def _seed_table(cells) -> Table | None:
    """Each claim over the seeds of each noise level: the overall verdict (`verdicts.over_seeds`), the mean of its
    value with its 95% t interval over the seeds (n), how many seeds agree, then every seed's number and verdict."""
    if len(cells) < 2:
        return None
    per: dict[tuple[str, str], list] = {}
    for label, b, d in cells:
        if b is None or task_words(b).name == "lm":
            continue
        seed, _, noise = label.partition(", ")  # "seed S, noise N" (`_open_study`)
        for row, v in _decided_claims(b, d):
            v = replace(v, verdict=row["verdict"])  # "not measured: ..." counts as not enough data
            per.setdefault((row["claim"], noise), []).append((f"{seed}: {row['ours']} ({row['verdict']})", v))
    rows = []
    for (claim, noise), items in per.items():
        over = verdicts.over_seeds([v for _, v in items])
        said = {v.verdict for _, v in items}
        # no seed measured, all for one reason (e.g. "not measured: the model did not memorize ..."): say that reason
        verdict = said.pop() if len(said) == 1 and not over.counts[verdicts.HOLDS] + over.counts[verdicts.FAILS] \
            else over.verdict
        rows.append({"claim": claim, "noise": noise, "threshold": items[0][1].threshold,
                     "over seeds": over.summary(), "verdict": verdict,
                     "per seed": " | ".join(t for t, _ in items)})
    return Table("summary_seeds", "Each claim over seeds (per noise level): holds when a majority of seeds hold and "
                 "none fails; the mean of its value with its 95% t interval over the seeds (n seeds); then every "
                 "seed", rows) if rows else None


def _numbers_over_seeds(cells) -> list[dict]:
    task = task_words(next((b for _, b, _ in cells if b is not None), None))
    mem = task.memorized
    keys = {"final test accuracy": lambda b, d: (b.read_metrics() or [{}])[-1].get("test_acc"),
            f"final {_subset_title(mem, task).removesuffix(' (%)')}":
                lambda b, d: (b.read_metrics() or [{}])[-1].get(f"{mem}_acc"),
            "noisy-train after the drop": lambda b, d: (_load_probe(d, "dropout")[0] or {}).get("noisy_after"),
            "clean-train after the drop": lambda b, d: (_load_probe(d, "dropout")[0] or {}).get("clean_after")}
    rows = []
    for name, fn in keys.items():
        vals = [fn(b, d) for _, b, d in cells if b is not None]
        vals = [100 * v for v in vals if v is not None]
        if vals:
            rows.append({"measure": name, "mean (%)": round(float(np.mean(vals)), 2),
                         "sd (%)": round(float(np.std(vals, ddof=1)), 2) if len(vals) > 1 else 0.0, "n": len(vals)})
    return rows


def build_study_report(path: Path) -> Path:
    study, cells = _open_study(path)
    info = study.info
    cfg = info["config"]
    label, base, drop = cells[0]
    base_cfg = cfg.get("base") if isinstance(cfg.get("base"), dict) else {}
    model, data = (base_cfg.get(k) if isinstance(base_cfg.get(k), dict) else {} for k in ("model", "data"))
    if model.get("name") is None and base is not None:  # chosen from the data when the run was made: its own config
        model = (base.config.get("model") or {}) if isinstance(base.config, dict) else {}
    name = str(model.get("name") or "the default model")
    if isinstance(model.get("width"), (int, float)):
        name += f" (width {model['width']:g})"
    seconds = sum(v.get("seconds") or 0 for v in info.get("stages", {}).values() if isinstance(v, dict))
    device = "not recorded"
    if base is not None and base.has("env.json"):  # where the base model was trained
        env = base.read_json("env.json")
        device = str(env.get("device", device)) if isinstance(env, dict) else device
    intro = [f"Study `{path}`, preset {cfg.get('preset')}: {name} on {data.get('dataset')}; seeds "
             f"{cfg['seeds']}, noise levels {cfg['noise_levels']}; device {device}; "
             f"{seconds / 60:.0f} min of stages. Rebuilt from the study's files; nothing was recomputed."]
    # the report's own stage is left out: rebuilding a finished study must give the same page
    stages = {k: v for k, v in info.get("stages", {}).items() if isinstance(v, dict)}
    done = {k for k, v in stages.items() if v.get("status") == "done"}
    skipped = {k: v.get("reason", "") for k, v in stages.items() if v.get("status") == "skipped"}
    unfinished = [k for k in study_stages(study) if k not in done and k not in skipped]
    for reason in dict.fromkeys(skipped.values()):  # one line per reason (e.g. the model did not memorize)
        keys = [k for k, r in skipped.items() if r == reason]
        intro.append(f"Skipped: {', '.join(keys)}. {reason[:1].upper() + reason[1:]}.")
    if unfinished:
        intro.append(f"The study is not finished (stages not done: {', '.join(unfinished) or 'not started'}): "
                     f"finish it with `memloc run --resume {path}`.")
    if base is None:
        sections = [Section("Summary", missing="the base model has not been trained yet")]
        return write_report(path / "report", "memloc study report", intro, sections)
    summary = claims_section(base, drop)
    over = _numbers_over_seeds(cells)
    if len(cells) > 1 and over:
        summary.tables.append(Table("summary_mean_sd", "Mean ± sd over seeds and noise levels", over))
    seeds = _seed_table(cells)
    if seeds:
        summary.tables.append(seeds)
    sections = [summary] + run_sections(base)
    if drop is not None:
        dsec = dropout_section(drop)
        curves = learning_curves(drop)
        for f in curves.figures:
            f.name, f.caption = "dropout_learning_curves", (
                "Example-tied dropout model during training, measured in eval mode (every unit on at its "
                "expectation, not each example's own mask), so noisy-train stays low here although the model "
                "memorizes them through their masks (the figure above, 'before (tied)'): " + f.caption)
        dsec.figures = dsec.figures + curves.figures  # before/after first: the answer, then how training went
        sections.append(dsec)
    else:
        sections.append(Section("Example-tied dropout", missing="the dropout model has not been trained yet"))
    grid_csv = path / "grid" / "grid.csv"
    if grid_csv.exists():
        rows = list(csv.DictReader(io.StringIO(grid_csv.read_text())))
        gsec = Section("Example-tied dropout grid and baselines", tables=[Table("grid", "grid.csv", rows)],
                       notes=protection_notes(rows))
        fig = grid_tradeoff_figure(rows)
        if fig is not None:
            gsec.figures.append(Figure("grid_tradeoff", "Each cell of the grid after its drop: noisy-train accuracy "
                                       "left (lower: more memorization removed) against the clean-train accuracy it "
                                       "cost (left: cheaper); one point per (p_gen, p_mem), baselines marked. Look "
                                       "for example-tied points near the bottom left and baselines that stay high.",
                                       png(fig)))
        sections.append(gsec)
    return write_report(path / "report", "memloc study report", intro, sections)
