"""memloc: find where a neural network memorizes its training examples, and move it where it can be removed.

The public API is what this module re-exports; everything else may change.
"""

from ._version import __version__  # noqa: F401
from .errors import ConfigError, DataError, MemlocError, RunError  # noqa: E402
from .data import DataConfig, Dataset, corrupt_labels, load as load_data  # noqa: E402
from .models import Layer, build_model, layers  # noqa: E402
from .runs import RunDir  # noqa: E402
from .inference import predict  # noqa: E402
from .training import TrainConfig, evaluate  # noqa: E402
from .experiment import ModelConfig, RunConfig, open_run, resume_training, run_training  # noqa: E402
from .probes.dropout_eval import evaluate_dropout  # noqa: E402
from .export import UnitScale, export_dropped, load_exported, remove_memorization  # noqa: E402
from .grid import DEFAULT_PAIRS, dropout_grid  # noqa: E402
from .probes.rewinding import rewind_model  # noqa: E402
from .probes.retraining import RetrainConfig, retrain_model  # noqa: E402
from .probes.flipping import FlipConfig, flip_units  # noqa: E402
from .detection import DetectConfig, detect_scores, plot_roc  # noqa: E402
from .training import History  # noqa: E402
from .probes.base import ProbeResult  # noqa: E402
from .dropout import ExampleTiedDropout, dropout_mode, example_indices, insert_example_tied_dropout  # noqa: E402
# the entry points for your own model and data; each probe also takes a run directory
from .api import (build_report, detect, flip, from_torch_dataset, prepare, retrain, rewind, train,  # noqa: E402
                  wrap_data)

__all__ = [
    "ConfigError", "DataError", "MemlocError", "RunError",
    "DataConfig", "Dataset", "corrupt_labels", "load_data",
    "Layer", "build_model", "layers",
    "RunDir",
    "TrainConfig", "evaluate", "predict", "train",
    "ModelConfig", "RunConfig", "open_run", "resume_training", "run_training",
    "evaluate_dropout", "UnitScale", "export_dropped", "load_exported", "remove_memorization",
    "DEFAULT_PAIRS", "dropout_grid",
    "rewind", "rewind_model", "RetrainConfig", "retrain", "retrain_model",
    "FlipConfig", "flip", "flip_units",
    "DetectConfig", "detect", "detect_scores", "plot_roc",
    "History", "ProbeResult",
    "ExampleTiedDropout", "dropout_mode", "example_indices", "insert_example_tied_dropout",
    "wrap_data", "from_torch_dataset", "prepare", "build_report",
]
