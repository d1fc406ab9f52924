"""Methods: what changes training so that memorization goes where it can be removed, with their evaluation.

- `sinks.py`: memorization sinks, example-tied dropout in a language model's MLPs (MemSinks), and its
  evaluation as a probe

Example-tied dropout itself is a layer of the core (`memloc.core.dropout`): training, inference and export pass
example ids to it; its evaluation on vision models is the probe `memloc.probes.dropout_eval`.
"""

from . import sinks  # noqa: F401 - the registration line: importing a method registers its evaluation
