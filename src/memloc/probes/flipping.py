"""Greedy unit removal ("flipping", probe 4): how many units must be zeroed to flip one example's prediction?

Semantics (what this module computes, exactly):

* The model is in eval mode (BatchNorm running statistics), so rows of a batch
  never interact and many edited models can share one forward pass.
* Units are the units of `layers(model)` (a conv layer's output channel, a
  linear layer's output feature); zeroing a unit multiplies its activation (the
  output of its layer's norm+activation chain, every spatial position) by 0.
  By default every layer except the final classifier takes part: the
  classifier's units are the class logits themselves, and zeroing the given
  class's logit is a trivial flip, not a memorizing neuron. Counts are always
  in units, never single weights.
* The example's output is the mean of the *logits* over `copies` (5) copies of
  the model input x (normalized) with Gaussian noise: for copy c at step t,
  eps ~ N(0, I) from a local generator keyed by (seed, example, c, t), scaled
  to norm `input_noise * ||x||` (1%). `input_noise = 0` gives noiseless copies.
* The objective is J = mean loss of the others - loss of the example
  (cross-entropy against the given labels; the others are `others` training
  examples drawn once with the seed from the whole training set, independently
  of the chosen examples, and shared by every example; an example that is
  also among the others counts in both terms, as in the paper's batch).
  Zeroing unit u changes its activation a by -a, so to first order
  J changes by -sum_positions a * dJ/da. The score of u is the first-order
  *decrease* of J, score(u) = sum_positions a * dJ/da = dJ/dm_u, where m is
  the unit's multiplicative mask (1 = live). Each step zeroes the live unit
  with the highest score (the one whose removal most raises the example's loss
  while keeping the others' loss low); when no score is positive the best one
  is still taken, and the budget ends the search.
* Before each step the averaged output is checked: once its argmax differs
  from the given label the example has flipped. An example predicted wrongly
  from the start records 0 units. An example still not flipped after `budget`
  removals records flipped = False and num_units = budget.
* After removal, the edited model's accuracy (against the given labels) on the
  training set (all, clean, noisy, rare) and the test set, on all data or on a
  seeded subsample (`eval_subsample` training and test examples).

Batched mode keeps a pool of `batch_examples` examples; each carries its own
unit mask, applied by forward hooks as an extra batch dimension (rows are
grouped by example), on a frozen copy of the model with every BatchNorm folded
into the conv before it (`cutting.fold_norms`: the same function, one elementwise
pass fewer each way). Hooks multiply only layers where some row removes a unit,
and the score of a live unit is read from the activation gradients as
sum_positions a * dJ/da (equal to dJ/dm at m = 1). The others' rows are computed
once per *distinct* mask (every example starts from the empty mask, whose
gradient is computed once and reused), chunked to `max_rows` rows. The
after-removal accuracies of many edited models are computed in one pass over
the data (rows = (mask, data point)), in bf16 on a GPU; the masks are grouped
by their first edited layer, and each group starts from that layer's unedited
activations, computed once per data chunk (an fx prefix, `split_after`) and
masked by hand, so only the layers after it run once per mask. cuDNN autotuning
is off while searching (the batch shapes change at every step). The copy runs
channels_last on every device, and under bf16 autocast where the device has
bf16 natively (a GPU; a CPU with AVX512-BF16 or AMX; `precision`). Sequential
mode is the paper's loop on the model as given, in the arithmetic it trains in
(fp32 on a CPU, bf16 autocast on a GPU): one example and one removal at a time,
the whole batch of others, full forward passes for the accuracy after each
example. In the same precision both give the same units and, up to float
rounding, the same accuracies (tested); bf16 scores pick the fp32 best unit or
one within rounding of it (tested).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..core.batching import rows_that_fit
from ..core.cutting import fold_norms, split_after
from ..core.errors import ConfigError, DataError, RunError
from ..core.layers import Layer, select_layers
from ..core.layers import layers as find_layers
from ..core.options import INT64_MAX, check_ranges, fitted, given_option, names, option
from ..core.options import settings as option_settings
from ..core.precision import bf16, cudnn_autotune, current, native_bf16
from ..core.tasks import Task, task_of
from ..core.units import UnitMasks
from ..tasks.classification.readers import check_indices, indices_of, read_indices
from .base import ProbeResult
from .engine import Context, Probe, run_probe

KINDS = ("clean", "noisy", "rare", "corpus", "canary")  # every task's kinds (each task checks its own)
PRECISIONS = ("auto", "fp32", "bf16")
PROBE_NAME = "flipping"


@dataclass
class FlipConfig:
    """Settings of the greedy unit removal. Defaults are the paper's (5 copies, 1% noise, 512 others)."""

    examples: int = option(100, "examples per kind, a seeded choice (the default: fewer where a kind has fewer)",
                           at_least=1)
    kinds: tuple[str, ...] | None = option(None, "comma-separated kinds: clean, noisy, rare (language models: "
                                           "corpus, canary); default: the task's reference and memorized kinds "
                                           "(clean,noisy)", flag="--kind", parse=names)
    indices: tuple[int, ...] | None = option(None, "flip these training examples instead (.npy or text, one index a "
                                             "line)", parse=read_indices, metavar="FILE", at_least=0,
                                             at_most=INT64_MAX)
    others: int = option(512, "other training examples whose loss is kept low (the default: all where there are "
                         "fewer)", at_least=1)
    copies: int = option(5, "noisy copies of the example averaged", at_least=1)
    input_noise: float = option(0.01, "noise norm as a fraction of the input norm", at_least=0, below=10)
    budget: float = option(0.1, "removal cap as a fraction of all units", above=0, at_most=1)
    max_units: int | None = option(None, "removal cap as a number of units (wins over --budget)", at_least=1)
    layers: tuple[str, ...] | None = option(None, "comma-separated layer names or indices (default: all but the "
                                            "classifier)", parse=names)
    include_classifier: bool = option(False, "let the final classifier's units be removed too")
    eval_subsample: int | None = option(None, "accuracy after removal on K seeded training examples and as many test "
                                        "examples (all of a smaller test split)", metavar="K", at_least=1)
    eval_test: bool = option(True, "after removal, training-set accuracy only", negate="--no-test-eval")
    seed: int = option(0, "seed of the examples, the others and the input noise", at_least=0, at_most=INT64_MAX)
    sequential: bool = option(False, "the paper's loop: one example, one removal at a time", result=False)
    # "auto": bf16 where the device computes it natively in batched mode (a GPU; a CPU with AVX512-BF16 or AMX),
    # and the arithmetic the model trains in for the sequential baseline (the run's `--precision`)
    precision: str = option("auto", "auto (bf16 where the device has it natively; --sequential: the run's arithmetic), "
                            "fp32 or bf16", result=False)
    batch_examples: int = option(16, "examples flipped at once (16 keeps the paper's ResNet-9 under 16 GB)",
                                 result=False, at_least=1)
    # rows per score pass (None: 4096 GPU, 1024 CPU) and per accuracy pass (None: 8192 GPU, 1024 CPU)
    max_rows: int | None = option(None, cli=False, result=False, at_least=1)
    eval_rows: int | None = option(None, cli=False, result=False, at_least=1)
    epoch: int | None = option(None, "probe this saved epoch (default: the final one)", at_least=0)
    device: str = option("auto", "auto, cpu or cuda", result=False)
    given: tuple[str, ...] | None = given_option()

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.kinds is not None:
            self.kinds = tuple(self.kinds)
            for k in self.kinds:
                if k not in KINDS:
                    raise ConfigError(f"unknown kind {k!r}: choose from {', '.join(KINDS)}, e.g. --kind clean,noisy")
        if self.kinds is not None and not self.kinds and self.indices is None:
            raise ConfigError("no kind of example chosen: pass --kind clean,noisy or --indices FILE")
        if self.kinds is not None and len(set(self.kinds)) != len(self.kinds):
            raise ConfigError(f"--kind lists a kind twice: {','.join(self.kinds)}")
        if self.indices is not None:
            self.indices = indices_of(self.indices)
            if not self.indices:
                raise ConfigError("the --indices file lists no examples")
            if len(set(self.indices)) != len(self.indices):
                raise ConfigError("the --indices file lists an example twice: examples must be distinct")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}: choose from {', '.join(PRECISIONS)}")
        if self.layers is not None:
            self.layers = tuple(str(n) for n in self.layers)

    def settings(self) -> dict:
        """What determines the result (batching sizes, the mode and the precision do not, beyond float rounding)."""
        return option_settings(self)


