"""The report of a language-model run: the task's subsets and words, and the memorization section first.

The run directory is written by hand from small arrays in the probes' formats (no training), so the
report is tested apart from the probes that make these files; the memorization sinks section is also
built from a small trained run evaluated with `memloc evaluate --drop-memorization`.
"""

import html
import json
import re

import numpy as np
import pytest
from toys import report_modules

import memloc.report as report  # the old names, forwarded to their modules
from memloc.cli import main
from memloc.core import figures
from memloc.core.runs import RunDir
from memloc.probes.base import ProbeResult
from memloc.report.canary_claims import _last_block_start
from memloc.report.sections.flipping import _units_per_layer

SUBSETS = ["corpus_train", "canary_train", "canary_heldout", "test"]
LAYERS = ["embed", "blocks.0.attn", "blocks.0.mlp", "head"]
LABELS = ["corpus-train extraction", "canary-train extraction", "held-out canary extraction",
          "held-out token accuracy"]


def _by_repeats() -> list[dict]:
    rows = []
    for r, rate in ((1, 0.0), (4, 0.5), (16, 1.0)):
        for fmt, exposure in (("secret", 2.0 * r ** 0.5), ("random", None), ("all", 2.0 * r ** 0.5)):
            rows.append({"repeats": r, "format": fmt, "n": 2 if fmt == "all" else 1, "trained_extracted": rate,
                         "in_context_extracted": rate, "heldout_extracted": None if r == 16 else 0.0,
                         "trained_loss": 4.0 / r, "heldout_loss": 9.0, "loss_gap": 9.0 - 4.0 / r,
                         "trained_exposure": exposure, "heldout_exposure": None if exposure is None else 0.5})
    return rows


def _memorization() -> ProbeResult:
    group = np.repeat([1, 4, 16], 4)  # (12,): per repeat group a trained and a held-out canary of each format
    trained = np.tile([True, False], 6)
    fmt = np.tile(np.repeat(["secret", "random"], 2), 3)
    exposure = np.where(fmt == "secret", np.where(trained, 6.0, 0.5), np.nan)
    rows = [{"canary": i, "format": str(fmt[i]), "trained": bool(trained[i]), "repeats": int(group[i] * trained[i]),
             "repeat_group": int(group[i]), "extracted": False, "loss": 3.0,
             "exposure": None if np.isnan(exposure[i]) else float(exposure[i]), "prefix": "the secret number is ",
             "secret": "1234"} for i in range(12)]
    summary = {"by_repeats": _by_repeats(), "heldout_perplexity": 7.9, "corpus_extracted": 0.0, "canaries": 12,
               "trained_canaries": 6, "exposure_methods": ["exact"]}
    arrays = {"canary_id": np.arange(12), "repeat_group": group, "trained": trained,
              "extracted": trained & (group == 16), "loss": np.full(12, 3.0), "exposure": exposure, "format": fmt}
    return ProbeResult("memorization", summary, arrays, rows)


def _sweep(probe: str, epochs: list[int]) -> ProbeResult:
    rng = np.random.default_rng(0)
    acc = rng.uniform(0, 1, (len(LAYERS), len(epochs), len(SUBSETS)))  # (layers, epochs, subsets)
    arrays = {"accuracy": acc, "layer_names": np.array(LAYERS), "epochs": np.array(epochs),
              "subsets": np.array(SUBSETS), "final": acc[0, -1]}
    return ProbeResult(probe, {"subsets": SUBSETS}, arrays)


