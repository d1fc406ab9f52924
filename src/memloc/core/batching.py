"""How many sequences a pass over a language model takes at once: chosen from the model and the memory free, and
halved when the device runs out anyway.

`rows_that_fit(model, length=T)` is the batch of a forward-only pass (the scan, membership scores, memorization,
perplexity) or, with ``backward=True``, of a pass that backpropagates to unit masks (localization, flipping): the
largest batch whose tensors fill at most `SHARE` of the device's free memory (`budget.free_memory`: a GPU's
free memory, a CPU's available RAM within its cgroup), at most `cap` (a larger batch buys no speed: 256 rows on
a CPU, 2048 on a GPU), at least 1. A row of T tokens holds, forward only, its logits and one vocabulary-sized
temporary (fp32, 2 T V values: a loss's log-softmax; the scan's statistics make theirs a chunk of positions at a
time, `memloc.tasks.lm.measures.position_stats`) and one block's activations (4 T C + T I + heads T^2);
backpropagating, a training step's tensors at batch 1 (`budget.transformer_batches`, fitted on
memloc's GPT, with the extra hidden layers a Hugging Face config's activation keeps: SwiGLU's gate, GPT-2's composed
gelu_new). A model whose shape cannot be read (not a transformer) gets `cap`. On a CPU a forward batch's
logits also stay within `CPU_LOGITS` bytes: the vocabulary-sized tensors are memory-bound there, and GPT-2 small's
scan held 9.4 GiB at 128 rows (BENCHMARKS.md, `benchmarks/lm_scale.py`) and an informal check saw no gain from
64 rows over 8.

`in_batches(n, batch, part)` runs ``part(start, stop)`` over rows 0..n in batches; on an out-of-memory error
(a GPU's, or a CPU allocator's) it halves the batch, says so in one line (the first time), and runs the same rows
again: every batch that finished is kept, so the result is what a run at the smaller batch gives. At batch 1 it is
one line naming the memory and the flag, never a traceback. Work that cannot be cut at any row (an optimizer step
whose gradient sums every batch) starts its unit again at the halved batch (`whole_at_half`): localization's
methods, flipping's search.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from . import budget
from .errors import RunError, warn

SHARE = 0.5  # of the free memory one batch may fill: the rest for the allocator's rounding and other tensors
CAP = {"cpu": 256, "cuda": 2048}  # rows per pass past which a device gains no speed
CPU_LOGITS = 512 << 20  # bytes of a CPU forward batch's fp32 logits (the module docstring)
_FP32 = 4
T = TypeVar("T")


def model_shape(model: nn.Module) -> dict | None:
    """{width, hidden, vocab, layers, heads, block, gated} of a causal LM: memloc's GPT or Hugging Face wrapper
    (their `shape`), a plain `transformers` model (its config), either wrapped by the measures; None otherwise."""
    inner = getattr(model, "inner", model)  # memloc.tasks.lm.measures._Logits
    s = getattr(inner, "shape", None)
    cfg = getattr(getattr(inner, "hf", inner), "config", None)  # a plain model's, or the one memloc's wrapper holds
    if s is not None and hasattr(s, "vocab_size") and hasattr(s, "n_embd"):
        return {"width": int(s.n_embd), "hidden": int(getattr(s, "intermediate", 4 * s.n_embd)),
                "vocab": int(s.vocab_size), "layers": int(s.n_layer), "heads": int(s.n_head),
                "block": int(s.block_size), **_activation(cfg)}
    if cfg is None:
        return None

    def first(*keys: str) -> int | None:
        return next((int(getattr(cfg, k)) for k in keys if isinstance(getattr(cfg, k, None), int)), None)
    width, vocab, layers = first("hidden_size", "n_embd", "d_model"), first("vocab_size"), \
        first("num_hidden_layers", "n_layer")
    if not (width and vocab and layers):
        return None
    return {"width": width, "hidden": first("intermediate_size", "n_inner") or 4 * width, "vocab": vocab,
            "layers": layers, "heads": first("num_attention_heads", "n_head") or 1,
            "block": first("max_position_embeddings", "n_positions") or 1024, **_activation(cfg)}


def _activation(cfg) -> dict:
    """`budget.activation_extras` of a loaded config (none: memloc's own GPT, neither)."""
    return budget.activation_extras(lambda key: getattr(cfg, key, None))


def row_bytes(shape: dict, length: int, *, backward: bool = False, recompute: bool = False) -> int:
    """Bytes one row of `length` tokens holds at a pass's peak (the module docstring's count); `recompute`: a
    backward pass whose blocks are checkpointed (`memloc.core.recompute`) keeps each block's input and one block's
    activations at a time instead of every block's."""
    t = int(length)
    if backward:
        step, _ = budget.transformer_batches({**shape, "block": t}, 1, 0)
        if recompute:  # the embedding and logits, one block's activations, every block's input
            one, _ = budget.transformer_batches({**shape, "block": t, "layers": 1}, 1, 0)
            step = one + _FP32 * t * shape["width"] * shape["layers"]
        return int(step)
    c, i, v = shape["width"], shape["hidden"], shape["vocab"]
    return _FP32 * t * (2 * v + 4 * c + i + shape.get("heads", 1) * t)


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def rows_that_fit(model: nn.Module, *, length: int, backward: bool = False, recompute: bool = False,
                  cap: int | None = None, free: int | None = None) -> int:
    """The batch of a pass over `model` on rows of `length` tokens (the module docstring's rule); `free`: the
    bytes free (default: the device's, read now); `recompute`: see `row_bytes`."""
    device = _device(model)
    cap = int(cap or CAP.get(device.type, CAP["cpu"]))
    shape = model_shape(model)
    free = budget.free_memory(device) if free is None else int(free)
    if shape is None or free is None:
        return cap
    if device.type == "cpu" and not backward:
        cap = min(cap, CPU_LOGITS // (_FP32 * max(1, int(length)) * shape["vocab"]))
    per_row = row_bytes(shape, length, backward=backward, recompute=recompute and backward)
    return max(1, min(cap, int(SHARE * free) // max(1, per_row)))


def is_out_of_memory(err: BaseException) -> bool:
    """A device or allocator out of memory (CUDA's error, a CPU allocator's, Python's MemoryError)."""
    if isinstance(err, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(err, oom):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


_said: set[str] = set()  # the halving lines already printed, once per process and kind of work


def halved(err: BaseException, batch: int, *, what: str, flag: str | None = "--batch-size") -> int:
    """The batch to try again with after `err`: half of `batch` (one line, the first time for `what`, naming `flag`
    where a flag chooses it) when `err` is an out-of-memory error; `err` raised again otherwise; a one-line RunError
    when even one row did not fit."""
    if not is_out_of_memory(err):
        raise err
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if batch <= 1:
        raise RunError(f"{what} ran out of memory on a single row: the model does not fit this device; "
                       f"use a larger device or a smaller model") from None
    batch //= 2
    if what not in _said:
        _said.add(what)
        warn(f"{what} ran out of memory: batch halved to {batch} rows and going on" +
             (f" ({flag} to choose)" if flag else ""))
    return batch


def whole_at_half(work: Callable[[int], T], batch: int, *, what: str, flag: str | None = "--batch-size",
                  again: Callable[[], None] = lambda: None) -> tuple[T, int]:
    """(work(batch), the batch it ran with): on an out-of-memory error, ``again()`` (undo what the failed try left:
    a generator's draws, masks set on the model) and the whole of ``work`` at half the batch (`halved`). For work
    that cannot keep part of what a failed batch began (an optimizer step's gradient summed over batches)."""
    batch = max(1, int(batch))
    while True:
        try:
            return work(batch), batch
        except Exception as err:  # noqa: BLE001 - only an out-of-memory is handled; the rest is raised again
            batch = halved(err, batch, what=what, flag=flag)
            again()


def in_batches(n: int, batch: int, part: Callable[[int, int], None], *, what: str = "a pass over the model",
               flag: str = "--batch-size") -> int:
    """``part(start, stop)`` over rows 0..n, `batch` rows at a time, halving the batch on an out-of-memory error
    and running the same rows again (the module docstring). Returns the batch it ended with."""
    batch, start = max(1, int(batch)), 0
    while start < n:
        stop = min(n, start + batch)
        try:
            part(start, stop)
        except Exception as err:  # noqa: BLE001 - only an out-of-memory is handled; the rest is raised again
            batch = halved(err, batch, what=what, flag=flag)
            continue
        start = stop
    return batch
