"""Evaluate a model trained with example-tied dropout before and after dropping its memorisation units.

Before ("tied"): every training example goes through its own training-time
mask, with the model in eval mode (BatchNorm running statistics), so this is
the accuracy the training actually produced. After ("drop"): the memorisation
units are zeroed and the generalisation units rescaled, the same for every
example. Test accuracy is reported in "eval" mode (every unit on, memorisation
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


import numpy as np
import torch
from torch import nn

from ..dropout import DROP_SCALES, ExampleTiedDropout, dropout_mode, find_example_tied_dropout, layer_setting
from ..errors import ConfigError, RunError
from ..experiment import LoadedRun
from ..training import evaluate, predict, subset_accuracies
from .base import ProbeResult

__all__ = ["evaluate_dropout", "plain_accuracies", "drop_scale", "require_example_tied_dropout"]


def require_example_tied_dropout(model: nn.Module, where: str = "this model") -> list[ExampleTiedDropout]:
    """The model's example-tied dropout layers; a clear error when it has none."""
    found = find_example_tied_dropout(model)
    if not found:
        raise RunError(f"{where} was trained without example-tied dropout, so it has no memorisation units to drop: "
                       "train one with `memloc train --example-tied-dropout P_GEN,P_MEM` (e.g. 0.4,0.1)")
    return found


def drop_scale(model: nn.Module, scale: str):
    """Use rescaling rule `scale` ("matched", "paper" or "none") in every example-tied layer inside; restored after."""
    if scale not in DROP_SCALES:
        raise ConfigError(f"unknown drop scale {scale!r}: use one of {', '.join(DROP_SCALES)}")
    return layer_setting(model, "drop_scale", scale)


def _pct(v: float | None) -> float | None:
    return None if v is None else round(100.0 * v, 4)


def evaluate_dropout(loaded: LoadedRun, *, epoch: int | None = None, scale: str = "matched",
                     batch_size: int = 1024, save: bool = False) -> ProbeResult:
    """The "dropout" probe: accuracies before (tied) and after (drop) removing the memorisation units.

    Returns a ProbeResult whose summary holds fractions (clean_before,
    noisy_before, clean_after, noisy_after, noisy_true_after, test_eval,
    test_drop, ...) and whose arrays hold the predictions (N,) / (M,) of each
    mode, `forgotten_clean` (indices of clean examples right before and wrong
    after) and `noisy_true_after` (indices of noisy examples predicted as their
    true class after the drop). `scale` is the drop-mode rescaling rule. With
    `save`, writes RUN/probes/dropout/ and marks the stage done.
    """
    if not save:
        return _evaluate_dropout(loaded, epoch=epoch, scale=scale, batch_size=batch_size)
    with loaded.run.working("dropout"):
        result = _evaluate_dropout(loaded, epoch=epoch, scale=scale, batch_size=batch_size)
        result.save(loaded.run)
        loaded.run.set_stage("dropout", "done")
    return result


@torch.no_grad()
def _evaluate_dropout(loaded: LoadedRun, *, epoch: int | None, scale: str, batch_size: int) -> ProbeResult:
    if scale not in DROP_SCALES:
        raise ConfigError(f"unknown drop scale {scale!r}: use one of {', '.join(DROP_SCALES)}")
    model = loaded.model(epoch)
    found = require_example_tied_dropout(model, str(loaded.run.path))
    data, device = loaded.data, loaded.device
    epoch = loaded.run.saved_epochs()[-1] if epoch is None else epoch

    def train_pred(mode: str) -> torch.Tensor:  # (N,) predicted classes of the training set
        with dropout_mode(model, mode), drop_scale(model, scale):
            logits = predict(model, data.x_train, batch_size=batch_size, with_indices=mode == "tied", device=device)
        return logits.argmax(1).to(data.y_train.device)

    def test_pred(mode: str) -> torch.Tensor:  # (M,)
        with dropout_mode(model, mode), drop_scale(model, scale):
            logits = predict(model, data.x_test, batch_size=batch_size, device=device)
        return logits.argmax(1).to(data.y_test.device)

    before, after = train_pred("tied"), train_pred("drop")
    acc_before = subset_accuracies(before == data.y_train, data, before)
    acc_after = subset_accuracies(after == data.y_train, data, after)
    te_eval, te_drop = test_pred("eval"), test_pred("drop")
    n_test = len(data.y_test)
    test_eval = float((te_eval == data.y_test).float().mean()) if n_test else None
    test_drop = float((te_drop == data.y_test).float().mean()) if n_test else None

    clean = ~data.is_noisy
    forgotten = torch.nonzero(clean & (before == data.y_train) & (after != data.y_train)).flatten()
    noisy_true = torch.nonzero(data.is_noisy & (after == data.y_true)).flatten()
    summary = {
        "epoch": epoch, "drop_scale": scale,
        "p_gen": found[0].p_gen, "p_mem": found[0].p_mem, "layers": len(found),
        "clean_before": acc_before["clean_train_acc"], "noisy_before": acc_before["noisy_train_acc"],
        "clean_after": acc_after["clean_train_acc"], "noisy_after": acc_after["noisy_train_acc"],
        "noisy_true_before": acc_before.get("noisy_train_true_acc"),
        "noisy_true_after": acc_after.get("noisy_train_true_acc"),
        "rare_before": acc_before["rare_train_acc"], "rare_after": acc_after["rare_train_acc"],
        "test_eval": test_eval, "test_drop": test_drop,
        "num_clean": int(clean.sum()), "num_noisy": int(data.is_noisy.sum()),
        "forgotten_clean": int(forgotten.numel()), "noisy_to_true_label": int(noisy_true.numel()),
    }
    arrays = {
        "pred_before": before.cpu().numpy().astype(np.int64), "pred_after": after.cpu().numpy().astype(np.int64),
        "pred_test_eval": te_eval.cpu().numpy().astype(np.int64), "pred_test_drop": te_drop.cpu().numpy().astype(np.int64),
        "forgotten_clean": forgotten.cpu().numpy().astype(np.int64),
        "noisy_true_after": noisy_true.cpu().numpy().astype(np.int64),
        "is_noisy": data.is_noisy.cpu().numpy().astype(bool),
    }
    rows = [
        {"split": "train", "mode": "tied", "clean_acc": _pct(summary["clean_before"]),
         "noisy_acc": _pct(summary["noisy_before"]), "noisy_true_acc": _pct(summary["noisy_true_before"]),
         "test_acc": None},
        {"split": "train", "mode": "drop", "clean_acc": _pct(summary["clean_after"]),
         "noisy_acc": _pct(summary["noisy_after"]), "noisy_true_acc": _pct(summary["noisy_true_after"]),
         "test_acc": None},
        {"split": "test", "mode": "eval", "clean_acc": None, "noisy_acc": None, "noisy_true_acc": None,
         "test_acc": _pct(test_eval)},
        {"split": "test", "mode": "drop", "clean_acc": None, "noisy_acc": None, "noisy_true_acc": None,
         "test_acc": _pct(test_drop)},
    ]
    return ProbeResult("dropout", summary, arrays, rows)


@torch.no_grad()
def plain_accuracies(loaded: LoadedRun, *, epoch: int | None = None, batch_size: int = 1024) -> dict:
    """Eval-mode clean/noisy/test accuracies of any run (the baselines' test-time behaviour), as fractions."""
    model = loaded.model(epoch)
    acc = evaluate(model, loaded.data, batch_size=batch_size)
    return {"clean": acc["clean_train_acc"], "noisy": acc["noisy_train_acc"],
            "noisy_true": acc.get("noisy_train_true_acc"), "test": acc["test_acc"]}
