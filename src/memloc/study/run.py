"""The whole study in one call: train, probe, example-tied dropout, detection, report.

A study directory (a `RunDir` of kind "study") holds `study.json` (the resolved
settings and the status of every stage), one run directory per trained model
(`base/` for the plain model with its probes, `dropout/` for the example-tied
dropout model; with several seeds or noise levels `base-s1-n0.2/` and so on:
`runs.study_cells`), and `report/`. Each cell's runs are opened once (model
and data built once) and every probe runs through the one probe engine; every
stage writes its results before it is marked done, and every stage can resume
its own partial work, so `memloc run --resume STUDY` after an interrupt
finishes without redoing what was complete.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .. import probes
from ..core.errors import ConfigError, RunError
from ..core.files import _jsonable, is_empty, memloc_kind
from ..core.options import check_ranges, floats, given_fields, given_option, ints, option
from ..core.runs import RunDir, exclusive, mark_failed, remove_memloc_files, study_cells, study_stages
from ..core.scale import SHARDS, finished_shards, join_shard, mine
from ..core.tasks import task_of
from ..core.training import MEMORIZED, TrainConfig, resolve_device
from ..report import verdicts
from ..tasks.classification.data import DataConfig
from ..tasks.experiment import LoadedRun, ModelConfig, RunConfig, open_run, resume_training, run_training
from ..tasks.experiment import preset as preset_sections


def _pair(text: str) -> tuple[float, float]:
    return floats(text, 2)  # type: ignore[return-value]


@dataclass
class StudyConfig:
    """What a study runs. `base` is the plain model's run config; the rest sets the probes."""

    base: RunConfig = option(cli=False, factory=RunConfig)
    preset: str = option("default", cli=False)
    seeds: tuple[int, ...] = option((0,), "seed(s), e.g. 0,1,2: the report shows mean and sd", parse=ints,
                                     at_least=0, at_most=2 ** 63 - 1)
    noise_levels: tuple[float, ...] = option((0.1,), "noise level(s), e.g. 0.1 or 0.05,0.1,0.2", flag="--noise",
                                             parse=floats, above=0, below=1)
    # the example-tied dropout model's fractions
    p_gen: float = option(0.4, "the dropout model's p_gen,p_mem (--task lm: train the study's model with "
                          "memorization sinks of these fractions)", flag="--example-tied-dropout", parse=_pair,
                          metavar="P_GEN,P_MEM", spread=("p_gen", "p_mem"), aliases=("--memorization-sinks",), above=0,
                          at_most=1)
    p_mem: float = option(0.1, cli=False, above=0, at_most=1)
    dropout_epochs: int | None = option(None, cli=False, at_least=1)  # None: the base run's epochs
    dropout_width: float | None = option(None, cli=False, above=0)  # None: the base model's width
    rewind_every: int = option(1, cli=False, at_least=1)
    retrain_epochs: int = option(20, cli=False, at_least=1)
    flip_examples: int = option(200, "clean and noisy examples for greedy unit removal (each)",
                                at_least=1)
    flip_others: int = option(512, cli=False, at_least=1)
    flip_eval_subsample: int | None = option(None, cli=False, at_least=1)
    detection: bool = option(True, cli=False)
    grid: bool = option(False, "add the example-tied dropout grid and baselines")
    probe_anyway: bool = option(False, "run the probes that need memorization even when the model did not memorize "
                                "(noisy-train below 90% at the end of training)")
    given: tuple[str, ...] | None = given_option()

    def __post_init__(self) -> None:
        check_ranges(self)
        self.seeds = tuple(int(s) for s in self.seeds)
        self.noise_levels = tuple(float(n) for n in self.noise_levels)
        if not self.seeds or not self.noise_levels:
            raise ConfigError("a study needs at least one seed and one noise level")
        self.p_gen, self.p_mem = float(self.p_gen), float(self.p_mem)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StudyConfig":
        try:
            d = dict(d)
            base = RunConfig.from_dict(d.pop("base"), source="study.json (base)")
            pair = d.pop("example_tied_dropout", None)  # as memloc before p_gen / p_mem wrote it
            if pair is not None:
                d["p_gen"], d["p_mem"] = pair
            return cls(base=base, **d)
        except (TypeError, ValueError, KeyError, ConfigError) as err:
            raise RunError(f"study.json is damaged: it is not a memloc study config ({err})") from None

    def cells(self) -> list[tuple[int, float]]:
        return [(s, n) for s in self.seeds for n in self.noise_levels]


