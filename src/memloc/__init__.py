"""memloc: find where a neural network memorizes its training examples, and move it where it can be removed.

Quick start (offline, a CPU is enough)::

    memloc run --preset smoke             # the whole study in about 25 s: train, probes, report
    memloc run                            # the default study (ResNet-9 on 4,000 real MNIST digits)

    import memloc
    run = memloc.run_training(memloc.RunConfig(), "runs/x")   # train with the paper's recipe (per-epoch checkpoints)
    memloc.rewind(run); memloc.retrain(run); memloc.flip(run)  # the paper's probes, each a ProbeResult
    memloc.detect(run).summary                                 # which training examples look mislabeled
    memloc.build_report(run.path)                              # a self-contained HTML report

Your own model and data: ``memloc.wrap_data(x, y, ...)`` and any probe on ``(model, data)``;
language models: ``memloc run --task lm``. Documentation: docs/index.md (CLI: docs/cli.md, Python:
docs/api.md, the probes and the paper: docs/probes.md).

The public API is what this module lists in ``__all__``; everything else may change. Every
probe is one function (``memloc.flip is memloc.probes.flip``) that takes a run directory
(``"runs/x"``, a RunDir, or ``memloc.open_run(path)``) or a trained model with its data, and
returns a :class:`ProbeResult`. The layers ``ExampleTiedDropout`` (memloc.core.dropout) and
``UnitScale`` (memloc.study.export) are importable from here too; they are left out of ``__all__`` so
that ``help(memloc)`` is not their inherited ``nn.Module`` methods.
"""

from . import _moved
from ._version import __version__  # noqa: F401

_moved.install()  # the old import paths (memloc.models, memloc.data, memloc.lm.measures, ...) for one release
from . import methods  # noqa: E402,F401 - the methods register their evaluations with the probes
from .bench.benchmarks import BenchConfig, bench_localize  # noqa: E402
from .core.dropout import ExampleTiedDropout, dropout_mode, example_indices, insert_example_tied_dropout  # noqa: E402
from .core.errors import ConfigError, DataError, MemlocError, RunError  # noqa: E402
from .core.inference import predict  # noqa: E402
from .core.layers import Layer, layers  # noqa: E402
from .core.runs import RunDir  # noqa: E402
from .core.tasks import Task, task_of  # noqa: E402
from .core.training import History, TrainConfig, evaluate, prepare, train  # noqa: E402
from .probes import (  # noqa: E402
    DepthConfig,
    DetectConfig,
    DropoutConfig,
    FlipConfig,
    ProbeResult,
    RetrainConfig,
    RewindConfig,
    detect,
    evaluate_dropout,
    flip,
    prediction_depth,
    retrain,
    rewind,
    run_probe,
)
from .probes.detection import detect_scores, plot_roc  # noqa: E402
from .probes.localization import LocalizeConfig, edited, localize  # noqa: E402
from .report.page import build_report  # noqa: E402
from .study.export import UnitScale, export_dropped, export_localized, load_exported, remove_memorization  # noqa: E402
from .study.grid import DEFAULT_PAIRS, dropout_grid  # noqa: E402
from .tasks.classification.data import DataConfig, Dataset, corrupt_labels  # noqa: E402
from .tasks.classification.data import load as load_data  # noqa: E402
from .tasks.classification.models import build_model  # noqa: E402
from .tasks.classification.wrap import from_torch_dataset, wrap_data  # noqa: E402
from .tasks.experiment import ModelConfig, RunConfig, open_run, resume_training, run_training  # noqa: E402
from .tasks.lm.tinymem import TinyMemConfig, tinymem_data  # noqa: E402

_IMPORTABLE_NOT_LISTED = (ExampleTiedDropout, UnitScale)  # nn.Modules: their inherited methods would swamp help()

__all__ = [
    "ConfigError", "DataError", "MemlocError", "RunError",
    "DataConfig", "Dataset", "corrupt_labels", "load_data", "wrap_data", "from_torch_dataset",
    "Task", "task_of",
    "Layer", "build_model", "layers",
    "RunDir",
    "TrainConfig", "History", "train", "evaluate", "predict", "prepare",
    "ModelConfig", "RunConfig", "open_run", "resume_training", "run_training",
    "ProbeResult", "run_probe",
    "RewindConfig", "rewind", "RetrainConfig", "retrain", "FlipConfig", "flip",
    "DropoutConfig", "evaluate_dropout", "DetectConfig", "detect", "detect_scores", "plot_roc",
    "DepthConfig", "prediction_depth",
    "LocalizeConfig", "localize", "edited", "BenchConfig", "bench_localize", "TinyMemConfig", "tinymem_data",
    "export_dropped", "export_localized", "load_exported", "remove_memorization",
    "DEFAULT_PAIRS", "dropout_grid",
    "dropout_mode", "example_indices", "insert_example_tied_dropout",
    "build_report",
]


def __getattr__(name: str):
    """`memloc.models` and the other modules that moved, by their old names (one release)."""
    return _moved.moved_attribute(name)
