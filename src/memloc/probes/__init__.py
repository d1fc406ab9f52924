"""The probes: each one module with its config and compute function, run through one engine (`engine.py`).

To add a probe: write its module (a config dataclass, `compute(model, data, cfg, ctx)`
and a `Probe(...)`), and add it to the import line below; the engine, the CLI and
the report find it by name (see docs/architecture.md).
"""

from . import depth, detection, dropout_eval, flipping, localization, memorization, retraining, rewinding  # noqa: E402,F401 - the registration line
from .base import ProbeResult, registered, swapped_state
from .depth import DepthConfig, measure_depth, prediction_depth
from .detection import DetectConfig, detect
from .dropout_eval import DropoutConfig, evaluate_dropout
from .engine import Context, Partial, Probe, prepare, run_probe
from .flipping import FlipConfig, FlipRecord, flip, select_examples
from .memorization import MemorizationConfig
from .memorization import memorization as measure_memorization
from .retraining import RetrainConfig, retrain
from .rewinding import RewindConfig, rewind

__all__ = ["ProbeResult", "Probe", "Context", "Partial", "registered", "prepare", "run_probe", "swapped_state",
           "RewindConfig", "rewind", "RetrainConfig", "retrain", "FlipConfig", "FlipRecord", "flip",
           "select_examples", "DropoutConfig", "evaluate_dropout", "DetectConfig", "detect",
           "MemorizationConfig", "measure_memorization", "DepthConfig", "prediction_depth", "measure_depth"]
