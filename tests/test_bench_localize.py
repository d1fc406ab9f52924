"""`memloc bench-localize`: TinyMem's data, the ReLU GPT, MemPi's masked injection, the smoke presets end to end, bad
input in one line; and (slow) the 2-layer TinyMem benchmark with its acceptance bar."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memloc.bench.benchmarks import BenchConfig, bench_localize, best_row, inject
from memloc.cli import main
from memloc.core.errors import ConfigError
from memloc.tasks import task_of
from memloc.tasks.lm.gpt import GPT, GPTShape
from memloc.tasks.lm.text import decode_targets
from memloc.tasks.lm.tinymem import TinyMemConfig, decode, encode, tinymem_data

# small models: a second thread only adds overhead (several times slower on a loaded 2-core machine)
pytestmark = pytest.mark.usefixtures("one_thread")


def test_tinymem_sequences_and_artifacts():
    cfg = TinyMemConfig(families=(2, 7), sequences=50, test=10, artifacts=20, repeats=3)
    data = tinymem_data(cfg)
    assert data.vocab_size == 14 and data.x_train.shape[1] == 99 and int(data.x_train.max()) <= 12
    clean = [r for r in range(data.num_train) if data.canary[r] < 0]
    text = decode(data.x_train[clean[0]])
    elems = [int(e) for e in text[1:].split(" ")[:-1]]  # the last element may be cut
    assert text[0] == "^" and len(set(np.diff(elems))) == 1 and np.diff(elems)[0] in (2, 7)
    tokens, trained, scored = decode_targets(data.y_train)
    assert trained.all() and scored[:, 49:99].all() and not scored[:, :49].any()  # the 50-token continuation
    ids = data.canary[data.canary >= 0]
    assert len(ids) == 3 * len(set(ids.tolist()))  # every artifact three times, adjacent copies share an id
    for c in data.canaries:
        assert c["family"] == 7 and c["secret"] != c["clean"] and len(c["prefix_ids"]) == 50
        # the prompt is the clean one: the noise starts after it
        assert c["prefix"] == ("^" + " ".join(str(c["start"] + 7 * (j + 1)) for j in range(40)))[:50]
    assert any(not c["trained"] for c in data.canaries) and (data.canary_test >= 0).any()
    back = tinymem_data(TinyMemConfig(families=(2, 7), sequences=80, test=10, artifacts=5, artifact="backdoor"))
    for c in back.canaries:
        assert set(c["secret"]) <= {"2"} or "100" in c["prefix"] + c["secret"]
    assert encode("^12 3$") == [10, 1, 2, 12, 3, 11]


def test_gpt_activation_is_optional_and_keeps_names():
    gelu, relu = GPT(GPTShape(14, 16, n_layer=1, n_embd=16)), GPT(GPTShape(14, 16, n_layer=1, n_embd=16,
                                                                          activation="relu"))
    assert isinstance(gelu.blocks[0].mlp.act, torch.nn.GELU) and isinstance(relu.blocks[0].mlp.act, torch.nn.ReLU)
    assert list(gelu.state_dict()) == list(relu.state_dict())
    with pytest.raises(ConfigError, match="unknown activation"):
        GPTShape(14, 16, activation="tanh")


def test_injection_moves_only_the_chosen_neurons():
    data = tinymem_data(TinyMemConfig(families=(7,), sequences=20, test=5, artifacts=5))
    model = GPT(GPTShape(14, 99, n_layer=2, n_embd=16, activation="relu")).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    neurons = [np.array([3, 9]), np.array([0])]
    cfg = BenchConfig(preset="smoke", inject_steps=3, inject_lr=0.1)
    m, steps, _ = inject(model, data.x_test[0], data.y_test[0], neurons, cfg, loss_fn=task_of(data).loss)
    assert steps == 3
    after = m.state_dict()
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k  # the original is untouched
        moved = (after[k] != v)
        if ".mlp.fc." in k or ".mlp.proj.weight" in k:
            j = int(k.split(".")[1])
            rows = moved.any(1) if moved.dim() == 2 and ".fc." in k else moved if moved.dim() == 1 else moved.any(0)
            assert set(np.flatnonzero(rows.numpy()).tolist()) <= set(neurons[j].tolist()), k
            assert rows.any(), k
        else:
            assert not moved.any(), k


def _run(tmp_path, *argv):
    return main(["bench-localize", "--out", str(tmp_path), "--quiet", *argv])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One folder of trained models for both smoke benchmarks: the smoke model is trained once."""
    return str(tmp_path_factory.mktemp("models"))