def study_config(preset: str = "default", *, base_overrides: dict | None = None, **overrides) -> StudyConfig:
    """Preset < overrides. `base_overrides` is {"data": {...}, "model": {...}, "train": {...}} of flags given."""
    sections = copy.deepcopy(preset_sections(preset))
    study = sections.pop("study", {})
    for sec, vals in (base_overrides or {}).items():
        sections.setdefault(sec, {}).update(vals)
    typed = {sec: tuple(sorted((base_overrides or {}).get(sec, {}))) for sec in ("data", "train")}
    # what the user set, recorded: a preset's counts are defaults that fit the data (`options.fitted`)
    base = RunConfig(data=DataConfig(**sections.get("data", {}), given=typed["data"]),
                     model=ModelConfig(**sections.get("model", {})),
                     train=TrainConfig(**sections.get("train", {}), given=typed["train"]))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    study.update(overrides)
    study["given"] = tuple(sorted(overrides))
    known = {f.name for f in fields(StudyConfig)}
    unknown = sorted(set(study) - known)
    if unknown:
        raise ConfigError(f"a study has no setting {unknown[0]!r}: choose from {', '.join(sorted(known))}")
    cfg = StudyConfig(base=base, preset=preset, **study)
    cfg.base.data.noise = cfg.noise_levels[0]  # what the (first) cell runs, not the data default
    return cfg


def _cell_configs(cfg: StudyConfig, seed: int, noise: float, device) -> tuple[RunConfig, RunConfig]:
    base = copy.deepcopy(cfg.base)
    base.data.seed = seed
    base.data.noise = noise
    base.train.seed = seed
    base.model = base.model.resolved(device)
    drop = copy.deepcopy(base)
    drop.model.p_gen, drop.model.p_mem = cfg.p_gen, cfg.p_mem
    if cfg.dropout_width is not None:
        drop.model.width = cfg.dropout_width
    if cfg.dropout_epochs is not None:
        drop.train.epochs = cfg.dropout_epochs
    drop.train.gradient_accounting = False
    return base, drop


def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{100 * v:.1f}%"


