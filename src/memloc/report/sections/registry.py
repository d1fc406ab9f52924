"""Which section draws each probe (`PROBE_SECTIONS`), and the sections of a run in their order (`run_sections`).

A registered probe without an entry here gets the generic section (`sections.generic.probe_section`).
"""

from __future__ import annotations

from typing import Callable

from ...core.errors import RunError
from ...core.runs import RunDir
from ...probes import registered
from ..html import Section
from ..words import task_words
from .depth import depth_section
from .detection import detection
from .dropout import dropout_section
from .flipping import flipping
from .generic import probe_section
from .memorization import memorization
from .retraining import retraining_section
from .rewinding import rewinding_section
from .training import gradient_accounting, learning_curves

# How the report draws the paper's probes; any other registered probe gets `probe_section`.
PROBE_SECTIONS: dict[str, Callable[[RunDir], Section]] = {
    "rewinding": rewinding_section, "retraining": retraining_section,
    "flipping": flipping, "dropout": dropout_section, "detection": detection, "memorization": memorization,
    "depth": depth_section}
# probes that measure one task only (depth: class labels only, a language model's report does not list it)
TASK_PROBES = {"memorization": "lm", "detection": "classification", "depth": "classification"}


def _has_example_tied_dropout(run: RunDir) -> bool:
    try:
        model = run.config.get("model")
        return isinstance(model, dict) and bool(model.get("p_gen") or model.get("example_tied_dropout"))
    except RunError:
        return False


def run_sections(run: RunDir) -> list[Section]:
    """The training sections, then one per registered probe (the example-tied one only for such a run, a probe of
    another task only when it ran, a probe the report has no section for only when it ran); a language model's
    memorization section comes first."""
    task = task_words(run)
    sections = [learning_curves(run), gradient_accounting(run)]
    first = []
    for name, probe in registered().items():
        ran = (run.path / "probes" / name / "summary.json").exists()
        if name == "dropout" and not _has_example_tied_dropout(run):
            continue
        if TASK_PROBES.get(name, task.name) != task.name and not ran:
            continue
        if name in PROBE_SECTIONS:
            (first if name == "memorization" and task.name == "lm" else sections).append(PROBE_SECTIONS[name](run))
        elif ran:
            sections.append(probe_section(run, probe))
    return first + sections
