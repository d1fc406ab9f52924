"""How the page writes numbers and names: percentages, layers, subsets, and each task's words for them."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..core.errors import RunError
from ..core.runs import RunDir


def _num(v) -> str:
    return "—" if v is None else f"{v:g}"


def layer_label(i: int, name: str) -> str:
    """A layer as every figure names it: its 1-based position and a short name ("5 conv3", "4 res1.1")."""
    short = re.sub(r"\.0$", "", str(name).replace(".block.", "."))
    return f"{i + 1} {short}"


def _pct(v) -> str:
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * float(v):.1f}%"


SUBSET_STYLE = {"clean_train": ("clean-train", "tab:blue"), "noisy_train": ("noisy-train", "tab:red"),
                "rare_train": ("rare-train", "tab:purple"), "test": ("test", "tab:green"),
                "corpus_train": ("corpus-train extraction", "tab:blue"),
                "canary_train": ("canary-train extraction", "tab:red"),
                "canary_heldout": ("held-out canary extraction", "tab:gray")}
LM_SUBSET_STYLE = {"test": ("held-out token accuracy", "tab:green")}  # "test" of a language model


def _subset_style(subset: str, task: TaskWords) -> tuple[str, str]:
    return (LM_SUBSET_STYLE if task.name == "lm" else {}).get(subset) or SUBSET_STYLE[subset]


def _subset_title(subset: str, task: TaskWords) -> str:
    """A panel's title: the subset and what its number measures (the language model's labels say it already)."""
    label = _subset_style(subset, task)[0]
    return f"{label} (%)" if task.name == "lm" else f"{label} accuracy (%)"


@dataclass(frozen=True)
class TaskWords:
    """How the page speaks of one task (memloc.tasks): the subsets it compares and the words for its numbers."""

    name: str
    memorized: str  # the memorized subset; its kind is the name without "_train"
    reference: str  # the reference subset
    examples: str  # what a training example is called
    measure: str  # what a subset's number is, on an axis
    flipped: str  # when the flipping probe stops removing units from one example

    @property
    def memorized_kind(self) -> str:
        return self.memorized.removesuffix("_train")

    @property
    def reference_kind(self) -> str:
        return self.reference.removesuffix("_train")


TASKS = {"classification": TaskWords("classification", "noisy_train", "clean_train", "examples", "accuracy",
                                     "prediction flips"),
         "lm": TaskWords("lm", "canary_train", "corpus_train", "sequences", "extraction rate / token accuracy",
                         "sequence is no longer extracted")}


def task_words(run: RunDir | None) -> TaskWords:
    """The task of a run (config.json's "task"; classification when absent or unknown)."""
    try:
        name = run.config.get("task") if run is not None else None
    except RunError:
        name = None
    return TASKS[name] if isinstance(name, str) and name in TASKS else TASKS["classification"]


def _float(v) -> float | None:
    """A number read from a probe's summary, None when it is null (or not a number)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) else None


def _fixed(v, digits: int) -> str:
    v = _float(v)
    return "—" if v is None else f"{v:.{digits}f}"


def _points(v: float) -> str:
    return f"{100 * v:+.1f} points"


def _times(n: float, word: str) -> str:
    return f"{n:g} {word}" + ("" if n == 1 else "s")
