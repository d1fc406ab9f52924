"""memloc: find where a neural network memorizes its training examples, and move it where it can be removed.

The public API is what this module re-exports; everything else may change.
"""

__version__ = "0.1.0"

from .errors import ConfigError, DataError, MemlocError, RunError  # noqa: E402
from .data import DataConfig, Dataset, corrupt_labels, load as load_data  # noqa: E402
from .models import Layer, build_model, layers  # noqa: E402
from .runs import RunDir  # noqa: E402
from .training import TrainConfig, evaluate, predict, train  # noqa: E402
from .experiment import ModelConfig, RunConfig, open_run, resume_training, run_training  # noqa: E402

__all__ = [
    "ConfigError", "DataError", "MemlocError", "RunError",
    "DataConfig", "Dataset", "corrupt_labels", "load_data",
    "Layer", "build_model", "layers",
    "RunDir",
    "TrainConfig", "evaluate", "predict", "train",
    "ModelConfig", "RunConfig", "open_run", "resume_training", "run_training",
]
