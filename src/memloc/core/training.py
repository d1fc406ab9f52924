"""Training with the paper's recipe, per-example records, and gradient accounting.

`train()` runs SGD (momentum 0.9, weight decay 5e-4, batch 512) with a per-step
schedule, and in the same pass records per example and epoch whether it was
classified correctly, its loss and its margin. With gradient accounting on, each
step's gradient is split into the clean examples' and the noisy examples' share
of the batch loss (two backward passes: noisy share, then the whole loss; clean
= whole - noisy, so clean + noisy is exactly the step's gradient and BatchNorm
sees the full batch), summed over the epoch on the device and read once per
epoch. Every epoch ends with an evaluation pass (eval-mode BatchNorm, no
augmentation): clean-train, noisy-train, rare-train and test accuracy.

All randomness of an epoch (shuffling, augmentation, standard dropout) is drawn
inside `torch.random.fork_rng` seeded from (seed, epoch): the caller's global
random state is untouched, and a run resumed from a checkpoint repeats exactly
the epochs it lost.

Under torchrun (`memloc.core.distributed`; docs/cluster.md) one run trains in K processes, data
parallel, as one process with the same global batch would: every process walks the same
order and takes a contiguous part of each batch (`Trainer._batches`), its loss weighted by
1 / (global batch size); the gradients are summed explicitly after the backward pass, not
by DistributedDataParallel, whose one-backward-per-forward reducer does not fit the
accounting's extra backward pass and which would need a dummy batch for a process whose
part of a short last batch is empty. The records, the epoch's sums and the accounting's
memorized share are summed once per epoch; rank 0 alone writes the run.

Early-learning regularization (`elr`, Liu et al. 2020; docs/elr.md) adds to each
example's cross-entropy lambda * log(1 - <t_i, p_i>), where t_i is a running
average (momentum beta) of the example's own softmax outputs, kept on the device
and saved with every checkpoint. The per-example records and `train_loss` keep
the plain cross-entropy against the given label; the step's gradient and the
gradient accounting use the full objective.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from . import distributed
from .accounting import GradientAccounting
from .errors import ConfigError, RunError
from .examples import Examples, batches
from .files import load_state, save_state
from .inference import indices_context
from .layers import Layer, check_input, registry_name, select_layers
from .layers import layers as find_layers
from .options import INT64_MAX, check_ranges, fitted, floats, given_fields, given_option, option, replaced
from .precision import LEGACY, PRECISIONS, arithmetic, autocast, choose, cudnn_autotune
from .runs import RunDir, exclusive
from .tasks import task_of

SCHEDULES = ("cosine", "onecycle", "constant")
OPTIMIZERS = ("sgd", "adamw")
AUTO = "auto"  # --epochs auto: train until memorized (`Trainer`, `auto_learning_rate`)
MEMORIZED = 0.9  # noisy-train accuracy that counts as "memorized": where --epochs auto stops, what the study asks

# The paper's recipe (SGD, momentum 0.9): what a model without a recipe of its own trains with.
PAPER_RECIPE = {"lr": 0.1, "batch_size": 512, "weight_decay": 5e-4}
# The small models' recipes, chosen by measurement on small tabular sets and 1-D signals (docs/your-data.md:
# RESULTS.md has the table): no weight decay (it keeps these small models from fitting their noisy labels), and
# batches of about a sixteenth of the training set (between 32 and 512), so that a small set gets enough steps
# per epoch. `batch_size` "auto" is that rule (`recipe_batch`).
RECIPES: dict[str, dict[str, Any]] = {
    "mlp": {"lr": 0.1, "batch_size": AUTO, "weight_decay": 0.0},
    "cnn1d": {"lr": 0.1, "batch_size": AUTO, "weight_decay": 0.0},
}
ELR_CLAMP = 1e-4  # the published code clamps the softmax to [1e-4, 1 - 1e-4] before the targets and the penalty
ELR_STATE = "elr_targets"  # the (N, C) targets' name in a checkpoint's optimizer_XXX.safetensors


def _elr_pair(text: str) -> tuple[float, float]:
    return floats(text, 2)  # type: ignore[return-value]


def elr_setting(value: Any) -> tuple[float, float] | None:
    """(lambda, beta) of early-learning regularization, validated: lambda >= 0, 0 <= beta < 1 (None: off)."""
    if value is None:
        return None
    try:
        lam, beta = (float(v) for v in value)
    except (TypeError, ValueError):
        given = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) \
            if isinstance(value, (tuple, list)) else repr(value)
        raise ConfigError(f"ELR takes two numbers LAMBDA,BETA, e.g. --elr 3,0.7, not {given}") from None
    if not (0.0 <= lam < math.inf):
        raise ConfigError(f"ELR lambda {lam:g} must be a finite number >= 0: pass e.g. --elr 3,0.7")
    if not (0.0 <= beta < 1.0):
        raise ConfigError(f"ELR beta {beta:g} is outside [0, 1): pass e.g. --elr 3,0.7")
    return lam, beta


def elr_regularizer(logits: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor, *, beta: float) -> torch.Tensor:
    """Early-learning regularization of a batch: update the targets, return log(1 - <t_i, p_i>) per example (B,).

    `logits` (B, C) of the examples at dataset positions `idx` (B,); `targets`
    (N, C) float32, updated in place first, as the published code does:
    p = clamp(softmax(logits), 1e-4, 1 - 1e-4) and t[idx] = beta * t[idx] +
    (1 - beta) * p / sum(p) (no gradient through t). The gradient flows through
    p only; the term is negative and falls as p agrees with the running target.
    """
    p = torch.softmax(logits.float(), dim=1).clamp(ELR_CLAMP, 1.0 - ELR_CLAMP)  # (B, C)
    q = p.detach()
    t = beta * targets[idx] + (1.0 - beta) * (q / q.sum(1, keepdim=True))  # (B, C): one gather, not two
    targets[idx] = t
    # <t, p> <= max(p) <= 1 - 1e-4 since t sums to at most 1: the log is finite
    return torch.log1p(-(t * p).sum(1))  # (B,)


def _epochs(text: str) -> int | str:
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"takes a number of epochs or auto, not {text!r}") from None


def recipe_batch(num_train: int) -> int:
    """The small models' batch size for `num_train` examples: the power of two nearest below num_train / 16,
    between 32 and 512 (wine's 142 examples: 32; 4,000: 128)."""
    return int(min(512, max(32, 2 ** math.floor(math.log2(max(1, num_train) / 16)))))


@dataclass
class TrainConfig:
    """How to train. Defaults are the paper's recipe except `lr` and `epochs` (chosen by measurement, README);
    `lr`, `batch_size` and `weight_decay` left None come from the model's recipe (`with_recipe`: the paper's, or
    the small models' own, `RECIPES`)."""

    epochs: int | str = option(40, "training epochs, or auto: until noisy-train reaches 90% (training accuracy 100% "
                               "where no example is known to be noisy), then --settle-epochs more; at most "
                               "--max-epochs. auto is the default for your own data (a .npz or a folder)",
                               parse=_epochs, metavar="N|auto", at_least=1)
    lr: float | None = option(None, "peak learning rate (default: the model's recipe: 0.1)", above=0)
    batch_size: int | None = option(None, "training batch size (default: the model's recipe: 512; mlp and cnn1d: "
                                    "a sixteenth of the training set, 32 to 512)", at_least=1)
    optimizer: str = option("sgd", "sgd (momentum 0.9: the paper's) or adamw (betas 0.9, 0.95: language models)",
                            choices=OPTIMIZERS)
    momentum: float = option(0.9, cli=False, at_least=0, below=1)
    weight_decay: float | None = option(None, "weight decay (default: the model's recipe: the paper's 5e-4; mlp and "
                                        "cnn1d 0; language models 0.1)", at_least=0)
    clip: float | None = option(None, "clip the gradient norm of each step to this (language models: 1.0)", above=0)
    schedule: str = option("cosine", "cosine with linear warm-up (the paper's; with --epochs auto, cycles of it), "
                           "onecycle (triangle) or constant", choices=SCHEDULES)
    warmup: float = option(0.1, "fraction of steps of warm-up (cosine) or to the peak (onecycle)", at_least=0,
                           below=1)
    max_epochs: int = option(400, "--epochs auto: stop here at the latest, and say so", at_least=1)
    settle_epochs: int = option(5, "--epochs auto: epochs trained once the threshold is reached, the learning rate "
                                "annealed to 0", at_least=0)
    # --epochs auto: the first cosine cycle's epochs (the fixed recipe's 40), each next cycle twice as long
    auto_cycle: int = option(40, cli=False, at_least=1)
    seed: int = option(0, "seed of the initialization and the training order", at_least=0, at_most=INT64_MAX)
    augment: bool = option(False, "random crop + flip (images; off in the paper's main runs)")
    gradient_accounting: bool = option(True, "skip gradient accounting (the clean and noisy gradient shares)",
                                       negate="--no-gradient-accounting")
    checkpoint_every: int = option(1, "save the model every K epochs", at_least=1)
    elr: tuple[float, float] | None = option(None, "early-learning regularization (Liu et al. 2020; classification): "
                                             "lambda * log(1 - <t, p>) with per-example targets t of momentum beta, "
                                             "e.g. 3,0.7 (CIFAR-10's; CIFAR-100's 7,0.9; mnist5k: 3,0.9); docs/elr.md",
                                             parse=_elr_pair, metavar="LAMBDA,BETA")
    precision: str = option("auto", "auto: bf16 autocast on a GPU, and on a CPU with native bf16 (AVX512-BF16/AMX) for "
                            "convolutional models, with channels_last images, and language models at least 512 wide; "
                            "fp32 elsewhere (docs/speed.md); "
                            "or fp32 / bf16 everywhere", choices=PRECISIONS)
    # the recipe that filled lr, batch_size and weight_decay where they were not given (`with_recipe`)
    recipe: str | None = option(None, cli=False)
    eval_batch_size: int = option(1024, cli=False, result=False, at_least=1)
    device: str = option("auto", "auto (cuda when present), cpu or cuda", result=False)
    compile: bool = option(False, "torch.compile the model (GPU)", result=False)
    given: tuple[str, ...] | None = given_option()

    def __post_init__(self) -> None:
        check_ranges(self)
        if isinstance(self.epochs, str) and self.epochs != AUTO:
            raise ConfigError(f"epochs (--epochs) takes a number of epochs or auto, not {self.epochs!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS + (LEGACY,):
            raise ConfigError(f"unknown precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.auto and self.schedule == "onecycle":
            raise ConfigError("--schedule onecycle needs a fixed length: pass --epochs N, or keep --epochs auto with "
                              "--schedule cosine or constant")
        self.elr = elr_setting(self.elr)

    @property
    def auto(self) -> bool:
        """Whether training stops when memorized (--epochs auto) rather than after a fixed number of epochs."""
        return self.epochs == AUTO

    @property
    def epoch_cap(self) -> int:
        """The most epochs this config trains: its epochs, or --max-epochs for --epochs auto."""
        return self.max_epochs if self.auto else int(self.epochs)

    def with_recipe(self, model: str | None, num_train: int) -> "TrainConfig":
        """This config with `lr`, `batch_size` and `weight_decay`, where None, from the recipe of registry model
        `model` (`RECIPES`; the paper's for any other) for `num_train` training examples; `recipe` names it."""
        missing = [k for k in PAPER_RECIPE if getattr(self, k) is None]
        if not missing:
            return self
        name = model if model in RECIPES else "paper"
        recipe = RECIPES.get(model, PAPER_RECIPE)
        values = {k: recipe[k] for k in missing}
        if values.get("batch_size") == AUTO:
            values["batch_size"] = recipe_batch(num_train)
        # what the user set is decided before the recipe fills the rest (a recipe's batch size is a default that
        # fits the data, `fit_training`, not a count the user set)
        given = self.given if self.given is not None else tuple(sorted(given_fields(self)))
        return replace(self, **values, recipe=name, given=given)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but no CUDA device is available: pass --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: pass auto, cpu or cuda") from None


def learning_rate(step: int, total: int, cfg: TrainConfig) -> float:
    """The per-iteration learning rate of `cfg.schedule` at `step` of `total`."""
    if cfg.schedule == "constant":
        return cfg.lr
    warm = max(1, int(round(cfg.warmup * total)))
    if cfg.schedule == "onecycle":  # linear up to the peak, linear down to 0
        if step < warm:
            return cfg.lr * (step + 1) / warm
        return cfg.lr * max(0.0, (total - step) / max(1, total - warm))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def auto_learning_rate(step: int, steps_per_epoch: int, cfg: TrainConfig, settle_from: int | None = None) -> float:
    """The per-iteration learning rate of --epochs auto at `step` (0-based, over the whole training).

    cosine: cycles of the fixed recipe's schedule, the first `auto_cycle` epochs long with its warm-up (what
    `--epochs auto_cycle` would train), each next twice as long from the peak again (warm restarts, Loshchilov &
    Hutter 2017: memorization comes as the rate anneals, and a cycle that ends unmemorized gets a longer one).
    Once the threshold is reached at the end of epoch `settle_from`, the `settle_epochs` after it anneal from the
    rate of its last step to 0 (cosine). constant: `lr` throughout. A function of the config and of the epoch the
    threshold was reached: a resumed run repeats the schedule of an uninterrupted one.
    """
    if cfg.schedule == "constant":
        return cfg.lr
    spe = steps_per_epoch
    if settle_from is not None and step >= settle_from * spe:
        start = settle_from * spe
        peak = auto_learning_rate(start - 1, spe, cfg) if start > 0 else cfg.lr
        progress = min(1.0, (step - start + 1) / max(1, cfg.settle_epochs * spe))
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    first = cfg.auto_cycle * spe
    if step < first:
        return learning_rate(step, first, cfg)
    start, length = first, 2 * first
    while step >= start + length:
        start, length = start + length, 2 * length
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (step - start) / length))


def memorized(record: dict, kind: str = "noisy") -> bool:
    """Whether the epoch `record` reaches --epochs auto's threshold: the memorized kind's training accuracy at
    least `MEMORIZED` (90%); where no example is known to be of that kind, every training example right (100%)."""
    value = record.get(f"{kind}_train_acc")
    if value is not None:
        return value >= MEMORIZED
    whole = record.get("clean_train_acc")  # clean-train is every example where none is known to be noisy
    return whole is not None and whole >= 1.0


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63 - 1)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Draw from torch's global RNG with `seed` inside, and give the caller its state back after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def evaluate(model: nn.Module, data, *, batch_size: int = 1024, with_indices: bool = False) -> dict[str, float | None]:
    """Accuracy of every subset of the data's task in eval mode (fractions in [0, 1]; None: empty or unknown)."""
    return task_of(data).evaluate(model, batch_size=batch_size, with_indices=with_indices)


