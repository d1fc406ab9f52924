"""Causal language modelling with canaries: the second task, and the only place its words live for the probes.

Training sequences are corpus text or hold a canary (the memorized kind: a sequence a
model reproduces only by memorizing it); the corpus sequences are the reference a model
must keep. A model's output is (B, T, vocab) logits; its prediction is the argmax at every
position, read teacher-forced; a sequence "still matches" when every scored target token
is the argmax given the true tokens before it — exactly when greedy decoding from the
prefix reproduces the scored tokens (if every step's argmax is the true token, greedy
decoding walks the true sequence; at the first step where it is not, greedy leaves it).

Subsets (report order): corpus-train and canary-train (extraction of training sequences:
the corpus suffix after its prefix, the canary's secret after everything before it),
canary-held-out (extraction of canaries never trained: the reference, ~0), and test
(held-out next-token accuracy, one seeded position per held-out sequence).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...core.batching import in_batches
from ...core.errors import ConfigError
from ...core.inference import indices_context
from ...core.precision import autocast
from .text import TextData, decode_targets


class LanguageModelTask:
    """The probes' view of :class:`~memloc.tasks.lm.text.TextData` (see `memloc.tasks.Task`)."""

    name = "lm"
    class_labels = False  # a token sequence per example
    subsets = ("corpus_train", "canary_train", "canary_heldout", "test")
    kinds = ("corpus", "canary")
    memorized_kind = "canary"
    reference_kind = "corpus"
    known = True
    eval_batch_cap = 256  # sequences per evaluation batch at most: each holds (B, T, vocab) logits

    def __init__(self, data: TextData):
        self.data = data

    @property
    def num_train(self) -> int:
        return self.data.num_train

    def example_ids(self, idx: torch.Tensor, tie: str, split: str = "train") -> torch.Tensor:
        """What example-tied dropout (memorization sinks) hashes for sequences `idx`: see `TextData.example_ids`."""
        return self.data.example_ids(idx, tie, split)

    def example_input(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(n, self.data.block_size, dtype=torch.long, device=device)

    # -- model input and output
    def inputs(self, xb: torch.Tensor, device: torch.device, *, augment: bool = False) -> torch.Tensor:
        return xb.to(device, non_blocking=True).long()

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (B,) over each sequence's trained target tokens (scored or not)."""
        tokens, trained, _ = decode_targets(targets.to(outputs.device))
        per_token = F.cross_entropy(outputs.float().flatten(0, 1), tokens.flatten(), reduction="none")
        per_token = per_token.view(tokens.shape) * trained
        return per_token.sum(1) / trained.sum(1).clamp_min(1)

    def margin(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The smallest (target logit - best other logit) over the scored tokens (B,): > 0 iff extractable."""
        out = outputs.detach().float()
        tokens, _, scored = decode_targets(targets.to(out.device))
        target = out.gather(-1, tokens[..., None]).squeeze(-1)
        top, where = out.topk(2, dim=-1)  # the best other logit without copying the (B, T, vocab) logits
        other = torch.where(where[..., 0] == tokens, top[..., 1], top[..., 0])
        m = (target - other).masked_fill(~scored, float("inf")).amin(1)
        return torch.where(scored.any(1), m, torch.zeros_like(m))

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.argmax(-1)

    def match(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B,) every scored token predicted (teacher-forced greedy = extraction); False with nothing scored."""
        targets = targets.to(predictions.device)
        scored = targets >= 0
        return ((predictions == targets) | ~scored).all(1) & scored.any(1)

    def targets(self, which: str) -> torch.Tensor | None:
        if which in ("given", "true"):  # the canaries are real text: what was trained is what is true
            return self.data.y_train
        if which == "test":
            return self.data.y_test
        raise ValueError(f"unknown targets {which!r}")

    def check_outputs(self, outputs: torch.Tensor) -> None:
        v, t = self.data.vocab_size, self.data.block_size
        if not isinstance(outputs, torch.Tensor) or outputs.dim() != 3 or outputs.shape[-1] < v:
            got = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
            raise ConfigError(f"the model's output is {got} for 2 sequences of {t} tokens, but the tokenizer has "
                              f"{v} ids: the model must return logits (batch, tokens, >= {v})")

    def record_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) int labels a per-example record stores: the canary a sequence holds (-1: none), twice."""
        return self.data.canary, self.data.canary

    # -- kinds and subsets
    def kind_mask(self, kind: str) -> torch.Tensor | None:
        if kind not in self.kinds:
            raise ValueError(f"unknown kind {kind!r}")
        canary = self.data.canary >= 0
        return canary if kind == "canary" else ~canary

    def subset_masks(self) -> dict[str, torch.Tensor | None]:
        masks = {"corpus_train": self.kind_mask("corpus"), "canary_train": self.kind_mask("canary")}
        return {k: (m if bool(m.any()) else None) for k, m in masks.items()}

    def test_masks(self) -> dict[str, torch.Tensor | None]:
        canary = self.data.canary_test >= 0
        return {"canary_heldout": canary if bool(canary.any()) else None, "test": ~canary if bool((~canary).any())
                else None}

    def accuracy(self, hits_train: torch.Tensor, hits_test: torch.Tensor) -> np.ndarray:
        """(S, 4) float64: extraction of corpus-train, canary-train, canary-held-out; held-out token accuracy."""
        s = hits_train.shape[0]
        cols = []
        for hits, masks in ((hits_train, self.subset_masks()), (hits_test, self.test_masks())):
            for m in masks.values():
                if m is None or hits.shape[1] == 0:
                    cols.append(torch.full((s,), float("nan"), dtype=torch.float64))
                else:
                    m = m.to(hits.device)
                    cols.append((hits & m).sum(1).double().cpu() / int(m.sum()))
        return torch.stack(cols, 1).numpy()

    @torch.no_grad()
    def hits(self, model: nn.Module, split: str = "train", *, batch_size: int = 256, with_indices: bool = False,
             rows: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) or (M,) bool: `match` of every training ("train") or held-out ("test") sequence, batch by batch;
        with `rows` (positions) only those are measured, the others False."""
        device = next(model.parameters()).device
        x, y = (self.data.x_train, self.data.y_train) if split == "train" else (self.data.x_test, self.data.y_test)
        out = torch.zeros(len(x), dtype=torch.bool, device=device)
        modes = {m: m.training for m in model.modules()}
        ctx = indices_context(model, self, split)
        model.eval()
        order = torch.arange(len(x), device=x.device) if rows is None else rows.to(x.device)

        def part(lo: int, hi: int) -> None:
            idx = order[lo:hi]
            xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
            with autocast(device), (ctx(model, idx) if with_indices else contextlib.nullcontext()):
                logits = model(self.inputs(xb, device))
            out[idx.to(out.device)] = self.match(self.predict(logits.float()), yb)
        try:
            in_batches(len(order), batch_size, part, what="the extraction pass")
        finally:
            for m, t in modes.items():
                m.training = t
        return out

    def evaluate(self, model: nn.Module, *, batch_size: int = 256, with_indices: bool = False
                 ) -> dict[str, float | None]:
        """Eval-mode extraction rate of every subset (held-out token accuracy for "test"), keys "<subset>_acc"."""
        batch_size = min(batch_size, self.eval_batch_cap)
        acc = self.accuracy(self.hits(model, "train", batch_size=batch_size, with_indices=with_indices)[None],
                            self.hits(model, "test", batch_size=batch_size)[None])[0]
        return {f"{s}_acc": (None if np.isnan(v) else float(v)) for s, v in zip(self.subsets, acc)}
