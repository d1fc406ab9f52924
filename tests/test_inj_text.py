"""INJ on natural text (studies/inj_text.py, issue #33): a held-out Bible window injected into a few MLP neurons of a
smoke-sized LM is extracted afterwards and was not before, and nothing but those neurons' weights moved."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from memloc import task_of
from memloc.tasks.lm.gpt import GPT, GPTShape
from memloc.tasks.lm.text import decode_targets, load_text

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("inj_text", ROOT / "studies" / "inj_text.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_lm():
    """A GPT of the smoke preset's shape (2 blocks, width 64: 256 MLP neurons a layer) on its data (1,200 Bible
    windows of 64 bytes), trained 150 steps of 16 windows (Adam 3e-3, one thread): past the unigram plateau, so
    that its residual stream carries the context a few MLP neurons can memorize a sequence from; it extracts none
    of its held-out text."""
    study = _study()
    data = load_text(study.lm_config("smoke", None, 0).data)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = GPT(GPTShape(vocab_size=data.vocab_size, block_size=data.block_size, n_layer=2, n_head=4,
                                 n_embd=64))
            loss_fn = task_of(data).loss
            opt = torch.optim.Adam(model.parameters(), lr=3e-3)
            gen = torch.Generator().manual_seed(0)
            for _ in range(150):
                idx = torch.randint(len(data.x_train), (16,), generator=gen)
                loss = loss_fn(model(data.x_train[idx]), data.y_train[idx]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(n)
    return study, model.eval(), data


def test_a_natural_sequence_injected_into_chosen_neurons_is_extracted(smoke_lm, one_thread):
    study, model, data = smoke_lm
    prefix, suffix = 16, 32
    seq = study.choose_sequences(model, data, verses=1, records=0, prefix=prefix, suffix=suffix, seed=0,
                                 log=lambda s: None)[0]
    x, y = seq["x"], seq["y"]
    assert seq["kind"] == "verse"
    assert (y >= 0).sum() == suffix  # the suffix after the prompt is what extraction asks for
    assert not study.extracted(model, x, y)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = np.random.default_rng(0)
    # 16 of 256 neurons a layer: this weak 2-layer model needs more than MemPi's 1% to hold 32 bytes of text
    neurons = [np.sort(g.choice(256, size=16, replace=False)) for _ in model.blocks]
    injected, steps, _, ok = study.inject_until_extracted(model, x, y, neurons, loss_fn=task_of(data).loss, lr=0.01,
                                                          steps=400, round_steps=50)
    assert ok and study.extracted(injected, x, y)[0] and steps <= 400
    for k, v in model.state_dict().items():  # the model injected into is a copy
        assert torch.equal(v, before[k]), k
    after = injected.state_dict()
    per_neuron = {}  # MLP parameters: name -> (layer, how a neuron's entries are read off the change)
    for j in range(len(model.blocks)):
        per_neuron[f"blocks.{j}.mlp.fc.weight"] = (j, lambda m: m.any(1))  # (4C, C): a neuron's input row
        per_neuron[f"blocks.{j}.mlp.fc.bias"] = (j, lambda m: m)
        per_neuron[f"blocks.{j}.mlp.proj.weight"] = (j, lambda m: m.any(0))  # (C, 4C): its output column
    for name, v in before.items():
        moved = after[name] != v
        if name not in per_neuron:
            assert not moved.any(), name  # attention, norms, embeddings, the MLP's output bias: untouched
            continue
        j, read = per_neuron[name]
        chosen = torch.zeros(moved.shape[0 if name.endswith("fc.weight") or name.endswith("bias") else 1],
                             dtype=torch.bool)
        chosen[torch.as_tensor(neurons[j])] = True
        assert not read(moved)[~chosen].any(), name  # no other neuron's row, bias or column moved
        assert read(moved)[chosen].any(), name

def test_a_fake_record_scores_its_phone_number(smoke_lm):
    study, _, data = smoke_lm
    x, y = study.record_sequence(data.tokenizer, "Name: Ann Lee. Address: 1 Oak St, Springfield. Phone: ",
                                 "555-123-4567", data.block_size)
    tokens, trained, scored = decode_targets(y)
    assert data.tokenizer.decode(tokens[scored].tolist()) == "555-123-4567"
    assert torch.equal(x[1:int(trained.sum())], tokens[:int(trained.sum()) - 1])  # targets are the next inputs
    assert not trained[int(trained.sum()):].any()  # padding is neither trained nor scored
