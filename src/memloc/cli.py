"""The `memloc` command: a thin argparse shell; each subcommand calls one library function.

Every flag comes from a config dataclass field (`memloc.core.options.option`): its
name, default and help live there once. The probes' subcommands are made from
the probe registry, so a new probe gets its command without an edit here.
Bad input of any kind ends with one line `memloc: error: ...` and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .core.errors import ConfigError, MemlocError
from .core.flags import FlagParser, add_config_flags, as_typed, floats_arg, given, ints_arg, names_arg, pairs_arg

_SECTIONS = ("data", "model", "train")
# the run-config fields `memloc run` sets per cell itself (--noise levels, --seeds, the dropout model's fractions)
_STUDY_SETS = {"data": ("noise", "seed"), "model": ("p_gen", "p_mem"), "train": ("seed",)}


# ----------------------------------------------------------------------------- configs from flags

def _configs(task: str) -> tuple[type, type, type]:
    """The data, model and training config classes of a task."""
    from .core.training import TrainConfig
    from .tasks.experiment import TASK_DATA, ModelConfig
    return TASK_DATA[task](), ModelConfig, TrainConfig


def _task_given(args: argparse.Namespace, task: str) -> None:
    """Refuse the other task's data flags (e.g. --noise with --task lm) in one line."""
    from .tasks.classification.data import DataConfig
    from .tasks.lm.text import TextConfig
    other, mine = (TextConfig, DataConfig) if task == "classification" else (DataConfig, TextConfig)
    own = {f.name for f in dataclasses.fields(mine)}
    stray = sorted(set(given(args, other)) - own)
    if stray:
        flag = "--" + stray[0].replace("_", "-")
        raise ConfigError(f"{flag} is a setting of {'--task lm' if other is TextConfig else 'image data'}, not of "
                          f"--task {task}: drop it{' or pass --task lm' if other is TextConfig else ''}")


def run_config(args: argparse.Namespace):
    """Dataclass defaults < preset < explicit flags -> a validated RunConfig."""
    from .tasks.experiment import RunConfig, preset
    task = getattr(args, "task", None) or "classification"
    _task_given(args, task)
    sections = {sec: dict(vals) for sec, vals in preset(args.preset or "default", task).items() if sec in _SECTIONS}
    classes = _configs(task)
    for sec, cls in zip(_SECTIONS, classes):
        typed = given(args, cls)
        sections.setdefault(sec, {}).update(typed)
        sections[sec].update(_typed(cls, typed))  # a preset's counts are defaults: they fit the data
    if args.command == "train":
        _epochs_default(sections, args)
    return RunConfig(data=classes[0](**sections["data"]), model=classes[1](**sections["model"]),
                     train=classes[2](**sections["train"]), task=task)


def _typed(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """{"given": the typed fields} for a config whose counts fit the data (`options.fitted`), else nothing."""
    return {"given": tuple(sorted(values))} if any(f.name == "given" for f in dataclasses.fields(cls)) else {}


def _epochs_default(sections: dict[str, dict], args: argparse.Namespace) -> None:
    """`memloc train` and `memloc run` on the user's own data train until memorized (--epochs auto) unless --epochs
    or the preset says how long; --max-epochs and --settle-epochs are refused where the epochs are fixed."""
    from .tasks.classification.data import users_data
    train = sections.setdefault("train", {})
    dataset = sections.get("data", {}).get("dataset")
    if "epochs" not in train and (getattr(args, "task", None) or "classification") == "classification" \
            and dataset is not None and users_data(dataset):
        train["epochs"] = "auto"
    fixed = train.get("epochs", 40) != "auto"
    for name in ("max_epochs", "settle_epochs"):
        if fixed and getattr(args, name, None) is not None:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} is for --epochs auto, and this run trains {train.get('epochs', 40)} epochs: "
                              f"drop {flag}, or pass --epochs auto")


def _log(args) -> Callable[[str], None]:
    return lambda s: print(s, flush=True)


def _progress(args) -> bool:
    """Progress bars only for a person at a terminal: with --quiet, or output going to a file or a pipe (CI logs,
    nohup, SLURM), the plain lines alone (one per stage and epoch), without the bars' cursor codes."""
    return not args.quiet and sys.stdout.isatty() and sys.stderr.isatty()


def _preset_set(section: str) -> frozenset[str]:
    """The fields of `section` some preset sets."""
    from .tasks.experiment import PRESETS
    from .tasks.lm.models import LM_PRESETS
    return frozenset(k for table in (PRESETS, LM_PRESETS) for p in table.values() for k in p.get(section, {}))


