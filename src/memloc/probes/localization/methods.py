"""The localization methods: each scores every candidate unit (or weight) for the memorized sequences M, one
function of the shared `_Localizer` each, named in the table `SCORERS`.

Adding a method: its function here and its row in `SCORERS` (the unit kinds it scores); `memloc localize
--method` offers it from there.

* **Losses**: L_M = mean over M of the cross-entropy of the tokens `match` checks (a target
  entry >= 0: a canary's secret; the whole label for classification), L_O = mean over O of the
  task's loss (every trained token). A unit's multiplicative mask m (1 = live) enters through
  `memloc.core.units.UnitMasks` forward hooks, one mask per row of the batch, so many masked models
  share one pass and d(objective)/dm comes from autograd on the mask rows.
* **Methods** (defaults in brackets):

  - ``greedy``: the paper's removal, `flipping.flip_units` on M (batched; J = mean loss of
    the others - loss of the sequence, one copy, no input noise, at most k units each).
    score(u) = sum over sequences of 1 / (1 + the step at which u was removed), 0 if never.
  - ``zero-out`` (MemPi): score(u) = L_M(m = 1 - e_u) - L_M(1), every unit ablated alone, as
    batched one-hot masks (rows = (unit, sequence)).
  - ``attribution`` (attribution patching: Nanda 2023; Syed et al. 2023): zero-out's score to
    first order, score(u) = -dL_M/dm_u at m = 1 (L_M(1 - e_u) - L_M(1) ~ -dL_M/dm_u: the same loss,
    positions and sign as zero-out). One forward and one backward pass per batch of M (rows =
    sequences, every mask 1; d/dm of the mean over M accumulated, no per-sequence gradient) against
    zero-out's U x |M| rows; no settings. Exact where L_M is linear in m_u; it misjudges a unit
    whose removal moves the loss far (a saturated softmax, a unit backed up by another).
  - ``activations`` (MemPi): score(u) = ||mean activation of u over the scored positions of M||
    (|.| for a neuron, the norm of the head's output vector for a head) x the norm of u's
    outgoing weights (its column, or a head's block, of the layer's output projection: the
    last 2-D weight of the layer's modules). Layers without a block's projection (conv or
    linear layers of other models): the magnitude alone.
  - ``ig`` (knowledge neurons, MemPi): integrated gradients of F = mean over M and scored
    positions of p(target token) along the path m: 0 -> 1 of one layer's units at a time (the
    rest live), midpoint Riemann sum of `ig_steps` [20] points: score(u) = mean_k dF/dm_u(a_k),
    a_k = (k + 1/2) / steps. (MemPi scales one position at a time; here a layer's activations at
    every position together.)
  - ``slimming`` (MemPi): a coefficient c_u in [0, 1] per unit (start 1) minimizing
    L_M(c) + penalty * mean|c|, Adam [lr 0.01, penalty 1000, up to 1000 steps, stopping once
    mean|c| < `stop` 0.1, checked every 10 steps]; c is clamped to [0, 1] after every step.
    score(u) = c_u: the units the memorized sequences still need once most are switched off.
  - ``hard-concrete`` (MemPi, Louizos et al.): an L0 mask per unit, z = clamp(sigmoid((log u -
    log(1 - u) + s) / temperature) * 1.2 - 0.1, 0, 1) (stretch -0.1..1.1, u ~ U(0, 1) per
    sequence and step from a seeded generator, s starting at 0: E z = 0.5), minimizing
    L_M(z) + penalty * mean sigmoid(s - temperature * log(0.1 / 1.1)), Adam [lr 0.01, penalty
    1000, temperature 2/3, up to 1000 steps, stopping once the penalty's mean < `stop`].
    score(u) = sigmoid(s_u).
  - ``balanced-subnet`` (TinyMem's best): a learned score s_u per unit; the mask zeroes the k
    units of smallest s (pooled, or per layer with `per_layer`) and passes its gradient
    straight through to s (edge-popup). Minimizes the balanced objective L_O - L_M (keep the
    others' loss, raise the memorized sequences'), SGD [lr 0.1, momentum 0.9, weight decay
    5e-4 as TinyMem; 200 steps, all of M and O each step]. Unlike TinyMem's weight masks, s is
    signed and starts at 1 plus a seeded 1e-3 jitter: with |s| (theirs), a unit pushed out
    overshoots zero under momentum and comes back; from a random start, k arbitrary units
    would begin removed. score(u) = -s_u: the top k are exactly the learned mask's removed units.
  - ``subnet`` (TinyMem's Subnet; weights only): balanced-subnet's mask, score and schedule with the
    memorized term alone, minimizing -L_M (TinyMem minimizes the negated loss of the sequences to
    forget, keeping nothing else).
  - ``durable`` (TinyMem's Durable, after the durable-backdoor masks; weights only): score(w) =
    |dL_M/dw|, the gradient magnitude of the memorized sequences' loss at each weight, one backward
    pass per batch of M; pooled it is TinyMem's "durable aggregate", with `per_layer` (the top of each
    matrix) their layer-wise "durable". It ignores w itself (zeroing w changes L_M by about -w dL/dw).
  - ``random``: uniform scores from a generator seeded with `seed`: the baseline.

  With weights, balanced-subnet and subnet learn a score s_w per weight exactly as above for units
  (signed, starting at 1 plus a seeded 1e-3 jitter, the k smallest removed each step, straight-through;
  TinyMem's SGD, lr 0.1). The k smallest are taken with `torch.topk` on the device each step (ties, which
  the jitter makes unlikely, in its order); the edit kept is the top k of -s by `top_units`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, ContextManager, Iterator, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...core.batching import rows_that_fit, whole_at_half
from ...core.errors import ConfigError, RunError
from ...core.layers import Layer
from ...core.recompute import blocks_of, recomputing
from ...core.tasks import Task
from ...core.units import UnitMasks
from ...core.weights import Matrix, WeightMasks
from ..flipping.config import FlipConfig
from ..flipping.probe import flip_units
from .edit import _outgoing_norms, _rows, top_units

DEFAULT_STEPS = {"slimming": 1000, "hard-concrete": 1000, "balanced-subnet": 200, "subnet": 200}
DEFAULT_LR = {"slimming": 0.01, "hard-concrete": 0.01, "balanced-subnet": 0.1, "subnet": 0.1}  # MemPi; TinyMem
SUBNET_JITTER = 1e-3  # the learned scores' seeded start: 1 + U(0, 1) x this
STRETCH = (-0.1, 1.1)  # hard-concrete's stretched interval (Louizos et al.; MemPi)
SUBNET_MOMENTUM, SUBNET_WEIGHT_DECAY = 0.9, 5e-4  # TinyMem's SGD for BalancedSubnet
T = TypeVar("T")


def _per_row(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, p(target)) (B,), each the mean over what `match` checks: the target entries >= 0 (a label; a
    sequence's scored tokens)."""
    b = outputs.shape[0]
    scored = targets >= 0
    ce = F.cross_entropy(outputs.float().flatten(0, -2), targets.clamp_min(0).flatten(), reduction="none")
    ce, scored = ce.reshape(b, -1), scored.reshape(b, -1).float()
    count = scored.sum(1).clamp_min(1)
    return (ce * scored).sum(1) / count, (torch.exp(-ce) * scored).sum(1) / count


