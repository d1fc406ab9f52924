"""Tasks: what a probe asks of the data it works on, instead of assuming classification with label noise.

Each task is one subpackage with its data, its models and its `Task` (the contract in `memloc.core.tasks`),
registered by the one line at the end of its `__init__.py`:

- `classification/`: images, 1-D signals and features with label noise (data, readers, models, wrap, task)
- `lm/`: causal language models with canaries (text, sources, tokenizers, gpt, hf, measures, membership, task)

`experiment.py` is one training run of any task: its data and its model from a config, then the trainer.
Adding a task is a subpackage here, its `register(...)` line and its name in the import below.
"""

from __future__ import annotations

from ..core.tasks import Task, register, task_of
from . import classification, lm  # noqa: F401 - the registration line: importing a task registers it
from .classification import ClassificationTask
from .lm import LanguageModelTask

__all__ = ["Task", "task_of", "register", "ClassificationTask", "LanguageModelTask"]
