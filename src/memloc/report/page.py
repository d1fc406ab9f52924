"""The report of a run or study directory, rebuilt from its files alone: `build_report(path)`.

`build_report(path)` reads what a run or study wrote — metrics, gradients,
probe results — and writes `report/report.html` (every figure embedded as a
PNG data URI, no outside resources), `report/figures/*.png` and
`report/tables/*.csv`. It never trains or evaluates a model: a section whose
files are missing is listed as missing, with the command that makes it.
Rebuilding from the same files gives the same figures and numbers.

This module picks the page (a run, an audit, a study: `study_page`) and writes its
intro; the sections are in `sections/`, the claims in `paper_claims` and `canary_claims`.
"""

from __future__ import annotations

from pathlib import Path

from ..core.runs import FORMAT_VERSION, RunDir
from ..tasks.experiment import AUDIT_FILE
from .html import write_report
from .paper_claims import claims_section
from .sections.audit import audit_sections, classifier_audit_sections
from .sections.registry import run_sections
from .study_page import build_study_report
from .words import task_words


def build_report(path: str | Path | RunDir) -> Path:
    """Rebuild the report of a run or study directory from its files; returns the path of report.html."""
    path = Path(path.path if isinstance(path, RunDir) else path)
    if (path / "study.json").exists():
        return build_study_report(path)
    run = RunDir.open(path)
    cfg = run.read_json("config.json") if run.has("config.json") else {}
    data, model = (cfg.get(k) if isinstance(cfg.get(k), dict) else {} for k in ("data", "model"))
    lm = task_words(run).name == "lm"
    if run.has(AUDIT_FILE) and not lm:  # a classifier trained elsewhere: its examples first, then every probe
        audited = run.read_json(AUDIT_FILE)
        intro = [f"Audit `{path}` of the classifier `{audited.get('model')}` ({model.get('name')}, width "
                 f"{model.get('width')}) on {data.get('dataset')}: its weights copied into the run (sha256 in "
                 f"{AUDIT_FILE}), {len(audited.get('checkpoints') or [])} earlier states with it. Rebuilt from the "
                 "run's files; nothing was recomputed."]
        return write_report(path / "report", "memloc audit", intro, classifier_audit_sections(run) +
                            [sec for sec in run_sections(run) if sec.missing is None])
    if run.has(AUDIT_FILE):  # a model trained elsewhere: its sequences first, no claims about canaries
        audited = run.read_json(AUDIT_FILE)
        intro = [f"Audit `{path}` of the model in `{audited.get('model')}` (not copied; its files' sha256 in "
                 f"{AUDIT_FILE}) on the sequences of `{data.get('corpus')}`. Rebuilt from the run's files; nothing "
                 "was recomputed."]
        return write_report(path / "report", "memloc audit", intro, audit_sections(run) +
                            [sec for sec in run_sections(run) if sec.missing is None])
    if lm:
        what = _lm_run_words(model, data)
    else:
        what = f"{model.get('name')} (width {model.get('width')}) on {data.get('dataset')}, noise {data.get('noise')}"
    intro = [f"Run `{path}`: {what}. Run format version {FORMAT_VERSION}. Rebuilt from the run's files; nothing was "
             "recomputed."]
    sections = ([claims_section(run, None)] if lm else []) + run_sections(run)
    return write_report(path / "report", "memloc report", intro, sections)


def _lm_run_words(model: dict, data: dict) -> str:
    """A language-model run in words: the model, the corpus and its canaries (config.json as it is, unchecked)."""
    def listed(v) -> str:
        return ", ".join(str(x) for x in v) if isinstance(v, list) else str(v)
    size = [w.format(model[k]) for k, w in (("n_layer", "{} layers"), ("n_head", "{} heads"), ("n_embd", "n_embd {}"))
            if model.get(k) is not None]
    size_text = f" ({', '.join(size)})" if size else ""
    corpus = data.get("corpus")
    corpus = Path(corpus).stem if isinstance(corpus, str) and corpus != "bible" else corpus
    return (f"{model.get('name')}{size_text} on {corpus} ({data.get('tokenizer')} "
            f"tokenizer, {data.get('block_size')} tokens per sequence); canaries: {data.get('canaries')} per format "
            f"({listed(data.get('canary_formats'))}) and repeat count ({listed(data.get('repeats'))}), as many held "
            "out")