def _run_flags(p: argparse.ArgumentParser, *, exclude: dict[str, tuple[str, ...]] | None = None) -> None:
    from .core.training import TrainConfig
    from .tasks.classification.data import DataConfig
    from .tasks.experiment import ModelConfig
    from .tasks.lm.text import TextConfig
    exclude = exclude or {}
    p.add_argument("--task", choices=("classification", "lm"),
                   help="classification with label noise (default), or lm: a causal language model on text with "
                        "canaries")
    for sec, cls in zip(_SECTIONS, (DataConfig, ModelConfig, TrainConfig)):
        add_config_flags(p, cls, exclude=exclude.get(sec, ()), title="training" if sec == "train" else sec,
                         preset_set=_preset_set(sec))
    add_config_flags(p, TextConfig, exclude=exclude.get("data", ()), title="text (--task lm)",
                     preset_set=_preset_set("data"))


# ----------------------------------------------------------------------------- commands

def cmd_train(args) -> int:
    from .core.budget import forced
    from .tasks.experiment import resume_training, run_training
    with forced(args.force):
        if args.resume:
            _refuse_changes(args, run=True)
            run = resume_training(args.resume, progress=_progress(args), log=_log(args))
        else:
            run = run_training(run_config(args), args.out, overwrite=args.overwrite, progress=_progress(args),
                               log=_log(args))
    from .core.distributed import is_main
    if not is_main():  # under torchrun: one voice, rank 0's
        return 0
    from .study.run import memorization_warning
    metrics = run.read_metrics()
    tied = bool((run.config.get("model") or {}).get("p_gen"))  # its epoch accuracies are eval mode: not a measure
    warning = None if tied else memorization_warning(metrics[-1].get("noisy_train_acc") if metrics else None)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    print(f"done: {run.path}")
    return 0


def cmd_run(args) -> int:
    from .core.budget import forced
    with forced(args.force):  # every training run of the study
        return _study(args)


def _study(args) -> int:
    from .study.run import StudyConfig, run_study
    if args.resume:
        _refuse_changes(args)
    if args.task == "lm" or (args.resume and (Path(args.resume) / "lm_study.json").exists()):
        from .study.run import run_lm_study
        from .tasks.experiment import preset
        if args.resume:
            path = run_lm_study(resume=args.resume, progress=_progress(args), log=_log(args))
        else:
            study = dict(preset(args.preset or "default", "lm").get("study", {}))
            chosen = given(args, StudyConfig)
            study.update({k: v for k, v in chosen.items() if k == "flip_examples"})
            stray = sorted(set(chosen) - {"flip_examples", "p_gen", "p_mem"}) + (["seed"] if args.seed is not None
                                                                                 else [])
            if stray:
                raise ConfigError(f"--{stray[0].replace('_', '-')} is not built for --task lm yet (one seed, no "
                                  "noise levels or dropout grid): drop it")
            if args.shard is not None or args.executor != "local":
                raise ConfigError("a language-model study is one model: it does not split into shards (shard its "
                                  "probes: `memloc flip RUN --shard I/N`; train it on several GPUs with torchrun)")
            cfg = run_config(args)
            if "p_gen" in chosen:  # the study's model with memorization sinks, evaluated before and after the drop
                cfg.model.p_gen, cfg.model.p_mem = chosen["p_gen"], chosen["p_mem"]
            path = run_lm_study(cfg, args.out, study=study, overwrite=args.overwrite, progress=_progress(args),
                                log=_log(args))
        print(f"done: {path} (report: {path / 'report' / 'report.html'})")
        return 0
    if args.resume:
        if args.shard is not None or args.executor != "local":
            raise ConfigError("--resume finishes a study in one process; a study in shards continues with the same "
                              "command that started it (finished cells are kept): drop --resume")
        path = run_study(resume=args.resume, progress=_progress(args), log=_log(args))
    else:
        cfg = study_settings(args)
        if args.shard is None and not args.force:  # a model that cannot fit: refused before the study is written
            from .tasks.experiment import check_training
            check_training(cfg.base)
        from .study.run import check_study, merge_study
        started = time.perf_counter()
        scaled, path = _scale_out(args, "study shards", lambda: check_study(cfg, args.out, overwrite=args.overwrite),
                                  lambda: merge_study(args.out, progress=_progress(args), log=_log(args)))
        if not scaled:
            path = run_study(cfg, args.out, overwrite=args.overwrite, shard=args.shard, progress=_progress(args),
                             log=_log(args))
            if args.shard is not None:
                return _shard_done(args, "the study", started, path)
    print(f"done: {path} (report: {path / 'report' / 'report.html'})")
    return 0


