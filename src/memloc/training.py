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
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_mod
from .data import Dataset
from .errors import ConfigError, RunError
from .models import Layer, layers as find_layers
from .precision import autocast, cudnn_autotune
from .runs import RunDir, load_state, save_state

SCHEDULES = ("cosine", "onecycle", "constant")


@dataclass
class TrainConfig:
    """How to train. Defaults are the paper's recipe except `lr` and `epochs` (chosen by measurement, README)."""

    epochs: int = 40
    lr: float = 0.1
    batch_size: int = 512
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine with linear warm-up (the paper's); onecycle (triangle); constant
    warmup: float = 0.1  # fraction of steps of linear warm-up (cosine) or to the peak (onecycle)
    seed: int = 0
    augment: bool = False
    gradient_accounting: bool = True
    checkpoint_every: int = 1
    eval_batch_size: int = 1024
    device: str = "auto"  # auto: cuda when present
    compile: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, not {self.epochs}")
        if not (self.lr > 0) or math.isinf(self.lr):
            raise ConfigError(f"learning rate must be positive, not {self.lr}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, not {self.batch_size}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if not (0.0 <= self.warmup < 1.0):
            raise ConfigError(f"warm-up fraction {self.warmup} is outside [0, 1)")
        if self.checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be at least 1, not {self.checkpoint_every}")


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


def _indices_context(model: nn.Module):
    """The context that hands example indices to example-tied dropout layers (a no-op without them)."""
    from .dropout import example_indices, find_example_tied_dropout
    return example_indices if find_example_tied_dropout(model) else (lambda m, i: contextlib.nullcontext())


def model_input(xb: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = data_mod.normalize(xb)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" and x.dim() == 4 else x


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1024, with_indices: bool = False,
            device: torch.device | None = None) -> torch.Tensor:
    """Logits (N, K) in float32 for stored images x (N, C, H, W), in eval mode.

    With `with_indices` the dataset positions are handed to example-tied dropout
    (its `tied` mode evaluates each training example through its own mask).
    """
    device = device or next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}  # restored one by one: a partly frozen model stays so
    model.eval()
    ctx = _indices_context(model)
    outs = []
    try:
        for xb, _, idx in data_mod.batches(x, torch.zeros(len(x), dtype=torch.long, device=x.device),
                                           batch_size=batch_size, device=device):
            with autocast(device), (ctx(model, idx) if with_indices else contextlib.nullcontext()):
                outs.append(model(model_input(xb, device)).float())
    finally:
        for m, training in modes.items():
            m.training = training
    return torch.cat(outs) if outs else torch.zeros(0)


def subset_accuracies(correct: torch.Tensor, data: Dataset, pred: torch.Tensor | None = None) -> dict[str, float | None]:
    """clean/noisy/rare training accuracy (against the given labels) from a (N,) correct mask."""
    def acc(mask: torch.Tensor) -> float | None:
        n = int(mask.sum())
        return float(correct[mask].float().mean()) if n else None
    clean = ~data.is_noisy
    out = {"clean_train_acc": acc(clean), "noisy_train_acc": acc(data.is_noisy), "rare_train_acc": acc(data.is_rare)}
    if pred is not None and bool(data.is_noisy.any()):
        # how many memorized... or still predicted their true class
        out["noisy_train_true_acc"] = float((pred[data.is_noisy] == data.y_true[data.is_noisy]).float().mean())
    return out


def evaluate(model: nn.Module, data: Dataset, *, batch_size: int = 1024, with_indices: bool = False) -> dict[str, float | None]:
    """Clean-train, noisy-train, rare-train and test accuracy in eval mode (fractions in [0, 1])."""
    device = next(model.parameters()).device
    pred_tr = predict(model, data.x_train, batch_size=batch_size, with_indices=with_indices, device=device).argmax(1)
    pred_tr = pred_tr.to(data.y_train.device)
    out = subset_accuracies(pred_tr == data.y_train, data, pred_tr)
    if len(data.x_test) == 0:  # a dataset given without a test split (memloc.wrap_data)
        out["test_acc"] = None
        return out
    pred_te = predict(model, data.x_test, batch_size=batch_size, device=device).argmax(1).to(data.y_test.device)
    out["test_acc"] = float((pred_te == data.y_test).float().mean()) if len(pred_te) else None
    return out


# ----------------------------------------------------------------------------- the trainer

@dataclass
class History:
    """What training produced, as arrays (also written to the run directory when there is one)."""

    metrics: list[dict]
    records: dict[str, np.ndarray]  # loss, margin: (E, N) float16; correct: (E, N) bool
    gradients: dict[str, np.ndarray] | None  # clean_norm, noisy_norm, cosine: (L, E); layer_names


class Trainer:
    """Trains `model` on `data` as `cfg` says; one object holds the on-device accumulators."""

    def __init__(self, model: nn.Module, data: Dataset, cfg: TrainConfig, *, run: RunDir | None = None,
                 progress: bool = True, log: Callable[[str], None] | None = None):
        self.cfg, self.data, self.run = cfg, data, run
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.compile:
            import torch._functorch.config as functorch_config
            functorch_config.donated_buffer = False  # the accounting's first backward retains the graph
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.progress, self.log = progress, (log or (lambda s: None))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay, nesterov=False,
                                   fused=self.device.type == "cuda" or None)
        n, e = data.num_train, cfg.epochs
        self.steps_per_epoch = math.ceil(n / cfg.batch_size)
        self.is_noisy_dev = data.is_noisy.to(self.device)
        self.is_noisy_cpu = data.is_noisy.cpu()
        self.indices_ctx = _indices_context(self.model)
        dev = self.device
        self.rec_loss = torch.zeros(e, n, dtype=torch.float16, device=dev)
        self.rec_margin = torch.zeros(e, n, dtype=torch.float16, device=dev)
        self.rec_correct = torch.zeros(e, n, dtype=torch.bool, device=dev)
        self.accounting = cfg.gradient_accounting and bool(self.is_noisy_cpu.any()) and bool((~self.is_noisy_cpu).any())
        self.layers: list[Layer] = find_layers(self.model) if self.accounting else []
        if self.accounting:
            params = dict(self.model.named_parameters())
            self.acc_names = [p for l in self.layers for p in l.params if params[p].requires_grad]
            self.acc_params = [params[p] for p in self.acc_names]
            self.grad_clean = torch.zeros(len(self.layers), e, device=dev)
            self.grad_noisy = torch.zeros(len(self.layers), e, device=dev)
            self.grad_cos = torch.zeros(len(self.layers), e, device=dev)
        self.metrics: list[dict] = []

    # -- state for checkpoints and resume
    def _optimizer_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, p in enumerate(self.model.parameters()):
            buf = self.opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                out[f"momentum.{i}"] = buf
        return out

    def _load_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        for i, p in enumerate(self.model.parameters()):
            if f"momentum.{i}" in state:
                self.opt.state[p]["momentum_buffer"] = state[f"momentum.{i}"].to(p.device, p.dtype).clone()

    def restore(self, run: RunDir) -> int:
        """Load the newest complete checkpoint of `run`; return the epoch to continue from."""
        last = run.stage("train").get("last_checkpoint")
        if last is None:
            raise RunError(f"{run.path} has no complete checkpoint to resume from: start it again with --overwrite")
        from .runs import load_into
        load_into(self.model, run.load_checkpoint(last), source=str(run.checkpoint_path(last)))
        if last > 0:
            self._load_optimizer_state(load_state(run.checkpoint_dir / f"optimizer_{last:03d}.safetensors"))
        self.metrics = [m for m in run.read_metrics() if m["epoch"] <= last]
        if last > 0:
            rec = run.load_arrays("examples.npz", "loss", "margin", "correct_bits")
            k = last
            self.rec_loss[:k] = torch.from_numpy(rec["loss"][:k]).to(self.device)
            self.rec_margin[:k] = torch.from_numpy(rec["margin"][:k]).to(self.device)
            correct = np.unpackbits(rec["correct_bits"], axis=1, count=self.data.num_train).astype(bool)
            self.rec_correct[:k] = torch.from_numpy(correct[:k]).to(self.device)
            if self.accounting and run.has("gradients.npz"):
                g = run.load_arrays("gradients.npz", "clean_norm", "noisy_norm", "cosine")
                self.grad_clean[:, :k] = torch.from_numpy(g["clean_norm"][:, :k]).to(self.device)
                self.grad_noisy[:, :k] = torch.from_numpy(g["noisy_norm"][:, :k]).to(self.device)
                self.grad_cos[:, :k] = torch.from_numpy(g["cosine"][:, :k]).to(self.device)
        return last

    # -- one epoch
    def _epoch(self, epoch: int, bar) -> dict:
        cfg, model, dev = self.cfg, self.model, self.device
        n, b = self.data.num_train, cfg.batch_size
        total_steps = self.steps_per_epoch * cfg.epochs
        e = epoch - 1  # records row
        model.train()
        with seeded(epoch_seed(cfg.seed, epoch), dev):
            order = torch.randperm(n)  # on the CPU: the same order on every device
            noisy_per_batch = [bool(self.is_noisy_cpu[order[s:s + b]].any()) for s in range(0, n, b)]
            if self.accounting:
                noisy_sum = [torch.zeros_like(p) for p in self.acc_params]
                total_sum = [torch.zeros_like(p) for p in self.acc_params]
            loss_sum = torch.zeros((), device=dev)
            correct_sum = torch.zeros((), device=dev)
            for step, (xb, yb, idx) in enumerate(data_mod.batches(self.data.x_train, self.data.y_train, batch_size=b,
                                                                  order=order, device=dev)):
                lr = learning_rate((epoch - 1) * self.steps_per_epoch + step, total_steps, cfg)
                for group in self.opt.param_groups:
                    group["lr"] = lr
                x = data_mod.normalize(xb)
                if cfg.augment:
                    x = data_mod.augment(x)
                if dev.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(dev), self.indices_ctx(model, idx):
                    out = self.forward(x).float()  # (B, K)
                loss_vec = F.cross_entropy(out, yb, reduction="none")  # (B,)
                self.opt.zero_grad(set_to_none=True)
                if self.accounting and noisy_per_batch[step]:
                    # noisy examples' share of the batch loss: same graph, full-batch BatchNorm statistics
                    w = self.is_noisy_dev[idx].float() / len(idx)
                    g_noisy = torch.autograd.grad((loss_vec * w).sum(), self.acc_params, retain_graph=True,
                                                  allow_unused=True)
                    torch._foreach_add_(noisy_sum, [g if g is not None else torch.zeros_like(p)
                                                    for g, p in zip(g_noisy, self.acc_params)])
                loss_vec.mean().backward()
                if self.accounting:
                    torch._foreach_add_(total_sum, [p.grad if p.grad is not None else torch.zeros_like(p)
                                                    for p in self.acc_params])
                self.opt.step()
                with torch.no_grad():
                    ld = loss_vec.detach()
                    true_logit = out.gather(1, yb[:, None]).squeeze(1)
                    other = out.detach().scatter(1, yb[:, None], float("-inf")).amax(1)
                    self.rec_loss[e, idx] = ld.half()
                    self.rec_margin[e, idx] = (true_logit - other).detach().half()
                    self.rec_correct[e, idx] = out.argmax(1) == yb
                    loss_sum += ld.sum()
                    correct_sum += (out.argmax(1) == yb).sum()
                if bar is not None:
                    bar.update(1)
        if self.accounting:
            self._close_accounting(e, noisy_sum, total_sum)
        train_stats = {"train_loss": float(loss_sum) / n, "train_acc": float(correct_sum) / n}
        return train_stats

    @torch.no_grad()
    def _close_accounting(self, e: int, noisy_sum: list[torch.Tensor], total_sum: list[torch.Tensor]) -> None:
        pos = {name: i for i, name in enumerate(self.acc_names)}
        for li, layer in enumerate(self.layers):
            ids = [pos[p] for p in layer.params if p in pos]
            noisy = torch.cat([noisy_sum[i].flatten() for i in ids])
            clean = torch.cat([total_sum[i].flatten() for i in ids]) - noisy
            scale = math.sqrt(layer.num_params)
            self.grad_clean[li, e] = clean.norm() / scale
            self.grad_noisy[li, e] = noisy.norm() / scale
            self.grad_cos[li, e] = F.cosine_similarity(clean, noisy, dim=0, eps=1e-30)

    # -- saving
    def _save_epoch(self, epoch: int) -> None:
        run = self.run
        k = epoch
        correct = self.rec_correct[:k].cpu().numpy()
        run.save_arrays("examples.npz", loss=self.rec_loss[:k].cpu().numpy(), margin=self.rec_margin[:k].cpu().numpy(),
                        correct_bits=np.packbits(correct, axis=1), num_examples=np.array(self.data.num_train))
        if self.accounting:
            run.save_arrays("gradients.npz", clean_norm=self.grad_clean[:, :k].cpu().numpy(),
                            noisy_norm=self.grad_noisy[:, :k].cpu().numpy(), cosine=self.grad_cos[:, :k].cpu().numpy(),
                            layer_names=np.array([l.name for l in self.layers]),
                            num_params=np.array([l.num_params for l in self.layers]),
                            epochs=np.arange(1, k + 1))
        run.write_metrics(self.metrics)
        if epoch % self.cfg.checkpoint_every == 0 or epoch == self.cfg.epochs:
            run.save_checkpoint(epoch, self.model)
            save_state(run.checkpoint_dir / f"optimizer_{epoch:03d}.safetensors", self._optimizer_state())
            run.set_stage("train", "running", last_checkpoint=epoch, epochs=self.cfg.epochs)
            for f in run.checkpoint_dir.glob("optimizer_*.safetensors"):  # only the newest is needed to resume
                if f.name != f"optimizer_{epoch:03d}.safetensors":
                    f.unlink()

    def fit(self, start_epoch: int = 0) -> History:
        cfg = self.cfg
        if self.run is not None and start_epoch == 0:
            self.run.save_checkpoint(0, self.model)
            self.run.set_stage("train", "running", last_checkpoint=0, epochs=cfg.epochs)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.steps_per_epoch * (cfg.epochs - start_epoch), desc="train", unit="step",
                       dynamic_ncols=True, leave=False)
        # cuDNN autotuning pays off here (a few fixed batch shapes); given back to the caller's setting after
        try:
            with cudnn_autotune(torch.backends.cudnn.benchmark or self.device.type == "cuda"):
                self._fit_epochs(start_epoch, bar)
        finally:
            if bar is not None:
                bar.close()
        if self.run is not None:
            self.run.set_stage("train", "done", last_checkpoint=cfg.epochs, epochs=cfg.epochs)
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
            self.log(format_record(record))
            if bar is not None:
                bar.set_postfix_str(_short(record))
            if self.run is not None:
                self._save_epoch(epoch)


    def history(self) -> History:
        grads = None
        if self.accounting:
            grads = {"clean_norm": self.grad_clean.cpu().numpy(), "noisy_norm": self.grad_noisy.cpu().numpy(),
                     "cosine": self.grad_cos.cpu().numpy(), "layer_names": np.array([l.name for l in self.layers])}
        records = {"loss": self.rec_loss.cpu().numpy(), "margin": self.rec_margin.cpu().numpy(),
                   "correct": self.rec_correct.cpu().numpy()}
        return History(self.metrics, records, grads)


def _pct(v) -> str:
    return "  -  " if v is None else f"{100 * v:5.1f}"


def _short(r: dict) -> str:
    return f"clean {_pct(r.get('clean_train_acc'))} noisy {_pct(r.get('noisy_train_acc'))} test {_pct(r.get('test_acc'))}"


def format_record(r: dict) -> str:
    return (f"epoch {r['epoch']:3d}  loss {r['train_loss']:.3f}  train {_pct(r['train_acc'])}  "
            f"clean-train {_pct(r.get('clean_train_acc'))}  noisy-train {_pct(r.get('noisy_train_acc'))}  "
            f"test {_pct(r.get('test_acc'))}  ({r['epoch_time_s']:.1f}s + eval {r['eval_time_s']:.1f}s)")


def train(model: nn.Module, data: Dataset, cfg: TrainConfig | None = None, *, run: RunDir | None = None,
          progress: bool = False, log: Callable[[str], None] | None = None) -> History:
    """Train `model` on `data`; with `run`, write checkpoints, metrics and records into it."""
    trainer = Trainer(model, data, cfg or TrainConfig(), run=run, progress=progress, log=log)
    return trainer.fit()
