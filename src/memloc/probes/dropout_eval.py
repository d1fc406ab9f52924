"""Evaluate a model trained with example-tied dropout before and after dropping its memorization units.

Before ("tied"): every training example goes through its own training-time
mask, with the model in eval mode (BatchNorm running statistics), so this is
the accuracy the training actually produced. After ("drop"): the memorization
units are zeroed and the generalization units rescaled, the same for every
example. Test accuracy is reported in "eval" mode (every unit on, memorization
units times p_mem) and in "drop" mode.

The paper's claim, checked by ``tests/test_dropout_eval.py``: after the drop
the noisy training examples are forgotten (and often predicted as their true
class) while clean and test accuracy barely move.

Runs trained without the layer (plain models, the dropout and sparse baselines)
have nothing to drop: :func:`evaluate_dropout` refuses them with a clear error,
and :func:`plain_accuracies` gives their eval-mode accuracies (what the grid
reports for the baselines, as both "before" and "after").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..core.dropout import DROP_SCALES, ExampleTiedDropout, dropout_mode, find_example_tied_dropout, layer_setting
from ..core.errors import ConfigError, RunError
from ..core.inference import predict
from ..core.options import check_ranges, option
from ..core.precision import arithmetic
from ..core.tasks import task_of
from ..core.training import evaluate
from ..tasks.experiment import LoadedRun
from .base import ProbeResult
from .engine import Context, Probe, run_probe

__all__ = ["DropoutConfig", "evaluate_dropout", "plain_accuracies", "drop_scale", "require_example_tied_dropout"]


def require_example_tied_dropout(model: nn.Module, where: str = "this model") -> list[ExampleTiedDropout]:
    """The model's example-tied dropout layers; a clear error when it has none."""
    found = find_example_tied_dropout(model)
    if not found:
        raise RunError(f"{where} was trained without example-tied dropout, so it has no memorization units to drop: "
                       "train one with `memloc train --example-tied-dropout P_GEN,P_MEM` (e.g. 0.4,0.1)")
    return found


def drop_scale(model: nn.Module, scale: str):
    """Use rescaling rule `scale` ("matched", "paper" or "none") in every example-tied layer inside; restored after."""
    if scale not in DROP_SCALES:
        raise ConfigError(f"unknown drop scale {scale!r}: use one of {', '.join(DROP_SCALES)}")
    return layer_setting(model, "drop_scale", scale)


def _pct(v: float | None) -> float | None:
    return None if v is None else round(100.0 * v, 4)


@dataclass
class DropoutConfig:
    """The example-tied evaluation: which saved epoch, and how the kept units are rescaled after the drop."""

    epoch: int | None = option(None, "saved epoch to evaluate (default: the last)", at_least=0)
    drop_scale: str = option("matched", "rescaling of the generalization units after the drop (matched keeps the "
                             "expected total)", choices=DROP_SCALES)
    batch_size: int = option(1024, "evaluation batch size", result=False, at_least=1)
    device: str = option("auto", "auto, cpu or cuda", result=False)
    # language models (memorization sinks)
    repeated: int = option(16, "language models: the headline pools canaries repeated at least this many times",
                           at_least=1)
    exposure: bool = option(True, "language models: skip the secret-number canaries' exposure",
                            negate="--no-exposure")

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.drop_scale not in DROP_SCALES:
            raise ConfigError(f"unknown drop scale {self.drop_scale!r}: use one of {', '.join(DROP_SCALES)}")


def _check(model: nn.Module, data: Any, cfg: DropoutConfig, ctx: Context) -> None:
    require_example_tied_dropout(model, str(ctx.run.path) if ctx.run is not None else "this model")


def _describe(result: ProbeResult) -> list[str]:
    s = result.summary
    task = s.get("task", "lm" if "repeated_before" in s else None)  # a language model's sinks say no task
    if task in _OTHER_TASKS:
        return _OTHER_TASKS[task][1](s)

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"
    return [f"clean-train {pct(s['clean_before'])} -> {pct(s['clean_after'])}  "
            f"noisy-train {pct(s['noisy_before'])} -> {pct(s['noisy_after'])}  (tied -> drop)",
            f"test {pct(s['test_eval'])} (eval) {pct(s['test_drop'])} (drop); noisy predicted as their true label "
            f"after the drop {pct(s['noisy_true_after'])}; clean examples forgotten {s['forgotten_clean']}"]


