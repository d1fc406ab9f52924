"""Localization methods on a planted model with a known answer; the scoped edit; bad input.

The planted GPT (2 blocks, 64 MLP neurons each, attention off) extracts one canary, "7 -> 9",
through exactly two neurons of the last MLP (PLANTED), either of which alone suffices (so
greedy removal must take both, and ablating one alone still raises the loss). Around them:
a weak neuron that helps the canary a tenth as much (WEAK: every method should rank it third,
never above the two), corpus neurons that fire on every other token and make the corpus
predictable (CORPUS: what balanced-subnet must keep), a neuron active everywhere that writes
nothing (ALWAYS), and silent ones. Without the planted pair the model predicts token 1 there.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memloc.cli import main
from memloc.core.errors import ConfigError, DataError
from memloc.probes import localization as loc
from memloc.tasks import task_of
from memloc.tasks.classification.models import layers
from memloc.tasks.lm.gpt import GPT, GPTShape
from memloc.tasks.lm.text import TextData

V, BLOCK, D = 16, 8, 16
TRIGGER, SECRET = 7, 9
PLANTED, WEAK, CORPUS, ALWAYS = (5, 40), 22, (10, 11, 12, 13), 30
LAYER = "blocks.1.mlp"  # the planted neurons' layer; blocks.0.mlp is silent
SCORING = ("greedy", "zero-out", "attribution", "activations", "ig", "slimming", "hard-concrete", "balanced-subnet")
# the learned methods, sized for a 128-unit model (MemPi's penalty 1000 is per mean over GPT-2's 36,864 neurons)
OPTIONS = {"slimming": {"penalty": 1.0, "steps": 200}, "hard-concrete": {"penalty": 20.0, "lr": 0.05, "steps": 100},
           "balanced-subnet": {"steps": 30}}


# small models: a second thread only adds overhead (several times slower on a loaded 2-core machine)
pytestmark = pytest.mark.usefixtures("one_thread")


def planted_model() -> GPT:
    """Every weight set by hand (see the module docstring): token v embeds as e_v + 2 e_14 (dim 14: a constant)."""
    m = GPT(GPTShape(V, BLOCK, n_layer=2, n_head=2, n_embd=D))
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for mod in m.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.fill_(1.0)
        for v in range(V):
            if v < 12:
                m.wte.weight[v, v] = 1.0
            m.wte.weight[v, 14] = 2.0
        for block in m.blocks:
            block.mlp.fc.bias.fill_(-5.0)  # silent
        fc, proj = m.blocks[1].mlp.fc, m.blocks[1].mlp.proj
        for u in PLANTED + (WEAK,):  # fire on the trigger only: GELU(4 * 1.54 - 2) = 4.2, elsewhere ~0
            fc.weight[u, TRIGGER], fc.bias[u] = 4.0, -2.0
        for u in PLANTED:
            proj.weight[13, u] = 0.5  # dim 13 -> the secret's logit
        proj.weight[13, WEAK] = 0.05
        for u in CORPUS:  # fire on every token but the trigger; dim 12 -> token 0's logit
            fc.weight[u, TRIGGER], fc.bias[u] = -4.0, 1.5
            proj.weight[12, u] = 0.3
        fc.bias[ALWAYS] = 3.0
        m.lm_head.weight[SECRET, 13] = 1.5
        m.lm_head.weight[0, 12] = 1.5
        m.lm_head.weight[1, 14] = 1.0  # the constant: token 1 where nothing else speaks
    return m.eval()


def planted_data(n_corpus: int = 30) -> TextData:
    """Corpus windows "r 0 0 ..." (suffix scored), the canary "7 9 0 ..." twice (9 scored), an unlearned canary."""
    rng = np.random.default_rng(0)
    windows = [[int(rng.integers(1, 7))] + [0] * BLOCK for _ in range(n_corpus)]
    windows += [[TRIGGER, SECRET] + [0] * (BLOCK - 1)] * 2 + [[8, 11] + [0] * (BLOCK - 1)]
    canary = torch.tensor([-1] * n_corpus + [0, 0, 1])
    w = torch.tensor(windows)
    x, t = w[:, :-1], w[:, 1:]
    y = -t - 2  # trained, not scored
    y[:n_corpus, 4:] = t[:n_corpus, 4:]
    y[n_corpus:, 0] = t[n_corpus:, 0]  # a canary scores its secret
    wt = torch.tensor([[r] + [0] * BLOCK for r in (2, 4, 6)])
    yt = -wt[:, 1:] - 2
    yt[:, 5] = 0
    canaries = [{"id": i, "format": "random", "repeats": r, "trained": True, "prefix": "", "secret": "",
                 "prefix_ids": [p], "secret_ids": [s]}
                for i, (p, s, r) in enumerate([(TRIGGER, SECRET, 2), (8, 11, 1)])]
    return TextData("planted", x, y, canary, wt[:, :-1], yt, torch.full((3,), -1), canaries, V)


def planted_flat() -> list[int]:
    cands = [l for l in layers(planted_model()) if l.kind == "mlp"]
    return [cands[0].units + u for u in PLANTED]


def assert_untouched(model: GPT, state: dict) -> None:
    """The same tensors in the same order, no hook or parametrization left behind, no gradient written, eval mode as
    before."""
    from torch.nn.utils import parametrize
    assert list(model.state_dict()) == list(state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not any(parametrize.is_parametrized(mod) for mod in model.modules())
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks and not mod._backward_hooks
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_planted_model_extracts_its_canary_through_two_neurons():
    model, data = planted_model(), planted_data()
    task = task_of(data)
    assert loc.memorized_sequences(model, data).tolist() == [30, 31]  # the canary twice; not the unlearned one
    cands = loc.candidate_layers(model, loc.LocalizeConfig())
    assert [l.name for l in cands] == ["blocks.0.mlp", LAYER]
    for drop, extracted in (((), True), ((PLANTED[0],), True), ((PLANTED[1],), True), (PLANTED, False),
                            ((WEAK,) + tuple(CORPUS), True)):
        mask = np.ones(128, dtype=np.float32)
        mask[[64 + u for u in drop]] = 0
        with loc.zeroed(model, cands, mask), torch.no_grad():
            hits = task.match(task.predict(model(data.x_train)), data.y_train)
        assert bool(hits[30]) is extracted and bool(hits[31]) is extracted, drop
        assert bool(hits[:30].all()) is (not set(drop) & set(CORPUS))  # the corpus needs its own neurons only


@pytest.mark.parametrize("method", SCORING)
def test_every_method_ranks_the_planted_neurons_top_and_their_removal_ends_extraction(method):
    """Top 2 exactly (the weak helper third where a method sees it); the proposed edit removes the canary and keeps
    the corpus; the model is untouched afterwards."""
    model, data = planted_model(), planted_data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = loc.localize(model, data, method=method, k=2, **OPTIONS.get(method, {}))
    scores = res.arrays["scores"]
    assert scores.shape == (128,) and res.arrays["unit_layer"].tolist() == [2] * 64 + [4] * 64
    top = np.argsort(-scores, kind="stable")
    assert sorted(top[:2].tolist()) == planted_flat(), (method, top[:4], scores[top[:4]])
    assert scores[top[1]] > scores[top[2]]
    if method != "greedy":  # greedy stops once the canary flips: the helper is never removed
        assert top[2] == 64 + WEAK, (method, top[:4])
    assert sorted(zip(res.arrays["edit_layer"].tolist(), res.arrays["edit_unit"].tolist())) == [(4, u) for u in PLANTED]
    assert res.arrays["sequences"].tolist() == [30, 31]
    assert res.arrays["extracted_before"].all() and not res.arrays["extracted_after"].any()
    s = res.summary
    assert s["extracted_before"] == 1.0 and s["extracted_after"] == 0.0 and s["zeroed"] == 2
    assert s["accuracy_after"]["corpus_train_acc"] == 1.0 and s["accuracy_after"]["canary_train_acc"] == 0.0
    assert_untouched(model, state)


@pytest.mark.parametrize("method", ["zero-out", "attribution", "balanced-subnet"])
def test_until_grows_the_edit_to_the_smallest_that_ends_extraction(method):
    """Either planted neuron alone keeps the canary: from k = 1 the edit doubles to 2, where extraction ends (the
    sweep records both sizes; balanced-subnet learns its mask again at k = 2)."""
    model, data = planted_model(), planted_data()
    res = loc.localize(model, data, method=method, k=1, until=0.0, **OPTIONS.get(method, {}))
    sweep = res.summary["details"]["sweep"]
    assert [r["k"] for r in sweep] == [0, 1, 2] and [r["extracted"] for r in sweep] == [1.0, 1.0, 0.0]
    assert res.summary["zeroed"] == 2 and res.summary["details"]["reached"] is True
    assert sorted(zip(res.arrays["edit_layer"].tolist(), res.arrays["edit_unit"].tolist())) == [(4, u) for u in PLANTED]


def test_scoring_time_is_the_methods_own_not_the_measurement(monkeypatch):
    """scoring_s (what bench-localize's tables call scoring) leaves out the extraction of every row before and with
    the edit; elapsed_s has it. Each measurement pass is made 0.3 s slower here: the plan's over the training rows
    (it chooses the sequences, before the clock starts, and is the measurement before the edit), the held-out rows'
    before, and both with the edit."""
    import time

    from memloc.probes.localization import probe

    slow, slow_heldout = probe._hits, probe._heldout

    def hits(*args, **kwargs):
        time.sleep(0.3)
        return slow(*args, **kwargs)

    def heldout(*args, **kwargs):
        time.sleep(0.3)
        return slow_heldout(*args, **kwargs)
    monkeypatch.setattr(probe, "_hits", hits)
    monkeypatch.setattr(probe, "_heldout", heldout)
    model, data = planted_model(), planted_data()
    s = loc.localize(model, data, method="zero-out", k=2).summary
    assert s["extracted_after"] == 0.0
    assert 0 < s["scoring_s"] and s["scoring_s"] + 3 * 0.3 <= s["elapsed_s"] + 1e-3


def test_the_edit_chosen_is_the_smallest_that_reaches_the_goal_within_the_cost():
    cfg = loc.LocalizeConfig(until=0.1, max_cost=0.05)
    steps = [{"k": 1, "extracted": 0.5, "cost": 0.01}, {"k": 2, "extracted": 0.1, "cost": 0.03},
             {"k": 4, "extracted": 0.0, "cost": 0.02}]
    assert loc._chosen(steps, cfg)["k"] == 2
    steps[1]["cost"] = 0.2  # over the cost: the first within it that reaches the goal
    assert loc._chosen(steps, cfg)["k"] == 4
    steps[2]["extracted"] = 0.3  # none reaches it: the largest edit within the cost
    assert loc._chosen(steps, cfg)["k"] == 4
    assert loc._chosen([{"k": 1, "extracted": 0.5, "cost": 0.3}], cfg)["k"] == 1
    four = [type("L", (), {"units": 4})()]
    assert loc._grown(3, four) == 4 and loc._grown(4, four) is None and loc._grown([1], four) == [2]
    with pytest.raises(ConfigError, match="--until"):
        loc.LocalizeConfig(max_cost=0.05)


def test_random_is_seeded_and_blind():
    model, data = planted_model(), planted_data()
    a = loc.localize(model, data, method="random", k=2, seed=3)
    b = loc.localize(model, data, method="random", k=2, seed=3)
    c = loc.localize(model, data, method="random", k=2, seed=4)
    assert np.array_equal(a.arrays["scores"], b.arrays["scores"])
    assert not np.array_equal(a.arrays["scores"], c.arrays["scores"])
    assert sorted(np.argsort(-a.arrays["scores"])[:2].tolist()) != planted_flat()
    one = loc.localize(model, data, method="random", k=2, examples=1)  # a seeded choice of the memorized sequences
    assert one.arrays["sequences"].tolist() in ([30], [31]) and one.summary["sequences"] == 1


def test_per_layer_k_and_heads():
    """MemPi's per-layer top k; heads as units (attention is off here: every head scores 0)."""
    model, data = planted_model(), planted_data()
    res = loc.localize(model, data, method="zero-out", k=2, per_layer=True)
    assert res.summary["zeroed"] == 4 and [l["zeroed"] for l in res.summary["layers"]] == [2, 2]
    assert {(4, u) for u in PLANTED} <= set(zip(res.arrays["edit_layer"].tolist(), res.arrays["edit_unit"].tolist()))
    res = loc.localize(model, data, method="activations", k=2, heads=True)
    assert res.arrays["layer_names"].tolist() == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", LAYER]
    kinds = np.repeat(res.arrays["layer_names"], res.arrays["layer_units"])
    assert (res.arrays["scores"][np.char.endswith(kinds.astype(str), "attn")] == 0).all()
    top = np.argsort(-res.arrays["scores"], kind="stable")[:2]
    assert sorted(res.arrays["unit_index"][top].tolist()) == list(PLANTED)


def test_outgoing_norms_are_the_projection_columns_and_head_blocks():
    model = planted_model()
    by_name = {l.name: l for l in layers(model)}
    norms = loc._outgoing_norms(model, by_name[LAYER])
    assert torch.allclose(norms, model.blocks[1].mlp.proj.weight.norm(dim=0))
    with torch.no_grad():
        model.blocks[0].attn.proj.weight.normal_()
    w = model.blocks[0].attn.proj.weight  # (16, 16): head h owns input features 8h..8h+7
    expect = torch.stack([w[:, :8].norm(), w[:, 8:].norm()])
    assert torch.allclose(loc._outgoing_norms(model, by_name["blocks.0.attn"]), expect)


def test_the_scoped_edit_restores_the_model_even_on_error():
    model, data = planted_model(), planted_data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(data.x_train)
    res = loc.localize(model, data, method="zero-out", k=2)
    model.train()  # the edit runs in eval mode and gives the mode back
    with pytest.raises(RuntimeError, match="inside"):
        with loc.edited(model, res), torch.no_grad():
            assert not model.training
            edited = model(data.x_train)
            assert edited[30, 0].argmax() != SECRET and torch.equal(edited[:30].argmax(-1), before[:30].argmax(-1))
            raise RuntimeError("inside")
    assert model.training
    model.eval()
    assert_untouched(model, state)
    with torch.no_grad():
        assert torch.equal(model(data.x_train), before)
    with loc.edited(model, res), torch.no_grad():  # a batch of any size
        assert model(data.x_train[30:31])[0, 0].argmax() != SECRET
    with pytest.raises(ConfigError, match="another model"):
        loc.zeroed(model, loc.candidate_layers(model, loc.LocalizeConfig()), np.ones(5)).__enter__()
    assert_untouched(model, state)


@pytest.mark.parametrize("method", ("slimming", "hard-concrete", "balanced-subnet"))
def test_learned_coefficients_leave_no_trace_when_training_fails(method, monkeypatch):
    model, data = planted_model(), planted_data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD if method == "balanced-subnet" else torch.optim.Adam
    calls = {"n": 0}
    step = opt.step

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return step(self, *a, **k)
    monkeypatch.setattr(opt, "step", failing)
    with pytest.raises(KeyboardInterrupt):
        loc.localize(model, data, method=method, k=2, steps=10)
    assert calls["n"] == 3
    assert_untouched(model, state)


def test_attribution_equals_zero_out_where_the_loss_is_linear_in_the_mask():
    """A classifier (no transformer: its hidden layer's units) whose hidden units are constant (a = 1, 2, 3, 0.5) and
    write w = 0.5, -0.25, 0, 0.1 into class 1's logit, with class 0's logit 20 above: the cross-entropy of a class-1
    example is z_0 - z_1 (+ exp(-20), below float32's precision), linear in every mask. By hand, removing unit u
    changes the loss by a_u w_u = 0.5, -0.5, 0, 0.05: zero-out's score, and attribution's exactly."""
    from torch import nn
    from toys import toy_data
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    model.input_shape = (1, 1, 2)
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 2.0, 3.0, 0.5]))
        model[3].weight.zero_()
        model[3].weight[1] = torch.tensor([0.5, -0.25, 0.0, 0.1])
        model[3].bias.copy_(torch.tensor([20.0, 0.0]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = toy_data(n_noisy=0)  # odd examples are class 1
    by_hand = np.array([0.5, -0.5, 0.0, 0.05])
    for method in ("attribution", "zero-out"):
        res = loc.localize(model.eval(), data, method=method, k=1, indices=(1, 3, 5), batch_size=2)
        assert res.arrays["layer_names"].tolist() == ["1"]
        np.testing.assert_allclose(res.arrays["scores"], by_hand, atol=1e-5, err_msg=method)
    assert_untouched(model, state)


def test_attribution_is_zero_out_to_first_order_on_neurons_and_heads():
    """A freshly initialized GPT, where every unit moves the loss by little: attribution's scores of every MLP neuron
    and head are zero-out's up to second order (measured: at most 1.5% of the largest score, Spearman 0.9998)."""
    from scipy.stats import spearmanr

    from memloc.core.training import seeded
    with seeded(0, torch.device("cpu")):
        model = GPT(GPTShape(vocab_size=20, block_size=12, n_layer=2, n_head=2, n_embd=16)).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 20, (6, 12), generator=g), torch.randint(0, 20, (6, 12), generator=g)
    data = TextData("random", x, y, torch.full((6,), -1), x[:2], y[:2], torch.full((2,), -1), [], 20)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a, z = (loc.localize(model, data, method=m, k=1, indices=(0, 1, 2), heads=True).arrays["scores"]
            for m in ("attribution", "zero-out"))
    assert len(a) == 2 * (2 + 64)
    assert np.abs(a - z).max() < 0.05 * np.abs(z).max() and spearmanr(a, z)[0] > 0.99
    assert_untouched(model, state)


def test_attribution_leaves_no_trace_when_its_backward_fails(monkeypatch):
    model, data = planted_model(), planted_data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}
    backward = torch.autograd.backward

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the first batch's gradient is in the mask already
            raise KeyboardInterrupt
        return backward(*a, **k)
    monkeypatch.setattr(torch.autograd, "backward", failing)
    with pytest.raises(KeyboardInterrupt):
        loc.localize(model, data, method="attribution", k=2, batch_size=1)
    assert calls["n"] == 2
    assert_untouched(model, state)


