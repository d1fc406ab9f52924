"""Arithmetic per device: which runs use bf16 autocast and channels_last, and cuDNN autotuning scopes.

A run's arithmetic is its `precision` setting (`TrainConfig.precision`), chosen
once per model and device by `choose`:

- "auto" (the default): bf16 autocast on a GPU; on a CPU that computes bf16
  natively (AVX512-BF16 or AMX: `native_bf16`) for models with 2-D
  convolutions, where oneDNN's bf16 kernels pay (the default ResNet-9 on 28x28
  digits: a training step 2.8x and an evaluation pass 3.7x faster than fp32 on
  a 2-core Xeon with AMX), and for transformer language models at least
  `BF16_WIDTH` (512) wide (`benchmarks/lm_precision.py`, GPT-2 configs, 32
  rows of 80 tokens: at 124M a forward pass 2.5x and a forward and backward
  2.0x faster, at 512 wide 1.9x and 1.5x, at 128 wide 1.5x and 1.07x); fp32
  otherwise (a tiny GPT or an MLP gains little or runs slower in bf16 on the
  same CPU, and its runs stay exact; emulated bf16 is always slower).
- "bf16" / "fp32": that arithmetic on every device.
- "gpu": bf16 on a GPU, fp32 on a CPU: what memloc did before this setting
  existed, and what a run whose config.json predates it keeps computing in.

bf16 on a CPU comes with channels_last images and weights (oneDNN's fast
layout), unless the model cannot take a channels_last input (e.g. it calls
`.view` on a conv output): then bf16 in the default layout. fp32 on a CPU keeps
the default layout, so a run with `precision="fp32"` computes exactly what
memloc computed before bf16 on CPUs existed.

Training (`Trainer.fit`) and the probes on a run (`probes.engine.run_probe`)
enter `arithmetic(...)`; `autocast(device)` and `channels_last(device)` read it
inside. Outside one (the API's `evaluate` on a model in hand): bf16 and
channels_last on a GPU, fp32 on a CPU, as before. Flipping's batched search has
its own setting (`FlipConfig.precision`). cuDNN autotuning pays off for a few
fixed batch shapes (training) and costs seconds per new shape otherwise
(flipping): `cudnn_autotune` scopes it. `MEMLOC_CPU_BF16=0` in the environment
makes a CPU with native bf16 behave as one without (to check the fp32 path).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import os
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16")
BF16_WIDTH = 512  # a language model at least this wide (its shape's n_embd) computes in bf16 on a native-bf16 CPU
LEGACY = "gpu"  # runs made before `precision` existed: bf16 on a GPU, fp32 on a CPU (their config.json has no key)


@dataclass(frozen=True)
class Arithmetic:
    """What a block of work computes in: bf16 autocast or not, channels_last images or not."""

    bf16: bool
    channels_last: bool

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp32"


_current: contextvars.ContextVar[Arithmetic | None] = contextvars.ContextVar("memloc_arithmetic", default=None)


def current(device: torch.device) -> Arithmetic:
    """The arithmetic in force (`arithmetic`), or the device's default outside one (bf16 on a GPU, fp32 on a CPU)."""
    got = _current.get()
    if got is not None:
        return got
    gpu = device.type == "cuda"
    return Arithmetic(bf16=gpu, channels_last=gpu)


def current_or_none() -> Arithmetic | None:
    """The arithmetic in force, None outside `arithmetic`."""
    return _current.get()


@contextlib.contextmanager
def arithmetic(arith: Arithmetic) -> Iterator[Arithmetic]:
    """Inside: `autocast` and `channels_last` follow `arith`."""
    token = _current.set(arith)
    try:
        yield arith
    finally:
        _current.reset(token)


def _accepts_channels_last(model: nn.Module, example: torch.Tensor | None) -> bool:
    """Does the model, its weights channels_last, run a channels_last batch (a user's `.view` on a conv output
    does not)? Tried on a copy, in eval mode."""
    if example is None or example.dim() != 4:
        return example is None
    trial = copy.deepcopy(model).to(memory_format=torch.channels_last).eval()
    try:
        with torch.no_grad():
            trial(example.contiguous(memory_format=torch.channels_last))
        return True
    except RuntimeError:
        return False


def choose(precision: str, device: torch.device, model: nn.Module, example: torch.Tensor | None = None) -> Arithmetic:
    """The arithmetic of `precision` ("auto", "fp32", "bf16") for `model` on `device` (see the module's docstring).

    `example`: a small input batch, to check that the model takes channels_last
    images before a CPU run chooses that layout.
    """
    if precision not in PRECISIONS + (LEGACY,):
        from .errors import ConfigError
        raise ConfigError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    gpu = device.type == "cuda"
    if precision == "fp32" or (precision == LEGACY and not gpu):
        return Arithmetic(bf16=False, channels_last=gpu)
    convolutional = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if precision == "auto" and not gpu and not ((convolutional or wide_lm(model)) and native_bf16(device)):
        return Arithmetic(bf16=False, channels_last=False)
    if gpu:
        return Arithmetic(bf16=True, channels_last=True)
    return Arithmetic(bf16=True, channels_last=convolutional and _accepts_channels_last(model, example))


def wide_lm(model: nn.Module) -> bool:
    """Is `model` a transformer language model (its `shape` has `n_embd`: memloc's GPT, a Hugging Face causal LM
    memloc wraps) at least `BF16_WIDTH` wide, where bf16 pays on a CPU that has it natively?"""
    return int(getattr(getattr(model, "shape", None), "n_embd", 0) or 0) >= BF16_WIDTH


def autocast(device: torch.device, *, cache: bool = True):
    """bf16 autocast where the arithmetic in force says bf16 (by default on a GPU), else nothing.

    Inside one context autocast casts each weight once and reuses that copy
    (`cache`): a block that changes weights in place between forward passes
    must pass cache=False (or open a context per pass), or later passes run on
    the weights of the first.
    """
    if current(device).bf16 and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def channels_last(device: torch.device) -> bool:
    """Are image batches fed channels_last (the arithmetic in force; by default on a GPU only)?"""
    return current(device).channels_last


def bf16(device: torch.device, enabled: bool = True):
    """bf16 autocast on any device when `enabled` (the caller has checked `native_bf16`), else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def native_bf16(device: torch.device) -> bool:
    """Does `device` compute bf16 natively: a GPU, or a CPU with AVX512-BF16 or AMX (not emulated, which is slower)?

    `MEMLOC_CPU_BF16=0` in the environment answers no for every CPU (to check the fp32 path on any machine).
    """
    if device.type == "cuda":
        return True
    if device.type != "cpu" or os.environ.get("MEMLOC_CPU_BF16", "").strip() == "0":
        return False
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        f = getattr(torch.cpu, probe, None)
        try:
            if f is not None and f():
                return True
        except Exception:  # noqa: BLE001 - a private probe that may change: fall back to fp32
            pass
    return False


@contextlib.contextmanager
def cudnn_autotune(enabled: bool) -> Iterator[None]:
    """cuDNN autotuning on or off for the block, then the caller's setting again."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old