# ----------------------------------------------------------------------------- the trainer

@dataclass
class History:
    """What training produced, as arrays (also written to the run directory when there is one)."""

    metrics: list[dict]
    records: dict[str, np.ndarray]  # loss, margin: (E, N) float16; correct: (E, N) bool
    gradients: dict[str, np.ndarray] | None  # clean_norm, noisy_norm, cosine: (L, E); layer_names
    elr_targets: np.ndarray | None = None  # (N, C) float32: early-learning regularization's targets at the end


def _class_labels(task) -> bool:
    """Whether the task's examples carry one class label each (a user's own Task that does not say: no)."""
    return bool(getattr(task, "class_labels", False))


class Trainer:
    """Trains `model` on `data` as `cfg` says; one object holds the on-device accumulators."""

    def __init__(self, model: nn.Module, data: Examples, cfg: TrainConfig, *, run: RunDir | None = None,
                 progress: bool = True, log: Callable[[str], None] | None = None):
        self.task = task_of(data)
        cfg = cfg.with_recipe(registry_name(model), self.task.num_train)  # what the config left to the model
        if cfg.auto and not _class_labels(self.task):
            raise ConfigError(f"--epochs auto stops on noisy-train accuracy, which task {self.task.name} does not "
                              "have: pass --epochs N")
        self.cfg, self.data, self.run = cfg, data, run
        self.device = distributed.local_device(resolve_device(cfg.device))
        # data-parallel under torchrun (docs/cluster.md): every process trains its part of each batch, rank 0 writes
        self.rank, self.world_size = distributed.world()
        self._parallel = self.world_size > 1
        if self._parallel:
            if cfg.elr is not None:
                raise ConfigError("--elr is not built for several processes yet (its per-example targets live in one "
                                  "process): train it without torchrun")
            self.run = run if self.rank == 0 else None
        self.model = model.to(self.device)
        # the run's arithmetic (bf16 autocast, channels_last): chosen once for this model and device
        self.arithmetic = choose(cfg.precision, self.device, self.model, self.task.example_input(2, self.device))
        if self.arithmetic.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.compile:
            import torch._functorch.config as functorch_config
            functorch_config.donated_buffer = False  # the accounting's first backward retains the graph
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.progress, self.log = progress, (log or (lambda s: None))
        from .dropout import ExampleTiedDropout
        # example-tied dropout: the per-epoch accuracies are eval mode (every unit on at its expectation), not
        # each example through its own masks: the epoch lines say so
        self._tied = any(isinstance(m, ExampleTiedDropout) for m in model.modules())
        fused = self.device.type == "cuda" or None
        if cfg.optimizer == "adamw":  # nanoGPT's: no decay on biases, norms and embeddings' ... kept simple: all 2-D
            decay = [p for p in self.model.parameters() if p.dim() >= 2]
            rest = [p for p in self.model.parameters() if p.dim() < 2]
            self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                          {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                                         fused=fused)
        else:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                       weight_decay=cfg.weight_decay, nesterov=False, fused=fused)
        n = self.task.num_train
        self.steps_per_epoch = math.ceil(n / cfg.batch_size)
        self.indices_ctx = indices_context(self.model, self.task)
        self._params = [p for p in self.model.parameters() if p.requires_grad]  # what torchrun's processes sum
        dev = self.device
        # --epochs auto: rows for the first cycle and its settling, grown as training goes on (`_grow`)
        rows = min(cfg.epoch_cap, cfg.auto_cycle + cfg.settle_epochs) if cfg.auto else cfg.epoch_cap
        self.rec_loss = torch.zeros(rows, n, dtype=torch.float16, device=dev)
        self.rec_margin = torch.zeros(rows, n, dtype=torch.float16, device=dev)
        self.rec_correct = torch.zeros(rows, n, dtype=torch.bool, device=dev)
        self.settle_from: int | None = None  # --epochs auto: the epoch that reached the threshold
        memorized = self.task.kind_mask(self.task.memorized_kind) if cfg.gradient_accounting else None
        self.accounting = GradientAccounting(self.model, memorized, cfg.epoch_cap, dev)
        self.metrics: list[dict] = []
        self.elr_targets = None  # (N, C) float32 on the device, with --elr only
        if cfg.elr is not None:
            if not _class_labels(self.task):
                raise ConfigError(f"--elr is for classification (per-example class targets), not task "
                                  f"{self.task.name}: drop it")
            # zeros, as published: an example's first visit sets its target to (1 - beta) * p
            self.elr_targets = torch.zeros(n, self.task.data.num_classes, dtype=torch.float32, device=dev)

    # -- state for checkpoints and resume
    # the optimizer's per-parameter tensors under their names in checkpoints (SGD's "momentum.{i}" as before)
    _STATE_NAMES = {"momentum_buffer": "momentum", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "step": "step"}

    def _optimizer_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, p in enumerate(self.model.parameters()):
            for key, name in self._STATE_NAMES.items():
                buf = self.opt.state.get(p, {}).get(key)
                if isinstance(buf, torch.Tensor):
                    out[f"{name}.{i}"] = buf if buf.dim() else buf.reshape(1)  # safetensors: no 0-d tensors
        return out

    def _load_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        for i, p in enumerate(self.model.parameters()):
            for key, name in self._STATE_NAMES.items():
                if f"{name}.{i}" not in state:
                    continue
                t = state[f"{name}.{i}"]
                if key == "step":  # AdamW's step count: a 0-d float tensor (on the CPU unless fused/capturable)
                    t = t.reshape(()).to(torch.float32)
                    t = t.to(p.device) if self.device.type == "cuda" else t
                    self.opt.state[p][key] = t.clone()
                else:
                    self.opt.state[p][key] = t.to(p.device, p.dtype).clone()

    def restore(self, run: RunDir) -> int:
        """Load the newest complete checkpoint of `run`; return the epoch to continue from."""
        last = run.stage("train").get("last_checkpoint")
        if last is None:
            raise RunError(f"{run.path} has no complete checkpoint to resume from: start it again with --overwrite")
        from .files import load_into
        load_into(self.model, run.load_checkpoint(last), source=str(run.checkpoint_path(last)))
        if last > 0:
            state_path = run.checkpoint_dir / f"optimizer_{last:03d}.safetensors"
            state = load_state(state_path)
            self._load_optimizer_state(state)
            if self.elr_targets is not None:
                saved = state.get(ELR_STATE)
                if saved is None or saved.shape != self.elr_targets.shape:
                    raise RunError(f"{state_path} has no ELR targets of shape {tuple(self.elr_targets.shape)}: "
                                   "it was not saved by this run; start it again with --overwrite")
                self.elr_targets.copy_(saved)
        self.metrics = [m for m in run.read_metrics() if m["epoch"] <= last]
        if self.cfg.auto:  # the epoch that reached the threshold decides the schedule from there on
            kind = self.task.memorized_kind
            self.settle_from = next((m["epoch"] for m in self.metrics if memorized(m, kind)), None)
        if last > 0:
            rec = run.load_arrays("examples.npz", "loss", "margin", "correct_bits")
            k = last
            self._grow(k)
            self.rec_loss[:k] = torch.from_numpy(rec["loss"][:k]).to(self.device)
            self.rec_margin[:k] = torch.from_numpy(rec["margin"][:k]).to(self.device)
            correct = np.unpackbits(rec["correct_bits"], axis=1, count=self.task.num_train).astype(bool)
            self.rec_correct[:k] = torch.from_numpy(correct[:k]).to(self.device)
            if self.accounting.active and run.has("gradients.npz"):
                self.accounting.restore(run.load_arrays("gradients.npz", "clean_norm", "noisy_norm", "cosine"), k)
        return last

    # -- one epoch
    def _batches(self, order: torch.Tensor, b: int) -> Any:
        """(x, y, idx, size) per step: this process's part of each batch of `order` and the whole batch's size.

        One process: the whole batch. Under torchrun every process walks the same order and
        takes its part of each batch of `size`: contiguous, the first `size mod world`
        processes one more (torch.tensor_split), so a short last batch can leave a process
        none (x, y None, idx empty).
        """
        x, y = self.task.data.x_train, self.task.data.y_train
        if not self._parallel:
            for xb, yb, idx in batches(x, y, batch_size=b, order=order, device=self.device):
                yield xb, yb, idx, len(idx)
            return
        for start in range(0, len(order), b):
            whole = order[start:start + b]
            part = whole.tensor_split(self.world_size)[self.rank]
            if len(part) == 0:
                yield None, None, part.to(self.device), len(whole)
                continue
            xb, yb, idx = next(batches(x, y, batch_size=len(part), order=part, device=self.device))
            yield xb, yb, idx, len(whole)

    def _epoch(self, epoch: int, bar) -> dict:
        cfg, model, dev, task, acc = self.cfg, self.model, self.device, self.task, self.accounting
        n, b = task.num_train, cfg.batch_size
        e = epoch - 1  # records row
        self._grow(epoch)
        model.train()
        with seeded(epoch_seed(cfg.seed, epoch), dev):
            order = torch.randperm(n)  # on the CPU: the same order on every device
            split = acc.start_epoch(order, b)
            loss_sum = torch.zeros((), device=dev)
            correct_sum = torch.zeros((), device=dev)
            elr_sum = torch.zeros((), device=dev) if cfg.elr is not None else None
            for step, (xb, yb, idx, size) in enumerate(self._batches(order, b)):
                lr = self.learning_rate((epoch - 1) * self.steps_per_epoch + step)
                for group in self.opt.param_groups:
                    group["lr"] = lr
                if xb is None:  # this process's part of a short last batch is empty: it joins the step all the same
                    self.opt.zero_grad(set_to_none=True)
                    self._step()
                    if bar is not None:
                        bar.update(1)
                    continue
                x = task.inputs(xb, dev, augment=cfg.augment)
                with autocast(dev), self.indices_ctx(model, idx):
                    out = self.forward(x).float()  # (B, K)
                loss_vec = task.loss(out, yb)  # (B,) cross-entropy: what the records hold
                objective = loss_vec  # (B,) what the step and the accounting differentiate
                if cfg.elr is not None:
                    reg = elr_regularizer(out, self.elr_targets, idx, beta=cfg.elr[1])  # (B,)
                    objective = loss_vec + cfg.elr[0] * reg
                    elr_sum += reg.detach().sum()
                self.opt.zero_grad(set_to_none=True)
                if not self._parallel:
                    if acc.active and split[step]:
                        acc.memorized_share(objective, idx)  # same graph, full-batch BatchNorm statistics
                    objective.mean().backward()
                else:  # this process's part, weighted by 1/(global batch): the processes' gradients add up to it
                    if acc.active and split[step]:
                        acc.memorized_share(objective, idx, size)
                    (objective.sum() / size).backward()
                self._step()
                with torch.no_grad():
                    ld = loss_vec.detach()
                    correct = task.match(task.predict(out), yb)
                    self.rec_loss[e, idx] = ld.half()
                    self.rec_margin[e, idx] = task.margin(out, yb).half()
                    self.rec_correct[e, idx] = correct
                    loss_sum += ld.sum()
                    correct_sum += correct.sum()
                if bar is not None:
                    bar.update(1)
        if self._parallel:  # each process recorded its own examples and sums: add them up
            self._gather_records(e, [loss_sum, correct_sum])  # (no ELR under torchrun)
        if acc.active:
            acc.close_epoch(e, distributed.sum_ if self._parallel else None)
        train_stats = {"train_loss": float(loss_sum) / n, "train_acc": float(correct_sum) / n}
        if elr_sum is not None:  # the mean of log(1 - <t, p>) (before lambda) over the epoch's examples
            train_stats["train_elr"] = float(elr_sum) / n
        return train_stats

    def learning_rate(self, step: int) -> float:
        """The learning rate at `step` (0-based, over the whole training) of this run's schedule."""
        if self.cfg.auto:
            return auto_learning_rate(step, self.steps_per_epoch, self.cfg, self.settle_from)
        return learning_rate(step, self.steps_per_epoch * int(self.cfg.epochs), self.cfg)

    def last_epoch(self) -> int:
        """The epoch training ends with, as far as it is known: the fixed epochs; with --epochs auto the epoch
        that reached the threshold plus --settle-epochs (--max-epochs while it is not reached)."""
        cfg = self.cfg
        if not cfg.auto:
            return int(cfg.epochs)
        if self.settle_from is None:
            return cfg.max_epochs
        return min(cfg.max_epochs, self.settle_from + cfg.settle_epochs)

    def _grow(self, rows: int) -> None:
        """Room for `rows` epochs in the per-example records (--epochs auto does not know them in advance)."""
        have = self.rec_loss.shape[0]
        if rows <= have:
            return
        more = min(self.cfg.epoch_cap, max(rows, 2 * have)) - have
        for name in ("rec_loss", "rec_margin", "rec_correct"):
            t = getattr(self, name)
            setattr(self, name, torch.cat([t, torch.zeros(more, t.shape[1], dtype=t.dtype, device=t.device)]))

    def _step(self) -> None:
        """After the step's backward: sum the processes' gradients (torchrun), account the whole gradient, clip,
        and update the weights (alike in every process: they stay identical)."""
        if self._parallel:
            distributed.sum_grads(self._params)
        if self.accounting.active:
            self.accounting.whole_step()
        if self.cfg.clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.opt.step()

    @torch.no_grad()
    def _gather_records(self, e: int, sums: list[torch.Tensor]) -> None:
        """Row `e` of the records and the epoch's sums, each filled by the processes for their own examples,
        summed over the processes in place (one all-reduce: the others' entries are zeros; correct: any)."""
        n = self.task.num_train
        buf = torch.cat([self.rec_loss[e].float(), self.rec_margin[e].float(), self.rec_correct[e].float(),
                         torch.stack(sums).float()])  # (3N + S,) float32: exact for float16 entries plus zeros
        distributed.sum_([buf])
        self.rec_loss[e] = buf[:n].half()
        self.rec_margin[e] = buf[n:2 * n].half()
        self.rec_correct[e] = buf[2 * n:3 * n] > 0
        for t, v in zip(sums, buf[3 * n:]):
            t.copy_(v)

    def _stage(self, **details: Any) -> dict:
        """The train stage's details, with the processes and the global batch under torchrun."""
        if self._parallel:
            details.update(world_size=self.world_size, global_batch_size=self.cfg.batch_size)
        return details

    # -- saving
    def _save_epoch(self, epoch: int) -> None:
        run = self.run
        k = epoch
        correct = self.rec_correct[:k].cpu().numpy()
        run.save_arrays("examples.npz", loss=self.rec_loss[:k].cpu().numpy(), margin=self.rec_margin[:k].cpu().numpy(),
                        correct_bits=np.packbits(correct, axis=1), num_examples=np.array(self.task.num_train))
        if self.accounting.active:
            run.save_arrays("gradients.npz", **self.accounting.arrays(k))
        run.write_metrics(self.metrics)
        if epoch % self.cfg.checkpoint_every == 0 or epoch == self.last_epoch():
            run.save_checkpoint(epoch, self.model)
            state = self._optimizer_state()
            if self.elr_targets is not None:  # with the optimizer's state: what resuming needs, only the newest
                state[ELR_STATE] = self.elr_targets
            save_state(run.checkpoint_dir / f"optimizer_{epoch:03d}.safetensors", state)
            run.set_stage("train", "running", **self._stage(last_checkpoint=epoch, epochs=self.cfg.epochs))
            for f in run.checkpoint_dir.glob("optimizer_*.safetensors"):  # only the newest is needed to resume
                if f.name != f"optimizer_{epoch:03d}.safetensors":
                    f.unlink()

    def fit(self, start_epoch: int = 0) -> History:
        cfg = self.cfg
        if self._parallel:  # every process starts from rank 0's weights (they are built alike; this makes it sure)
            distributed.broadcast_(list(self.model.state_dict().values()))
        if self.run is not None and start_epoch == 0:
            self.run.save_checkpoint(0, self.model)
            self.run.set_stage("train", "running", **self._stage(last_checkpoint=0, epochs=cfg.epochs))
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.steps_per_epoch * (self._expected_last(start_epoch) - start_epoch), desc="train",
                       unit="step", dynamic_ncols=True, leave=False)
        # cuDNN autotuning pays off here (a few fixed batch shapes); given back to the caller's setting after
        try:
            with cudnn_autotune(torch.backends.cudnn.benchmark or self.device.type == "cuda"), \
                    arithmetic(self.arithmetic):
                self._fit_epochs(start_epoch, bar)
        finally:
            if bar is not None:
                bar.close()
        done = len(self.metrics)
        if cfg.auto and self.settle_from is None and _class_labels(self.task):
            self.log(self._cap_line())
        if self.run is not None:
            self.run.set_stage("train", "done", **self._stage(last_checkpoint=done, epochs=done))
        return self.history()

    def _expected_last(self, epoch: int) -> int:
        """The progress bar's last epoch after `epoch`: the fixed epochs; with --epochs auto the end of the cosine
        cycle under way plus the settling epochs, until the threshold is reached (then the known end)."""
        cfg = self.cfg
        if not cfg.auto or self.settle_from is not None:
            return self.last_epoch()
        end, length = cfg.auto_cycle, cfg.auto_cycle
        while end <= epoch:
            length *= 2
            end += length
        return min(cfg.max_epochs, end + cfg.settle_epochs)

    def _cap_line(self) -> str:
        """What --epochs auto says when it stops at --max-epochs before the threshold."""
        kind = self.task.memorized_kind
        last = self.metrics[-1] if self.metrics else {}
        value = last.get(f"{kind}_train_acc")
        what = (f"{kind}-train {100 * value:.1f}%, below the {100 * MEMORIZED:.0f}% that counts as memorized"
                if value is not None else
                f"training accuracy {100 * (last.get('clean_train_acc') or 0):.1f}%, below 100%")
        return (f"epochs auto: stopped at the cap of {self.cfg.max_epochs} epochs (--max-epochs) with {what}: "
                "raise --max-epochs, or see docs/your-data.md for what else helps a model memorize")

    def _fit_epochs(self, start_epoch: int, bar) -> None:
        cfg = self.cfg
        kind = self.task.memorized_kind
        epoch = start_epoch
        while epoch < self.last_epoch():
            epoch += 1
            t0 = time.perf_counter()
            stats = self._epoch(epoch, bar)
            t1 = time.perf_counter()
            acc = evaluate(self.model, self.data, batch_size=cfg.eval_batch_size)
            t2 = time.perf_counter()
            record = {"epoch": epoch, "lr": self.learning_rate(epoch * self.steps_per_epoch - 1),
                      **stats, **acc, "epoch_time_s": round(t1 - t0, 4), "eval_time_s": round(t2 - t1, 4)}
            self.metrics.append(record)
            self.log(format_record(record) + ("  [eval mode: every unit on]" if self._tied else ""))
            if cfg.auto and self.settle_from is None and memorized(record, kind):
                self.settle_from = epoch
                what = (f"{kind}-train {100 * record[f'{kind}_train_acc']:.1f}% >= {100 * MEMORIZED:.0f}%"
                        if record.get(f"{kind}_train_acc") is not None else "every training example right")
                more = self.last_epoch() - epoch
                self.log(f"epochs auto: {what} at epoch {epoch}: " + (
                    f"{more} more epoch{'s' if more != 1 else ''}, the learning rate annealed to 0 (--settle-epochs)"
                    if more else "stopping here"))
            if bar is not None:
                bar.set_postfix_str(_short(record))
                total = self.steps_per_epoch * (self._expected_last(epoch) - start_epoch)
                if total != bar.total:
                    bar.total = total
                    bar.refresh()
            if self.run is not None:
                self._save_epoch(epoch)

    def history(self) -> History:
        k = len(self.metrics)  # the epochs trained (--epochs auto: fewer rows than were made room for)
        records = {"loss": self.rec_loss[:k].cpu().numpy(), "margin": self.rec_margin[:k].cpu().numpy(),
                   "correct": self.rec_correct[:k].cpu().numpy()}
        return History(self.metrics, records, self.accounting.arrays(k) if self.accounting.active else None,
                       self.elr_targets.cpu().numpy() if self.elr_targets is not None else None)


