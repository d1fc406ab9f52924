"""Memorization sinks: example-tied dropout in a language model's MLPs — the per-token hash against its plain-Python
reference, the ids a sequence's tokens take, deduplication, training and evaluation end to end, the export whose
outputs equal drop mode (memloc's GPT and Hugging Face families), bad input; and (slow) the science: the sinks
hold the repeated canaries' advantage, standard dropout at the same active fraction does not localize it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from memloc.cli import main
from memloc.core.dropout import ExampleTiedDropout, _hash_reference, dropout_mode, example_indices, example_tied_dropout
from memloc.core.inference import indices_context
from memloc.methods.sinks import evaluate_sinks, gap_closed, same_units
from memloc.study.export import fold_sinks, load_exported
from memloc.tasks import task_of
from memloc.tasks.experiment import ModelConfig, make_model, open_run
from memloc.tasks.lm.text import CANARY_ID_BASE, HELDOUT_ID_BASE, TextConfig, load_text

SMALL = dict(sequences=300, block_size=48, prefix_tokens=8, suffix_tokens=16, canaries=1, repeats=(1, 3),
             canary_formats=("secret", "random"), secret_digits=3)
RUN = ["--task", "lm", "--preset", "smoke", "--sequences", "400", "--epochs", "2", "--quiet"]


@pytest.fixture(scope="module")
def small():
    return load_text(TextConfig(**SMALL))


def test_per_token_masks_follow_the_reference_hash():
    """(N, T) ids: each token's units are on exactly where the plain-Python hash of (seed, layer, its id, unit)
    is below p_mem (generalization units always); a 0-d id is one mask for the whole batch."""
    p_gen, p_mem, seed, layer = 0.25, 0.5, 7, 3
    ids = torch.tensor([[5, 5, 2**31 + 1, 2**31 + 1], [9, 2**31 + 1, 9, 9]])
    x = torch.ones(2, 4, 8)
    out = example_tied_dropout(x, ids, p_gen=p_gen, p_mem=p_mem, seed=seed, mode="train", layer_id=layer)
    thr = int(np.ceil(p_mem * 2**32))
    for b in range(2):
        for t in range(4):
            want = [1.0 if u < 2 or _hash_reference(seed, layer, int(ids[b, t]), u) < thr else 0.0 for u in range(8)]
            assert out[b, t].tolist() == want
    assert torch.equal(out[0, 2], out[1, 1])  # the same id, the same units, wherever it sits
    one = example_tied_dropout(x, torch.tensor(9), p_gen=p_gen, p_mem=p_mem, seed=seed, mode="train", layer_id=layer)
    assert torch.equal(one, out[1, 0].expand_as(one))
    rows = example_tied_dropout(x, torch.tensor([5, 9]), p_gen=p_gen, p_mem=p_mem, seed=seed, mode="train",
                                layer_id=layer)  # one id per row still works on (N, T, F)
    assert torch.equal(rows[0], out[0, 0].expand(4, 8)) and torch.equal(rows[1], out[1, 0].expand(4, 8))
    with pytest.raises(Exception, match="one per token"):
        example_tied_dropout(x, torch.zeros(3, 4, dtype=torch.long), p_gen=p_gen, p_mem=p_mem, seed=seed,
                             mode="train")


def test_example_ids_tie_a_canary_to_its_document(small):
    data = small
    rows = torch.nonzero(data.canary >= 0).flatten()
    ids = data.example_ids(rows, "document")
    assert ids.shape == (len(rows), data.block_size)
    seen: dict[int, set] = {}
    for r, row_ids in zip(rows.tolist(), ids):
        c, (s, e) = int(data.canary[r]), data.canary_span[r].tolist()
        can = data.canaries[c]
        assert data.x_train[r, s:e].tolist() == (can["prefix_ids"] + can["secret_ids"])[:e - s]
        assert (row_ids[s:e] == CANARY_ID_BASE + c).all()  # the canary's tokens: the canary's id
        window = int(data.source_index[r])
        assert (row_ids[:s] == window).all() and (row_ids[e:] == window).all()  # the rest: its corpus window's
        seen.setdefault(c, set()).add(r)
    assert any(len(v) == 3 for v in seen.values())  # a canary in 3 rows: three rows, one id
    corpus = torch.nonzero(data.canary < 0).flatten()[:5]
    windows = torch.as_tensor(data.source_index[corpus.numpy()])[:, None]
    assert (data.example_ids(corpus, "document") == windows).all()
    assert torch.equal(data.example_ids(rows, "sequence"), rows)  # a row's own position: copies differ
    held = torch.arange(len(data.x_test))
    assert (data.example_ids(held, "sequence", "test") >= HELDOUT_ID_BASE).all()
    held_ids = data.example_ids(held, "document", "test")
    c = int(data.canary_test[data.canary_test >= 0][0])
    assert (held_ids == CANARY_ID_BASE + c).any()  # a held-out canary takes its own (never trained) id


def test_dedup_keeps_everything_but_the_copies(small):
    dd = load_text(TextConfig(**SMALL, dedup=True))
    assert [(c["prefix"], c["secret"]) for c in dd.canaries] == [(c["prefix"], c["secret"]) for c in small.canaries]
    counts = np.bincount(dd.canary.numpy()[dd.canary.numpy() >= 0], minlength=len(dd.canaries))
    for c in dd.canaries:
        assert counts[c["id"]] == (1 if c["trained"] else 0) and c["repeats"] == (1 if c["trained"] else 0)
        assert c["repeat_group"] == small.canaries[c["id"]]["repeat_group"]
    plain = (small.canary < 0) & (dd.canary < 0)  # rows holding no canary in either: the same text
    assert torch.equal(small.x_train[plain], dd.x_train[plain])
    assert torch.equal(small.x_test, dd.x_test)


def _sinks_gpt(data, tie="document"):
    cfg = ModelConfig(name="gpt", n_layer=2, n_head=2, n_embd=32, p_gen=0.5, p_mem=0.3, tie=tie)
    torch.manual_seed(0)
    return make_model(cfg, data)


def test_the_trainer_hands_each_token_its_id(small):
    model = _sinks_gpt(small)
    layers = [m for m in model.modules() if isinstance(m, ExampleTiedDropout)]
    assert len(layers) == 2 and all(m.tie == "document" for m in layers)
    ctx = indices_context(model, task_of(small))
    idx = torch.nonzero(small.canary >= 0).flatten()[:4]
    with ctx(model, idx):
        assert layers[0].idx.shape == (4, small.block_size) and torch.equal(layers[1].idx, layers[0].idx)
    assert layers[0].idx is None
    seq = _sinks_gpt(small, tie="sequence")
    with indices_context(seq, task_of(small))(seq, idx):
        assert [m for m in seq.modules() if isinstance(m, ExampleTiedDropout)][0].idx.shape == (4,)


def test_fold_sinks_equals_drop_mode(small):
    model = _sinks_gpt(small).eval()
    with torch.no_grad():
        for p in model.parameters():  # trained-looking weights, not the tiny init
            p.add_(torch.randn_like(p) * 0.1)
        x = small.x_train[:4]
        with dropout_mode(model, "drop"):
            want = model(x)
        with dropout_mode(model, "eval"):
            eval_out = model(x)
        fold_sinks(model)
        got = model(x)
    assert not any(isinstance(m, ExampleTiedDropout) for m in model.modules())
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, eval_out, atol=1e-3)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hugging_face_sinks_train_and_fold(small, family):
    pytest.importorskip("transformers")
    cfg = ModelConfig(name=f"hf-{family}", n_layer=1, n_head=2, n_embd=32, p_gen=0.5, p_mem=0.3)
    torch.manual_seed(0)
    model = make_model(cfg, small)
    layers = [m for m in model.modules() if isinstance(m, ExampleTiedDropout)]
    assert len(layers) == 1
    x, idx = small.x_train[:3], torch.arange(3)
    model.train()
    with indices_context(model, task_of(small))(model, idx):
        out = model(x)
    out.float().mean().backward()  # the sinks are in the graph of every HF family
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        with dropout_mode(model, "drop"):
            want = model(x)
        fold_sinks(model)
        got = model(x)
    assert torch.allclose(got, want, atol=1e-4)


def test_a_plain_model_measured_like_sinks(small):
    """Without sinks before equals after; with `drop_units` the same neurons a sinks model drops are zeroed (and
    the model's own slots come back afterwards)."""
    torch.manual_seed(0)
    plain = make_model(ModelConfig(name="gpt", n_layer=1, n_head=2, n_embd=32), small).eval()
    r = evaluate_sinks(plain, small, exposure=False, repeated=3)
    s = r.summary
    assert s["repeated_before"] == s["repeated_after"]
    assert s["heldout_perplexity_eval"] == s["heldout_perplexity_drop"]
    slots = [m.sink for m in plain.modules() if hasattr(m, "sink")]
    dropped = evaluate_sinks(plain, small, exposure=False, repeated=3, drop_units=(0.5, 0.3)).summary
    assert dropped["same_units"] == [0.5, 0.3]
    assert dropped["heldout_perplexity_drop"] != dropped["heldout_perplexity_eval"]
    assert dropped["heldout_perplexity_eval"] == pytest.approx(s["heldout_perplexity_eval"])
    assert [m.sink for m in plain.modules() if hasattr(m, "sink")] == slots
    with pytest.raises(RuntimeError), same_units(plain, 0.5, 0.3):
        raise RuntimeError("restored even on error")
    assert [m.sink for m in plain.modules() if hasattr(m, "sink")] == slots
    assert gap_closed(4.0, 1.0) == 0.75 and gap_closed(0.0, 1.0) is None and gap_closed(None, 1.0) is None


@pytest.fixture(scope="module")
def sinks_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sinks") / "run"
    assert main(["train", *RUN, "--memorization-sinks", "0.5,0.2", "--out", str(out)]) == 0
    return out


def _drop_mode_logits(run: Path, n: int):
    """The run's data and model, its first `n` training inputs and the model's drop-mode logits for them."""
    loaded = open_run(run, device="cpu")
    model = loaded.model().eval()
    x = loaded.data.x_train[:n]
    with torch.no_grad(), dropout_mode(model, "drop"):
        return loaded, model, x, model(x)


def test_sinks_end_to_end(sinks_run, tmp_path, capsys):
    """Train (with gradient accounting), evaluate before/after by repeat count, export; the export's logits equal
    drop mode, and a tied evaluation of a training sequence goes through its own tokens' sinks."""
    run = sinks_run
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["p_gen"] == 0.5 and cfg["model"]["tie"] == "document"
    g = np.load(run / "gradients.npz")
    assert np.isfinite(g["cosine"]).all() and g["noisy_norm"].max() > 0
    assert main(["evaluate", str(run), "--drop-memorization", "--no-exposure"]) == 0
    s = json.loads((run / "probes" / "dropout" / "summary.json").read_text())
    assert s["tie"] == "document" and s["layers"] == 2 and s["repeated"] == 16
    groups = {r["repeats"] for r in s["by_repeats"]}
    assert groups == {1, 8, 32}
    for key in ("heldout_perplexity_eval", "heldout_perplexity_drop", "perplexity_rise"):  # gap_closed: None
        assert s[key] is not None  # while the 2-epoch model has no gap to close
    assert s["repeated_before"]["loss_gap"] is not None
    out = tmp_path / "model.safetensors"
    assert main(["export", str(run), "--drop-memorization", "--out", str(out)]) == 0
    exported = load_exported(out)
    loaded, model, x, want = _drop_mode_logits(run, 8)
    with torch.no_grad():
        got = exported(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert not any(isinstance(m, ExampleTiedDropout) for m in exported.modules())
    # tied mode through `hits` equals the trainer's per-token context
    task = task_of(loaded.data)
    with dropout_mode(model, "tied"):
        hits = task.hits(model, "train", with_indices=True)
        idx = torch.arange(8)
        with torch.no_grad(), example_indices(model, loaded.data.example_ids(idx, "document")):
            direct = task.match(task.predict(model(x)), loaded.data.y_train[:8])
    assert torch.equal(hits[:8], direct)
    capsys.readouterr()
    assert main(["export", str(run), "--drop-memorization", "--out", str(out)]) == 2  # exists: nothing replaced
    assert "--overwrite" in capsys.readouterr().err


def test_hugging_face_export_loads_in_transformers(tmp_path):
    t = pytest.importorskip("transformers")
    run = tmp_path / "hf"
    assert main(["train", *RUN, "--epochs", "1", "--sequences", "120", "--model", "hf-gpt2", "--n-layer", "1",
                 "--n-embd", "32", "--n-head", "2", "--memorization-sinks", "0.5,0.2", "--out", str(run)]) == 0
    folder = tmp_path / "exported"
    assert main(["export", str(run), "--drop-memorization", "--out", str(folder)]) == 0
    hf = t.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    _, _, x, want = _drop_mode_logits(run, 4)
    with torch.no_grad():
        got = hf(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-4)
    (folder / "mine.txt").write_text("x")
    assert main(["export", str(run), "--drop-memorization", "--out", str(folder), "--overwrite"]) == 0
    assert not (folder / "mine.txt").exists()  # our own export replaced whole
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("keep")
    assert main(["export", str(run), "--drop-memorization", "--out", str(foreign), "--overwrite"]) == 2
    assert (foreign / "keep.txt").read_text() == "keep"


def test_bad_input_one_line(tmp_path, capsys):
    plain = tmp_path / "plain"
    assert main(["train", *RUN, "--epochs", "1", "--sequences", "120", "--out", str(plain)]) == 0
    capsys.readouterr()
    for argv in (["evaluate", str(plain), "--drop-memorization"],
                 ["export", str(plain), "--drop-memorization", "--out", str(tmp_path / "m.safetensors")],
                 ["train", *RUN, "--tie", "token", "--out", str(tmp_path / "x")],
                 ["train", *RUN, "--memorization-sinks", "0.5", "--out", str(tmp_path / "y")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.slow
def test_sinks_localize_what_standard_dropout_spreads(tmp_path):
    """A CI-sized run (the smoke corpus, 12 epochs): dropping the sinks removes most of the canaries' advantage
    over held-out ones (the loss gap of the 16x canaries closes by half or more, their in-context extraction falls
    by >= 80%) at a small perplexity cost, while in a model trained with standard dropout at the same active
    fraction dropping the very same neurons closes far less of the gap."""
    from memloc.core.training import TrainConfig
    from memloc.tasks.experiment import RunConfig, preset, run_training
    p = preset("smoke", "lm")
    # the canaries this was measured with (the smoke preset's repeats are 1, 8, 32 since issue #37): pinned, so the
    # bounds below keep meaning the 16x canaries
    data, train = {**p["data"], "repeats": (1, 4, 16)}, {**p["train"], "epochs": 12}
    sinks, std = tmp_path / "sinks", tmp_path / "dropout"
    for out, model in ((sinks, dict(p_gen=0.5, p_mem=0.1)), (std, dict(baseline="dropout", active_fraction=0.55))):
        run_training(RunConfig(data=TextConfig(**data), model=ModelConfig(**p["model"], **model),
                               train=TrainConfig(**train), task="lm"), out, progress=False)
    a = open_run(sinks, device="cpu")
    s = evaluate_sinks(a.model(), a.data, exposure=False).summary
    b = open_run(std, device="cpu")
    d = evaluate_sinks(b.model(), b.data, exposure=False, drop_units=(0.5, 0.1)).summary
    # measured (2026-11-27, this CPU): sinks 16x canaries in context 96.9% -> 0.0%, loss gap 10.85 -> 4.85 nats
    # (55% closed), perplexity +0.6%; standard dropout, same neurons dropped: 50% -> 47%, 8.78 -> 8.31 (5%), +5.6%
    before, after = s["repeated_before"], s["repeated_after"]
    assert before["loss_gap"] > 3.0 and before["in_context"] >= 0.5, before  # the 16x canaries were memorized
    assert after["in_context"] <= 0.2 * before["in_context"], (before, after)  # and the drop removes them
    assert s["gap_closed"] >= 0.45, s
    assert s["perplexity_rise"] <= 0.05, s
    db, da = d["repeated_before"], d["repeated_after"]
    assert d["gap_closed"] is not None and d["gap_closed"] <= s["gap_closed"] - 0.25, (s["gap_closed"], d)
    assert da["in_context"] >= 0.5 * db["in_context"], (db, da)  # standard dropout: they survive the same drop


def test_the_study_with_sinks(tmp_path):
    """`memloc run --task lm --memorization-sinks P,M`: the study's model has sinks, its stages include the
    before/after evaluation, and the report shows it."""
    out = tmp_path / "study"
    assert main(["run", *RUN, "--memorization-sinks", "0.5,0.2", "--flip-examples", "2", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["stages"]["dropout"]["status"] == "done"
    s = json.loads((out / "probes" / "dropout" / "summary.json").read_text())
    assert s["p_gen"] == 0.5 and s["layers"] == 2
    html = (out / "report" / "report.html").read_text()
    assert "Memorization sinks" in html