def _flipping() -> ProbeResult:
    none = {"examples": 2, "already_wrong": 2, "searched": 0, "flipped_share": None, "median_units": None,
            "mean_units": None, "share_flipped_under_10": None, "mean_train_acc_drop": None, "layer_share": [0.0] * 3,
            "layers_used": 0}
    canary = {"examples": 2, "already_wrong": 0, "searched": 2, "flipped_share": 1.0, "median_units": 2.0,
              "mean_units": 2.0, "share_flipped_under_10": 1.0, "mean_train_acc_drop": 0.01,
              "layer_share": [0.5, 0.5, 0.0], "layers_used": 2}
    summary = {"kinds": {"corpus": none, "canary": canary}, "examples": 4, "others": 16, "budget_units": 20,
               "candidate_units": 200}
    unit_layer = np.full((4, 20), -1)  # (E, cap): the model layer of each removed unit
    unit_layer[2, :2], unit_layer[3, :2] = [1, 2], [2, 2]
    arrays = {"kind": np.array(["corpus", "corpus", "canary", "canary"]), "already_wrong": np.array([1, 1, 0, 0], bool),
              "label": np.array([-1, -1, 0, 8]),  # the canaries of the sequences: trained, at 1 and 16 repeats
              "flipped": np.array([0, 0, 1, 1], bool), "num_units": np.array([0, 0, 2, 2]), "unit_layer": unit_layer,
              "layer_names": np.array(LAYERS[1:]), "layer_index": np.arange(1, 4)}
    return ProbeResult("flipping", summary, arrays)


def _lm_run(path, *, memorization: bool = True) -> RunDir:
    run = RunDir.create(path)
    run.write_json("config.json", {
        "task": "lm",
        "data": {"corpus": "bible", "tokenizer": "bytes", "block_size": 64, "canaries": 1, "repeats": [1, 4, 16],
                 "canary_formats": ["secret", "random"], "secret_digits": 4},
        "model": {"name": "gpt", "width": None, "n_layer": 2, "n_head": 4, "n_embd": 64, "p_gen": None},
        "train": {"epochs": 4}})
    run.write_metrics([{"epoch": e, "train_loss": 3.0 - 0.3 * e, **{f"{s}_acc": 0.1 * e for s in SUBSETS}}
                       for e in range(1, 5)])
    run.save_arrays("gradients.npz", layer_names=np.array(LAYERS), clean_norm=np.ones((4, 4)),
                    noisy_norm=np.full((4, 4), 0.5), cosine=np.full((4, 4), -0.2), epochs=np.arange(1, 5))
    for result in (_sweep("rewinding", [0, 2, 4]), _sweep("retraining", [0, 1, 2]), _flipping(),
                   *([_memorization()] if memorization else [])):
        result.save(run)
    return run


