"""The bench-localize page is built from bench.json's dict alone: one self-contained file, a figure per trade-off,
every method named, and a page (not a crash) for empty or broken rows."""

import json
import re

import numpy as np
import pytest

from memloc.bench.page import bench_sections, write_bench_report

TINYMEM_METHODS = ["greedy", "balanced-subnet", "random"]
DEL_METHODS = ["zero-out", "hard-concrete", "random"]


def _info(benchmark: str, rows, methods, **extra) -> dict:
    return {"kind": "bench-localize", "benchmark": benchmark, "preset": "smoke", "done": True,
            "settings": {"benchmark": benchmark, "methods": methods, "n_layers": [2, 4],
                         "data": {"families": [2, 7], "seed": 0}, "method_steps": {}},
            "scale": None, "machine": {"platform": "Linux", "torch_threads": 1, "device": "cpu"},
            "date": "2026-01-01 00:00 UTC", "elapsed_s": 12.3, "summary": ["a summary line", "another <b>line</b>"],
            "rows": rows, **extra}


def _tinymem_rows(fractions=(0.01, 0.02), methods=TINYMEM_METHODS, layers=(2, 4)) -> list[dict]:
    rows = []
    for n in layers:
        before = {"n_layer": n, "units": 512 * n, "artifacts": 60, "memorized_before": 0.5, "acc_before": 0.95,
                  "ppl_before": 1.1, "clean_extraction_before": 0.9}
        for i, m in enumerate(methods):
            for j, f in enumerate(fractions):
                after = 0.5 - 0.1 * (j + 1) * (i + 1) / len(methods)
                rows.append(dict(before, method=m, fraction=f, k=int(512 * n * f), localized=10,
                                 memorized_after=after, removed=1 - after / 0.5, acc_after=0.95 - 0.01 * j,
                                 rel_acc_change=-0.01 * j / 0.95, ppl_after=1.1 + 0.02 * (i + j),
                                 clean_extraction_after=0.8, scoring_s=1.5, wall_s=2.0,
                                 published=f"published {m}", train_s=None if n == 4 else 10.0))
    rows[1]["ppl_after"] = None  # a value missing: a gap, not a crash
    rows[2]["rel_acc_change"] = None
    rows += [{"n_layer": 8, "units": 4096, "artifacts": 60, "memorized_before": 0.0, "method": m,
              "note": "no artifact memorized: nothing to localize"} for m in methods]
    return rows


def _inj_rows() -> list[dict]:
    rows = []
    for ratio, k in ((0.001, 1), (0.01, 6)):
        for i, m in enumerate(["greedy", "activations", "slimming", "random"]):
            rows.append({"n_layer": 2, "method": m, "ratio": ratio, "k_per_layer": k, "sequences": 2,
                         "injected_extracted": 1.0, "recall_pooled": None if m == "slimming" else 0.2 * i,
                         "recall_per_layer": [0.1 * i, 0.3], "scoring_s": 0.5,
                         "mempi_rank": None if m == "greedy" else i, "published": "ranking A > B", "train_s": None})
    return rows


def _del_rows() -> list[dict]:
    rows = []
    for ratio, k in ((0.001, 1), (0.005, 2), (0.02, 8)):
        for i, m in enumerate(DEL_METHODS):
            self_after, others_after = 0.9 - 0.3 * i * ratio * 50, 0.9 - 0.1 * i * ratio * 50
            rows.append({"n_layer": 4, "method": m, "ratio": ratio, "k_per_layer": k, "sequences": 3,
                         "memorized": 5, "self_acc_before": 0.95, "self_acc_after": self_after,
                         "self_extracted_before": 1.0, "self_extracted_after": 0.5, "others_acc_before": 0.94,
                         "others_acc_after": others_after, "others_extracted_before": 1.0,
                         "others_extracted_after": 0.9, "specificity": (0.95 - self_after) - (0.94 - others_after),
                         "ppl_before": 20.0, "ppl_after": 20.0 + i, "rel_ppl_change": i / 20.0, "scoring_s": 3.0,
                         "mempi_rank": {"zero-out": 3, "hard-concrete": 1, "random": 6}[m], "run": "runs/lm-smoke"})
    rows[0]["self_acc_after"] = None
    return rows


