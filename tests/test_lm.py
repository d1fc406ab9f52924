"""Language models end to end: text with canaries, the LM task, training with gradient accounting, the probes,
`memloc run --task lm`, bad input; and (slow) the science: memorization rises with repetition."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memloc.cli import main
from memloc.core.training import TrainConfig, Trainer, epoch_seed, seeded
from memloc.tasks import task_of
from memloc.tasks.classification.models import layers
from memloc.tasks.lm import measures
from memloc.tasks.lm.gpt import GPT, GPTShape
from memloc.tasks.lm.text import TextConfig, decode_targets, load_text

SMALL = dict(sequences=300, block_size=48, prefix_tokens=8, suffix_tokens=16, canaries=1, repeats=(1, 3),
             canary_formats=("secret", "random"), secret_digits=3)


@pytest.fixture(scope="module")
def small():
    return load_text(TextConfig(**SMALL))


def test_text_canaries_are_placed_as_recorded(small):
    data = small
    assert data.x_train.shape == (300, 48) and data.y_train.shape == (300, 48)
    trained = [c for c in data.canaries if c["trained"]]
    held = [c for c in data.canaries if not c["trained"]]
    assert len(trained) == len(held) == 4  # 1 canary x 2 formats x 2 repeat counts, and as many held out
    counts = np.bincount(data.canary.numpy()[data.canary.numpy() >= 0], minlength=len(data.canaries))
    for c in trained:  # each trained canary sits in exactly `repeats` training sequences, never held out
        assert counts[c["id"]] == c["repeats"]
        assert not (data.canary_test == c["id"]).any()
    for c in held:
        assert counts[c["id"]] == 0 and int((data.canary_test == c["id"]).sum()) == 1
    tok = data.tokenizer
    for i in np.flatnonzero(data.canary.numpy() >= 0):  # the scored tokens are exactly the canary's secret
        c = data.canaries[int(data.canary[i])]
        tokens, trained_mask, scored = decode_targets(data.y_train[i])
        assert tokens[scored].tolist() == c["secret_ids"] and trained_mask.all()
        text = tok.decode(data.x_train[i].tolist() + [int(tokens[-1])])
        assert c["prefix"] + c["secret"] in text
    corpus = np.flatnonzero(data.canary.numpy() < 0)[0]  # a corpus sequence scores its suffix after the prefix
    _, _, scored = decode_targets(data.y_train[corpus])
    assert np.flatnonzero(scored.numpy()).tolist() == list(range(7, 7 + 16))
    again = load_text(TextConfig(**SMALL))  # deterministic
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.y_train, data.y_train)
    assert again.differs_from(data.arrays()) is None
    other = load_text(TextConfig(**{**SMALL, "seed": 1}))
    assert other.differs_from(data.arrays()) is not None


def test_a_canary_in_a_window_of_text_is_not_a_row_alone(small):
    """A trained run's canaries sit inside windows of corpus text: their in-context extraction is not the canary's
    from its prefix alone, so the memorization probe measures those rows (`TextData.alone_rows` finds none). An
    audit's rows, one sequence each, are all alone (tests/test_audit.py)."""
    rows, owners = small.alone_rows()
    assert len(rows) == len(owners) == 0 and int((small.canary >= 0).sum()) == 8