def _build_report(path) -> tuple[str, list[str]]:
    """Build a run's report: (report.html's text, every text its figures draw)."""
    drawn: list[str] = []
    real = figures.png

    def png(fig):
        import matplotlib.text
        drawn.extend(t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text())
        return real(fig)
    with pytest.MonkeyPatch.context() as mp:
        for module in report_modules():  # every section draws its own figures
            mp.setattr(module, "png", png)
        page = report.build_report(path)
    assert page == path / "report" / "report.html" and page.exists()
    return page.read_text(), drawn


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A language-model run with its report built once: (run, report.html's text, every text the figures draw)."""
    run = _lm_run(tmp_path_factory.mktemp("lm_report") / "lm")
    return run, *_build_report(run.path)


def _headings(page: str) -> list[str]:
    return [html.unescape(h) for h in re.findall(r"<h2 id='s\d+'>(.*?)</h2>", page)]


def test_the_report_of_a_language_model_run(built):
    run, text, drawn = built
    headings = _headings(text)
    # the paper's claims first, then the memorization section for a language model
    assert headings[:2] == ["Summary: the paper's claims, measured", "Where memorization rises with repetition"]
    assert "Learning curves" in headings and "Layer rewinding" in headings
    assert not any("noisy" in h.lower() or "mislabeled" in h.lower() for h in headings)
    assert "Detecting mislabeled examples" not in text  # detection measures classifiers only
    plain = re.sub(r"base64,[^']*", "", text)  # the page without its images
    assert "noisy" not in plain.lower() and "mislabeled" not in plain.lower()
    for alt in ("memorization_extraction", "memorization_exposure", "learning_curves", "gradient_norms", "rewinding",
                "retraining", "flipping", "flipping_canaries"):
        assert f"<img alt='{alt}' src='data:image/png;base64," in text, alt
    assert text.count("<img ") == 9  # and gradient_cosine
    intro = re.search(r"<p class='note'>Run (.*?)</p>", text).group(1)
    assert "gpt (2 layers, 4 heads, n_embd 64) on bible" in intro and "width" not in intro
    # the subsets under their language-model names, in the figures and the captions
    for label in LABELS:
        assert label in drawn, label
    assert any(label.lower() in text.lower() for label in LABELS)
    assert not any("noisy" in t or "clean" in t for t in drawn), [t for t in drawn if "noisy" in t or "clean" in t]
    # the table by repeat count: percentages with one decimal, a dash for null, never "None"
    assert "None" not in plain
    table = text[text.index("Per repeat count and canary format"):]
    table = table[:table.index("</table>")]
    assert "<td>50.0%</td>" in table and "<td>100.0%</td>" in table and "<td>—</td>" in table
    assert table.count("<tr>") == 1 + len(_by_repeats())
    assert (run.path / "report" / "tables" / "summary_memorization.csv").exists()


def test_the_report_of_a_language_model_is_rebuilt_identically(built):
    run, text, _ = built
    rep = run.path / "report"
    before = {p.relative_to(rep): p.read_bytes() for p in rep.rglob("*") if p.is_file()}
    assert report.build_report(run.path).read_text() == text
    assert before == {p.relative_to(rep): p.read_bytes() for p in rep.rglob("*") if p.is_file()}


def test_a_language_model_run_without_the_memorization_probe_says_how_to_run_it(tmp_path):
    run = _lm_run(tmp_path / "lm", memorization=False)
    sec = report.memorization(run)
    assert sec.title == "Where memorization rises with repetition" and not sec.figures
    assert sec.missing == f"not run: `memloc memorization {run.path}`"


def test_the_task_of_a_run_decides_the_compared_subsets(tmp_path):
    run = _lm_run(tmp_path / "lm", memorization=False)
    lm = report.task_words(run)
    assert (lm.memorized, lm.reference, lm.memorized_kind) == ("canary_train", "corpus_train", "canary")
    cfg = json.loads((run.path / "config.json").read_text())
    for task in (None, "unknown", 42):  # absent, unknown or damaged: a classification run, as before tasks
        cfg["task"] = task
        run.write_json("config.json", cfg)
        assert report.task_words(run).memorized == "noisy_train"


def test_the_flipping_section_of_a_language_model_shows_units_by_repeat_count_and_by_layer(built, tmp_path):
    run, text, drawn = built
    assert "units removed per canary sequence, by repeat count" in drawn and "where the removed units are" in drawn
    assert "1\n(n = 1)" in drawn and "16\n(n = 1)" in drawn  # one column per repeat count of the searched canaries
    table = (run.path / "report" / "tables" / "summary_flipping_repeats.csv").read_text().splitlines()
    assert table == ["repeats,searched,no longer extracted,median units,mean units", "1,1,1,2.0,2.0",
                     "16,1,1,2.0,2.0"]
    per_layer = _units_per_layer(ProbeResult.load(run, "flipping").arrays)
    assert per_layer[0] == LAYERS[1:] and per_layer[1].tolist() == [1, 3, 0]
    alone = _lm_run(tmp_path / "lm", memorization=False)  # no canary -> repeat count: the layers alone, and how
    sec = report.flipping(alone)
    assert [f.name for f in sec.figures] == ["flipping", "flipping_canaries"]
    assert f"`memloc memorization {alone.path}`" in " ".join(sec.notes)
    assert "summary_flipping_repeats" not in [t.name for t in sec.tables]


# ----------------------------------------------------------------------------- the claims table of a language model

BLOCKS = ["embed", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp", "head"]
FINAL = {"corpus_train": 0.0, "canary_train": 0.8, "canary_heldout": 0.0, "test": 0.6}


def _verdict(run: RunDir, key: str) -> tuple[str, str]:
    """(our number, verdict) of one claim of the language model's table."""
    rows = {r["claim"]: r for r in report.lm_claims(run)}
    assert len(rows) == len(report.LM_CLAIMS)
    row = rows[report.LM_CLAIMS[key][0]]
    assert row["verdict"] in ("holds", "does not hold") or row["verdict"].startswith("not measured"), row
    if row["verdict"] in ("holds", "does not hold"):
        assert "holds if" in row["ours"], row  # the measure's threshold, stated in the row
    return row["ours"], row["verdict"]


def _layer_sweep(probe: str, epochs: list[int], column: int, canary: list[float], test: list[float], *,
                 final: dict = FINAL, reset: list[float] | None = None) -> ProbeResult:
    """A sweep over BLOCKS whose `column` (rewound to / retrained for) has the given canary-train extraction and
    held-out token accuracy per layer, and column 0 (right after retraining's reset) the canary-train extraction
    `reset`; every other cell is the final model's."""
    acc = np.tile([final[s] for s in SUBSETS], (len(BLOCKS), len(epochs), 1))  # (layers, epochs, subsets)
    if reset is not None:
        acc[:, 0, SUBSETS.index("canary_train")] = reset
    acc[:, column, SUBSETS.index("canary_train")] = canary
    acc[:, column, SUBSETS.index("test")] = test
    return ProbeResult(probe, {"subsets": SUBSETS}, {"accuracy": acc, "layer_names": np.array(BLOCKS),
                                                     "epochs": np.array(epochs), "subsets": np.array(SUBSETS),
                                                     "final": np.array([final[s] for s in SUBSETS])})


def _remove(run: RunDir, probe: str) -> None:
    (run.path / "probes" / probe / "summary.json").unlink()


def test_the_claims_table_of_a_language_model_comes_first_with_every_claim(built):
    run, text, _ = built
    table = text[text.index("Each claim with our number"):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == 1 + len(report.LM_CLAIMS)
    assert all(html.escape(claim) in table for claim, _ in report.LM_CLAIMS.values())
    rows = (run.path / "report" / "tables" / "summary_claims.csv").read_text()
    assert rows.startswith("claim,paper,ours,verdict")


def test_claim_memorization_rises_with_repetition(tmp_path):
    run = _lm_run(tmp_path / "clear")  # in-context extraction 0% -> 100%, exposure 2 -> 8 bits
    ours, verdict = _verdict(run, "repetition")
    assert verdict == "holds" and "+100.0 points" in ours and "2.0 bits at 1 repeat → 8.0 at 16 repeats" in ours
    mem = _memorization()
    for r in mem.summary["by_repeats"]:
        r["in_context_extracted"] = 0.3  # as often extracted seen once as 16 times
    mem.save(run)
    ours, verdict = _verdict(run, "repetition")
    assert verdict == "does not hold" and "+0.0 points" in ours
    mem = _memorization()
    for r in mem.summary["by_repeats"]:  # extraction rises, exposure falls
        r["trained_exposure"] = None if r["trained_exposure"] is None else 10.0 / r["repeats"]
    mem.save(run)
    ours, verdict = _verdict(run, "repetition")
    assert verdict == "does not hold" and "10.0 bits at 1 repeat → 0.6 at 16 repeats" in ours
    _remove(run, "memorization")
    assert _verdict(run, "repetition") == ("—", f"not measured (run `memloc memorization {run.path}`)")


def test_claim_heldout_canaries_are_never_extracted(tmp_path):
    run = _lm_run(tmp_path / "lm")
    ours, verdict = _verdict(run, "heldout")
    assert verdict == "holds" and "at most 0.0% over 6 rows" in ours and "0 of 6 held-out canaries" in ours
    mem = _memorization()
    mem.summary["by_repeats"][0]["heldout_extracted"] = 0.5
    mem.arrays["extracted"] = mem.arrays["extracted"] | (np.arange(12) == 1)
    mem.save(run)
    ours, verdict = _verdict(run, "heldout")
    assert verdict == "does not hold" and "at most 50.0%" in ours and "1 of 6 held-out canaries" in ours
    _remove(run, "memorization")
    assert _verdict(run, "heldout")[1] == f"not measured (run `memloc memorization {run.path}`)"


def test_claims_gradient_norm_comparable_and_opposed(tmp_path):
    run = _lm_run(tmp_path / "lm")  # canary/corpus 0.5 everywhere, cosine -0.2
    norm, cos = np.ones((4, 8)), np.full((4, 8), -0.2)  # (layers, epochs): the first quarter is epochs 1-2
    norm[2, :2] = 0.8  # the mean of the per-epoch ratios, not of the norms
    norm[2, 2:] = 100.0
    run.save_arrays("gradients.npz", layer_names=np.array(LAYERS), clean_norm=np.ones((4, 8)), noisy_norm=norm,
                    cosine=cos, epochs=np.arange(1, 9))
    ours, verdict = _verdict(run, "gradient_norm")
    assert verdict == "holds" and "epochs 1–2 of 8: 0.80 (blocks.0.mlp) to 1.00 (embed)" in ours
    assert _verdict(run, "gradient_cosine")[1] == "holds"
    norm[1, :2], cos[3, :2] = 0.1, 0.3  # one layer's canaries barely move it; another's agree with the corpus
    cos[3, 2:] = -0.5
    run.save_arrays("gradients.npz", layer_names=np.array(LAYERS), clean_norm=np.ones((4, 8)), noisy_norm=norm,
                    cosine=cos, epochs=np.arange(1, 9))
    ours, verdict = _verdict(run, "gradient_norm")
    assert verdict == "does not hold" and "0.10 (blocks.0.attn)" in ours
    ours, verdict = _verdict(run, "gradient_cosine")
    assert verdict == "does not hold" and "-0.20 to 0.30 (all epochs: -0.30 to -0.20;" in ours
    (run.path / "gradients.npz").unlink()
    for key in ("gradient_norm", "gradient_cosine"):
        assert _verdict(run, key)[1].startswith("not measured (no gradients.npz")


def test_claim_memorization_is_not_confined_to_the_last_layers(tmp_path):
    run = _lm_run(tmp_path / "lm")
    keep = [0.1, 0.6, 0.6, 0.6, 0.55, 0.2]  # held-out token accuracy; embed and head break the model
    cases = {  # canary-train extraction of each layer rewound to epoch 0 (final 80%): verdict
        "holds": ([0.0, 0.3, 0.6, 0.5, 0.1, 0.0], keep),  # blocks.0.attn, blocks.1.mlp halve it
        "only the last block": ([0.0, 0.8, 0.7, 0.4, 0.1, 0.0], keep),
        "null": ([0.0, 0.8, 0.8, 0.8, 0.8, 0.0], keep),  # embed and head "halve" it by breaking the model
        "broken": ([0.0, 0.1, 0.1, 0.1, 0.1, 0.0], [0.1, 0.3, 0.3, 0.3, 0.3, 0.2]),
    }
    for case, (canary, test) in cases.items():
        _layer_sweep("rewinding", [0, 4, 8], 0, canary, test).save(run)
        ours, verdict = _verdict(run, "rewinding")
        assert verdict == ("holds" if case == "holds" else "does not hold"), (case, ours)
        if case == "holds":
            assert "2 of 4 layers" in ours and "within 10 points of 60.0%" in ours
            assert "most: blocks.1.mlp (10.0%)" in ours
    _layer_sweep("rewinding", [0, 8], 0, [0.0] * 6, keep, final={**FINAL, "canary_train": 0.05}).save(run)
    assert _verdict(run, "rewinding")[1].startswith("not measured: the final model extracts 5.0%")
    _remove(run, "rewinding")
    assert _verdict(run, "rewinding")[1] == f"not measured (run `memloc rewind {run.path}`)"
    assert _last_block_start(BLOCKS) == 3 and _last_block_start(["conv1", "fc"]) == 1
    assert _last_block_start(["wte", "transformer.h.10.mlp", "transformer.h.11.attn", "lm_head"]) == 2


def test_claim_retraining_brings_the_canaries_back(tmp_path):
    """Only layers whose reset erased the canaries (extraction more than 10 points below the final 80%) count:
    a layer the reset left in place has nothing to bring back."""
    run = _lm_run(tmp_path / "lm")
    after = [0.0, 0.75, 0.8, 0.9, 0.72, 0.1]
    # erased: embed, blocks.0.attn, blocks.0.mlp, blocks.1.mlp, head; blocks.1.attn never lost (0.9)
    _layer_sweep("retraining", [0, 1, 2], -1, after, [0.6] * 6, reset=[0.0, 0.2, 0.1, 0.9, 0.3, 0.0]).save(run)
    ours, verdict = _verdict(run, "retraining")
    assert verdict == "holds", ours
    assert ours.startswith("3 of the 5 layers whose reset took canary-train extraction more than 10 points below "
                           "the final 80.0% end back within 10 points; 1 never lost"), ours
    # the same end state, but three of the four layers "back" had never lost the canaries: 1 of 3 erased is back
    _layer_sweep("retraining", [0, 1, 2], -1, after, [0.6] * 6, reset=[0.0, 0.9, 0.8, 0.9, 0.3, 0.0]).save(run)
    ours, verdict = _verdict(run, "retraining")
    assert verdict == "does not hold" and ours.startswith("1 of the 3 layers") and "3 never lost" in ours, ours
    _layer_sweep("retraining", [0, 1, 2], -1, [0.0, 0.3, 0.2, 0.4, 0.1, 0.0], [0.6] * 6, reset=[0.0] * 6).save(run)
    ours, verdict = _verdict(run, "retraining")
    assert verdict == "does not hold" and ours.startswith("0 of the 6") and "best erased blocks.1.attn: 40.0%" in ours
    # no layer erased by its reset: nothing was tested
    _layer_sweep("retraining", [0, 1, 2], -1, after, [0.6] * 6, reset=[0.8] * 6).save(run)
    assert _verdict(run, "retraining")[1] == ("not measured: no layer's reset took canary-train extraction more than "
                                              "10 points below 80.0%")
    _remove(run, "retraining")
    assert _verdict(run, "retraining")[1] == f"not measured (run `memloc retrain {run.path}`)"


def test_claims_a_few_units_remove_a_canary_at_little_cost(tmp_path):
    run = _lm_run(tmp_path / "lm")
    flip = _flipping()
    flip.summary["kinds"]["canary"]["mean_test_acc_drop"] = 0.005
    flip.save(run)
    ours, verdict = _verdict(run, "few_units")
    assert verdict == "holds" and ours.startswith("median 2 units")
    ours, verdict = _verdict(run, "cost")
    assert verdict == "holds" and "drop 0.5 points" in ours
    flip.summary["kinds"]["canary"].update(median_units=40.0, mean_test_acc_drop=0.106)
    flip.save(run)
    assert _verdict(run, "few_units")[1] == "does not hold"
    ours, verdict = _verdict(run, "cost")
    assert verdict == "does not hold" and "drop 10.6 points" in ours
    del flip.summary["kinds"]["canary"]["mean_test_acc_drop"]  # not evaluated on held-out sequences
    flip.save(run)
    assert _verdict(run, "cost")[1].startswith("not measured (the flipping probe did not evaluate")
    _remove(run, "flipping")
    for key in ("few_units", "cost", "harder"):
        assert _verdict(run, key)[1] == f"not measured (run `memloc flip {run.path}`)"


def test_claim_more_repeats_make_a_canary_harder_to_remove(tmp_path):
    run = _lm_run(tmp_path / "lm")
    flip = _flipping()
    flip.arrays.update(kind=np.array(["canary"] * 4), already_wrong=np.zeros(4, bool),
                       label=np.array([0, 4, 8, 8]),  # canaries trained at 1, 4 and 16 repeats
                       flipped=np.ones(4, bool), num_units=np.array([1, 3, 9, 7]))
    flip.save(run)
    ours, verdict = _verdict(run, "harder")
    assert verdict == "holds" and "mean units 1.0 at 1 repeat (n = 1) → 8.0 at 16 repeats (n = 2)" in ours
    flip.arrays["num_units"] = np.array([4, 3, 4, 4])
    flip.save(run)
    assert _verdict(run, "harder")[1] == "does not hold"
    flip.arrays["label"] = np.array([8, 8, 8, 8])  # one repeat count only
    flip.save(run)
    assert _verdict(run, "harder")[1].startswith("not measured (the removed canaries have fewer than two")
    _remove(run, "memorization")
    assert _verdict(run, "harder")[1] == f"not measured (run `memloc memorization {run.path}`)"


# ----------------------------------------------------------------------------- memorization sinks

def _sinks_summary(extracted: tuple[float, float], gap: tuple[float, float], ppl: tuple[float, float]) -> dict:
    """memloc.methods.sinks's summary with the canaries repeated >= 16x extracted, their loss gap and the held-out
    perplexity (eval, drop) as given, before -> after; one row by repeat count."""
    (e0, e1), (g0, g1), (p0, p1) = extracted, gap, ppl
    pooled = [{"n": 2, "extracted": e, "in_context": e, "heldout_extracted": 0.0, "loss": 9.0 - g,
               "heldout_loss": 9.0, "loss_gap": g, "exposure": None, "heldout_exposure": None}
              for e, g in ((e0, g0), (e1, g1))]
    row = {"repeats": 16, "format": "all", "n": 2, "gap_closed": 1 - g1 / g0}
    for key, (b, a) in {"trained_extracted": (e0, e1), "in_context_extracted": (e0, e1),
                        "heldout_extracted": (0.0, 0.0), "trained_loss": (9.0 - g0, 9.0 - g1),
                        "heldout_loss": (9.0, 9.0), "loss_gap": (g0, g1), "trained_exposure": (None, None),
                        "heldout_exposure": (None, None)}.items():
        row[f"{key}_before"], row[f"{key}_after"] = b, a
    return {"tie": "document", "drop_scale": "matched", "layers": 2, "p_gen": 0.5, "p_mem": 0.2, "repeated": 16,
            "by_repeats": [row], "repeated_before": pooled[0], "repeated_after": pooled[1],
            "extraction_fall": 1 - e1 / e0 if e0 else None, "gap_closed": 1 - g1 / g0,
            "heldout_perplexity_eval": p0, "heldout_perplexity_drop": p1, "perplexity_rise": p1 / p0 - 1,
            "corpus_extracted_before": 0.0, "corpus_extracted_after": 0.0}


def _sinks_claim(run: RunDir) -> dict | None:
    rows = report.lm_claims(run)
    assert len(rows) in (len(report.LM_CLAIMS), len(report.LM_CLAIMS) + 1)
    return rows[-1] if len(rows) > len(report.LM_CLAIMS) else None


def test_claim_memorization_sinks_remove_the_repeated_canaries(tmp_path):
    run = _lm_run(tmp_path / "lm")
    assert _sinks_claim(run) is None  # asked only of a run whose sinks were evaluated
    cases = {  # extraction, loss gap (nats) and held-out perplexity, before -> after: verdict
        "holds": ((0.9, 0.1), (8.0, 2.0), (10.0, 10.2)),
        "does not hold": ((0.9, 0.1), (8.0, 2.0), (10.0, 11.0)),  # +10% perplexity
        "not measured": ((0.05, 0.0), (8.0, 2.0), (10.0, 10.2)),  # hardly extracted before the drop
    }
    for verdict, numbers in cases.items():
        ProbeResult("dropout", _sinks_summary(*numbers)).save(run)
        row = _sinks_claim(run)
        assert row["claim"] == report.LM_SINKS_CLAIM[0].format(repeated=16) and "(>= 16x)" in row["claim"]
        assert row["verdict"].startswith(verdict), (verdict, row)
        assert "holds if extraction falls ≥ 80%, the gap closes ≥ 50% and perplexity rises ≤ 5%" in row["ours"]
    assert "extraction 5.0% → 0.0%" in row["ours"] and "loss gap 8.00 → 2.00 nats (closed 75.0%)" in row["ours"]
    assert "10.000 (eval) → 10.200 (drop), +2.0%" in row["ours"]
    ProbeResult("dropout", _sinks_summary((0.05, 0.0), (8.0, 6.0), (10.0, 10.2))).save(run)
    assert _sinks_claim(run)["verdict"] == "does not hold"  # the gap closes 25%: fails whatever extraction says


@pytest.fixture(scope="module")
def sinks_run(tmp_path_factory) -> RunDir:
    """A small language model trained with memorization sinks, evaluated before and after dropping them."""
    out = tmp_path_factory.mktemp("sinks") / "run"
    assert main(["train", "--task", "lm", "--preset", "smoke", "--memorization-sinks", "0.5,0.2", "--epochs", "2",
                 "--sequences", "300", "--no-gradient-accounting", "--out", str(out), "--quiet"]) == 0
    assert main(["evaluate", str(out), "--drop-memorization", "--no-exposure"]) == 0
    return RunDir.open(out)


def test_the_report_of_a_memorization_sinks_run(sinks_run):
    run = sinks_run
    summary = ProbeResult.load(run, "dropout").summary
    text, drawn = _build_report(run.path)
    headings = _headings(text)
    assert "Memorization sinks" in headings and "Example-tied dropout" not in headings
    section = text[text.index(">Memorization sinks</h2>"):]
    section = section[:section.index("<h2")]
    assert "<img alt='dropout_sinks' src='data:image/png;base64," in section and "Missing" not in section
    for words in ("extraction in the training context", "the canaries' loss gap", "trained, tied (its own sinks)",
                  "trained, drop (sinks removed)", "held-out, tied"):
        assert words in drawn, words
    assert "training sequences holding each canary (repeats, log2 axis)" in drawn
    # the headline table, then one row per repeat count with each measure before -> after
    headline = (run.path / "report" / "tables" / "summary_dropout.csv").read_text()
    assert "canaries repeated ≥ 16x extracted from their own prefix" in headline
    assert f"{summary['heldout_perplexity_eval']:.3f} (eval mode),{summary['heldout_perplexity_drop']:.3f}" in headline
    table = section[section.index("Per repeat count over all canary formats"):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == 1 + 3  # repeats 1, 4, 16
    for r in (r for r in summary["by_repeats"] if r["format"] == "all"):
        assert f"<td>{r['loss_gap_before']:.3f} → {r['loss_gap_after']:.3f}</td>" in table
    # the claim, after the paper's, with the measured numbers
    claims = text[text.index("Each claim with our number"):]
    claims = claims[:claims.index("</table>")]
    assert claims.count("<tr>") == 1 + len(report.LM_CLAIMS) + 1
    row = report.lm_claims(run)[-1]
    assert row["claim"].startswith("memorization sinks: dropping the sinks removes the repeated canaries (>= 16x)")
    assert row["verdict"] in ("holds", "does not hold") or row["verdict"].startswith("not measured: ")
    assert f"held-out perplexity {summary['heldout_perplexity_eval']:.3f} (eval)" in row["ours"]
    assert html.escape(row["ours"]) in claims


def test_the_dropout_section_of_an_image_run_is_unchanged(tmp_path):
    run = RunDir.create(tmp_path / "etd")
    run.write_json("config.json", {"model": {"name": "cnn", "p_gen": 0.4, "p_mem": 0.1}, "data": {}, "train": {}})
    ProbeResult("dropout", {"p_gen": 0.4, "p_mem": 0.1, "drop_scale": "matched", "clean_before": 1.0,
                            "clean_after": 0.95, "noisy_before": 1.0, "noisy_after": 0.02, "noisy_true_before": 0.0,
                            "noisy_true_after": 0.6, "test_eval": 0.9, "test_drop": 0.88,
                            "forgotten_clean": 3}).save(run)
    sec = report.dropout_section(run)
    assert sec.title == "Example-tied dropout" and not sec.missing
    assert [t.name for t in sec.tables] == ["summary_dropout"]
    assert [r["after (drop)"] for r in sec.tables[0].rows] == ["95.0%", "2.0%", "60.0%", "88.0%"]
    assert sec.notes == ["3 clean examples forgotten by the drop (indices in probes/dropout/arrays.npz)."]
    assert report.dropout_section(run, "Dropout model").title == "Dropout model"