def study_settings(args: argparse.Namespace):
    """The StudyConfig of `memloc run`'s flags: preset < flags, --seed as --seeds, and --epochs auto on the
    user's own data where neither --epochs nor the preset fixes the epochs."""
    from .core.training import TrainConfig
    from .study.run import StudyConfig, study_config
    from .tasks.classification.data import DataConfig
    from .tasks.experiment import ModelConfig, preset
    sections = {sec: given(args, cls, exclude=_STUDY_SETS.get(sec, ()))
                for sec, cls in zip(_SECTIONS, (DataConfig, ModelConfig, TrainConfig))}
    study = given(args, StudyConfig)
    if args.seed is not None:  # --seed N is --seeds N
        if "seeds" in study:
            raise ConfigError("pass --seeds or --seed, not both")
        study["seeds"] = (args.seed,)
    chosen = preset(args.preset or "default")
    whole = {sec: {**chosen.get(sec, {}), **sections[sec]} for sec in ("data", "train")}
    _epochs_default(whole, args)
    if whole["train"].get("epochs") == "auto":
        sections["train"]["epochs"] = "auto"
    return study_config(args.preset or "default", base_overrides=sections, **study)


def _refuse_changes(args, *, run: bool = False) -> None:
    """`--resume` continues a study (or with `run`, a training run) with the settings it was started with: a flag
    that would change them is refused (one line), never silently ignored. A run may resume on another device."""
    from .core.training import TrainConfig
    from .study.run import StudyConfig
    from .tasks.classification.data import DataConfig
    from .tasks.experiment import ModelConfig
    from .tasks.lm.text import TextConfig
    changed = []
    for cls in (DataConfig, ModelConfig, TrainConfig, TextConfig, StudyConfig):
        meta = {f.name: f.metadata for f in dataclasses.fields(cls)}
        changed += [meta[n].get("flag") or "--" + n.replace("_", "-") for n in given(args, cls)
                    if not (run and meta[n].get("result") is False)]
    changed += ["--" + name for name in ("preset", "task", "seed", "out") if getattr(args, name, None) is not None]
    changed += ["--overwrite"] if args.overwrite else []
    if changed:
        flag = changed[0]
        what = "run" if run else "study"
        raise ConfigError(f"--resume finishes the {what} {args.resume} with the settings it was started with, and "
                          f"{flag} would change them: drop {flag}, or start again with new settings (--out NEW, or "
                          f"--out {args.resume} --overwrite)")


def _classifier_flags(args) -> list[str]:
    """The flags of a classifier's audit (its data and model) that were given, as typed."""
    from .tasks.classification.data import DataConfig
    from .tasks.experiment import ModelConfig
    return [f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            for cls in (DataConfig, ModelConfig) for f in dataclasses.fields(cls) if f.name in given(args, cls)]


def _classifier_audit(args, cfg) -> "Path":
    """`memloc audit --weights FILE --dataset DATA ...`: the classifier's run config from the data and model flags
    (its labels as given: no noise is added unless --noise says the model trained on memloc's seeded noise)."""
    from .audit.classifier import run_classifier_audit
    from .core.budget import forced
    from .core.training import TrainConfig
    from .tasks.classification.data import DataConfig
    from .tasks.experiment import ModelConfig, RunConfig
    if args.model:
        raise ConfigError(f"--weights audits a classifier, MODEL {args.model} a language model: pass one of them")
    lm = [f for f in ("sequences", "heldout", "tokenizer", "reference") if getattr(args, f, None)]
    if lm:
        raise ConfigError(f"--{lm[0]} is for a language model's audit, not a classifier's (--weights): drop it")
    data = given(args, DataConfig)
    if "dataset" not in data:
        raise ConfigError("a classifier's audit needs --dataset: the data the model trained on (a .npz, a folder "
                          "of class folders, or a dataset name), with --labels FILE if it trained on other labels")
    data.setdefault("noise", 0.0)
    run_cfg = RunConfig(data=DataConfig(**data), model=ModelConfig(**given(args, ModelConfig)),
                        train=TrainConfig(device=cfg.device, precision=cfg.precision), task="classification")
    with forced(args.force):
        return run_classifier_audit(cfg, run_cfg, args.out, overwrite=args.overwrite, progress=_progress(args),
                                    log=_log(args))


def cmd_audit(args) -> int:
    from .audit.lm import AuditConfig, resumed_config, run_audit
    if args.resume:
        flags = {f.name: f.metadata.get("flag") or "--" + f.name.replace("_", "-")
                 for f in dataclasses.fields(AuditConfig)}
        changed = [flags[n] for n in given(args, AuditConfig) if AuditConfig.__dataclass_fields__[n].metadata.get(
            "result") is not False]
        changed += ["MODEL"] if args.model else []
        changed += [f"--{n}" for n in ("out", "overwrite") if getattr(args, n)]
        if changed:
            raise ConfigError(f"--resume finishes the audit {args.resume} with the settings it was started with, and "
                              f"{changed[0]} would change them: drop {changed[0]}, or start again (--out NEW)")
        changed = _classifier_flags(args)
        if changed:
            raise ConfigError(f"--resume finishes the audit {args.resume} with the settings it was started with, and "
                              f"{changed[0]} would change them: drop {changed[0]}, or start again (--out NEW)")
        cfg = resumed_config(args.resume, **given(args, AuditConfig))
        if cfg.weights:
            from .audit.classifier import run_classifier_audit
            path = run_classifier_audit(cfg, None, args.resume, resume=True, progress=_progress(args), log=_log(args))
        else:
            path = run_audit(cfg, args.resume, resume=True, progress=_progress(args), log=_log(args))
    elif args.weights:
        path = _classifier_audit(args, AuditConfig(**given(args, AuditConfig)))
    else:
        if _classifier_flags(args):
            raise ConfigError(f"{_classifier_flags(args)[0]} is for a classifier's audit: pass its weights with "
                              "--weights FILE.safetensors (a language model's audit reads MODEL and --sequences)")
        if not args.model:
            raise ConfigError("memloc audit needs the model to audit: memloc audit hf:FOLDER --sequences FILE (or "
                              "--resume RUN to finish an audit)")
        cfg = AuditConfig(model=args.model, **given(args, AuditConfig))
        from .core.budget import forced
        with forced(args.force):
            path = run_audit(cfg, args.out, overwrite=args.overwrite, progress=_progress(args), log=_log(args))
    print(f"done: {path} (report: {path / 'report' / 'report.html'})")
    return 0


