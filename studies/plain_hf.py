"""What a user outside memloc does to make a model memloc then audits, shared by the studies that do it: a byte-level
BPE tokenizer of their text, and a plain `transformers` training loop (no memloc code in either)."""

from __future__ import annotations

import contextlib
import random
import time
from typing import Callable

import torch


def bpe_tokenizer(texts: list[str], vocab_size: int = 2048):
    """A byte-level BPE of `texts` as a transformers tokenizer, eos "<|endoftext|>"."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


def train_plainly(model, tok, corpus: list[str], *, epochs: int, lr: float, rng: random.Random, bf16: bool = False,
                  after_epoch: Callable[[int], None] | None = None) -> float:
    """AdamW (weight decay 0.01) with a one-cycle schedule peaking at `lr`, batches of 32 texts (+ eos, at most 128
    tokens) padded with eos and not scored there, shuffled by `rng` each epoch; `bf16`: under bf16 autocast (the
    weights float32); `after_epoch(epoch)` after each (1-based: a state saved). Prints each epoch's loss; returns
    the seconds it took."""
    eos = tok.eos_token_id
    enc = [tok.encode(t)[:127] + [eos] for t in corpus]
    steps = epochs * ((len(enc) + 31) // 32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        rng.shuffle(enc)
        total = 0.0
        for i in range(0, len(enc), 32):
            b = enc[i:i + 32]
            w = max(map(len, b))
            ids = torch.tensor([x + [eos] * (w - len(x)) for x in b])
            labels = torch.tensor([x + [-100] * (w - len(x)) for x in b])
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(b)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(enc):.3f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        if after_epoch is not None:
            after_epoch(epoch + 1)
    return time.perf_counter() - t0
