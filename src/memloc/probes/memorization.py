"""How much a language model memorized its canaries, by how often it saw them: extraction, loss, exposure.

For every canary (trained ones, each held by r training sequences, and the held-out ones of
the same formats that no training sequence holds), measured from the canary's own prefix
alone, not the corpus text around it in training:

- extracted: greedy decoding from the prefix reproduces the secret exactly (and, per repeat
  count, the share of the training sequences holding such canaries whose secret is
  extractable in its training context: what the other probes measure as canary-train);
- loss: mean cross-entropy (nats) of the secret tokens given the prefix;
- exposure (secret-number canaries): log2 of the candidate space minus log2 of the secret's
  rank among all digit strings of its length (exact by enumeration up to `exact_up_to`
  candidates, the skew-normal estimate beyond).

Per repeat count and format: the extraction rate and mean loss and exposure of the trained
canaries against the held-out ones, and the loss gap (held-out minus trained: MemSinks'
measure). Besides: held-out perplexity (all held-out tokens) and the share of corpus training
sequences whose suffix is extractable. Only for language models (`--task lm`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..lm import measures
from ..lm.text import TextData, decode_targets
from ..options import INT64_MAX, check_ranges, option
from .base import ProbeResult
from .engine import Context, Probe

PROBE_NAME = "memorization"


@dataclass
class MemorizationConfig:
    exposure: bool = option(True, "skip exposure (the secret-number canaries' rank among all digit strings)",
                            negate="--no-exposure")
    exact_up_to: int = option(100_000, "exposure by enumeration up to this many candidates, estimated beyond",
                              at_least=1)
    samples: int = option(5_000, "candidates sampled for the exposure estimate (each one forward pass)",
                          at_least=100)
    batch_size: int = option(256, "evaluation batch size", result=False, at_least=1)
    epoch: int | None = option(None, "probe this saved epoch (default: the final one)", at_least=0)
    device: str = option("auto", "auto, cpu or cuda", result=False)
    seed: int = option(0, "seed of the exposure estimate's samples", at_least=0, at_most=INT64_MAX)

    def __post_init__(self) -> None:
        check_ranges(self)


def _check(model: nn.Module, data, cfg: MemorizationConfig, ctx: Context) -> None:
    if not isinstance(data, TextData):
        raise ConfigError("the memorization probe measures canaries of a language model: train one with "
                          "`memloc train --task lm`")
    if not data.canaries:
        raise ConfigError("this run has no canaries (--canaries 0): nothing to measure")


@torch.no_grad()
def heldout_perplexity(model: nn.Module, data: TextData, *, batch_size: int = 256) -> float:
    """exp(mean cross-entropy) over every held-out target token, teacher-forced (held-out canaries included)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        for lo in range(0, len(data.x_test), batch_size):
            x = data.x_test[lo:lo + batch_size].to(device)
            tokens, trained, _ = decode_targets(data.y_test[lo:lo + batch_size].to(device))
            logits = model(x).float()
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none")
            total += float((ce.view(tokens.shape) * trained).sum())
            count += int(trained.sum())
    finally:
        for m, t in modes.items():
            m.training = t
    return math.exp(total / max(1, count))


def canary_measures(model: nn.Module, data: TextData, cfg: MemorizationConfig, *, context=None
                    ) -> dict[str, np.ndarray]:
    """Per canary (C,): extracted (bool), loss (nats per secret token), suffix_accuracy, exposure (NaN where
    not measured) and exposure_method, each from the canary's own prefix alone.

    `context(i)`: a context manager the model runs in for canary i (example-tied dropout's "tied" mode hands it
    the canary's id); default none. Measured one canary at a time then, all at once otherwise.
    """
    cans = data.canaries
    prefixes = [c["prefix_ids"] for c in cans]
    secrets = [c["secret_ids"] for c in cans]
    if context is None:
        got = measures.suffix_measures(model, prefixes, secrets, batch_size=cfg.batch_size)
    else:
        parts = []
        for i in range(len(cans)):
            with context(i):
                parts.append(measures.suffix_measures(model, prefixes[i:i + 1], secrets[i:i + 1],
                                                      batch_size=cfg.batch_size))
        got = {k: torch.cat([p[k] for p in parts]) for k in ("extractable", "loss", "suffix_accuracy")} if parts \
            else {k: torch.zeros(0) for k in ("extractable", "loss", "suffix_accuracy")}
    exposure = np.full(len(cans), np.nan)
    method = [""] * len(cans)
    if cfg.exposure:
        digits = data.tokenizer.digit_ids() if hasattr(data.tokenizer, "digit_ids") else list(range(48, 58))
        for i, c in enumerate(cans):
            if c["format"] != "secret":
                continue
            with context(i) if context is not None else contextlib.nullcontext():
                e = measures.exposure(model, c["prefix_ids"], c["secret_ids"], digits, method="auto",
                                      samples=cfg.samples, seed=cfg.seed, batch_size=1024, max_exact=cfg.exact_up_to)
            exposure[i], method[i] = float(e["exposure"]), e["method"]
    return {"extracted": got["extractable"].numpy().astype(bool), "loss": got["loss"].numpy().astype(np.float64),
            "suffix_accuracy": got["suffix_accuracy"].numpy(), "exposure": exposure, "exposure_method": method}


def _mean(v: np.ndarray) -> float | None:
    v = v[~np.isnan(v)] if v.dtype.kind == "f" else v
    return None if len(v) == 0 else round(float(np.mean(v)), 6)


