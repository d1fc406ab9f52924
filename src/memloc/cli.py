"""The `memloc` command: a thin argparse shell; each subcommand calls one library function.

Bad input of any kind ends with one line `memloc: error: ...` and exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path
from typing import Callable, NoReturn

from .errors import ConfigError, MemlocError


def _floats(text: str, n: int | None = None, what: str = "value") -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} takes comma-separated numbers, not {text!r}") from None
    if n is not None and len(vals) != n:
        raise argparse.ArgumentTypeError(f"{what} takes {n} comma-separated numbers, not {text!r}")
    return vals


def _pair(text: str) -> tuple[float, float]:
    return _floats(text, 2, "--example-tied-dropout")  # type: ignore[return-value]


def _shape(text: str) -> tuple[int, int, int]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--synthetic-shape takes C,H,W, not {text!r}") from None
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"--synthetic-shape takes C,H,W, not {text!r}")
    return vals  # type: ignore[return-value]


# flag name -> (section of RunConfig, field)
_FIELDS = {
    "dataset": ("data", "dataset"), "data_root": ("data", "data_root"), "download": ("data", "download"),
    "split": ("data", "split"), "holdout": ("data", "holdout"), "train_size": ("data", "train_size"),
    "noise": ("data", "noise"), "noise_kind": ("data", "noise_kind"), "labels": ("data", "labels"),
    "noise_mask": ("data", "noise_mask"), "rare_scores": ("data", "rare_scores"), "rare_below": ("data", "rare_below"),
    "synthetic_size": ("data", "synthetic_train"), "synthetic_test_size": ("data", "synthetic_test"),
    "synthetic_shape": ("data", "synthetic_shape"), "synthetic_classes": ("data", "synthetic_classes"),
    "num_classes": ("data", "num_classes"),
    "model": ("model", "name"), "width": ("model", "width"), "example_tied_dropout": ("model", "example_tied_dropout"),
    "dropout_seed": ("model", "dropout_seed"),
    "epochs": ("train", "epochs"), "lr": ("train", "lr"), "schedule": ("train", "schedule"),
    "batch_size": ("train", "batch_size"), "seed": ("train", "seed"), "augment": ("train", "augment"),
    "gradient_accounting": ("train", "gradient_accounting"), "checkpoint_every": ("train", "checkpoint_every"),
    "device": ("train", "device"), "compile": ("train", "compile"), "warmup": ("train", "warmup"),
}


def add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="mnist5k (default, offline), digits, synthetic, mnist, fashion-mnist, cifar10, "
                                     "cifar100, svhn, a .npz file (x, y) or a folder of class sub-folders")
    g.add_argument("--data-root", help="folder holding the standard dataset files")
    g.add_argument("--download", action="store_true", default=None, help="download the dataset into --data-root (needs internet)")
    g.add_argument("--split", choices=["train", "test"], help="'test' divides the test split into train/test (see --holdout)")
    g.add_argument("--holdout", type=float, help="test fraction when one split is divided (default 0.2)")
    g.add_argument("--train-size", type=int, help="a stratified subset of this many training examples")
    g.add_argument("--noise", type=float, help="fraction of training labels to corrupt (default 0.1)")
    g.add_argument("--noise-kind", choices=["uniform", "pairs"], help="uniform over wrong classes, or y -> y+1 pairs")
    g.add_argument("--labels", help="file of given training labels (.npy or one-column CSV), for already-noisy data")
    g.add_argument("--noise-mask", help="file marking the known noisy training examples (1 = noisy)")
    g.add_argument("--rare-scores", help="per-example scores (.npy or CSV); examples below --rare-below are rare")
    g.add_argument("--rare-below", type=float, help="threshold for --rare-scores (default 0.5)")
    g.add_argument("--synthetic-size", type=int, help="synthetic: training examples (default 50000)")
    g.add_argument("--synthetic-test-size", type=int, help="synthetic: test examples (default 10000)")
    g.add_argument("--synthetic-shape", type=_shape, help="synthetic: C,H,W (default 3,32,32)")
    g.add_argument("--synthetic-classes", type=int, help="synthetic: number of classes (default 10)")
    g.add_argument("--num-classes", type=int, help="outputs of the model for your own data (default: the largest "
                                                     "label + 1; labels that look like ids are refused without it)")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="resnet9, resnet50, vit, cnn, mlp (default: resnet9 at width 0.25 on CPU, 1 on GPU)")
    g.add_argument("--width", type=float, help="channel/width multiplier")
    g.add_argument("--example-tied-dropout", type=_pair, metavar="P_GEN,P_MEM",
                   help="place example-tied dropout after every block, e.g. 0.4,0.1")
    g.add_argument("--dropout-seed", type=int, help="seed of the example-tied masks (default 0)")


def add_train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int)
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--schedule", choices=["cosine", "onecycle", "constant"])
    g.add_argument("--warmup", type=float, help="fraction of steps of warm-up (default 0.1)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--seed", type=int, help="seed of the noise, the initialisation and the training order")
    g.add_argument("--augment", action="store_true", default=None, help="random crop + flip (off in the paper's main runs)")
    g.add_argument("--no-gradient-accounting", dest="gradient_accounting", action="store_false", default=None)
    g.add_argument("--checkpoint-every", type=int, help="save the model every K epochs (default 1)")
    g.add_argument("--device", help="auto (default), cpu or cuda")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (GPU)")


def run_config(args: argparse.Namespace):
    """Dataclass defaults < preset < explicit flags -> a validated RunConfig."""
    from .data import DataConfig
    from .experiment import ModelConfig, RunConfig, preset
    from .training import TrainConfig
    sections: dict[str, dict] = {"data": {}, "model": {}, "train": {}}
    for sec, vals in preset(getattr(args, "preset", None) or "default").items():
        sections[sec].update(vals)
    for flag, (sec, name) in _FIELDS.items():
        v = getattr(args, flag, None)
        if v is not None:
            sections[sec][name] = v
    return RunConfig(data=DataConfig(**sections["data"]), model=ModelConfig(**sections["model"]),
                     train=TrainConfig(**sections["train"]))


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
           errno.EPERM: "choose a folder you may write to, or fix its permissions"}.get(err.errno, "check the path and the disk")
    return f"cannot read or write{where}: {what}: {fix}"


def _log(args) -> Callable[[str], None]:
    return lambda s: print(s, flush=True)


def cmd_train(args) -> int:
    from .experiment import resume_training, run_training
    if args.resume:
        run = resume_training(args.resume, progress=not args.quiet, log=_log(args))
    else:
        cfg = run_config(args)
        run = run_training(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet, log=_log(args))
    print(f"done: {run.path}")
    return 0


def cmd_datasets(args) -> int:
    from .data import BUILTIN_DATASETS
    from .readers import STANDARD_DATASETS
    for name, desc in BUILTIN_DATASETS.items():
        print(f"{name:14s} {desc}")
    for name, spec in STANDARD_DATASETS.items():
        print(f"{name:14s} {spec[2]} (needs --data-root DIR or --download)")
    print(f"{'FILE.npz':14s} your own arrays x (N,H,W[,C] or N,C,H,W) and y")
    print(f"{'FOLDER/':14s} your own images, one sub-folder per class")
    return 0


def cmd_models(args) -> int:
    from .models import CPU_DEFAULT_MODEL, GPU_DEFAULT_MODEL, MODELS
    for name, spec in MODELS.items():
        print(f"{name:10s} {spec.description}")
    print(f"defaults: {CPU_DEFAULT_MODEL[0]} at width {CPU_DEFAULT_MODEL[1]:g} on CPU, "
          f"{GPU_DEFAULT_MODEL[0]} at width {GPU_DEFAULT_MODEL[1]:g} on GPU")
    return 0


def _grid_pairs(text: str) -> tuple[tuple[float, float], ...]:
    pairs = []
    for part in text.split(";"):
        if part.strip():
            pairs.append(_floats(part.strip(), 2, "--pairs"))
    if not pairs:
        raise argparse.ArgumentTypeError(f"--pairs takes P_GEN,P_MEM pairs separated by ';', not {text!r}")
    return tuple(pairs)  # type: ignore[return-value]


def cmd_evaluate(args) -> int:
    from .experiment import open_run
    loaded = open_run(args.run, device=args.device or "auto")
    if not args.drop_memorization:
        from .training import evaluate
        acc = evaluate(loaded.model(args.epoch), loaded.data)
        print(" ".join(f"{k} {'-' if v is None else f'{100 * v:.2f}'}" for k, v in acc.items()))
        return 0
    from .probes.dropout_eval import evaluate_dropout
    result = evaluate_dropout(loaded, epoch=args.epoch, scale=args.drop_scale, save=True)
    d = loaded.run.path / "probes" / "dropout"
    s = result.summary
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    print(f"clean-train {pct(s['clean_before'])} -> {pct(s['clean_after'])}  "
          f"noisy-train {pct(s['noisy_before'])} -> {pct(s['noisy_after'])}  (tied -> drop)")
    print(f"test {pct(s['test_eval'])} (eval) {pct(s['test_drop'])} (drop); noisy predicted as their true label "
          f"after the drop {pct(s['noisy_true_after'])}; clean examples forgotten {s['forgotten_clean']}")
    print(f"done: {d}")
    return 0


def cmd_export(args) -> int:
    from .experiment import open_run
    if not args.drop_memorization:
        raise ConfigError("memloc export writes the model without its memorisation units: pass --drop-memorization")
    from .export import export_dropped
    loaded = open_run(args.run, device="cpu")
    out = export_dropped(loaded, args.out, epoch=args.epoch, scale=args.drop_scale, overwrite=args.overwrite)
    print(f"done: {out} (load it with memloc.export.load_exported)")
    return 0


def cmd_dropout_grid(args) -> int:
    from .grid import DEFAULT_PAIRS, dropout_grid
    cfg = run_config(args)
    rows = dropout_grid(cfg, args.out, pairs=args.pairs or DEFAULT_PAIRS, baselines=not args.no_baselines,
                        progress=not args.quiet, log=_log(args))
    print(f"done: {Path(args.out) / 'grid.csv'} ({len(rows)} cells)")
    return 0


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, e.g. 0,2,4, not {text!r}") from None


def _names(text: str | None) -> list[str] | None:
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


def _pct_or_dash(v) -> str:
    return "  -  " if v is None else f"{100 * v:5.1f}"


def cmd_rewind(args) -> int:
    from .experiment import open_run
    from .probes.rewinding import rewind
    epochs = _int_list(args.epochs, "--epochs")
    loaded = open_run(args.run, device=args.device or "auto")
    result = rewind(loaded, layers=_names(args.layers), epochs=epochs, every=args.every,
                    keep_bn_stats=args.keep_bn_stats, batch_size=args.batch_size, progress=not args.quiet)
    s = result.summary
    print(f"final model: clean-train {_pct_or_dash(s['final']['clean_train_acc'])}  "
          f"noisy-train {_pct_or_dash(s['final']['noisy_train_acc'])}  test {_pct_or_dash(s['final']['test_acc'])}")
    print(f"each layer rewound to epoch {s['earliest_epoch']}:")
    for name, acc in s["at_earliest_epoch"].items():
        print(f"  {name:24s} clean-train {_pct_or_dash(acc['clean_train_acc'])}  "
              f"noisy-train {_pct_or_dash(acc['noisy_train_acc'])}  test {_pct_or_dash(acc['test_acc'])}")
    print(f"done: {loaded.run.path / 'probes' / 'rewinding'} ({s['seconds']:.1f}s)")
    return 0


def cmd_retrain(args) -> int:
    from .experiment import open_run
    from .probes.retraining import RetrainConfig, retrain
    cfg = RetrainConfig(epochs=args.epochs, lr=args.lr, peak_epoch=args.peak_epoch, batch_size=args.batch_size,
                        seed=args.seed)
    loaded = open_run(args.run, device=args.device or "auto")
    result = retrain(loaded, cfg, layers=_names(args.layers), progress=not args.quiet)
    s = result.summary
    print(f"each layer reset to its initialisation, then retrained {cfg.epochs} epochs on clean examples only:")
    for name in s["layers"]:
        a, b = s["after_reset"][name], s["after_retraining"][name]
        print(f"  {name:24s} clean-train {_pct_or_dash(a['clean_train_acc'])} -> {_pct_or_dash(b['clean_train_acc'])}  "
              f"noisy-train {_pct_or_dash(a['noisy_train_acc'])} -> {_pct_or_dash(b['noisy_train_acc'])}  "
              f"test {_pct_or_dash(a['test_acc'])} -> {_pct_or_dash(b['test_acc'])}")
    print(f"done: {loaded.run.path / 'probes' / 'retraining'} ({s['seconds']:.1f}s)")
    return 0


def cmd_flip(args) -> int:
    from .probes.flipping import FlipConfig, flip
    from .readers import read_indices
    kinds = tuple(_names(args.kind) or ())
    cfg = FlipConfig(examples=args.examples, kinds=kinds, indices=read_indices(args.indices) if args.indices else None,
                     others=args.others, copies=args.copies, input_noise=args.input_noise, budget=args.budget,
                     max_units=args.max_units, layers=tuple(_names(args.layers)) if args.layers else None,
                     include_classifier=args.include_classifier, eval_subsample=args.eval_subsample,
                     eval_test=not args.no_test_eval, seed=args.seed,
                     sequential=args.sequential, precision=args.precision, batch_examples=args.batch_examples,
                     epoch=args.epoch, device=args.device or "auto")
    result = flip(args.run, cfg, overwrite=args.overwrite, progress=not args.quiet, log=_log(args))
    s = result.summary
    for kind, k in s["kinds"].items():
        print(f"{kind:6s} {k['examples']} examples: median {k['median_units']} units, flipped {_pct_or_dash(k['flipped_share'])}%, "
              f"< 10 units {_pct_or_dash(k['share_flipped_under_10'])}%, train-acc drop {_pct_or_dash(k['mean_train_acc_drop'])} "
              f"points, {k['layers_used']} layers used")
    print(f"done: {result.summary['run']}/probes/flipping ({s['elapsed_s']:.1f}s)")
    return 0


def cmd_run(args) -> int:
    from .study import run_study, study_config
    if args.resume:
        path = run_study(resume=args.resume, progress=not args.quiet, log=_log(args))
    else:
        sections: dict[str, dict] = {"data": {}, "model": {}, "train": {}}
        for flag, (sec, name) in _FIELDS.items():
            v = getattr(args, flag, None)
            if v is not None and flag not in ("noise", "seed", "example_tied_dropout"):
                sections[sec][name] = v
        noise = args.noise or (0.1,)
        cfg = study_config(args.preset or "default", base_overrides=sections, seeds=args.seeds,
                           noise_levels=noise, example_tied_dropout=args.example_tied_dropout,
                           flip_examples=args.flip_examples, grid=args.grid or None)
        path = run_study(cfg, args.out, progress=not args.quiet, log=_log(args))
    print(f"done: {path} (report: {path / 'report' / 'report.html'})")
    return 0


def _float_list(text: str) -> tuple[float, ...]:
    return _floats(text, None, "--noise")


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, e.g. 0,1,2, not {text!r}") from None


def cmd_report(args) -> int:
    from .report import build_report
    page = build_report(args.path)
    print(f"report: {page}")
    return 0


def cmd_detect(args) -> int:
    from .detection import DetectConfig, detect, format_table
    cfg = DetectConfig(rank_by=args.rank_by, cv=args.cv, cv_epochs=args.cv_epochs, flip_all=args.flip_all,
                       rare_scores=args.rare_scores, rare_below=args.rare_below, device=args.device or "auto")
    result = detect(args.run, cfg, overwrite_flipping=args.overwrite, progress=not args.quiet, log=_log(args))
    s = result.summary
    print(format_table(s))
    if s.get("rare_quality"):
        print(format_table(s, target="rare"))
    if s.get("best"):
        print(f"best score: {s['best']}")
    print(f"done: {s['run']}/probes/detection/suspects.csv (ranked by {s['rank_by']})")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error format: one line `memloc: error: ...`, exit 2, no usage dump."""

    def error(self, message: str) -> NoReturn:
        import re
        m = re.match(r"argument (\S+): (\1 .*)", message)  # "argument --x: --x takes ..." says the flag once
        message = m.group(2) if m else message
        command = self.prog.split(" ", 1)[1] if " " in self.prog else None
        hint = f"`memloc {command} --help`" if command else "`memloc --help`"
        self.exit(2, f"memloc: error: {message.strip()} (see {hint})\n")


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    parser = _Parser(prog="memloc", description="Find where a network memorizes its training examples.")
    parser.add_argument("--version", action="version", version=f"memloc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model with per-epoch checkpoints, records and gradient accounting")
    p.add_argument("--preset", choices=["smoke", "default", "paper"], help="smoke: well under a minute on a CPU")
    add_data_flags(p)
    add_model_flags(p)
    add_train_flags(p)
    p.add_argument("--out", help="run directory (default runs/<dataset>-<model>-<noise>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", metavar="RUN", help="continue a killed run from its newest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar, plain log lines")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="the whole study: train, probe, example-tied dropout, detection, report",
                       conflict_handler="resolve")
    p.add_argument("--preset", choices=["smoke", "default", "paper"],
                   help="smoke: about 2 minutes on a CPU; default: the CPU default model (the paper's on a GPU)")
    add_data_flags(p)
    add_model_flags(p)
    add_train_flags(p)
    p.add_argument("--noise", type=_float_list, help="noise level(s), e.g. 0.1 or 0.05,0.1,0.2 (default 0.1)")
    p.add_argument("--seeds", type=_int_tuple, help="seed(s), e.g. 0,1,2: the report shows mean and sd")
    p.add_argument("--example-tied-dropout", type=_pair, metavar="P_GEN,P_MEM", help="the dropout model's p_gen,p_mem")
    p.add_argument("--flip-examples", type=int, help="clean and noisy examples for greedy unit removal (each)")
    p.add_argument("--grid", action="store_true", default=None, help="add the example-tied dropout grid and baselines")
    p.add_argument("--out", help="study directory (default runs/study-<dataset>-<time>)")
    p.add_argument("--resume", metavar="STUDY", help="finish an interrupted study without redoing finished stages")
    p.add_argument("--quiet", action="store_true", help="plain log lines, no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="rebuild the HTML report of a run or study from its files")
    p.add_argument("path", help="a run directory (or a study directory)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("datasets", help="list the datasets memloc reads")
    p.set_defaults(func=cmd_datasets)
    p = sub.add_parser("models", help="list the registry models")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("evaluate", help="accuracies of a run; --drop-memorization: before/after removing memorisation units")
    p.add_argument("run", metavar="RUN", help="run directory made by `memloc train`")
    p.add_argument("--drop-memorization", action="store_true",
                   help="example-tied dropout runs: evaluate before (tied) and after (drop) removing the "
                        "memorisation units; results in RUN/probes/dropout/")
    p.add_argument("--epoch", type=int, help="saved epoch to evaluate (default: the last)")
    p.add_argument("--drop-scale", choices=["matched", "paper", "none"], default="matched",
                   help="rescaling of the generalisation units after the drop (default matched: keeps the expected total)")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="write a run's model with its memorisation units removed (a plain model)")
    p.add_argument("run", metavar="RUN", help="run directory trained with --example-tied-dropout")
    p.add_argument("--drop-memorization", action="store_true", help="remove the memorisation units (required)")
    p.add_argument("--out", required=True, help="output file, e.g. model.safetensors")
    p.add_argument("--epoch", type=int, help="saved epoch to export (default: the last)")
    p.add_argument("--drop-scale", choices=["matched", "paper", "none"], default="matched")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("dropout-grid", help="example-tied dropout over (p_gen, p_mem) pairs, with matched baselines")
    p.add_argument("--preset", choices=["smoke", "default", "paper"], help="base data/model/training settings")
    add_data_flags(p)
    add_model_flags(p)
    add_train_flags(p)
    p.add_argument("--pairs", type=_grid_pairs, metavar="'G,M;G,M'",
                   help="cells to train, e.g. '0.4,0.1;0.3,0.1' (default: p_gen 0.2-0.5 x p_mem 0.05, 0.1, 0.2)")
    p.add_argument("--no-baselines", action="store_true", help="skip the standard-dropout and fixed-sparse baselines")
    p.add_argument("--out", required=True, help="grid folder: one run directory per cell and grid.csv")
    p.add_argument("--quiet", action="store_true", help="no progress bar, plain log lines")
    p.set_defaults(func=cmd_dropout_grid)

    p = sub.add_parser("rewind", help="layer rewinding: each layer back to each saved epoch inside the final model")
    p.add_argument("run", metavar="RUN", help="run directory with per-epoch checkpoints")
    p.add_argument("--layers", help="comma-separated layer names or indices (default: all)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", help="comma-separated saved epochs to rewind to (default: all saved)")
    g.add_argument("--every", type=int, help="every K-th saved epoch (the last one always included)")
    p.add_argument("--keep-bn-stats", action="store_true", help="leave the BatchNorm statistics final (weights only)")
    p.add_argument("--batch-size", type=int, default=1024, help="evaluation batch size (default 1024)")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_rewind)

    p = sub.add_parser("retrain", help="layer retraining: reset one layer to init, train only it on clean examples")
    p.add_argument("run", metavar="RUN", help="run directory (needs the final model; epoch 0 or the run's seed)")
    p.add_argument("--layers", help="comma-separated layer names or indices (default: all)")
    p.add_argument("--epochs", type=int, default=20, help="retraining epochs per layer (default 20)")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule (default 0.1)")
    p.add_argument("--peak-epoch", type=float, default=10, help="epoch of the peak learning rate (default 10)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="seed of the training order")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("flip", help="greedy unit removal: the units to zero until each chosen example's prediction flips")
    p.add_argument("run", metavar="RUN", help="run directory (needs only the final checkpoint)")
    p.add_argument("--examples", type=int, default=100, help="examples per kind, a seeded choice (default 100)")
    p.add_argument("--kind", default="clean,noisy", help="comma-separated kinds: clean, noisy, rare (default clean,noisy)")
    p.add_argument("--indices", metavar="FILE", help="flip these training examples instead (.npy or text, one index a line)")
    p.add_argument("--others", type=int, default=512, help="other training examples whose loss is kept low (default 512)")
    p.add_argument("--copies", type=int, default=5, help="noisy copies of the example averaged (default 5)")
    p.add_argument("--input-noise", type=float, default=0.01, help="noise norm as a fraction of the input norm (default 0.01)")
    p.add_argument("--budget", type=float, default=0.1, help="removal cap as a fraction of all units (default 0.1)")
    p.add_argument("--max-units", type=int, help="removal cap as a number of units (wins over --budget)")
    p.add_argument("--layers", help="comma-separated layer names or indices (default: all but the classifier)")
    p.add_argument("--include-classifier", action="store_true", help="let the final classifier's units be removed too")
    p.add_argument("--eval-subsample", type=int, metavar="K", help="accuracy after removal on K seeded train and test examples")
    p.add_argument("--no-test-eval", action="store_true", help="after removal, training-set accuracy only")
    p.add_argument("--sequential", action="store_true", help="the paper's loop: one example, one removal at a time")
    p.add_argument("--precision", default="auto", help="auto (default: bf16 where the device has it natively, "
                   "fp32 for --sequential on a CPU), fp32 or bf16")
    p.add_argument("--batch-examples", type=int, default=16, help="examples flipped at once (default 16)")
    p.add_argument("--epoch", type=int, help="probe this saved epoch (default: the final one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples, the others and the input noise")
    p.add_argument("--overwrite", action="store_true", help="replace a flipping probe made with other settings")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_flip)

    p = sub.add_parser("detect", help="score and rank training examples as suspected mislabeled; quality vs known noise")
    p.add_argument("run", metavar="RUN", help="run directory made by `memloc train` (needs examples.npz)")
    p.add_argument("--rank-by", default="aum",
                   help="score ranking suspects.csv: aum (default), final_loss, mean_loss, forgetting, first_learned, "
                        "units_to_flip, label_quality")
    p.add_argument("--cv", type=int, default=0, metavar="K",
                   help="confident learning (cleanlab) on K-fold out-of-fold predictions: trains K extra models")
    p.add_argument("--cv-epochs", type=int, help="epochs of each cross-validation model (default: the run's)")
    p.add_argument("--flip-all", action="store_true", help="run the flipping probe on every training example first (slow)")
    p.add_argument("--overwrite", action="store_true", help="with --flip-all: replace a flipping probe made with other settings")
    p.add_argument("--rare-scores", help="per-example scores file (.npy or CSV): examples below --rare-below are rare")
    p.add_argument("--rare-below", type=float, default=0.5, help="threshold for --rare-scores (default 0.5)")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_detect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except MemlocError as err:
        print(f"memloc: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only or full disk, a folder without permission: the environment, not a bug
        print(f"memloc: error: {os_error_line(err, args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memloc: interrupted; what was saved is intact (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