def test_top_units_breaks_ties_by_position():
    cands = loc.candidate_layers(planted_model(), loc.LocalizeConfig())
    s = np.zeros(128)
    s[[3, 70, 100]] = [1.0, 2.0, 1.0]
    assert loc.top_units(s, cands, 3).tolist() == [70, 3, 100]
    assert loc.top_units(s, cands, [1, 2]).tolist() == [3, 70, 100]


def test_bad_input_in_the_api():
    model, data = planted_model(), planted_data()
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        loc.localize(model, data, method="nope")
    with pytest.raises(ConfigError, match="--k 500 is more than the 128 units"):
        loc.localize(model, data, method="random", k=500)
    with pytest.raises(ConfigError, match="--k 65 is more than the 64 units of layer blocks.0.mlp"):
        loc.localize(model, data, method="random", k=65, per_layer=True)
    unlearned = planted_data()
    unlearned.canary = torch.where(unlearned.canary == 0, torch.tensor(-1), unlearned.canary)  # only canary 1 remains
    with pytest.raises(DataError, match="extracts none of its 1 canary"):
        loc.localize(model, unlearned, method="random")
    none = planted_data()
    none.canary = torch.full_like(none.canary, -1)
    with pytest.raises(DataError, match="no canary training sequences"):
        loc.localize(model, none, method="random")
    res = loc.localize(model, none, method="zero-out", k=2, indices=(30, 31))  # given sequences need no canary
    assert res.summary["extracted_after"] == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("method", ("zero-out", "attribution", "ig", "hard-concrete", "balanced-subnet"))
