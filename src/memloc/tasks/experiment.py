"""One training run from a config: data, model, trainer and run directory together.

`run_training(cfg, out)` writes the resolved config into a new run directory
before any compute, then trains; `resume_training(path)` continues a killed run
from its newest complete checkpoint; `open_run(path)` rebuilds the data and the
model of an existing run for the probes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..core import distributed
from ..core.dropout import ChannelDropout, ExampleTiedDropout, FixedUnitMask
from ..core.errors import ConfigError, RunError
from ..core.files import load_into
from ..core.options import INT64_MAX, check_ranges, floats, option
from ..core.runs import RunDir, default_out, exclusive
from ..core.tasks import task_of
from ..core.training import TrainConfig, Trainer, fit_training, resolve_device
from .classification import data as data_mod
from .classification.data import DataConfig, Dataset
from .classification.models import CPU_DEFAULT_MODEL, GPU_DEFAULT_MODEL, build_model, default_model, shape_words


def _pair(text: str) -> tuple[float, float]:
    return floats(text, 2)  # type: ignore[return-value]


@dataclass
class ModelConfig:
    """Which registry model, at which width, with which per-block layer.

    The per-block layer is example-tied dropout (`p_gen`, `p_mem`), or one of
    the paper's baselines at a matched expected fraction of active units
    `active_fraction` = p_gen + (1 - p_gen) * p_mem (`baseline` "dropout":
    standard per-unit dropout keeping each unit with that probability at
    training, identity at test; "sparse": a fixed, seeded subset of that
    fraction of units, at training and test). Validated on construction.
    """

    name: str | None = option(None, "resnet9, resnet50, vit, cnn, cnn1d, mlp (default: chosen by the input shape, "
                              "see `memloc models`: resnet9 at width 0.25 on CPU, 1 on GPU, for images it takes); "
                              "language models: gpt (default), hf-gpt2, hf-gpt_neox, hf-llama, hf:FOLDER",
                              flag="--model")
    width: float | None = option(None, "channel/width multiplier", above=0)
    # example-tied dropout: the first floor(p_gen * units) units of each layer are always on (generalization
    # units); each other unit is kept for a training example with probability p_mem (its memorization units)
    p_gen: float | None = option(None, "place example-tied dropout after every block (language models: in every MLP's "
                                 "hidden layer, memorization sinks), e.g. 0.4,0.1",
                                 flag="--example-tied-dropout", parse=_pair, metavar="P_GEN,P_MEM",
                                 spread=("p_gen", "p_mem"), aliases=("--memorization-sinks",), above=0, at_most=1)
    p_mem: float | None = option(None, cli=False, above=0, at_most=1)
    dropout_seed: int = option(0, "seed of the example-tied masks", at_least=0, at_most=INT64_MAX)
    tie: str = option("document", "language models with sinks: tie a token's sink neurons to its document (every copy "
                      "of a canary shares them) or to its training sequence", choices=("document", "sequence"))
    # language models (--task lm): gpt (ours), hf-gpt2 / hf-gpt_neox / hf-llama (built from a config), hf:FOLDER
    n_layer: int | None = option(None, "language models: transformer blocks", at_least=1)
    n_head: int | None = option(None, "language models: attention heads per block", at_least=1)
    n_embd: int | None = option(None, "language models: embedding width", at_least=1)
    baseline: str | None = option(None, cli=False)  # None, "dropout" or "sparse"
    # the baselines' expected fraction of active units
    active_fraction: float | None = option(None, cli=False, above=0, at_most=1)

    def __post_init__(self) -> None:
        check_ranges(self)
        if (self.p_gen is None) != (self.p_mem is None):
            raise ConfigError("example-tied dropout takes both fractions: pass --example-tied-dropout P_GEN,P_MEM, "
                              "e.g. 0.4,0.1")
        if self.p_gen is not None:
            self.p_gen, self.p_mem = float(self.p_gen), float(self.p_mem)
        if self.baseline is not None:
            if self.baseline not in BASELINES:
                raise ConfigError(f"unknown baseline {self.baseline!r}: choose one of {', '.join(BASELINES)}")
            if self.p_gen is not None:
                raise ConfigError("a model takes example-tied dropout or a baseline layer, not both: drop one of them")
            if self.active_fraction is None:
                raise ConfigError(f"baseline {self.baseline!r} needs active_fraction in (0, 1], "
                                  f"got {self.active_fraction!r}; pass e.g. 0.46")
            self.active_fraction = float(self.active_fraction)
        elif self.active_fraction is not None:
            raise ConfigError("active_fraction is set without a baseline: set baseline to 'dropout' or 'sparse'")
        if self.tie not in ("document", "sequence"):
            raise ConfigError(f"unknown tie {self.tie!r}: choose document or sequence")

    @property
    def example_tied(self) -> bool:
        return self.p_gen is not None

    @classmethod
    def upgraded(cls, values: dict) -> dict:
        """A model config as an earlier memloc wrote it (example_tied_dropout, baseline_fraction) in today's names."""
        values = dict(values)
        pair = values.pop("example_tied_dropout", None)
        if pair is not None:
            values["p_gen"], values["p_mem"] = pair
        if "baseline_fraction" in values:
            values["active_fraction"] = values.pop("baseline_fraction")
        return values

    def resolved(self, device: torch.device, task: str = "classification",
                 input_shape: tuple[int, ...] | None = None) -> "ModelConfig":
        """The model and width to build: without a name, the default for `input_shape` (`models.default_model`;
        left unset while the shape is unknown); `cnn` on sequences or features is `cnn1d`; the width defaults to
        the device's for the CPU/GPU default model, else 1."""
        if task == "lm":
            from .lm.models import resolved_lm
            return resolved_lm(self)
        default = GPU_DEFAULT_MODEL if device.type == "cuda" else CPU_DEFAULT_MODEL
        if self.name is None:
            if input_shape is None:
                return replace(self)  # chosen once the data's shape is known (run_training, make_model)
            name, width = default_model(input_shape, device_type=device.type)
        else:
            name = "cnn1d" if self.name == "cnn" and input_shape is not None and len(input_shape) < 3 else self.name
            width = default[1] if name == default[0] else 1.0
        return replace(self, name=name, width=self.width if self.width is not None else width)