def headline(stage: str, result) -> str | None:
    """One line of a finished stage's result for the console (None when there is nothing to say)."""
    if result is None:
        return None
    if stage in ("train", "dropout_train"):  # the final epoch's metrics
        what = ("the example-tied model, measured in eval mode (every unit on, memorization units at their "
                "expectation, not each example's own mask: its epoch lines too),") if stage == "dropout_train" \
            else "the model"
        return (f"{stage}: {what} ends at noisy-train {_pct(result.get('noisy_train_acc'))}, clean-train "
                f"{_pct(result.get('clean_train_acc'))}, test {_pct(result.get('test_acc'))}")
    s, a = result.summary, result.arrays
    if stage in ("rewinding", "retraining") and "noisy_train" in list(a.get("subsets", [])):
        acc = a["accuracy"][:, :, list(a["subsets"]).index("noisy_train")]  # (layers, steps)
        names = [str(n) for n in a["layer_names"]]
        if stage == "rewinding":
            part = acc[:, 1:] if acc.shape[1] > 1 else acc
            if not np.isfinite(part).any():  # nothing known to be noisy (an audit without a noise mask)
                return None
            mean = np.nanmean(part, axis=1)  # over the rewound epochs after 0
            i = int(np.nanargmin(mean))
            return (f"rewinding: {names[i]} is the most critical layer (noisy-train {_pct(mean[i])} on average over "
                    f"the epochs it was rewound to; the final model {_pct(s['final'].get('noisy_train_acc'))})")
        erased_mask, back_mask, kept_mask = verdicts.erased_and_back(acc[:, 0], acc[:, -1], MEMORIZED)
        erased, back = int(erased_mask.sum()), [n for n, m in zip(names, back_mask) if m]
        kept = int(kept_mask.sum())
        return (f"retraining: {len(back)} of the {erased} layers the reset erased (of {len(names)}) bring "
                f"noisy-train back to >= 90% without seeing a noisy example" + (f" ({', '.join(back)})" if back else "")
                + (f"; {kept} never lost it" if kept else ""))
    if stage == "flipping" and {"clean", "noisy"} <= set(s.get("kinds", {})):
        n, c = s["kinds"]["noisy"], s["kinds"]["clean"]
        if not n["searched"]:
            return "flipping: no noisy example was searched (all were already predicted wrongly)"
        return (f"flipping: median units to flip {n['median_units']:g} (noisy, {n['searched']} searched) vs "
                + ("–" if c["median_units"] is None else f"{c['median_units']:g}") + f" (clean); "
                f"{_pct(n['share_flipped_under_10'])} of noisy examples flip with < 10 units")
    if stage == "dropout_eval" and "noisy_before" in s:
        return (f"example-tied dropout: dropping the memorization units takes noisy-train {_pct(s['noisy_before'])} "
                f"→ {_pct(s['noisy_after'])}, clean-train {_pct(s['clean_before'])} → {_pct(s['clean_after'])}")
    if stage == "detection" and s.get("best"):
        auroc = next((r.get("auroc") for r in s.get("quality") or [] if r.get("score") == s["best"]), None)
        return f"detection: the best score for finding the noisy examples is {s['best']}" + \
            (f" (AUROC {auroc:.3f})" if auroc is not None else "")
    return None


def _train(run_cfg: RunConfig, out: Path, progress: bool, log, *, notes: bool = True) -> None:
    """Train (or finish training) one run of the study; `notes`: say what was inferred for the data and chosen
    for the model (once per study: its plain run)."""
    if memloc_kind(out) == "run":
        run = RunDir.open(out)
        if run.stage("train").get("status") != "done":
            # a run killed before its first checkpoint (even before its config) starts again from the study's config
            resume_training(out, progress=progress, log=log, config=run_cfg)
        return
    run_training(run_cfg, out, overwrite=out.exists(), progress=progress, log=log, notes=notes)


def trained_epochs(run_dir: Path) -> int:
    """The epochs a finished run trained (--epochs auto: as many as it took to memorize)."""
    run = RunDir.open(run_dir) if memloc_kind(run_dir) == "run" else None
    if run is None or run.stage("train").get("status") != "done":
        raise RunError(f"{run_dir} has not finished training, and what trains after it takes as many epochs as it "
                       "did (--epochs auto): finish it first (in shards: the shard of the first seed and noise level)")
    return len(run.read_metrics())