@dataclass
class FlipRecord:
    """What greedy removal found for one training example."""

    index: int
    kind: str
    label: int
    true_label: int
    already_wrong: bool
    flipped: bool
    units: list[tuple[int, int]]  # (layer index, unit index) in removal order
    acc: dict[str, float | None] = field(default_factory=dict)  # after removal

    @property
    def num_units(self) -> int:
        return len(self.units)


# ----------------------------------------------------------------------------- example choice

def select_examples(data, kinds: Sequence[str], n: int, *, seed: int = 0, fit: Callable[[int, str], int] | None = None
                    ) -> tuple[np.ndarray, list[str]]:
    """`n` distinct training examples of each kind, a seeded choice; returns (indices (E,), kinds). `fit(available,
    kind)` gives the count for a kind with fewer than `n` (a default shrinks, `options.fitted`); without it, fewer
    is refused in one line."""
    task = task_of(data)
    masks = {k: task.kind_mask(k) for k in kinds}
    unknown = [k for k, m in masks.items() if m is None]
    if unknown:
        raise DataError(f"this run's data has no known noise mask, so its {' and '.join(unknown)} examples are "
                        "unknown: retrain with --noise-mask FILE, or pass --indices FILE")
    members = {k: m.cpu().numpy() for k, m in masks.items()}
    rng = np.random.default_rng(seed)
    taken = np.zeros(task.num_train, dtype=bool)
    out, out_kinds = [], []
    for k in kinds:
        pool = np.flatnonzero(members[k] & ~taken)
        if len(pool) == 0:
            hint = " (pass --rare-scores when training)" if k == "rare" else ""
            raise DataError(f"the run has no {k} training examples{hint}: choose other --kind")
        m = n
        if len(pool) < n:
            if fit is None:
                raise DataError(f"--examples {n} is more than the {len(pool)} {k} training examples available: "
                                f"pass --examples {len(pool)} or fewer")
            m = fit(len(pool), k)
        pick = np.sort(rng.choice(pool, size=m, replace=False))
        taken[pick] = True
        out.append(pick)
        out_kinds += [k] * m
    return np.concatenate(out).astype(np.int64), out_kinds


def kinds_of(data, indices: np.ndarray) -> list[str]:
    """The kind of each given example: the memorized kind first, then the others, the reference kind last
    (classification: noisy, then rare, else clean)."""
    task = task_of(data)
    n = task.num_train
    check_indices(indices, n)
    order = [task.memorized_kind] + [k for k in task.kinds if k not in (task.memorized_kind, task.reference_kind)]
    masks = [(k, m.cpu().numpy()) for k in order if (m := task.kind_mask(k)) is not None]
    return [next((k for k, m in masks if m[i]), task.reference_kind) for i in indices]