def _text_config() -> type:
    from .lm.text import TextConfig
    return TextConfig


# the data config of each task
TASK_DATA: dict[str, Callable[[], type]] = {"classification": lambda: DataConfig, "lm": _text_config}

# The paper's baselines for example-tied dropout, placed where it would sit.
BASELINES = ("dropout", "sparse")


@dataclass
class RunConfig:
    """Everything a training run needs; `config.json` of a run is `asdict` of this."""

    data: Any = field(default_factory=DataConfig)  # DataConfig (classification) or TextConfig (lm)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: str = "classification"  # or "lm"

    def __post_init__(self) -> None:
        if self.task not in TASK_DATA:
            raise ConfigError(f"unknown task {self.task!r}: choose one of {', '.join(TASK_DATA)}")
        want = TASK_DATA[self.task]()
        if not isinstance(self.data, want):
            raise ConfigError(f"task {self.task} takes a {want.__name__}, not a {type(self.data).__name__}")
        if self.task != "classification" and self.train.elr is not None:
            raise ConfigError(f"--elr (early-learning regularization) is for classification, not --task {self.task}: "
                              "drop it")
        if self.train.auto and self.task != "classification":
            raise ConfigError(f"--epochs auto stops on noisy-train accuracy, which --task {self.task} does not have: "
                              "pass --epochs N")
        if self.train.auto and self.model.example_tied:
            raise ConfigError("--epochs auto stops on noisy-train accuracy, which an example-tied model measures with "
                              "every unit on, not as memorized: pass --epochs N (a study trains its example-tied model "
                              "for the epochs its plain model took)")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["train"].get("elr") is None:  # without ELR, config.json is what earlier memloc wrote
            d["train"].pop("elr", None)
        for sec in ("data", "train"):  # the flags the user set, where the command line recorded them
            if "given" in d[sec] and d[sec]["given"] is None:
                d[sec].pop("given")
        if self.task == "classification":  # as earlier memloc wrote it (a language model's tie means nothing here)
            d.pop("task")
            if d["model"].get("tie") == "document":
                d["model"].pop("tie")
        return d

    @classmethod
    def from_dict(cls, d: dict, *, source: str | Path = "config.json") -> "RunConfig":
        """The config of a run's config.json (`source` names the file in errors)."""
        if not isinstance(d, dict) or not all(isinstance(d.get(k, {}), dict) for k in ("data", "model", "train")):
            raise RunError(f"{source} is damaged: it is not a memloc run config (an object with data, model, train)")

        def build(klass, values):
            known = {f.name for f in fields(klass)}
            unknown = set(values) - known
            if unknown:
                raise RunError(f"{source} has unknown settings {sorted(unknown)}: "
                               "it was written by another memloc version")
            return klass(**values)
        try:
            task = d.get("task", "classification")
            if task not in TASK_DATA:
                raise ConfigError(f"unknown task {task!r}")
            from ..core.precision import LEGACY
            train = {"precision": LEGACY, **d.get("train", {})}  # made before `precision`: the arithmetic it had
            return cls(data=build(TASK_DATA[task](), d.get("data", {})),
                       model=build(ModelConfig, ModelConfig.upgraded(d.get("model", {}))),
                       train=build(TrainConfig, train), task=task)
        except (TypeError, ValueError, ConfigError) as err:
            raise RunError(f"{source} is damaged: it is not a memloc run config ({err})") from None


