"""The whole study in one call, and what it is made of.

- `run.py`: `memloc run`: train, probe, example-tied dropout, the report, resumable stage by stage
- `grid.py`: the paper's robustness grid of example-tied dropout settings
- `export.py`: a trained or edited model exported as a plain one
"""

from . import run
from .run import run_study, study_config

__all__ = ["run_study", "study_config"]


def __getattr__(name: str):
    """`memloc.study.X` for the names the module had before it became this package (one release)."""
    return getattr(run, name)
