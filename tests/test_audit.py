"""`memloc audit`: a GPT-2 trained outside memloc (a plain transformers loop in the test, on text in which some
sequences repeat many times) and the user's sequences: the audit finds the repeated ones, membership scores
separate members from non-members, and the run works with localize and export like any other."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from toys import assert_one_line_error, bpe_tokenizer, digest, train_plainly

from memloc.cli import main

transformers = pytest.importorskip("transformers")

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there all one their we been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such like "
         "our over man me even most made after also did many before must through back years where much your way "
         "well down should because each just those people how too little state good very make world still own see "
         "men work long get here between both life being under never day same another know while last might us "
         "great old year off come since against go came right used take three").split()


def _sentence(rng: random.Random, n: int = 14) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A 2-block GPT-2 (BPE of its own) trained by plain transformers for 12 epochs on 150 random sentences, 10
    sentences repeated 20 times each and 10 seen once; 10 more never seen. About 15 s on 2 cores."""
    root = tmp_path_factory.mktemp("audit")
    rng = random.Random(0)
    repeated = [_sentence(rng) for _ in range(10)]
    once = [_sentence(rng) for _ in range(10)]
    never = [_sentence(rng) for _ in range(10)]
    corpus = [_sentence(rng) for _ in range(150)] + repeated * 20 + once
    rng.shuffle(corpus)
    tok = bpe_tokenizer(corpus + never, 500)
    eos = tok.eos_token_id
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=48, n_layer=2, n_head=4, n_embd=64,
                                  bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)

    def save_early(epoch: int) -> None:
        if epoch in (1, 4):  # earlier training states, as a Pythia-style suite keeps them
            model.save_pretrained(str(root / f"step{epoch}"))
    train_plainly(model, tok, corpus, epochs=12, rng=rng, before_epoch=save_early)
    model.save_pretrained(str(root / "model"))
    tok.save_pretrained(str(root / "model"))
    seqs = root / "seqs.jsonl"
    seqs.write_text("".join(json.dumps({"text": t, "member": m}) + "\n"
                            for t, m in [(t, True) for t in repeated + once] + [(t, False) for t in never]))
    out = root / "run"
    assert main(["audit", f"hf:{root / 'model'}", "--sequences", str(seqs), "--out", str(out), "--quiet",
                 "--checkpoints", f"hf:{root / 'step1'},{root / 'step4'}"]) == 0
    return {"root": root, "model": root / "model", "seqs": seqs, "run": out, "repeated": repeated, "once": once,
            "never": never}


def _rows(run: Path) -> list[dict]:
    import csv
    return list(csv.DictReader((run / "probes" / "memorization" / "memorization.csv").open()))


def test_the_audit_finds_the_repeated_sequences_and_not_the_others(trained):
    rows = _rows(trained["run"])
    assert len(rows) == 30
    extracted = [r["extracted"] == "True" for r in rows]
    assert sum(extracted[:10]) >= 8  # repeated 20 times
    assert sum(extracted[20:]) == 0  # never seen
    assert sum(extracted[10:20]) <= 3  # seen once
    s = json.loads((trained["run"] / "probes" / "memorization" / "summary.json").read_text())
    assert set(s["membership"]) == {"loss", "zlib", "min_k", "min_k_pp"}
    loss = np.array([float(r["mi_loss"]) for r in rows])
    from memloc.tasks.lm.membership import _auroc
    assert _auroc(-loss[:10], -loss[20:]) > 0.9  # repeated members against non-members
    assert s["membership"]["loss"]["members"] == 20 and s["membership"]["loss"]["non_members"] == 10
    info = json.loads((trained["run"] / "audit.json").read_text())
    assert info["model"] == str(trained["model"].resolve()) and "model.safetensors" in info["sha256"]
    assert not (trained["run"] / "checkpoints").exists()  # referenced, not copied