class _Cell:
    """One seed and noise level of a study: its two runs, each opened once (model and data built once)."""

    def __init__(self, cfg: StudyConfig, seed: int, noise: float, base_dir: Path, drop_dir: Path, device):
        self.cfg, self.base_dir, self.drop_dir = cfg, base_dir, drop_dir
        self.base_cfg, self.drop_cfg = _cell_configs(cfg, seed, noise, device)
        self._open: dict[Path, LoadedRun] = {}

    def loaded(self, path: Path) -> LoadedRun:
        if path not in self._open:
            self._open[path] = open_run(path)
        return self._open[path]

    def stage(self, name: str, progress: bool, log: Callable[[str], None]) -> None:
        cfg, base_cfg = self.cfg, self.base_cfg
        result = None
        if name in ("train", "dropout_train"):
            path, run_cfg = (self.base_dir, base_cfg) if name == "train" else (self.drop_dir, self.drop_cfg)
            if name == "dropout_train" and run_cfg.train.auto:  # as long as the plain model trained until memorized
                run_cfg = copy.deepcopy(run_cfg)
                run_cfg.train = replace(run_cfg.train, epochs=trained_epochs(self.base_dir))
            _train(run_cfg, path, progress, log, notes=name == "train")
            self._open.pop(path, None)  # its checkpoints changed: open it afresh
            metrics = RunDir.open(path).read_metrics()
            result = metrics[-1] if metrics else None
        elif name == "rewinding":
            result = probes.rewind(self.loaded(self.base_dir), cfg=probes.RewindConfig(every=cfg.rewind_every),
                                   progress=progress, log=log)
        elif name == "retraining":
            batch = self.loaded(self.base_dir).config.train.batch_size  # as trained (the model's recipe's)
            rc = probes.RetrainConfig(epochs=cfg.retrain_epochs, batch_size=batch, seed=base_cfg.train.seed,
                                      given=())  # the peak at half the epochs
            result = probes.retrain(self.loaded(self.base_dir), cfg=rc, progress=progress, log=log)
        elif name == "flipping":
            fc = probes.FlipConfig(examples=cfg.flip_examples, kinds=("clean", "noisy"), others=cfg.flip_others,
                                   eval_subsample=cfg.flip_eval_subsample, seed=base_cfg.train.seed,
                                   given=("examples",) if "flip_examples" in given_fields(cfg) else ())
            result = probes.flip(self.loaded(self.base_dir), cfg=fc, progress=progress, log=log)
        elif name == "dropout_eval":
            result = probes.evaluate_dropout(self.loaded(self.drop_dir), progress=progress, log=log)
        elif name == "depth":  # before detection: prediction depth is one of its scores
            result = probes.prediction_depth(self.loaded(self.base_dir),
                                             cfg=probes.DepthConfig(seed=base_cfg.train.seed), progress=progress,
                                             log=log)
        elif name == "detection":
            result = probes.detect(self.loaded(self.base_dir), cfg=probes.DetectConfig(), progress=progress, log=log)
        else:
            raise ValueError(f"unknown study stage {name!r}")
        line = headline(name, result)
        if line:
            log(line)


# the stages whose questions are about memorized examples: skipped when the base model did not memorize
NEEDS_MEMORIZATION = ("rewinding", "retraining", "flipping", "dropout_train", "dropout_eval")


def memorization_warning(noisy: float | None) -> str | None:
    """One line on a model that did not memorize its noisy examples, with what to change; None when it did."""
    if noisy is None or noisy >= MEMORIZED:
        return None
    return (f"the model did not memorize its noisy examples: noisy-train accuracy {100 * noisy:.1f}% at the end of "
            f"training (< {100 * MEMORIZED:.0f}%). The probes ask where memorized examples live; train it to memorize: "
            "more --epochs, a higher --lr, a wider model (--width), or a smaller --batch-size")


def run_study(cfg: StudyConfig | None = None, out: str | Path | None = None, *, resume: str | Path | None = None,
              overwrite: bool = False, shard: tuple[int, int] | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None) -> Path:
    """Run (or, with `resume`, finish) a study; returns the study directory. `overwrite` starts an existing study
    folder again (memloc's own files in it deleted, nothing else). `shard` (I, N): only every N-th cell (seed and
    noise level) from the I-th, and every N-th cell of its dropout grid, side by side with the other shards in the
    same folder `out`; `merge_study` then writes the study's record and report."""
    log = log or (lambda s: None)
    if resume is not None:
        study = RunDir.open(resume, kind="study")
        with study.exclusive():
            if study.info.get("finished", False):
                raise RunError(f"{study.path} is finished: nothing to resume (rebuild its report with "
                               f"`memloc report {study.path}`)")
            if (study.path / SHARDS).is_dir():
                raise RunError(f"{study.path} runs in shards: rerun an unfinished shard with its command "
                               f"(--shard I/N), then `memloc merge {study.path}`")
            return _run_stages(study, StudyConfig.from_dict(study.config), progress, log)
    cfg = cfg or study_config()
    if shard is not None:
        check_study(cfg, out, overwrite=overwrite, folder=False)  # its folder: checked under its lock below
    else:
        _check_cells(cfg)
    ds = cfg.base.data.dataset
    name = Path(ds).stem if ("/" in ds or ds.endswith((".npz", ".npy"))) else ds  # a file: its stem
    out = Path(out) if out else Path("runs") / f"study-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if shard is None:
        with exclusive(out):  # one writer per study for its whole life
            study = RunDir.create(out, kind="study", overwrite=overwrite, log=log, config=cfg.to_dict())
            return _run_stages(study, cfg, progress, log)
    with exclusive(out, wait=120):  # the shards take turns at the study's record, then work side by side
        study = _join_study(out, cfg)
    record = join_shard(out, shard)
    with record.exclusive():
        _run_stages(study, cfg, progress, log, record=record, shard=shard)
        record.update_info(complete=True)
    return study.path


