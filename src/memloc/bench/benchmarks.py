"""Localization benchmarks with a known answer (`memloc bench-localize`): every method of `memloc localize` on
TinyMem's arithmetic artifacts and on MemPi's injected sequences, beside the published numbers.

* ``tinymem`` (Sakarvadia et al., ICLR 2025): GPTs of ``n_layers`` layers (n_embd 128, 4 heads,
  ReLU, vocabulary 14, AdamW lr 1e-3, weight decay 0.1, betas (0.9, 0.98), batch 128, constant
  rate: TinyMem's) are trained on `memloc.tasks.lm.tinymem` data; the memorized artifacts are the
  noised training sequences whose 50-token continuation the model reproduces from their 50-token
  prompt. Each method localizes them (at most ``examples``, a seeded choice) among all MLP neurons
  and the top ``fraction`` of the neurons (pooled over layers) is zeroed. Reported per method
  and fraction: the share of all trained artifacts memorized before and with the edit, the share
  of the memorized ones the edit removes, held-out clean next-token accuracy (teacher-forced,
  every position) and perplexity before and with the edit with the relative accuracy change,
  held-out clean continuation extraction, and the wall time of the scoring. With ``units`` weights
  (``--units weights``, or ``neurons,weights`` side by side) the weight methods of `memloc localize
  --units weights` (balanced-subnet, subnet, durable, random) localize the same artifacts among every
  weight of the MLP matrices, and the top ``weight_fractions`` of those weights (pooled) are zeroed
  (full 0.05%, 0.1%, 0.2%: a neuron owns 2 x n_embd weights, so 1% of the neurons is 1% of the
  weights); rows say ``unit_kind`` and count ``units`` in weights.
* ``inj`` (MemPi, Chang et al., NAACL 2024): ``inject`` held-out artifacts (never trained) are
  each fine-tuned into a seeded random ``ratio`` of the MLP neurons of every layer of the trained
  model (only those neurons' input rows, biases and output columns move: every other gradient is
  masked; Adam, up to ``inject_steps`` steps or loss < 0.05), then every method localizes the
  sequence with the top ceil(ratio x width) neurons per layer. Reported: recall@k of the injected
  ids per layer and pooled (the top k x layers over all neurons), mean over sequences.
* ``del`` (MemPi's naturally memorized sequences): a language-model run (``run``: any `memloc train --task lm`
  run; default: the preset's LM model, trained once into ``models``), the canaries it memorized in training
  (each canary once: its first training row; at most ``examples``, a seeded choice). Each method
  localizes each sequence alone (``others`` corpus rows kept), and the top ceil(ratio x width)
  neurons of every layer are zeroed (MemPi's 0.1% and 0.5%; 2% too: on a 0.5 M-parameter GPT,
  0.1% is one neuron a layer). Reported per method and ratio, means over the sequences: the
  sequence's own teacher-forced accuracy on its secret and its extraction before and with the
  edit (self), the same of the other memorized sequences (specificity = self drop - others
  drop), and the held-out corpus perplexity before and with the edit.

Presets: ``smoke`` (tests; under two minutes on 2 CPU cores), ``full`` (the CPU scale: see
TINYMEM_SCALE; del: the LM study's default model), ``paper`` (TinyMem's data size and depths, the LM paper
preset: needs a GPU). Results go into ``out``:
``bench.json`` (the config, every row, the published numbers, the machine), ``results.csv`` and
``results.md`` (one table, methods as rows) and ``report/index.html`` (the trade-off plots), rewritten
atomically after every layer count (del: every sequence).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import ConfigError, DataError, RunError
from ..core.files import load_into, load_state, save_state, write_json, write_text
from ..core.tasks import task_of
from ..core.training import resolve_device, seeded
from ..probes import localization as loc
from ..tasks.lm.gpt import GPT, GPTShape
from ..tasks.lm.text import TextData
from ..tasks.lm.tinymem import TinyMemConfig, tinymem_data
from .page import write_bench_report
from .tables import (
    COLUMNS,
    MEMPI_PUBLISHED,
    MEMPI_RANK,
    TINYMEM_BEFORE,
    TINYMEM_PUBLISHED,
    best_row,
    markdown_table,
    method_label,
    rows_csv,
    summarize,
)

BENCHMARKS = ("tinymem", "inj", "del")
PRESETS = ("smoke", "full", "paper")
KIND = "bench-localize"
MEMPI_UNITS = 36_864  # GPT-2 small's MLP neurons: MemPi's penalty 1000 is per mean over these
# what TinyMem scaled to run on 2 CPU cores (full preset), against the paper's setting
TINYMEM_SCALE = ("per family 500 training + 100 held-out sequences (paper 19,000 + 1,000), 100 noised (paper "
                 "1,000), 100-token sequences (paper 650-token context), 2 and 4 layers (paper 1-16), 30 epochs, "
                 "batch 64 (paper 128)")

# published numbers (REFERENCE_LM.md): TinyMem, math noise, best settings; MemPi's INJ ranking
DEL_RATIOS = (0.001, 0.005, 0.02)  # MemPi's two, and 2%: 0.1% of a small GPT's 384 neurons is one neuron


@dataclass
class BenchConfig:
    """One benchmark run. `preset` fills what is left None; every field can be set by hand."""

    benchmark: str = "tinymem"
    preset: str = "full"
    methods: tuple[str, ...] | None = None  # default: every method of each kind of `units`
    units: tuple[str, ...] = ("neurons",)  # tinymem: neurons, weights or both (each method on each kind it has)
    n_layers: tuple[int, ...] | None = None
    n_embd: int = 128
    n_head: int = 4
    data: TinyMemConfig | None = None
    epochs: int | None = None
    lr: float | None = None  # TinyMem's 1e-3 (smoke 3e-3)
    weight_decay: float = 0.1
    batch_size: int | None = None  # TinyMem's 128 (paper); 64 on a CPU: twice the steps from the same tokens
    fractions: tuple[float, ...] | None = None  # tinymem: pooled share of the MLP neurons zeroed
    weight_fractions: tuple[float, ...] | None = None  # tinymem, --units weights: pooled share of the MLP weights
    examples: int | None = None  # localize at most this many memorized artifacts (a seeded choice)
    others: int = 64
    method_steps: dict = field(default_factory=dict)  # steps of the learned methods, by method
    clean_rows: int = 256  # clean training rows beside the artifacts in the localization data
    # inj
    ratios: tuple[float, ...] | None = None  # inj: (0.001, 0.01) (MemPi); del: DEL_RATIOS
    inject: int | None = None
    inject_steps: int = 200
    inject_lr: float = 0.01
    inject_loss: float = 0.05
    # del
    run: str | None = None  # a language-model run directory; None: the preset's LM model, trained into `models`
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.benchmark not in BENCHMARKS:
            raise ConfigError(f"unknown benchmark {self.benchmark!r}: choose from {', '.join(BENCHMARKS)}")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}: choose from {', '.join(PRESETS)}")
        self.units = tuple(self.units)
        bad = [u for u in self.units if u not in loc.UNIT_KINDS]
        if bad or not self.units:
            raise ConfigError(f"unknown --units {bad[0] if bad else ''!r}: choose from {', '.join(loc.UNIT_KINDS)}")
        if "weights" in self.units and self.benchmark != "tinymem":
            raise ConfigError(f"--units weights is for --benchmark tinymem: {self.benchmark} counts neurons "
                              "(injected or zeroed per layer); drop --units")
        if self.methods is None:
            self.methods = tuple(dict.fromkeys(m for u in self.units for m in _kind_methods(u)))
        self.methods = tuple(self.methods)
        bad = [m for m in self.methods if m not in loc.ALL_METHODS]
        if bad or not self.methods:
            raise ConfigError(f"unknown method {bad[0] if bad else ''!r}: choose from {', '.join(loc.ALL_METHODS)}")
        kindless = [m for m in self.methods if not any(m in _kind_methods(u) for u in self.units)]
        if kindless:
            raise ConfigError(f"--methods {kindless[0]} has no form for --units {','.join(self.units)}: neurons take "
                              f"{', '.join(loc.METHODS)}; weights take {', '.join(loc.WEIGHT_METHODS)}")
        smoke, paper = self.preset == "smoke", self.preset == "paper"
        if self.data is None and self.benchmark != "del":
            self.data = (TinyMemConfig(families=(2, 7), sequences=200, test=30, artifacts=60, repeats=4, length=40,
                                       prompt=20, continuation=20, seed=self.seed) if smoke
                         else TinyMemConfig(sequences=19_000, test=1_000, artifacts=1_000, seed=self.seed) if paper
                         else TinyMemConfig(seed=self.seed))
        if self.benchmark == "del" and self.n_layers is not None:
            raise ConfigError("--layers sets the depths of tinymem and inj; del localizes in the LM run's model: drop "
                              "--layers (train the LM you want with `memloc train --task lm` and pass --run)")
        if self.n_layers is None:
            self.n_layers = (2,) if smoke else (2, 4, 8, 16) if paper else (2, 4)
        if self.benchmark == "inj":
            self.n_layers = self.n_layers[:1] if smoke else tuple(n for n in self.n_layers if n == 4)[:1] or \
                self.n_layers[:1]
        if self.epochs is None and self.benchmark != "del":  # del: the LM preset's
            self.epochs = 60 if smoke else 40 if paper else 30
        if self.lr is None:
            self.lr = 3e-3 if smoke else 1e-3
        if self.batch_size is None:
            self.batch_size = 128 if paper else 64
        if self.fractions is None:
            self.fractions = (0.02,) if smoke else (0.01, 0.02, 0.05)
        if self.weight_fractions is None:  # a weight is finer than a neuron (which owns 2 x n_embd of them)
            self.weight_fractions = (0.002,) if smoke else (0.0005, 0.001, 0.002)
        if self.examples is None:
            self.examples = 32 if self.benchmark != "del" else 3 if smoke else 16
        if self.ratios is None:
            self.ratios = DEL_RATIOS if self.benchmark == "del" else (0.001, 0.01)
        if self.run is not None and self.benchmark != "del":
            raise ConfigError("--run is the language-model run of --benchmark del: drop it, or pass --benchmark del")
        if self.inject is None:
            self.inject = 1 if smoke else 4
        if not self.method_steps:
            self.method_steps = ({"slimming": 60, "hard-concrete": 60, "balanced-subnet": 40, "subnet": 40} if smoke
                                 else {"slimming": 300, "hard-concrete": 300, "balanced-subnet": 100, "subnet": 100})
        if smoke and self.n_embd == 128:
            self.n_embd = 64
        self.n_layers = tuple(int(n) for n in self.n_layers)
        self.fractions = tuple(float(f) for f in self.fractions)
        self.weight_fractions = tuple(float(f) for f in self.weight_fractions)
        self.ratios = tuple(float(r) for r in self.ratios)
        if min(self.n_layers) < 1 or (self.epochs is not None and self.epochs < 1):
            raise ConfigError("layer counts and --epochs must be at least 1")
        if not all(0 < f <= 1 for f in self.fractions + self.weight_fractions + self.ratios):
            raise ConfigError("fractions and ratios are shares of the neurons (weights): each in (0, 1]")
        if self.inject < 1 or self.examples < 1:
            raise ConfigError("--inject and --examples must be at least 1")

    def settings(self) -> dict:
        out = asdict(self)
        out["data"] = asdict(self.data) if self.data is not None else None
        return out

    def runs(self) -> list[tuple[str, str]]:
        """(units, method) pairs in order: each kind of `units`, each method it has."""
        return [(u, m) for u in self.units for m in self.methods if m in _kind_methods(u)]


def _kind_methods(units: str) -> tuple[str, ...]:
    return loc.WEIGHT_METHODS if units == "weights" else loc.METHODS


# ----------------------------------------------------------------------------- training

def model_key(n_layer: int, cfg: BenchConfig) -> str:
    """What a trained model depends on, hashed: the file name under which it is kept and found again."""
    what = {"data": asdict(cfg.data), "n_layer": n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
            "epochs": cfg.epochs, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
            "seed": cfg.seed}
    digest = hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    return f"tinymem-{n_layer}l-{digest}"


def train_tinymem(data: TextData, n_layer: int, cfg: BenchConfig, *, log: Callable[[str], None] = print) -> GPT:
    """A TinyMem GPT trained on `data`: AdamW (betas 0.9, 0.98), constant rate, every token's loss (the task's).
    Every 5 epochs the log says the loss, the memorized artifacts and the held-out clean accuracy."""
    device = resolve_device(cfg.device)
    shape = GPTShape(vocab_size=data.vocab_size, block_size=data.block_size, n_layer=n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd, activation="relu")
    with seeded(cfg.seed, device):
        model = GPT(shape).to(device)
    task = task_of(data)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=cfg.lr, betas=(0.9, 0.98))
    x, y = data.x_train.to(device), data.y_train.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for lo in range(0, len(x), cfg.batch_size):
            idx = order[lo:lo + cfg.batch_size].to(device)
            loss = task.loss(model(x[idx]), y[idx]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        if (epoch + 1) % 5 == 0 or epoch + 1 == cfg.epochs:
            m = _measure(model.eval(), data, [], None)
            model.train()
            log(f"  {n_layer} layers, epoch {epoch + 1}/{cfg.epochs}: loss {total / len(x):.4f}, artifacts memorized "
                f"{100 * float(m['memorized'].float().mean()):.1f}%, clean acc {100 * m['acc']:.2f}% "
                f"({time.perf_counter() - t0:.0f}s)")
    return model.eval()


def trained_model(data: TextData, n_layer: int, cfg: BenchConfig, models: Path | None, *,
                  log: Callable[[str], None]) -> tuple[GPT, float | None]:
    """The model `model_key` names from the `models` folder, else trained (and kept there). (model, training s)."""
    shape = GPTShape(vocab_size=data.vocab_size, block_size=data.block_size, n_layer=n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd, activation="relu")
    path = models / f"{model_key(n_layer, cfg)}.safetensors" if models is not None else None
    if path is not None and path.exists():
        model = GPT(shape)
        load_into(model, load_state(path), source=str(path))
        log(f"  {n_layer} layers: the trained model {path}")
        return model.to(resolve_device(cfg.device)).eval(), None
    t0 = time.perf_counter()
    model = train_tinymem(data, n_layer, cfg, log=log)
    seconds = round(time.perf_counter() - t0, 1)
    if path is not None:
        save_state(path, model.state_dict())
    return model, seconds


# ----------------------------------------------------------------------------- measures

def _match(pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((pred == t) | (t < 0)).all(1) & (t >= 0).any(1)


@torch.no_grad()
def _matches(model, x: torch.Tensor, y: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """(B,) every scored target token is the argmax (teacher-forced = greedy extraction; the task's `match`)."""
    device = next(model.parameters()).device
    return torch.cat([_match(model(x[i:i + rows].to(device)).argmax(-1), y[i:i + rows].to(device)).cpu()
                      for i in range(0, len(x), rows)]) if len(x) else torch.zeros(0, dtype=torch.bool)


@torch.no_grad()
def clean_quality(model, x: torch.Tensor, y: torch.Tensor, rows: int = 256) -> dict:
    """Teacher-forced next-token accuracy and perplexity over every trained position of `x` (B, T), and the share of
    rows whose scored continuation is reproduced (extraction)."""
    from ..tasks.lm.text import decode_targets
    device = next(model.parameters()).device
    correct = ce = count = 0.0
    extracted = 0
    for i in range(0, len(x), rows):
        logits = model(x[i:i + rows].to(device)).float()
        yt = y[i:i + rows].to(device)
        tokens, trained, scored = decode_targets(yt)
        nll = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none").view(tokens.shape)
        pred = logits.argmax(-1)
        correct += float(((pred == tokens) & trained).sum())
        ce += float((nll * trained).sum())
        count += float(trained.sum())
        extracted += int((((pred == tokens) | ~scored).all(1) & scored.any(1)).sum())
    return {"acc": correct / count, "ppl": math.exp(ce / count), "extraction": extracted / max(1, len(x))}


def artifact_rows(data: TextData) -> np.ndarray:
    """(A,) the first training row of every trained artifact (its copies share its canary id)."""
    canary = data.canary.numpy()
    ids, first = np.unique(canary, return_index=True)
    return np.sort(first[ids >= 0])


def _measure(model, data: TextData, candidates, mask) -> dict:
    art = torch.as_tensor(artifact_rows(data))
    clean_test = data.canary_test < 0
    ctx = loc.scoped_edit(model, candidates, mask) if mask is not None else contextlib.nullcontext()
    with ctx:
        mem = _matches(model, data.x_train[art], data.y_train[art])
        q = clean_quality(model, data.x_test[clean_test], data.y_test[clean_test])
    return {"memorized": mem, **q}


def _loc_data(data: TextData, train_rows: np.ndarray, test_rows: np.ndarray, *, extra=None) -> TextData:
    """A small TextData for `localize`: the given training rows (and `extra` (x, y, canary dict) rows appended as
    canaries), the given held-out rows; localize's own before/after passes then cost little."""
    tr = torch.as_tensor(train_rows, dtype=torch.long)
    te = torch.as_tensor(test_rows, dtype=torch.long)
    x, y, canary = data.x_train[tr], data.y_train[tr], data.canary[tr].clone()
    canaries = [dict(c) for c in data.canaries]
    if extra is not None:
        ex, ey, c = extra
        c = dict(c, id=len(canaries), trained=True)
        canaries.append(c)
        x, y = torch.cat([x, ex[None]]), torch.cat([y, ey[None]])
        canary = torch.cat([canary, torch.tensor([c["id"]])])
    return TextData(data.name, x, y, canary, data.x_test[te], data.y_test[te], data.canary_test[te], canaries,
                    data.vocab_size)


def _method_options(method: str, cfg: BenchConfig, units: int) -> dict:
    opts: dict = {}
    if method in cfg.method_steps:
        opts["steps"] = int(cfg.method_steps[method])
    if method in ("slimming", "hard-concrete"):
        opts["penalty"] = 1000.0 * units / MEMPI_UNITS  # MemPi's pull per neuron, on this model's neuron count
    return opts


# ----------------------------------------------------------------------------- tinymem

def _tinymem_rows(model, data: TextData, n_layer: int, cfg: BenchConfig, log) -> list[dict]:
    layers = loc.candidate_layers(model, loc.LocalizeConfig())
    kinds = {"neurons": layers, "weights": loc.weight_matrices(model, layers)}  # what each kind zeroes
    units = sum(l.units for l in layers)
    base = _measure(model, data, layers, None)
    art_idx = artifact_rows(data)
    mem_idx = art_idx[base["memorized"].numpy()]
    n_art = len(art_idx)
    log(f"  {n_layer} layers: {len(mem_idx)} of {n_art} artifacts memorized ({100 * len(mem_idx) / n_art:.1f}%), "
        f"clean acc {100 * base['acc']:.2f}%, ppl {base['ppl']:.3f}")
    common = {"n_layer": n_layer, "units": units, "artifacts": n_art, "memorized_before": len(mem_idx) / n_art,
              "acc_before": base["acc"], "ppl_before": base["ppl"], "clean_extraction_before": base["extraction"]}
    if not len(mem_idx):
        return [dict(common, method=m, unit_kind=u, note="no artifact memorized: nothing to localize")
                for u, m in cfg.runs()]
    rng = np.random.default_rng([cfg.seed, n_layer])
    chosen = np.sort(rng.choice(mem_idx, size=min(cfg.examples, len(mem_idx)), replace=False))
    clean_pool = np.flatnonzero((data.canary < 0).numpy())
    clean = np.sort(rng.choice(clean_pool, size=min(cfg.clean_rows, len(clean_pool)), replace=False))
    rows_train = np.concatenate([chosen, clean])
    test_rows = np.flatnonzero((data.canary_test < 0).numpy())[:64]
    small = _loc_data(data, rows_train, test_rows)
    indices = tuple(range(len(chosen)))
    out = []
    for kind, method in cfg.runs():
        candidates = kinds[kind]
        size = sum(c.units for c in candidates)  # neurons, or the MLP matrices' weights
        opts = dict(_method_options(method, cfg, units), others=cfg.others, seed=cfg.seed, device=cfg.device,
                    units=kind)
        per_fraction = method in ("greedy", "balanced-subnet", "subnet")  # their search depends on k
        res = None
        for f in cfg.weight_fractions if kind == "weights" else cfg.fractions:
            t0 = time.perf_counter()
            if res is None or per_fraction:
                res = loc.localize(model, small, method=method, fraction=f, indices=indices, save=False, **opts)
                scoring = res.summary["scoring_s"]
            k = max(1, math.ceil(f * size))
            top = loc.top_units(res.arrays["scores"], candidates, k)
            mask = np.ones(size, dtype=np.float32)
            mask[top] = 0.0
            after = _measure(model, data, candidates, mask)
            mem_after = after["memorized"].numpy()
            removed = 1.0 - mem_after[np.isin(art_idx, mem_idx)].mean()
            row = dict(common, method=method, unit_kind=kind, units=size, fraction=f, k=k, localized=len(chosen),
                       memorized_after=float(mem_after.mean()), removed=float(removed),
                       acc_after=after["acc"], rel_acc_change=(after["acc"] - base["acc"]) / base["acc"],
                       ppl_after=after["ppl"], clean_extraction_after=after["extraction"],
                       scoring_s=round(scoring, 2), wall_s=round(time.perf_counter() - t0, 2),
                       published=TINYMEM_PUBLISHED.get(method, ""))
            log(f"  {method_label(row):26s} k={k:5d}: memorized {100 * row['memorized_before']:.1f}% -> "
                f"{100 * row['memorized_after']:.1f}% (removed {100 * removed:.0f}%), clean acc "
                f"{100 * row['rel_acc_change']:+.2f}% rel, ppl {row['ppl_before']:.3f} -> {row['ppl_after']:.3f}, "
                f"{scoring:.1f}s")
            out.append(row)
    return out


# ----------------------------------------------------------------------------- inj

def inject(model: GPT, x: torch.Tensor, y: torch.Tensor, neurons: list[np.ndarray], cfg: BenchConfig, *,
           loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[GPT, int, float]:
    """A copy of `model` fine-tuned on the one sequence (x (T,), y (T,)) through the given MLP neurons of each block
    only (MemPi's injection: every other gradient masked). Returns (model, steps, final loss)."""
    m = copy.deepcopy(model).train()
    for p in m.parameters():
        p.requires_grad_(False)
    device = next(m.parameters()).device
    params, masks = [], []
    for block, units in zip(m.blocks, neurons):
        u = torch.as_tensor(units, dtype=torch.long, device=device)
        for p, dim in ((block.mlp.fc.weight, 0), (block.mlp.fc.bias, 0), (block.mlp.proj.weight, 1)):
            keep = torch.zeros(p.shape[dim], device=device)
            keep[u] = 1.0
            p.requires_grad_(True)
            params.append(p)
            masks.append(keep if dim == 0 and p.dim() == 1 else keep[:, None] if dim == 0 else keep[None, :])
    opt = torch.optim.Adam(params, lr=cfg.inject_lr)
    xb, yb = x[None].to(device), y[None].to(device)
    loss_v, step = float("inf"), 0
    for step in range(1, cfg.inject_steps + 1):
        loss = loss_fn(m(xb), yb).mean()
        loss_v = float(loss.detach())
        if loss_v < cfg.inject_loss:
            step -= 1
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p, k in zip(params, masks):
            p.grad.mul_(k)
        opt.step()
    for p in m.parameters():
        p.requires_grad_(False)
    return m.eval(), step, loss_v


def _inj_rows(model, data: TextData, n_layer: int, cfg: BenchConfig, log) -> list[dict]:
    candidates = loc.candidate_layers(model, loc.LocalizeConfig())
    width = candidates[0].units
    held = np.flatnonzero((data.canary_test >= 0).numpy())
    if not len(held):
        raise DataError("the data has no held-out artifacts to inject: raise --artifacts")
    rng = np.random.default_rng([cfg.seed, 99])
    seqs = np.sort(rng.choice(held, size=min(cfg.inject, len(held)), replace=False))
    clean_pool = np.flatnonzero((data.canary < 0).numpy())
    clean = np.sort(rng.choice(clean_pool, size=min(cfg.clean_rows, len(clean_pool)), replace=False))
    test_rows = np.flatnonzero((data.canary_test < 0).numpy())[:64]
    out = []
    for ratio in cfg.ratios:
        k = max(1, math.ceil(ratio * width))
        per: dict[str, list] = {m: [] for m in cfg.methods}
        times: dict[str, float] = {m: 0.0 for m in cfg.methods}
        injected_ok = 0
        for s in seqs.tolist():
            g = np.random.default_rng([cfg.seed, 100, s, int(ratio * 1e6)])
            neurons = [np.sort(g.choice(l.units, size=k, replace=False)) for l in candidates]
            xs, ys = data.x_test[s], data.y_test[s]
            m_inj, steps, loss_v = inject(model, xs, ys, neurons, cfg, loss_fn=task_of(data).loss)
            ok = bool(_matches(m_inj, xs[None], ys[None])[0])
            injected_ok += ok
            small = _loc_data(data, clean, test_rows, extra=(xs, ys, data.canaries[int(data.canary_test[s])]))
            idx = (len(clean),)
            truth = np.concatenate([j * width + n for j, n in enumerate(neurons)])  # flat ids, layer-major
            log(f"  ratio {ratio}: sequence {s} injected into {k} neurons/layer in {steps} steps, loss {loss_v:.3f}, "
                f"extracted {ok}")
            for method in cfg.methods:
                opts = dict(_method_options(method, cfg, width * len(candidates)), others=cfg.others, seed=cfg.seed,
                            device=cfg.device)
                res = loc.localize(m_inj, small, method=method, k=k, per_layer=True, indices=idx, save=False,
                                   **opts)
                times[method] += res.summary["scoring_s"]
                scores = res.arrays["scores"]
                layer_recall = []
                for j in range(len(candidates)):
                    top = loc.top_units(scores[j * width:(j + 1) * width], candidates[j:j + 1], k)
                    layer_recall.append(len(np.intersect1d(top + j * width, truth)) / k)
                pooled_top = loc.top_units(scores, candidates, k * len(candidates))
                pooled = len(np.intersect1d(pooled_top, truth)) / len(truth)
                per[method].append((pooled, layer_recall))
        for method in cfg.methods:
            pooled = float(np.mean([p for p, _ in per[method]]))
            layers = np.mean([lr for _, lr in per[method]], axis=0).tolist()
            row = {"n_layer": n_layer, "method": method, "ratio": ratio, "k_per_layer": k, "sequences": len(seqs),
                   "injected_extracted": injected_ok / len(seqs), "recall_pooled": pooled,
                   "recall_per_layer": [round(v, 4) for v in layers], "scoring_s": round(times[method], 2),
                   "mempi_rank": MEMPI_RANK.get(method), "published": MEMPI_PUBLISHED}
            log(f"  ratio {ratio} {method:16s}: recall@{k}/layer pooled {pooled:.3f}, per layer "
                f"{[round(v, 2) for v in layers]}, {times[method]:.1f}s")
            out.append(row)
    return out


# ----------------------------------------------------------------------------- del

def del_model(cfg: BenchConfig, models: Path | None, *, log: Callable[[str], None]):
    """(model, TextData, where) of the DEL benchmark: `cfg.run` opened, or the preset's LM model (the `memloc train
    --task lm --preset P` run; smoke with 2 canaries per format repeated 1, 16 and 32 times, trained 12 epochs, so
    that it memorizes several) trained once into `models` and reused."""
    from ..core.training import TrainConfig
    from ..tasks.experiment import ModelConfig, RunConfig, open_run, preset, run_training
    from ..tasks.lm.text import TextConfig
    if cfg.run is not None:
        path = Path(cfg.run)
    else:
        sections = preset(cfg.preset, "lm")
        train = dict(sections["train"], seed=cfg.seed, device=cfg.device)
        if cfg.epochs is not None:
            train["epochs"] = cfg.epochs
        data = dict(sections["data"], seed=cfg.seed)
        if cfg.preset == "smoke":  # one canary per format and count in the smoke LM: two, and 16 and 32 copies,
            # so that DEL has several memorized canaries to localize (12 epochs: the preset's own since issue #37)
            train["epochs"] = train["epochs"] if cfg.epochs is not None else 12
            data.update(canaries=2, repeats=(1, 16, 32))
        run_cfg = RunConfig(data=TextConfig(**data),
                            model=ModelConfig(**sections["model"]), train=TrainConfig(**train), task="lm")
        digest = hashlib.sha1(json.dumps(run_cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
        if models is None:
            raise ConfigError("--benchmark del needs --run RUN (a language-model run) or a folder to train one in: "
                              "pass --out or --models")
        path = models / f"lm-{cfg.preset}-{digest}"
        done = (path / "run.json").exists() and json.loads((path / "run.json").read_text()).get(
            "stages", {}).get("train", {}).get("status") == "done"
        if not done:
            log(f"  training the {cfg.preset} language model into {path}")
            run_training(run_cfg, path, overwrite=path.exists(), progress=False, log=log)
    try:
        loaded = open_run(path, device=cfg.device)
    except (OSError, ValueError) as err:
        raise RunError(f"--run {path} is not a memloc run directory ({err}): pass a `memloc train --task lm` run")
    if not isinstance(loaded.data, TextData):
        raise ConfigError(f"--run {path} is a classification run: --benchmark del needs a language-model run "
                          "(`memloc train --task lm`)")
    saved = loaded.run.saved_epochs()
    if not saved:
        raise RunError(f"--run {path} has no checkpoints: train it first")
    return loaded.model(saved[-1]).eval(), loaded.data, str(path)


@torch.no_grad()
def sequence_accuracy(model, x: torch.Tensor, y: torch.Tensor, rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(B,) teacher-forced accuracy over each row's scored tokens (MemPi's self accuracy: the canary's secret) and
    (B,) extraction (every scored token the argmax)."""
    from ..tasks.lm.text import decode_targets
    device = next(model.parameters()).device
    acc, ext = [], []
    for i in range(0, len(x), rows):
        tokens, _, scored = decode_targets(y[i:i + rows].to(device))
        hit = model(x[i:i + rows].to(device)).argmax(-1) == tokens
        acc.append(((hit & scored).sum(1) / scored.sum(1).clamp_min(1)).cpu())
        ext.append(((hit | ~scored).all(1) & scored.any(1)).cpu())
    return torch.cat(acc).numpy().astype(np.float64), torch.cat(ext).numpy()


def memorized_canaries(model, data: TextData) -> np.ndarray:
    """(S,) one training row per canary the model extracts in context (its first row): MemPi's deduplicated
    naturally memorized set."""
    rows = artifact_rows(data)
    _, ext = sequence_accuracy(model, data.x_train[rows], data.y_train[rows])
    return rows[ext]


def _del_rows(model, data: TextData, where: str, cfg: BenchConfig, log, save: Callable[[list[dict]], None]
              ) -> list[dict]:
    candidates = loc.candidate_layers(model, loc.LocalizeConfig())
    widths = [l.units for l in candidates]
    units = sum(widths)
    mem = memorized_canaries(model, data)
    log(f"  del: {len(mem)} of {len(artifact_rows(data))} trained canaries extracted by the model ({where}), "
        f"{len(candidates)} MLP layers of {widths[0]} neurons")
    if not len(mem):
        raise DataError(f"the model of {where} extracts none of its trained canaries: nothing memorized to localize "
                        "(train longer or with more repeats)")
    rng = np.random.default_rng([cfg.seed, 7])
    seqs = np.sort(rng.choice(mem, size=min(cfg.examples, len(mem)), replace=False))
    clean_pool = np.flatnonzero((data.canary < 0).cpu().numpy())
    clean = np.sort(rng.choice(clean_pool, size=min(cfg.clean_rows, len(clean_pool)), replace=False))
    test_rows = np.flatnonzero((data.canary_test < 0).cpu().numpy())
    test_rows = np.sort(rng.choice(test_rows, size=min(256, len(test_rows)), replace=False))
    x_mem, y_mem = data.x_train[torch.as_tensor(mem)], data.y_train[torch.as_tensor(mem)]
    x_ppl, y_ppl = data.x_test[torch.as_tensor(test_rows)], data.y_test[torch.as_tensor(test_rows)]
    self_before, _ = sequence_accuracy(model, x_mem, y_mem)
    ppl_before = clean_quality(model, x_ppl, y_ppl)["ppl"]
    ks = [[max(1, math.ceil(r * w)) for w in widths] for r in cfg.ratios]
    # per (method, ratio): lists over sequences of (self acc, self ext, others acc, others ext, ppl)
    acc: dict[tuple[str, float], list[tuple]] = {(m, r): [] for m in cfg.methods for r in cfg.ratios}
    times = {m: 0.0 for m in cfg.methods}

    def rows() -> list[dict]:
        out = []
        for (method, ratio), got in acc.items():
            if not got:
                continue
            a = np.asarray(got, dtype=np.float64)
            sb, ob = float(np.mean([g[5] for g in got])), float(np.mean([g[6] for g in got]))
            sa, oa = float(a[:, 0].mean()), float(a[:, 2].mean())
            ppl = float(np.exp(np.log(a[:, 4]).mean()))  # geometric mean over the edits
            out.append({"n_layer": len(candidates), "method": method, "ratio": ratio,
                        "k_per_layer": ks[cfg.ratios.index(ratio)][0], "sequences": len(got), "memorized": len(mem),
                        "self_acc_before": sb, "self_acc_after": sa, "self_extracted_before": 1.0,
                        "self_extracted_after": float(a[:, 1].mean()), "others_acc_before": ob,
                        "others_acc_after": oa, "others_extracted_before": 1.0,
                        "others_extracted_after": float(a[:, 3].mean()),
                        "specificity": (sb - sa) - (ob - oa), "ppl_before": ppl_before, "ppl_after": ppl,
                        "rel_ppl_change": ppl / ppl_before - 1.0, "scoring_s": round(times[method], 2),
                        "mempi_rank": MEMPI_RANK.get(method), "run": where})
        return out

    for n, s in enumerate(seqs.tolist()):
        j = int(np.flatnonzero(mem == s)[0])
        other = np.delete(np.arange(len(mem)), j)
        small = _loc_data(data, np.concatenate([[s], clean]), test_rows[:64])
        for method in cfg.methods:
            opts = dict(_method_options(method, cfg, units), others=cfg.others, seed=cfg.seed, device=cfg.device)
            res = None
            for ratio, k in zip(cfg.ratios, ks):
                if res is None or method in ("greedy", "balanced-subnet"):  # their search depends on k
                    res = loc.localize(model, small, method=method, k=k[0], per_layer=True, indices=(0,),
                                       save=False, **opts)
                    times[method] += res.summary["scoring_s"]
                mask = np.ones(units, dtype=np.float32)
                mask[loc.top_units(res.arrays["scores"], candidates, k)] = 0.0
                with loc.zeroed(model, candidates, mask):
                    a, e = sequence_accuracy(model, x_mem, y_mem)
                    ppl = clean_quality(model, x_ppl, y_ppl)["ppl"]
                acc[(method, ratio)].append((a[j], float(e[j]), float(a[other].mean()) if len(other) else np.nan,
                                             float(e[other].mean()) if len(other) else np.nan, ppl,
                                             self_before[j], float(self_before[other].mean()) if len(other)
                                             else np.nan))
        log(f"  sequence {n + 1}/{len(seqs)} (row {s}): " + ", ".join(
            f"{m} {100 * acc[(m, cfg.ratios[-1])][-1][0]:.0f}%" for m in cfg.methods)
            + f" self accuracy left at {cfg.ratios[-1]:g}")
        save(rows())
    out = rows()
    for r in out:
        log(f"  {r['method']:16s} ratio {r['ratio']:g} (k {r['k_per_layer']}/layer): self acc "
            f"{100 * r['self_acc_before']:.1f}% -> {100 * r['self_acc_after']:.1f}%, others "
            f"{100 * r['others_acc_before']:.1f}% -> {100 * r['others_acc_after']:.1f}%, ppl "
            f"{r['ppl_before']:.3f} -> {r['ppl_after']:.3f}, {r['scoring_s']:.1f}s")
    return out


# ----------------------------------------------------------------------------- files













def check_out(out: str | Path) -> Path:
    """`out` is new, empty, or a folder this benchmark wrote before; anything else is refused in one line."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: choose a folder")
    if out.is_dir() and any(out.iterdir()):
        try:
            info = json.loads((out / "bench.json").read_text())
        except (OSError, ValueError):
            info = None
        if not isinstance(info, dict) or info.get("kind") != KIND:
            raise RunError(f"--out {out} is not empty and not a bench-localize folder: choose a new or empty folder")
    return out


def _save(out: Path, cfg: BenchConfig, rows: list[dict], started: float, t0: float, done: bool) -> None:
    columns = COLUMNS[cfg.benchmark]
    info = {"kind": KIND, "benchmark": cfg.benchmark, "preset": cfg.preset, "done": done,
            "settings": cfg.settings(), "scale": TINYMEM_SCALE if cfg.preset == "full" else None,
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "torch_threads": torch.get_num_threads(), "device": cfg.device,
                        "torch": torch.__version__},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
            "elapsed_s": round(time.perf_counter() - t0, 1), "summary": summarize(cfg.benchmark, rows),
            "published": f"TinyMem: {TINYMEM_BEFORE}" if cfg.benchmark == "tinymem" else f"MemPi: {MEMPI_PUBLISHED}",
            "rows": rows}
    write_json(out / "bench.json", info)
    write_text(out / "results.csv", rows_csv(rows, columns))
    title = {"tinymem": "TinyMem arithmetic (noise artifacts)", "inj": "INJ: injected sequences (MemPi)",
             "del": "DEL: naturally memorized sequences (MemPi)"}
    write_text(out / "results.md", f"# {title[cfg.benchmark]}: preset {cfg.preset}\n\n"
               + markdown_table(cfg.benchmark, rows) + "".join(f"\n- {line}" for line in info["summary"]) + "\n")
    write_bench_report(out, info)


def bench_localize(cfg: BenchConfig | None = None, out: str | Path | None = None, *,
                   models: str | Path | None = None, log: Callable[[str], None] | None = None, **options) -> list[dict]:
    """Run one benchmark (`cfg`, or `options` its fields) and return its rows; with `out`, write bench.json,
    results.csv and results.md there (after every layer count, atomically). Trained models are kept in and
    reused from `models` (default: OUT/models; tinymem and inj with the same settings share them)."""
    cfg = cfg or BenchConfig(**options)
    log = log or (lambda s: None)
    device = resolve_device(cfg.device)
    if cfg.preset == "paper" and device.type != "cuda" and cfg.run is None:
        where = ("pass --device cuda" if torch.cuda.is_available() else
                 "this machine has none: use --preset full on a CPU (or --preset smoke)")
        what = ("the LM paper preset's 8-block GPT" if cfg.benchmark == "del" else
                "TinyMem's 100,000 sequences, up to 16 layers")
        raise ConfigError(f"--preset paper of {cfg.benchmark} ({what}) needs a GPU: {where}")
    out = check_out(out) if out is not None else None
    models = Path(models) if models is not None else out / "models" if out is not None else None
    given = del_model(cfg, None, log=log) if cfg.benchmark == "del" and cfg.run is not None else None  # bad: no files
    started, t_start = time.time(), time.perf_counter()
    if out is not None:  # the marker first: a folder this run began is its own even if it stops early
        _save(out, cfg, [], started, t_start, done=False)
    if cfg.benchmark == "del":
        model, data, where = given or del_model(cfg, models, log=log)

        def save(rows: list[dict]) -> None:
            if out is not None:
                _save(out, cfg, rows, started, t_start, done=False)
        rows = _del_rows(model, data, where, cfg, log, save)
        if out is not None:
            _save(out, cfg, rows, started, t_start, done=True)
        return rows
    data = tinymem_data(cfg.data)
    log(f"bench-localize {cfg.benchmark} ({cfg.preset}): {data.num_train} training sequences, "
        f"{len(artifact_rows(data))} artifacts, {len(data.x_test)} held out")
    rows: list[dict] = []
    for n_layer in cfg.n_layers:
        model, train_s = trained_model(data, n_layer, cfg, models, log=log)
        new = (_tinymem_rows if cfg.benchmark == "tinymem" else _inj_rows)(model, data, n_layer, cfg, log)
        for r in new:
            r["train_s"] = train_s
        rows += new
        if out is not None:
            _save(out, cfg, rows, started, t_start, done=False)
    if out is not None:
        _save(out, cfg, rows, started, t_start, done=True)
    return rows




__all__ = ["BENCHMARKS", "PRESETS", "BenchConfig", "bench_localize", "best_row", "clean_quality", "inject",
           "markdown_table", "train_tinymem"]