def test_localize_and_export_work_on_an_audit_and_the_export_loads_in_transformers(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    assert main(["localize", str(run), "--method", "activations", "--quiet"]) == 0
    out = tmp_path / "edited"
    assert main(["export", str(run), "--localized", "--out", str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert model(input_ids=ids).logits.shape == (1, 4, model.config.vocab_size)


def test_the_removal_takes_the_extracted_sequences_out_at_a_bounded_cost_and_the_edited_folder_is_what_was_measured(
        trained):
    """The audit's removal stage: the edit grows until at most 10% of the targeted sequences are extracted, at no
    more than 5% held-out perplexity; the exported folder, loaded by plain transformers with its tokenizer, gives
    the scoped edit's logits, and the scan of that folder agrees with the localization's own measure."""
    run = trained["run"]
    s = json.loads((run / "probes" / "removal" / "summary.json").read_text())
    assert s["targeted"] >= 8 and s["targeted_extracted_before"] == 1.0
    assert s["targeted_extracted_after"] <= 0.1 and s["reached"] is True
    assert s["perplexity_cost"] is not None and s["perplexity_cost"] <= 0.05
    assert 0 < s["zeroed"] < s["units"] and [r["k"] for r in s["sweep"]][:2] == [0, 6]  # doubled from 1%
    loc = json.loads((run / "probes" / "localize" / "summary.json").read_text())
    assert loc["extracted_after"] == s["targeted_extracted_after"]  # the folder read back = the scoped edit
    assert s["membership"]["loss"]["auroc_before"] is not None and s["membership"]["loss"]["auroc_after"] is not None
    from memloc.probes.base import ProbeResult
    from memloc.probes.localization import edited
    from memloc.tasks.experiment import open_run
    loaded = open_run(run)
    model = loaded.model()
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(run / "edited"), local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(str(run / "edited"), local_files_only=True)
    ids = torch.tensor([tok.encode(trained["repeated"][0])])
    with edited(model, ProbeResult.load(loaded.run, "localize")), torch.no_grad():
        scoped = model(ids)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, scoped, atol=1e-4)
    rows = list(__import__("csv").DictReader((run / "probes" / "removal" / "removal.csv").open()))
    assert len(rows) == 30 and sum(r["targeted"] == "True" for r in rows) == s["targeted"]
    page = (run / "report" / "report.html").read_text()
    assert "which sequences the model memorizes, and where" in page and "removal (ig" in page


def test_checkpoints_say_when_each_sequence_became_extractable_and_rewind_every_layer(trained):
    """Two earlier states of the test's training (after 1 and 4 of 12 epochs): the repeated sequences are extracted
    more the later the state, each row says when a sequence was first extracted, and rewinding sweeps every layer
    of the audited model back to each state (the audited model itself last, where nothing changes)."""
    run = trained["run"]
    s = json.loads((run / "probes" / "history" / "summary.json").read_text())
    assert [c["epoch"] for c in s["checkpoints"]] == [1, 2, 3]
    assert s["extracted"][0] < s["extracted"][2] and s["extracted"][2] == 0.5
    rows = list(__import__("csv").DictReader((run / "probes" / "history" / "history.csv").open()))
    assert all(r["first_extracted"] in ("1", "2", "3") for r in rows[:10] if r["extracted_3"] == "True")
    rw = json.loads((run / "probes" / "rewinding" / "summary.json").read_text())
    assert rw["epochs"] == [1, 2, 3] and len(rw["layers"]) >= 4
    acc = np.load(run / "probes" / "rewinding" / "arrays.npz")["accuracy"]  # (layers, epochs, subsets)
    canary = rw["subsets"].index("canary_train")
    assert np.allclose(acc[:, -1, canary], rw["final"]["canary_train_acc"])  # rewound to itself: unchanged
    assert acc[:, 0, canary].min() < rw["final"]["canary_train_acc"]  # some layer carries what was learned since


def test_an_audit_that_cannot_fit_is_refused_before_anything_is_written(trained, tmp_path, capsys, monkeypatch):
    from memloc.core import budget
    monkeypatch.setattr(budget, "free_memory", lambda device: 50_000_000)
    out = tmp_path / "run"
    argv = ["audit", f"hf:{trained['model']}", "--sequences", str(trained["seqs"]), "--out", str(out), "--quiet"]
    assert_one_line_error(main(argv), capsys.readouterr().err, "this audit needs about", "--batch-size", "--force")
    assert not out.exists()
    shape = budget.folder_shape(trained["model"], block=48)
    small = budget.audit_need(shape, batch=16, length=48)
    more = budget.audit_need(shape, batch=16, length=48, checkpoints=2, reference=shape)
    assert more.parts["checkpoints"] == 3 * 4 * shape["params"] and more.parts["model"] == 2 * small.parts["model"]
    assert budget.audit_need(shape, batch=64, length=48).parts["batches"] > small.parts["batches"]


def test_checkpoints_of_another_architecture_are_refused_in_one_line(trained, tmp_path, capsys):
    cfg = transformers.GPT2Config.from_pretrained(str(trained["model"]), local_files_only=True)
    cfg.n_layer = 1
    other = tmp_path / "other"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(other))
    capsys.readouterr()  # transformers' own bar
    out = tmp_path / "run"
    code = main(["audit", f"hf:{trained['model']}", "--sequences", str(trained["seqs"]), "--out", str(out),
                 "--checkpoints", str(other), "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, f"checkpoint {other}", "architecture")
    assert not out.exists()


def test_an_audit_without_removal_writes_no_edit(trained, tmp_path):
    out = tmp_path / "run"
    assert main(["audit", f"hf:{trained['model']}", "--sequences", str(trained["seqs"]), "--out", str(out),
                 "--no-remove", "--quiet"]) == 0
    assert not (out / "edited").exists() and not (out / "probes" / "removal").exists()


def test_a_bf16_audit_finds_what_the_fp32_audit_finds_and_edits_float32_weights(trained, token_run, tmp_path):
    """--precision bf16: the scan and the removal compute under bf16 autocast (the fixture's model, 64 wide, is below
    auto's bf16 width, so the fixture's audit is fp32 on any CPU): the same sequences extracted, losses within bf16's
    rounding yet not equal (the arithmetic did change), the setting recorded in the run; the edit and the exported
    folder are float32, within the perplexity bound. The models the audit loads itself (the edited folder read back,
    the checkpoints) and a token file's streaming scan compute in the same arithmetic."""
    from safetensors import safe_open
    out = tmp_path / "run"
    root = trained["root"]
    assert main(["audit", f"hf:{trained['model']}", "--sequences", str(trained["seqs"]), "--out", str(out),
                 "--precision", "bf16", "--checkpoints", f"hf:{root / 'step1'},{root / 'step4'}", "--quiet"]) == 0
    want, got = _rows(trained["run"]), _rows(out)
    assert [r["extracted"] for r in got] == [r["extracted"] for r in want]
    loss = {k: np.array([float(r["loss"]) for r in rows]) for k, rows in (("fp32", want), ("bf16", got))}
    assert not np.array_equal(loss["fp32"], loss["bf16"])
    assert np.abs(loss["fp32"] - loss["bf16"]).max() < 0.05 * loss["fp32"].max()
    assert json.loads((out / "config.json").read_text())["train"]["precision"] == "bf16"
    s = json.loads((out / "probes" / "removal" / "summary.json").read_text())
    assert s["perplexity_cost"] is not None and s["perplexity_cost"] <= 0.05
    with safe_open(str(out / "edited" / "model.safetensors"), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F32"}
    # the models the audit loads itself (the edited folder read back, each checkpoint) are measured in the run's
    # bf16 too, not in what "auto" would choose for them (fp32 at this width)
    from memloc.core.precision import Arithmetic, arithmetic
    from memloc.probes.memorization import MemorizationConfig, canary_measures
    from memloc.tasks.experiment import open_run
    from memloc.tasks.lm.hf import load_hf
    data = open_run(out).data

    def losses(folder, bf16: bool, membership: bool) -> np.ndarray:
        with arithmetic(Arithmetic(bf16=bf16, channels_last=False)):
            m = canary_measures(load_hf(folder).eval(), data, MemorizationConfig(exposure=False, prefix_lengths=()),
                                membership=membership)
        return np.asarray(m["loss"], dtype=np.float64)
    for recorded, folder, membership in (
            (np.load(out / "probes" / "removal" / "arrays.npz")["loss_after"], out / "edited", True),
            (np.load(out / "probes" / "history" / "arrays.npz")["loss"][:, 0], root / "step1", False)):
        in_bf16 = np.abs(recorded - losses(folder, True, membership)).max()
        in_fp32 = np.abs(recorded - losses(folder, False, membership)).max()
        assert in_bf16 < 1e-5 < in_fp32, folder.name
    stream = tmp_path / "stream"
    assert main(["audit", f"hf:{trained['model']}", "--sequences", str(token_run["root"] / "toks.bin"),
                 "--out", str(stream), "--chunk", "8", "--no-remove", "--precision", "bf16", "--quiet"]) == 0
    fp32_scan, bf16_scan = _scan_rows(token_run["run"]), _scan_rows(stream)
    assert [r["extracted"] for r in bf16_scan] == [r["extracted"] for r in want]
    streamed = np.array([float(r["loss"]) for r in bf16_scan])
    assert not np.array_equal(streamed, np.array([float(r["loss"]) for r in fp32_scan]))
    assert np.abs(streamed - loss["bf16"]).max() < 0.05 * loss["bf16"].max()


def test_an_audit_killed_after_localizing_resumes_to_the_same_removal(trained, tmp_path, capsys):
    """A real SIGKILL right after the removal's localization is saved; `memloc audit --resume RUN` keeps the scan,
    redoes the rest and ends where the uninterrupted audit ended. A flag that would change it is refused."""
    import os
    import subprocess
    import sys
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent / "src"), str(here)])}
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, str(here / "fault_driver.py"), "stage:localize", "--", "audit",
                             f"hf:{trained['model']}", "--sequences", str(trained["seqs"]), "--out", str(out),
                             "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert killed.returncode != 0 and (out / "probes" / "localize" / "summary.json").exists()
    assert not (out / "probes" / "removal").exists()
    code = main(["audit", "--resume", str(out), "--until", "0.5"])
    assert_one_line_error(code, capsys.readouterr().err, "--resume", "--until")
    assert main(["audit", "--resume", str(out), "--quiet"]) == 0
    assert "the scan is done: kept" in capsys.readouterr().out
    want = json.loads((trained["run"] / "probes" / "removal" / "summary.json").read_text())
    got = json.loads((out / "probes" / "removal" / "summary.json").read_text())
    assert got == want
    assert (out / "edited" / "model.safetensors").read_bytes() == \
        (trained["run"] / "edited" / "model.safetensors").read_bytes()


