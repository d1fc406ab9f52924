"""How much a causal language model memorized given sequences: pure functions over a model.

The model is any module with ``model(ids) -> logits``: ids (B, T) int64, logits (B, T, V) where position j
predicts token j + 1; a plain `transformers` causal LM, or a module whose output has ``.logits`` or is a tuple
starting with them, is taken as it is (`causal_lm`). It runs in eval mode under ``torch.no_grad`` on its own
device, batch by batch, and each module's train/eval flag is restored afterwards (a partly frozen model stays
so). A model with ``model.shape.block_size`` (memloc's GPT; a `transformers` model's max_position_embeddings)
sees at most that many tokens: longer contexts keep their last ``block_size`` tokens, in generation and teacher
forcing alike. The measures open no autocast of their own: the arithmetic is the model's (a plain module computes
in its dtype; memloc's Hugging Face wrapper in the arithmetic in force, fp32 unless the run's or the audit's
precision says bf16, `memloc.core.precision`), and the logits are upcast to float32 before any softmax, a chunk of
positions at a time. Argmaxes and candidate ranks are what the measures are made of and bf16 rounding can move
them, so a model's bf16 scan is compared to its fp32 scan in RESULTS.md. Results come back on the CPU.

- **Greedy extraction** (Carlini et al. 2021, "Extracting training data from large language models";
  2023, "Quantifying memorization"): a (prefix, suffix) pair is *extractable* when greedy decoding from the
  prefix reproduces the suffix exactly (`extractable`; the decoding itself is `greedy_generate`).
- **Teacher-forced suffix accuracy** (MemPi: Chang, Thomason, Jia, NAACL 2024): the share of suffix tokens
  that are the argmax given the true preceding tokens (`suffix_accuracy`).
- **Sequence loss**: mean cross-entropy (nats) of the suffix tokens given the prefix, teacher-forced
  (`sequence_losses`); the per-sequence loss of membership inference and of the loss gap.
- **Exposure** (Carlini et al. 2019, "The secret sharer"): a canary prefix followed by a secret drawn from
  the space R of all |alphabet|^L token strings; exposure = log2 |R| - log2 rank(secret), the rank by total
  negative log-likelihood among all candidates (`exposure`, `exposures`). Exact by enumerating the
  candidates as a trie (one forward per node above the leaves), or estimated by fitting a skew-normal to the
  losses of sampled candidates and reading the secret's tail probability (the paper's extrapolation).
- **Loss gap** (Memorization sinks: Ghosal, Maini, Raghunathan, ICML 2025): mean loss on held-out sequences
  minus mean loss on the (repeated) training sequences, with a bootstrap interval (`loss_gap`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...core.batching import in_batches, is_out_of_memory, rows_that_fit
from ...core.errors import ConfigError

__all__ = ["causal_lm", "greedy_generate", "extractable", "suffix_accuracy", "sequence_losses", "suffix_measures",
           "exposure", "exposures", "loss_gap"]

Tokens = Sequence[int]


# --- the model: device, context, eval mode ---------------------------------------------------------------------

class _Logits(nn.Module):
    """Any causal LM as ``ids (B, T) -> logits (B, T, V)``: memloc's own models as they are, a plain `transformers`
    model called with ``input_ids`` (no cache), any module whose output is logits, has ``.logits``, or is a tuple
    starting with them. Holds the model, so its parameters, device and modes are the model's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model
        self.hf = _is_transformers(model)
        block = _block_size(model)
        cfg = getattr(model, "config", None)
        if block is None and self.hf:
            block = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.block = None if block is None else int(block)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        try:
            out = self.inner(input_ids=ids, use_cache=False) if self.hf else self.inner(ids)
        except (RuntimeError, TypeError, ValueError, IndexError) as err:
            if is_out_of_memory(err):  # the batch, not the model: `memloc.core.batching.in_batches` halves it
                raise
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise ConfigError(f"{type(self.inner).__name__} failed on token ids (B, T) int64 ({first}): memloc's "
                              "measures expect a causal language model that takes token ids") from None
        if isinstance(out, torch.Tensor):
            logits = out
        elif isinstance(getattr(out, "logits", None), torch.Tensor):
            logits = out.logits
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            logits = out[0]
        else:
            raise ConfigError(f"{type(self.inner).__name__}(ids) returned a {type(out).__name__}: memloc's measures "
                              "expect logits (B, T, V), an output with .logits, or a tuple starting with them")
        if logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise ConfigError(f"{type(self.inner).__name__}(ids) returned logits of shape {tuple(logits.shape)} for "
                              f"ids of shape {tuple(ids.shape)}: expected (B, T, vocabulary)")
        return logits


