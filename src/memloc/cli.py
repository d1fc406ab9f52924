"""The `memloc` command: a thin argparse shell; each subcommand calls one library function.

Bad input of any kind ends with one line `memloc: error: ...` and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="memloc", description="Find where a network memorizes its training examples.")
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

    p = sub.add_parser("datasets", help="list the datasets memloc reads")
    p.set_defaults(func=cmd_datasets)
    p = sub.add_parser("models", help="list the registry models")
    p.set_defaults(func=cmd_models)
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
    except KeyboardInterrupt:
        print("memloc: interrupted; what was saved is intact (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
