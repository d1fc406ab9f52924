"""Tasks as the core sees them: the contract between the probes and a kind of data, and the registry that finds a
data object's task.

A probe never tests which task it has. It asks the task for model inputs, the
per-example loss, predictions and whether they match a target ("is it still
memorized?"), the kinds of training example (the memorized kind, the reference
kind that must survive), and the subsets it measures; `Task` below is that
contract. The tasks themselves live in `memloc.tasks` (classification with label
noise, language models), each registering its data type here with one line,
`register(DataType, TaskType)`.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from .errors import ConfigError


class Task(Protocol):
    """The contract between the probes and a kind of data. Shapes: N training and M test examples, B a batch."""

    name: str
    class_labels: bool  # one class label per example: what ELR, --epochs auto, depth and detection read
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
        per token (B, T); `tie` is what the model's layers were tied to (see `memloc.core.dropout.TIES`)."""

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


_TASKS: list[tuple[type, Callable[[Any], Task]]] = []


def register(data_type: type, make: Callable[[Any], Task]) -> None:
    """Make `task_of(data)` give `make(data)` for data of `data_type` (a task package's one registration line)."""
    if not any(kind is data_type for kind, _ in _TASKS):
        _TASKS.append((data_type, make))


def task_of(data: Any) -> Task:
    """The task of a data object (a Task, anything with the task's `subsets`, `kinds` and `match`, is returned as
    it is)."""
    if any(isinstance(data, make) for _, make in _TASKS if isinstance(make, type)) or all(
            hasattr(data, a) for a in ("subsets", "kinds", "match")):
        return data
    for kind, make in _TASKS:
        if isinstance(data, kind):
            return make(data)
    raise ConfigError(f"memloc has no task for data of type {type(data).__name__}: pass a memloc Dataset "
                      "(memloc.wrap_data or memloc.load_data)")