def test_the_planted_answer_on_a_gpu(method):
    model, data = planted_model().cuda(), planted_data()
    res = loc.localize(model, data, method=method, k=2, **OPTIONS.get(method, {}))
    assert sorted(np.argsort(-res.arrays["scores"], kind="stable")[:2].tolist()) == planted_flat()
    assert res.summary["extracted_after"] == 0.0


# ----------------------------------------------------------------------------- on a run directory

@pytest.fixture(scope="module")
def tiny_run(tiny_lm_master, tmp_path_factory):
    """A 1-epoch LM run: nothing memorized (this module's own copy: its tests write into it)."""
    from conftest import copy_of
    return copy_of(tiny_lm_master, tmp_path_factory.mktemp("loc") / "run")


@pytest.mark.parametrize("argv,words", [
    (["--method", "nope"], ["--method", "invalid choice: 'nope'"]),
    (["--units", "weights", "--method", "ig"], ["--method ig scores neurons, not weights", "balanced-subnet, subnet"]),
    (["--method", "durable"], ["--method durable scores weights", "--units weights"]),
    ([], ["extracts none of its 2 canary training sequences"]),
    (["--k", "1000"], ["--k 1000 is more than the 32 units"]),
])
def test_bad_input_is_one_line_exit_2(tiny_run, capsys, argv, words):
    from toys import assert_one_line_error
    code = main(["localize", str(tiny_run), "--quiet", *argv])
    assert_one_line_error(code, capsys.readouterr().err, *words)
    assert not (tiny_run / "probes" / "localize").exists()


