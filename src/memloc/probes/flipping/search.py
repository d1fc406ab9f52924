"""Greedy unit removal's search ("flipping", probe 4): how many units must be zeroed to flip one example's prediction?

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
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ...core.batching import rows_that_fit, whole_at_half
from ...core.cutting import fold_norms, split_after
from ...core.errors import RunError
from ...core.layers import Layer
from ...core.precision import bf16
from ...core.tasks import task_of
from ...core.units import UnitMasks
from .config import FlipConfig, FlipRecord, accuracy_names, use_bf16


def _noise_seed(seed: int, example: int, copy: int, step: int) -> int:
    h = hashlib.blake2b(f"flip:{seed}:{example}:{copy}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


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

    def _retrying(self, work: Callable[[], object], rows: str, what: str):
        """work(), started again with half of `self.<rows>` after an out-of-memory error (one line the first time;
        one line, no traceback, where one row does not fit: `memloc.core.batching.whole_at_half`). `work` computes its
        result afresh, so it is what the smaller batch gives."""
        def attempt(n: int):
            setattr(self, rows, n)
            return work()
        return whole_at_half(attempt, getattr(self, rows), what=what, flag=None,
                             again=lambda: self.masks.set_rows(None))[0]

    def _others_grad(self, uniq: torch.Tensor) -> torch.Tensor:
        """d(mean loss of the others)/dm (G, U) for G masks (G, U) of 0/1, chunked to `max_rows` rows (halved on
        an out-of-memory error)."""
        return self._retrying(lambda: self._others_grad_in(uniq), "max_rows", "flipping's backward pass")

    def _others_grad_in(self, uniq: torch.Tensor) -> torch.Tensor:
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

    def accuracies(self, masks: torch.Tensor) -> list[dict[str, float | None]]:
        """Accuracies after removal for K masks (K, U): many edited models per pass over the data, `eval_rows` rows
        a pass (halved on an out-of-memory error); `_accuracies`."""
        return self._retrying(lambda: self._accuracies(masks), "eval_rows", "flipping's accuracy pass")

    @torch.no_grad()
    def _accuracies(self, masks: torch.Tensor) -> list[dict[str, float | None]]:
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
