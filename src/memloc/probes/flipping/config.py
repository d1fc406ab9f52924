"""What greedy unit removal is asked and what it finds for one example: `FlipConfig`, `FlipRecord`, and the names
of the accuracies measured after removal (the semantics: `search`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...core.errors import ConfigError
from ...core.example_files import indices_of, read_indices
from ...core.options import INT64_MAX, check_ranges, given_option, names, option
from ...core.options import settings as option_settings
from ...core.precision import current, native_bf16
from ...core.tasks import Task

KINDS = ("clean", "noisy", "rare", "corpus", "canary")  # every task's kinds (each task checks its own)
PRECISIONS = ("auto", "fp32", "bf16")
PROBE_NAME = "flipping"


@dataclass
class FlipConfig:
    """Settings of the greedy unit removal. Defaults are the paper's (5 copies, 1% noise, 512 others)."""

    examples: int = option(100, "examples per kind, a seeded choice (the default: fewer where a kind has fewer)",
                           at_least=1)
    kinds: tuple[str, ...] | None = option(None, "comma-separated kinds: clean, noisy, rare (language models: "
                                           "corpus, canary); default: the task's reference and memorized kinds "
                                           "(clean,noisy)", flag="--kind", parse=names)
    indices: tuple[int, ...] | None = option(None, "flip these training examples instead (.npy or text, one index a "
                                             "line)", parse=read_indices, metavar="FILE", at_least=0,
                                             at_most=INT64_MAX)
    others: int = option(512, "other training examples whose loss is kept low (the default: all where there are "
                         "fewer)", at_least=1)
    copies: int = option(5, "noisy copies of the example averaged", at_least=1)
    input_noise: float = option(0.01, "noise norm as a fraction of the input norm", at_least=0, below=10)
    budget: float = option(0.1, "removal cap as a fraction of all units", above=0, at_most=1)
    max_units: int | None = option(None, "removal cap as a number of units (wins over --budget)", at_least=1)
    layers: tuple[str, ...] | None = option(None, "comma-separated layer names or indices (default: all but the "
                                            "classifier)", parse=names)
    include_classifier: bool = option(False, "let the final classifier's units be removed too")
    eval_subsample: int | None = option(None, "accuracy after removal on K seeded training examples and as many test "
                                        "examples (all of a smaller test split)", metavar="K", at_least=1)
    eval_test: bool = option(True, "after removal, training-set accuracy only", negate="--no-test-eval")
    seed: int = option(0, "seed of the examples, the others and the input noise", at_least=0, at_most=INT64_MAX)
    sequential: bool = option(False, "the paper's loop: one example, one removal at a time", result=False)
    # "auto": bf16 where the device computes it natively in batched mode (a GPU; a CPU with AVX512-BF16 or AMX),
    # and the arithmetic the model trains in for the sequential baseline (the run's `--precision`)
    precision: str = option("auto", "auto (bf16 where the device has it natively; --sequential: the run's arithmetic), "
                            "fp32 or bf16", result=False)
    batch_examples: int = option(16, "examples flipped at once (16 keeps the paper's ResNet-9 under 16 GB)",
                                 result=False, at_least=1)
    # rows per score pass (None: 4096 GPU, 1024 CPU) and per accuracy pass (None: 8192 GPU, 1024 CPU)
    max_rows: int | None = option(None, cli=False, result=False, at_least=1)
    eval_rows: int | None = option(None, cli=False, result=False, at_least=1)
    epoch: int | None = option(None, "probe this saved epoch (default: the final one)", at_least=0)
    device: str = option("auto", "auto, cpu or cuda", result=False)
    given: tuple[str, ...] | None = given_option()

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.kinds is not None:
            self.kinds = tuple(self.kinds)
            for k in self.kinds:
                if k not in KINDS:
                    raise ConfigError(f"unknown kind {k!r}: choose from {', '.join(KINDS)}, e.g. --kind clean,noisy")
        if self.kinds is not None and not self.kinds and self.indices is None:
            raise ConfigError("no kind of example chosen: pass --kind clean,noisy or --indices FILE")
        if self.kinds is not None and len(set(self.kinds)) != len(self.kinds):
            raise ConfigError(f"--kind lists a kind twice: {','.join(self.kinds)}")
        if self.indices is not None:
            self.indices = indices_of(self.indices)
            if not self.indices:
                raise ConfigError("the --indices file lists no examples")
            if len(set(self.indices)) != len(self.indices):
                raise ConfigError("the --indices file lists an example twice: examples must be distinct")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}: choose from {', '.join(PRECISIONS)}")
        if self.layers is not None:
            self.layers = tuple(str(n) for n in self.layers)

    def settings(self) -> dict:
        """What determines the result (batching sizes, the mode and the precision do not, beyond float rounding)."""
        return option_settings(self)


@dataclass
class FlipRecord:
    """What greedy removal found for one training example."""

    index: int
    kind: str
    label: int
    true_label: int
    already_wrong: bool
    flipped: bool
    units: list[tuple[int, int]]  # (layer index, unit index) in removal order
    acc: dict[str, float | None] = field(default_factory=dict)  # after removal

    @property
    def num_units(self) -> int:
        return len(self.units)


def use_bf16(cfg: FlipConfig, device: torch.device) -> bool:
    """Whether the search and the accuracy passes run under bf16 autocast (see `FlipConfig.precision`)."""
    if cfg.precision != "auto":
        return cfg.precision == "bf16"
    if cfg.sequential:  # the baseline keeps the arithmetic the model trains in (the run's, `precision.current`)
        return current(device).bf16
    return native_bf16(device)


def accuracy_names(task: Task) -> tuple[str, ...]:
    """The accuracies measured after removal: all training examples, then each subset of the task."""
    return ("train_acc",) + tuple(f"{s}_acc" for s in task.subsets)