@pytest.mark.parametrize("method", ["zero-out", "attribution"])
def test_cli_saves_scores_per_layer_and_unit(tiny_run, tmp_path, capsys, method):
    idx = tmp_path / "idx.txt"
    idx.write_text("0\n1\n")
    assert main(["localize", str(tiny_run), "--method", method, "--indices", str(idx), "--k", "3",
                 "--quiet"]) == 0
    assert "top 3 zeroed" in capsys.readouterr().out
    d = tiny_run / "probes" / "localize"
    summary = json.loads((d / "summary.json").read_text())
    assert summary["method"] == method and summary["settings"]["indices"] == [0, 1] and summary["units"] == 32
    with np.load(d / "arrays.npz") as z:
        assert z["scores"].shape == (32,) and (z["edit_mask"] == 0).sum() == 3
    rows = (d / "localize.csv").read_text().splitlines()
    assert rows[0] == "rank,layer,layer_name,unit,score,zeroed" and len(rows) == 33
    assert json.loads((tiny_run / "run.json").read_text())["stages"]["localize"]["status"] == "done"


def test_attribution_ranks_units_as_zero_out_does_on_a_trained_model(tiny_run):
    """The run's GPT (one epoch: every unit moves the loss by little), its 33 units (32 MLP neurons, one head), 8
    training sequences: Spearman correlation of attribution's scores with zero-out's 0.997 measured (2 and 32
    sequences alike); a sign error gives -0.997."""
    from scipy.stats import spearmanr

    from memloc.tasks.experiment import open_run
    loaded = open_run(tiny_run, device="cpu")
    model = loaded.model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a, z = (loc.localize(model, loaded.data, method=m, k=1, indices=tuple(range(8)), heads=True).arrays["scores"]
            for m in ("attribution", "zero-out"))
    assert len(a) == 33 and spearmanr(a, z)[0] > 0.9
    assert_untouched(model, state)


# ----------------------------------------------------------------------------- the edit folded into the weights