@torch.no_grad()
def _compute(model: nn.Module, data: Any, cfg: DropoutConfig, ctx: Context) -> ProbeResult:
    """Accuracies before (tied) and after (drop) removing the memorization units (see the module docstring)."""
    found = require_example_tied_dropout(model)
    task, device = task_of(data), next(model.parameters()).device
    if task.name in _OTHER_TASKS:
        return _OTHER_TASKS[task.name][0](model, data, cfg)
    epoch, scale, batch_size = ctx.epoch, cfg.drop_scale, cfg.batch_size
    given, true, y_test = task.targets("given"), task.targets("true"), task.targets("test")

    def pred(split: str, mode: str) -> torch.Tensor:  # (N,) or (M,) predictions of a split in a mode
        x = task.data.x_train if split == "train" else task.data.x_test
        with dropout_mode(model, mode), drop_scale(model, scale):
            out = predict(model, x, batch_size=batch_size, with_indices=mode == "tied", device=device,
                          inputs=task.inputs)
        return task.predict(out).to(given.device)

    before, after = pred("train", "tied"), pred("train", "drop")
    te_eval, te_drop = pred("test", "eval"), pred("test", "drop")
    no_test = torch.zeros(2, 0, dtype=torch.bool)
    acc = task.accuracy(torch.stack([task.match(before, given), task.match(after, given)]), no_test)  # (2, S)
    test = [float(task.match(p, y_test).double().mean()) if len(y_test) else None for p in (te_eval, te_drop)]
    ref, mem = task.reference_kind, task.memorized_kind
    reference, memorized = task.kind_mask(ref), task.kind_mask(mem)
    summary = {"epoch": epoch, "drop_scale": scale, "p_gen": found[0].p_gen, "p_mem": found[0].p_mem,
               "layers": len(found)}
    for i, when in enumerate(("before", "after")):
        for kind in task.kinds:  # clean_before, noisy_before, ... (None: empty or unknown)
            v = acc[i, task.subsets.index(f"{kind}_train")]
            summary[f"{kind}_{when}"] = None if np.isnan(v) else float(v)
        # the memorized examples predicted as their true target: what the drop gives back
        hit = None if true is None or memorized is None or not bool(memorized.any()) else \
            float(task.match((before, after)[i][memorized], true[memorized]).double().mean())
        summary[f"{mem}_true_{when}"] = hit
    summary.update(test_eval=test[0], test_drop=test[1])
    forgotten = torch.nonzero(reference & task.match(before, given) & ~task.match(after, given)).flatten() \
        if reference is not None else torch.zeros(0, dtype=torch.long)
    recovered = torch.nonzero(memorized & task.match(after, true)).flatten() \
        if memorized is not None and true is not None else torch.zeros(0, dtype=torch.long)
    summary.update({f"num_{ref}": int(reference.sum()) if reference is not None else None,
                    f"num_{mem}": int(memorized.sum()) if memorized is not None else None,
                    f"forgotten_{ref}": int(forgotten.numel()), f"{mem}_to_true_label": int(recovered.numel())})
    arrays = {
        "pred_before": before.cpu().numpy().astype(np.int64), "pred_after": after.cpu().numpy().astype(np.int64),
        "pred_test_eval": te_eval.cpu().numpy().astype(np.int64),
        "pred_test_drop": te_drop.cpu().numpy().astype(np.int64),
        f"forgotten_{ref}": forgotten.cpu().numpy().astype(np.int64),
        f"{mem}_true_after": recovered.cpu().numpy().astype(np.int64),
        f"is_{mem}": (memorized if memorized is not None else torch.zeros_like(given, dtype=torch.bool)).cpu().numpy(),
    }
    rows = []
    for split, mode, when in (("train", "tied", "before"), ("train", "drop", "after"), ("test", "eval", None),
                              ("test", "drop", None)):
        train = split == "train"
        rows.append({"split": split, "mode": mode,
                     f"{ref}_acc": _pct(summary[f"{ref}_{when}"]) if train else None,
                     f"{mem}_acc": _pct(summary[f"{mem}_{when}"]) if train else None,
                     f"{mem}_true_acc": _pct(summary[f"{mem}_true_{when}"]) if train else None,
                     "test_acc": None if train else _pct(summary[f"test_{mode}"])})
    return ProbeResult(PROBE_NAME, summary, arrays, rows)


# the tasks whose before/after evaluation is their own (classification's is `_compute` itself): task name ->
# (compute(model, data, cfg) -> ProbeResult, describe(summary) -> console lines), registered by the method that
# evaluates them (language models: memloc.methods.sinks)
_OTHER_TASKS: dict[str, tuple[Callable[[nn.Module, Any, DropoutConfig], ProbeResult],
                              Callable[[dict], list[str]]]] = {}


def register_task_evaluation(task: str, compute: Callable[[nn.Module, Any, DropoutConfig], ProbeResult],
                             describe: Callable[[dict], list[str]]) -> None:
    """Evaluate example-tied dropout on `task`'s models with `compute`, and say its result with `describe`."""
    _OTHER_TASKS[task] = (compute, describe)


PROBE_NAME = "dropout"
PROBE = Probe(PROBE_NAME, "evaluate", DropoutConfig, _compute, check=_check, describe=_describe,
              help="example-tied dropout runs: accuracies before (tied) and after (drop) removing the memorization "
                   "units")


def evaluate_dropout(target: Any, data: Any = None, cfg: DropoutConfig | None = None, *, save: bool = True,
                     progress: bool = False, log: Callable[[str], None] | None = None, **options: Any) -> ProbeResult:
    """The example-tied evaluation ("dropout" probe): accuracies before (tied) and after (drop) removing the
    memorization units of a model trained with example-tied dropout.

    `target`: a run directory (``memloc evaluate RUN --drop-memorization``; saved into RUN/probes/dropout/
    unless `save` is False) or such a model with its `data`. `cfg` a :class:`DropoutConfig`, or `options`
    its fields (``epoch``, ``drop_scale``). The summary holds fractions (clean_before, noisy_before,
    clean_after, noisy_after, noisy_true_after, test_eval, test_drop, ...); the arrays the predictions (N,)
    / (M,) of each mode, `forgotten_clean` (clean examples right before and wrong after) and
    `noisy_true_after` (noisy examples predicted as their true class after the drop).
    """
    return run_probe(PROBE, target, data, cfg, save=save, progress=progress, log=log, **options)


@torch.no_grad()
def plain_accuracies(loaded: LoadedRun, *, epoch: int | None = None, batch_size: int = 1024) -> dict:
    """Eval-mode clean/noisy/test accuracies of any run (the baselines' test-time behaviour), as fractions."""
    model = loaded.model(epoch)
    with arithmetic(loaded.arithmetic(model)):
        acc = evaluate(model, loaded.data, batch_size=batch_size)
    return {"clean": acc["clean_train_acc"], "noisy": acc["noisy_train_acc"],
            "noisy_true": acc.get("noisy_train_true_acc"), "test": acc["test_acc"]}
