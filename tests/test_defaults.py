"""Defaults that fit the user's data (issue #37): default counts shrink to a small data set with one line, counts the
user set are refused."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from toys import assert_one_line_error

import memloc
from memloc.cli import main
from memloc.errors import DataError

# ----------------------------------------------------------------------------- counts that shrink to 50 examples

def _fifty() -> tuple[memloc.Dataset, nn.Module]:
    g = torch.Generator().manual_seed(0)
    x, xt = torch.rand(50, 1, 4, 4, generator=g), torch.rand(20, 1, 4, 4, generator=g)
    y, yt = torch.randint(0, 2, (50,), generator=g), torch.randint(0, 2, (20,), generator=g)
    noisy = torch.zeros(50, dtype=torch.bool)
    noisy[:5] = True
    torch.manual_seed(0)
    return memloc.wrap_data(x, y, xt, yt, noise_mask=noisy), nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(),
                                                                            nn.Linear(8, 2))


def test_default_counts_shrink_to_a_50_example_set_with_one_line_each():
    data, model = _fifty()
    init = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings(record=True) as caught:  # from Python without a log: one warning each
        warnings.simplefilter("always")
        memloc.train(model, data, epochs=1)
    assert [str(w.message) for w in caught] == [
        "batch-size: 50 (the default 512 is more than the 50 training examples; --batch-size to choose)"]
    assert caught[0].filename == __file__  # attributed to the caller's line
    lines: list[str] = []
    result = memloc.flip(model, data, log=lines.append, eval_subsample=10)
    assert "examples: 45 (the default 100 is more than the 45 clean training examples available; --examples to " \
           "choose)" in lines
    assert "examples: 5 (the default 100 is more than the 5 noisy training examples available; --examples to " \
           "choose)" in lines
    assert "others: 50 (the default 512 is more than the 50 training examples; --others to choose)" in lines
    assert result.summary["others"] == 50 and result.summary["examples"] == 50
    lines.clear()
    done = memloc.retrain(model, data, init_state=init, epochs=1, log=lines.append)
    assert "batch-size: 45 (the default 512 is more than the 45 clean training examples; --batch-size to choose)" \
        in lines and done.summary["batch_size"] == 45


def test_counts_the_user_set_are_refused_when_larger_than_the_data():
    data, model = _fifty()
    with pytest.raises(DataError, match=r"^--others 100 is more than the 50 training examples: pass --others 50 or "
                                        r"fewer$"):
        memloc.flip(model, data, others=100)
    with pytest.raises(DataError, match=r"^--examples 20 is more than the 5 noisy training examples"):
        memloc.flip(model, data, examples=20)
    with pytest.raises(DataError, match=r"^--eval-subsample 60 is more than the 50 training examples"):
        memloc.flip(model, data, eval_subsample=60)
    with pytest.raises(DataError, match=r"^--batch-size 64 is more than the 50 training examples"):
        memloc.train(model, data, epochs=1, batch_size=64)


def test_the_command_line_refuses_a_typed_batch_size_and_fits_the_presets(tmp_path, capsys):
    x = np.random.default_rng(0).integers(0, 256, size=(60, 1, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "tiny.npz", x=x, y=np.arange(60) % 3)
    base = ["train", "--preset", "smoke", "--dataset", str(tmp_path / "tiny.npz"), "--epochs", "1", "--quiet"]
    code = main([*base, "--batch-size", "100", "--out", str(tmp_path / "typed")])
    assert_one_line_error(code, capsys.readouterr().err, "--batch-size 100 is more than the 48 training examples")
    assert main([*base, "--out", str(tmp_path / "run")]) == 0  # the smoke preset's sizes are defaults
    out = capsys.readouterr().out
    assert "train-size: 48 (the default 1,000 is more than the 48 training examples; --train-size to choose)" in out
    assert "batch-size: 48 (the default 128 is more than the 48 training examples; --batch-size to choose)" in out
    config = memloc.RunDir.open(tmp_path / "run").config
    assert config["train"]["batch_size"] == 48 and config["train"]["given"] == ["epochs"]
