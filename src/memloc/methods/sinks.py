"""Memorization sinks (Ghosal, Maini, Raghunathan, ICML 2025) evaluated: a language model trained with
sequence-tied dropout in its MLPs, before and after its sink neurons are dropped.

Before ("tied"): every canary is measured through its own training-time sinks — the mask of its id
(its document's under ``--tie document``, so all copies of a canary share it; the first training row
holding it under ``--tie sequence``); a held-out canary through the mask of its own, never-trained id.
After ("drop"): every sink neuron zeroed, the shared neurons rescaled, the same for every sequence.

Per repeat count and format: extraction (greedy from the prefix), loss of the secret (nats per token)
and exposure (secret-number canaries) of the trained canaries and of the held-out ones of the same
group, before and after; in-context extraction of the training sequences holding them; held-out
perplexity in "eval" (every neuron on, sinks at their training expectation) and "drop" mode.

The headline numbers pool the canaries repeated at least `repeated` times (16 by default):
extraction before and after and its relative fall, the loss gap (held-out minus trained, MemSinks'
measure) before and after, and the share of the gap the drop closes, 1 - gap_after / gap_before.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.dropout import ExampleTiedDropout, dropout_mode, example_indices, layer_setting
from ..probes.base import ProbeResult
from ..probes.dropout_eval import register_task_evaluation
from ..probes.memorization import MemorizationConfig, _mean, by_repeats, canary_measures, heldout_perplexity
from ..tasks.lm.text import TextData

MODES = ("tied", "drop")  # before, after
PROBE_NAME = "dropout"  # saved as the example-tied evaluation of the run (probes/dropout/), as for images


def canary_example_id(data: TextData, canary: int, tie: str) -> int:
    """The id a canary's standalone prefix and secret are measured under in "tied" mode (see the module text)."""
    if tie == "sequence" and data.canaries[canary]["trained"]:
        rows = torch.nonzero(data.canary.cpu() == canary).flatten()
        if len(rows):
            return int(rows[0])
    return data.canary_id(canary)


def _rel(before: float | None, after: float | None) -> float | None:
    """The relative fall 1 - after / before (None where before is 0 or missing)."""
    if before is None or after is None or before <= 0:
        return None
    return round(1.0 - after / before, 6)


def pooled(data: TextData, m: dict[str, np.ndarray], hits: np.ndarray, repeated: int) -> dict[str, float | None]:
    """Extraction, exposure and loss gap of the canaries of repeat group >= `repeated`, trained vs held out, and
    in-context extraction of the training sequences holding them (`hits` (N,) bool)."""
    trained = np.array([c["trained"] for c in data.canaries], dtype=bool)
    sel = np.array([c["repeat_group"] >= repeated for c in data.canaries], dtype=bool)
    tr, ho = sel & trained, sel & ~trained
    gap = None
    if tr.any() and ho.any():
        gap = round(float(np.mean(m["loss"][ho]) - np.mean(m["loss"][tr])), 6)
    owner = data.canary.cpu().numpy()
    seqs = np.isin(owner, np.flatnonzero(tr)) & (owner >= 0)
    return {"n": int(tr.sum()), "extracted": _mean(m["extracted"][tr].astype(float)),
            "in_context": _mean(hits[seqs].astype(float)) if seqs.any() else None,
            "heldout_extracted": _mean(m["extracted"][ho].astype(float)),
            "loss": _mean(m["loss"][tr]), "heldout_loss": _mean(m["loss"][ho]), "loss_gap": gap,
            "exposure": _mean(m["exposure"][tr]), "heldout_exposure": _mean(m["exposure"][ho])}


def gap_closed(before: float | None, after: float | None) -> float | None:
    """The share of a loss gap an intervention closed: 1 - after / before (None unless before > 0)."""
    return _rel(before, after)