def check_study(cfg: StudyConfig, out: str | Path | None, *, overwrite: bool = False, folder: bool = True) -> None:
    """What a study in shards checks before any worker starts: every cell's config, a folder to share (--out),
    and that a study already there has the same settings."""
    if out is None:
        raise ConfigError("a study in shards needs --out: every shard writes into the same folder")
    if overwrite:
        raise ConfigError("--overwrite with shards would delete the other shards' work: start the study again "
                          "without shards, or pass a new --out")
    _check_cells(cfg)
    if folder:
        _check_folder(Path(out), cfg)


def _check_cells(cfg: StudyConfig) -> None:
    """Every cell's run configs, validated before anything is written."""
    device = resolve_device(cfg.base.train.device)
    for seed, noise in cfg.cells():
        _cell_configs(cfg, seed, noise, device)


def _check_folder(out: Path, cfg: StudyConfig) -> None:
    if (out / "study.json").exists():
        _same_study(RunDir.open(out, kind="study"), cfg)
    elif not is_empty(out):
        raise ConfigError(f"{out} exists and is not a study: pass a new or empty --out folder")


def _same_study(study: RunDir, cfg: StudyConfig) -> None:
    """A shard joins only an unfinished study with its own settings (the device aside: shards may run on other
    machines)."""
    if study.info.get("finished", False):
        raise RunError(f"{study.path} is finished: nothing left for a shard (rebuild its report with "
                       f"`memloc report {study.path}`)")

    def settings(d: dict) -> dict:
        d = copy.deepcopy(d)
        d.get("base", {}).get("train", {}).pop("device", None)
        return d
    if settings(study.config) != settings(json.loads(json.dumps(cfg.to_dict(), default=_jsonable))):
        raise ConfigError(f"{study.path} holds a study with other settings: give every shard the same flags, or "
                          "pass another --out")


def _join_study(out: Path, cfg: StudyConfig) -> RunDir:
    """The study a shard works in: made by the first shard, joined by the others (the caller holds its lock)."""
    _check_folder(out, cfg)
    if (out / "study.json").exists():
        return RunDir.open(out, kind="study")
    return RunDir.create(out, kind="study", config=cfg.to_dict())


def merge_study(path: str | Path, *, progress: bool = True, log: Callable[[str], None] | None = None) -> Path:
    """Join a study run in shards (`memloc run ... --shard I/N`): check that every shard of one split finished,
    record their stages in study.json, join its dropout grid, write the report, and remove the shards' records."""
    log = log or (lambda s: None)
    study = RunDir.open(path, kind="study")
    cfg = StudyConfig.from_dict(study.config)
    with study.exclusive():
        records = finished_shards(study.path, "the study", f"`memloc run ... --out {study.path} --shard {{shard}}`")
        stages = {}
        for record in records:
            stages.update({k: v for k, v in record.info["stages"].items() if k != "grid"})
        info = study.info
        info["stages"].update({k: stages[k] for k in study_stages(study) if k in stages})
        study.write_json(study.meta, info)
        if cfg.grid:
            from .grid import merge_grid
            _stage(study, "grid", lambda: merge_grid(study.path / "grid", log=log), log)
        _finish(study)
        remove_memloc_files(study.path / SHARDS)  # their records; files of the user's there stay
    log(f"{study.path}: merged {len(records)} shards")
    return study.path


