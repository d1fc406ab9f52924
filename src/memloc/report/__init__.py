"""The self-contained HTML report, rebuilt from a run's (or a study's) files alone.

- `page.py`: `build_report`, the page of a run or an audit; `study_page.py`: the page of a study
- `sections/`: one module per probe's section (and the training, grid and audit sections), `sections/registry.py`
  the section of each probe by name
- `paper_claims.py`, `canary_claims.py`: the paper's claims with our numbers (classification; language models)
- `html.py`: the page's parts, readable tables, the HTML and its files; `words.py`: numbers and each task's words
- `verdicts.py`: the statistical decisions behind the report's claims
"""

import importlib

from .page import build_report

__all__ = ["build_report"]

# Where each public name of the single report module (memloc.report, then memloc.report.page) lives now
_MOVED = {
    "html": ("Figure", "Table", "Section", "CSS", "render_html", "write_report"),
    "words": ("layer_label", "SUBSET_STYLE", "LM_SUBSET_STYLE", "TaskWords", "TASKS", "task_words"),
    "sections.generic": ("probe_section",),
    "sections.training": ("learning_curves", "gradient_accounting"),
    "sections.flipping": ("flipping",),
    "sections.dropout": ("dropout_section",),
    "sections.detection": ("detection",),
    "sections.depth": ("DEPTH_KINDS", "depth_section"),
    "sections.memorization": ("FORMAT_STYLE", "memorization"),
    "sections.sinks": ("SINK_MODES", "sinks_section"),
    "sections.grid": ("grid_tradeoff_figure", "protection_notes"),
    "sections.audit": ("describe_removal", "classifier_audit_sections", "audit_sections"),
    "sections.registry": ("TASK_PROBES", "PROBE_SECTIONS", "run_sections"),
    "paper_claims": ("claims", "claims_summary", "claims_section"),
    "canary_claims": ("LM_CLAIMS", "MIN_CANARY_EXTRACTION", "LM_SINKS_CLAIM", "lm_claims"),
    "study_page": ("build_study_report",),
}
_HOME = {name: module for module, names in _MOVED.items() for name in names}


def __getattr__(name: str):
    """`memloc.report.X` for the names the module had before it became this package (one release)."""
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