def test_match_is_greedy_extraction_and_loss_is_per_sequence(small):
    """The task's teacher-forced match equals greedy decoding from everything before the scored tokens."""
    data = small
    task = task_of(data)
    torch.manual_seed(0)
    model = GPT(GPTShape(data.vocab_size, data.block_size, n_layer=1, n_head=2, n_embd=32)).eval()
    # make a few sequences extractable by construction: a model that copies its input shifted is hard to build,
    # so instead compare on sequences whose scored tokens are replaced by the model's own greedy output
    idx = np.flatnonzero(data.canary.numpy() >= 0)[:4]
    ids = data.x_train[idx].clone()
    y = data.y_train[idx].clone()
    tokens, _, scored = decode_targets(y)
    starts = [int(np.flatnonzero(scored[r].numpy())[0]) for r in range(len(idx))]
    lens = [int(scored[r].sum()) for r in range(len(idx))]
    prefixes = [ids[r, :starts[r] + 1].tolist() for r in range(len(idx))]
    greedy = [measures.greedy_generate(model, [p], n)[0].tolist() for p, n in zip(prefixes, lens)]
    with torch.no_grad():
        for r in range(2):  # rows 0, 1: the scored tokens are the greedy continuation -> match
            full = prefixes[r] + greedy[r]
            ids[r, :len(full) - 1] = torch.tensor(full[:-1])[: ids.shape[1]]
            t = torch.tensor(full[1:])
            y[r, :len(t)] = torch.where(scored[r, :len(t)], t, -t - 2)
        hits = task.match(task.predict(model(ids)), y)
    expected = [measures.extractable(model, [ids[r, :starts[r] + 1].tolist()],
                                     [decode_targets(y[r])[0][scored[r]].tolist()])[0].item() for r in range(len(idx))]
    assert hits.tolist() == expected and expected[:2] == [True, True]
    # the loss is the mean over each sequence's trained tokens
    out = model(ids)
    tokens, trained, _ = decode_targets(y)
    manual = torch.stack([F.cross_entropy(out[r][trained[r]], tokens[r][trained[r]]) for r in range(len(idx))])
    assert torch.allclose(task.loss(out, y), manual, atol=1e-6)


