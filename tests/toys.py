"""Hand-checkable cases and checks shared by the tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from memloc.data import Dataset


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