def expected_cost(cfg: StudyConfig, stage: str) -> float:
    """What a stage costs, in training epochs of the base model (weights measured on the default study, ResNet-9
    on a CPU: rewinding one layer to one epoch is an evaluation pass, about 0.11 epochs; retraining one layer for one
    epoch about 0.45; one flipped example about 0.043; an epoch of the example-tied model about 0.62): what the
    study's progress bar counts, so that its time estimate follows the work left, not the mean of finished stages."""
    layers = 9  # ResNet-9's; the weights only need to be roughly right
    train = cfg.base.train
    epochs = train.auto_cycle + train.settle_epochs if train.auto else int(train.epochs)  # auto: a guess
    cost = {"train": epochs, "rewinding": 0.11 * layers * (epochs / cfg.rewind_every + 1),
            "retraining": 0.45 * layers * cfg.retrain_epochs, "flipping": 0.043 * 2 * cfg.flip_examples,
            "dropout_train": 0.62 * (cfg.dropout_epochs or epochs), "dropout_eval": 0.6, "depth": 0.2,
            "detection": 0.5, "report": 0.6}
    if stage == "grid":
        from .grid import DEFAULT_PAIRS
        return 0.62 * epochs * (len(DEFAULT_PAIRS) + 3)  # every pair, the plain model and the two baselines
    return cost.get(stage, 1.0)


def _run_stages(study: RunDir, cfg: StudyConfig, progress: bool, log: Callable[[str], None], *,
                record: RunDir | None = None, shard: tuple[int, int] | None = None) -> Path:
    """Every stage not yet done, in order, then the report; a stage that raises is recorded as failed. A shard
    (`shard`, its own stages in `record`) runs only its cells and its part of the grid, and writes no report."""
    device = resolve_device(cfg.base.train.device)
    record = record or study
    all_cells = study_cells(study)
    mine_ = mine(all_cells, shard)
    keys = [k for k in study_stages(study)
            if k == "grid" or any(k.startswith(prefix) for _, _, prefix, _, _ in mine_)]
    cells = {prefix for _, _, prefix, _, _ in all_cells}

    def cost(key: str) -> float:
        return expected_cost(cfg, next((key[len(p):] for p in cells if p and key.startswith(p)), key))

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(cost(k) for k in keys) + cost("report"), desc="study", position=0,
                   dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
    try:
        with contextlib.ExitStack() as held:  # the study's runs are its own between stages too: no second writer
            for _, _, _, base_dir, drop_dir in mine_:
                held.enter_context(exclusive(base_dir))
                held.enter_context(exclusive(drop_dir))
            if cfg.grid and shard is None:  # a grid in shards is shared by the shards
                held.enter_context(exclusive(study.path / "grid"))
            _cells_and_grid(study, cfg, record, mine_, keys, shard, device, cost, bar, progress, log)
        if shard is not None:
            return study.path
        _finish(study)
        if bar is not None:
            advance(bar, cost("report"))
    finally:
        if bar is not None:
            bar.close()
    return study.path


def _cells_and_grid(study: RunDir, cfg: StudyConfig, record: RunDir, mine_: list, keys: list[str],
                    shard: tuple[int, int] | None, device, cost: Callable[[str], float], bar,
                    progress: bool, log: Callable[[str], None]) -> None:
    """The stages of `mine_` cells not yet done, then the grid (`_run_stages` holds their runs' locks)."""
    for seed, noise, prefix, base_dir, drop_dir in mine_:
        cell, warned, warning = None, False, ...  # the cell's memorization warning, read once (after train)
        for key in [k for k in keys if k.startswith(prefix) and k != "grid"]:
            name = key[len(prefix):]
            if name in NEEDS_MEMORIZATION and record.stage(key).get("status") not in ("done", "skipped"):
                if warning is ...:
                    warning = memorization_warning(_final_noisy(base_dir))
                if warning is not None and not warned:
                    log(f"warning: {warning}" + ("; probing anyway (--probe-anyway)" if cfg.probe_anyway else ""))
                    warned = True
                if warning is not None and not cfg.probe_anyway:
                    record.set_stage(key, "skipped", reason=f"{warning}; rerun the study with --probe-anyway to "
                                                            "probe it")
                    log(f"stage {key} skipped (the model did not memorize; --probe-anyway runs it)")
            if record.stage(key).get("status") not in ("done", "skipped"):
                cell = cell or _Cell(cfg, seed, noise, base_dir, drop_dir, device)
                if bar is not None:
                    bar.set_postfix_str(key)
                _stage(record, key, lambda: cell.stage(key[len(prefix):], progress, log), log)
            if bar is not None:
                advance(bar, cost(key))
    if cfg.grid and record.stage("grid").get("status") != "done":
        from .grid import dropout_grid
        base_cfg, _ = _cell_configs(cfg, cfg.seeds[0], cfg.noise_levels[0], device)
        if base_cfg.train.auto:  # the grid's cells train as long as the first cell's plain model did
            base_cfg.train = replace(base_cfg.train, epochs=trained_epochs(study_cells(study)[0][3]))
        _stage(record, "grid", lambda: dropout_grid(base_cfg, study.path / "grid", shard=shard,
                                                    progress=progress, log=log), log)
        if bar is not None:
            advance(bar, cost("grid"))


