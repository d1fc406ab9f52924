"""Membership inference scores (memloc.tasks.lm.membership) on cases whose answer is known by hand, and the measures
taking a plain transformers model as it is."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from torch import nn

from memloc.core.errors import ConfigError
from memloc.tasks.lm import measures, membership


class FixedNext(nn.Module):
    """Logits that ignore the context: the same next-token distribution `probs` at every position."""

    def __init__(self, probs):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(probs, dtype=torch.float32).log(), requires_grad=False)

    def forward(self, ids):
        return self.logits.expand(*ids.shape, -1)


def test_token_logprobs_and_scores_by_hand():
    probs = [0.5, 0.25, 0.125, 0.125]
    model = FixedNext(probs)
    (st,) = membership.token_logprobs(model, [[0, 0, 1, 2, 3]])
    logp = np.log([0.5, 0.25, 0.125, 0.125])  # tokens 0, 1, 2, 3 after the first
    assert np.allclose(st["logp"], logp, atol=1e-6)
    mu = sum(p * math.log(p) for p in probs)  # the same distribution everywhere
    sigma = math.sqrt(sum(p * math.log(p) ** 2 for p in probs) - mu ** 2)
    assert np.allclose(st["mu"], mu, atol=1e-6) and np.allclose(st["sigma"], sigma, atol=1e-5)
    s = membership.scores(st, "abcd", k=0.5)
    assert s["loss"] == pytest.approx(-logp.mean(), abs=1e-6)
    assert s["zlib"] == pytest.approx(s["loss"] / len(zlib.compress(b"abcd")), abs=1e-9)
    assert s["min_k"] == pytest.approx(math.log(0.125), abs=1e-6)  # the 2 lowest of 4: both log 1/8
    assert s["min_k_pp"] == pytest.approx((math.log(0.125) - mu) / sigma, abs=1e-5)
    assert math.isnan(s["ref_ratio"])
    half = {k: v / 2 if k == "logp" else v for k, v in st.items()}  # a reference twice as likely per token
    assert membership.scores(st, "abcd", reference=half)["ref_ratio"] == pytest.approx(2.0)


def test_a_flat_distribution_has_no_spread():
    (st,) = membership.token_logprobs(FixedNext([0.25] * 4), [[1, 2, 3]])
    assert np.allclose(st["sigma"], 0, atol=1e-3)
    assert membership.scores(st, None)["min_k_pp"] == pytest.approx(0.0, abs=1e-3)


def test_auroc_and_tpr_by_hand():
    assert membership._auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert membership._auroc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert membership._auroc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    assert membership._auroc(np.array([2.0, 4.0]), np.array([1.0, 3.0])) == 0.75  # 3 of 4 pairs
    neg = np.arange(100.0)  # 1% FPR: one non-member (99) may pass; the threshold is above 98
    pos = np.array([100.0, 99.5, 98.5, 50.0, 10.0])
    assert membership._tpr_at(pos, neg, 0.01) == pytest.approx(0.6)


def test_attack_quality_says_not_enough_data():
    q = membership.attack_quality(np.arange(12.0), np.array([True] * 3 + [False] * 9))
    assert q["auroc"] is None and "not enough data" in q["reason"] and q["members"] == 3
    rng = np.random.default_rng(0)
    score = np.concatenate([rng.normal(2, 1, 50), rng.normal(0, 1, 50)])
    member = np.array([True] * 50 + [False] * 50)
    q = membership.attack_quality(score, member)
    assert 0.85 < q["auroc"] < 0.99 and q["auroc_ci"][0] < q["auroc"] < q["auroc_ci"][1]
    assert q["tpr_at_1pct_fpr"] is None and "100" in q["reason"]  # 50 non-members: no TPR at 1%


def test_sequences_longer_than_the_context_are_refused():
    model = FixedNext([0.5, 0.5])
    model.shape = type("S", (), {"block_size": 3})()
    with pytest.raises(ConfigError, match="context of 3"):
        membership.token_logprobs(model, [[0, 1, 0, 1, 0]])
    with pytest.raises(ConfigError, match="at least 2"):
        membership.token_logprobs(model, [[1]])


def test_the_measures_take_a_plain_transformers_model():
    transformers = pytest.importorskip("transformers")
    from memloc.tasks.lm.hf import HFCausalLM
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_layer=1, n_head=2, n_embd=16, bos_token_id=63,
                                  eos_token_id=63)
    torch.manual_seed(0)
    plain = transformers.GPT2LMHeadModel(cfg)
    pre, suf = [[1, 2, 3], [4, 5, 6]], [[7, 8], [9, 10]]
    got = measures.suffix_measures(plain, pre, suf)
    greedy = measures.greedy_generate(plain, pre, 2)
    assert measures.extractable(plain, pre, greedy.tolist()).all()
    wrapped = HFCausalLM(transformers.GPT2LMHeadModel(cfg))
    wrapped.load_inner_state_dict(plain.state_dict())
    ref = measures.suffix_measures(wrapped, pre, suf)
    assert torch.allclose(got["loss"], ref["loss"], atol=1e-5)
    assert measures._block_size(measures.causal_lm(plain)) == 32
    with pytest.raises(ConfigError, match="takes token ids"):
        measures.extractable(nn.Linear(3, 3), pre, suf)

    class Weird(nn.Module):
        def forward(self, ids):
            return {"no": "logits"}
    with pytest.raises(ConfigError, match="expect logits"):
        measures.sequence_losses(Weird(), pre, suf)


@pytest.mark.parametrize("threads", [1, 2])
def test_position_stats_in_chunks_equal_the_whole_tensor_bit_for_bit(monkeypatch, threads):
    """The scan's per-position statistics made a chunk of positions at a time (whatever the chunk: the default, a
    few rows, the smallest) are the whole tensor's formulas exactly: argmax with a tie (the lowest id), the target's
    log-probability, the mean and variance of log p."""
    import torch.nn.functional as F
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        for b, k, v in ((3, 7, 11), (4, 37, 5003), (1, 1, 3), (0, 5, 7)):
            logits = torch.randn(b, k, v, generator=g) * 3
            if b:
                logits[0, 0, :2] = 20.0  # a tie at the top: token 0 is the argmax
            t = torch.randint(0, v, (b, k), generator=g)
            la = F.log_softmax(logits, -1)
            p = la.exp()
            mu = (p * la).sum(-1)
            want = {"hit": logits.argmax(-1) == t, "logp": la.gather(-1, t[..., None])[..., 0], "mu": mu,
                    "var": (p * la.square()).sum(-1) - mu.square()}
            for chunk in (measures.STATS_BYTES, 4 * v * 3, 1):
                monkeypatch.setattr(measures, "STATS_BYTES", chunk)
                got = measures.position_stats(logits, t, moments=True)
                assert sorted(got) == sorted(want)
                for name in want:
                    assert got[name].shape == (b, k) and torch.equal(got[name], want[name]), (b, k, v, chunk, name)
            if b:
                assert bool(measures.position_stats(logits, torch.zeros_like(t))["hit"][0, 0])
    finally:
        torch.set_num_threads(before)
