"""Tasks: what a probe asks of the data it works on, instead of assuming classification with label noise.

A probe never tests which task it has. It asks the task for model inputs, the
per-example loss, predictions and whether they match a target ("is it still
memorized?"), the kinds of training example (the memorized kind, the reference
kind that must survive), and the subsets it measures; `Task` below is that
contract. Classification with label noise (`classification.py`) is the first
task; adding one is a new module here and one line in `_TASKS`.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from ..data import Dataset
from ..errors import ConfigError
from ..lm.text import TextData
from .classification import ClassificationTask
from .lm import LanguageModelTask


class Task(Protocol):
    """The contract between the probes and a kind of data. Shapes: N training and M test examples, B a batch."""

    name: str
    subsets: tuple[str, ...]  # measured subsets, in report order: the training ones, then `test_masks`' held-out ones
    kinds: tuple[str, ...]  # kinds of training example a probe can pick
    memorized_kind: str  # the kind whose memorization the probes locate ("noisy")
    reference_kind: str  # the kind a model must keep (retraining trains on it alone)
    data: Any  # x_train (N, ...), y_train (N, ...) given targets, x_test (M, ...), y_test (M, ...)

    @property
    def num_train(self) -> int: ...

    @property
    def known(self) -> bool:
        """Whether the memorized examples are known (False: rank and probe, but nothing to judge against)."""

    def inputs(self, xb: torch.Tensor, device: torch.device, *, augment: bool = False) -> torch.Tensor:
        """Stored examples (B, ...) -> model input on `device`."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example loss (B,) float32 of the model outputs against targets."""

    def margin(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example margin (B,): how far the target is ahead of the best alternative."""

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """The model's predictions (B, ...) from its outputs."""

    def match(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the prediction is the target (for the given targets: still memorized)."""

    def targets(self, which: str) -> torch.Tensor | None:
        """"given" (what training saw), "true" (what generalizing predicts; None if unknown), or "test"."""

    def record_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) int of each training example for per-example records: its given and its true label (classes;
        the canary id for language models)."""

    def example_ids(self, idx: torch.Tensor, tie: str, split: str = "train") -> torch.Tensor:
        """The ids example-tied dropout hashes for the examples at positions `idx` (B,) of `split`: (B,) or one
        per token (B, T); `tie` is what the model's layers were tied to (see `memloc.dropout.TIES`)."""

    def kind_mask(self, kind: str) -> torch.Tensor | None:
        """(N,) bool of the training examples of `kind`; None where the task cannot tell."""

    def subset_masks(self) -> dict[str, torch.Tensor | None]:
        """(N,) bool of each training subset (the held-out subset is the test split); None: empty or unknown."""

    def test_masks(self) -> dict[str, torch.Tensor | None]:
        """(M,) bool of each held-out subset, in `subsets` order after the training ones; None: empty."""

    def accuracy(self, hits_train: torch.Tensor, hits_test: torch.Tensor) -> np.ndarray:
        """(S, len(subsets)) float64 from hits (S, N) and (S, M) bool; NaN for an empty or unknown subset."""

    def evaluate(self, model: nn.Module, *, batch_size: int = 1024, with_indices: bool = False
                 ) -> dict[str, float | None]:
        """Eval-mode accuracy of every subset, keys "<subset>_acc" (what training records each epoch)."""

    def check_outputs(self, outputs: torch.Tensor) -> None:
        """Raise ConfigError when a model's outputs for a batch of 2 are not what the task reads."""

    def example_input(self, n: int, device: torch.device) -> torch.Tensor:
        """A batch of `n` model inputs (zeros) that a model for this data must take: the shape check."""


_TASKS: list[tuple[type, Callable[[Any], Task]]] = [
    (Dataset, ClassificationTask),
    (TextData, LanguageModelTask),
]


def task_of(data: Any) -> Task:
    """The task of a data object (a Task is returned as it is)."""
    if isinstance(data, (ClassificationTask, LanguageModelTask)) or all(
            hasattr(data, a) for a in ("subsets", "kinds", "match")):
        return data
    for kind, make in _TASKS:
        if isinstance(data, kind):
            return make(data)
    raise ConfigError(f"memloc has no task for data of type {type(data).__name__}: pass a memloc Dataset "
                      "(memloc.wrap_data or memloc.load_data)")


__all__ = ["Task", "task_of", "ClassificationTask", "LanguageModelTask"]