def by_repeats(data: TextData, m: dict[str, np.ndarray], hits: np.ndarray) -> list[dict]:
    """Per repeat count and format (and "all"): extraction, loss and exposure of the trained canaries against
    the held-out ones of the same group, the loss gap, and in-context extraction from `hits` (N,) bool."""
    cans = data.canaries
    trained = np.array([c["trained"] for c in cans], dtype=bool)
    group = np.array([c["repeat_group"] for c in cans])
    fmt = np.array([c["format"] for c in cans])
    extracted, loss, exposure = m["extracted"], m["loss"], m["exposure"]
    seq_group = np.array([cans[c]["repeat_group"] if c >= 0 else 0 for c in data.canary.cpu().tolist()])
    seq_fmt = np.array([cans[c]["format"] if c >= 0 else "" for c in data.canary.cpu().tolist()])
    by = []
    for r in sorted(set(group.tolist())):
        for f in [*sorted(set(fmt.tolist())), "all"]:
            sel = (group == r) & ((fmt == f) if f != "all" else True)
            tr, ho = sel & trained, sel & ~trained
            if not tr.any():
                continue
            gap = (_mean(loss[ho]) - _mean(loss[tr])) if ho.any() else None
            seqs = (seq_group == r) & ((seq_fmt == f) if f != "all" else (seq_fmt != ""))
            by.append({"repeats": int(r), "format": f, "n": int(tr.sum()),
                       "trained_extracted": _mean(extracted[tr].astype(float)),
                       "in_context_extracted": _mean(hits[seqs].astype(float)),
                       "heldout_extracted": _mean(extracted[ho].astype(float)) if ho.any() else None,
                       "trained_loss": _mean(loss[tr]), "heldout_loss": _mean(loss[ho]) if ho.any() else None,
                       "loss_gap": None if gap is None else round(gap, 6),
                       "trained_exposure": _mean(exposure[tr]), "heldout_exposure": _mean(exposure[ho])})
    return by


def canary_rows(data: TextData, m: dict[str, np.ndarray]) -> list[dict]:
    """One row per canary: its id, format, repeats, and the measures of `m`."""
    return [{"canary": c["id"], "format": c["format"], "trained": c["trained"], "repeats": c["repeats"],
             "repeat_group": c["repeat_group"], "extracted": bool(m["extracted"][i]),
             "suffix_accuracy": round(float(m["suffix_accuracy"][i]), 4), "loss": round(float(m["loss"][i]), 5),
             "exposure": None if np.isnan(m["exposure"][i]) else round(float(m["exposure"][i]), 3),
             "exposure_method": m["exposure_method"][i], "prefix": c["prefix"], "secret": c["secret"]}
            for i, c in enumerate(data.canaries)]


def _compute(model: nn.Module, data: TextData, cfg: MemorizationConfig, ctx: Context) -> ProbeResult:
    from ..tasks import task_of
    cans = data.canaries
    m = canary_measures(model, data, cfg)
    task = task_of(data)
    hits = task.hits(model, "train", batch_size=cfg.batch_size).cpu().numpy()  # in their training context
    trained = np.array([c["trained"] for c in cans], dtype=bool)
    corpus = task.kind_mask("corpus").cpu().numpy()
    corpus_extracted = float(hits[corpus].mean()) if corpus.any() else None
    ppl = heldout_perplexity(model, data, batch_size=cfg.batch_size)
    summary = {"by_repeats": by_repeats(data, m, hits), "heldout_perplexity": round(ppl, 4),
               "corpus_extracted": None if corpus_extracted is None else round(corpus_extracted, 6),
               "canaries": len(cans), "trained_canaries": int(trained.sum()),
               "exposure_methods": sorted(set(x for x in m["exposure_method"] if x))}
    arrays = {"canary_id": np.array([c["id"] for c in cans]), "repeat_group": np.array([c["repeat_group"] for c in
                                                                                          cans]),
              "trained": trained, "extracted": m["extracted"], "suffix_accuracy": m["suffix_accuracy"],
              "loss": m["loss"], "exposure": m["exposure"], "format": np.array([c["format"] for c in cans])}
    return ProbeResult(PROBE_NAME, summary, arrays, canary_rows(data, m))


def _describe(result: ProbeResult) -> list[str]:
    s = result.summary
    corpus = "-" if s["corpus_extracted"] is None else f"{100 * s['corpus_extracted']:.1f}%"
    lines = [f"held-out perplexity {s['heldout_perplexity']:.2f}; corpus suffixes extracted {corpus}"]
    for row in s["by_repeats"]:
        if row["format"] != "all":
            continue
        exp = "" if row["trained_exposure"] is None else \
            f", exposure {row['trained_exposure']:.1f} vs {row['heldout_exposure'] or 0:.1f} bits"
        held = "-" if row["heldout_extracted"] is None else f"{100 * row['heldout_extracted']:.1f}%"
        ctx_rate = 100 * (row["in_context_extracted"] or 0)
        lines.append(f"  {row['repeats']:3d} repeats: extracted {100 * row['trained_extracted']:5.1f}% "
                     f"(in context {ctx_rate:5.1f}%, held-out {held}), loss {row['trained_loss']:.2f} vs "
                     f"{row['heldout_loss'] or float('nan'):.2f} nats{exp}")
    return lines


def memorization(target, data=None, cfg: MemorizationConfig | None = None, **options) -> ProbeResult:
    """Canary memorization of a language model run (saved into RUN/probes/memorization/) or of a model in hand."""
    from .engine import run_probe
    return run_probe(PROBE, target, data, cfg, **options)


PROBE = Probe(PROBE_NAME, "memorization", MemorizationConfig, _compute, check=_check, describe=_describe,
              help="language models: extraction, loss and exposure of the canaries by repeat count")
