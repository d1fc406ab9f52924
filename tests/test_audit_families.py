"""`memloc audit` on the other families researchers audit: a GPT-NeoX (Pythia's) and a Llama folder trained by plain
transformers in the test. The GPT-2 case, with every stage's details, is tests/test_audit.py; here each family runs
the whole audit, removal included: it finds the repeated sequences and not the others, members score apart from
non-members, and the edit it exports (Llama's gated MLP, NeoX's parallel block) loads in transformers and gives the
edited model's logits."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from toys import bpe_tokenizer, train_plainly

from memloc.cli import main

transformers = pytest.importorskip("transformers")

WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue side "
         "kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force").split()


def _config(family: str, vocab: int, eos: int):
    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=256, max_position_embeddings=48, bos_token_id=eos, eos_token_id=eos)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(**common, rotary_pct=0.25), transformers.GPTNeoXForCausalLM
    return transformers.LlamaConfig(**common, num_key_value_heads=2), transformers.LlamaForCausalLM


@pytest.fixture(scope="module", params=["gpt_neox", "llama"])
def audited(request, tmp_path_factory) -> dict:
    """A 2-block model of the family (a BPE of its own) trained 10 epochs on 120 random sentences, 10 sentences
    repeated 20 times and 10 never seen (40 more unseen sentences are the held-out text); then `memloc audit` with
    its removal (ig, the edit grown until 10% are extracted within +5% perplexity)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    rng = random.Random(1)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(12))  # noqa: E731
    repeated, never = [sentence() for _ in range(10)], [sentence() for _ in range(10)]
    corpus = [sentence() for _ in range(120)] + repeated * 20
    rng.shuffle(corpus)
    tok = bpe_tokenizer(corpus + never, 400)
    cfg, cls = _config(family, len(tok), tok.eos_token_id)
    torch.manual_seed(0)
    model = cls(cfg)
    train_plainly(model, tok, corpus, epochs=10, rng=rng)
    model.save_pretrained(str(root / "model"))
    tok.save_pretrained(str(root / "model"))
    seqs = root / "seqs.jsonl"
    seqs.write_text("".join(json.dumps({"text": t, "member": m}) + "\n"
                            for t, m in [(t, True) for t in repeated] + [(t, False) for t in never]))
    heldout = root / "heldout.txt"
    heldout.write_text("".join(sentence() + "\n" for _ in range(40)))
    out = root / "run"
    assert main(["audit", f"hf:{root / 'model'}", "--sequences", str(seqs), "--heldout", str(heldout), "--out",
                 str(out), "--quiet"]) == 0
    return {"family": family, "model": root / "model", "run": out, "repeated": repeated, "never": never}


def test_the_audit_finds_the_repeated_sequences_of_each_family(audited):
    run = audited["run"]
    assert json.loads((run / "config.json").read_text())["model"]["name"].startswith("hf:")
    rows = list(csv.DictReader((run / "probes" / "memorization" / "memorization.csv").open()))
    assert len(rows) == 20
    extracted = [r["extracted"] == "True" for r in rows]
    assert sum(extracted[:10]) >= 8, audited["family"]  # repeated 20 times
    assert sum(extracted[10:]) == 0, audited["family"]  # never seen
    s = json.loads((run / "probes" / "memorization" / "summary.json").read_text())
    assert s["membership"]["loss"]["auroc"] >= 0.9


def test_each_familys_edit_loads_in_transformers_and_is_the_edit_measured(audited):
    """The removal runs on each family's MLP neurons (Llama's gated MLP, NeoX's parallel block): the edit it keeps
    respects the perplexity bound, the folder it exports loads in plain transformers and gives the scoped edit's
    logits. Whether it reaches the goal depends on the family, measured here (2 blocks, 4x MLP, 2-core CPU):
    Llama's sweep takes the targeted extraction 100% -> 20% at 96 of 512 neurons for -0.5% perplexity (0% at 192
    for +11%); NeoX's costs +3.9% at 6 neurons with nothing removed: its repeated sentences do not sit in a few MLP
    neurons (GPT-2 reaches the goal: tests/test_audit.py)."""
    run = audited["run"]
    s = json.loads((run / "probes" / "removal" / "summary.json").read_text())
    assert s["targeted"] >= 8 and s["targeted_extracted_before"] == 1.0
    assert s["perplexity_cost"] is not None and s["perplexity_cost"] <= 0.05
    within = [r["extracted"] for r in s["sweep"] if r["k"] > 0 and r["cost"] <= 0.05]
    if audited["family"] == "llama":
        assert min(within) <= 0.3 and within[-1] < within[0]
    from memloc.probes.base import ProbeResult
    from memloc.probes.localization import edited
    from memloc.tasks.experiment import open_run
    loaded = open_run(run)
    model = loaded.model()
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(run / "edited"), local_files_only=True)
    assert plain.config.model_type == audited["family"]
    tok = transformers.AutoTokenizer.from_pretrained(str(run / "edited"), local_files_only=True)
    ids = torch.tensor([tok.encode(audited["repeated"][0])])
    with edited(model, ProbeResult.load(loaded.run, "localize")), torch.no_grad():
        scoped = model(ids)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, scoped, atol=1e-4)