def test_the_removal_measures_the_extracted_sequences_it_did_not_target(trained, tmp_path):
    out = tmp_path / "run"
    assert main(["audit", f"hf:{trained['model']}", "--sequences", str(trained["seqs"]), "--out", str(out),
                 "--examples", "3", "--method", "zero-out", "--quiet"]) == 0
    s = json.loads((out / "probes" / "removal" / "summary.json").read_text())
    assert s["targeted"] == 3 and s["other_memorized"] >= 5 and s["method"] == "zero-out"
    assert s["other_memorized_extracted_after"] is not None and s["targeted_extracted_after"] <= 0.1


def test_an_audit_refuses_a_model_changed_since(trained, tmp_path, capsys):
    model, run = tmp_path / "model", tmp_path / "run"
    shutil.copytree(trained["model"], model)
    shutil.copytree(trained["run"], run)
    info = json.loads((run / "audit.json").read_text())
    info["model"] = str(model)
    (run / "audit.json").write_text(json.dumps(info))
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["name"] = f"hf:{model}"
    (run / "config.json").write_text(json.dumps(cfg))
    assert main(["memorization", str(run), "--quiet", "--no-exposure"]) == 0  # the same files: fine
    weights = model / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    code = main(["memorization", str(run), "--quiet", "--no-exposure"])
    assert_one_line_error(code, capsys.readouterr().err, "no longer holds the model", str(model))