class _Localizer:
    """The memorized sequences, the others and the unit (or weight) masks of one model: what every method needs."""

    def __init__(self, model: nn.Module, task: Task, cfg, candidates: list[Layer] | list[Matrix],
                 seqs: np.ndarray, others: np.ndarray, k: int | list[int], log: Callable[[str], None]):
        self.model, self.task, self.cfg, self.candidates, self.k, self.log = model, task, cfg, candidates, k, log
        self.device = next(model.parameters()).device
        self.weights = cfg.units == "weights"
        self.masks = WeightMasks(model, candidates) if self.weights else UnitMasks(model, candidates)
        self.U = self.masks.total
        data, y = task.data, task.targets("given")
        self.rows = _rows(cfg, model, data.x_train)
        self.seqs, self.others = seqs, others
        self.recompute = self._recompute(data.x_train)
        self.x_mem = self._input(data.x_train, seqs)
        self.y_mem = y[torch.as_tensor(seqs, device=y.device)].to(self.device)
        self.x_oth = self._input(data.x_train, others)
        self.y_oth = y[torch.as_tensor(others, device=y.device)].to(self.device)
        self.all_edited = [True] * len(candidates)
        self.trace: list[float] = []
        self.details: dict = {}

    def _recompute(self, x: torch.Tensor) -> bool:
        """Whether the method's backward passes recompute the blocks (`--recompute`: on; auto when fewer than
        `RECOMPUTE_BELOW` rows, and fewer than a pass could take, fit without it and more fit with it; then
        `self.rows` is the larger batch), said in one line."""
        cfg = self.cfg
        if cfg.method not in BACKWARD or cfg.recompute == "off":
            return False
        if blocks_of(self.model) is None:
            if cfg.recompute == "on":
                raise ConfigError("--recompute on: the model has no list of blocks to compute again (a transformer's "
                                  "decoder layers); use --recompute auto or off")
            return False
        fits = cfg.batch_size is None and x.dim() == 2  # memloc chooses the rows: recomputing lets it take more
        more = rows_that_fit(self.model, length=x.shape[1], backward=True, recompute=True) if fits else self.rows
        if cfg.recompute == "auto":
            need = len(self.seqs) * (cfg.ig_steps if cfg.method == "ig" else 1)
            if cfg.method == "balanced-subnet":
                need = max(need, len(self.others))
            if not fits or self.rows >= min(need, RECOMPUTE_BELOW) or more <= self.rows:
                return False
            self.log(f"localize: {self.rows} rows fit a backward pass; recomputing each block's activations in the "
                     f"backward pass fits {more} (--recompute off to keep them)")
        self.rows = more
        return True

    def recomputing(self) -> ContextManager:
        """Where the method runs: its model's blocks checkpointed when `self.recompute` (`memloc.core.recompute`)."""
        return recomputing(self.model, self.masks.freeze) if self.recompute else contextlib.nullcontext()

    def _input(self, x: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        return self.task.inputs(x[torch.as_tensor(idx, device=x.device)].to(self.device), self.device)

    def _layer_of_units(self, flat: torch.Tensor) -> list[bool]:
        pos = np.searchsorted(self.masks.offsets, flat.cpu().numpy(), side="right") - 1
        return [bool((pos == j).any()) for j in range(len(self.candidates))]

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None, edited: list[bool] | None = None) -> torch.Tensor:
        """Float logits of inputs x (R, ...) under mask rows (R, U) (None: unedited); rows may require grad."""
        self.masks.set_rows(rows, edited=edited if rows is not None else None)
        try:
            return self.model(x).float()
        finally:
            self.masks.set_rows(None)

    def _chunks(self, n: int) -> Iterator[slice]:
        for lo in range(0, n, self.rows):
            yield slice(lo, lo + self.rows)

    def retrying(self, work: Callable[[], T], *, rng: torch.Generator | None = None,
                 what: str = "localization's backward pass") -> T:
        """work(), started again with half the rows per pass (`self.rows`, what `_chunks` reads) after an
        out-of-memory error: one line the first time, a one-line error where one row does not fit
        (`memloc.core.batching.whole_at_half`). `work` is a unit that starts clean (one layer of ig, one optimizer
        step's gradient, a whole first-order score), so the result is the smaller batch's; `rng`, a generator `work`
        draws from, is rewound to where it was, so the draws are the same too."""
        state = rng.get_state() if rng is not None else None

        def attempt(rows: int) -> T:
            self.rows = rows
            return work()
        result, self.rows = whole_at_half(attempt, self.rows, what=what,
                                          again=(lambda: rng.set_state(state)) if rng is not None else lambda: None)
        return result

    def _capture(self, x: torch.Tensor) -> list[torch.Tensor]:
        for _ in range(2):  # a second pass only when a layer's output is changed in place later (see UnitMasks)
            self.masks.set_rows(torch.ones(len(x), self.U, device=self.device), capture=True,
                                edited=[False] * len(self.candidates))
            try:
                self.model(x)
                acts = self.masks.activations()
            finally:
                self.masks.set_rows(None)
            if acts is not None:
                return [a.detach() for a in acts]
        raise RunError("a layer's activations keep changing in place during the forward pass: they cannot be read")

    def _learn(self, param: torch.Tensor, opt: torch.optim.Optimizer, steps: int,
               loss_terms: Callable[[], Iterator[torch.Tensor]], penalty: Callable[[], torch.Tensor] | None,
               after_step: Callable[[], None] = lambda: None, rng: torch.Generator | None = None) -> int:
        """Minimize sum(loss_terms) (+ penalty) over `param` alone: chunk by chunk backward into param.grad only; a
        step that runs out of memory is taken again at half the rows (`retrying`; `rng`: what loss_terms draws from)."""
        done = 0

        def gradient() -> tuple[float, torch.Tensor | None]:
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for term in loss_terms():
                torch.autograd.backward(term, inputs=[param])
                total += float(term.detach())
            reg = None
            if penalty is not None:
                with torch.enable_grad():
                    reg = penalty()
                torch.autograd.backward(self.cfg.penalty * reg, inputs=[param])
                total += self.cfg.penalty * float(reg.detach())
            return total, reg
        for step in range(steps):
            total, reg = self.retrying(gradient, rng=rng)
            opt.step()
            after_step()
            self.trace.append(total)
            done = step + 1
            # MemPi's rule: every 10 steps, stop once the penalty's mean is small enough
            if reg is not None and done % 10 == 0 and float(reg.detach()) < self.cfg.stop:
                break
        return done

    def _memorized_terms(self, rows_of: Callable[[int, slice], torch.Tensor]) -> Iterator[torch.Tensor]:
        m = len(self.seqs)
        for s in self._chunks(m):
            with torch.enable_grad():
                rows = rows_of(len(self.x_mem[s]), s)
                yield _per_row(self.forward(self.x_mem[s], rows, self.all_edited), self.y_mem[s])[0].sum() / m

    def _weight_forward(self, x: torch.Tensor, *, scale: torch.Tensor | None = None,
                        shift: torch.Tensor | None = None) -> torch.Tensor:
        """Float logits of x with every chosen weight read as w * scale + shift ((P,) each; None: as is)."""
        self.masks.set(scale, shift)
        try:
            return self.model(x).float()
        finally:
            self.masks.set(None)