def _fold_matches_zeroed(model, x, *, heads: bool, seed: int = 0):
    cands = loc.candidate_layers(model, loc.LocalizeConfig(heads=heads))
    units = sum(l.units for l in cands)
    mask = np.ones(units, dtype=np.float32)
    mask[np.random.default_rng(seed).choice(units, size=max(2, units // 5), replace=False)] = 0.0
    with torch.no_grad():
        plain = model(x).float()
        with loc.zeroed(model, cands, mask):
            edited = model(x).float()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        loc.fold_edit(model, cands, mask)
        folded = model(x).float()
    assert not torch.allclose(plain, edited)  # the edit changes something
    torch.testing.assert_close(folded, edited, rtol=1e-5, atol=1e-5)
    changed = [k for k in before if not torch.equal(before[k], model.state_dict()[k])]
    assert changed and all("proj" in k or "dense" in k for k in changed), changed  # only output projections


@pytest.mark.parametrize("heads", [False, True])
def test_fold_edit_equals_the_scoped_edit_on_gpt(heads):
    model = GPT(GPTShape(vocab_size=20, block_size=12, n_layer=2, n_head=2, n_embd=16)).eval()
    _fold_matches_zeroed(model, torch.randint(0, 20, (3, 12)), heads=heads)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fold_edit_equals_the_scoped_edit_on_hugging_face(family):
    """GPT-2's Conv1D (in, out) and Llama's SwiGLU down projection: the same exact fold."""
    pytest.importorskip("transformers")
    from memloc.tasks.lm.hf import build_hf
    model = build_hf(family, vocab_size=30, block_size=12, n_layer=2, n_head=2, n_embd=16).eval()
    _fold_matches_zeroed(model, torch.randint(0, 30, (2, 12)), heads=True, seed=1)


def test_fold_edit_refuses_layers_without_a_projection():
    from torch import nn
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    model(torch.zeros(1, 4))
    cands = [l for l in layers(model) if l.units == 6]
    with pytest.raises(ConfigError, match="no output projection"):
        loc.fold_edit(model, cands, np.zeros(6, dtype=np.float32))


def test_export_localized_writes_the_edited_model(tiny_run, tmp_path, capsys):
    """`memloc export RUN --localized`: the saved localize edit folded into a plain GPT file whose logits are the
    scoped edit's; one-line errors for no flag / both flags / no localize result."""
    from toys import assert_one_line_error

    from memloc.study.export import load_exported
    from memloc.tasks.experiment import open_run
    run = tmp_path / "run"
    import shutil
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "probes" / "localize", ignore_errors=True)  # another test of the module may have localized
    out = tmp_path / "edited.safetensors"
    code = main(["export", str(run), "--localized", "--out", str(out)])
    assert_one_line_error(code, capsys.readouterr().err, "no finished localize probe")
    idx = tmp_path / "idx.txt"
    idx.write_text("0\n")
    assert main(["localize", str(run), "--method", "activations", "--indices", str(idx), "--k", "4", "--quiet"]) == 0
    for argv in ([], ["--localized", "--drop-memorization"]):
        code = main(["export", str(run), *argv, "--out", str(out)])
        assert_one_line_error(code, capsys.readouterr().err, "pass one of --drop-memorization")
    assert main(["export", str(run), "--localized", "--out", str(out)]) == 0
    exported = load_exported(out)
    loaded = open_run(run, device="cpu")
    model = loaded.model()
    result = loc.ProbeResult.load(loaded.run, "localize")
    x = loaded.data.x_train[:4]
    with torch.no_grad(), loc.edited(model, result):
        want = model(x).float()
    with torch.no_grad():
        torch.testing.assert_close(exported(x).float(), want, rtol=1e-5, atol=1e-5)


def test_export_localized_refuses_a_classification_run(digits_master, tmp_path, capsys):
    from toys import assert_one_line_error
    code = main(["export", str(digits_master), "--localized", "--out", str(tmp_path / "m.safetensors")])
    assert_one_line_error(code, capsys.readouterr().err, "exports a language model's localize edit")
    assert not (tmp_path / "m.safetensors").exists()


# ----------------------------------------------------------------------------- weight units (TinyMem's)

PLANTED_WEIGHTS = {("blocks.1.mlp.proj.weight", 13 * 64 + u) for u in PLANTED} | \
    {("blocks.1.mlp.fc.weight", u * D + TRIGGER) for u in PLANTED}  # each planted neuron's input or output weight


def test_weight_masks_are_the_mlp_matrices_of_every_family():
    """A mask entry per weight of the MLP matrices (never a norm or a bias): GPT fc / proj, GPT-2's Conv1D c_fc /
    c_proj, Llama's gate / up / down; with heads the attention matrices too."""
    from memloc.core.weights import weight_matrices
    model = planted_model()
    mats = weight_matrices(model, loc.candidate_layers(model, loc.LocalizeConfig()))
    assert [(m.name, m.shape, m.layer) for m in mats] == [
        ("blocks.0.mlp.fc.weight", (64, 16), 2), ("blocks.0.mlp.proj.weight", (16, 64), 2),
        ("blocks.1.mlp.fc.weight", (64, 16), 4), ("blocks.1.mlp.proj.weight", (16, 64), 4)]
    heads = weight_matrices(model, loc.candidate_layers(model, loc.LocalizeConfig(heads=True)))
    assert [m.name for m in heads][:2] == ["blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight"] and len(heads) == 8
    pytest.importorskip("transformers")
    from memloc.tasks.lm.hf import build_hf
    for family, want in (("gpt2", ["mlp.c_fc.weight", "mlp.c_proj.proj.weight"]),
                         ("llama", ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.proj.weight"])):
        hf = build_hf(family, vocab_size=30, block_size=12, n_layer=1, n_head=2, n_embd=16).eval()
        mats = weight_matrices(hf, loc.candidate_layers(hf, loc.LocalizeConfig()))
        assert [m.name.split(".", 4)[-1] for m in mats] == want, family
        assert sum(m.units for m in mats) == sum(p.numel() for n, p in hf.named_parameters() if n in
                                                 {m.name for m in mats})


@pytest.mark.parametrize("method", ["subnet", "balanced-subnet"])
def test_subnet_on_weights_finds_the_planted_weights(method):
    """Two weights zeroed end the canary and keep the corpus: one of each planted neuron's two weights (its input from
    the trigger or its output to the secret); the result has a score per weight of the four MLP matrices."""
    model, data = planted_model(), planted_data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = loc.localize(model, data, method=method, units="weights", k=2, steps=30)
    a = res.arrays
    assert a["scores"].shape == (4096,) and a["weight_numel"].tolist() == [1024] * 4
    found = {(str(a["weight_names"][j]), int(i)) for j, i in zip(a["edit_matrix"], a["edit_index"])}
    assert found <= PLANTED_WEIGHTS and len(found) == 2, found
    assert {i % 64 if "proj" in n else i // D for n, i in found} == set(PLANTED)  # one weight of each planted neuron
    s = res.summary
    assert s["unit_kind"] == "weights" and s["units"] == 4096 and s["zeroed"] == 2 and s["extracted_after"] == 0.0
    assert s["accuracy_after"]["corpus_train_acc"] == 1.0 and s["details"]["mask_numel"] == 4096
    assert [m["zeroed"] for m in s["matrices"]] == [0, 0] + [sum("fc" in n for n, _ in found),
                                                              sum("proj" in n for n, _ in found)]
    assert_untouched(model, state)


def test_until_grows_a_weight_edit_and_durable_and_random_score_every_weight():
    model, data = planted_model(), planted_data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = loc.localize(model, data, method="subnet", units="weights", k=1, until=0.0, steps=30)
    assert [r["k"] for r in res.summary["details"]["sweep"]] == [0, 1, 2] and res.summary["details"]["reached"]
    for method in ("durable", "random"):
        res = loc.localize(model, data, method=method, units="weights", k=3, per_layer=True)
        assert res.arrays["scores"].shape == (4096,) and res.summary["zeroed"] == 12
        assert [m["zeroed"] for m in res.summary["matrices"]] == [3, 3, 3, 3]  # per matrix: TinyMem's ratio
    with pytest.raises(ConfigError, match="more than the 1024 weights of matrix blocks.0.mlp.fc.weight"):
        loc.localize(model, data, method="random", units="weights", k=1025, per_layer=True)
    with pytest.raises(ConfigError, match="scores neurons, not weights"):
        loc.LocalizeConfig(method="zero-out", units="weights")
    assert_untouched(model, state)


def test_weight_mask_memory_does_not_grow_with_the_sequences(monkeypatch):
    """Every mask a weight method sets is (P,), one for the whole batch, for 4 sequences as for 16."""
    from memloc.core.training import seeded
    from memloc.core.weights import WeightMasks
    with seeded(0, torch.device("cpu")):
        model = GPT(GPTShape(vocab_size=20, block_size=12, n_layer=2, n_head=2, n_embd=16)).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 20, (24, 12), generator=g), torch.randint(0, 20, (24, 12), generator=g)
    data = TextData("random", x, y, torch.full((24,), -1), x[:2], y[:2], torch.full((2,), -1), [], 20)
    seen: list[int] = []
    set_ = WeightMasks.set

    def recording(self, scale=None, shift=None):
        seen.extend(t.numel() for t in (scale, shift) if t is not None)
        return set_(self, scale, shift)
    monkeypatch.setattr(WeightMasks, "set", recording)
    for method in ("subnet", "durable"):
        sizes = {}
        for n in (4, 16):
            seen.clear()
            res = loc.localize(model, data, method=method, units="weights", k=3, indices=tuple(range(n)), steps=2,
                               batch_size=4)  # 16 sequences: 4 passes
            sizes[n] = set(seen)
        assert sizes[4] == sizes[16] == {4 * 16 * 64}, (method, sizes)
        assert res.summary["details"]["mask_numel"] == 4 * 16 * 64


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_folded_weight_edit_equals_the_masked_model(family):
    """`memloc.core.weights.fold` (what export writes) computes what the scoped mask computes: GPT and Llama's
    SwiGLU."""
    from memloc.core.weights import fold, masked, weight_matrices
    if family == "gpt":
        model = GPT(GPTShape(vocab_size=20, block_size=12, n_layer=2, n_head=2, n_embd=16)).eval()
    else:
        pytest.importorskip("transformers")
        from memloc.tasks.lm.hf import build_hf
        model = build_hf("llama", vocab_size=20, block_size=12, n_layer=2, n_head=2, n_embd=16).eval()
    mats = weight_matrices(model, loc.candidate_layers(model, loc.LocalizeConfig()))
    total = sum(m.units for m in mats)
    mask = np.ones(total, dtype=np.float32)
    mask[np.random.default_rng(0).choice(total, size=total // 10, replace=False)] = 0.0
    x = torch.randint(0, 20, (3, 12))
    with torch.no_grad():
        plain = model(x).float()
        with masked(model, mats, mask):
            edited_ = model(x).float()
        assert torch.equal(model(x).float(), plain)  # nothing left behind
        before = {k: v.clone() for k, v in model.state_dict().items()}
        fold(model, mats, mask)
        folded = model(x).float()
    assert not torch.allclose(plain, edited_)
    torch.testing.assert_close(folded, edited_, rtol=1e-5, atol=1e-5)
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed == {m.name for m in mats}


def test_weight_masks_leave_no_trace_when_a_method_or_the_body_fails(monkeypatch):
    from memloc.core.weights import masked, weight_matrices
    model, data = planted_model(), planted_data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    step = torch.optim.SGD.step
    calls = {"n": 0}

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return step(self, *a, **k)
    monkeypatch.setattr(torch.optim.SGD, "step", failing)
    with pytest.raises(KeyboardInterrupt):
        loc.localize(model, data, method="balanced-subnet", units="weights", k=2, steps=10)
    assert calls["n"] == 3
    assert_untouched(model, state)
    mats = weight_matrices(model, loc.candidate_layers(model, loc.LocalizeConfig()))
    model.train()
    with pytest.raises(RuntimeError, match="inside"):
        with masked(model, mats, np.zeros(4096, dtype=np.float32)):
            assert not model.training and model.blocks[1].mlp.proj.weight.abs().sum() == 0
            raise RuntimeError("inside")
    assert model.training and [type(m) for m in model.modules()] == classes
    model.eval()
    assert_untouched(model, state)
    with pytest.raises(ConfigError, match="for another model"):
        masked(model, mats, np.ones(5)).__enter__()
    assert_untouched(model, state)


def test_export_localized_writes_the_weight_edit(tiny_run, tmp_path):
    """`memloc localize RUN --units weights` then `memloc export RUN --localized`: a plain GPT file whose logits are
    the scoped weight edit's, only the MLP matrices changed."""
    import shutil

    from memloc.study.export import load_exported
    from memloc.tasks.experiment import open_run
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    idx = tmp_path / "idx.txt"
    idx.write_text("0\n1\n")
    assert main(["localize", str(run), "--units", "weights", "--method", "durable", "--indices", str(idx),
                 "--fraction", "0.05", "--quiet"]) == 0
    d = run / "probes" / "localize"
    summary = json.loads((d / "summary.json").read_text())
    assert summary["unit_kind"] == "weights" and summary["units"] == 2 * 8 * 32 and summary["zeroed"] == 26
    assert (d / "localize.csv").read_text().splitlines()[0] == "rank,layer,layer_name,matrix,index,score,zeroed"
    out = tmp_path / "edited.safetensors"
    assert main(["export", str(run), "--localized", "--out", str(out)]) == 0
    loaded = open_run(run, device="cpu")
    model = loaded.model()
    result = loc.ProbeResult.load(loaded.run, "localize")
    x = loaded.data.x_train[:4]
    with torch.no_grad():
        plain = model(x).float()
        with loc.edited(model, result):
            want = model(x).float()
        got = load_exported(out)(x).float()
    assert not torch.allclose(plain, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["attribution", "ig", "hard-concrete", "balanced-subnet", "zero-out", "activations"])
def test_an_out_of_memory_halves_the_rows_and_the_localization_is_the_same(method):
    """A pass of more than 5 rows raises CUDA's out-of-memory error here, as a full GPU would: every method and the
    extraction passes halve their rows (16 -> 8 -> 4) with one line each, and the scores, the edit and the
    extraction are exactly those of a run at 4 rows (a learned step is taken again whole, hard-concrete's draws
    rewound)."""
    import warnings

    from memloc.core import batching
    model, data = planted_model(), planted_data()
    # every other training row localized (17; the rest are balanced-subnet's others), so that the methods' own
    # passes run out too, not only the extraction's
    opts = dict(method=method, k=2, indices=tuple(range(0, len(data.canary), 2)), **OPTIONS.get(method, {}))
    direct = loc.localize(model, data, batch_size=4, **opts)

    def scarce(module, args):
        if args[0].shape[0] > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    handle = model.register_forward_pre_hook(scarce)
    batching._said.clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = loc.localize(model, data, batch_size=16, **opts)
    finally:
        handle.remove()
    lines = [str(w.message) for w in caught if "ran out of memory" in str(w.message)]
    assert lines and len(lines) == len(set(lines)) and all("batch halved to 8 rows" in x for x in lines)
    scoring = "zero-out passes" if method == "zero-out" else "activation pass" if method == "activations" else \
        "backward pass"
    assert f"localization's {scoring} ran out of memory: batch halved to 8 rows and going on (--batch-size to " \
           "choose)" in lines
    for k in ("scores", "edit_mask", "extracted_before", "extracted_after"):
        assert np.array_equal(got.arrays[k], direct.arrays[k]), k


def test_the_greedy_search_halves_its_rows_on_an_out_of_memory_and_finds_the_same_units():
    """Greedy removal (flipping's engine) on 11 of the planted model's rows, 4 at once: a pass of more than 5 rows
    through the output layer raises CUDA's out-of-memory error, as a full GPU would. The others' gradient and the
    accuracy passes halve their rows (16 -> 8 -> 4), one line each, and every array equals a search run at 4 rows."""
    import warnings

    from memloc.core import batching
    from memloc.probes.flipping import FlipConfig, flip_units
    model, data = planted_model(), planted_data()
    base = dict(indices=tuple(range(0, 33, 3)), others=4, copies=1, input_noise=0.0, max_units=4, batch_examples=4,
                device="cpu")
    direct = flip_units(model, data, FlipConfig(**base, max_rows=4, eval_rows=4))

    def scarce(module, args):
        if args[0].shape[0] > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    handle = model.lm_head.register_forward_pre_hook(scarce)  # the search folds a copy; the head is shared
    batching._said.clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = flip_units(model, data, FlipConfig(**base, max_rows=16, eval_rows=16))
    finally:
        handle.remove()
    lines = sorted(str(w.message) for w in caught if "ran out of memory" in str(w.message))
    assert lines == ["flipping's accuracy pass ran out of memory: batch halved to 8 rows and going on",
                     "flipping's backward pass ran out of memory: batch halved to 8 rows and going on"]
    assert sorted(got.arrays) == sorted(direct.arrays) and got.arrays["num_units"].sum() > 0
    for k in direct.arrays:
        np.testing.assert_array_equal(got.arrays[k], direct.arrays[k], err_msg=k)


# ----------------------------------------------------------------------------- recomputing the blocks (checkpointing)

def _counting(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("method,units", [("attribution", "neurons"), ("ig", "neurons"), ("hard-concrete", "neurons"),
                                          ("balanced-subnet", "neurons"), ("slimming", "neurons"),
                                          ("balanced-subnet", "weights"), ("durable", "weights")])
def test_recomputing_the_blocks_in_the_backward_pass_gives_the_same_localization(method, units):
    """--recompute on: each block of the planted GPT is computed again in the backward pass (its MLP runs more often
    than without), under the masks its forward pass saw, and the scores, the edit and the extraction equal a run
    that keeps every activation."""
    model, data = planted_model(), planted_data()
    opts = dict(method=method, units=units, k=2, batch_size=8, indices=tuple(range(0, len(data.canary), 2)),
                **({"steps": 5} if method in ("hard-concrete", "balanced-subnet", "slimming") else {}))
    fc = _counting(model.blocks[1].mlp.fc)
    kept = loc.localize(model, data, recompute="off", **opts)
    plain_calls, fc[0] = fc[0], 0
    again = loc.localize(model, data, recompute="on", **opts)
    assert fc[0] > plain_calls  # the recomputations
    assert sorted(again.arrays) == sorted(kept.arrays) and "scores" in kept.arrays
    for k, want in kept.arrays.items():
        if want.dtype.kind in "fc":
            np.testing.assert_allclose(again.arrays[k], want, rtol=1e-6, atol=1e-9, err_msg=k)
        else:
            np.testing.assert_array_equal(again.arrays[k], want, err_msg=k)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.blocks[1].mlp.fc._forward_hooks.clear()
    assert_untouched(model, state)
    assert all("forward" not in vars(b) for b in model.blocks)  # the blocks' own forward is back


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_recomputing_hugging_face_blocks_gives_the_same_gradients(family):
    """The same on Hugging Face decoder layers (keyword arguments, rotary tables, the embedding's tap before the
    first block): attribution's and ig's scores with and without recomputation agree."""
    pytest.importorskip("transformers")
    from memloc.tasks.lm.hf import build_hf
    torch.manual_seed(0)
    from memloc.core.recompute import blocks_of
    hf = build_hf(family, vocab_size=V, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16).eval()
    assert blocks_of(hf) is hf.get_submodule(f"hf.{hf.plan.blocks}")  # the decoder layers, not another list
    # the block's first norm (a recomputation may stop once it has every tensor the backward needs: early in the
    # block is always reached)
    calls = _counting(next(m for m in blocks_of(hf)[1].modules() if "norm" in type(m).__name__.lower()))
    data = planted_data(10)
    for method in ("attribution", "ig"):
        opts = dict(method=method, k=2, batch_size=4, indices=(0, 3, 10, 11), heads=True, ig_steps=3)
        calls[0] = 0
        kept = loc.localize(hf, data, recompute="off", **opts)
        plain, calls[0] = calls[0], 0
        again = loc.localize(hf, data, recompute="on", **opts)
        assert calls[0] > plain  # the recomputations
        assert np.abs(kept.arrays["scores"]).max() > 0
        np.testing.assert_allclose(again.arrays["scores"], kept.arrays["scores"], rtol=1e-5, atol=1e-8)


def test_auto_recomputes_only_when_few_rows_fit_and_says_so(monkeypatch):
    """auto: recomputation where fewer than 8 rows fit a backward pass without it and more fit with it (a fake
    free memory of 3 plain rows), with the larger batch and one line; nothing when the memory holds 8 rows, for a
    forward-only method, or with --batch-size."""
    from memloc.core import batching, budget
    from memloc.probes.localization.methods import _Localizer
    model, data = planted_model(), planted_data()
    shape = batching.model_shape(model)
    plain, lean = (batching.row_bytes(shape, BLOCK, backward=True, recompute=r) for r in (False, True))
    assert lean < plain
    task = task_of(data)
    cands = loc.candidate_layers(model, loc.LocalizeConfig())
    seqs, others = np.arange(0, 20, 2), np.arange(1, 30, 2)

    def localizer(free_rows: float, **kw) -> tuple[_Localizer, list[str]]:
        monkeypatch.setattr(budget, "free_memory", lambda device: int(free_rows * plain / batching.SHARE))
        lines: list[str] = []
        cfg = loc.LocalizeConfig(**{"method": "attribution", **kw})
        return _Localizer(model, task, cfg, cands, seqs, others, 2, lines.append), lines
    few, lines = localizer(3.5)
    assert few.recompute and few.rows == int(3.5 * plain) // lean > 3
    assert len(lines) == 1 and "3 rows fit a backward pass" in lines[0] and "--recompute off" in lines[0]
    for loc_, said in (localizer(9), localizer(3.5, method="zero-out"), localizer(3.5, batch_size=2),
                       localizer(3.5, recompute="off")):
        assert not loc_.recompute and not said
    assert localizer(9, recompute="on")[0].recompute


def test_recompute_on_refuses_a_model_without_blocks(digits_master, tmp_path, capsys):
    from conftest import copy_of
    from toys import assert_one_line_error
    run = copy_of(digits_master, tmp_path / "run")
    (tmp_path / "idx.txt").write_text("0\n1\n")
    code = main(["localize", str(run), "--method", "attribution", "--recompute", "on", "--indices",
                 str(tmp_path / "idx.txt"), "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, "--recompute on", "no list of blocks")
    assert not (run / "probes" / "localize").exists()


def test_the_held_out_extraction_and_perplexity_come_from_one_pass(tiny_run):
    """The --until sweep's held-out measurement: one pass gives the held-out rows' extraction and the perplexity,
    equal to the two passes it replaces (`_hits` and `heldout_perplexity` at the same batch) exactly, and the model
    is called once per batch, not twice."""
    from memloc.probes.localization import edit
    from memloc.probes.memorization import heldout_perplexity
    from memloc.tasks.experiment import open_run
    loaded = open_run(tiny_run, device="cpu")
    model, data = loaded.model(), loaded.data
    task = task_of(data)
    calls = _counting(model)
    hits, ppl = edit._heldout(model, task, batch_size=7, quality=True)
    one_pass = calls[0]
    assert one_pass == -(-len(data.x_test) // 7)
    assert torch.equal(hits, edit._hits(model, task, "test", batch_size=7))
    assert ppl == heldout_perplexity(model, data, batch_size=7) and ppl > 1
    assert edit._heldout(model, task, batch_size=7, quality=False)[1] is None
    planted = planted_model()
    q = edit._heldout(planted, task_of(planted_data()), batch_size=2, quality=True)[1]
    assert q == heldout_perplexity(planted, planted_data(), batch_size=2)