@pytest.mark.parametrize("content,words", [
    ("", ["holds no sequence"]),
    ('{"text": "a b c d"}\n{broken\n', ["line 2", "not JSON"]),
    ('{"text": "a b c d", "member": "yes"}\n', ["line 1", "member"]),
    ('{"text": "a b", "ids": [1, 2]}\n', ["line 1", "exactly one"]),
    ('{"ids": [1, -2, 3]}\n', ["line 1", "ids"]),
    ('{"text": "a"}\n', ["line 1", "prefix and a suffix"]),
    ('{"prefix": "a b", "suffix": ""}\n', ["line 1", "both non-empty"]),
    ('{"text": "a b c d", "member": false}\n', ["known non-member"]),
])
def test_bad_sequences_files_are_one_line_and_write_nothing(trained, tmp_path, capsys, content, words):
    seqs = tmp_path / "s.jsonl"
    seqs.write_text(content)
    out = tmp_path / "run"
    code = main(["audit", f"hf:{trained['model']}", "--sequences", str(seqs), "--out", str(out), "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, *words)
    assert not out.exists()


def test_long_sequences_are_cut_with_a_line_or_refused(trained, tmp_path, capsys):
    seqs = tmp_path / "s.txt"
    seqs.write_text(" ".join(["the"] * 200) + "\n" + trained["repeated"][0] + "\n")
    code = main(["audit", f"hf:{trained['model']}", "--sequences", str(seqs), "--out", str(tmp_path / "a"),
                 "--quiet", "--no-truncate"])
    assert_one_line_error(code, capsys.readouterr().err, "line 1", "context of 48")
    assert main(["audit", f"hf:{trained['model']}", "--sequences", str(seqs), "--out", str(tmp_path / "b"),
                 "--quiet", "--no-remove"]) == 0
    assert "1 sequences longer than the model's context of 48 tokens" in capsys.readouterr().out


def test_a_tokenizer_larger_than_the_model_is_refused(trained, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(trained["repeated"] * 50, trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tk.add_tokens([f"tok{i}" for i in range(1000)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>").save_pretrained(
        str(tmp_path / "tok"))
    before = digest(trained["root"])
    code = main(["audit", f"hf:{trained['model']}", "--sequences", str(trained["seqs"]), "--tokenizer",
                 f"hf:{tmp_path / 'tok'}", "--out", str(tmp_path / "run"), "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, "token ids", "tokenizer")
    assert not (tmp_path / "run").exists() and digest(trained["root"]) == before


def test_sequences_of_unknown_membership_are_scored_with_no_attack_quality(trained, tmp_path, capsys):
    """A .txt of sequences: membership unknown, no held-out text: extraction per sequence, no AUROC, no
    perplexity — said so, not invented."""
    seqs = tmp_path / "s.txt"
    seqs.write_text("\n".join(trained["repeated"][:3] + trained["never"][:3]) + "\n\n")
    out = tmp_path / "run"
    assert main(["audit", f"hf:{trained['model']}", "--sequences", str(seqs), "--out", str(out), "--quiet"]) == 0
    s = json.loads((out / "probes" / "memorization" / "summary.json").read_text())
    assert s["heldout_perplexity"] is None and s["membership"]["loss"]["auroc"] is None
    assert "not enough data" in s["membership"]["loss"]["reason"]
    rows = _rows(out)
    assert [r["extracted"] for r in rows][3:] == ["False"] * 3 and [r["member"] for r in rows] == [""] * 6
    said = capsys.readouterr().out
    assert "held-out perplexity -" in said
    assert "no held-out text, so the edit's perplexity cost is not measured: pass --heldout FILE" in said
    assert json.loads((out / "probes" / "removal" / "summary.json").read_text())["perplexity_cost"] is None


# --- a token file too large to read: scanned streaming (memloc.audit.scan) -----------------------------------------

@pytest.fixture(scope="module")
def token_run(trained, tmp_path_factory) -> dict:
    """The fixture's 30 sequences, the very ids its .jsonl audit scored, written as nanoGPT writes tokens (a uint16
    .bin, an index of offsets, bool member labels beside it), audited streaming in chunks of 8 without removal."""
    root = tmp_path_factory.mktemp("tokens")
    cans = json.loads(str(np.load(trained["run"] / "data.npz")["canaries"]))
    ids = [c["prefix_ids"] + c["secret_ids"] for c in cans]
    members = np.array([c["member"] for c in cans], dtype=bool)
    np.concatenate(ids).astype(np.uint16).tofile(root / "toks.bin")
    np.save(root / "toks.idx.npy", np.cumsum([0] + [len(s) for s in ids]).astype(np.int64))
    np.save(root / "toks.member.npy", members)
    out = root / "run"
    assert main(["audit", f"hf:{trained['model']}", "--sequences", str(root / "toks.bin"), "--out", str(out),
                 "--chunk", "8", "--no-remove", "--quiet"]) == 0
    return {"root": root, "ids": ids, "members": members, "run": out}


def _scan_rows(run: Path) -> list[dict]:
    import csv
    return list(csv.DictReader((run / "probes" / "scan" / "scan.csv").open()))


def test_a_token_file_gives_the_same_results_as_the_sequences_file(trained, token_run):
    """Scanned in 4 chunks, each sequence's row equals its row in the .jsonl audit; the run keeps all 30 (fewer than
    --keep), so its own memorization scan is the .jsonl audit's, each sequence's line number now its index."""
    want, scan = _rows(trained["run"]), _scan_rows(token_run["run"])
    assert [r["index"] for r in scan] == [str(i) for i in range(30)] and all(r["kept"] == "True" for r in scan)
    for a, b in zip(want, scan):
        assert [a[k] for k in a if k.startswith("extracted") or k == "member"] == \
            [b[k] for k in a if k.startswith("extracted") or k == "member"]
        for k in ("suffix_accuracy", "loss", "mi_loss", "mi_zlib", "mi_min_k", "mi_min_k_pp"):
            assert float(a[k]) == pytest.approx(float(b[k]), abs=2e-5), k
    got = _rows(token_run["run"])
    assert [r.pop("index") for r in got] == [str(i) for i in range(30)]
    assert got == [{k: v for k, v in r.items() if k != "line"} for r in want]
    s = json.loads((token_run["run"] / "probes" / "scan" / "summary.json").read_text())
    assert (s["sequences"], s["members"], s["non_members"], s["kept"]) == (30, 20, 10, 30)
    mem = json.loads((trained["run"] / "probes" / "memorization" / "summary.json").read_text())["membership"]
    assert s["membership"]["loss"]["auroc"] == mem["loss"]["auroc"]
    assert not (token_run["run"] / "probes" / "scan" / "parts").exists()  # joined into arrays.npz
    assert "The whole token file" in (token_run["run"] / "report" / "report.html").read_text()


def test_a_2d_npy_a_stream_with_an_index_and_windows_of_a_stream_are_the_same_sequences(trained, token_run, tmp_path):
    from memloc.audit.scan import measure_chunk
    from memloc.probes.memorization import MemorizationConfig
    from memloc.tasks.lm.hf import load_hf
    from memloc.tasks.lm.sequences import open_tokens
    from memloc.tasks.lm.tokenizers import make_tokenizer
    rows = np.array([s[:12] for s in token_run["ids"]], dtype=np.int32)  # (30, 12)
    np.save(tmp_path / "rows.npy", rows)
    np.save(tmp_path / "flat.npy", rows.reshape(-1).astype(np.int64))
    np.save(tmp_path / "flat.idx.npy", np.arange(0, rows.size + 1, 12))
    rows.reshape(-1).astype(np.uint16).tofile(tmp_path / "win.bin")
    tok, model = make_tokenizer(f"hf:{trained['model']}"), load_hf(trained["model"]).eval()
    got = []
    for name, length in (("rows.npy", None), ("flat.npy", None), ("win.bin", 12)):
        tf = open_tokens(tmp_path / name, vocab_size=tok.vocab_size, sequence_length=length, block=47)
        assert len(tf) == 30 and tf.sequences(3, 5) == rows[3:5].tolist() and tf.members(0, 2) == [None, None]
        got.append(measure_chunk(model, tf, 0, 30, tok, MemorizationConfig(exposure=False), suffix_tokens=50,
                                 block=47))
    for other in got[1:]:
        for k, v in got[0].items():
            np.testing.assert_array_equal(v, other[k], err_msg=k)
    assert (got[0]["prefix_tokens"] == 6).all() and got[0]["extracted"].dtype == bool


def _bad_tokens(d: Path, case: str) -> tuple[Path, list[str]]:
    """A bad token file of each kind, and the flags it is audited with."""
    good = np.arange(1, 41, dtype=np.int64)
    if case in ("dtype", "negative", "vocabulary", "object"):
        arr = {"dtype": np.ones((4, 8), np.float32), "negative": np.array([[1, 2, 3, -4]] * 3, np.int32),
               "vocabulary": np.array([[1, 2, 3, 4]] * 3 + [[1, 2, 3, 9999]], np.int32),
               "object": np.array([[1, 2]], dtype=object)}[case]
        np.save(d / "t.npy", arr, allow_pickle=True)
        return d / "t.npy", []
    if case in ("decreasing", "past-end", "no-index"):
        np.save(d / "t.npy", good)
        if case != "no-index":
            np.save(d / "t.idx.npy", np.array([0, 10, 5, 20] if case == "decreasing" else [0, 10, 41]))
        return d / "t.npy", []
    if case == "labels":
        np.save(d / "t.npy", good.reshape(5, 8))
        np.save(d / "t.member.npy", np.array([True, False]))
        return d / "t.npy", []
    if case == "odd-bin":
        (d / "t.bin").write_bytes(b"\x01\x00\x02")
        return d / "t.bin", []
    good.astype(np.uint16).tofile(d / "t.bin")  # "windows": fewer tokens than one window
    return d / "t.bin", ["--sequence-length", "64"]


@pytest.mark.parametrize("case,words", [
    ("dtype", ["t.npy", "dtype float32", "integers"]), ("negative", ["token id -4 of sequence 0", "negative"]),
    ("vocabulary", ["token id 9999 of sequence 3", "vocabulary"]), ("object", ["t.npy", "memory-map"]),
    ("decreasing", ["t.idx.npy", "sequence 1", "not increasing"]), ("past-end", ["t.idx.npy", "past the 40 tokens"]),
    ("no-index", ["t.idx.npy", "--sequence-length"]), ("labels", ["t.member.npy", "one label per sequence"]),
    ("odd-bin", ["t.bin", "uint16"]), ("windows", ["t.bin", "fewer than one window of 64"]),
])
def test_bad_token_files_are_one_line_and_write_nothing(trained, tmp_path, capsys, case, words):
    path, flags = _bad_tokens(tmp_path, case)
    out = tmp_path / "run"
    code = main(["audit", f"hf:{trained['model']}", "--sequences", str(path), "--out", str(out), "--quiet", *flags])
    assert_one_line_error(code, capsys.readouterr().err, *words)
    assert not out.exists()


def test_an_interrupted_token_scan_resumes_from_its_saved_chunks(trained, token_run, tmp_path, capsys, monkeypatch):
    """Interrupted after its second chunk, the scan resumes with the two others only, refuses a token file changed
    meanwhile, and ends with the uninterrupted scan's rows; with --keep 5 the run keeps the extracted sequences and
    5 others."""
    from memloc.audit import scan as audit_scan
    save, saved, stop = audit_scan._save_part, [], [2]

    def save_then_stop(parts, k, arrays):
        save(parts, k, arrays)
        saved.append(k)
        if len(saved) == stop[0]:
            raise KeyboardInterrupt
    monkeypatch.setattr(audit_scan, "_save_part", save_then_stop)
    out = tmp_path / "run"
    assert main(["audit", f"hf:{trained['model']}", "--sequences", str(token_run["root"] / "toks.bin"), "--out",
                 str(out), "--chunk", "8", "--keep", "5", "--no-remove", "--quiet"]) == 130
    capsys.readouterr()
    assert sorted(p.name for p in (out / "probes" / "scan" / "parts").iterdir()) == ["000000.npz", "000001.npz"]
    labels = token_run["root"] / "toks.member.npy"
    before = labels.read_bytes()
    np.save(labels, ~token_run["members"])
    try:
        code = main(["audit", "--resume", str(out), "--quiet"])
    finally:
        labels.write_bytes(before)
    assert_one_line_error(code, capsys.readouterr().err, "not the token file this audit started on")
    saved.clear()
    stop[0] = 0
    assert main(["audit", "--resume", str(out), "--quiet"]) == 0
    assert saved == [2, 3]
    got, want = _scan_rows(out), _scan_rows(token_run["run"])
    assert [{k: v for k, v in r.items() if k != "kept"} for r in got] == \
        [{k: v for k, v in r.items() if k != "kept"} for r in want]
    kept = [int(r["index"]) for r in got if r["kept"] == "True"]
    assert len(kept) == sum(r["extracted"] == "True" for r in got) + 5
    assert [json.loads(line)["index"] for line in (out / "sequences.jsonl").read_text().splitlines()] == kept
    assert [int(r["index"]) for r in _rows(out)] == kept


def test_each_sequence_is_measured_once_and_the_shortcut_gives_what_a_pass_gives(trained, monkeypatch, capsys):
    """An audit's rows each hold one sequence alone, so their in-context extraction is the sequence's extraction
    from its prefix: the memorization probe reads it instead of a second pass, and localize measures the rows
    before the edit once (its check's pass), not three times. Both checked against the passes they replace."""
    from memloc import probes
    from memloc.core.tasks import task_of
    from memloc.probes.localization import probe as loc_probe
    from memloc.tasks.experiment import open_run
    loaded = open_run(trained["run"], device="cpu")
    data, model = loaded.data, loaded.model(loaded.epochs()[-1])
    alone, owner = data.alone_rows()
    trained_rows = np.flatnonzero(data.canary.numpy() >= 0)
    assert len(alone) == len(trained_rows) == 20 and np.array_equal(alone, trained_rows)
    task = task_of(data)
    passes = []
    real = type(task).hits

    def counted(self, *a, **k):
        passes.append(k.get("rows"))
        return real(self, *a, **k)
    monkeypatch.setattr(type(task), "hits", counted)
    result = probes.run_probe(probes.registered()["memorization"], model, data,
                              cfg=probes.MemorizationConfig(exposure=False))
    assert [p is None or len(p) for p in passes] == [len(data.canary) - 20]  # only the rows of no sequence
    monkeypatch.undo()
    every = task.hits(model, "train", batch_size=64).numpy()  # the pass the shortcut replaces
    assert np.array_equal(every[alone], result.arrays["extracted"][owner])
    assert every[alone].sum() >= 8  # the repeated sequences: the identity is checked on extracted rows too

    counts = []
    real_hits = loc_probe._hits

    def counting(model, task, split, **k):
        counts.append(split)
        return real_hits(model, task, split, **k)
    monkeypatch.setattr(loc_probe, "_hits", counting)
    loc = probes.run_probe(loc_probe.PROBE, model, data, cfg=loc_probe.LocalizeConfig(method="activations"))
    assert counts.count("train") == 2  # the check's (which chooses the sequences and is the "before"), the edit's
    assert loc.summary["extracted_before"] == 1.0  # the chosen sequences, all extracted before the edit
    assert np.array_equal(loc.arrays["extracted_before"], every[loc.arrays["sequences"]])
