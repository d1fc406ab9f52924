"""Membership inference from one teacher-forced pass: was this sequence in the model's training data?

Per sequence, from the log-probabilities the model gives each of its tokens (token t predicted from tokens < t;
the first token has no prediction and is not scored):

- ``loss``: mean negative log-likelihood (nats) of its tokens (Yeom et al. 2018; lower: member);
- ``zlib``: ``loss`` divided by the zlib-compressed length of its text in bytes (Carlini et al. 2021,
  "Extracting training data from large language models": text that is easy for the model but not for a
  generic compressor; lower: member; as MIMIR computes it);
- ``min_k``: Min-K% Prob (Shi et al. 2024): the mean log-probability of the K% least likely tokens (higher:
  member);
- ``min_k_pp``: Min-K%++ (Zhang et al. 2024): each token's log-probability standardized by the mean and standard
  deviation of log p(z) under the model's own next-token distribution at that position, averaged over the K%
  lowest (higher: member);
- ``ref_ratio``: ``loss`` over a reference model's ``loss`` on the same tokens (Carlini et al. 2021; lower:
  member), when a reference model is given.

`ORIENT` turns each into a score where higher means "member"; `attack_quality` gives AUROC and TPR at 1% FPR
of one score against known member labels, each with a bootstrap interval, or "not enough data".
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ...core.batching import in_batches, rows_that_fit
from ...core.errors import ConfigError
from .measures import _block_size, _device, _evaluating, _groups, causal_lm, position_stats

K = 0.2  # the share of tokens Min-K% and Min-K%++ average (the papers' recommended 20%)
ORIENT = {"loss": -1.0, "zlib": -1.0, "min_k": 1.0, "min_k_pp": 1.0, "ref_ratio": -1.0}  # x ORIENT: higher = member
MIN_PER_CLASS = 10  # members and non-members each, for an AUROC
MIN_NEGATIVES_FOR_TPR = 100  # non-members, for a TPR at 1% FPR (one false positive is 1%)


def token_logprobs(model: nn.Module, seqs: Sequence[Sequence[int]], *, batch_size: int | None = None
                   ) -> list[dict[str, np.ndarray]]:
    """Per sequence of n >= 2 tokens: {"logp", "mu", "sigma"}, each (n-1,) float64, and "hit" (n-1,) bool: for
    token t+1 given tokens <= t, its log-probability, the mean and standard deviation of log p(z) under the
    model's next-token distribution there, and whether it is that distribution's argmax (the lowest id among
    ties, as greedy decoding takes it: the teacher-forced extraction of `memloc.tasks.lm.measures` from the same pass).
    Each sequence must fit the model's context (ConfigError otherwise). Memory: one batch of (batch_size, n-1,
    vocabulary) logits, their temporaries a chunk of positions at a time (`measures.position_stats`); `batch_size`
    None: what fits (`memloc.core.batching`)."""
    model = causal_lm(model)
    rows = [[int(t) for t in s] for s in seqs]
    short = next((i for i, r in enumerate(rows) if len(r) < 2), None)
    if short is not None:
        raise ConfigError(f"sequence {short} has {len(rows[short])} token(s): membership scores need at least 2")
    block = _block_size(model)
    long = next((i for i, r in enumerate(rows) if block is not None and len(r) - 1 > block), None)
    if long is not None:
        raise ConfigError(f"sequence {long} has {len(rows[long])} tokens, more than the model's context of "
                          f"{block} + 1: cut it first")
    if not rows:
        return []
    device = _device(model)
    batch = rows_that_fit(model, length=max(map(len, rows))) if batch_size is None else max(1, int(batch_size))
    out: list[dict[str, np.ndarray]] = [{} for _ in rows]
    with _evaluating(model):
        for n, idx in _groups([len(r) for r in rows]).items():
            full = torch.tensor([rows[i] for i in idx], dtype=torch.long)  # (m, n)

            def part(lo: int, hi: int, full=full, idx=idx) -> None:
                ids = full[lo:hi].to(device)
                st = position_stats(model(ids[:, :-1]), ids[:, 1:], moments=True)  # (b, n-1) each
                hit, logp, mu, var = st["hit"], st["logp"], st["mu"], st["var"]
                for j, i in enumerate(idx[lo:hi]):
                    out[i] = {"logp": logp[j].double().cpu().numpy(), "mu": mu[j].double().cpu().numpy(),
                              "sigma": var[j].clamp_min(0).sqrt().double().cpu().numpy(),
                              "hit": hit[j].cpu().numpy()}
            batch = in_batches(len(idx), batch, part, what="the membership scores' pass")
    return out


def _lowest_mean(x: np.ndarray, k: float) -> float:
    m = max(1, int(math.ceil(k * len(x))))
    return float(np.sort(x)[:m].mean())


def scores(stats: dict[str, np.ndarray], text: str | bytes | None = None, *, k: float = K,
           reference: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """The membership scores of one sequence from its `token_logprobs` entry (`text` for zlib: its text, or its
    token ids' bytes when the text is unknown; `reference`: the reference model's entry for the same tokens)."""
    logp = stats["logp"]
    loss = float(-logp.mean())
    if text is None:
        raw = b""
    else:
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    z = (stats["logp"] - stats["mu"]) / np.where(stats["sigma"] > 0, stats["sigma"], np.inf)
    out = {"loss": loss, "zlib": loss / max(1, len(zlib.compress(raw))) if text is not None else float("nan"),
           "min_k": _lowest_mean(logp, k), "min_k_pp": _lowest_mean(z, k), "ref_ratio": float("nan")}
    if reference is not None:
        ref = float(-reference["logp"].mean())
        out["ref_ratio"] = loss / ref if ref > 0 else float("nan")
    return out


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a member > score of a non-member), ties counting one half (Mann-Whitney)."""
    from scipy.stats import rankdata
    r = rankdata(np.concatenate([pos, neg]))
    return float((r[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _tpr_at(pos: np.ndarray, neg: np.ndarray, fpr: float) -> float:
    """The largest share of members above a threshold that at most `fpr` of the non-members pass."""
    allowed = int(math.floor(fpr * len(neg)))  # non-members that may score above the threshold
    thr = np.sort(neg)[::-1][allowed] if allowed < len(neg) else -np.inf  # strictly above the (allowed+1)-th
    return float((pos > thr).mean())


def attack_quality(score: np.ndarray, member: np.ndarray, *, resamples: int = 1000, seed: int = 0) -> dict:
    """AUROC and TPR at 1% FPR of a member-oriented `score` (higher: member) against boolean `member` labels,
    each with a 95% bootstrap interval (members and non-members resampled apart, numpy Generator seeded by
    `seed`). Below `MIN_PER_CLASS` of either class, or `MIN_NEGATIVES_FOR_TPR` non-members for the TPR: None
    with the reason."""
    score, member = np.asarray(score, dtype=np.float64), np.asarray(member, dtype=bool)
    keep = np.isfinite(score)
    pos, neg = score[keep & member], score[keep & ~member]
    out: dict = {"members": int(len(pos)), "non_members": int(len(neg))}
    if min(len(pos), len(neg)) < MIN_PER_CLASS:
        why = f"not enough data: {len(pos)} members and {len(neg)} non-members (at least {MIN_PER_CLASS} each)"
        return {**out, "auroc": None, "tpr_at_1pct_fpr": None, "reason": why}
    rng = np.random.default_rng(seed)
    tpr = len(neg) >= MIN_NEGATIVES_FOR_TPR
    a, t = [], []
    for _ in range(int(resamples)):  # one resample in memory at a time (a streaming scan has millions of sequences)
        p, n = rng.choice(pos, len(pos)), rng.choice(neg, len(neg))
        a.append(_auroc(p, n))
        if tpr:
            t.append(_tpr_at(p, n, 0.01))
    out.update(auroc=_auroc(pos, neg), auroc_ci=[float(np.percentile(a, 2.5)), float(np.percentile(a, 97.5))])
    if not tpr:
        out.update(tpr_at_1pct_fpr=None, reason=f"TPR at 1% FPR: not enough data: {len(neg)} non-members (at least "
                                                f"{MIN_NEGATIVES_FOR_TPR})")
    else:
        out.update(tpr_at_1pct_fpr=_tpr_at(pos, neg, 0.01),
                   tpr_ci=[float(np.percentile(t, 2.5)), float(np.percentile(t, 97.5))])
    return out
