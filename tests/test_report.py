"""The report is rebuilt from files alone, says what is missing, and renders in a real browser."""

import json
import shutil

import browser
import pytest
from conftest import copy_of

from memloc.cli import main
from memloc.report.page import build_report


@pytest.fixture(scope="module")
def smoke_run(smoke_master, tmp_path_factory):
    return copy_of(smoke_master, tmp_path_factory.mktemp("report") / "run")


def test_report_from_files_and_rebuild_is_identical(smoke_run):
    page = build_report(smoke_run)
    rep = smoke_run / "report"
    figures = sorted(p.name for p in (rep / "figures").iterdir())
    assert figures == ["gradient_cosine.png", "gradient_norms.png", "learning_curves.png"]
    tables = sorted(p.name for p in (rep / "tables").iterdir())
    assert "metrics.csv" in tables and "gradients.csv" in tables
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 3
    assert "Missing: not run: `memloc rewind" in text  # probes not run: said, with the command
    before = {p.relative_to(rep): p.read_bytes() for p in rep.rglob("*") if p.is_file()}
    build_report(smoke_run)
    after = {p.relative_to(rep): p.read_bytes() for p in rep.rglob("*") if p.is_file()}
    assert before == after


def test_report_bad_inputs(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a memloc run" in capsys.readouterr().err
    fake = tmp_path / "future"
    fake.mkdir()
    (fake / "run.json").write_text(json.dumps({"format_version": 42, "stages": {}}))
    assert main(["report", str(fake)]) == 2
    err = capsys.readouterr().err
    assert "format version 42" in err and err.count("\n") == 1
    assert sorted(p.name for p in fake.iterdir()) == ["run.json"]  # nothing written


def test_report_of_a_partial_run(smoke_run, tmp_path):
    part = tmp_path / "partial"
    shutil.copytree(smoke_run, part)
    (part / "gradients.npz").unlink()
    shutil.rmtree(part / "report", ignore_errors=True)
    text = build_report(part).read_text()
    assert "Missing: no gradients.npz" in text and text.count("data:image/png;base64,") == 1


@pytest.mark.skipif(not browser.available(), reason="needs Debian's chromium and chromium-driver, and selenium")
def test_report_renders_in_headless_chromium(smoke_run, tmp_path):
    page = build_report(smoke_run)
    seen = browser.inspect_page(page)
    assert seen["title"] == "memloc report"
    assert len(seen["images"]) == 3
    assert all(i["complete"] and i["width"] > 100 and i["height"] > 100 for i in seen["images"])
    assert all(seen["decoded"])
    errors = [m for m in seen["console"] if m.get("level") in ("SEVERE", "ERROR")]
    assert not errors, errors
    (tmp_path / "screenshot.png").write_bytes(seen["screenshot"])


def test_claims_summary_in_words():
    from memloc.report.paper_claims import claims_summary
    rows = [{"claim": "a", "verdict": "holds"}, {"claim": "b", "verdict": "does not hold"},
            {"claim": "c", "verdict": "not enough data (n = 3 noisy, 40 clean; need 5 each)"},
            {"claim": "d", "verdict": "holds"}]
    text = claims_summary(rows)
    assert text.startswith("Of the paper's 4 claims asked of this run, 2 hold and 1 do not: b.")
    assert "1 could not be decided (not measured, or too few examples for the test): c." in text
    assert claims_summary([]) is None


def test_tables_read_as_people_write_them():
    from memloc.report.html import _table_html
    rows = [{"kind": "noisy", "noisy_train_acc": 0.9512, "median_units": 2.0, "rare_train_acc": None},
            {"kind": "clean", "noisy_train_acc": None, "median_units": None, "rare_train_acc": None}]
    html = _table_html(rows)
    assert "noisy train accuracy (%)" in html and "95.1" in html and ">2<" in html
    assert "None" not in html and "–" in html and "not measured or not applicable" in html
    assert "rare train" not in html  # a column with nothing measured stays in the CSV only
    assert _table_html([{f"col_{i}": float(i) for i in range(12)} for _ in range(2)]).count("<tr>") == 3  # as is
    wide = _table_html([{f"col_{i}": float(i) for i in range(12)} for _ in range(2)], transpose=True)
    assert wide.count("<tr>") == 12  # 12 columns, 2 rows: transposed (a header row, then one row per column)