def _pct(v) -> str:
    return "  -  " if v is None else f"{100 * v:5.1f}"


def _subset_keys(r: dict) -> list[str]:
    """The per-subset accuracies of an epoch record, in the task's order ("clean_train_acc", ..., "test_acc")."""
    return [k for k in r if k.endswith("_acc") and k not in ("train_acc", "noisy_train_true_acc")]


def _label(key: str) -> str:
    return key[:-4].replace("_", "-")


def _short(r: dict) -> str:
    return " ".join(f"{_label(k).replace('-train', '')} {_pct(r[k])}" for k in _subset_keys(r) if r[k] is not None)


def format_record(r: dict) -> str:
    subsets = "  ".join(f"{_label(k)} {_pct(r[k])}" for k in _subset_keys(r))
    return (f"epoch {r['epoch']:3d}  loss {r['train_loss']:.3f}  train {_pct(r['train_acc'])}  {subsets}  "
            f"({r['epoch_time_s']:.1f}s + eval {r['eval_time_s']:.1f}s)")


def train(model: nn.Module, data: Examples, cfg: TrainConfig | None = None, *, run: RunDir | str | Path | None = None,
          progress: bool = False, log: Callable[[str], None] | None = None, **options: Any) -> History:
    """Train `model` on `data` with the paper's recipe (see :class:`TrainConfig`; `options` override it).

    Returns the :class:`History`: ``metrics`` (one dict per epoch), ``records``
    (loss, margin (E, N) float16, correct (E, N) bool: training history for
    :func:`memloc.detect`) and ``gradients`` (gradient accounting, (layers, epochs)).
    With `run` (a RunDir, or a path for a new one), every epoch's checkpoint
    (epoch 0 = initialization) and the records are written there: what
    :func:`memloc.rewind` and :func:`memloc.retrain` need. The model is moved to the device.
    """
    cfg = replaced(TrainConfig, cfg, options)
    prepare(model, data)
    cfg = cfg.with_recipe(registry_name(model), task_of(data).num_train)  # what config.json records
    cfg = fit_training(cfg, data, log)
    if run is None:
        return Trainer(model, data, cfg, progress=progress, log=log).fit()
    with exclusive(run.path if isinstance(run, RunDir) else run):  # one writer per run for the whole training
        if not isinstance(run, RunDir):
            run = RunDir.create(run)
        if not run.has("config.json"):  # a run of memloc's own (run_training) keeps its files
            run.save_arrays("data.npz", **data.arrays())
            run.write_json("config.json", {"data": {"dataset": data.name, "noise": None},
                                           "model": {"name": type(model).__name__, "width": None},
                                           "train": {k: v for k, v in vars(cfg).items()
                                                     if not (k == "elr" and v is None)},  # as before ELR
                                           "source": "python api"})
        with run.working("train"):
            return Trainer(model, data, cfg, run=run, progress=progress, log=log).fit()


