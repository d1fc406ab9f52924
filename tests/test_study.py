"""`memloc run`: the whole study on the smoke preset, resume after a kill, and its bad inputs."""

import errno
import json
import re
import shutil
from pathlib import Path

import browser
import pytest
from conftest import copy_of
from toys import report_modules

from memloc.cli import main


@pytest.fixture(scope="module")
def smoke_study(smoke_study_master, tmp_path_factory):
    return copy_of(smoke_study_master, tmp_path_factory.mktemp("study") / "s")


def test_smoke_study_makes_every_stage_and_the_report(smoke_study):
    info = json.loads((smoke_study / "study.json").read_text())
    assert info["finished"] is True
    for stage in ("train", "rewinding", "retraining", "flipping", "dropout_train", "dropout_eval", "depth",
                  "detection", "report"):
        assert info["stages"][stage]["status"] == "done", stage
    for probe in ("rewinding", "retraining", "flipping", "depth", "detection"):
        assert (smoke_study / "base" / "probes" / probe / "summary.json").exists(), probe
    assert (smoke_study / "dropout" / "probes" / "dropout" / "summary.json").exists()
    figures = {p.stem for p in (smoke_study / "report" / "figures").iterdir()}
    assert {"learning_curves", "gradient_norms", "gradient_cosine", "rewinding", "retraining", "flipping",
            "detection_roc", "dropout_learning_curves", "dropout_before_after"} <= figures
    claims = (smoke_study / "report" / "tables" / "summary_claims.csv").read_text()
    for words in ("gradient norm", "rewinding", "retraining", "units zeroed", "example-tied dropout"):
        assert words in claims, words
    # every claim states its measure, test and threshold (memloc.report.verdicts)
    assert claims.startswith("claim,paper,ours,measure,test,threshold,n,result,verdict")
    for words in ("one-sided Mann–Whitney U (noisy < clean)", "p < 0.05", "stratified bootstrap 95% interval",
                  "interval's lower end > 0.7", ">= 75% of layers within [0.5, 2]", "share >= 50% and >= 3 layers"):
        assert words in claims, words
    html = (smoke_study / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(figures)


def test_rebuilding_the_study_report_gives_the_same_files(smoke_study, smoke_study_master):
    rep = smoke_study / "report"
    before = {p.relative_to(rep): p.read_bytes() for p in rep.rglob("*") if p.is_file()}
    assert main(["report", str(smoke_study)]) == 0
    after = {p.relative_to(rep): p.read_bytes() for p in rep.rglob("*") if p.is_file()}
    # this copy's page names its own folder where the study's names the study's; nothing else may differ
    page = Path("report.html")
    assert after.pop(page) == before.pop(page).replace(str(smoke_study_master).encode(), str(smoke_study).encode())
    assert before == after


@pytest.mark.skipif(not browser.available(), reason="needs Debian's chromium and chromium-driver, and selenium")
def test_study_report_in_headless_chromium(smoke_study):
    seen = browser.inspect_page(smoke_study / "report" / "report.html", width=1280, pdf=True)
    n = len(list((smoke_study / "report" / "figures").iterdir()))
    assert len(seen["images"]) == n and all(seen["decoded"])
    assert all(i["complete"] and i["width"] > 50 for i in seen["images"])
    assert not [m for m in seen["console"] if m.get("level") in ("SEVERE", "ERROR")]
    # inside the page at 1,280 px (wide tables transposed or scrolling in their own box), no "None" cell (#22)
    assert seen["scroll_width"] <= seen["client_width"], (seen["scroll_width"], seen["client_width"])
    assert seen["none_cells"] == 0
    # printed: several pages, and no page ends with a section heading stranded away from its content
    pdf = seen["pdf"]
    assert pdf.startswith(b"%PDF") and pdf.count(b"/Type /Page") - pdf.count(b"/Type /Pages") > 1
    pages = browser.pdf_pages_text(seen["pdf"])
    if pages is None:
        pytest.skip("pdftotext (poppler-utils) is not installed: the page breaks are not checked")
    html = (smoke_study / "report" / "report.html").read_text()
    headings = [re.sub(r"<[^>]+>", "", h).strip() for h in re.findall(r"<h2[^>]*>(.*?)</h2>", html)]
    for i, page in enumerate(pages[:-1]):
        lines = [line.strip() for line in page.splitlines() if line.strip()]
        assert lines and lines[-1] not in headings, f"page {i + 1} ends with the heading {lines[-1]!r}"


def test_resume_of_a_finished_or_foreign_study_is_refused(smoke_study, tmp_path, capsys):
    assert main(["run", "--resume", str(smoke_study), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "finished" in err and err.count("\n") == 1
    assert main(["run", "--resume", str(tmp_path), "--quiet"]) == 2
    assert "not a memloc study" in capsys.readouterr().err
    assert main(["run", "--preset", "smoke", "--out", str(smoke_study), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_report_without_disk_space_fails_cleanly_and_keeps_the_old_report(smoke_study, monkeypatch, capsys):
    rep = smoke_study / "report"
    before = {p.relative_to(rep): p.read_bytes() for p in rep.rglob("*") if p.is_file()}
    from memloc.report import html as report_files  # where the report's files are written

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report_files, "atomic_write", full)
    monkeypatch.setattr(report_files, "write_text", lambda p, t: full(p, None))
    assert main(["report", str(smoke_study)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1
    assert before == {p.relative_to(rep): p.read_bytes() for p in rep.rglob("*") if p.is_file()}


def test_every_layer_figure_names_its_layers(smoke_study, tmp_path, monkeypatch):
    """Layer axes carry the layers' names (as '2 block2'), never bare numbers, in every figure of the report."""
    import memloc.report as report
    from memloc.core import figures
    seen = []
    real = figures.png

    def spy(fig):
        for ax in fig.axes:
            for axis, label in ((ax.xaxis, ax.get_xlabel()), (ax.yaxis, ax.get_ylabel())):
                ticks = [t.get_text() for t in axis.get_ticklabels() if t.get_text()]
                seen.append((label, ticks))
        return real(fig)

    for module in report_modules():  # every section draws its own figures
        monkeypatch.setattr(module, "png", spy)
    copy = tmp_path / "s"
    shutil.copytree(smoke_study, copy)
    report.build_report(copy)
    layered = [ticks for label, ticks in seen if any(re.match(r"^\d+ [A-Za-z]", t) for t in ticks)]
    assert len(layered) >= 5  # gradient norms (4 panels) and cosine, rewinding, retraining, flipping
    bare = [(label, ticks) for label, ticks in seen if label == "layer" and ticks and
            all(re.fullmatch(r"\d+", t) for t in ticks)]
    assert not bare, bare