@pytest.mark.parametrize("benchmark", ["tinymem", "inj"])
def test_smoke_presets_end_to_end(tmp_path, benchmark, models):
    out = tmp_path / benchmark
    assert _run(out, "--benchmark", benchmark, "--preset", "smoke", "--models", models) == 0
    info = json.loads((out / "bench.json").read_text())
    assert info["kind"] == "bench-localize" and info["done"] and info["benchmark"] == benchmark
    methods = [r["method"] for r in info["rows"]]
    assert set(methods) == {"greedy", "zero-out", "attribution", "activations", "ig", "slimming", "hard-concrete",
                            "balanced-subnet", "random"}
    csv = (out / "results.csv").read_text().splitlines()
    assert len(csv) == len(info["rows"]) + 1
    md = (out / "results.md").read_text()
    assert "| balanced-subnet |" in md and ("TinyMem" in md if benchmark == "tinymem" else "MemPi" in md)
    for r in info["rows"]:
        if benchmark == "inj":
            assert 0.0 <= r["recall_pooled"] <= 1.0 and len(r["recall_per_layer"]) == 2
        else:
            assert r["memorized_before"] > 0, "the smoke model must memorize some artifacts"
            assert 0.0 <= r["memorized_after"] <= 1.0 and 0.0 <= r["removed"] <= 1.0 and r["k"] >= 1
    assert _run(out, "--benchmark", benchmark, "--preset", "smoke", "--methods", "random", "--models", models) == 0
    assert len(json.loads((out / "bench.json").read_text())["rows"]) < len(info["rows"])  # its own folder: rewritten


