"""The import paths of modules that moved when the package was arranged by task (core, tasks, probes and methods,
study/audit/bench/report), kept working for one release with a DeprecationWarning.

`import memloc.models` gives the very module `memloc.tasks.classification.models` (not a copy), so its classes,
its state and a test's monkeypatching are the same through either name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

_CORE = ("errors", "options", "precision", "distributed", "runs", "scale", "figures", "dropout", "inference",
         "accounting", "units", "cutting", "weights", "batching", "budget", "training")
_LM = ("text", "measures", "sequences", "hf", "tokenizers", "tinymem", "sources", "gpt", "membership", "hub",
       "models")

MOVED: dict[str, str] = {
    **{f"memloc.{m}": f"memloc.core.{m}" for m in _CORE},
    **{f"memloc.{m}": f"memloc.tasks.classification.{m}" for m in ("data", "readers", "models", "wrap")},
    "memloc.experiment": "memloc.tasks.experiment",
    "memloc.lm": "memloc.tasks.lm",
    **{f"memloc.lm.{m}": f"memloc.tasks.lm.{m}" for m in _LM},
    "memloc.lm.sinks": "memloc.methods.sinks",
    "memloc.verdicts": "memloc.report.verdicts",
    "memloc.localize_benchmarks": "memloc.bench.benchmarks",
    "memloc.localize_benchmarks_report": "memloc.bench.page",
    "memloc.grid": "memloc.study.grid",
    "memloc.export": "memloc.study.export",
    "memloc.audit_scan": "memloc.audit.scan",
    "memloc.audit_classifier": "memloc.audit.classifier",
}


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path and hands back the module at its new one."""

    def __init__(self) -> None:
        self._specs: dict[int, object] = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old import path goes in the next release",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        self._specs[id(module)] = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # importlib gave the module the old name's spec; the module keeps its own
        module.__spec__ = self._specs.pop(id(module), module.__spec__)


def install() -> None:
    if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
        sys.meta_path.insert(0, _OldPaths())


def moved_attribute(name: str):
    """`memloc.NAME` for a top-level module that moved (`memloc.models` without importing it first)."""
    if f"memloc.{name}" in MOVED:
        return importlib.import_module(f"memloc.{name}")
    raise AttributeError(f"module 'memloc' has no attribute {name!r}")