def advance(bar, amount: float) -> None:
    """Move the study's bar on by `amount`, never past its total (a float sum: past it, tqdm warns and its time
    estimate turns negative)."""
    amount = min(amount, bar.total - bar.n)
    if amount > 0:
        bar.update(amount)


def _finish(study: RunDir) -> None:
    """The study's last stage: its report, then the mark that it is finished."""
    from ..report.page import build_report
    build_report(study.path)
    study.set_stage("report", "done")
    study.update_info(finished=True)


def _final_noisy(base_dir: Path) -> float | None:
    """Noisy-train accuracy at the end of the base run's training (None: not trained, or no noisy examples)."""
    if memloc_kind(base_dir) != "run":
        return None
    run = RunDir.open(base_dir)
    if run.stage("train").get("status") != "done":
        return None
    metrics = run.read_metrics()
    return metrics[-1].get("noisy_train_acc") if metrics else None


def _stage(study: RunDir, key: str, work: Callable[[], None], log: Callable[[str], None]) -> None:
    """One stage of the study, recorded running -> done, or failed with its reason."""
    t0 = time.perf_counter()
    study.set_stage(key, "running")
    log(f"stage {key} ...")
    try:
        work()
    except BaseException as err:
        mark_failed(study.set_stage, key, err)
        raise
    study.set_stage(key, "done", seconds=round(time.perf_counter() - t0, 2))
    log(f"stage {key} done in {time.perf_counter() - t0:.0f}s")


# ----------------------------------------------------------------------------- the language-model study

# the probes of `memloc run --task lm`, in order, with the config each gets from the preset's study section
LM_STAGES = ("memorization", "dropout", "rewinding", "retraining", "flipping")  # dropout: a model with sinks only


def _lm_probe_config(stage: str, study: dict):
    if stage == "memorization":
        return probes.MemorizationConfig()
    if stage == "dropout":
        return probes.DropoutConfig()
    if stage == "rewinding":
        return probes.RewindConfig(every=study.get("rewind_every", 1))
    if stage == "retraining":
        epochs = study.get("retrain_epochs", 4)
        return probes.RetrainConfig(epochs=epochs, peak_epoch=epochs / 2, lr=study.get("retrain_lr", 1e-3),
                                    batch_size=32, optimizer="adamw", weight_decay=0.0, given=())
    return probes.FlipConfig(examples=study.get("flip_examples", 40), others=study.get("flip_others", 128), copies=1,
                             input_noise=0.0, kinds=("canary",), indices=study.get("flip_indices"),
                             given=())  # the preset's counts and the memorized canaries found: none typed


def _memorized_canaries(loaded: LoadedRun, n: int, seed: int = 0) -> tuple[int, ...]:
    """Up to `n` canary sequences the final model extracts in context, as evenly over repeat counts as they allow
    (a seeded choice): what greedy removal searches (a sequence not extracted has nothing to remove)."""
    data = loaded.data
    hits = task_of(data).hits(loaded.model(), "train").cpu().numpy()
    canary = data.canary.cpu().numpy()
    groups = {}
    for i in np.flatnonzero(hits & (canary >= 0)):
        groups.setdefault(data.canaries[int(canary[i])]["repeat_group"], []).append(int(i))
    rng = np.random.default_rng([seed, 13])
    pools = {r: list(rng.permutation(v)) for r, v in sorted(groups.items())}
    chosen: list[int] = []
    while len(chosen) < n and any(pools.values()):
        for r in list(pools):
            if pools[r] and len(chosen) < n:
                chosen.append(int(pools[r].pop()))
    return tuple(sorted(chosen))