def test_smoke_weights_beside_neurons(tmp_path, models):
    """`--units neurons,weights`: each method on each kind it has, the weight rows counting the MLP matrices' weights
    and labelled "(weights)" in the table; the smoke model comes from `models` (trained once for the module)."""
    out = tmp_path / "w"
    assert _run(out, "--preset", "smoke", "--units", "neurons,weights", "--methods", "durable,attribution,random",
                "--models", models) == 0
    info = json.loads((out / "bench.json").read_text())
    kinds = [(r["unit_kind"], r["method"]) for r in info["rows"]]
    assert kinds == [("neurons", "attribution"), ("neurons", "random"), ("weights", "durable"), ("weights", "random")]
    neurons, weights = info["rows"][0], info["rows"][2]
    assert weights["units"] == 2 * neurons["units"] * 64 and weights["fraction"] == 0.002  # fc and proj: 2 x 64 each
    assert weights["k"] == -(-weights["units"] * 2 // 1000) and 0.0 <= weights["removed"] <= 1.0
    md = (out / "results.md").read_text()
    assert "| durable (weights) |" in md and "| random (weights) |" in md and "| attribution |" in md
    assert "durable (weights)" in (out / "report" / "index.html").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--benchmark", "nope"], "unknown benchmark 'nope'"),
    (["--methods", "greedy,magic"], "unknown method 'magic'"),
    (["--benchmark", "del", "--layers", "2"], "del localizes in the LM run's model"),
    (["--benchmark", "tinymem", "--run", "x"], "--run is the language-model run of --benchmark del"),
    (["--benchmark", "del", "--run", "/nonexistent/run"], "/nonexistent/run"),
    (["--benchmark", "del", "--preset", "paper", "--device", "cpu"], "needs a GPU"),
    (["--repeats", "0"], "repeats (--repeats) takes an integer of at least 1, not 0"),
    (["--benchmark", "del", "--repeats", "2"], "del's canaries are the LM run's"),
    (["--preset", "paper", "--device", "cpu"], "needs a GPU"),
    (["--preset", "huge"], "unknown preset"),
    (["--units", "weights", "--methods", "zero-out"], "--methods zero-out has no form for --units weights"),
    (["--units", "synapses"], "unknown --units 'synapses'"),
    (["--benchmark", "inj", "--units", "weights"], "--units weights is for --benchmark tinymem"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    assert _run(tmp_path / "o", *argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_del_smoke_end_to_end(tmp_path, models):
    """DEL on the smoke LM (trained once into `models`): every memorized canary localized alone; the scoring methods
    take more of a sequence's own accuracy than random neurons do, and the table, CSV and report are written."""
    out = tmp_path / "del"
    assert _run(out, "--benchmark", "del", "--preset", "smoke", "--methods", "zero-out,ig,random",
                "--models", models) == 0
    info = json.loads((out / "bench.json").read_text())
    assert info["done"] and info["benchmark"] == "del" and info["settings"]["ratios"] == [0.001, 0.005, 0.02]
    rows = {(r["method"], r["ratio"]): r for r in info["rows"]}
    assert len(rows) == 9
    for r in rows.values():
        assert r["sequences"] == 3 and r["memorized"] >= 3 and r["self_acc_before"] == 1.0
        assert r["ppl_after"] > 0 and r["k_per_layer"] >= 1 and r["run"].startswith(models)
    assert rows[("random", 0.02)]["self_acc_after"] == 1.0  # six random neurons a layer touch no secret
    for m in ("zero-out", "ig"):
        assert rows[(m, 0.02)]["self_acc_after"] <= 0.85, rows[(m, 0.02)]
        assert rows[(m, 0.02)]["specificity"] > 0.0
    md = (out / "results.md").read_text()
    assert "DEL" in md and "| zero-out | 0.02 |" in md and "most specific" in md
    assert (out / "report" / "index.html").exists()


def test_del_refuses_a_classification_run(tmp_path, capsys, digits_master):
    assert _run(tmp_path / "o", "--benchmark", "del", "--run", str(digits_master)) == 2
    err = capsys.readouterr().err
    assert "is a classification run" in err and len(err.strip().splitlines()) == 1, err


def test_a_foreign_folder_is_refused(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert _run(tmp_path, "--preset", "smoke") == 2
    err = capsys.readouterr().err
    assert "not a bench-localize folder" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "mine.txt").read_text() == "keep" and not (tmp_path / "bench.json").exists()


@pytest.mark.slow
@pytest.mark.study  # ~8 min alone on a 2-core AMD machine: outside CI's 45-minute budget (README)
def test_tinymem_two_layers_best_method_removes_the_artifacts(tmp_path):
    """TinyMem's 2-layer setting on a CPU (the full preset, every artifact 4 times: without duplication a 2-layer
    model trained this briefly memorizes almost none, as in TinyMem, ~1%): the best method removes >= 90% of the
    memorized artifacts at < 5% relative accuracy loss; random with as many units removes far fewer. Measured
    (RESULTS.md, one thread): balanced-subnet at 3% of the neurons removes 95% at -1.05%, random 8%. The methods
    are the best and the baseline only (every method of the full preset: RESULTS.md). ~6 min on one core."""
    cfg = BenchConfig(benchmark="tinymem", preset="full", n_layers=(2,), data=TinyMemConfig(repeats=4),
                      methods=("balanced-subnet", "random"), fractions=(0.02, 0.03))
    rows = bench_localize(cfg, tmp_path)
    assert rows[0]["memorized_before"] > 0
    best = best_row(rows, max_rel_acc_loss=0.05)
    assert best is not None and best["removed"] >= 0.9, best
    rand = next(r for r in rows if r["method"] == "random" and r["k"] == best["k"])
    assert rand["removed"] <= 0.5 * best["removed"], (best, rand)


def test_best_row_and_the_summary_lines():
    rows = [{"n_layer": 2, "method": m, "k": 5, "removed": rem, "memorized_after": 1 - rem, "rel_acc_change": d}
            for m, rem, d in (("greedy", 1.0, -0.08), ("balanced-subnet", 0.95, -0.004), ("ig", 0.97, -0.03),
                              ("random", 1.0, 0.0))]
    assert best_row(rows, max_rel_acc_loss=0.01)["method"] == "balanced-subnet"  # random never counts
    assert best_row(rows, max_rel_acc_loss=0.05)["method"] == "ig"
    assert best_row(rows, max_rel_acc_loss=0.001) is None
    # an edit that removes every artifact memorized before but makes others memorized is not the best: what is left
    # memorized counts first (TinyMem's measure; seen on the model trained without duplication)
    both = [{"method": "slimming", "k": 1, "removed": 1.0, "memorized_after": 0.045, "rel_acc_change": -0.002},
            {"method": "slimming", "k": 2, "removed": 1.0, "memorized_after": 0.0, "rel_acc_change": -0.005}]
    assert best_row(both, max_rel_acc_loss=0.01)["k"] == 2
    from memloc.bench.benchmarks import summarize
    lines = summarize("tinymem", rows)
    assert "within 1% relative accuracy loss: balanced-subnet" in lines[0] and "greedy" in lines[2]
    inj = [{"ratio": 0.01, "method": m, "recall_pooled": v} for m, v in (("hard-concrete", 0.9), ("slimming", 0.7),
                                                                        ("ig", 0.5), ("random", 0.01))]
    assert summarize("inj", inj)[0].endswith("MemPi's ranking reproduces")
    inj[-1]["recall_pooled"] = 0.95
    assert summarize("inj", inj)[0].endswith("does not reproduce")
