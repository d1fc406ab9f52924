"""Arithmetic per device: bf16 autocast where the device has it natively, and cuDNN autotuning scopes.

Training and the probes that follow its arithmetic (rewinding, retraining) run
bf16 autocast on a GPU and fp32 on a CPU (`autocast`). Flipping's batched search
may also use bf16 on a CPU that computes it natively (AVX512-BF16 or AMX:
`native_bf16`); emulated bf16 would be slower than fp32, so it is never chosen
there. cuDNN autotuning pays off for a few fixed batch shapes (training) and
costs seconds per new shape otherwise (flipping): `cudnn_autotune` scopes it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def autocast(device: torch.device, *, cache: bool = True):
    """bf16 autocast on a GPU, nothing on a CPU.

    Inside one context autocast casts each weight once and reuses that copy
    (`cache`): a block that changes weights in place between forward passes
    must pass cache=False (or open a context per pass), or later passes run on
    the weights of the first.
    """
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def bf16(device: torch.device, enabled: bool = True):
    """bf16 autocast on any device when `enabled` (the caller has checked `native_bf16`), else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def native_bf16(device: torch.device) -> bool:
    """Does `device` compute bf16 natively: a GPU, or a CPU with AVX512-BF16 or AMX (not emulated, which is slower)?"""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
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
