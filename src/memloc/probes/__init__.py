"""The paper's probes: each a thin function over a shared result type and scoped interventions."""

from .base import ProbeResult, swapped_state
from .flipping import FlipConfig, FlipRecord, flip, flip_units, select_examples
from .retraining import RetrainConfig, retrain, retrain_model
from .rewinding import rewind, rewind_model

__all__ = ["ProbeResult", "swapped_state",
           "RetrainConfig", "retrain", "retrain_model", "rewind", "rewind_model",
           "FlipConfig", "FlipRecord", "flip", "flip_units", "select_examples"]