def _noise_seed(seed: int, example: int, copy: int, step: int) -> int:
    h = hashlib.blake2b(f"flip:{seed}:{example}:{copy}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def use_bf16(cfg: FlipConfig, device: torch.device) -> bool:
    """Whether the search and the accuracy passes run under bf16 autocast (see `FlipConfig.precision`)."""
    if cfg.precision != "auto":
        return cfg.precision == "bf16"
    if cfg.sequential:  # the baseline keeps the arithmetic the model trains in (the run's, `precision.current`)
        return current(device).bf16
    return native_bf16(device)


def _tile(a: torch.Tensor, k: int) -> torch.Tensor:
    """(k * N, ...) copy of a (N, ...), block-major; keeps channels_last (`repeat` would not)."""
    return torch.cat([a] * k)


# ----------------------------------------------------------------------------- the engine

class _Flipper:
    """Greedy removal for a model, its data and the others; shared by both modes."""

    def __init__(self, model: nn.Module, data, cfg: FlipConfig, candidates: list[Layer],
                 others: np.ndarray, eval_train: np.ndarray, eval_test: np.ndarray, budget: int):
        task = self.task = task_of(data)
        self.cfg, self.budget = cfg, budget
        data = task.data
        self.y = task.targets("given")
        # the sequential mode stays the paper-faithful baseline: the model as given, full forward passes
        self.cache = not cfg.sequential
        self.model = fold_norms(model, candidates) if self.cache else model
        self.device = next(model.parameters()).device
        self.bf16 = use_bf16(cfg, self.device)
        # big passes feed a GPU; on a CPU smaller ones stay in cache (measured: both modes ~1.5x faster at 1024)
        # a language model's rows are capped by what fits the free memory (`memloc.core.batching`); a classifier's
        # by this
        gpu = self.device.type == "cuda"
        length = data.x_train.shape[1] if data.x_train.dim() == 2 else 1
        self.max_rows = cfg.max_rows or rows_that_fit(model, length=length, backward=True,
                                                      cap=4096 if gpu else 1024)
        self.eval_rows = cfg.eval_rows or rows_that_fit(model, length=length, cap=8192 if gpu else 1024)
        self.masks = UnitMasks(self.model, candidates)
        dev = self.device
        self.x_oth = self._input(data.x_train[torch.as_tensor(others, device=data.x_train.device)])
        self.y_oth = self.y[torch.as_tensor(others, device=self.y.device)].to(dev)
        self.eval_train = torch.as_tensor(eval_train, dtype=torch.long)
        self.eval_test = torch.as_tensor(eval_test, dtype=torch.long)
        # (1 + subsets, D): which evaluation points count for all-train accuracy and each subset's
        nt, ne = len(eval_train), len(eval_test)
        z = torch.zeros(ne)
        rows = [torch.cat([torch.ones(nt), z])]
        for mask in task.subset_masks().values():
            m = torch.zeros(nt) if mask is None else mask.cpu()[self.eval_train].float()
            rows.append(torch.cat([m, z]))
        for mask in task.test_masks().values():  # held-out subsets (language models: held-out canaries, the rest)
            m = torch.zeros(ne) if mask is None else mask.cpu()[self.eval_test].float()
            rows.append(torch.cat([torch.zeros(nt), m]))
        self.sets = torch.stack(rows).to(dev)
        self.set_names = accuracy_names(task)
        self._splits: dict[int, object] = {}  # candidate position -> split_after's (prefix, suffix, k) or None
        self._ones_grad: torch.Tensor | None = None  # the others' dJ/dm at the empty mask (U,)

    def _input(self, xb: torch.Tensor) -> torch.Tensor:
        """Stored examples -> model inputs on the device, laid out for the model that runs them (`_layout`)."""
        return self._layout(self.task.inputs(xb.to(self.device), self.device))

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """channels_last for the batched mode's copy on every device (oneDNN's CPU convolutions are faster
        on it too); the sequential mode keeps `model_input`'s layout, as the trainer feeds the model."""
        return x.contiguous(memory_format=torch.channels_last) if self.cache and x.dim() == 4 else x

    def _autocast(self):
        return bf16(self.device, self.bf16)

    # -- the score step
    def _copies(self, examples: Sequence[int], steps: Sequence[int]) -> torch.Tensor:
        """(B * copies, C, H, W) model inputs: each example's noisy copies at its step, example-major."""
        dev, c = self.device, self.cfg.copies
        x_train = self.task.data.x_train
        idx = torch.as_tensor(list(examples), device=x_train.device)
        x = self.task.inputs(x_train[idx].to(dev), dev).repeat_interleave(c, 0)  # (B * copies, C, H, W)
        if self.cfg.input_noise == 0 or not x.is_floating_point():  # token ids take no noise: exact copies
            return self._layout(x)
        # drawn on the CPU from generators keyed by (seed, example, copy, step): the same on every device
        eps = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(
            _noise_seed(self.cfg.seed, int(e), k, int(s)))) for e, s in zip(examples, steps) for k in range(c)])
        scale = (self.cfg.input_noise * x.float().flatten(1).norm(dim=1).cpu()
                 / eps.flatten(1).norm(dim=1).clamp_min(1e-12))
        eps = eps * scale.view(-1, *([1] * (eps.dim() - 1)))  # each copy's noise has norm input_noise * ||x||
        return self._layout(x + eps.to(dev, x.dtype))

    def step(self, examples: Sequence[int], labels: torch.Tensor, masks: torch.Tensor, steps: Sequence[int],
             want_scores: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One greedy step for B examples under their masks (B, U) of 0/1.

        Returns (hits (B,) bool: the copy-averaged output still predicts the
        given label, scores (B, U) with -inf for removed units; rows not in
        `want_scores(hits)` (a (B,) bool) get no score (-inf)).
        """
        c, dev = self.cfg.copies, self.device
        B, U = masks.shape
        x = self._copies(examples, steps)
        logits, acts = self._forward(x, masks, c)  # (B * copies, K)
        avg = logits.view(B, c, *logits.shape[1:]).mean(1)  # (B, K): the averaged output the flip test uses
        hits = self.task.match(self.task.predict(avg), labels.to(dev))  # (B,): still predicts the given label
        go = want_scores(hits)
        scores = torch.full((B, U), -math.inf, device=dev)
        if not bool(go.any()):
            return hits, scores
        # d(-loss_example)/dm, per example: rows are independent in eval mode
        loss_ex = self.task.loss(avg, labels.to(dev))  # (B,)
        grads = torch.autograd.grad(-(loss_ex * go.float()).sum(), acts, allow_unused=True)
        g_ex = self.masks.scores_from(acts, grads).view(B, c, U).sum(1)  # (B, U)
        del acts, grads, logits
        # the others' mean loss, once per distinct mask among the examples still searching
        live = torch.nonzero(go).flatten()  # (B_l,)
        uniq, group = torch.unique(masks[live].to(torch.bool), dim=0, return_inverse=True)  # (G, U), (B_l,)
        g_oth = torch.empty(uniq.shape, device=dev)  # (G, U)
        todo = uniq
        # rows sort with False first, so the empty mask (every example's first step) is the last row; batched
        # mode computes its gradient once and reuses it for every example that enters the pool later
        reuse = self.cache and bool(uniq[-1].all())
        if reuse:
            if self._ones_grad is None:
                self._ones_grad = self._others_grad(uniq[-1:])[0]
            g_oth[-1] = self._ones_grad
            todo = uniq[:-1]
        if len(todo):
            g_oth[:len(todo)] = self._others_grad(todo)
        s = g_ex[live] + g_oth[group]  # (B_l, U): dJ/dm, J = mean loss of the others - loss of the example
        m = masks[live]
        scores[live] = torch.where(m > 0, s, torch.full_like(s, -math.inf))
        return hits, scores

    def _forward(self, x: torch.Tensor, masks: torch.Tensor, repeat: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Float logits (R, K) of inputs x (R = Q * repeat) under masks (Q, U), each repeated for `repeat`
        consecutive rows, and every layer's captured activations."""
        rows = masks.repeat_interleave(repeat, 0)  # (R, U)
        edited = self.masks.edited_of(masks)  # read from the Q masks, not their R repeats
        for _ in range(2):  # a second pass only after finding a layer whose output the model edits in place
            self.masks.set_rows(rows, capture=True, edited=edited)
            with torch.enable_grad(), self._autocast():
                # a frozen model's graph starts at its input (cheap: the first layer's few input channels)
                logits = self.model(x.detach().requires_grad_(x.is_floating_point())).float()
            acts = self.masks.activations()
            self.masks.set_rows(None)
            if acts is not None:
                return logits, acts
        raise RunError("a layer's activations keep changing in place during the forward pass: they cannot be scored")

    def _others_grad(self, uniq: torch.Tensor) -> torch.Tensor:
        """d(mean loss of the others)/dm (G, U) for G masks (G, U) of 0/1, chunked to `max_rows` rows."""
        dev, m = self.device, len(self.y_oth)
        U = uniq.shape[1]
        g_oth = torch.zeros(uniq.shape, device=dev)
        per = max(1, self.max_rows // m)  # groups per pass
        for lo in range(0, len(uniq), per):
            part = uniq[lo:lo + per].float()  # (G_c, U)
            gc = part.shape[0]
            out, acts = self._forward(_tile(self.x_oth, gc), part, m)  # (G_c * M, K)
            loss = self.task.loss(out, _tile(self.y_oth, gc)).view(gc, m).mean(1)  # (G_c,)
            grads = torch.autograd.grad(loss.sum(), acts, allow_unused=True)
            g_oth[lo:lo + per] = self.masks.scores_from(acts, grads).view(gc, m, U).sum(1)
        return g_oth

    # -- accuracy of edited models
    def _split(self, j: int):
        """`split_after` candidate layer j, traced once; None when fx cannot split the model there."""
        if j not in self._splits:
            self._splits[j] = split_after(self.model, self.masks.layers[j])
        return self._splits[j]

    def _first_removed(self, masks: torch.Tensor) -> np.ndarray:
        """(Q,) for masks (Q, U) bool: the candidate position of each mask's first edited layer (L: none)."""
        zero = ~masks
        # argmax returns the first maximum: the first removed unit in layer order
        flat = torch.where(zero.any(1), zero.float().argmax(1), self.masks.total).cpu().numpy()  # (Q,)
        return np.searchsorted(self.masks.offsets, flat, side="right").astype(int) - 1

    @torch.no_grad()
    def accuracies(self, masks: torch.Tensor) -> list[dict[str, float | None]]:
        """Accuracies after removal for K masks (K, U): many edited models per pass over the data.

        Batched mode groups the masks by their first layer with a removed unit:
        that layer's input is unedited, so per data chunk the model runs once up
        to that layer's unit activations (fx prefix, unmasked); only the rest
        runs with the group's masks as an extra batch dimension. Sequential mode
        (the paper-faithful baseline) and models fx cannot split run full forwards.
        """
        uniq, inverse = torch.unique(masks.to(torch.bool), dim=0, return_inverse=True)  # (Q, U)
        q = uniq.shape[0]
        correct = torch.zeros(q, self.sets.shape[0], device=self.device)
        L = len(self.masks.layers)
        first = self._first_removed(uniq) if self.cache else np.full(q, L)
        for j in sorted(set(first.tolist())):  # one group per first edited layer (L: the unedited model)
            members = torch.as_tensor(np.flatnonzero(first == j), device=self.device)
            parts = self._split(j) if j < L else None
            self._accumulate(uniq[members].float(), members, j, parts, correct)
        self.masks.set_rows(None)
        sizes = self.sets.sum(1)
        acc = (correct / sizes.clamp_min(1)).cpu().numpy()
        out = []
        for k in inverse.tolist():
            out.append({name: (float(acc[k, j]) if sizes[j] > 0 else None) for j, name in enumerate(self.set_names)})
        return out

    def _accumulate(self, qm_all: torch.Tensor, members: torch.Tensor, j: int, parts, correct: torch.Tensor) -> None:
        """Add the correct counts per evaluation set of the masks qm_all (Q_g, U) into correct[members] (Q_g, 5).

        `parts` (prefix, suffix, k) cuts the model after candidate layer j, the
        group's first edited layer; None: full forward passes.
        """
        dev, rows = self.device, self.eval_rows
        qg = qm_all.shape[0]
        edited = self.masks.edited_of(qm_all)  # once per group: a chunk's own flags would cost a sync per pass
        sources = [(self.task.data.x_train, self.y, self.eval_train),
                   (self.task.data.x_test, self.task.targets("test"), self.eval_test)]
        offset = 0
        for x_all, y_all, idx in sources:
            n = len(idx)
            per = max(1, rows // qg)  # data points per pass
            for lo in range(0, n, per):
                sel = idx[lo:lo + per].to(x_all.device)
                d = len(sel)
                x = self._input(x_all[sel])  # (D, C, H, W)
                y = y_all[sel].to(dev)
                live = None
                if parts is not None:
                    self.masks.set_rows(None)  # the prefix (layers up to j's activations) is unedited
                    with self._autocast():
                        live = parts[0](x)
                    # every value handed to the suffix must be per data point to take the mask dimension
                    if not all(isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == d for a in live):
                        live, parts = None, None  # e.g. a shape read before the cut: full forwards for this group
                        self._splits[j] = None
                step = max(1, rows // d)
                for qlo in range(0, qg, step):
                    qm = qm_all[qlo:qlo + step]  # (Q_c, U)
                    qc = qm.shape[0]
                    self.masks.set_rows(qm.repeat_interleave(d, 0), edited=edited)  # (Q_c * D, U)
                    with self._autocast():
                        if live is None:
                            logits = self.model(_tile(x, qc))
                        else:  # _tile copies, so an in-place op in the suffix cannot spoil `live`
                            args = [_tile(a, qc) for a in live]
                            k = parts[2]
                            args[k] = self.masks.apply(j, args[k])  # exactly what layer j's hook does
                            logits = parts[1](*args)
                    hit = self.task.match(self.task.predict(logits), _tile(y, qc)).view(qc, d).float()  # (Q_c, D)
                    correct[members[qlo:qlo + qc]] += hit @ self.sets[:, offset + lo:offset + lo + d].T
            offset += n
        self.masks.set_rows(None)


def _record(e: int, kind: str, fl: _Flipper, units: list[int], flipped: bool, wrong: bool) -> FlipRecord:
    given, true = fl.task.record_labels()
    return FlipRecord(index=int(e), kind=kind, label=int(given[e]), true_label=int(true[e]),
                      already_wrong=wrong, flipped=flipped, units=[fl.masks.unit_of(u) for u in units])


def _run_batched(fl: _Flipper, todo: list[tuple[int, str]], *, on_done: Callable[[list[FlipRecord]], None],
                 chunk: int, sequential: bool, tick: Callable[[], None] = lambda: None) -> None:
    """Flip every (example, kind) in `todo`; hand finished records to `on_done` in groups of `chunk`."""
    U, dev = fl.masks.total, fl.device
    pool_size = 1 if sequential else fl.cfg.batch_examples
    pending = list(todo)
    active: list[dict] = []  # per slot: e, kind, units (flat), mask (U,)
    finished: list[tuple[FlipRecord, torch.Tensor]] = []

    def flush(force: bool) -> None:
        nonlocal finished
        while finished and (force or len(finished) >= chunk):
            part, finished = finished[:chunk], finished[chunk:]
            accs = fl.accuracies(torch.stack([m for _, m in part]))
            for (rec, _), a in zip(part, accs):
                rec.acc = a
            on_done([r for r, _ in part])

    with fl.masks.installed():
        while pending or active:
            while pending and len(active) < pool_size:
                e, kind = pending.pop(0)
                active.append({"e": e, "kind": kind, "units": [], "mask": torch.ones(U, device=dev)})
            masks = torch.stack([a["mask"] for a in active])  # (B, U)
            labels = fl.y[torch.as_tensor([a["e"] for a in active], device=fl.y.device)].to(dev)
            steps = [len(a["units"]) for a in active]
            counts = torch.as_tensor(steps, device=dev)
            hits, scores = fl.step([a["e"] for a in active], labels, masks, steps,
                                   lambda h: h & (counts < fl.budget))
            pick = scores.argmax(1).tolist()
            wrong = (~hits).tolist()  # one host transfer per step, not one per example
            keep = []
            for b, a in enumerate(active):
                flipped = bool(wrong[b])
                if flipped or len(a["units"]) >= fl.budget:
                    rec = _record(a["e"], a["kind"], fl, a["units"], flipped, flipped and not a["units"])
                    finished.append((rec, a["mask"]))
                    tick()
                else:
                    a["units"].append(pick[b])
                    a["mask"] = a["mask"].clone()
                    a["mask"][pick[b]] = 0.0
                    keep.append(a)
            active = keep
            flush(False)
        flush(True)


# ----------------------------------------------------------------------------- the public functions

def candidate_layers(model: nn.Module, cfg: FlipConfig) -> list[Layer]:
    """The layers whose units may be removed: `cfg.layers`, or all but the classifier (unless included).

    A transformer that names its layers (attention heads and MLP neurons as units) offers those by default:
    its embedding and unembedding features are not units (`--layers` may still name them)."""
    all_layers = find_layers(model)
    if cfg.layers:
        return select_layers(all_layers, list(cfg.layers))
    blocks = [l for l in all_layers if l.kind in ("attention", "mlp")]
    if blocks:
        return blocks + ([l for l in all_layers if l.kind == "unembedding"] if cfg.include_classifier else [])
    return all_layers if cfg.include_classifier or len(all_layers) == 1 else all_layers[:-1]


def _plan(model: nn.Module, data, cfg: FlipConfig, note: Callable[[str], None] | None = None):
    """Everything decided before any compute: candidates, examples, others, evaluation points, budget. A default
    count larger than the data shrinks to it with one line to `note` (a Python warning without one); a count the
    user set is refused (`options.fitted`)."""
    task = task_of(data)
    data = task.data
    candidates = candidate_layers(model, cfg)
    total = sum(l.units for l in candidates)
    budget = cfg.max_units if cfg.max_units is not None else max(1, math.ceil(cfg.budget * total))
    budget = min(budget, total)
    if cfg.indices is not None:
        check_indices(cfg.indices, task.num_train)  # its file and line named, before the int64 array
        idx = np.asarray(cfg.indices, dtype=np.int64)
        kinds = kinds_of(task, idx)
    else:
        chosen = cfg.kinds if cfg.kinds is not None else (task.reference_kind, task.memorized_kind)
        for k in chosen:
            if k not in task.kinds:
                raise ConfigError(f"unknown kind {k!r}: choose from {', '.join(task.kinds)}, e.g. --kind "
                                  f"{task.reference_kind},{task.memorized_kind}")
        idx, kinds = select_examples(task, chosen, cfg.examples, seed=cfg.seed, fit=lambda available, kind: fitted(
            cfg, "examples", available, f"{kind} training examples available", note))
    n = task.num_train
    # drawn from all training examples, independently of the chosen ones, so that any two selections
    # (and the batched and sequential modes on a sample) share the same others
    rng = np.random.default_rng([cfg.seed, 1])
    others = np.sort(rng.choice(n, size=fitted(cfg, "others", n, "training examples", note), replace=False))
    if cfg.eval_subsample is not None:
        rng = np.random.default_rng([cfg.seed, 2])
        k = fitted(cfg, "eval_subsample", n, "training examples", note)
        ev_tr = np.sort(rng.choice(n, size=k, replace=False))
        nte = len(data.y_test)
        ev_te = np.sort(rng.choice(nte, size=min(nte, k), replace=False))
    else:
        ev_tr, ev_te = np.arange(n), np.arange(len(data.y_test))
    if not cfg.eval_test:
        ev_te = ev_te[:0]
    return candidates, budget, idx, kinds, others, ev_tr, ev_te


def flip_units(model: nn.Module, data, cfg: FlipConfig | None = None, *,
               done: Sequence[FlipRecord] = (), done_seconds: float = 0.0,
               on_chunk: Callable[[list[FlipRecord], float], None] | None = None,
               progress: bool = False, log: Callable[[str], None] | None = None,
               note: Callable[[str], None] | None = None, mine: Callable[[list], list] = list) -> ProbeResult | None:
    """Greedy unit removal for the chosen training examples of `model` (eval mode) on `data`.

    `done` are records of an earlier, interrupted call with the same config
    (those examples are skipped) and `done_seconds` the time it spent; `on_chunk`
    receives all records so far and the search time so far after each chunk of
    examples (to save them). The summary's time and rate count every call's
    search. `mine` picks this call's share of the (example, kind) list (a shard,
    `Partial.mine`): when the others' examples are not among the records, the
    call only adds its own to them (`on_chunk`) and returns None. The model is
    unchanged afterwards. A default count larger than the data shrinks to it with one line to `note` (else `log`;
    a Python warning without either).
    """
    cfg = cfg or FlipConfig()
    task = task_of(data)
    candidates, budget, idx, kinds, others, ev_tr, ev_te = _plan(model, task, cfg, note=note or log)
    fl = _Flipper(model, task, cfg, candidates, others, ev_tr, ev_te, budget)
    records = {r.index: r for r in done}
    with fl.masks.installed(), cudnn_autotune(False):
        base = fl.accuracies(torch.ones(1, fl.masks.total, device=fl.device))[0]  # the unedited model
    share = mine([(int(e), k) for e, k in zip(idx, kinds)])
    todo = [(e, k) for e, k in share if e not in records]
    if log:
        log(f"flipping {len(share)} examples{'' if len(share) == len(idx) else f' of {len(idx)} (a shard)'} "
            f"({len(share) - len(todo)} already done), {fl.masks.total} units in "
            f"{len(candidates)} layers, cap {budget} units, {len(others)} others, "
            f"{'sequential' if cfg.sequential else f'batches of {cfg.batch_examples}'}")
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(share), initial=len(share) - len(todo), desc="flip", unit="example")
    t0 = time.perf_counter()

    def got(recs: list[FlipRecord]) -> None:
        for r in recs:
            records[r.index] = r
        if on_chunk:
            on_chunk(list(records.values()), done_seconds + time.perf_counter() - t0)

    try:
        chunk = 1 if cfg.sequential else cfg.batch_examples
        with cudnn_autotune(False):
            _run_batched(fl, todo, on_done=got, chunk=chunk, sequential=cfg.sequential,
                         tick=(lambda: bar.update(1)) if bar is not None else (lambda: None))
    finally:
        if bar is not None:
            bar.close()
    elapsed = done_seconds + time.perf_counter() - t0
    if any(int(e) not in records for e in idx):  # a shard: the other examples are flipped elsewhere
        return None
    ordered = [records[int(e)] for e in idx]
    return build_result(ordered, task, cfg, candidates, budget, base, elapsed=elapsed, num_others=len(others),
                        eval_sizes=(len(ev_tr), len(ev_te)), precision="bf16" if fl.bf16 else "fp32")


def accuracy_names(task: Task) -> tuple[str, ...]:
    """The accuracies measured after removal: all training examples, then each subset of the task."""
    return ("train_acc",) + tuple(f"{s}_acc" for s in task.subsets)


def build_result(records: list[FlipRecord], task: Task, cfg: FlipConfig, candidates: list[Layer], budget: int,
                 base: dict, *, elapsed: float | None = None, num_others: int = 0,
                 eval_sizes: tuple[int, int] = (0, 0), precision: str | None = None) -> ProbeResult:
    """Arrays, tidy rows and the summary of a list of records."""
    E, L = len(records), len(candidates)
    width = max([budget] + [r.num_units for r in records])
    pos = {l.index: j for j, l in enumerate(candidates)}
    ul = np.full((E, width), -1, dtype=np.int32)
    ui = np.full((E, width), -1, dtype=np.int32)
    counts = np.zeros((E, L), dtype=np.int32)
    acc_names = accuracy_names(task)
    accs = {k: np.full(E, np.nan) for k in acc_names}
    for i, r in enumerate(records):
        for j, (layer, unit) in enumerate(r.units):
            ul[i, j], ui[i, j] = layer, unit
            counts[i, pos[layer]] += 1
        for k in acc_names:
            v = r.acc.get(k)
            accs[k][i] = np.nan if v is None else v
    arrays = {
        "index": np.array([r.index for r in records], dtype=np.int64),
        "kind": np.array([r.kind for r in records]),
        "label": np.array([r.label for r in records], dtype=np.int64),
        "true_label": np.array([r.true_label for r in records], dtype=np.int64),
        "already_wrong": np.array([r.already_wrong for r in records], dtype=bool),
        "flipped": np.array([r.flipped for r in records], dtype=bool),
        "num_units": np.array([r.num_units for r in records], dtype=np.int64),
        "unit_layer": ul, "unit_index": ui, "layer_counts": counts,
        "layer_names": np.array([l.name for l in candidates]),
        "layer_index": np.array([l.index for l in candidates], dtype=np.int64),
        **{f"{k}_after": v for k, v in accs.items()},
    }
    rows = [{"index": r.index, "kind": r.kind, "label": r.label, "true_label": r.true_label,
             "already_wrong": int(r.already_wrong), "flipped": int(r.flipped), "num_units": r.num_units,
             "units": " ".join(f"{a}:{b}" for a, b in r.units),
             **{f"{k}_after": ("" if r.acc.get(k) is None else round(r.acc[k], 6)) for k in acc_names}}
            for r in records]
    kinds = {}
    for k in dict.fromkeys(r.kind for r in records):
        sel = np.array([r.kind == k and not r.already_wrong for r in records])
        n_units = arrays["num_units"][sel]
        fl = arrays["flipped"][sel]
        lc = counts[sel].sum(0)

        def drop(name):
            b = base.get(name)
            v = accs[name][sel]
            return None if b is None or not np.isfinite(v).any() else float(b - np.nanmean(v))
        kinds[k] = {
            "examples": int(sum(r.kind == k for r in records)),
            "already_wrong": int(sum(r.kind == k and r.already_wrong for r in records)),
            "searched": int(sel.sum()),
            "flipped": int(fl.sum()),
            "flipped_share": float(fl.mean()) if sel.any() else None,  # of the searched (not already wrong)
            "median_units": float(np.median(n_units)) if sel.any() else None,
            "mean_units": float(n_units.mean()) if sel.any() else None,
            "share_flipped_under_10": float((fl & (n_units < 10)).mean()) if sel.any() else None,
            "mean_train_acc_drop": drop("train_acc"),
            f"mean_{task.reference_kind}_train_acc_drop": drop(f"{task.reference_kind}_train_acc"),
            "mean_test_acc_drop": drop("test_acc"),
            "layer_share": [float(v) for v in (lc / max(1, lc.sum()))],
            "layers_used": int((lc > 0).sum()),
            "mean_layers_per_example": float((counts[sel] > 0).sum(1).mean()) if sel.any() else None,
        }
    summary = {
        "probe": PROBE_NAME, "settings": cfg.settings(), "mode": "sequential" if cfg.sequential else "batched",
        "precision": precision,
        "budget_units": budget, "candidate_units": int(sum(l.units for l in candidates)),
        "layers": [{"index": l.index, "name": l.name, "units": l.units} for l in candidates],
        "others": num_others, "eval_train_examples": eval_sizes[0], "eval_test_examples": eval_sizes[1],
        "accuracy_before": base, "kinds": kinds, "examples": E,
        "elapsed_s": None if elapsed is None else round(elapsed, 3),
        "examples_per_s": None if not elapsed else round(E / elapsed, 4),
    }
    return ProbeResult(PROBE_NAME, summary, arrays, rows)


def _to_json(r: FlipRecord) -> dict:
    return {"index": r.index, "kind": r.kind, "label": r.label, "true_label": r.true_label,
            "already_wrong": r.already_wrong, "flipped": r.flipped, "units": [list(u) for u in r.units], "acc": r.acc}


def _from_json(d: dict) -> FlipRecord:
    return FlipRecord(d["index"], d["kind"], d["label"], d["true_label"], d["already_wrong"], d["flipped"],
                      [tuple(u) for u in d["units"]], d["acc"])


def _check(model: nn.Module, data, cfg: FlipConfig, ctx: Context) -> None:
    _plan(model, data, cfg, note=lambda line: None)  # every bad input fails here, before anything is written


def _compute(model: nn.Module, data, cfg: FlipConfig, ctx: Context) -> ProbeResult:
    """Greedy removal resuming the records of an interrupted call (kept after every chunk of examples)."""
    _, state = ctx.partial.load()
    done = [_from_json(r) for r in state.get("records", [])]

    def save(records: list[FlipRecord], elapsed: float) -> None:
        ctx.partial.save(state={"records": [_to_json(r) for r in records], "seconds": round(elapsed, 3)})

    result = flip_units(model, data, cfg, done=done, done_seconds=float(state.get("seconds") or 0.0), on_chunk=save,
                        progress=ctx.progress, log=ctx.log, note=ctx.note, mine=ctx.partial.mine)
    if result is None:  # a shard: its records are saved (`on_chunk`)
        return None
    save(_records_of(result), result.summary["elapsed_s"] or 0.0)
    if ctx.epoch is not None:
        result.summary["epoch"] = ctx.epoch
    return result


def _describe(result: ProbeResult) -> list[str]:
    def pct(v):
        return "  -  " if v is None else f"{100 * v:5.1f}"
    return [f"{kind:6s} {k['examples']} examples: median {k['median_units']} units, "
            f"flipped {pct(k['flipped_share'])}%, "
            f"< 10 units {pct(k['share_flipped_under_10'])}%, train-acc drop {pct(k['mean_train_acc_drop'])} points, "
            f"{k['layers_used']} layers used" for kind, k in result.summary["kinds"].items()]


def _merge_states(states: list[dict]) -> dict:
    """The shards' records as one call's: every record once, the search seconds added up."""
    records = [r for s in states for r in s.get("records", [])]
    seen = [r["index"] for r in records]
    if len(set(seen)) != len(seen):
        raise RunError("two flipping shards hold the same example: they come from different splits; run the shards "
                       "again with --overwrite")
    return {"records": records, "seconds": round(sum(float(s.get("seconds") or 0.0) for s in states), 3)}


PROBE = Probe(PROBE_NAME, "flip", FlipConfig, _compute, check=_check, describe=_describe, guards=True,
              shards=True, merge_state=_merge_states,
              layers_option="layers", overwrite_help="replace a flipping probe made with other settings",
              help="greedy unit removal: the units to zero until each chosen example's prediction flips")


def flip(target, data=None, cfg: FlipConfig | None = None, *, overwrite: bool = False, save: bool = True,
         progress: bool = False, log: Callable[[str], None] | None = None, **options) -> ProbeResult:
    """Greedy unit removal (the paper's neuron flipping) on a run directory or on any trained model.

    `target`: a run directory (``memloc flip RUN``: its final model, or `epoch`; saved into the run, a rerun
    with the same settings continues an interrupted one, other settings over an existing probe need
    `overwrite`), or a trained model with its training `data`. `cfg` a :class:`FlipConfig`, or `options`
    its fields (e.g. ``examples=20, kinds=("noisy",), layers=[...]``). Result arrays (E examples):
    ``index`` (E,), ``num_units`` (E,), ``flipped`` (E,), ``unit_layer`` / ``unit_index`` (E, cap),
    ``layer_counts`` (E, L).
    """
    return run_probe(PROBE, target, data, cfg, overwrite=overwrite, save=save, progress=progress, log=log, **options)


def _records_of(result: ProbeResult) -> list[FlipRecord]:
    a = result.arrays
    out = []
    for i in range(len(a["index"])):
        n = int(a["num_units"][i])
        units = [(int(a["unit_layer"][i, j]), int(a["unit_index"][i, j])) for j in range(n)]
        acc = {k[:-6]: (None if not np.isfinite(a[k][i]) else float(a[k][i])) for k in a if k.endswith("_after")}
        out.append(FlipRecord(int(a["index"][i]), str(a["kind"][i]), int(a["label"][i]), int(a["true_label"][i]),
                              bool(a["already_wrong"][i]), bool(a["flipped"][i]), units, acc))
    return out
