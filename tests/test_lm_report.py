"""The report of a language-model run: the task's subsets and words, and the memorization section first.

The run directory is written by hand from small arrays in the probes' formats (no training), so the
report is tested apart from the probes that make these files.
"""

import json
import re

import numpy as np
import pytest

from memloc import report
from memloc.probes.base import ProbeResult
from memloc.runs import RunDir

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
    arrays = {"kind": np.array(["corpus", "corpus", "canary", "canary"]), "already_wrong": np.array([1, 1, 0, 0], bool),
              "num_units": np.array([0, 0, 2, 2]), "layer_names": np.array(LAYERS[1:]), "layer_index": np.arange(1, 4)}
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


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A language-model run with its report built once: (run, report.html's text, every text the figures draw)."""
    run = _lm_run(tmp_path_factory.mktemp("lm_report") / "lm")
    drawn: list[str] = []
    real = report.png

    def png(fig):
        import matplotlib.text
        drawn.extend(t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text())
        return real(fig)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "png", png)
        page = report.build_report(run.path)
    assert page == run.path / "report" / "report.html" and page.exists()
    return run, page.read_text(), drawn


def _headings(page: str) -> list[str]:
    return re.findall(r"<h2 id='s\d+'>(.*?)</h2>", page)


def test_the_report_of_a_language_model_run(built):
    run, text, drawn = built
    headings = _headings(text)
    assert headings[0] == "Where memorization rises with repetition"  # first for a language model
    assert "Learning curves" in headings and "Layer rewinding" in headings
    assert not any("noisy" in h.lower() or "mislabeled" in h.lower() for h in headings)
    assert "Detecting mislabeled examples" not in text  # detection measures classifiers only
    plain = re.sub(r"base64,[^']*", "", text)  # the page without its images
    assert "noisy" not in plain.lower() and "mislabeled" not in plain.lower()
    for alt in ("memorization_extraction", "memorization_exposure", "learning_curves", "gradient_norms", "rewinding",
                "retraining", "flipping"):
        assert f"<img alt='{alt}' src='data:image/png;base64," in text, alt
    assert text.count("<img ") == 8  # and gradient_cosine
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
