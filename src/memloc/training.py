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

Under torchrun (`memloc.distributed`; docs/cluster.md) one run trains in K processes, data
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

from . import data as data_mod
from . import distributed
from .accounting import GradientAccounting
from .data import Dataset
from .errors import ConfigError, RunError
from .inference import indices_context
from .models import Layer, check_input, select_layers
from .models import layers as find_layers
from .options import INT64_MAX, check_ranges, fitted, floats, given_option, option, replaced
from .precision import LEGACY, PRECISIONS, arithmetic, autocast, choose, cudnn_autotune
from .runs import RunDir, exclusive, load_state, save_state
from .tasks import task_of

SCHEDULES = ("cosine", "onecycle", "constant")
OPTIMIZERS = ("sgd", "adamw")
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


@dataclass
class TrainConfig:
    """How to train. Defaults are the paper's recipe except `lr` and `epochs` (chosen by measurement, README)."""

    epochs: int = option(40, "training epochs", at_least=1)
    lr: float = option(0.1, "peak learning rate", above=0)
    batch_size: int = option(512, "training batch size (the default: all the training examples where there are "
                             "fewer)", at_least=1)
    optimizer: str = option("sgd", "sgd (momentum 0.9: the paper's) or adamw (betas 0.9, 0.95: language models)",
                            choices=OPTIMIZERS)
    momentum: float = option(0.9, cli=False, at_least=0, below=1)
    weight_decay: float = option(5e-4, "weight decay (the paper's 5e-4; language models 0.1)", at_least=0)
    clip: float | None = option(None, "clip the gradient norm of each step to this (language models: 1.0)", above=0)
    schedule: str = option("cosine", "cosine with linear warm-up (the paper's), onecycle (triangle) or constant",
                           choices=SCHEDULES)
    warmup: float = option(0.1, "fraction of steps of warm-up (cosine) or to the peak (onecycle)", at_least=0,
                           below=1)
    seed: int = option(0, "seed of the initialization and the training order", at_least=0, at_most=INT64_MAX)
    augment: bool = option(False, "random crop + flip (off in the paper's main runs)")
    gradient_accounting: bool = option(True, "skip gradient accounting (the clean and noisy gradient shares)",
                                       negate="--no-gradient-accounting")
    checkpoint_every: int = option(1, "save the model every K epochs", at_least=1)
    elr: tuple[float, float] | None = option(None, "early-learning regularization (Liu et al. 2020; classification): "
                                             "lambda * log(1 - <t, p>) with per-example targets t of momentum beta, "
                                             "e.g. 3,0.7 (CIFAR-10's; CIFAR-100's 7,0.9; mnist5k: 3,0.9); docs/elr.md",
                                             parse=_elr_pair, metavar="LAMBDA,BETA")
    precision: str = option("auto", "auto: bf16 autocast on a GPU, and on a CPU with native bf16 (AVX512-BF16/AMX) for "
                            "convolutional models, with channels_last images; fp32 elsewhere (docs/speed.md); "
                            "or fp32 / bf16 everywhere", choices=PRECISIONS)
    eval_batch_size: int = option(1024, cli=False, result=False, at_least=1)
    device: str = option("auto", "auto (cuda when present), cpu or cuda", result=False)
    compile: bool = option(False, "torch.compile the model (GPU)", result=False)
    given: tuple[str, ...] | None = given_option()

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS + (LEGACY,):
            raise ConfigError(f"unknown precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        self.elr = elr_setting(self.elr)


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


class Trainer:
    """Trains `model` on `data` as `cfg` says; one object holds the on-device accumulators."""

    def __init__(self, model: nn.Module, data: Dataset, cfg: TrainConfig, *, run: RunDir | None = None,
                 progress: bool = True, log: Callable[[str], None] | None = None):
        self.cfg, self.data, self.run = cfg, data, run
        self.task = task_of(data)
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
        n, e = self.task.num_train, cfg.epochs
        self.steps_per_epoch = math.ceil(n / cfg.batch_size)
        self.indices_ctx = indices_context(self.model, self.task)
        self._params = [p for p in self.model.parameters() if p.requires_grad]  # what torchrun's processes sum
        dev = self.device
        self.rec_loss = torch.zeros(e, n, dtype=torch.float16, device=dev)
        self.rec_margin = torch.zeros(e, n, dtype=torch.float16, device=dev)
        self.rec_correct = torch.zeros(e, n, dtype=torch.bool, device=dev)
        memorized = self.task.kind_mask(self.task.memorized_kind) if cfg.gradient_accounting else None
        self.accounting = GradientAccounting(self.model, memorized, e, dev)
        self.metrics: list[dict] = []
        self.elr_targets = None  # (N, C) float32 on the device, with --elr only
        if cfg.elr is not None:
            if self.task.name != "classification":
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
        from .runs import load_into
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
        if last > 0:
            rec = run.load_arrays("examples.npz", "loss", "margin", "correct_bits")
            k = last
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
            for xb, yb, idx in data_mod.batches(x, y, batch_size=b, order=order, device=self.device):
                yield xb, yb, idx, len(idx)
            return
        for start in range(0, len(order), b):
            whole = order[start:start + b]
            part = whole.tensor_split(self.world_size)[self.rank]
            if len(part) == 0:
                yield None, None, part.to(self.device), len(whole)
                continue
            xb, yb, idx = next(data_mod.batches(x, y, batch_size=len(part), order=part, device=self.device))
            yield xb, yb, idx, len(whole)

    def _epoch(self, epoch: int, bar) -> dict:
        cfg, model, dev, task, acc = self.cfg, self.model, self.device, self.task, self.accounting
        n, b = task.num_train, cfg.batch_size
        total_steps = self.steps_per_epoch * cfg.epochs
        e = epoch - 1  # records row
        model.train()
        with seeded(epoch_seed(cfg.seed, epoch), dev):
            order = torch.randperm(n)  # on the CPU: the same order on every device
            split = acc.start_epoch(order, b)
            loss_sum = torch.zeros((), device=dev)
            correct_sum = torch.zeros((), device=dev)
            elr_sum = torch.zeros((), device=dev) if cfg.elr is not None else None
            for step, (xb, yb, idx, size) in enumerate(self._batches(order, b)):
                lr = learning_rate((epoch - 1) * self.steps_per_epoch + step, total_steps, cfg)
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
        if epoch % self.cfg.checkpoint_every == 0 or epoch == self.cfg.epochs:
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
            bar = tqdm(total=self.steps_per_epoch * (cfg.epochs - start_epoch), desc="train", unit="step",
                       dynamic_ncols=True, leave=False)
        # cuDNN autotuning pays off here (a few fixed batch shapes); given back to the caller's setting after
        try:
            with cudnn_autotune(torch.backends.cudnn.benchmark or self.device.type == "cuda"), \
                    arithmetic(self.arithmetic):
                self._fit_epochs(start_epoch, bar)
        finally:
            if bar is not None:
                bar.close()
        if self.run is not None:
            self.run.set_stage("train", "done", **self._stage(last_checkpoint=cfg.epochs, epochs=cfg.epochs))
        return self.history()

    def _fit_epochs(self, start_epoch: int, bar) -> None:
        cfg = self.cfg
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            t0 = time.perf_counter()
            stats = self._epoch(epoch, bar)
            t1 = time.perf_counter()
            acc = evaluate(self.model, self.data, batch_size=cfg.eval_batch_size)
            t2 = time.perf_counter()
            record = {"epoch": epoch, "lr": learning_rate(epoch * self.steps_per_epoch - 1,
                                                          self.steps_per_epoch * cfg.epochs, cfg),
                      **stats, **acc, "epoch_time_s": round(t1 - t0, 4), "eval_time_s": round(t2 - t1, 4)}
            self.metrics.append(record)
            self.log(format_record(record) + ("  [eval mode: every unit on]" if self._tied else ""))
            if bar is not None:
                bar.set_postfix_str(_short(record))
            if self.run is not None:
                self._save_epoch(epoch)


    def history(self) -> History:
        records = {"loss": self.rec_loss.cpu().numpy(), "margin": self.rec_margin.cpu().numpy(),
                   "correct": self.rec_correct.cpu().numpy()}
        return History(self.metrics, records, self.accounting.arrays() if self.accounting.active else None,
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


def train(model: nn.Module, data: Dataset, cfg: TrainConfig | None = None, *, run: RunDir | str | Path | None = None,
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