@contextlib.contextmanager
def same_units(model: nn.Module, p_gen: float, p_mem: float):
    """Put example-tied layers of (p_gen, p_mem) in every `.sink` slot of a model trained without sinks (plain, or
    standard dropout there), for the block: its "drop" mode then zeroes the very neurons a sinks model of that
    shape drops (and its "tied" mode is its own eval mode, its slots' test-time behaviour). Restored after."""
    owners = [m for m in model.modules() if hasattr(m, "sink") and isinstance(getattr(m, "proj", None), nn.Module)]
    saved = [m.sink for m in owners]
    try:
        for i, m in enumerate(owners):
            layer = ExampleTiedDropout(p_gen, p_mem, layer_id=i)
            layer.eval_mode = "eval"
            m.sink = _AsEval(layer)
        yield model
    finally:
        for m, old in zip(owners, saved):
            m.sink = old


class _AsEval(nn.Module):
    """An example-tied layer whose "tied" and "eval" modes are the identity (a model trained without it)."""

    def __init__(self, layer: ExampleTiedDropout):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x) if self.layer.eval_mode == "drop" else x


@torch.no_grad()
def evaluate_sinks(model: nn.Module, data: TextData, *, drop_scale: str = "matched", repeated: int = 16,
                   exposure: bool = True, batch_size: int = 256, seed: int = 0,
                   drop_units: tuple[float, float] | None = None) -> ProbeResult:
    """Canary memorization before (tied) and after (drop) removing the sinks (see the module text).

    A model without sinks (plain, deduplicated, standard dropout) is measured the same way: with `drop_units`
    (p_gen, p_mem) "after" zeroes the neurons a sinks model of that shape would drop (`same_units`: does its
    memorization sit there? it should not), without it before equals after.
    """
    if drop_units is not None and not any(isinstance(m, ExampleTiedDropout) for m in model.modules()):
        with same_units(model, *drop_units):
            result = evaluate_sinks(model, data, drop_scale=drop_scale, repeated=repeated, exposure=exposure,
                                    batch_size=batch_size, seed=seed)
        result.summary["same_units"] = list(drop_units)
        return result
    from ..core.tasks import task_of
    layers = [m for m in model.modules() if isinstance(m, ExampleTiedDropout)]
    tie = (layers[0].tie if layers else None) or "document"
    device = next(model.parameters()).device
    task = task_of(data)
    mcfg = MemorizationConfig(exposure=exposure, batch_size=batch_size, seed=seed)
    scale = layer_setting(model, "drop_scale", drop_scale) if layers else contextlib.nullcontext()
    measured: dict[str, dict[str, Any]] = {}
    with scale:
        for mode in MODES if layers else MODES[:1]:  # without sinks every mode is the same model: measured once
            def context(i: int, mode=mode):
                if mode != "tied" or not layers:
                    return contextlib.nullcontext()
                return example_indices(model, torch.tensor(canary_example_id(data, i, tie), device=device))
            with dropout_mode(model, mode) if layers else contextlib.nullcontext():
                m = canary_measures(model, data, mcfg, context=context, membership=False)
                hits = task.hits(model, "train", batch_size=batch_size, with_indices=mode == "tied").cpu().numpy()
            measured[mode] = {"m": m, "hits": hits}
        measured.setdefault("drop", measured["tied"])
        ppl = {}
        for mode in ("eval", "drop") if layers else ("eval",):
            with dropout_mode(model, mode) if layers else contextlib.nullcontext():
                ppl[mode] = heldout_perplexity(model, data, batch_size=batch_size)
        ppl.setdefault("drop", ppl["eval"])
    before, after = (pooled(data, measured[k]["m"], measured[k]["hits"], repeated) for k in MODES)
    corpus = task.kind_mask("corpus").cpu().numpy()
    rows_before = by_repeats(data, measured["tied"]["m"], measured["tied"]["hits"])
    rows_after = by_repeats(data, measured["drop"]["m"], measured["drop"]["hits"])
    by = []
    for b, a in zip(rows_before, rows_after):
        row = {"repeats": b["repeats"], "format": b["format"], "n": b["n"]}
        for key in ("trained_extracted", "in_context_extracted", "heldout_extracted", "trained_loss", "heldout_loss",
                    "loss_gap", "trained_exposure", "heldout_exposure"):
            row[f"{key}_before"], row[f"{key}_after"] = b[key], a[key]
        row["gap_closed"] = gap_closed(b["loss_gap"], a["loss_gap"])
        by.append(row)
    summary = {
        "tie": tie, "drop_scale": drop_scale, "layers": len(layers),
        "p_gen": layers[0].p_gen if layers else None, "p_mem": layers[0].p_mem if layers else None,
        "repeated": repeated, "by_repeats": by,
        "repeated_before": before, "repeated_after": after,
        "extraction_fall": _rel(before["extracted"], after["extracted"]),
        "gap_closed": gap_closed(before["loss_gap"], after["loss_gap"]),
        "heldout_perplexity_eval": round(ppl["eval"], 4), "heldout_perplexity_drop": round(ppl["drop"], 4),
        "perplexity_rise": round(ppl["drop"] / ppl["eval"] - 1.0, 6) if math.isfinite(ppl["eval"]) else None,
        "corpus_extracted_before": _mean(measured["tied"]["hits"][corpus].astype(float)) if corpus.any() else None,
        "corpus_extracted_after": _mean(measured["drop"]["hits"][corpus].astype(float)) if corpus.any() else None,
    }
    arrays = {"canary_id": np.array([c["id"] for c in data.canaries]),
              "repeat_group": np.array([c["repeat_group"] for c in data.canaries]),
              "trained": np.array([c["trained"] for c in data.canaries], dtype=bool)}
    for mode, when in zip(MODES, ("before", "after")):
        m = measured[mode]["m"]
        arrays.update({f"extracted_{when}": m["extracted"], f"loss_{when}": m["loss"],
                       f"exposure_{when}": m["exposure"], f"in_context_{when}": measured[mode]["hits"]})
    rows = [{k: v for k, v in r.items()} for r in by if r["format"] == "all"]
    return ProbeResult(PROBE_NAME, summary, arrays, rows)


