"""Hand-checkable cases and checks shared by the tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from memloc.tasks.classification.data import Dataset


def toy_data(n_noisy: int = 2) -> Dataset:
    """Two classes on 1x1x2 'images': class 0 at (1, 0), class 1 at (0, 1) -> normalized (1,-1), (-1,1).

    The first `n_noisy` examples carry the other class as their given label.
    """
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 5).reshape(10, 1, 1, 2)
    y_true = torch.tensor([0, 1] * 5)
    is_noisy = torch.zeros(10, dtype=torch.bool)
    is_noisy[:n_noisy] = True
    y = torch.where(is_noisy, 1 - y_true, y_true)
    return Dataset("toy", x, y, y_true, is_noisy, torch.zeros(10, dtype=torch.bool), x.clone(), y_true.clone(), 2)


def toy_model() -> nn.Module:
    """Two bias-free 2x2 linear layers, both the identity."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    model.input_shape = (1, 1, 2)
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(2))
        model[2].weight.copy_(torch.eye(2))
    return model


def digest(path: Path) -> dict:
    """sha256 of every file under `path`: proves a command left a directory untouched."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    """A CLI failure as the project promises it: exit 2, one `memloc: error:` line naming `words`, no traceback."""
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("memloc: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]


def bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE of `texts` as a transformers tokenizer, eos "<|endoftext|>": what the audit tests' models
    are trained and audited with."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


def train_plainly(model: nn.Module, tok, corpus: list[str], *, epochs: int, rng, before_epoch=None) -> None:
    """A plain transformers loop, as a user outside memloc trains: AdamW lr 3e-3, batches of 16 texts (+ eos)
    padded with eos and not scored there, shuffled by `rng` each epoch; `before_epoch(epoch)` first (a state
    saved, as a Pythia-style suite keeps them)."""
    eos = tok.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    enc = [tok.encode(t) + [eos] for t in corpus]
    for epoch in range(epochs):
        if before_epoch is not None:
            before_epoch(epoch)
        rng.shuffle(enc)
        for i in range(0, len(enc), 16):
            b = enc[i:i + 16]
            width = max(map(len, b))
            ids = torch.tensor([x + [eos] * (width - len(x)) for x in b])
            labels = torch.tensor([x + [-100] * (width - len(x)) for x in b])
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()


def report_modules() -> list:
    """The report's modules that draw figures, each with its own `png` (memloc.core.figures.png): what a test patches
    to see every figure the report draws."""
    import sys

    import memloc.report.page  # noqa: F401 - imports every section
    from memloc.core import figures
    return [m for name, m in sorted(sys.modules.items())
            if name.startswith("memloc.report.") and vars(m).get("png") is figures.png]