def fit_training(cfg: TrainConfig, data: Any, log: Callable[[str], None] | None = None) -> TrainConfig:
    """`cfg` with its batch size fitted to the data's training examples (`options.fitted`: a default batch larger
    than the data shrinks to it with one line to `log`, one the user set is refused in one line)."""
    n = task_of(data).num_train
    size = fitted(cfg, "batch_size", n, "training examples", log)
    return cfg if size == cfg.batch_size else replace(cfg, batch_size=size)


def prepare(model: nn.Module, data: Any, *, layers: Sequence[str] | None = None) -> list[Layer]:
    """Check that `model` fits `data` and return its layers (or the named ones); quick, before any long work.

    Records the data's input shape on the model as ``model.input_shape`` (as
    memloc's own models carry it), so that :func:`memloc.layers` finds the
    layers by tracing a forward pass, in forward order, for any architecture.
    Raises ConfigError for a model without conv/linear layers, a model that
    cannot take the data's shape, outputs the task cannot read, and unknown layer names.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch nn.Module, got {type(model).__name__}")
    task = task_of(data)
    if not any(True for _ in model.parameters()):
        raise ConfigError("the model has no parameters, so no conv or linear layers: memloc probes units of conv "
                          "and linear layers")
    shape = tuple(task.data.input_shape)
    dev = next(model.parameters()).device
    example = task.example_input(2, dev)
    check_input(model, shape, example=example)
    model.input_shape = shape
    all_layers = find_layers(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        model.train(was_training)
    task.check_outputs(out)
    return select_layers(all_layers, list(layers) if layers else None)
