"""The self-contained HTML report, rebuilt from a run's (or a study's) files alone.

- `page.py`: the page, every probe's section, the claims and the tables
- `verdicts.py`: the statistical decisions behind the report's claims
"""

from . import page
from .page import build_report

__all__ = ["build_report"]


def __getattr__(name: str):
    """`memloc.report.X` for the names the module had before it became this package (one release)."""
    return getattr(page, name)