def _is_transformers(model: nn.Module) -> bool:
    """A plain `transformers` model (not memloc's wrapper), without importing transformers."""
    import sys
    t = sys.modules.get("transformers")
    return t is not None and isinstance(model, t.PreTrainedModel)


def causal_lm(model: nn.Module) -> nn.Module:
    """`model` as memloc's measures call it (see `_Logits`); a module that is not one is a ConfigError."""
    if isinstance(model, _Logits):
        return model
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a causal language model (a torch nn.Module), got a {type(model).__name__}")
    return _Logits(model)


def _device(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _block_size(model: nn.Module) -> int | None:
    """The longest context the model takes (`model.shape.block_size`, a wrapped model's `block`), or None."""
    if isinstance(model, _Logits):
        return model.block
    b = getattr(getattr(model, "shape", None), "block_size", None)
    return None if b is None else int(b)


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the block; each module's own train/eval flag again afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes.items():
            m.training = training


# --- inputs ------------------------------------------------------------------------------------------------------

def _rows(seqs: Sequence[Tokens], name: str) -> list[list[int]]:
    if seqs is None or len(seqs) == 0:
        raise ConfigError(f"{name} is empty: give at least one token sequence")
    rows = [[int(t) for t in s] for s in seqs]
    if any(len(r) == 0 for r in rows):
        raise ConfigError(f"{name} holds an empty sequence: each needs at least one token")
    return rows


def _pairs(prefixes: Sequence[Tokens], suffixes: Sequence[Tokens]) -> tuple[list[list[int]], list[list[int]]]:
    pre, suf = _rows(prefixes, "prefixes"), _rows(suffixes, "suffixes")
    if len(pre) != len(suf):
        raise ConfigError(f"{len(pre)} prefixes but {len(suf)} suffixes: give one suffix per prefix")
    return pre, suf


def _groups(keys: Sequence) -> dict:
    """Positions by key, in first-seen order: rows of one key stack into a rectangle (no padding)."""
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out


def _batch_size(batch_size: int | None, model: nn.Module, length: int) -> int:
    """The caller's batch, or (None) what fits: `memloc.core.batching.rows_that_fit` for rows of `length` tokens."""
    if batch_size is None:
        return rows_that_fit(model, length=length)
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be at least 1, not {batch_size}")
    return int(batch_size)


# --- greedy decoding and teacher forcing -------------------------------------------------------------------------

def greedy_generate(model: nn.Module, prefixes: list[list[int]], length: int, *,
                    batch_size: int | None = None) -> torch.Tensor:
    """Greedy continuations (N, length) int64 of each prefix: argmax at each step, ties to the lowest id.

    Prefixes of different lengths are decoded in separate groups (left padding would shift absolute
    positions). With a block size, the context is the last `block_size` tokens of prefix + generated.
    """
    model = causal_lm(model)
    pre = _rows(prefixes, "prefixes")
    if int(length) < 0:
        raise ConfigError(f"length must be at least 0, not {length}")
    length = int(length)
    batch_size = _batch_size(batch_size, model, max(map(len, pre)) + length)
    out = torch.empty(len(pre), length, dtype=torch.long)
    if length == 0:
        return out
    device, block = _device(model), _block_size(model)
    with _evaluating(model):
        for plen, idx in _groups([len(p) for p in pre]).items():
            ids_all = torch.tensor([pre[i] for i in idx], dtype=torch.long)  # (n, P)

            def part(lo: int, hi: int, ids_all=ids_all, idx=idx, plen=plen) -> None:
                ids = ids_all[lo:hi].to(device)
                for _ in range(length):
                    ctx = ids if block is None else ids[:, -block:]
                    nxt = model(ctx)[:, -1].float().argmax(-1)  # (b,); torch.argmax takes the first maximum
                    ids = torch.cat([ids, nxt[:, None]], 1)
                out[idx[lo:hi]] = ids[:, plen:].cpu()
            batch_size = in_batches(len(idx), batch_size, part, what="greedy decoding")
    return out


STATS_BYTES = 64 << 20  # bytes of one chunk of positions' vocabulary-sized temporaries in `position_stats`


def position_stats(logits: torch.Tensor, targets: torch.Tensor, *, moments: bool = False) -> dict[str, torch.Tensor]:
    """Per position of logits (b, k, V) and targets (b, k): "hit" (argmax == target, the lowest id among ties),
    "logp" (the target's log-probability, float32) and with `moments` "mu" and "var" (the mean and variance of
    log p(z) under the position's distribution), each (b, k).

    The vocabulary-sized temporaries (the log-softmax, the probabilities, their products) are made a chunk of
    positions at a time, about `STATS_BYTES` each: the pass's peak is the logits themselves, not five times
    them. Every position is reduced alone, so the values are those of one call over the whole tensor."""
    b, k, v = logits.shape
    flat, tgt = logits.reshape(b * k, v), targets.reshape(b * k)
    out = {"hit": torch.empty(b * k, dtype=torch.bool, device=logits.device)}
    for name in ("logp", "mu", "var") if moments else ("logp",):
        out[name] = torch.empty(b * k, dtype=torch.float32, device=logits.device)
    if b * k == 0:
        return {name: t.view(b, k) for name, t in out.items()}
    n = b * k
    # chunks of at least `rows` positions (at most twice that): never one position alone where there are more, as a
    # one-row sum is reduced in another order (its last bits apart from the whole tensor's)
    rows = max(2, STATS_BYTES // (4 * v))
    chunks = max(1, n // rows)
    for c in range(chunks):
        lo, hi = c * n // chunks, (c + 1) * n // chunks
        x, t = flat[lo:hi].float(), tgt[lo:hi]
        out["hit"][lo:hi] = x.argmax(-1) == t
        logp = F.log_softmax(x, -1)
        del x
        out["logp"][lo:hi] = logp.gather(-1, t[:, None])[:, 0]
        if moments:
            p = logp.exp()
            mu = (p * logp).sum(-1)  # E_z log p(z)
            out["mu"][lo:hi] = mu
            out["var"][lo:hi] = (p * logp.square()).sum(-1) - mu.square()
    return {name: t.view(b, k) for name, t in out.items()}


def _score(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax == target, cross-entropy in nats) per position, for logits (b, k, V) and targets (b, k)."""
    st = position_stats(logits, targets)
    return st["hit"], -st["logp"]


def _teacher_forced(model: nn.Module, full: torch.Tensor, plen: int, *, batch_size: int,
                    device: torch.device, block: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per suffix token of rows full (n, P + S): (correct (n, S) bool, nll (n, S) float32), on the CPU.

    Token t (P <= t < P + S) is predicted from full[:, max(0, t - block):t], the context greedy decoding
    would have had. Tokens whose context starts at 0 share one forward; later ones get a window each.
    """
    n, total = full.shape
    m = total - 1 if block is None else min(total - 1, block)  # targets t <= m share one pass over full[:, :m]
    correct = torch.empty(n, total - plen, dtype=torch.bool)
    nll = torch.empty(n, total - plen)

    def part(lo: int, hi: int) -> None:
        rows = full[lo:hi].to(device)
        if plen <= m:
            c, l = _score(model(rows[:, :m])[:, plen - 1:m], rows[:, plen:m + 1])
            correct[lo:hi, :m + 1 - plen], nll[lo:hi, :m + 1 - plen] = c.cpu(), l.cpu()
        for t in range(max(plen, m + 1), total):  # contexts longer than the block: the last `block` tokens
            c, l = _score(model(rows[:, t - block:t])[:, -1:], rows[:, t:t + 1])
            correct[lo:hi, t - plen], nll[lo:hi, t - plen] = c[:, 0].cpu(), l[:, 0].cpu()
    in_batches(n, batch_size, part, what="the teacher-forced scan")
    return correct, nll


def _suffix_stats(model: nn.Module, prefixes: Sequence[Tokens], suffixes: Sequence[Tokens],
                  batch_size: int | None) -> tuple[int, list[tuple[list[int], torch.Tensor, torch.Tensor]]]:
    """N and, per group of equal (prefix, suffix) lengths: (positions, correct (n, S), nll (n, S))."""
    model = causal_lm(model)
    pre, suf = _pairs(prefixes, suffixes)
    batch_size = _batch_size(batch_size, model, max(len(p) + len(q) for p, q in zip(pre, suf)))
    device, block = _device(model), _block_size(model)
    out = []
    with _evaluating(model):
        for (plen, _), idx in _groups([(len(p), len(q)) for p, q in zip(pre, suf)]).items():
            full = torch.tensor([pre[i] + suf[i] for i in idx], dtype=torch.long)  # (n, P + S)
            out.append((idx, *_teacher_forced(model, full, plen, batch_size=batch_size, device=device,
                                              block=block)))
    return len(pre), out


def extractable(model: nn.Module, prefixes: list[list[int]], suffixes: list[list[int]], *,
                batch_size: int | None = None) -> torch.Tensor:
    """Does greedy decoding from each prefix reproduce its suffix exactly? (N,) bool.

    One teacher-forced forward per batch instead of S decoding steps, and exactly equivalent: write
    s_1..s_S for the suffix and g_t = argmax f(prefix, g_<t) for greedy decoding. If g = s, then
    g_<t = s_<t for every t, so argmax f(prefix, s_<t) = g_t = s_t: every teacher-forced argmax is right.
    Conversely, if every teacher-forced argmax is right, induction on t gives g = s: when g_<t = s_<t,
    g_t = argmax f(prefix, g_<t) = argmax f(prefix, s_<t) = s_t. Both sides use the same context window
    and the same tie rule (torch.argmax, the lowest id), so only floating-point differences between a
    full-sequence forward and a shorter one can separate them, and only at an exact near-tie.
    """
    return suffix_measures(model, prefixes, suffixes, batch_size=batch_size)["extractable"]


def suffix_accuracy(model: nn.Module, prefixes: list[list[int]], suffixes: list[list[int]], *,
                    batch_size: int | None = None) -> torch.Tensor:
    """Teacher-forced share of suffix tokens that are the argmax given the true preceding tokens (MemPi), (N,)."""
    return suffix_measures(model, prefixes, suffixes, batch_size=batch_size)["suffix_accuracy"]


def sequence_losses(model: nn.Module, prefixes: list[list[int]], suffixes: list[list[int]], *,
                    batch_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy (nats) of the suffix tokens given the prefix and the true preceding tokens, (N,)."""
    return suffix_measures(model, prefixes, suffixes, batch_size=batch_size)["loss"]


def suffix_measures(model: nn.Module, prefixes: list[list[int]], suffixes: list[list[int]], *,
                    batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """`extractable` (N,) bool, `suffix_accuracy` (N,) and `loss` (N,) from one teacher-forced pass."""
    n, groups = _suffix_stats(model, prefixes, suffixes, batch_size)
    out = {"extractable": torch.zeros(n, dtype=torch.bool), "suffix_accuracy": torch.zeros(n), "loss": torch.zeros(n)}
    for idx, correct, nll in groups:
        out["extractable"][idx] = correct.all(1)
        out["suffix_accuracy"][idx] = correct.float().mean(1)
        out["loss"][idx] = nll.mean(1)
    return out


# --- exposure ------------------------------------------------------------------------------------------------------

def _canary(prefix: Tokens, secret: Tokens, alphabet: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    prefix, secret, alphabet = [int(t) for t in prefix], [int(t) for t in secret], [int(t) for t in alphabet]
    if not prefix:
        raise ConfigError("the canary's prefix is empty: the first secret token needs a context to be predicted")
    if not secret:
        raise ConfigError("the secret is empty: give at least one token")
    if not alphabet:
        raise ConfigError("the alphabet is empty: give the token ids a secret is drawn from")
    if len(set(alphabet)) != len(alphabet):
        raise ConfigError("the alphabet repeats a token id: each candidate would be counted more than once")
    if min(alphabet) < 0:
        raise ConfigError(f"the alphabet holds a negative token id {min(alphabet)}")
    missing = sorted(set(secret) - set(alphabet))
    if missing:
        raise ConfigError(f"secret tokens {missing} are not in the alphabet: every secret token must be one")
    return prefix, secret, alphabet


def _check_vocabulary(model: nn.Module, prefix: list[int], alphabet: list[int]) -> None:
    block = _block_size(model)
    ids = torch.tensor([prefix[-block:] if block else prefix], dtype=torch.long, device=_device(model))
    with _evaluating(model):
        vocab = model(ids).shape[-1]
    if max(alphabet) >= vocab:
        raise ConfigError(f"alphabet token {max(alphabet)} is outside the model's vocabulary of {vocab} tokens")


def _exact_losses(model: nn.Module, prefix: list[int], alphabet: list[int], length: int, *,
                  batch_size: int) -> np.ndarray:
    """Total NLL (nats, float64) of every candidate, index = the candidate's digits in base |alphabet|.

    The trie level by level: each node of depth k < length is one forward over prefix + node, whose last
    logits give all |alphabet| children at once; sum_k |A|^k rows in all instead of |A|^L full passes.
    """
    device, block = _device(model), _block_size(model)
    a = len(alphabet)
    alpha, alpha_dev = torch.tensor(alphabet, dtype=torch.long), torch.tensor(alphabet, device=device)
    base = torch.tensor(prefix, dtype=torch.long)
    nodes = torch.empty(1, 0, dtype=torch.long)  # (|A|^k, k): the trie's level k, lexicographic
    nll = torch.zeros(1, dtype=torch.float64)
    with _evaluating(model):
        for k in range(length):
            child = torch.empty(len(nodes), a, dtype=torch.float64)  # (|A|^k, |A|)
            for s in range(0, len(nodes), batch_size):
                part = nodes[s:s + batch_size]
                rows = torch.cat([base.expand(len(part), -1), part], 1)  # (b, P + k)
                if block is not None:
                    rows = rows[:, -block:]
                logits = model(rows.to(device))[:, -1].float()  # (b, V)
                child[s:s + batch_size] = -F.log_softmax(logits, -1)[:, alpha_dev].double().cpu()
            nll = (nll[:, None] + child).reshape(-1)  # node-major: child c of node i is i * |A| + c
            if k < length - 1:
                nodes = torch.cat([nodes.repeat_interleave(a, 0), alpha.repeat(len(nodes))[:, None]], 1)
    return nll.numpy()


def _skewnorm_logcdf(losses: np.ndarray, x: float) -> float:
    """log P(loss <= x) under a skew-normal fitted to `losses` (Carlini et al. 2019's extrapolation)."""
    from scipy import stats

    if np.ptp(losses) == 0:  # a degenerate sample: the fit has no scale; the step function is the answer
        return 0.0 if x >= losses[0] else -math.inf
    params = stats.skewnorm.fit(losses)
    return float(stats.skewnorm.logcdf(x, *params))


def exposure(model: nn.Module, prefix: list[int], secret: list[int], alphabet: list[int], *,
             method: str = "auto", samples: int = 20000, seed: int = 0, batch_size: int = 1024,
             max_exact: int = 100_000) -> dict:
    """Exposure (bits) of a secret after a canary prefix among all |alphabet|^len(secret) candidates.

    A candidate's score is its total negative log-likelihood given the prefix (teacher-forced, full
    vocabulary softmax). Returns {"exposure", "rank", "candidates", "method", "loss"} (loss: the secret's
    total NLL in nats).

    - "exact": every candidate scored through the trie; rank = 1 + the number of candidates with a strictly
      smaller loss (ties favour the secret); exposure = log2(candidates) - log2(rank), from 0 up to
      log2(candidates) for a secret that is the most likely candidate.
    - "estimate": `samples` candidates drawn uniformly (numpy Generator seeded by `seed`), a skew-normal
      fitted to their losses, exposure = -log2 CDF(secret's loss) and rank = max(1, CDF * candidates). The
      estimate may exceed log2(candidates) (it is then not log2(candidates) - log2(rank)), and is inf when
      the CDF underflows.
    - "auto": exact when candidates <= max_exact, else the estimate. max_exact bounds "auto" only.
    """
    model = causal_lm(model)
    prefix, secret, alphabet = _canary(prefix, secret, alphabet)
    if method not in ("auto", "exact", "estimate"):
        raise ConfigError(f"unknown exposure method {method!r}: use auto, exact or estimate")
    batch_size = _batch_size(batch_size, model, len(prefix) + len(secret))
    _check_vocabulary(model, prefix, alphabet)
    a, length = len(alphabet), len(secret)
    candidates = a ** length
    if method == "auto":
        method = "exact" if candidates <= max_exact else "estimate"
    pos = {t: i for i, t in enumerate(alphabet)}
    if method == "exact":
        losses = _exact_losses(model, prefix, alphabet, length, batch_size=batch_size)
        index = sum(pos[t] * a ** (length - 1 - i) for i, t in enumerate(secret))
        loss = float(losses[index])
        rank = int(np.count_nonzero(losses < loss)) + 1
        return {"exposure": math.log2(candidates) - math.log2(rank), "rank": rank, "candidates": candidates,
                "method": "exact", "loss": loss}
    if int(samples) < 2:
        raise ConfigError(f"samples must be at least 2 to fit a skew-normal, not {samples}")
    draws = np.random.default_rng(seed).integers(0, a, size=(int(samples), length))
    cands = torch.from_numpy(np.asarray(alphabet, dtype=np.int64)[draws])  # (samples, L)
    rows = torch.cat([cands, torch.tensor([secret], dtype=torch.long)])  # the secret last, scored alike
    full = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(len(rows), -1), rows], 1)  # (samples+1, P+L)
    with _evaluating(model):
        _, nll = _teacher_forced(model, full, len(prefix), batch_size=batch_size, device=_device(model),
                                 block=_block_size(model))
    totals = nll.double().sum(1).numpy()
    loss = float(totals[-1])
    logcdf = _skewnorm_logcdf(totals[:-1], loss)
    return {"exposure": -logcdf / math.log(2), "rank": max(1.0, math.exp(logcdf) * candidates),
            "candidates": candidates, "method": "estimate", "loss": loss}


def exposures(model: nn.Module, prefixes: list[list[int]], secrets: list[list[int]], alphabet: list[int],
              **kw) -> list[dict]:
    """`exposure` of each (prefix, secret) canary over one alphabet; keywords as for `exposure`."""
    if len(prefixes) != len(secrets):
        raise ConfigError(f"{len(prefixes)} prefixes but {len(secrets)} secrets: give one secret per prefix")
    return [exposure(model, p, s, alphabet, **kw) for p, s in zip(prefixes, secrets)]


# --- loss gap ------------------------------------------------------------------------------------------------------

def loss_gap(trained, heldout, *, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean held-out loss minus mean trained loss (MemSinks), with a 95% bootstrap interval.

    Each resample draws both sets with replacement (numpy Generator seeded by `seed`); the interval is the
    2.5 and 97.5 percentiles of the resampled differences. Returns {"gap", "ci_low", "ci_high",
    "trained_mean", "heldout_mean", "n_trained", "n_heldout"}.
    """
    t = np.asarray(trained, dtype=np.float64).ravel()
    h = np.asarray(heldout, dtype=np.float64).ravel()
    for name, x in (("trained", t), ("heldout", h)):
        if x.size == 0:
            raise ConfigError(f"the {name} losses are empty: give at least one loss")
        if not np.isfinite(x).all():
            raise ConfigError(f"the {name} losses hold a NaN or an infinity")
    if int(resamples) < 1:
        raise ConfigError(f"resamples must be at least 1, not {resamples}")
    rng = np.random.default_rng(seed)
    diffs = np.empty(int(resamples))
    chunk = max(1, 10_000_000 // max(t.size, h.size))  # bounds the (chunk, n) index arrays
    for s in range(0, len(diffs), chunk):
        k = min(chunk, len(diffs) - s)
        diffs[s:s + k] = (h[rng.integers(0, h.size, (k, h.size))].mean(1)
                          - t[rng.integers(0, t.size, (k, t.size))].mean(1))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"gap": float(h.mean() - t.mean()), "ci_low": float(lo), "ci_high": float(hi),
            "trained_mean": float(t.mean()), "heldout_mean": float(h.mean()), "n_trained": int(t.size),
            "n_heldout": int(h.size)}