def describe(summary: dict) -> list[str]:
    """The evaluation in a few lines for the console."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    def num(v, f=".2f"):
        return "-" if v is None else format(v, f)
    b, a = summary["repeated_before"], summary["repeated_after"]
    lines = [f"canaries repeated >= {summary['repeated']}x: extracted {pct(b['extracted'])} -> {pct(a['extracted'])} "
             f"(in context {pct(b['in_context'])} -> {pct(a['in_context'])}; tied -> drop); loss gap "
             f"{num(b['loss_gap'])} -> {num(a['loss_gap'])} nats (closed {pct(summary['gap_closed'])})",
             f"held-out perplexity {summary['heldout_perplexity_eval']:.3f} (eval) -> "
             f"{summary['heldout_perplexity_drop']:.3f} (drop), {pct(summary['perplexity_rise'])}"]
    for r in summary["by_repeats"]:
        if r["format"] == "all":
            lines.append(f"  {r['repeats']:3d} repeats: extracted {pct(r['trained_extracted_before'])} -> "
                         f"{pct(r['trained_extracted_after'])}, held-out {pct(r['heldout_extracted_before'])} -> "
                         f"{pct(r['heldout_extracted_after'])}; gap {num(r['loss_gap_before'])} -> "
                         f"{num(r['loss_gap_after'])} nats")
    return lines


def _as_probe(model: nn.Module, data: TextData, cfg) -> ProbeResult:
    """The `dropout` probe's evaluation of a language model (`memloc evaluate RUN` on a sinks run)."""
    return evaluate_sinks(model, data, drop_scale=cfg.drop_scale, repeated=cfg.repeated, exposure=cfg.exposure,
                          batch_size=min(cfg.batch_size, 256))


register_task_evaluation("lm", _as_probe, describe)
