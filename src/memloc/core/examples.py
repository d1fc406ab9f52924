"""Examples as tensors: what every task's data shares, how a batch of stored examples becomes model input, and
the batches every loop walks.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterator

import torch

from .errors import ConfigError
from .precision import channels_last

NORMALIZATIONS = ("pixels", "standardize", "none")


@dataclass(frozen=True)
class Normalization:
    """How stored examples become model input; `__call__` on a batch (B, C, ...) or (B, F).

    "pixels": uint8 / 255, then (x - 0.5) / 0.5 (the paper's); "standardize":
    (x - mean[c]) / std[c] with one `mean` and `std` per channel (dim 1 of the
    batch: a feature of (B, F)), the training split's; "none": the values as
    float32.
    """

    kind: str = "pixels"
    mean: tuple[float, ...] | None = None  # (C,) standardize only
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in NORMALIZATIONS:
            raise ConfigError(f"unknown normalization {self.kind!r}: choose one of {', '.join(NORMALIZATIONS)}")
        if (self.kind == "standardize") != (self.mean is not None and self.std is not None):
            raise ConfigError("normalization 'standardize' takes a mean and a std per channel, the others neither")
        if self.mean is not None:
            if len(self.mean) != len(self.std) or not len(self.mean):
                raise ConfigError(f"standardize has {len(self.mean)} means but {len(self.std)} stds: one each per "
                                  "channel")
            if not all(math.isfinite(m) for m in self.mean) or not all(math.isfinite(v) and v > 0 for v in self.std):
                raise ConfigError("standardize's statistics must be finite, with every std above 0")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self)

    def describe(self) -> str:
        """In words, for the console and the report."""
        if self.kind == "pixels":
            return "pixels ((x/255 - 0.5) / 0.5 of uint8, (x - 0.5) / 0.5 of [0, 1] floats)"
        if self.kind == "none":
            return "none (the values as given)"
        return f"standardize ({len(self.mean)} channel mean(s) and std(s) of the training split)"


PIXELS = Normalization()


class Examples:
    """What every data class shares: training examples first (x_train), held where their tensors are."""

    x_train: torch.Tensor

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def device(self) -> torch.device:
        return self.x_train.device


def normalize(x: torch.Tensor, norm: Normalization | None = None) -> torch.Tensor:
    """Stored examples (B, C, ...) or (B, F) -> model input as `norm` says (default: pixels, the paper's [0, 1]
    intensities with mean 0.5, std 0.5)."""
    if norm is None or norm.kind == "pixels":
        # a fresh tensor either way: a float32 input must not be changed in place
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)
        return x.sub_(0.5).div_(0.5)
    x = x.to(torch.float32, copy=True)
    if norm.kind == "none":
        return x
    view = (1, -1) + (1,) * (x.dim() - 2)  # one value per channel (dim 1), broadcast over positions
    return x.sub_(_stat(norm.mean, x.device).view(view)).div_(_stat(norm.std, x.device).view(view))


@functools.lru_cache(maxsize=64)
def _stat(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A normalization's statistics as a float32 tensor on `device`, made once (not one copy per batch)."""
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable in any later mode
        return torch.tensor(values, dtype=torch.float32, device=device)


def model_input(xb: torch.Tensor, device: torch.device, norm: Normalization | None = None) -> torch.Tensor:
    """A batch of stored examples on `device` -> model input: normalized (`norm`, default pixels); channels_last
    images where the arithmetic in force says so (`precision.channels_last`: a GPU, a CPU computing in bf16)."""
    x = normalize(xb, norm)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and channels_last(device) else x


def batches(x: torch.Tensor, y: torch.Tensor, *, batch_size: int, order: torch.Tensor | None = None,
            device: torch.device | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (x, y, idx) batches in `order` (default: dataset order; a subset of the positions gives
    ceil(len(order) / batch_size) batches, none empty); idx are dataset positions.

    Data in pinned host memory is streamed to `device` batch by batch.
    """
    order = torch.arange(x.shape[0], device=x.device) if order is None else order.to(x.device)
    device = device or x.device
    for start in range(0, len(order), batch_size):  # over the order: a subset (retraining's clean examples) ends early
        idx = order[start:start + batch_size]
        xb, yb = x[idx], y[idx]
        if xb.device != device:
            xb, yb, idx = (t.to(device, non_blocking=True) for t in (xb, yb, idx))
        yield xb, yb, idx