def cmd_report(args) -> int:
    from .report.page import build_report
    path = build_report(args.path)
    if not args.quiet:
        print(f"report: {path}")
    return 0


def cmd_datasets(args) -> int:
    from .tasks.classification.data import BUILTIN_DATASETS
    from .tasks.classification.readers import STANDARD_DATASETS
    for name, desc in BUILTIN_DATASETS.items():
        print(f"{name:14s} {desc}")
    for name, spec in STANDARD_DATASETS.items():
        print(f"{name:14s} {spec[2]} (needs --data-root DIR or --download)")
    print(f"{'FILE.npz':14s} your own arrays x and y (and x_test, y_test): x images (N,H,W[,C] or N,C,H,W), "
          "sequences (N,C,L) or features (N,F) (docs/your-data.md)")
    print(f"{'FOLDER/':14s} your own images, one sub-folder per class")
    return 0


def cmd_models(args) -> int:
    from .tasks.classification.models import CPU_DEFAULT_MODEL, GPU_DEFAULT_MODEL, MODELS
    for name, spec in MODELS.items():
        print(f"{name:10s} {spec.description}")
        print(f"{'':10s} takes {spec.shapes}")
    print(f"{'torchvision:NAME':10s} a torchvision classification model (torchvision.models.list_models(), e.g. "
          "torchvision:resnet18), random initialization: for auditing one you trained (memloc audit --weights)")
    print(f"{'':10s} takes 3-channel images (3, H, W); no --width, no example-tied dropout")
    print(f"defaults (no --model), by the input shape: images {CPU_DEFAULT_MODEL[0]} at width {CPU_DEFAULT_MODEL[1]:g} "
          f"on CPU, {GPU_DEFAULT_MODEL[0]} at width {GPU_DEFAULT_MODEL[1]:g} on GPU, where it fits (at least 11x11), "
          "else cnn; sequences (C, L) cnn1d; features (F,) mlp")
    return 0


def _finish_probe(probe, args, started: float, result) -> int:
    for line in probe.describe(result) if probe.describe else []:
        print(line)
    print(f"done: {Path(args.run) / 'probes' / probe.name} ({time.perf_counter() - started:.1f}s)")
    return 0


def _scale_out(args, label: str, check: Callable[[], None], merge: Callable[[], Any]) -> tuple[bool, Any]:
    """--executor processes or ray: check the input here (one line before any worker starts), run every shard on
    the workers, then merge -> (True, what `merge` returns); (False, None) with --executor local."""
    executor = getattr(args, "executor", None) or "local"
    ray_flags = [f for f, v in (("--address", getattr(args, "address", None)),
                                ("--gpus-per-task", getattr(args, "gpus_per_task", None))) if v is not None]
    if executor == "local":
        stray = [f for f, v in (("--devices", getattr(args, "devices", None)),
                                ("--shards", getattr(args, "shards", None))) if v is not None] + ray_flags
        if stray:
            raise ConfigError(f"{stray[0]} is for --executor processes or ray: add one, or drop it")
        return False, None
    from .core.scale import parse_devices, run_processes, run_ray, worker_argv
    if args.shard is not None:
        raise ConfigError(f"--executor {executor} runs every shard itself: drop --shard")
    log = _log(args)
    if executor == "processes":
        if ray_flags:
            raise ConfigError(f"{ray_flags[0]} is for --executor ray: drop it")
        if not args.devices:
            raise ConfigError("--executor processes needs --devices, e.g. --devices cpu,cpu or --devices 0,1")
        devices = parse_devices(args.devices)
        check()
        n = run_processes(worker_argv(args.argv), devices, args.shards, label=label, progress=_progress(args), log=log)
        log(f"{n} shards on {len(devices)} workers ({', '.join(devices)}): merging")
    else:
        if args.devices:
            raise ConfigError("--devices is for --executor processes; Ray places the shards itself (--gpus-per-task)")
        check()
        n = run_ray(ray_shard, worker_argv(args.argv), args.shards, address=args.address,
                    gpus_per_task=args.gpus_per_task, label=label, progress=_progress(args), log=log)
        log(f"{n} Ray tasks finished: merging")
    return True, merge()


