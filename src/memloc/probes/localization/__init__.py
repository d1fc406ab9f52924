"""Localize memorized sequences and remove them: the field's methods on one interface (`memloc localize RUN`).

Three modules: `probe` (the settings `LocalizeConfig`, what is localized, `localize_units`, the result, the probe's
registration and `localize`; its docstring is the probe's semantics), `methods` (one scoring function per method,
named in the table `SCORERS`: adding a method is a function and a row there) and `edit` (the top-k edit, applied in
a `with` block or folded into the weights, and what is measured with it). Everything is importable from here, as
from the single module it was.
"""

from ...core.weights import weight_matrices
from ..base import ProbeResult
from .edit import (
    _cost,
    _cost_text,
    _heldout,
    _hits,
    _in_out,
    _is_text,
    _outgoing_norms,
    _rows,
    _share,
    _top,
    edit_of,
    edited,
    fold_edit,
    fold_units,
    output_projection,
    scoped_edit,
    top_units,
    zeroed,
)
from .methods import (
    DEFAULT_LR,
    DEFAULT_STEPS,
    SCORERS,
    STRETCH,
    SUBNET_JITTER,
    SUBNET_MOMENTUM,
    SUBNET_WEIGHT_DECAY,
    _Localizer,
    _per_row,
)
from .probe import (
    ALL_METHODS,
    METHODS,
    PROBE,
    PROBE_NAME,
    UNIT_KINDS,
    WEIGHT_METHODS,
    LocalizeConfig,
    _chosen,
    _grown,
    _plan,
    _within,
    candidate_layers,
    localize,
    localize_units,
    memorized_sequences,
    units_to_zero,
)

__all__ = ["ALL_METHODS", "METHODS", "PROBE", "PROBE_NAME", "UNIT_KINDS", "WEIGHT_METHODS", "LocalizeConfig",
           "candidate_layers", "localize", "localize_units", "memorized_sequences", "units_to_zero",
           "DEFAULT_LR", "DEFAULT_STEPS", "SCORERS", "STRETCH", "SUBNET_JITTER", "SUBNET_MOMENTUM",
           "SUBNET_WEIGHT_DECAY", "edit_of", "edited", "fold_edit", "fold_units", "output_projection", "scoped_edit",
           "top_units", "zeroed",
           # what the single module's namespace offered besides its own: the benchmarks and tests read them here
           "ProbeResult", "weight_matrices",
           # private names, for the modules, tests and studies that import them from here
           "_chosen", "_grown", "_plan", "_within", "_cost", "_cost_text", "_hits", "_in_out", "_is_text",
           "_outgoing_norms", "_heldout", "_rows", "_share", "_top", "_Localizer", "_per_row"]