def _images(text: str) -> list[str]:
    return re.findall(r"<img alt='([^']*)' src='data:image/png;base64,", text)


def _self_contained(text: str) -> bool:
    """No resource outside the page: every src is a data URI, every href an anchor of the page."""
    srcs, hrefs = re.findall(r"src=['\"]([^'\"]*)", text), re.findall(r"href=['\"]([^'\"]*)", text)
    return (all(s.startswith("data:") for s in srcs) and all(h.startswith("#") for h in hrefs)
            and "<link" not in text and "<script" not in text)


def test_tinymem_page_has_both_tradeoffs_and_every_method(tmp_path):
    page = write_bench_report(tmp_path, _info("tinymem", _tinymem_rows(), TINYMEM_METHODS))
    assert page == tmp_path / "report" / "index.html"
    assert sorted(p.name for p in page.parent.iterdir()) == ["index.html"]  # no figures/ or tables/ beside it
    text = page.read_text()
    assert _self_contained(text)
    assert _images(text) == ["tinymem_tradeoff_perplexity", "tinymem_tradeoff_accuracy"]
    assert "could not be drawn" not in text
    for m in TINYMEM_METHODS:
        assert f"<td>{m}</td>" in text and f"published {m}" in text
    assert "8 layers (memorized before: 0.0%): no artifact memorized: nothing to localize" in text
    assert "a summary line" in text and "another &lt;b&gt;line&lt;/b&gt;" in text  # the summary, escaped
    assert "2 layers: memorized before 50.0%" in text and "4 layers: memorized before 50.0%" in text
    assert "<td>data</td><td>families=2, 7; seed=0</td>" in text and "2026-01-01 00:00 UTC" in text


def test_tinymem_sections_leave_noted_rows_out_of_the_figures():
    figures, tables, settings = bench_sections(_info("tinymem", _tinymem_rows(), TINYMEM_METHODS))
    assert len(figures.figures) == 2 and not tables.figures
    assert [t.name for t in tables.tables] == ["summary_tinymem_2l", "summary_tinymem_4l", "summary_tinymem_8l"]
    noted = tables.tables[-1].rows
    assert [r["method"] for r in noted] == TINYMEM_METHODS and noted[0]["memorized after"] == "—"
    assert settings.title == "Settings, machine and date"


def test_long_tables_are_shown_whole(tmp_path):
    methods = ["greedy", "zero-out", "activations", "ig", "slimming", "hard-concrete", "balanced-subnet", "random"]
    rows = _tinymem_rows(fractions=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2), methods=methods, layers=(2,))
    text = write_bench_report(tmp_path, _info("tinymem", rows, methods)).read_text()
    assert "more rows in the CSV" not in text and "tables/" not in text
    assert text.count("<tr><td>greedy</td>") == 6 + 1 and "part 2 of 2" in text  # and the noted row of 8 layers


def test_inj_page_has_recall_bars_and_per_layer_recall(tmp_path):
    methods = ["greedy", "activations", "slimming", "random"]
    text = write_bench_report(tmp_path, _info("inj", _inj_rows(), methods)).read_text()
    assert _self_contained(text)
    assert _images(text) == ["inj_recall", "inj_recall_per_layer"]
    assert "could not be drawn" not in text
    for m in methods:
        assert f"<td>{m}</td>" in text
    assert text.count("MemPi (published): ranking A &gt; B.") == 1  # once, not per row
    assert "<td>0.10, 0.30</td>" in text


