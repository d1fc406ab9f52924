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

from ..core.batching import in_batches, rows_that_fit
from ..core.errors import ConfigError
from ..core.options import INT64_MAX, check_ranges, ints, option
from ..tasks.lm import measures
from ..tasks.lm.text import TextData, decode_targets
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
    batch_size: int | None = option(None, "rows per pass (default: what fits the free memory, at most 256 on a "
                                    "CPU, 2048 on a GPU)", result=False, at_least=1)
    epoch: int | None = option(None, "probe this saved epoch (default: the final one)", at_least=0)
    device: str = option("auto", "auto, cpu or cuda", result=False)
    seed: int = option(0, "seed of the exposure estimate's samples", at_least=0, at_most=INT64_MAX)
    prefix_lengths: tuple[int, ...] = option((8, 16, 32), "k-extractability: the suffix from only the last K tokens "
                                             "of its prefix, for each K (Carlini et al. 2022)", parse=ints,
                                             metavar="K,K,...", at_least=1)
    reference: str | None = option(None, "a reference model (hf:FOLDER, the same tokenizer) for the membership "
                                   "score loss / reference loss", metavar="hf:FOLDER")

    def __post_init__(self) -> None:
        check_ranges(self)
        self.prefix_lengths = tuple(sorted(set(int(k) for k in self.prefix_lengths)))


def _check(model: nn.Module, data, cfg: MemorizationConfig, ctx: Context) -> None:
    if not isinstance(data, TextData):
        raise ConfigError("the memorization probe measures canaries of a language model: train one with "
                          "`memloc train --task lm`")
    if not data.canaries:
        raise ConfigError("this run has no canaries (--canaries 0): nothing to measure")
    if cfg.exposure:
        _check_enumeration(data, cfg)


def _check_enumeration(data: TextData, cfg: MemorizationConfig) -> None:
    """Refuse in one line an exact exposure enumeration the host has no memory for (`memloc.core.budget`)."""
    from ..core import budget
    lengths = [len(c["secret_ids"]) for c in data.canaries if c["format"] == "secret"]
    exact = [n for n in lengths if 10 ** n <= cfg.exact_up_to]  # exposure's alphabet: the ten digits
    if exact:
        n = max(exact)
        budget.check(budget.exact_exposure_need(10 ** n, n, 10), "cpu",
                     what=f"exposure by enumeration of the {10 ** n:,} candidate secrets needs",
                     model_flags=f"--exact-up-to below {10 ** n:,} (the exposure is then estimated)", force=None)


