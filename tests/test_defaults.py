"""Defaults that fit the user's data (issue #37): a preset's subset on any corpus, default counts that shrink to a
small data set with one line while counts the user set are refused, inputs on an odd scale noticed, the same output
flags on every long command."""

from __future__ import annotations

import copy
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from toys import assert_one_line_error

import memloc
from memloc.cli import build_parser, main, run_config
from memloc.core.errors import DataError
from memloc.tasks.lm.text import load_text

ROOT = Path(__file__).resolve().parents[1]


def _corpora():
    spec = importlib.util.spec_from_file_location("lm_smoke_corpora", ROOT / "studies" / "lm_smoke_corpora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_corpus(folder, kind="english", **kw) -> Path:
    """The seeded corpus the study `studies/lm_smoke_corpora.py` writes (generated here: nothing downloaded)."""
    return _corpora().write_corpus(folder, kind, **kw)


def _lm_config(*argv: str):
    return run_config(build_parser().parse_args(["train", "--task", "lm", *argv]))


# ----------------------------------------------------------------------------- a preset's size on any corpus

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 130 KB of generated English in 4 files: some 1,800 byte windows of 65, more than the smoke subset."""
    return write_corpus(tmp_path_factory.mktemp("corpus") / "plays", files=4, chars=32_000)


def test_the_smoke_preset_takes_its_subset_of_a_large_corpus_and_says_so(corpus):
    cfg = _lm_config("--preset", "smoke", "--corpus", str(corpus))
    data = load_text(cfg.data)
    assert len(data.x_train) == 1200  # the preset's size, not every window
    (line,) = [n for n in data.notes if n.startswith("sequences:")]
    assert "a seeded subset of 1,200 of the" in line and "of plays" in line and "--sequences all" in line
    again = load_text(_lm_config("--preset", "smoke", "--corpus", str(corpus)).data)  # seeded: the same subset
    assert np.array_equal(again.source_index, data.source_index)
    every = load_text(_lm_config("--preset", "smoke", "--corpus", str(corpus), "--sequences", "all").data)
    assert len(every.x_train) > 1600 and not [n for n in every.notes if n.startswith("sequences:")]
    assert _lm_config("--preset", "paper", "--corpus", str(corpus)).data.sequences is None  # the paper: everything


def test_a_preset_size_larger_than_the_corpus_is_every_sequence_a_typed_one_is_refused(tmp_path, capsys):
    small = write_corpus(tmp_path / "small", files=1, chars=30_000)  # about 410 training windows
    cfg = _lm_config("--preset", "smoke", "--corpus", str(small))
    data = load_text(cfg.data)
    (line,) = [n for n in data.notes if n.startswith("sequences:")]
    assert f"sequences: {len(data.x_train)} (the default 1,200 is more than the" in line
    assert cfg.data.sequences is None  # recorded as every sequence in the run's config
    code = main(["train", "--task", "lm", "--preset", "smoke", "--corpus", str(small), "--sequences", "1200",
                 "--out", str(tmp_path / "run")])
    assert_one_line_error(code, capsys.readouterr().err, "--sequences 1200 is more than the", "pass --sequences")
    assert not (tmp_path / "run").exists()
    code = main(["train", "--task", "lm", "--corpus", str(small), "--sequences", "some", "--out", str(tmp_path)])
    assert_one_line_error(code, capsys.readouterr().err, "--sequences takes an integer of at least 2 or all")


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


# ----------------------------------------------------------------------------- the smoke preset memorizes (slow)

@pytest.mark.slow
def test_the_smoke_preset_memorizes_canaries_on_a_corpus_that_is_not_the_built_in_one(tmp_path, capsys):
    """The smoke LM on generated English (words from a word list: harder to learn than the Bible) has memorized
    sequences for localize, flip and DEL to work on: most canaries of the highest repeat count are extracted in
    context, none held out. The preset alone, as a user runs it: 12 epochs of about 2.3 s on 2 idle cores, some 35 s
    in all (225 s measured with other jobs on the cores)."""
    from memloc.probes.localization import memorized_sequences
    from memloc.tasks.experiment import open_run, preset
    corpus = write_corpus(tmp_path / "english", files=3, chars=40_000)  # about 1,650 training windows
    out = tmp_path / "run"
    assert main(["train", "--task", "lm", "--preset", "smoke", "--corpus", str(corpus), "--out", str(out),
                 "--quiet"]) == 0
    assert "sequences: a seeded subset of 1,200 of the" in capsys.readouterr().out
    loaded = open_run(out, device="cpu")
    model, data = loaded.model(), loaded.data
    top = max(preset("smoke", "lm")["data"]["repeats"])
    memorized = memorized_sequences(model, data)  # what `memloc localize` works on
    repeats = data.repeats.numpy()
    share = np.isin(np.flatnonzero(repeats == top), memorized).mean()
    assert share >= 0.5, (share, np.unique(repeats[memorized], return_counts=True))
    held = memloc.task_of(data).hits(model, "test").cpu().numpy() & (data.canary_test.cpu().numpy() >= 0)
    assert not held.any()  # a canary never trained on is never extracted