def ray_shard(argv: list[str]) -> tuple[int, str]:
    """One shard in a Ray worker (`--executor ray`): `memloc <argv>` in that process -> (exit code, its last line
    on stderr)."""
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(argv))
    lines = [l for l in err.getvalue().splitlines() if l.strip()]
    return code, (lines[-1] if lines else f"exit {code}")


def _shard_done(args, what: str, started: float, where) -> int:
    i, n = args.shard
    print(f"done: shard {i}/{n} of {what} ({time.perf_counter() - started:.1f}s); when all {n} are done: "
          f"memloc merge {where}")
    return 0


def cmd_probe(args) -> int:
    """Any registered probe on a run directory: its config from its flags, the engine does the rest."""
    from .probes import registered, run_probe
    from .probes.engine import merge_shards
    probe = registered()[args.probe]
    typed = given(args, probe.config)
    cfg = probe.config(**typed, **_typed(probe.config, typed))
    started = time.perf_counter()
    overwrite = getattr(args, "overwrite", False) or False
    scaled, results = _scale_out(
        args, f"{probe.name} shards",
        lambda: run_probe(probe, args.run, cfg=cfg, check_only=True, shard=(0, 1)),
        lambda: merge_shards(args.run, [probe.name], overwrite=overwrite, progress=_progress(args), log=_log(args)))
    if scaled:
        return _finish_probe(probe, args, started, results[0])
    shard = getattr(args, "shard", None)
    result = run_probe(probe, args.run, cfg=cfg, overwrite=overwrite, progress=_progress(args), log=_log(args),
                       shard=shard)
    if result is None:
        return _shard_done(args, probe.name, started, args.run)
    return _finish_probe(probe, args, started, result)


def cmd_merge(args) -> int:
    from .core.files import memloc_kind
    started = time.perf_counter()
    kind = memloc_kind(args.run)
    if kind is None:
        raise ConfigError(f"{args.run} is not a memloc run, study or dropout grid: pass the folder whose work ran in "
                          "shards (--shard I/N)")
    if kind in ("study", "dropout-grid"):
        if args.probe:
            raise ConfigError(f"--probe names a probe of a run; {args.run} is a {kind.replace('-', ' ')}: drop it")
        if kind == "study":
            from .study.run import merge_study
            path = merge_study(args.run, progress=_progress(args), log=_log(args))
            print(f"done: {path} (report: {path / 'report' / 'report.html'})")
            return 0
        from .study.grid import merge_grid
        return _grid_done(args.run, merge_grid(args.run, log=_log(args)))
    from .probes import registered
    from .probes.engine import merge_shards
    for result in merge_shards(args.run, [args.probe] if args.probe else None, overwrite=args.overwrite,
                               progress=_progress(args), log=_log(args)):
        _finish_probe(registered()[result.probe], args, started, result)
    return 0


def cmd_evaluate(args) -> int:
    from .probes import DropoutConfig, registered, run_probe
    if args.drop_memorization:
        probe = registered()["dropout"]
        started = time.perf_counter()
        result = run_probe(probe, args.run, cfg=DropoutConfig(**given(args, DropoutConfig)),
                           log=None if args.quiet else _log(args))
        return _finish_probe(probe, args, started, result)
    from .core.precision import arithmetic
    from .core.training import evaluate
    from .tasks.experiment import open_run
    loaded = open_run(args.run, device=args.device or "auto")
    model = loaded.model(args.epoch)
    with arithmetic(loaded.arithmetic(model)):
        acc = evaluate(model, loaded.data)
    print(" ".join(f"{k} {'-' if v is None else f'{100 * v:.2f}'}" for k, v in acc.items()))
    return 0


def cmd_export(args) -> int:
    from .tasks.experiment import open_run
    if args.drop_memorization == args.localized:
        raise ConfigError("memloc export writes the model without its memorization units: pass one of "
                          "--drop-memorization (example-tied dropout, sinks) and --localized (the localize edit)")
    from .study.export import export_dropped, export_localized
    loaded = open_run(args.run, device="cpu")
    if args.localized:
        out = export_localized(loaded, args.out, overwrite=args.overwrite)
    else:
        out = export_dropped(loaded, args.out, epoch=args.epoch, scale=args.drop_scale or "matched",
                             overwrite=args.overwrite)
    if not args.quiet:
        print(f"done: {out} (load it with memloc.load_exported)")
    return 0