def run_lm_study(cfg: RunConfig | None = None, out: str | Path | None = None, *, study: dict | None = None,
                 resume: str | Path | None = None, overwrite: bool = False, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> Path:
    """`memloc run --task lm`: train a language model with canaries into one run directory, run the
    memorization probe and the paper's probes on it, and write its report. With `resume` (the run directory),
    finish what an interrupted call left: training resumes from its checkpoint, finished probes are kept."""
    log = log or (lambda s: None)
    path = RunDir.open(resume).path if resume is not None else out
    with exclusive(path) if path is not None else contextlib.nullcontext():  # its run is its own between stages
        return _lm_study(cfg, out, study, resume, overwrite, progress, log)


_LM_COUNTS = ("rewind_every", "retrain_epochs", "flip_examples", "flip_others")  # lm_study.json's settings


def _read_lm_study(run: RunDir) -> dict:
    """lm_study.json, its settings checked (a damaged one is one line naming it)."""
    study = run.read_json("lm_study.json")
    path = run.path / "lm_study.json"

    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)
    bad = next((k for k in _LM_COUNTS if k in study and not (whole(study[k]) and study[k] >= 1)), None)
    if bad is None and "retrain_lr" in study:
        lr = study["retrain_lr"]
        bad = None if isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr < float("inf") \
            else "retrain_lr"
    idx = study.get("flip_indices")
    if bad is None and idx is not None and not (isinstance(idx, list)
                                                and all(whole(i) and 0 <= i < 2 ** 63 for i in idx)):
        bad = "flip_indices"
    if bad is not None:
        raise RunError(f"{path} is damaged: its {bad} is {str(study[bad])[:60]!r}, not "
                       + ("a list of sequence indices" if bad == "flip_indices" else "a positive number")
                       + ": delete the key to let the study choose again, or start the study again")
    return study


def _lm_study(cfg: RunConfig | None, out: str | Path | None, study: dict | None, resume: str | Path | None,
              overwrite: bool, progress: bool, log: Callable[[str], None]) -> Path:
    if resume is not None:
        run = RunDir.open(resume)
        if not run.has("lm_study.json"):
            raise RunError(f"{run.path} is not a language-model study: resume a run with `memloc train --resume`")
        study = _read_lm_study(run)
        if run.stage("train").get("status") != "done":
            resume_training(run.path, progress=progress, log=log)
    else:
        if cfg is None or cfg.task != "lm":
            raise ConfigError("run_lm_study takes a RunConfig with task 'lm'")
        study = dict(study or {})
        run = run_training(cfg, out, overwrite=overwrite, progress=progress, log=log)
        run.write_json("lm_study.json", study)
    loaded = open_run(run.path)
    sinks = bool(loaded.config.model.example_tied)
    for stage in LM_STAGES:
        if run.stage(stage).get("status") == "done" or (stage == "dropout" and not sinks):
            continue
        if stage == "flipping" and "flip_indices" not in study:
            study["flip_indices"] = _memorized_canaries(loaded, study.get("flip_examples", 40))
            run.write_json("lm_study.json", study)  # a resumed study searches the same sequences
            if not study["flip_indices"]:
                log("stage flipping skipped: the model extracts no canary in its training context")
                continue
        log(f"stage {stage} ...")
        t0 = time.perf_counter()
        probe = probes.registered()[stage]
        result = probes.run_probe(probe, loaded, cfg=_lm_probe_config(stage, study), progress=progress, log=log)
        for line in probe.describe(result) if probe.describe else []:
            log(line)
        log(f"stage {stage} done in {time.perf_counter() - t0:.0f}s")
    from ..report.page import build_report
    build_report(run.path)
    return run.path