def test_del_page_has_tradeoff_and_specificity(tmp_path):
    text = write_bench_report(tmp_path, _info("del", _del_rows(), DEL_METHODS)).read_text()
    assert _self_contained(text)
    assert _images(text) == ["del_tradeoff", "del_specificity"]
    assert "could not be drawn" not in text
    for m in DEL_METHODS:
        assert f"<td>{m}</td>" in text
    assert "Model: the language-model run: runs/lm-smoke." in text
    assert "<td>95.0% → —</td>" in text  # a missing value is a dash
    assert "20.000 → 22.000 (+10.00%)" in text


@pytest.mark.parametrize("benchmark", ["tinymem", "inj", "del"])
def test_no_rows_write_a_page_saying_so(tmp_path, benchmark):
    text = write_bench_report(tmp_path, _info(benchmark, [], [], done=False)).read_text()
    assert "Missing: no rows yet" in text and "Not finished" in text and not _images(text)
    assert "12 s so far" in text


@pytest.mark.parametrize("rows, said", [("garbage", "rows is a str, not a list"),
                                        ([1, None, "x"], "none of the 3 entries"),
                                        (None, "no rows yet")])
def test_broken_rows_write_a_page_saying_so(tmp_path, rows, said):
    text = write_bench_report(tmp_path, _info("tinymem", rows, TINYMEM_METHODS)).read_text()
    assert said in text and not _images(text)


def test_odd_values_do_not_crash(tmp_path):
    """Numbers as strings, ragged or odd per-layer lists, missing keys and markup in names draw gaps, not errors."""
    rows = [{"n_layer": "two", "method": "<script>", "fraction": "x", "memorized_after": "0.1", "ppl_after": True},
            {"method": "greedy", "fraction": 0.01, "memorized_before": 0.4, "memorized_after": 0.2, "ppl_before": 1.0,
             "ppl_after": 1.1, "rel_acc_change": -0.01},
            {"n_layer": 2, "method": "greedy", "fraction": 0.02, "memorized_before": float("nan"),
             "memorized_after": float("inf"), "ppl_before": 0, "ppl_after": 1.0}, 7]
    text = write_bench_report(tmp_path, _info("tinymem", rows, ["greedy"])).read_text()
    assert "&lt;script&gt;" in text and "<script>" not in text
    assert "1 of bench.json&#x27;s 4 rows are not dicts: left out." in text
    inj = [{"method": "ig", "ratio": 0.01, "recall_pooled": 0.5, "recall_per_layer": [0.5, "x", None]},
           {"method": "random", "ratio": 0.01, "recall_pooled": 0.0, "recall_per_layer": []},
           {"method": "ig", "ratio": None, "recall_per_layer": [1.0]}]
    text = write_bench_report(tmp_path, _info("inj", inj, ["ig", "random"])).read_text()
    assert _images(text) == ["inj_recall", "inj_recall_per_layer"]
    text = write_bench_report(tmp_path, _info("del", [{"method": "ig", "n_layer": [4], "ratio": {}}], None)).read_text()
    assert "<td>ig</td>" in text
    text = write_bench_report(tmp_path, {"benchmark": "nope", "rows": []}).read_text()
    assert "unknown benchmark &#x27;nope&#x27;" in text
    assert "Missing" in write_bench_report(tmp_path, None).read_text()


def test_the_dict_in_memory_gives_the_page_of_the_file(tmp_path):
    """_save passes its dict before json: tuples and numpy numbers read as bench.json's lists and numbers."""
    info = _info("inj", _inj_rows(), ["random", "activations", "greedy", "slimming"])
    loaded = json.loads(json.dumps(info))
    info["settings"]["methods"] = tuple(info["settings"]["methods"])
    for r in info["rows"]:
        r["k_per_layer"], r["recall_per_layer"] = np.int64(r["k_per_layer"]), np.array(r["recall_per_layer"])
    a = write_bench_report(tmp_path / "memory", info).read_bytes()
    assert a == write_bench_report(tmp_path / "file", loaded).read_bytes()
    assert b"<td>6</td>" in a