# ----------------------------------------------------------------------------- one method each

def random(loc: _Localizer) -> torch.Tensor:
    g = torch.Generator().manual_seed(loc.cfg.seed)
    return torch.rand(loc.U, generator=g, dtype=torch.float64).float()


def zero_out(loc: _Localizer) -> torch.Tensor:
    return loc.retrying(lambda: _zero_out(loc), what="localization's zero-out passes")


@torch.no_grad()
def _zero_out(loc: _Localizer) -> torch.Tensor:
    m = len(loc.seqs)
    base = torch.cat([_per_row(loc.forward(loc.x_mem[s], None), loc.y_mem[s])[0] for s in loc._chunks(m)])
    per = max(1, loc.rows // m)  # units per pass: rows (unit, sequence), unit-major
    scores = torch.zeros(loc.U, device=loc.device)
    for lo in range(0, loc.U, per):
        units = torch.arange(lo, min(lo + per, loc.U), device=loc.device)  # (C,)
        c = len(units)
        if c == 1:  # one unit a pass: its M rows in chunks (more sequences than rows: one pass would not fit)
            edited = loc._layer_of_units(units)
            loss = torch.cat([_per_row(loc.forward(loc.x_mem[s], _without(loc, units, len(loc.x_mem[s])), edited),
                                       loc.y_mem[s])[0] for s in loc._chunks(m)]).view(1, m)
        else:
            x = torch.cat([loc.x_mem] * c)
            y = torch.cat([loc.y_mem] * c)
            loss = _per_row(loc.forward(x, _without(loc, units, m), loc._layer_of_units(units)), y)[0].view(c, m)
        scores[lo:lo + c] = (loss - base).mean(1)
    return scores.cpu()


def _without(loc: _Localizer, units: torch.Tensor, m: int) -> torch.Tensor:
    """(C * m, U) mask rows, unit-major: m rows of ones with unit c zeroed, for each of the C units."""
    c = len(units)
    rows = torch.ones(c * m, loc.U, device=loc.device)
    rows[torch.arange(c * m, device=loc.device), units.repeat_interleave(m)] = 0.0
    return rows


def attribution(loc: _Localizer) -> torch.Tensor:
    def gradient() -> torch.Tensor:
        mask = torch.ones(loc.U, device=loc.device, requires_grad=True)  # one mask shared by every row: its
        # gradient is the sum over the rows, and each term is already divided by |M|: d(mean over M)/dm
        for term in loc._memorized_terms(lambda n, s: mask.expand(n, -1)):
            torch.autograd.backward(term, inputs=[mask])
        return mask.grad if mask.grad is not None else torch.zeros_like(mask)
    grad = loc.retrying(gradient)
    return -grad.detach().cpu()  # L(1 - e_u) - L(1) ~ -dL/dm_u: higher = removing u raises the loss more


def activations(loc: _Localizer) -> torch.Tensor:
    return loc.retrying(lambda: _activations(loc), what="localization's activation pass")


@torch.no_grad()
def _activations(loc: _Localizer) -> torch.Tensor:
    out = []
    for s in loc._chunks(len(loc.seqs)):
        acts = loc._capture(loc.x_mem[s])
        out.append([_magnitude(loc, j, a, loc.y_mem[s]) for j, a in enumerate(acts)])  # per layer: (U_j,) sums
    count = (loc.y_mem >= 0).sum().clamp_min(1).float() if _aligned(loc.y_mem) else None
    scores = []
    for j, layer in enumerate(loc.candidates):
        total = sum(part[j] for part in out)
        if count is not None and total.dim() > 1:  # a per-position vector (a head's output): mean, then its norm
            mag = (total / count).flatten(1).norm(dim=1)
        elif count is not None:
            mag = (total / count).abs()
        else:
            mag = (total / len(loc.seqs)).abs()
        norm = _outgoing_norms(loc.model, layer)
        scores.append(mag * (norm.to(mag.device) if norm is not None else 1.0))
    return torch.cat(scores).cpu()


def _aligned(y: torch.Tensor) -> bool:
    return y.dim() == 2  # (B, T) targets: one per position of the activations (B, T, ...)


def _magnitude(loc: _Localizer, j: int, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum of layer j's activation over the scored positions of a chunk, per unit ((U_j,) or (U_j, width))."""
    layer = loc.candidates[j]
    dim = layer.unit_dim % a.dim()
    if _aligned(y) and a.dim() >= 3 and tuple(a.shape[:2]) == tuple(y.shape):
        w = (y >= 0).to(a.dtype)  # (B, T): the positions whose next token is scored
        s = torch.einsum("bt,bt...->...", w, a)  # a.shape[2:]
        return s.movedim(dim - 2, 0)  # (U_j,) or (U_j, hs)
    return a.movedim(dim, 0).flatten(1).mean(1) * len(a)  # other layers: the mean over every position


def ig(loc: _Localizer) -> torch.Tensor:
    steps, m = loc.cfg.ig_steps, len(loc.seqs)
    alphas = (torch.arange(steps, device=loc.device, dtype=torch.float32) + 0.5) / steps  # midpoints
    scores = torch.zeros(loc.U, device=loc.device)
    pairs = [(a, s) for a in range(steps) for s in range(m)]  # rows: (step, sequence)

    def layer(j: int, lo: int, hi: int) -> torch.Tensor:
        only = [i == j for i in range(len(loc.candidates))]
        total = torch.zeros(hi - lo, device=loc.device)
        for part in loc._chunks(len(pairs)):
            chunk = pairs[part]
            a_idx = torch.as_tensor([p[0] for p in chunk], device=loc.device)
            s_idx = torch.as_tensor([p[1] for p in chunk], device=loc.device)
            rows = torch.ones(len(chunk), loc.U, device=loc.device)
            rows[:, lo:hi] = alphas[a_idx, None]
            rows.requires_grad_(True)
            with torch.enable_grad():
                prob = _per_row(loc.forward(loc.x_mem[s_idx], rows, only), loc.y_mem[s_idx])[1]
                (grad,) = torch.autograd.grad(prob.sum(), rows)
            total += grad[:, lo:hi].sum(0) / (steps * m)  # mean over sequences of the Riemann sum
        return total
    for j in range(len(loc.candidates)):
        lo, hi = int(loc.masks.offsets[j]), int(loc.masks.offsets[j + 1])
        scores[lo:hi] = loc.retrying(functools.partial(layer, j, lo, hi))
    return scores.detach().cpu()


def slimming(loc: _Localizer) -> torch.Tensor:
    c = torch.ones(loc.U, device=loc.device, requires_grad=True)
    steps = loc.cfg.steps or DEFAULT_STEPS["slimming"]
    lr = loc.cfg.lr or DEFAULT_LR["slimming"]
    opt = torch.optim.Adam([c], lr=lr)

    def clamp():
        with torch.no_grad():
            c.clamp_(0.0, 1.0)

    done = loc._learn(c, opt, steps, lambda: loc._memorized_terms(lambda n, s: c.expand(n, -1)),
                       lambda: c.abs().mean(), clamp)
    loc.details = {"steps": steps, "steps_run": done, "lr": lr, "penalty": loc.cfg.penalty,
                    "stop": loc.cfg.stop}
    return c.detach().clamp(0.0, 1.0).cpu()


def hard_concrete(loc: _Localizer) -> torch.Tensor:
    lo_, hi_ = STRETCH
    beta = loc.cfg.temperature
    s = torch.zeros(loc.U, device=loc.device, requires_grad=True)  # E z = 0.5 at the start (MemPi's mask_p)
    steps = loc.cfg.steps or DEFAULT_STEPS["hard-concrete"]
    lr = loc.cfg.lr or DEFAULT_LR["hard-concrete"]
    opt = torch.optim.Adam([s], lr=lr)
    gen = torch.Generator().manual_seed(loc.cfg.seed)
    state = {"u": None}

    def draw() -> None:  # one uniform per (sequence, unit) per step, on the CPU: the same on every device
        state["u"] = torch.rand(len(loc.seqs), loc.U, generator=gen).clamp(1e-4, 1 - 1e-4).to(loc.device)

    def rows_of(n: int, part: slice) -> torch.Tensor:
        u = state["u"][part]
        z = torch.sigmoid((u.log() - (1 - u).log() + s) / beta) * (hi_ - lo_) + lo_
        return z.clamp(0.0, 1.0)

    def terms():
        draw()
        return loc._memorized_terms(rows_of)

    done = loc._learn(s, opt, steps, terms, lambda: torch.sigmoid(s - beta * math.log(-lo_ / hi_)).mean(), rng=gen)
    loc.details = {"steps": steps, "steps_run": done, "lr": lr, "penalty": loc.cfg.penalty,
                    "stop": loc.cfg.stop, "temperature": beta, "stretch": list(STRETCH)}
    return torch.sigmoid(s.detach()).cpu()


def balanced_subnet(loc: _Localizer) -> torch.Tensor:
    if loc.weights:
        return _weight_subnet(loc, balanced=True)
    gen = torch.Generator().manual_seed(loc.cfg.seed)
    s = (1.0 + SUBNET_JITTER * torch.rand(loc.U, generator=gen)).to(loc.device).requires_grad_(True)
    steps = loc.cfg.steps or DEFAULT_STEPS["balanced-subnet"]
    lr = loc.cfg.lr or DEFAULT_LR["balanced-subnet"]
    opt = torch.optim.SGD([s], lr=lr, momentum=SUBNET_MOMENTUM, weight_decay=SUBNET_WEIGHT_DECAY)
    sizes = [l.units for l in loc.candidates]

    def terms():
        hard = torch.ones(loc.U, device=loc.device)
        removed = top_units(-s.detach().cpu().numpy(), loc.candidates, loc.k)  # the k smallest s
        hard[torch.as_tensor(removed, device=loc.device)] = 0.0

        def rows(n: int) -> torch.Tensor:  # straight-through: the forward sees `hard`, d mask / d s = 1
            return (hard + s - s.detach()).expand(n, -1)

        n_m, n_o = len(loc.seqs), len(loc.others)
        for part in loc._chunks(n_o):
            x, y = loc.x_oth[part], loc.y_oth[part]
            with torch.enable_grad():
                yield loc.task.loss(loc.forward(x, rows(len(x)), loc.all_edited), y).sum() / n_o
        for part in loc._chunks(n_m):
            x, y = loc.x_mem[part], loc.y_mem[part]
            with torch.enable_grad():
                yield -_per_row(loc.forward(x, rows(len(x)), loc.all_edited), y)[0].sum() / n_m

    done = loc._learn(s, opt, steps, terms, None)
    loc.details = {"steps": steps, "steps_run": done, "lr": lr, "momentum": SUBNET_MOMENTUM,
                    "weight_decay": SUBNET_WEIGHT_DECAY, "sizes": sizes}
    return -s.detach().cpu()


def _smallest(loc: _Localizer, s: torch.Tensor) -> torch.Tensor:
    """Positions of the k smallest entries of s (P,), pooled or k per matrix (`per_layer`)."""
    if isinstance(loc.k, (int, np.integer)):
        return torch.topk(s, int(loc.k), largest=False, sorted=False).indices
    out = []
    for j, kj in enumerate(loc.k):
        lo, hi = int(loc.masks.offsets[j]), int(loc.masks.offsets[j + 1])
        out.append(lo + torch.topk(s[lo:hi], int(kj), largest=False, sorted=False).indices)
    return torch.cat(out)


def _weight_subnet(loc: _Localizer, *, balanced: bool) -> torch.Tensor:
    """(Balanced)Subnet on weights: balanced_subnet's learned scores, one per weight; `balanced` keeps L_O."""
    name = "balanced-subnet" if balanced else "subnet"
    gen = torch.Generator().manual_seed(loc.cfg.seed)
    s = (1.0 + SUBNET_JITTER * torch.rand(loc.U, generator=gen)).to(loc.device).requires_grad_(True)  # (P,)
    steps = loc.cfg.steps or DEFAULT_STEPS[name]
    lr = loc.cfg.lr or DEFAULT_LR[name]
    opt = torch.optim.SGD([s], lr=lr, momentum=SUBNET_MOMENTUM, weight_decay=SUBNET_WEIGHT_DECAY)

    def terms():
        hard = torch.ones(loc.U, device=loc.device)
        hard[_smallest(loc, s.detach())] = 0.0
        n_m, n_o = len(loc.seqs), len(loc.others)
        for part in loc._chunks(n_o) if balanced else ():
            x, y = loc.x_oth[part], loc.y_oth[part]
            with torch.enable_grad():  # straight-through: the forward sees `hard`, d mask / d s = 1
                yield loc.task.loss(loc._weight_forward(x, scale=hard + s - s.detach()), y).sum() / n_o
        for part in loc._chunks(n_m):
            x, y = loc.x_mem[part], loc.y_mem[part]
            with torch.enable_grad():
                yield -_per_row(loc._weight_forward(x, scale=hard + s - s.detach()), y)[0].sum() / n_m

    done = loc._learn(s, opt, steps, terms, None)
    loc.details = {"steps": steps, "steps_run": done, "lr": lr, "momentum": SUBNET_MOMENTUM,
                    "weight_decay": SUBNET_WEIGHT_DECAY, "mask_numel": int(s.numel())}
    return -s.detach().cpu()


def subnet(loc: _Localizer) -> torch.Tensor:
    return _weight_subnet(loc, balanced=False)


def durable(loc: _Localizer) -> torch.Tensor:
    m = len(loc.seqs)

    def gradient() -> torch.Tensor:
        shift = torch.zeros(loc.U, device=loc.device, requires_grad=True)  # (P,): d L / d shift = d L / d w
        for part in loc._chunks(m):
            with torch.enable_grad():
                term = _per_row(loc._weight_forward(loc.x_mem[part], shift=shift), loc.y_mem[part])[0].sum() / m
            torch.autograd.backward(term, inputs=[shift])
        return shift.grad if shift.grad is not None else torch.zeros_like(shift)
    grad = loc.retrying(gradient)
    loc.details = {"mask_numel": int(loc.U)}
    return grad.detach().abs().cpu()


def greedy(loc: _Localizer, *, progress: bool = False, **resume) -> torch.Tensor | None:
    cap = loc.k if isinstance(loc.k, int) else int(sum(loc.k))
    flip_cfg = FlipConfig(indices=tuple(int(i) for i in loc.seqs), others=min(loc.cfg.others,
                          loc.task.num_train), copies=1, input_noise=0.0, max_units=cap,
                          layers=tuple(l.name for l in loc.candidates), eval_subsample=1, eval_test=False,
                          seed=loc.cfg.seed)
    res = flip_units(loc.model, loc.task, flip_cfg, progress=progress, log=loc.log, **resume)
    if res is None:  # a shard: its part of the search is kept
        return None
    pos = {l.index: j for j, l in enumerate(loc.candidates)}
    scores = torch.zeros(loc.U)
    ul, ui, n = res.arrays["unit_layer"], res.arrays["unit_index"], res.arrays["num_units"]
    for e in range(len(n)):
        for step in range(int(n[e])):
            flat = int(loc.masks.offsets[pos[int(ul[e, step])]]) + int(ui[e, step])
            scores[flat] += 1.0 / (1 + step)
    loc.details = {"flipped": int(res.arrays["flipped"].sum()), "mean_units": float(np.mean(n)),
                    "cap": cap}
    return scores


# the methods that backpropagate through the model (`--recompute` applies to them), and the rows per pass below which
# auto turns recomputation on: a pass of fewer rows leaves a GPU mostly idle, and recomputing costs about one
# forward pass more per backward (a third more arithmetic) while it fits several times the rows of a large model
BACKWARD = frozenset({"attribution", "ig", "slimming", "hard-concrete", "balanced-subnet", "subnet", "durable"})
RECOMPUTE_BELOW = 8

# name -> (the method's scoring function, the unit kinds it scores), in the order `--method` lists them: adding a
# method is its function above and one row here
SCORERS: dict[str, tuple[Callable[..., torch.Tensor | None], tuple[str, ...]]] = {
    "greedy": (greedy, ("neurons",)),
    "zero-out": (zero_out, ("neurons",)),
    "attribution": (attribution, ("neurons",)),
    "activations": (activations, ("neurons",)),
    "ig": (ig, ("neurons",)),
    "slimming": (slimming, ("neurons",)),
    "hard-concrete": (hard_concrete, ("neurons",)),
    "balanced-subnet": (balanced_subnet, ("neurons", "weights")),
    "subnet": (subnet, ("weights",)),
    "durable": (durable, ("weights",)),
    "random": (random, ("neurons", "weights")),
}
