"""Gradient checkpointing for passes that backpropagate through a whole language model to masks on its units.

A backward pass through a transformer keeps every block's activations from the forward pass: at Pythia-6.9B's
size a single row of 80 tokens holds more than the rest of the pass. `recomputing(model, freeze)` runs each
decoder block under `torch.utils.checkpoint` (non-reentrant): the forward pass keeps only each block's input, and
the backward pass computes the block again just before it needs its activations, about one forward pass more in
all. The gradients are the ones a pass that kept everything gives: the same operations run on the same values.

The masks memloc puts on units (`memloc.core.units.UnitMasks`, `memloc.core.weights.WeightMasks`) are state set
around a forward pass and cleared after it, while the block is computed again later, inside the backward pass.
`freeze()` is called at each block's forward pass and returns a context that puts that state back as it was
then: the recomputation runs inside it, so it sees the masks the forward pass saw.

The blocks are found, not named: the longest `nn.ModuleList` of modules of one class (memloc's GPT's `blocks`,
a Hugging Face model's decoder layers). Whether a pass needs it is `memloc.core.batching`'s call
(`rows_that_fit(..., recompute=True)` counts its memory).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import ContextManager

from torch import nn
from torch.utils.checkpoint import checkpoint


def restoring(obj: object, **values) -> Callable[[], ContextManager]:
    """A context factory: inside each context, `obj`'s attributes hold `values` (taken now), and get back whatever
    they held on entry afterwards. What the masks' `freeze` returns."""
    @contextlib.contextmanager
    def restored() -> Iterator[None]:
        saved = {name: getattr(obj, name) for name in values}
        for name, value in values.items():
            setattr(obj, name, value)
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(obj, name, value)
    return restored


def blocks_of(model: nn.Module) -> nn.ModuleList | None:
    """The model's decoder blocks: its longest nn.ModuleList of at least two modules of one class (the outermost of
    equal ones); None where it has none."""
    best: nn.ModuleList | None = None
    for _, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(b) for b in m}) == 1:
            if best is None or len(m) > len(best):
                best = m
    return best


@contextlib.contextmanager
def recomputing(model: nn.Module, freeze: Callable[[], Callable[[], ContextManager]]) -> Iterator[int]:
    """Inside: every block of `model` (`blocks_of`) checkpointed, its recomputation run inside ``freeze()()`` as
    taken at its forward pass (the module docstring); yields the number of blocks (0: nothing to checkpoint). The
    blocks' own `forward` is back afterwards, even when the body raises."""
    blocks = blocks_of(model)
    if blocks is None:
        yield 0
        return
    patched = []
    try:
        for block in blocks:
            patched.append(block)
            block.forward = _checkpointed(block.forward, freeze)
        yield len(blocks)
    finally:
        for block in patched:
            del block.forward  # the instance attribute: the class's forward again


def _checkpointed(forward: Callable, freeze: Callable[[], Callable[[], ContextManager]]) -> Callable:
    def run(*args, **kwargs):
        restored = freeze()
        first = [True]

        def once(*a, **kw):
            if first[0]:  # the forward pass itself: the state is the one it was called with
                first[0] = False
                return forward(*a, **kw)
            with restored():  # the backward pass computing the block again
                return forward(*a, **kw)
        return checkpoint(once, *args, use_reentrant=False, **kwargs)
    return run
