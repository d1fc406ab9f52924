"""The whole study in one call: train, probe, example-tied dropout, detection, report.

A study directory holds `study.json` (the resolved settings and the status of
every stage), one run directory per trained model (`base/` for the plain model
with its probes, `dropout/` for the example-tied dropout model; with several
seeds or noise levels `base-s1-n0.2/` and so on), and `report/`. Every stage
writes its results before it is marked done, and every stage can resume its own
partial work, so `memloc run --resume STUDY` after an interrupt finishes
without redoing what was complete.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .data import DataConfig
from .errors import ConfigError, RunError
from .experiment import ModelConfig, RunConfig, run_training, resume_training
from .runs import LOCK_NAME, RunDir, exclusive, mark_failed, memloc_kind, write_json
from .training import TrainConfig, resolve_device

STUDY_FORMAT = 1
STAGES = ("train", "rewinding", "retraining", "flipping", "dropout_train", "dropout_eval", "detection")


@dataclass
class StudyConfig:
    """What a study runs. `base` is the plain model's run config; the rest sets the probes."""

    base: RunConfig = field(default_factory=RunConfig)
    preset: str = "default"
    seeds: tuple[int, ...] = (0,)
    noise_levels: tuple[float, ...] = (0.1,)
    example_tied_dropout: tuple[float, float] = (0.4, 0.1)
    dropout_epochs: int | None = None  # None: the base run's epochs
    dropout_width: float | None = None  # None: the base model's width
    rewind_every: int = 1
    retrain_epochs: int = 20
    flip_examples: int = 200
    flip_others: int = 512
    flip_eval_subsample: int | None = None
    detection: bool = True
    grid: bool = False

    def __post_init__(self) -> None:
        self.seeds = tuple(int(s) for s in self.seeds)
        self.noise_levels = tuple(float(n) for n in self.noise_levels)
        if not self.seeds or not self.noise_levels:
            raise ConfigError("a study needs at least one seed and one noise level")
        for n in self.noise_levels:
            if not (0.0 < n < 1.0):
                raise ConfigError(f"noise level {n} is outside (0, 1): the study measures memorized noisy labels")
        p_gen, p_mem = self.example_tied_dropout
        for name, v in (("p_gen", p_gen), ("p_mem", p_mem)):
            if not (0.0 < v <= 1.0):
                raise ConfigError(f"{name} = {v} is outside (0, 1]: pass e.g. --example-tied-dropout 0.4,0.1")
        if self.flip_examples < 1 or self.retrain_epochs < 1 or self.rewind_every < 1:
            raise ConfigError("flip examples, retraining epochs and the rewinding step must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StudyConfig":
        try:
            d = dict(d)
            base = RunConfig.from_dict(d.pop("base"), source="study.json (base)")
            d["example_tied_dropout"] = tuple(d["example_tied_dropout"])
            return cls(base=base, **d)
        except (TypeError, ValueError, KeyError, ConfigError) as err:
            raise RunError(f"study.json is damaged: it is not a memloc study config ({err})") from None

    def cells(self) -> list[tuple[int, float]]:
        return [(s, n) for s in self.seeds for n in self.noise_levels]


# Study presets: smoke (about 2 minutes on 2 CPU cores, what the end-to-end tests run),
# default (the documented CPU default, or the paper's ResNet-9 on a GPU), paper.
STUDY_PRESETS: dict[str, dict] = {
    "smoke": {"base": {"data": {"dataset": "mnist5k", "train_size": 1000},
                       "model": {"name": "cnn", "width": 0.5}, "train": {"epochs": 6, "batch_size": 128}},
              "example_tied_dropout": (0.5, 0.2), "retrain_epochs": 2, "flip_examples": 8, "flip_others": 64,
              "flip_eval_subsample": 500},
    "default": {"retrain_epochs": 10, "flip_examples": 100, "flip_others": 256, "flip_eval_subsample": 2000,
                "rewind_every": 2},
    "paper": {"base": {"model": {"name": "resnet9", "width": 1.0}, "train": {"epochs": 50, "lr": 0.1}},
              "example_tied_dropout": (0.3, 0.1), "retrain_epochs": 20, "flip_examples": 1000, "flip_others": 512},
}


def study_config(preset: str = "default", *, base_overrides: dict | None = None, **overrides) -> StudyConfig:
    """Preset < overrides. `base_overrides` is {"data": {...}, "model": {...}, "train": {...}} of flags given."""
    if preset not in STUDY_PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(STUDY_PRESETS)}")
    p = copy.deepcopy(STUDY_PRESETS[preset])
    sections = p.pop("base", {})
    for sec, vals in (base_overrides or {}).items():
        sections.setdefault(sec, {}).update(vals)
    base = RunConfig(data=DataConfig(**sections.get("data", {})), model=ModelConfig(**sections.get("model", {})),
                     train=TrainConfig(**sections.get("train", {})))
    p.update({k: v for k, v in overrides.items() if v is not None})
    return StudyConfig(base=base, preset=preset, **p)