def test_lm_gradient_accounting_equals_separate_gradients(small):
    """The canaries' share and the rest's of each block's update, against separate backward passes."""
    data = small
    torch.manual_seed(1)
    model = GPT(GPTShape(data.vocab_size, data.block_size, n_layer=1, n_head=2, n_embd=32))
    reference = copy.deepcopy(model)
    cfg = TrainConfig(epochs=1, batch_size=64, lr=1e-3, schedule="constant", device="cpu", seed=3, optimizer="adamw",
                      weight_decay=0.0)
    hist = Trainer(model, data, cfg, progress=False).fit()
    task = task_of(data)
    params = dict(reference.named_parameters())
    sums = {k: {n: torch.zeros_like(p) for n, p in params.items()} for k in ("clean", "noisy")}
    opt = torch.optim.AdamW([{"params": [p for p in reference.parameters() if p.dim() >= 2], "weight_decay": 0.0},
                             {"params": [p for p in reference.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95))
    with seeded(epoch_seed(3, 1), torch.device("cpu")):
        order = torch.randperm(data.num_train)
    reference.train()
    for s in range(0, data.num_train, 64):
        idx = order[s:s + 64]
        canary = (data.canary[idx] >= 0).float()
        grads = {}
        for name, w in (("clean", 1 - canary), ("noisy", canary)):
            reference.zero_grad()
            (task.loss(reference(data.x_train[idx]), data.y_train[idx]) * w / len(idx)).sum().backward()
            grads[name] = {n: p.grad.clone() for n, p in params.items()}
        for n, p in params.items():
            for k in sums:
                sums[k][n] += grads[k][n]
            p.grad = grads["clean"][n] + grads["noisy"][n]
        opt.step()
    g = hist.gradients
    for li, layer in enumerate(layers(reference)):
        c = torch.cat([sums["clean"][p].flatten() for p in layer.params])
        n = torch.cat([sums["noisy"][p].flatten() for p in layer.params])
        assert g["clean_norm"][li, 0] == pytest.approx(float(c.norm() / math.sqrt(layer.num_params)), rel=1e-4)
        assert g["noisy_norm"][li, 0] == pytest.approx(float(n.norm() / math.sqrt(layer.num_params)), rel=1e-4)
        assert g["cosine"][li, 0] == pytest.approx(float(F.cosine_similarity(c, n, dim=0)), abs=1e-4)
    assert list(g["layer_names"]) == ["embed", "blocks.0.attn", "blocks.0.mlp", "head"]


@pytest.fixture(scope="module")
def lm_study(tmp_path_factory) -> Path:
    """`memloc run --task lm --preset smoke`: train, the four probes, the report."""
    out = tmp_path_factory.mktemp("lmstudy") / "run"
    assert main(["run", "--task", "lm", "--preset", "smoke", "--out", str(out), "--quiet"]) == 0
    return out


def test_lm_study_end_to_end(lm_study):
    run = lm_study
    info = json.loads((run / "run.json").read_text())
    for stage in ("train", "memorization", "rewinding", "retraining", "flipping"):
        assert info["stages"][stage]["status"] == "done", stage
    summary = json.loads((run / "probes" / "memorization" / "summary.json").read_text())
    rows = {r["repeats"]: r for r in summary["by_repeats"] if r["format"] == "all"}
    assert sorted(rows) == [1, 8, 32]
    assert rows[32]["trained_loss"] < rows[1]["trained_loss"]  # more repeats, lower loss of the secret
    assert rows[32]["in_context_extracted"] >= 0.5  # the smoke preset memorizes: its probes have canaries
    assert all(r["heldout_extracted"] == 0 for r in rows.values())
    assert 1 < summary["heldout_perplexity"] < 256
    z = np.load(run / "probes" / "rewinding" / "arrays.npz")
    assert list(z["subsets"]) == ["corpus_train", "canary_train", "canary_heldout", "test"]
    assert z["accuracy"].shape[0] == 6  # embed, 2 x (attention, MLP), head
    flips = json.loads((run / "probes" / "flipping" / "summary.json").read_text())
    assert "canary" in flips["kinds"]
    assert (run / "report" / "report.html").exists()
    # resuming a finished study redoes nothing and keeps every result
    before = (run / "probes" / "flipping" / "summary.json").read_bytes()
    assert main(["run", "--resume", str(run), "--quiet"]) == 0
    assert (run / "probes" / "flipping" / "summary.json").read_bytes() == before


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0,4"], "--repeats takes integers of at least 1, not 0"),
    (["--corpus", "missing.txt"], "missing.txt"),
    (["--model", "hf:EleutherAI/pythia-70m"], "never downloads"),
    (["--noise", "0.2"], "--noise"),
    (["--canaries", "50"], "do not fit"),
    (["--prefix-tokens", "60", "--suffix-tokens", "60"], "do not fit"),
    (["--tokenizer", "sentencepiece"], "unknown tokenizer"),
])
def test_lm_bad_input_is_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    code = main(["train", "--task", "lm", "--preset", "smoke", "--out", str(out), "--quiet", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_lm_own_text_file(tmp_path):
    """A user's .txt file, one sequence per line, with a BPE tokenizer saved into the run and reused."""
    from memloc.tasks.lm.sources import bible_verses
    text = tmp_path / "mine.txt"
    text.write_text("\n".join(v for v in bible_verses()[:600] if len(v) > 90))
    out = tmp_path / "run"
    assert main(["train", "--task", "lm", "--corpus", str(text), "--tokenizer", "bpe", "--vocab-size", "300",
                 "--block-size", "32", "--prefix-tokens", "8", "--suffix-tokens", "8", "--canaries", "1",
                 "--repeats", "2", "--canary-formats", "secret", "--epochs", "1", "--n-layer", "1", "--n-embd", "32",
                 "--out", str(out), "--quiet"]) == 0
    assert (out / "tokenizer" / "tokenizer.json").exists()
    from memloc.tasks.experiment import open_run
    loaded = open_run(out)  # the data is rebuilt with the saved tokenizer and checked against data.npz
    assert loaded.data.vocab_size <= 300 and loaded.data.block_size == 32


@pytest.mark.slow
def test_memorization_rises_with_repetition(tmp_path):
    """Science on the built-in corpus: canaries seen 16+ times are extracted far more often than those seen once,
    held-out canaries never, and exposure rises with the repeat count. A pipeline that shuffled canary ids or
    never inserted them would fail every one of these."""
    out = tmp_path / "run"
    assert main(["train", "--task", "lm", "--preset", "smoke", "--sequences", "1500", "--canaries", "3",
                 "--repeats", "1,16,32", "--canary-formats", "secret", "--epochs", "14", "--n-embd", "96",
                 "--out", str(out), "--quiet"]) == 0
    assert main(["memorization", str(out), "--quiet"]) == 0
    summary = json.loads((out / "probes" / "memorization" / "summary.json").read_text())
    rows = {r["repeats"]: r for r in summary["by_repeats"] if r["format"] == "all"}
    seen_once = rows[1]["in_context_extracted"]
    often = min(rows[16]["in_context_extracted"], rows[32]["in_context_extracted"])
    assert often >= seen_once + 0.5, rows
    assert all(r["heldout_extracted"] == 0 for r in rows.values())
    assert rows[1]["trained_exposure"] < rows[16]["trained_exposure"] <= rows[32]["trained_exposure"] + 0.5
    assert rows[16]["trained_exposure"] > rows[16]["heldout_exposure"] + 3


def test_lm_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """AdamW's moments and step count are checkpointed: a run stopped after epoch 2 and resumed ends bit-identical."""
    from memloc.core.runs import RunDir
    from memloc.core.training import Trainer as T
    from memloc.tasks.experiment import ModelConfig, RunConfig, resume_training, run_training

    def cfg():
        return RunConfig(data=TextConfig(**SMALL), model=ModelConfig(name="gpt", n_layer=1, n_head=2, n_embd=32),
                         train=TrainConfig(epochs=3, lr=1e-2, batch_size=32, optimizer="adamw", weight_decay=0.1,
                                           clip=1.0, device="cpu"), task="lm")
    whole = run_training(cfg(), tmp_path / "whole", progress=False)
    original = T._save_epoch

    def stop_after_two(self, epoch):
        original(self, epoch)
        if epoch == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(T, "_save_epoch", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg(), tmp_path / "cut", progress=False)
    monkeypatch.undo()
    resume_training(tmp_path / "cut", progress=False)
    a, b = RunDir.open(tmp_path / "whole"), RunDir.open(whole.path.parent / "cut")
    for key, t in a.load_checkpoint(3).items():
        assert torch.equal(t, b.load_checkpoint(3)[key]), key
    assert np.array_equal(np.load(a.path / "examples.npz")["loss"], np.load(b.path / "examples.npz")["loss"])


def test_lm_text_too_short_to_measure_is_one_line(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("\n".join(f"line {i} is short" for i in range(400)))
    code = main(["train", "--task", "lm", "--corpus", str(short), "--canaries", "0", "--out", str(tmp_path / "r"),
                 "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--window" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_lm_window_flag_as_the_error_and_the_help_say(tmp_path, capsys):
    """The line the too-short error suggests (`pass --window`) and `memloc run --help` shows (a flag, no value)
    works: the whole .txt cut into windows of --block-size tokens (it said "window True is not a positive number
    of tokens")."""
    import re
    short = tmp_path / "short.txt"
    short.write_text("\n".join(f"line {i} is short" for i in range(400)))
    argv = ["train", "--task", "lm", "--corpus", str(short), "--canaries", "0", "--out", str(tmp_path / "r"), "--quiet"]
    assert main(argv) == 2
    suggested = re.search(r"pass (--\S+)", capsys.readouterr().err).group(1)
    assert suggested == "--window"
    assert main(["run", "--help"]) == 0
    assert re.search(r"--window\s+cut your", capsys.readouterr().out)  # a flag without a value
    code = main([*argv, suggested, "--epochs", "1", "--n-layer", "1", "--n-embd", "32", "--n-head", "2"])
    out, err = capsys.readouterr()
    assert code == 0 and not err.strip(), err
    from memloc.core.runs import RunDir
    data = RunDir.open(tmp_path / "r").load_arrays("data.npz", "canary")
    assert len(data["canary"]) > 1  # the 400 short lines became training windows of --block-size + 1 tokens