# The presets, for `memloc train` (data, model, train) and `memloc run` (also study). One table.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # what the end-to-end tests run: a small CNN on 1,000 real digits, about 10 s on 2 CPU cores (the study ~25 s)
    "smoke": {"data": {"dataset": "mnist5k", "train_size": 1000}, "model": {"name": "cnn", "width": 0.5},
              "train": {"epochs": 6, "batch_size": 128},
              # it trains too briefly to memorize (noisy-train about 5%): it checks the pipeline, so it probes anyway
              "study": {"p_gen": 0.5, "p_mem": 0.2, "retrain_epochs": 2, "flip_examples": 8, "flip_others": 64,
                        "flip_eval_subsample": 500, "probe_anyway": True}},
    # the CPU default model (the paper's ResNet-9 on a GPU), with probes sized for a CPU
    "default": {"study": {"retrain_epochs": 10, "flip_examples": 100, "flip_others": 256, "flip_eval_subsample": 2000,
                          "rewind_every": 2}},
    # the paper's setting: ResNet-9, 50 epochs, lr 0.1 with cosine and warm-up, its probe sizes
    "paper": {"model": {"name": "resnet9", "width": 1.0}, "train": {"epochs": 50, "lr": 0.1, "batch_size": 512},
              "study": {"p_gen": 0.3, "p_mem": 0.1, "retrain_epochs": 20, "flip_examples": 1000, "flip_others": 512}},
}


def preset(name: str, task: str = "classification") -> dict[str, dict[str, Any]]:
    table = PRESETS
    if task == "lm":
        from .lm.models import LM_PRESETS as table
    if name not in table:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(table)}")
    return table[name]


def make_model(cfg: ModelConfig, data: Any) -> nn.Module:
    """The model of `cfg` for `data`, with example-tied dropout (or a baseline layer) after each block when asked."""
    if not isinstance(data, Dataset):  # a language model for text
        from .lm.models import build_lm
        return build_lm(cfg, data, after_block=per_block_layer(cfg, tie=cfg.tie))
    if cfg.name is None or cfg.width is None:  # not resolved yet: the default for the data's shape
        cfg = cfg.resolved(data.device, input_shape=data.input_shape)
    return build_model(cfg.name, input_shape=data.input_shape, num_classes=data.num_classes, width=cfg.width,
                       after_block=per_block_layer(cfg))


def per_block_layer(cfg: ModelConfig, tie: str | None = None) -> Callable[[int, int], nn.Module] | None:
    """The factory (position, units) -> module of the config's per-block layer (None: no layer): example-tied
    dropout, or a baseline at the matched active fraction. A language model's sits in every MLP's hidden layer."""
    if cfg.example_tied:
        return lambda pos, units: ExampleTiedDropout(cfg.p_gen, cfg.p_mem, seed=cfg.dropout_seed, layer_id=pos,
                                                     tie=tie)
    if cfg.baseline == "dropout":
        return lambda pos, units: ChannelDropout(cfg.active_fraction)
    if cfg.baseline == "sparse":
        return lambda pos, units: FixedUnitMask(cfg.active_fraction, seed=cfg.dropout_seed, layer_id=pos)
    return None