class Study:
    """A study directory on disk."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, path: Path, cfg: StudyConfig) -> "Study":
        """A new study directory; the caller holds its lock."""
        path = Path(path)
        if path.exists() and any(p.name != LOCK_NAME for p in path.iterdir()):
            raise RunError(f"{path} already exists: choose another --out, or continue it with `memloc run --resume {path}`")
        path.mkdir(parents=True, exist_ok=True)
        from ._version import __version__
        study = cls(path)
        write_json(path / "study.json", {"format_version": STUDY_FORMAT, "kind": "study", "memloc_version": __version__,
                                         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": cfg.to_dict(),
                                         "stages": {}})
        return study

    @classmethod
    def open(cls, path: Path) -> "Study":
        path = Path(path)
        meta = path / "study.json"
        if not meta.exists():
            raise RunError(f"{path} is not a memloc study (no study.json): pass a folder made by `memloc run`")
        study = cls(path)
        info = study.info
        if info.get("format_version") != STUDY_FORMAT or info.get("kind") != "study":
            raise RunError(f"{path} has study format version {info.get('format_version')}, this memloc reads "
                           f"version {STUDY_FORMAT}: use the memloc version that wrote it")
        return study

    @property
    def info(self) -> dict:
        meta = self.path / "study.json"
        try:
            info = json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunError(f"{meta} is corrupt: it is not valid JSON") from None
        if not isinstance(info, dict) or not isinstance(info.get("stages"), dict) \
                or not isinstance(info.get("config"), dict):
            raise RunError(f"{meta} is damaged: it is not a memloc study record (stages and config)")
        return info

    @property
    def config(self) -> StudyConfig:
        try:
            return StudyConfig.from_dict(self.info["config"])
        except RunError as err:
            raise RunError(f"{self.path}: {err}") from None

    def status(self, key: str) -> str | None:
        return self.info["stages"].get(key, {}).get("status")

    def mark(self, key: str, status: str, *, keep: bool = False, **details) -> None:
        info = self.info
        old = info["stages"].get(key) if keep else None
        old = {k: v for k, v in old.items() if k != "reason"} if isinstance(old, dict) else {}
        info["stages"][key] = {**old, "status": status, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **details}
        write_json(self.path / "study.json", info)

    def finished(self) -> bool:
        return self.info.get("finished", False)

    def cell_dirs(self, seed: int, noise: float) -> tuple[Path, Path]:
        cfg = self.config
        if len(cfg.cells()) == 1:
            return self.path / "base", self.path / "dropout"
        tag = f"s{seed}-n{noise:g}"
        return self.path / f"base-{tag}", self.path / f"dropout-{tag}"


def _cell_configs(cfg: StudyConfig, seed: int, noise: float, device) -> tuple[RunConfig, RunConfig]:
    base = copy.deepcopy(cfg.base)
    base.data.seed = seed
    base.data.noise = noise
    base.train.seed = seed
    base.model = base.model.resolved(device)
    drop = copy.deepcopy(base)
    drop.model.example_tied_dropout = tuple(cfg.example_tied_dropout)
    if cfg.dropout_width is not None:
        drop.model.width = cfg.dropout_width
    if cfg.dropout_epochs is not None:
        drop.train.epochs = cfg.dropout_epochs
    drop.train.gradient_accounting = False
    return base, drop


def _train(run_cfg: RunConfig, out: Path, progress: bool, log) -> None:
    if memloc_kind(out) == "run":
        run = RunDir.open(out)
        if run.stage("train").get("status") != "done":
            # a run killed before its first checkpoint (even before its config) starts again from the study's config
            resume_training(out, progress=progress, log=log, config=run_cfg)
        return
    run_training(run_cfg, out, overwrite=out.exists(), progress=progress, log=log)


def _stage_fns(cfg: StudyConfig, base_dir: Path, drop_dir: Path, base_cfg: RunConfig, drop_cfg: RunConfig,
               progress: bool, log) -> dict[str, Callable[[], None]]:
    from .experiment import open_run

    def rewinding():
        from .probes.rewinding import rewind
        rewind(open_run(base_dir), every=cfg.rewind_every, progress=progress)

    def retraining():
        from .probes.retraining import RetrainConfig, retrain
        rc = RetrainConfig(epochs=cfg.retrain_epochs, peak_epoch=max(1, cfg.retrain_epochs // 2),
                           batch_size=base_cfg.train.batch_size, seed=base_cfg.train.seed)
        retrain(open_run(base_dir), rc, progress=progress)

    def flipping():
        from .probes.flipping import FlipConfig, flip
        fc = FlipConfig(examples=cfg.flip_examples, kinds=("clean", "noisy"), others=cfg.flip_others,
                        eval_subsample=cfg.flip_eval_subsample, seed=base_cfg.train.seed)
        flip(base_dir, fc, progress=progress, log=log)

    def dropout_eval():
        from .probes.dropout_eval import evaluate_dropout
        evaluate_dropout(open_run(drop_dir), save=True)

    def detection():
        from .detection import DetectConfig, detect
        detect(base_dir, DetectConfig(), progress=progress, log=log)

    return {"train": lambda: _train(base_cfg, base_dir, progress, log), "rewinding": rewinding,
            "retraining": retraining, "flipping": flipping,
            "dropout_train": lambda: _train(drop_cfg, drop_dir, progress, log), "dropout_eval": dropout_eval,
            "detection": detection}


def expected_stages(cfg: dict) -> list[str]:
    """The stage keys a study with this config (as in study.json) runs, in order; the report last."""
    stages = [s for s in STAGES if s != "detection" or cfg.get("detection", True)]
    cells = [(s, n) for s in cfg["seeds"] for n in cfg["noise_levels"]]
    keys = [st if len(cells) == 1 else f"s{s}-n{n:g}/{st}" for s, n in cells for st in stages]
    return keys + (["grid"] if cfg.get("grid") else [])


def run_study(cfg: StudyConfig | None = None, out: str | Path | None = None, *, resume: str | Path | None = None,
              progress: bool = True, log: Callable[[str], None] | None = None) -> Path:
    """Run (or, with `resume`, finish) a study; returns the study directory."""
    log = log or (lambda s: None)
    if resume is not None:
        study = Study.open(Path(resume))
        with exclusive(study.path):
            if study.finished():
                raise RunError(f"{study.path} is finished: nothing to resume (rebuild its report with "
                               f"`memloc report {study.path}`)")
            return _run_stages(study, study.config, progress, log)
    cfg = cfg or study_config()
    name = Path(cfg.base.data.dataset).stem if "/" in cfg.base.data.dataset else cfg.base.data.dataset
    out = Path(out) if out else Path("runs") / f"study-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    device = resolve_device(cfg.base.train.device)
    for seed, noise in cfg.cells():  # validate every run config before anything is written
        _cell_configs(cfg, seed, noise, device)
    with exclusive(out):  # one writer per study for its whole life
        return _run_stages(Study.create(out, cfg), cfg, progress, log)


def _run_stages(study: Study, cfg: StudyConfig, progress: bool, log: Callable[[str], None]) -> Path:
    """Every stage not yet done, in order, then the report; a stage that raises is recorded as failed."""
    device = resolve_device(cfg.base.train.device)
    stages = [s for s in STAGES if s != "detection" or cfg.detection]
    work = [(seed, noise, s) for seed, noise in cfg.cells() for s in stages]
    assert len(work) + int(cfg.grid) == len(expected_stages(cfg.to_dict()))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(work) + 1 + int(cfg.grid), desc="study", unit="stage", position=0, dynamic_ncols=True)
    try:
        for seed, noise, stage in work:
            key = stage if len(cfg.cells()) == 1 else f"s{seed}-n{noise:g}/{stage}"
            if study.status(key) != "done":
                if bar is not None:
                    bar.set_postfix_str(key)
                base_dir, drop_dir = study.cell_dirs(seed, noise)
                base_cfg, drop_cfg = _cell_configs(cfg, seed, noise, device)
                t0 = time.perf_counter()
                study.mark(key, "running")
                log(f"stage {key} ...")
                try:
                    _stage_fns(cfg, base_dir, drop_dir, base_cfg, drop_cfg, progress, log)[stage]()
                except BaseException as err:
                    mark_failed(study.mark, key, err)
                    raise
                study.mark(key, "done", seconds=round(time.perf_counter() - t0, 2))
                log(f"stage {key} done in {time.perf_counter() - t0:.0f}s")
            if bar is not None:
                bar.update(1)
        if cfg.grid and study.status("grid") != "done":
            from .grid import dropout_grid
            base_cfg, _ = _cell_configs(cfg, cfg.seeds[0], cfg.noise_levels[0], device)
            study.mark("grid", "running")
            try:
                dropout_grid(base_cfg, study.path / "grid", progress=progress, log=log)
            except BaseException as err:
                mark_failed(study.mark, "grid", err)
                raise
            study.mark("grid", "done")
            if bar is not None:
                bar.update(1)
        from .report import build_report
        build_report(study.path)
        study.mark("report", "done")
        info = study.info
        info["finished"] = True
        write_json(study.path / "study.json", info)
        if bar is not None:
            bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return study.path