def cmd_dropout_grid(args) -> int:
    from .study.grid import DEFAULT_PAIRS, check_grid, dropout_grid, merge_grid
    base, started = run_config(args), time.perf_counter()
    options = dict(pairs=args.pairs or DEFAULT_PAIRS, baselines=not args.no_baselines, elr=args.elr_cells)
    scaled, rows = _scale_out(args, "grid shards", lambda: check_grid(base, args.out, **options),
                              lambda: merge_grid(args.out, log=_log(args)))
    if not scaled:
        rows = dropout_grid(base, args.out, **options, shard=args.shard, progress=_progress(args), log=_log(args))
        if args.shard is not None:
            return _shard_done(args, f"the grid ({len(rows)} cells)", started, args.out)
    return _grid_done(args.out, rows)


def _grid_done(folder, rows: list[dict]) -> int:
    from .report.sections.grid import protection_notes
    for line in protection_notes(rows):
        print(line)
    print(f"done: {Path(folder) / 'grid.csv'} ({len(rows)} cells)")
    return 0


def cmd_bench_localize(args) -> int:
    from .bench.benchmarks import BenchConfig, bench_localize
    options = {k: getattr(args, k) for k in ("benchmark", "preset", "methods", "units", "n_layers", "epochs", "device",
                                             "seed", "run", "examples", "ratios") if getattr(args, k) is not None}
    cfg = BenchConfig(**options)
    if args.repeats is not None:
        if cfg.data is None:
            raise ConfigError("--repeats duplicates TinyMem's artifacts (tinymem, inj); del's canaries are the LM "
                              "run's: drop it")
        cfg.data = dataclasses.replace(cfg.data, repeats=args.repeats)
    log = (lambda s: None) if args.quiet else _log(args)
    rows = bench_localize(cfg, args.out, models=args.models, log=log)
    print(f"done: {Path(args.out) / 'results.md'} ({len(rows)} rows)")
    return 0


# ----------------------------------------------------------------------------- the parser