def perplexity_terms(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """(sum of the cross-entropy over the trained target tokens, their count) of one batch: float logits (B, T, V),
    encoded targets y (B, T). Summed over batches in order, exp(total / count) is `heldout_perplexity`."""
    tokens, trained, _ = decode_targets(y)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none")
    return float((ce.view(tokens.shape) * trained).sum()), int(trained.sum())


@torch.no_grad()
def heldout_perplexity(model: nn.Module, data: TextData, *, batch_size: int | None = None) -> float | None:
    """exp(mean cross-entropy) over every held-out target token, teacher-forced (held-out canaries included);
    None without held-out text. `batch_size` None: what fits (`memloc.core.batching`)."""
    device = next(model.parameters()).device
    batch_size = batch_size or rows_that_fit(model, length=data.x_test.shape[-1])
    total, count = 0.0, 0
    modes = {m: m.training for m in model.modules()}
    model.eval()

    def part(lo: int, hi: int) -> None:
        nonlocal total, count
        t, c = perplexity_terms(model(data.x_test[lo:hi].to(device)).float(), data.y_test[lo:hi].to(device))
        total, count = total + t, count + c
    try:
        in_batches(len(data.x_test), batch_size, part, what="the perplexity pass")
    finally:
        for m, t in modes.items():
            m.training = t
    return math.exp(total / count) if count else None  # no held-out text (an audit without non-members)


def canary_measures(model: nn.Module, data: TextData, cfg: MemorizationConfig, *, context=None,
                    membership: bool = True, reference: nn.Module | None = None) -> dict[str, np.ndarray]:
    """Per canary (C,): extracted (bool), loss (nats per secret token), suffix_accuracy, exposure (NaN where
    not measured) and exposure_method, each from the canary's own prefix alone.

    `context(i)`: a context manager the model runs in for canary i (example-tied dropout's "tied" mode hands it
    the canary's id); default none. Measured one canary at a time then, all at once otherwise. `reference`:
    `cfg.reference`'s model already loaded (a streaming scan measures many chunks with one); default: loaded here.
    Of `data` only its canaries, tokenizer and vocab_size are read. With `membership` and no `context`, one
    teacher-forced pass over each prefix + secret gives the extraction measures and the membership statistics
    alike, where every canary fits the model's context (`_one_pass`); otherwise each has its own pass.
    """
    cans = data.canaries
    prefixes = [c["prefix_ids"] for c in cans]
    secrets = [c["secret_ids"] for c in cans]
    stats = None
    if context is None and membership and _one_pass(model, cans):
        stats = _token_stats(model, cans, cfg)
        got = _from_stats(stats, cans)
    elif context is None:
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
    out = {"extracted": got["extractable"].numpy().astype(bool), "loss": got["loss"].numpy().astype(np.float64),
           "suffix_accuracy": got["suffix_accuracy"].numpy(), "exposure": exposure, "exposure_method": method}
    if membership:  # k-extractability and the membership scores (`membership=False`: extraction, loss, exposure)
        out.update(_k_extractable(model, cans, cfg, context, out["extracted"]))
        out.update(_membership(model, data, cfg, context, reference, stats))
    return out


def _one_pass(model: nn.Module, cans: list[dict]) -> bool:
    """Does every canary's prefix + secret fit the model's context, so that one teacher-forced pass over it gives
    its extraction (`measures.extractable`'s, token for token) and its membership statistics alike?"""
    block = measures._block_size(measures.causal_lm(model))
    return block is None or all(len(c["prefix_ids"]) + len(c["secret_ids"]) - 1 <= block for c in cans)


def _token_stats(model: nn.Module, cans: list[dict], cfg: MemorizationConfig) -> list[dict[str, np.ndarray]]:
    from ..tasks.lm import membership
    return membership.token_logprobs(model, [list(c["prefix_ids"]) + list(c["secret_ids"]) for c in cans],
                                     batch_size=cfg.batch_size)


def _from_stats(stats: list[dict[str, np.ndarray]], cans: list[dict]) -> dict[str, torch.Tensor]:
    """`measures.suffix_measures`' three measures from the same pass's per-token statistics: the secret's tokens
    are positions P - 1 .. of a sequence whose prefix has P tokens (token t + 1 predicted from tokens <= t)."""
    hits = [st["hit"][len(c["prefix_ids"]) - 1:] for st, c in zip(stats, cans)]
    nll = [-st["logp"][len(c["prefix_ids"]) - 1:].astype(np.float32) for st, c in zip(stats, cans)]
    return {"extractable": torch.tensor([bool(h.all()) for h in hits], dtype=torch.bool),
            "suffix_accuracy": torch.tensor([float(h.mean()) for h in hits], dtype=torch.float32),
            "loss": torch.tensor([float(x.mean()) for x in nll], dtype=torch.float32)}


def _each(model: nn.Module, cans: list[dict], context, measure):
    """measure(model, indices) over all canaries at once, or one at a time in `context(i)`."""
    if context is None:
        return measure(model, list(range(len(cans))))
    parts = []
    for i in range(len(cans)):
        with context(i):
            parts.append(measure(model, [i]))
    return parts


def _k_extractable(model: nn.Module, cans: list[dict], cfg: MemorizationConfig, context,
                   extracted: np.ndarray) -> dict[str, np.ndarray]:
    """Per K of `cfg.prefix_lengths`: is the secret extracted from only the last K prefix tokens (NaN where the
    prefix is shorter than K)? Carlini et al. 2022: extraction grows with the context given. A prefix of exactly K
    tokens is the whole prefix: its answer is `extracted`, not measured again."""
    out = {}
    for k in cfg.prefix_lengths:
        got = np.full(len(cans), np.nan)
        whole = [i for i, c in enumerate(cans) if len(c["prefix_ids"]) == k]
        got[whole] = extracted[whole].astype(float)
        fit = {i for i, c in enumerate(cans) if len(c["prefix_ids"]) > k}

        def measure(m, idx, k=k, fit=fit):
            idx = [i for i in idx if i in fit]
            if not idx:
                return idx, torch.zeros(0, dtype=torch.bool)
            return idx, measures.extractable(m, [cans[i]["prefix_ids"][-k:] for i in idx],
                                             [cans[i]["secret_ids"] for i in idx], batch_size=cfg.batch_size)
        parts = _each(model, cans, context, measure)
        for idx, hit in parts if context is not None else [parts]:
            got[idx] = hit.numpy().astype(float)
        out[f"extracted_k{k}"] = got
    return out


def _membership(model: nn.Module, data: TextData, cfg: MemorizationConfig, context,
                reference: nn.Module | None = None, stats: list | None = None) -> dict[str, np.ndarray]:
    """Per canary, its membership scores (memloc.tasks.lm.membership) over its prefix and secret tokens; `stats`: the
    per-token statistics already computed (`_token_stats`), else computed here."""
    from ..tasks.lm import membership
    cans = data.canaries
    seqs = [list(c["prefix_ids"]) + list(c["secret_ids"]) for c in cans]
    texts = [c["prefix"] + c["secret"] for c in cans]

    def measure(m, idx):
        return membership.token_logprobs(m, [seqs[i] for i in idx], batch_size=cfg.batch_size)
    if stats is None:
        parts = _each(model, cans, context, measure)
        stats = parts if context is None else [p[0] for p in parts]
    ref = None
    if cfg.reference:
        if reference is None:
            reference = load_reference(cfg, next(model.parameters()).device)
        if reference.shape.vocab_size < data.vocab_size:
            raise ConfigError(f"the reference model {cfg.reference} has {reference.shape.vocab_size} token ids, the "
                              f"tokenizer {data.vocab_size}: use a reference with the same tokenizer")
        ref = membership.token_logprobs(reference, seqs, batch_size=cfg.batch_size)
    rows = [membership.scores(st, texts[i], reference=None if ref is None else ref[i]) for i, st in enumerate(stats)]
    return {name: np.array([r[name] for r in rows], dtype=np.float64) for name in membership.ORIENT}


def load_reference(cfg: MemorizationConfig, device) -> nn.Module:
    """The reference model of `cfg.reference` (hf:FOLDER) on `device`."""
    from ..tasks.lm.hf import load_hf
    folder = cfg.reference[3:] if cfg.reference.startswith("hf:") else cfg.reference
    return load_hf(folder).to(device)


def membership_quality(data: TextData, m: dict[str, np.ndarray]) -> dict:
    """Each membership score's AUROC and TPR at 1% FPR, members against non-members: a sequence's `member`
    label where the data has one (an audit), else trained canaries against held-out ones."""
    from ..tasks.lm import membership
    labels = [c.get("member", c["trained"]) for c in data.canaries]
    known = np.array([v is not None for v in labels], dtype=bool)
    member = np.array([bool(v) for v in labels], dtype=bool)
    out = {}
    for name, sign in membership.ORIENT.items():
        if np.isfinite(m[name]).any():  # ref_ratio only with a reference model
            out[name] = membership.attack_quality(sign * m[name][known], member[known])
    return out


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


def _num(v: float, digits: int) -> float | None:
    return None if not np.isfinite(v) else round(float(v), digits)


def canary_rows(data: TextData, m: dict[str, np.ndarray]) -> list[dict]:
    """One row per canary (an audited sequence): its id, format, repeats, membership label, and the measures of
    `m`: extraction, k-extractability per prefix length, suffix accuracy, loss, exposure, membership scores."""
    from ..tasks.lm.membership import ORIENT
    ks = [k for k in m if k.startswith("extracted_k")]
    rows = []
    for i, c in enumerate(data.canaries):
        row = {"canary": c["id"], **{k: c[k] for k in ("line", "index") if k in c}, "format": c["format"],
               "trained": c["trained"], "member": c.get("member"),
               "repeats": c["repeats"], "repeat_group": c["repeat_group"], "extracted": bool(m["extracted"][i])}
        row.update({k: None if np.isnan(m[k][i]) else bool(m[k][i]) for k in ks})
        row.update({"suffix_accuracy": round(float(m["suffix_accuracy"][i]), 4), "loss": round(float(m["loss"][i]), 5),
                    "exposure": _num(m["exposure"][i], 3), "exposure_method": m["exposure_method"][i]})
        row.update({f"mi_{name}": _num(m[name][i], 6) for name in ORIENT if name in m})
        row.update({"prefix": c["prefix"], "secret": c["secret"]})
        rows.append(row)
    return rows


def _compute(model: nn.Module, data: TextData, cfg: MemorizationConfig, ctx: Context) -> ProbeResult:
    from ..core.tasks import task_of
    cans = data.canaries
    m = canary_measures(model, data, cfg)
    task = task_of(data)
    rows = cfg.batch_size or rows_that_fit(model, length=data.x_train.shape[-1])
    hits = _in_context(model, data, task, m["extracted"], rows)
    trained = np.array([c["trained"] for c in cans], dtype=bool)
    corpus = task.kind_mask("corpus").cpu().numpy()
    corpus_extracted = float(hits[corpus].mean()) if corpus.any() else None
    ppl = heldout_perplexity(model, data, batch_size=cfg.batch_size)
    summary = {"by_repeats": by_repeats(data, m, hits), "heldout_perplexity": None if ppl is None else round(ppl, 4),
               "corpus_extracted": None if corpus_extracted is None else round(corpus_extracted, 6),
               "canaries": len(cans), "trained_canaries": int(trained.sum()),
               "exposure_methods": sorted(set(x for x in m["exposure_method"] if x)),
               "k_extractable": {k[len("extracted_k"):]: _mean(v[~np.isnan(v) & trained]) for k, v in m.items()
                                 if k.startswith("extracted_k")},
               "membership": membership_quality(data, m)}
    arrays = {"canary_id": np.array([c["id"] for c in cans]), "repeat_group": np.array([c["repeat_group"] for c in
                                                                                          cans]),
              "trained": trained, "extracted": m["extracted"], "suffix_accuracy": m["suffix_accuracy"],
              "loss": m["loss"], "exposure": m["exposure"], "format": np.array([c["format"] for c in cans]),
              **{k: v for k, v in m.items() if k.startswith("extracted_k")},
              **{f"mi_{name}": m[name] for name in ("loss", "zlib", "min_k", "min_k_pp", "ref_ratio")}}
    return ProbeResult(PROBE_NAME, summary, arrays, canary_rows(data, m))


def _in_context(model: nn.Module, data: TextData, task, extracted: np.ndarray, batch_size: int) -> np.ndarray:
    """(N,) bool: every training row's extraction in its training context. A row that holds one canary alone (an
    audit's: `TextData.alone_rows`) is that canary's `extracted`, the same argmaxes, not measured again: an audit's
    scan is then one pass over its sequences, not two. The other rows are measured (`task.hits`)."""
    alone, owner = data.alone_rows()
    hits = np.zeros(data.x_train.shape[0], dtype=bool)
    rest = np.setdiff1d(np.arange(len(hits)), alone)
    if len(rest):
        hits = task.hits(model, "train", batch_size=batch_size, rows=torch.from_numpy(rest)).cpu().numpy()
    hits[alone] = extracted[owner]
    return hits


def _describe(result: ProbeResult) -> list[str]:
    s = result.summary
    corpus = "-" if s["corpus_extracted"] is None else f"{100 * s['corpus_extracted']:.1f}%"
    ppl = "-" if s["heldout_perplexity"] is None else f"{s['heldout_perplexity']:.2f}"
    lines = [f"held-out perplexity {ppl}; corpus suffixes extracted {corpus}"]
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
    quality = s.get("membership") or {}
    if quality:
        aurocs = [f"{name} {q['auroc']:.2f}" for name, q in quality.items() if q.get("auroc") is not None]
        first = next(iter(quality.values()))
        lines.append(f"membership inference ({first['members']} members vs {first['non_members']} non-members), "
                     "AUROC: " + (", ".join(aurocs) if aurocs else first.get("reason", "not enough data")))
    return lines


def memorization(target, data=None, cfg: MemorizationConfig | None = None, **options) -> ProbeResult:
    """Canary memorization of a language model run (saved into RUN/probes/memorization/) or of a model in hand."""
    from .engine import run_probe
    return run_probe(PROBE, target, data, cfg, **options)


PROBE = Probe(PROBE_NAME, "memorization", MemorizationConfig, _compute, check=_check, describe=_describe,
              help="language models: extraction, loss and exposure of the canaries by repeat count")