def environment(device: torch.device) -> dict:
    from .._version import __version__
    env = {"memloc": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
           "numpy": np.__version__, "platform": platform.platform(), "device": str(device),
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def load_data(cfg: RunConfig, device: torch.device, run: RunDir | None = None) -> Any:
    """The data of a run config (a language model's tokenizer from the run where it saved one)."""
    if cfg.task == "lm":
        from .lm.text import load_text
        folder = run.path / "tokenizer" if run is not None else None
        return load_text(cfg.data, device=device, tokenizer_folder=folder)
    return data_mod.load(cfg.data, device=device)


def build(cfg: RunConfig, device: torch.device, run: RunDir | None = None) -> tuple[Any, nn.Module]:
    """Data and freshly initialized model (seeded; the caller's RNG untouched)."""
    data = load_data(cfg, device, run)
    return data, _fresh_model(cfg, data)


def _fresh_model(cfg: RunConfig, data: Any) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return make_model(cfg.model, data)


def _choose_model(cfg: RunConfig, data: Any, device: torch.device) -> list[str]:
    """Resolve `cfg.model` for the data's input shape, in place; the console lines that say what was chosen."""
    if not isinstance(data, Dataset):
        return []
    given = cfg.model.name
    cfg.model = cfg.model.resolved(device, cfg.task, input_shape=data.input_shape)
    shape = shape_words(data.input_shape)
    if cfg.train.augment and len(data.input_shape) != 3:  # refused here, before the run is written
        raise ConfigError(f"--augment (random crop and flip) is for images, not {shape}: drop --augment")
    lines = _choose_recipe(cfg, data)
    if given is None:
        return [f"model: {cfg.model.name} (chosen for {shape}; --model to override)", *lines]
    if given != cfg.model.name:
        return [f"model: {cfg.model.name} (--model {given} on {shape} is its 1-D form)", *lines]
    return lines


def _choose_recipe(cfg: RunConfig, data: Dataset) -> list[str]:
    """Fill the training settings left to the model's recipe (`TrainConfig.with_recipe`), in place; the console
    line that says what a small model's own recipe and --epochs auto chose."""
    from ..core.training import MEMORIZED, RECIPES
    train = cfg.train = cfg.train.with_recipe(cfg.model.name, task_of(data).num_train)
    parts = []
    if train.recipe in RECIPES:
        parts.append(f"{train.recipe}'s recipe: lr {train.lr:g}, batch {train.batch_size}, weight decay "
                     f"{train.weight_decay:g}")
    if train.auto:
        known = task_of(data).kind_mask("noisy")
        until = f"noisy-train reaches {100 * MEMORIZED:.0f}%" if known is not None and bool(known.any()) \
            else "every training example is right"
        parts.append(f"epochs auto: until {until}, then {train.settle_epochs} more, at most {train.max_epochs}")
    return [f"training: {'; '.join(parts)} (docs/your-data.md)"] if parts else []


def run_training(cfg: RunConfig, out: str | Path | None = None, *, overwrite: bool = False, progress: bool = True,
                 log: Callable[[str], None] | None = None, force: bool = False, notes: bool = True) -> RunDir:
    """Train as `cfg` says into a new run directory (default runs/<dataset>-<model>-<noise>-<time>).

    A model and batch that need more memory than the device has free are refused in one line before the
    model is built or anything is written (`check_fits`), unless `force` (or inside `memloc.core.budget.forced()`).
    `notes`: log what was inferred for the data and chosen for the model and its training (a study says it
    once, for its plain run).
    Under torchrun (`torchrun --nproc-per-node K -m memloc train ...`) every process trains its
    part of each batch and rank 0 alone writes the run (docs/cluster.md); each returns the run.
    """
    device = distributed.setup(resolve_device(cfg.train.device))
    main = distributed.is_main()
    if not main:  # one voice: rank 0 logs and shows progress
        log, progress = None, False
    cfg.model = cfg.model.resolved(device, cfg.task)
    data = load_data(cfg, device)  # bad data or model fail here, before anything is written
    chosen = _choose_model(cfg, data, device)
    cfg.train = fit_training(cfg.train, data, chosen.append)  # recorded in config.json as trained
    try:
        check_fits(cfg, data, device, force=force)
    except ConfigError:
        distributed.agree(False)
        raise
    distributed.agree(True)  # every process counted its own device: one that cannot fit stops them all
    model = _fresh_model(cfg, data)
    if out:
        out = Path(out)
    elif cfg.task == "lm":
        out = default_out(cfg.data.name, cfg.model.name.replace(":", "_").replace("/", "_"), None)
    else:
        out = default_out(cfg.data.dataset, cfg.model.name, cfg.data.noise)
    out = distributed.broadcast(out)  # the default name has the time in it: rank 0's
    with exclusive(out) if main else contextlib.nullcontext():  # one writer per run for the whole training
        run = None
        if main:
            try:
                run = _create_run(cfg, out, data, device, overwrite=overwrite, log=log)
            except BaseException:
                distributed.agree(False)
                raise
        distributed.agree(True)  # the other processes stop here when rank 0 could not make the run
        if log:
            for line in (*getattr(data, "notes", ()), *chosen) if notes else ():  # what was inferred, once
                log(line)
            task = task_of(data)
            memorized = task.kind_mask(task.memorized_kind)
            size = f"width {cfg.model.width:g}" if cfg.model.width is not None else \
                f"{sum(p.numel() for p in model.parameters()):,} parameters"
            log(f"run directory {run.path}: {cfg.model.name} ({size}) on {data.name}, "
                f"{task.num_train} training examples, {0 if memorized is None else int(memorized.sum())} "
                f"{task.memorized_kind}, device {device}{_processes()}")
        with run.working("train") if main else contextlib.nullcontext():
            Trainer(model, data, cfg.train, run=run, progress=progress, log=log).fit()
    distributed.barrier()  # the others return once rank 0 has written and released the run
    return run if main else RunDir.open(out)


def check_training(cfg: RunConfig) -> None:
    """`check_fits` for a config alone, its data loaded to count by: what a study checks before it writes."""
    device = resolve_device(cfg.train.device)
    # a copy: loading data records what it inferred (normalization) in the config, which the run itself must infer
    # again and say so
    cfg = replace(cfg, data=replace(cfg.data), model=cfg.model.resolved(device, cfg.task))
    data = load_data(cfg, device)
    _choose_model(cfg, data, device)
    cfg.train = fit_training(cfg.train, data, lambda line: None)  # a batch size the user set too large: refused
    check_fits(cfg, data, device)


def check_fits(cfg: RunConfig, data: Any, device: torch.device, *, force: bool = False) -> None:
    """Refuse in one line (ConfigError) training `cfg`'s model on `data` when it and its batches need more memory
    than `device` has free (`memloc.core.budget.training_need`, counted before the model is built; a Hugging Face
    folder from its files); nothing with `force` or where the need or the free memory cannot be counted."""
    from ..core import budget
    if force or budget.is_forced():
        return
    name = cfg.model.name or ""
    folder = cfg.task == "lm" and name.startswith("hf:")
    shape = None
    if cfg.task == "lm":
        from .lm.models import lm_shape
        shape = lm_shape(cfg.model, data)
        if folder and shape is None:  # its config cannot be read: its load says why, in one line
            return
    need = budget.training_need(None if folder else (lambda: _fresh_model(cfg, data)), data, cfg.train, device,
                                shape=shape, processes=distributed.world()[1])
    if need is None:
        return
    if cfg.task == "lm":
        flags = (None if folder else "--n-embd / --n-layer", "--batch-size / --block-size")
    else:
        flags = ("--width" if name != "resnet50" else None, "--batch-size")
    budget.check(need, device, what="training this model needs", model_flags=flags[0], batch_flags=flags[1])


def _create_run(cfg: RunConfig, out: Path, data: Any, device: torch.device, *, overwrite: bool,
                log: Callable[[str], None] | None = None) -> RunDir:
    """The new run directory with its config, environment, data and tokenizer: before any compute."""
    run = RunDir.create(out, overwrite=overwrite, log=log)
    run.write_json("config.json", cfg.to_dict())
    env = environment(device)
    size = distributed.world()[1]
    if size > 1:  # config.json's batch_size is the global batch; each process trains about 1/size of it
        env["distributed"] = {"world_size": size, "backend": torch.distributed.get_backend(),
                              "global_batch_size": cfg.train.batch_size,
                              "per_process_batch_size": -(-cfg.train.batch_size // size)}
    run.write_json("env.json", env)
    run.save_arrays("data.npz", **data.arrays())
    if getattr(data, "tokenizer", None) is not None and cfg.data.tokenizer != "bytes":
        data.tokenizer.save(run.path / "tokenizer")  # what open_run rebuilds the data with
    return run


def _processes() -> str:
    size = distributed.world()[1]
    return f" x {size} processes (torchrun)" if size > 1 else ""


def resume_training(path: str | Path, *, progress: bool = True, log: Callable[[str], None] | None = None,
                    config: RunConfig | None = None) -> RunDir:
    """Continue a killed run from its newest complete checkpoint; the result equals an uninterrupted run.

    A run killed before its first checkpoint is started again from its config.json (or `config`,
    which a study passes for its own runs). Under torchrun every process reads the checkpoint
    and trains its part of each batch; rank 0 alone writes (any number of processes may resume
    a run that another number trained: the batches are global).
    """
    run = RunDir.open(path)
    if distributed.requested():  # join torchrun's processes first: rank 0 alone takes the lock and writes
        if config is None and not run.has("config.json"):
            raise RunError(f"{run.path} was killed before it wrote its config: start it again with "
                           f"`memloc train ... --out {run.path} --overwrite`")
        given = config or RunConfig.from_dict(run.config, source=run.path / "config.json")
        distributed.setup(resolve_device(given.train.device))
    main = distributed.is_main()
    if not main:
        log, progress = None, False
    with run.exclusive() if main else contextlib.nullcontext():
        stage = run.stage("train")
        distributed.barrier()  # every process has read the run's state before rank 0 changes it
        if stage.get("status") == "done":
            raise RunError(f"{run.path} has finished training: nothing to resume")
        if stage.get("last_checkpoint") is None:
            if config is None:
                if not run.has("config.json"):
                    raise RunError(f"{run.path} was killed before it wrote its config: start it again with "
                                   f"`memloc train ... --out {run.path} --overwrite`")
                config = RunConfig.from_dict(run.config, source=run.path / "config.json")
            if log:
                log(f"{run.path} stopped before its first checkpoint: training it from the start")
            return run_training(config, run.path, overwrite=True, progress=progress, log=log)
        cfg = RunConfig.from_dict(run.config, source=run.path / "config.json")
        device = distributed.setup(resolve_device(cfg.train.device))
        data, model = build(cfg, device, run)
        trainer = Trainer(model, data, cfg.train, run=run if main else None, progress=progress, log=log)
        start = trainer.restore(run)
        distributed.barrier()  # every process has read the checkpoint before rank 0 writes the next
        if log:
            of = f"at most {cfg.train.max_epochs} (--epochs auto)" if cfg.train.auto else cfg.train.epochs
            log(f"resuming {run.path} after epoch {start} of {of}{_processes()}")
        with run.working("train") if main else contextlib.nullcontext():
            trainer.fit(start_epoch=start)
    distributed.barrier()  # the others return once rank 0 has written and released the run
    return run


AUDIT_FILE = "audit.json"  # an audit's record of the model it references (`memloc audit`)
REMOVAL = "removal"  # an audit's removal, verified (RUN/probes/removal/)
HISTORY = "history"  # an audit's sequences at each checkpoint (RUN/probes/history/)
_HASHES: dict[tuple, str] = {}  # (real path, size, mtime, inode) -> sha256
_HASHED = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
           "pytorch_model.bin.index.json")


def content_hash(folder: Path) -> dict[str, str]:
    """sha256 of the model folder's config and weight files (the shards an index names included)."""
    names = [n for n in _HASHED if (folder / n).is_file()]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                names += sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise ConfigError(f"{folder / index} is not a readable weight index: save the model again") from None
    out = {}
    for n in names:
        try:  # hashed once per process while the file is unchanged: an audit hashes at creation, then opens the run
            st = (folder / n).stat()
        except OSError as err:
            raise ConfigError(f"cannot read {folder / n} ({err.strerror}): check the model folder") from None
        key = (str((folder / n).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
        if key in _HASHES:
            out[n] = _HASHES[key]
            continue
        out[n] = _HASHES[key] = file_sha256(folder / n, fix="check the model folder")
    return out


def file_sha256(path: Path, *, fix: str) -> str:
    """sha256 of one file, read in 4 MiB blocks; an unreadable file is one line (ConfigError) ending in `fix`."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    except OSError as err:
        raise ConfigError(f"cannot read {path} ({err.strerror}): {fix}") from None
    return h.hexdigest()


def reference_check(run) -> None:
    """The audited model's folder still holds the files the audit hashed (RunError in one line otherwise)."""
    info = run.read_json(AUDIT_FILE)
    folder = Path(str(info.get("model", "")))
    if content_hash(folder) != info.get("sha256"):
        raise RunError(f"{folder} no longer holds the model {run.path} audited (its files' hashes differ): "
                       "put that model back, or audit this one into a new --out")


@dataclass
class LoadedRun:
    """A run directory with its config, data and a way to get its model at any saved epoch."""

    run: RunDir
    config: RunConfig
    data: Dataset
    device: torch.device
    _arithmetic: Any = field(default=None, init=False, repr=False)  # chosen on first use (`arithmetic`)

    def model(self, epoch: int | None = None) -> nn.Module:
        """The model at `epoch` (default: the final one), in eval mode on the run's device."""
        saved = self.run.saved_epochs()
        audit = not saved and epoch in (None, 0) and self.run.has(AUDIT_FILE)  # the model an audit references
        if audit:
            reference_check(self.run)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.train.seed)
            model = make_model(self.config.model, self.data)
        if audit:
            return model.to(self.device).eval()
        if not saved:
            raise RunError(f"{self.run.path} has no checkpoints: train it with `memloc train` first")
        epoch = saved[-1] if epoch is None else epoch
        load_into(model, self.run.load_checkpoint(epoch), source=str(self.run.checkpoint_path(epoch)))
        model = model.to(self.device)
        if self.arithmetic(model).channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model.eval()

    def epochs(self) -> list[int]:
        """The epochs whose model the run gives: its checkpoints (an audit's referenced model counts as epoch 0)."""
        saved = self.run.saved_epochs()
        return saved if saved or not self.run.has(AUDIT_FILE) else [0]

    def arithmetic(self, model: nn.Module):
        """The arithmetic (bf16 or not, channels_last or not) of this run's precision for its model on its device:
        what its probes compute in (`precision.choose`; enter `precision.arithmetic(...)` around the work).
        Chosen once per open run: every epoch's model has the same architecture."""
        if self._arithmetic is None:
            self._arithmetic = arithmetic_for(self.config.train.precision, model, self.data)
        return self._arithmetic


def arithmetic_for(precision: str, model: nn.Module, data: Any):
    """`precision.choose` for `model` on its device, checked on two of the data's example inputs."""
    from ..core.precision import choose
    from ..core.tasks import task_of
    device = next(model.parameters()).device
    return choose(precision, device, model, task_of(data).example_input(2, device))

def open_run(path: str | Path, *, device: str = "auto") -> LoadedRun:
    """Open a run directory and rebuild its data exactly (noise mask checked against data.npz)."""
    run = RunDir.open(path)
    cfg = RunConfig.from_dict(run.config, source=run.path / "config.json")
    dev = resolve_device(device)
    data = load_data(cfg, dev, run)
    if run.has("data.npz"):
        differs = data.differs_from(run.load_arrays("data.npz", *data.checked))
        if differs:
            raise RunError(f"the data of {run.path} no longer matches its data.npz ({differs} differs): "
                           "the data files changed since the run was trained")
    return LoadedRun(run, cfg, data, dev)
