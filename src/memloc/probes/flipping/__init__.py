"""Greedy unit removal ("flipping", probe 4): how many units must be zeroed to flip one example's prediction?

Three modules: `config` (what is asked: `FlipConfig`; what is found per example: `FlipRecord`), `search` (the
engine: the greedy steps, batched or sequential, and the accuracies after removal; its docstring is the probe's
semantics, exactly) and `probe` (the examples and the plan, `flip_units`, the result, the probe's registration and
`flip`). Everything is importable from here, as from the single module it was.
"""

from .config import KINDS, PRECISIONS, PROBE_NAME, FlipConfig, FlipRecord, accuracy_names, use_bf16
from .probe import (
    PROBE,
    _from_json,
    _merge_states,
    _plan,
    _records_of,
    _to_json,
    build_result,
    candidate_layers,
    flip,
    flip_units,
    kinds_of,
    select_examples,
)
from .search import _Flipper, _noise_seed, _run_batched, _tile

__all__ = ["KINDS", "PRECISIONS", "PROBE_NAME", "FlipConfig", "FlipRecord", "accuracy_names", "use_bf16", "PROBE",
           "build_result", "candidate_layers", "flip", "flip_units", "kinds_of", "select_examples",
           # private names, for the modules, tests and benchmarks that import them from here
           "_from_json", "_merge_states", "_plan", "_records_of", "_to_json", "_Flipper", "_noise_seed",
           "_run_batched", "_tile"]
