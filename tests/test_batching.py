"""The batch a pass over a language model takes (memloc.core.batching): chosen from the model and the memory free,
halved on an out-of-memory error with the same result, one line where even one row does not fit."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from memloc.core import batching
from memloc.core.errors import RunError
from memloc.tasks.lm import measures, membership
from memloc.tasks.lm.gpt import GPT, GPTShape


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTShape(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=32)).eval()


def test_the_batch_is_what_a_share_of_the_free_memory_holds_by_hand():
    """A row of T = 20 tokens of a GPT with V = 50, C = 32, I = 128, 4 heads holds 4 x 20 x (2 x 50 + 4 x 32 + 128
    + 4 x 20) = 34,880 bytes; half of 10 MB free holds 143 such rows; 1 GB free is past the CPU's cap of 256; a
    backward pass holds more per row than a forward one, and less when its blocks are recomputed."""
    model = _gpt()
    assert batching.row_bytes(batching.model_shape(model), 20) == 34_880
    assert batching.rows_that_fit(model, length=20, free=10_000_000) == 5_000_000 // 34_880 == 143
    assert batching.rows_that_fit(model, length=20, free=1 << 30) == 256
    assert batching.rows_that_fit(model, length=20, free=1000) == 1  # never below one row
    kept = batching.rows_that_fit(model, length=20, backward=True, free=10_000_000)
    assert kept < 143 and batching.rows_that_fit(model, length=20, backward=True, recompute=True,
                                                 free=10_000_000) > kept
    assert batching.rows_that_fit(nn.Linear(3, 3), length=20, free=1000) == 256  # not a transformer: the cap


def test_a_cpu_forward_batch_keeps_its_logits_within_512_mib():
    """GPT-2 small's vocabulary (50,257) on rows of 80 tokens: 512 MiB of fp32 logits hold 33 rows, whatever the
    free memory; a backward pass is bounded by the memory alone."""
    from types import SimpleNamespace
    gpt2 = nn.Linear(1, 1)
    gpt2.shape = SimpleNamespace(vocab_size=50257, n_embd=768, intermediate=3072, n_layer=12, n_head=12,
                                 block_size=1024)
    assert batching.rows_that_fit(gpt2, length=80, free=1 << 40) == (512 << 20) // (4 * 80 * 50257) == 33
    assert batching.rows_that_fit(gpt2, length=80, free=1 << 40, backward=True) == 256


def test_a_plain_transformers_model_is_read_from_its_config():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=64)
    shape = batching.model_shape(transformers.LlamaForCausalLM(cfg))
    assert shape == {"width": 32, "hidden": 80, "vocab": 100, "layers": 2, "heads": 4, "block": 64, "gated": True,
                     "tanh_gelu": False}


def test_memlocs_wrapper_is_counted_with_its_activation():
    """memloc's Hugging Face wrapper is read from its shape and its inner config's activation: GPT-2's composed
    gelu_new keeps three more hidden layers in a backward pass (`budget.transformer_batches`, measured), so a row
    costs more than memloc's GPT of the same shape (ig at GPT-2 small's size held 18.7 GiB of 24 when it did not)."""
    from memloc.tasks.lm.gpt import GPT, GPTShape
    from memloc.tasks.lm.hf import build_hf
    gpt2 = build_hf("gpt2", vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32)
    llama = build_hf("llama", vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32)
    own = GPT(GPTShape(64, 32, n_layer=2, n_head=4, n_embd=32))
    assert batching.model_shape(gpt2)["tanh_gelu"] and not batching.model_shape(gpt2)["gated"]
    assert batching.model_shape(llama)["gated"] and not batching.model_shape(llama)["tanh_gelu"]
    assert not any(batching.model_shape(own)[k] for k in ("gated", "tanh_gelu"))
    gpt2_row = batching.row_bytes(batching.model_shape(gpt2), 16, backward=True)
    own_row = batching.row_bytes(batching.model_shape(own), 16, backward=True)
    assert gpt2_row - own_row == 4 * 16 * 2 * (3 * 4 * 32)  # 2 blocks x 3 hidden layers of 4 x 32, fp32


class _Scarce(nn.Module):
    """The model, but a batch of more than `most` rows is a CUDA out-of-memory error, as a full GPU gives it."""

    def __init__(self, inner: nn.Module, most: int):
        super().__init__()
        self.inner, self.most, self.shape, self.calls = inner, most, inner.shape, []

    def forward(self, ids):
        self.calls.append(len(ids))
        if len(ids) > self.most:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(ids)


def _sequences(n: int = 23) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (n, 12), generator=g).tolist()
    return [r[:6] for r in ids], [r[6:] for r in ids]


def test_an_out_of_memory_halves_the_batch_once_with_a_line_and_the_result_is_identical():
    model = _gpt()
    pre, suf = _sequences()
    direct = measures.suffix_measures(model, pre, suf, batch_size=4)
    scarce = _Scarce(model, most=5)
    batching._said.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = measures.suffix_measures(scarce, pre, suf, batch_size=16)
    lines = [str(w.message) for w in caught]
    assert lines == ["the teacher-forced scan ran out of memory: batch halved to 8 rows and going on (--batch-size "
                     "to choose)"]  # 16 -> 8 -> 4: one line, at the first halving
    assert scarce.calls[:3] == [16, 8, 4] and max(scarce.calls[2:]) == 4
    for k in ("extractable", "suffix_accuracy", "loss"):
        assert torch.equal(got[k], direct[k]), k
    with pytest.warns(UserWarning, match="the membership scores' pass ran out of memory: batch halved to 4 rows"):
        stats = membership.token_logprobs(_Scarce(model, most=3), [p + s for p, s in zip(pre, suf)], batch_size=8)
    same = membership.token_logprobs(model, [p + s for p, s in zip(pre, suf)], batch_size=2)
    assert all((a[k] == b[k]).all() for a, b in zip(stats, same) for k in ("logp", "mu", "sigma", "hit"))


def test_one_row_that_does_not_fit_is_one_line_and_other_errors_pass_through():
    model = _gpt()
    pre, suf = _sequences(3)
    with pytest.raises(RunError, match="ran out of memory on a single row: the model does not fit this device"):
        measures.suffix_measures(_Scarce(model, most=0), pre, suf, batch_size=2)

    def broken(lo, hi):
        raise RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        batching.in_batches(4, 2, broken)
    assert batching.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to ..."))
    assert batching.is_out_of_memory(MemoryError()) and not batching.is_out_of_memory(ValueError("out of memory"))


def test_the_membership_pass_gives_the_scans_extraction_from_the_same_logits():
    """`hit` of the membership pass over prefix + suffix is the teacher-forced argmax: its suffix positions all
    right exactly where the scan says extracted (here half the suffixes are the model's own greedy ones)."""
    model = _gpt()
    pre, suf = _sequences(10)
    suf[:5] = measures.greedy_generate(model, pre[:5], 6).tolist()
    scan = measures.suffix_measures(model, pre, suf)
    stats = membership.token_logprobs(model, [p + s for p, s in zip(pre, suf)])
    from_pass = torch.tensor([bool(st["hit"][len(p) - 1:].all()) for st, p in zip(stats, pre)])
    assert torch.equal(from_pass, scan["extractable"]) and from_pass[:5].all()
    loss = torch.tensor([float(-st["logp"][len(p) - 1:].mean()) for st, p in zip(stats, pre)])
    assert torch.allclose(loss.float(), scan["loss"], atol=1e-5)


def test_work_that_cannot_keep_a_part_runs_whole_again_at_half_the_batch():
    """`whole_at_half`: the whole work again at half the batch after each out-of-memory error, `again` called
    before each new try (to undo what a failed try left), the batch it ran with returned; other errors pass."""
    tries, undone = [], []

    def work(batch: int) -> str:
        tries.append(batch)
        if batch > 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return f"done at {batch}"
    batching._said.clear()
    with pytest.warns(UserWarning, match="the test's work ran out of memory: batch halved to 8 rows and going on$"):
        assert batching.whole_at_half(work, 16, what="the test's work", flag=None,
                                      again=lambda: undone.append(1)) == ("done at 2", 2)
    assert tries == [16, 8, 4, 2] and len(undone) == 3
    with pytest.raises(RunError, match="on a single row"):
        batching.whole_at_half(lambda b: work(b + 10), 2, what="the test's work")

    def broken(batch: int) -> None:
        raise ValueError("not memory")
    with pytest.raises(ValueError, match="not memory"):
        batching.whole_at_half(broken, 8, what="the test's work")