_QUIET_SILENT = "print nothing but errors (the exit code says it worked)"
_FORCE_HELP = ("train even where the memory estimate (the model, its optimizer state and one batch) is more than "
               "the device has free")


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .probes import DropoutConfig, registered
    from .study.run import StudyConfig
    parser = FlagParser(prog="memloc", description="Find where a network memorizes its training examples.")
    parser.add_argument("--version", action="version", version=f"memloc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    presets = ["smoke", "default", "paper"]

    p = sub.add_parser("train", help="train a model with per-epoch checkpoints, records and gradient accounting")
    p.add_argument("--preset", choices=presets, help="smoke: a small CNN on 1,000 digits, about 10 s on a CPU (--task "
                                                     "lm: a 2-block GPT on 1,200 sequences of any corpus, about 30 s)")
    _run_flags(p)
    p.add_argument("--out", help="run directory (default runs/<dataset>-<model>-<noise>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory (memloc's files only)")
    p.add_argument("--resume", metavar="RUN", help="continue a killed run from its newest checkpoint")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar, plain log lines (always without a terminal)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="the whole study: train, probe, example-tied dropout, detection, report")
    p.add_argument("--preset", choices=presets,
                   help="smoke: about 25 s on a CPU (--task lm: about a minute, 1,200 sequences of any corpus); "
                        "default: the CPU default model (the paper's on a GPU)")
    _run_flags(p, exclude=_STUDY_SETS)
    add_config_flags(p, StudyConfig, title="study", preset_set=_preset_set("study"))
    p.add_argument("--seed", type=int, help="the seed, as --seeds N")
    p.add_argument("--out", help="study directory (default runs/study-<dataset>-<time>)")
    p.add_argument("--overwrite", action="store_true",
                   help="start an existing study folder again with these settings (deletes memloc's own files in "
                        "it, nothing else)")
    p.add_argument("--resume", metavar="STUDY", help="finish an interrupted study without redoing finished stages")
    _scale_flags(p, "cells (seeds x noise levels, then the --grid's cells)", "the study folder (--out)")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.add_argument("--quiet", action="store_true", help="plain log lines, no bars (always without a terminal)")
    p.set_defaults(func=cmd_run)

    from .audit.lm import AuditConfig
    p = sub.add_parser("audit", help="a model memloc did not train and your sequences: which it memorizes (extraction, "
                                     "membership scores), into a run directory for localize and export")
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="hf:FOLDER: a causal LM saved by save_pretrained (local files only); for a classifier, "
                        "--weights FILE.safetensors and its --model and --dataset instead")
    add_config_flags(p, AuditConfig)
    from .tasks.classification.data import DataConfig
    from .tasks.experiment import ModelConfig
    add_config_flags(p, ModelConfig, exclude=tuple(f.name for f in dataclasses.fields(ModelConfig)
                                                   if f.name not in ("name", "width")),
                     title="a classifier's model (with --weights)")
    add_config_flags(p, DataConfig, title="a classifier's data (with --weights): what it trained on")
    p.add_argument("--out", help="run directory (default runs/audit-<model>-<time>)")
    p.add_argument("--resume", metavar="RUN", help="finish an interrupted audit with the settings it started with")
    p.add_argument("--force", action="store_true", help="audit even where the memory estimate (the model, the "
                   "checkpoints rewinding reads, one batch through the model) is more than the device has free")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory (memloc's files only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, plain log lines (always without a terminal)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("report", help="rebuild the HTML report of a run or study from its files")
    p.add_argument("path", help="a run directory (or a study directory)")
    p.add_argument("--quiet", action="store_true", help=_QUIET_SILENT)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("datasets", help="list the datasets memloc reads")
    p.set_defaults(func=cmd_datasets)
    p = sub.add_parser("models", help="list the registry models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("evaluate", help="accuracies of a run; --drop-memorization: before/after removing memorization "
                                        "units")
    p.add_argument("run", metavar="RUN", help="run directory made by `memloc train`")
    p.add_argument("--drop-memorization", action="store_true",
                   help="example-tied dropout runs: evaluate before (tied) and after (drop) removing the "
                        "memorization units; results in RUN/probes/dropout/")
    add_config_flags(p, DropoutConfig)
    p.add_argument("--quiet", action="store_true", help="no log lines (the accuracies are printed)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="write a run's model with its memorization units removed (a plain model)")
    p.add_argument("run", metavar="RUN", help="run directory trained with --example-tied-dropout (or localized)")
    p.add_argument("--drop-memorization", action="store_true", help="remove the example-tied dropout / sink units")
    p.add_argument("--localized", action="store_true", help="a language model: fold the edit of the saved `memloc "
                                                             "localize` result into the weights")
    p.add_argument("--out", required=True, help="output file, e.g. model.safetensors")
    add_config_flags(p, DropoutConfig, exclude=("batch_size", "device"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--quiet", action="store_true", help=_QUIET_SILENT)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("dropout-grid", help="example-tied dropout over (p_gen, p_mem) pairs, with matched baselines")
    p.add_argument("--preset", choices=presets, help="base data/model/training settings")
    _run_flags(p, exclude={"model": ("p_gen",), "train": ("elr",)})
    p.add_argument("--elr", dest="elr_cells", type=floats_arg, metavar="LAMBDA,BETA",
                   help="also train a plain cell and an early-learning-regularization cell, e.g. 3,0.7 (docs/elr.md)")
    p.add_argument("--pairs", type=pairs_arg, metavar="'G,M;G,M'",
                   help="cells to train, e.g. '0.4,0.1;0.3,0.1' (default: p_gen 0.2-0.5 x p_mem 0.05, 0.1, 0.2)")
    p.add_argument("--no-baselines", action="store_true", help="skip the standard-dropout and fixed-sparse baselines")
    p.add_argument("--out", required=True, help="grid folder: one run directory per cell and grid.csv")
    _scale_flags(p, "cells", "the grid folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar, plain log lines (always without a terminal)")
    p.set_defaults(func=cmd_dropout_grid)

    p = sub.add_parser("bench-localize", help="benchmark the localization methods: TinyMem's arithmetic artifacts, "
                                              "MemPi's injected (INJ) and naturally memorized (DEL) sequences")
    p.add_argument("--benchmark", default="tinymem", metavar="NAME", help="tinymem (default), inj or del")
    p.add_argument("--preset", default="full", metavar="NAME",
                   help="smoke (under two minutes on 2 CPU cores), full (the CPU scale, default) or paper (GPU)")
    p.add_argument("--methods", type=names_arg, metavar="M,M,...", help="localization methods (default: every method "
                                                                      "of each --units kind: nine on neurons, four on "
                                                                      "weights)")
    p.add_argument("--units", type=names_arg, metavar="KIND,KIND", help="tinymem: neurons (default), weights (every "
                                                                     "weight of the MLP matrices: TinyMem's weight "
                                                                     "methods) or neurons,weights side by side")
    p.add_argument("--layers", dest="n_layers", type=ints_arg, metavar="N,N,...",
                   help="model depths to train (default: the preset's; inj uses the first)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the preset's)")
    p.add_argument("--repeats", type=int, metavar="N", help="tinymem and inj: training copies of each artifact "
                                                             "(TinyMem's duplication; default: the preset's, full 1; "
                                                             "RESULTS.md's CPU tables use 4)")
    p.add_argument("--run", metavar="RUN", help="del: the language-model run whose memorized canaries are localized "
                                                "(default: train the preset's LM model into --models)")
    p.add_argument("--examples", type=int, metavar="N", help="localize at most N memorized sequences (default: "
                                                              "tinymem 32, del 16, smoke 3)")
    p.add_argument("--ratios", type=floats_arg, metavar="R,R,...", help="inj and del: shares of each layer's neurons "
                                                                      "(default: inj 0.001,0.01; del 0.001,0.005,0.02)")
    p.add_argument("--device", help="cpu (default), cuda or auto")
    p.add_argument("--seed", type=int, help="seed of the data, the models and the methods (default 0)")
    p.add_argument("--out", required=True, help="results folder: bench.json, results.csv, results.md")
    p.add_argument("--models", metavar="DIR", help="keep and reuse the trained models here (default OUT/models; "
                                                   "tinymem and inj with the same settings share them)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_bench_localize)

    for probe in registered().values():  # one subcommand per probe, its flags from its config
        if probe.command in {"evaluate"}:
            continue
        p = sub.add_parser(probe.command, help=probe.help)
        p.add_argument("run", metavar="RUN", help="run directory made by `memloc train`")
        add_config_flags(p, probe.config)
        if probe.overwrite_help:
            p.add_argument("--overwrite", action="store_true", help=probe.overwrite_help)
        if probe.shards:
            items = {"flipping": "examples", "localize": "sequences (--method greedy)"}.get(probe.name, "layers")
            _scale_flags(p, items, "RUN/probes/NAME/shards/")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.set_defaults(func=cmd_probe, probe=probe.name)

    p = sub.add_parser("merge", help="join shards (--shard I/N) into the result one process would write")
    p.add_argument("run", metavar="PATH", help="run directory whose probes ran in shards, or a study or dropout grid "
                                               "run in shards")
    p.add_argument("--probe", help="only this probe (default: every probe with shards)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished result made with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_merge)
    return parser


def _scale_flags(p: argparse.ArgumentParser, items: str, where: str) -> None:
    """--shard and the executors, for a command whose work splits into `items` (kept in `where`)."""
    from .core.scale import EXECUTORS
    p.add_argument("--shard", type=_shard, metavar="I/N",
                   help=f"do only shard I of N (I = 0..N-1: every N-th of the {items} from the I-th), kept in "
                        f"{where}; `memloc merge` joins them (docs/cluster.md)")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: this process; processes: one worker process per --devices entry; ray: each shard a "
                        "Ray task (pip install 'memloc[ray]'); shards then merged")
    p.add_argument("--devices", help="the workers' devices for --executor processes: cpu,cpu or GPU ids 0,1")
    p.add_argument("--shards", type=int, metavar="K",
                   help="split into K shards for --executor processes or ray (default: one per device / per task "
                        "the cluster runs at once)")
    p.add_argument("--address", metavar="HOST:PORT",
                   help="--executor ray: the Ray cluster to use (default: start one on this machine's loopback)")
    p.add_argument("--gpus-per-task", type=float, metavar="G",
                   help="--executor ray: GPUs per shard, a fraction to share a GPU between small models (default "
                        "1 when the cluster has GPUs, else 0: CPU tasks)")


def _shard(text: str) -> tuple[int, int]:
    from .probes.engine import parse_shard
    try:
        return parse_shard(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# ----------------------------------------------------------------------------- errors

# how to continue after a full disk, per command (what was saved is kept: writes are atomic)
_CONTINUE = {"train": "`memloc train --resume RUN`", "run": "`memloc run --resume STUDY`",
             "dropout-grid": "the same command (finished cells are kept)"}


def os_error_line(err: OSError, command: str | None = None) -> str:
    """One line for an OSError: what failed, on which path, and what to do."""
    what = err.strerror or str(err) or type(err).__name__
    where = f" ({err.filename})" if err.filename else ""
    again = _CONTINUE.get(command or "", "the same command (it continues from what was saved)")
    full = f"free some space, then continue with {again}"
    fix = {errno.ENOSPC: full, errno.EDQUOT: full,
           errno.EROFS: "the file system is read-only: choose a writable folder (--out) or copy the run to one",
           errno.EACCES: "choose a folder you may write to, or fix its permissions",
           errno.EPERM: "choose a folder you may write to, or fix its permissions"}.get(err.errno,
                                                                                    "check the path and the disk")
    return f"cannot read or write{where}: {what}: {fix}"


def main(argv: list[str] | None = None) -> int:
    import os
    # memloc never downloads: the hub's offline mode for the whole process, set before transformers or
    # huggingface_hub is imported (they read it once); every load also turns it on itself
    # (`memloc.tasks.lm.hub.offline`)
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        args.argv = argv  # the command line as given (the process executor hands it to its workers)
    except SystemExit as stop:  # a bad flag (its one line is printed) or --help / --version
        return stop.code if isinstance(stop.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if args.command != "train":
            from .core.distributed import requested
            if requested():
                raise ConfigError(f"only `memloc train` runs data parallel under torchrun: run `memloc {args.command}` "
                                  "without torchrun (on the trained run; its shards scale out with --executor)")
        return args.func(args)
    except MemlocError as err:
        command = parser._subparsers._group_actions[0].choices.get(args.command, parser)
        print(f"memloc: error: {as_typed(str(err), command, argv)}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only or full disk, a folder without permission: the environment, not a bug
        print(f"memloc: error: {os_error_line(err, args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memloc: interrupted; what was saved is intact (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
