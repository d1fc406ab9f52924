"""Detection of mislabeled (and rare) training examples: per-example scores and their quality.

Scores, each oriented so that HIGHER = MORE SUSPICIOUS (`suspicion = sign * raw`):

========================  ===============================================  ====
score (raw value)         raw value, per training example                  sign
========================  ===============================================  ====
``aum``                   area under the margin: mean over epochs of        -1
                          (logit of the given label - largest other logit)
``final_loss``            cross-entropy of the given label, last epoch      +1
``mean_loss``             mean cross-entropy over all epochs                +1
``forgetting``            forgetting events (correct at epoch e, wrong at   +1
                          e+1); never-learned examples rank above all
                          (suspicion = events + E)
``first_learned``         first epoch from which the example stays          +1
                          correct to the end (E+1: not correct at the end)
``units_to_flip``         units zeroed until the prediction flips (the      -1
                          flipping probe; noisy examples need FEWER); NaN
                          for examples the probe did not cover
``label_quality``         cleanlab's label quality on out-of-fold           -1
                          predicted probabilities (``cv`` > 0 only)
``prediction_depth``      the depth probe's prediction depth (Baldock et    +1
                          al.: the first layer from which every k-NN probe
                          agrees with the final prediction); only when the
                          run has a depth probe (``memloc depth RUN``)
========================  ===============================================  ====

All scores but the last three come from what training recorded (RUN/examples.npz:
each example's loss, margin and correctness in the training pass of every
epoch, train-mode BatchNorm, before that step's update): no extra passes over
the data. The one extra pass is the final model's predicted label (eval mode),
a column of ``suspects.csv`` only.

Quality against a known noise mask: AUROC and average precision (scikit-learn's
`roc_auc_score` and `average_precision_score`) and precision at k = number of
noisy examples (expected value when the k-th place falls inside a group of tied
scores; scikit-learn has no tie-aware one). A
score with NaN entries is judged on the examples it covers (``n`` in the table).
Rare detection (when rare examples are marked) is judged among the clean
examples only (noisy ones are neither rare nor typical there).

`detect(RUN)` writes RUN/probes/detection/: summary.json (the quality tables,
cleanlab and flipping details), arrays.npz (raw (N, S) and suspicion (N, S)
score matrices, score_names, ranking, ROC points `roc_<score>_fpr/_tpr`, the
top suspects' images), suspects.csv (= detection.csv: every example ranked by
`rank_by`, with given and predicted label and every raw score) and quality.csv.
`plot_roc` and `plot_gallery` draw the figures from that result alone.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..core.errors import ConfigError, DataError, RunError
from ..core.example_files import read_vector
from ..core.inference import predict
from ..core.options import INT64_MAX, check_ranges, option
from ..core.runs import RunDir
from ..core.tasks import task_of
from ..core.training import Trainer
from ..tasks.experiment import make_model
from .base import ProbeResult
from .depth import depth_scores
from .engine import Context, Probe, run_probe
from .flipping import FlipConfig, _plan

PROBE_NAME = "detection"

# name -> (sign turning the raw value into suspicion, what it is)
SCORES: dict[str, tuple[int, str]] = {
    "aum": (-1, "area under the margin (mean over epochs of given-label logit minus largest other logit)"),
    "final_loss": (1, "training loss of the given label at the last epoch"),
    "mean_loss": (1, "training loss of the given label averaged over epochs"),
    "forgetting": (1, "forgetting events (correct -> wrong between consecutive epochs); never learned ranks first"),
    "first_learned": (1, "first epoch learned for good (E+1: wrong at the last epoch)"),
    "units_to_flip": (-1, "units zeroed until the prediction flips (flipping probe); fewer = more suspicious"),
    "label_quality": (-1, "cleanlab label quality on k-fold out-of-fold predicted probabilities"),
    "prediction_depth": (1, "prediction depth (depth probe): the first layer from which every k-NN probe agrees "
                            "with the final prediction; deeper = more suspicious"),
}
RECORD_SCORES = ("aum", "final_loss", "mean_loss", "forgetting", "first_learned")
GALLERY = 32  # top suspects whose images are kept in arrays.npz for the report's gallery


@dataclass
class DetectConfig:
    """Settings of `memloc detect`. The default ranking is by AUM (needs no noise mask, no extra training)."""

    rank_by: str = option("aum", "score ranking suspects.csv: aum, final_loss, mean_loss, forgetting, first_learned, "
                          "units_to_flip, label_quality, prediction_depth")
    cv: int = option(0, "confident learning (cleanlab) on K-fold out-of-fold predictions: trains K extra models",
                     metavar="K", at_least=0)
    cv_epochs: int | None = option(None, "epochs of each cross-validation model (default: the run's)", at_least=1)
    flip_all: bool = option(False, "run the flipping probe on every training example first (slow)")
    # accuracy after removal on this many examples (flip_all)
    flip_eval_subsample: int = option(256, cli=False, at_least=1)
    rare_scores: str | None = option(None, "per-example scores file (.npy or CSV): examples below --rare-below "
                                     "are rare")
    rare_below: float = option(0.5, "threshold for --rare-scores")
    seed: int = option(0, cli=False, at_least=0, at_most=INT64_MAX)  # seed of the fold assignment
    device: str = option("auto", "auto, cpu or cuda", result=False)

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.rank_by not in SCORES:
            raise ConfigError(f"unknown score {self.rank_by!r} for --rank-by: choose one of {', '.join(SCORES)}")
        if self.cv == 1:
            raise ConfigError(f"--cv {self.cv} is not a number of folds: pass 0 (off) or at least 2, e.g. --cv 4")
        if self.cv_epochs is not None and not self.cv:
            raise ConfigError("--cv-epochs is set without --cv: pass --cv K to train K cross-validation models")
        if self.rank_by == "label_quality" and not self.cv:
            raise ConfigError("--rank-by label_quality needs cross-validated predictions: pass --cv K (e.g. 4)")


# ----------------------------------------------------------------------------- metrics

def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in length")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf: select the covered examples first")
    return s, y


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (scikit-learn's `roc_auc_score`: ties count 1/2); None when a class is empty."""
    from sklearn.metrics import roc_auc_score
    s, y = _check(scores, labels)
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else None


def _tie_groups(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative true and false positives at each distinct threshold, highest score first."""
    order = np.argsort(-s, kind="mergesort")
    ss, yy = s[order], y[order]
    last = np.r_[ss[1:] != ss[:-1], True]  # last position of each tie group
    tp = np.cumsum(yy)[last]
    fp = np.cumsum(~yy)[last]
    return tp.astype(np.float64), fp.astype(np.float64)


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """scikit-learn's `average_precision_score` (step-wise, ties grouped); None without positives."""
    from sklearn.metrics import average_precision_score
    s, y = _check(scores, labels)
    return float(average_precision_score(y, s)) if y.any() else None


def precision_at_k(scores: np.ndarray, labels: np.ndarray, k: int) -> float | None:
    """Share of positives among the k highest scores; a tie group cut by the k-th place counts pro rata."""
    s, y = _check(scores, labels)
    if k < 1 or len(s) == 0:
        return None
    k = min(k, len(s))
    tp, fp = _tie_groups(s, y)
    size = tp + fp  # examples at or above each threshold
    g = int(np.searchsorted(size, k))  # the group holding the k-th place
    above_tp = tp[g - 1] if g else 0.0
    above = size[g - 1] if g else 0.0
    group_tp, group_n = tp[g] - above_tp, size[g] - above
    return float((above_tp + (k - above) * group_tp / group_n) / k)


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1) (scikit-learn's); empty when a class is missing."""
    from sklearn.metrics import roc_curve as sk_roc_curve
    s, y = _check(scores, labels)
    if not 0 < y.sum() < len(y):
        return np.zeros(0), np.zeros(0)
    fpr, tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr


def quality_table(scores: np.ndarray, names: list[str], positive: np.ndarray, *,
                  within: np.ndarray | None = None) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Per score: AUROC, AP, precision at k (= positives covered) on the examples it covers.

    scores: (N, S) suspicion; positive: (N,) bool; within: (N,) bool restricting the examples judged.
    Returns the rows and the ROC curves as arrays `<name>_fpr`, `<name>_tpr`.
    """
    positive = np.asarray(positive, dtype=bool)
    within = np.ones(len(positive), dtype=bool) if within is None else np.asarray(within, dtype=bool)
    rows, curves = [], {}
    for j, name in enumerate(names):
        keep = within & np.isfinite(scores[:, j])
        s, y = scores[keep, j], positive[keep]
        k = int(y.sum())
        rows.append({"score": name, "n": int(keep.sum()), "positives": k,
                     "auroc": auroc(s, y), "average_precision": average_precision(s, y),
                     "precision_at_k": precision_at_k(s, y, k) if k else None,
                     "base_rate": float(y.mean()) if len(y) else None})
        curves[f"{name}_fpr"], curves[f"{name}_tpr"] = roc_curve(s, y)
    return rows, curves


# ----------------------------------------------------------------------------- scores

def record_scores(loss: np.ndarray, margin: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """Raw scores from training records: loss, margin (E, N) float, correct (E, N) bool -> name: (N,)."""
    loss = np.asarray(loss, dtype=np.float64)
    margin = np.asarray(margin, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if not (loss.shape == margin.shape == correct.shape) or loss.ndim != 2 or loss.shape[0] < 1:
        raise RunError(f"per-example records have shapes loss {loss.shape}, margin {margin.shape}, "
                       f"correct {correct.shape}: expected equal (epochs, examples) arrays")
    E = loss.shape[0]
    # suffix[e, i]: example i is correct at every epoch from e+1 to E
    suffix = np.flip(np.cumprod(np.flip(correct, 0), 0), 0).astype(bool)  # (E, N)
    first = np.where(suffix[-1], suffix.argmax(0) + 1, E + 1)  # argmax: the first epoch of the final streak
    events = (correct[:-1] & ~correct[1:]).sum(0)
    return {"aum": margin.mean(0), "final_loss": loss[-1], "mean_loss": loss.mean(0),
            "forgetting": events.astype(np.float64), "first_learned": first.astype(np.float64),
            "_never_learned": ~correct.any(0)}


def suspicion(name: str, raw: np.ndarray, *, epochs: int, never_learned: np.ndarray | None = None) -> np.ndarray:
    """Raw score -> higher-is-more-suspicious (never-learned examples first for forgetting, as Toneva et al.)."""
    out = SCORES[name][0] * np.asarray(raw, dtype=np.float64)
    if name == "forgetting" and never_learned is not None:
        out = out + epochs * never_learned  # events <= E/2 < E: never learned ranks above any count
    return out


def flip_scores(arrays: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Units-to-flip per training example (N,) from the flipping probe's arrays; NaN where not covered."""
    idx = arrays.get("index")
    units = arrays.get("num_units")
    if idx is None or units is None:
        raise RunError("the flipping probe's arrays.npz has no index/num_units: rerun `memloc flip` with this memloc")
    idx = np.asarray(idx, dtype=np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise RunError(f"the flipping probe covers example {int(idx.max())}, but the run has {n}: "
                       "it comes from another run")
    out = np.full(n, np.nan)
    out[idx] = np.asarray(units, dtype=np.float64)  # unflipped ones hold the cap: the least suspicious
    return out


def detect_scores(raw: dict[str, np.ndarray], *, given: np.ndarray, is_noisy: np.ndarray | None,
                  is_rare: np.ndarray | None, rank_by: str = "aum", epochs: int,
                  predicted: np.ndarray | None = None, true_labels: np.ndarray | None = None,
                  never_learned: np.ndarray | None = None, extra_summary: dict | None = None) -> ProbeResult:
    """Ranking and quality tables from raw scores (name -> (N,), NaN = not covered); a pure function.

    is_noisy: (N,) bool or None (noise unknown: ranking only); is_rare: (N,) bool or None.
    """
    names = [s for s in SCORES if s in raw]
    if rank_by not in names:
        raise ConfigError(f"--rank-by {rank_by}: that score was not computed for this run "
                          f"(available: {', '.join(names)})")
    n = len(given)
    raw_m = np.stack([np.asarray(raw[s], dtype=np.float64) for s in names], 1)  # (N, S)
    susp = np.stack([suspicion(s, raw[s], epochs=epochs, never_learned=never_learned) for s in names], 1)  # (N, S)
    j = names.index(rank_by)
    key = np.where(np.isfinite(susp[:, j]), -susp[:, j], np.inf)  # NaN (not covered) last
    ranking = np.argsort(key, kind="mergesort")  # ties keep dataset order
    summary: dict = {"probe": PROBE_NAME, "rank_by": rank_by, "num_examples": n, "epochs": epochs,
                     "scores": {s: {"sign": SCORES[s][0], "description": SCORES[s][1],
                                    "covered": int(np.isfinite(raw_m[:, i]).sum())} for i, s in enumerate(names)},
                     "orientation": "suspicion = sign * raw value; higher = more suspicious",
                     "noise_known": is_noisy is not None}
    arrays: dict[str, np.ndarray] = {"score_names": np.array(names), "raw": raw_m, "scores": susp,
                                     "ranking": ranking.astype(np.int64), "given_label": np.asarray(given, np.int64)}
    quality = None
    if is_noisy is not None and 0 < int(np.sum(is_noisy)) < n:
        quality, curves = quality_table(susp, names, is_noisy)
        arrays.update({f"roc_{k}": v for k, v in curves.items()})
        arrays["is_noisy"] = np.asarray(is_noisy, dtype=bool)
        summary["num_noisy"] = int(np.sum(is_noisy))
        best = max((r for r in quality if r["auroc"] is not None), key=lambda r: r["auroc"], default=None)
        summary["best"] = best["score"] if best else None
    elif is_noisy is not None:
        summary["quality_note"] = "no quality table: the run has no noisy examples (or only noisy ones)"
    else:
        summary["quality_note"] = "no quality table: the run's noise is unknown (ranking only)"
    summary["quality"] = quality
    rare_quality = None
    if is_rare is not None and np.any(is_rare):
        within = ~np.asarray(is_noisy, dtype=bool) if is_noisy is not None else None
        rare_quality, curves = quality_table(susp, names, is_rare, within=within)
        arrays.update({f"rare_roc_{k}": v for k, v in curves.items()})
        arrays["is_rare"] = np.asarray(is_rare, dtype=bool)
        summary["num_rare"] = int(np.sum(is_rare))
        summary["rare_within"] = "clean examples" if within is not None else "all examples"
    summary["rare_quality"] = rare_quality
    if predicted is not None:
        arrays["predicted_label"] = np.asarray(predicted, np.int64)
    if extra_summary:
        summary.update(extra_summary)
    rows = []
    for rank, i in enumerate(ranking, start=1):
        row = {"rank": rank, "index": int(i), "given_label": int(given[i])}
        if predicted is not None:
            row["predicted_label"] = int(predicted[i])
        if is_noisy is not None:
            if true_labels is not None:
                row["true_label"] = int(true_labels[i])
            row["is_noisy"] = int(bool(is_noisy[i]))
        if is_rare is not None:
            row["is_rare"] = int(bool(is_rare[i]))
        for s_i, s in enumerate(names):
            v = raw_m[i, s_i]
            row[s] = "" if not np.isfinite(v) else (int(v) if s in ("forgetting", "first_learned", "units_to_flip",
                                                                    "prediction_depth") else round(float(v), 5))
        row["suspicion"] = "" if not np.isfinite(susp[i, j]) else round(float(susp[i, j]), 5)
        rows.append(row)
    return ProbeResult(PROBE_NAME, summary, arrays, rows)


# ----------------------------------------------------------------------------- confident learning (cleanlab)

def cross_validated_probs(run_cfg, data, *, folds: int, epochs: int | None = None, seed: int = 0,
                          log: Callable[[str], None] | None = None) -> np.ndarray:
    """Out-of-fold predicted probabilities (N, K): `folds` models, each trained on the other folds.

    Each fold's model has the run's architecture and training recipe (gradient
    accounting off, `epochs` if given), is initialized from the run's seed plus
    the fold number, and predicts its held-out fold in eval mode.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    y = data.y_train.cpu().numpy()
    n = len(y)
    if n < folds:
        raise DataError(f"--cv {folds} needs at least {folds} training examples, the run has {n}")
    counts = np.bincount(y, minlength=data.num_classes)
    split = (StratifiedKFold(folds, shuffle=True, random_state=seed) if counts[counts > 0].min() >= folds
             else KFold(folds, shuffle=True, random_state=seed))
    tcfg = replace(run_cfg.train, gradient_accounting=False, compile=False,
                   epochs=epochs if epochs is not None else run_cfg.train.epochs)
    probs = np.zeros((n, data.num_classes), dtype=np.float64)
    for f, (tr, te) in enumerate(split.split(np.zeros(n), y)):
        part = data.subset(tr)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(run_cfg.train.seed + 1000 * (f + 1))
            model = make_model(run_cfg.model, part)
        tcfg_f = replace(tcfg, seed=run_cfg.train.seed + 1000 * (f + 1))
        trainer = Trainer(model, part, tcfg_f, run=None, progress=False)
        if log:
            log(f"cross-validation fold {f + 1}/{folds}: training on {len(tr)} examples for {tcfg.epochs} epochs")
        trainer.fit()
        held = data.x_train[torch.as_tensor(te, device=data.x_train.device)]
        logits = predict(trainer.model, held, batch_size=tcfg.eval_batch_size)
        probs[te] = torch.softmax(logits.double(), 1).cpu().numpy()
    return probs


def label_quality(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's self-confidence label quality (N,) in [0, 1] and its find_label_issues mask (N,)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    labels = np.asarray(labels, dtype=np.int64)
    quality = get_label_quality_scores(labels, probs)
    issues = find_label_issues(labels, probs)
    return np.asarray(quality, dtype=np.float64), np.asarray(issues, dtype=bool)


# ----------------------------------------------------------------------------- the run-level function

def read_records(run) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """loss, margin, correct (E, N) from RUN/examples.npz; a clear error when the run has none."""
    p = run.path / "examples.npz"
    if not p.exists():
        raise RunError(f"{run.path} has no per-example records (examples.npz): train it with `memloc train` "
                       "(it records them every epoch) before `memloc detect`")
    rec = run.load_arrays("examples.npz")
    missing = [k for k in ("loss", "margin", "correct_bits", "num_examples") if k not in rec]
    if missing:
        raise RunError(f"{p} lacks {', '.join(missing)}: it was written by another memloc version; retrain the run")
    n = int(rec["num_examples"])
    correct = np.unpackbits(rec["correct_bits"], axis=1, count=n).astype(bool)
    if rec["loss"].shape[0] < 1:
        raise RunError(f"{p} holds no finished epoch: let training finish (or --resume it) first")
    return rec["loss"], rec["margin"], correct


def _records(ctx: Context, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The training records: the run's, or the caller's `history` (a History, a RunDir or its path); None without."""
    history = ctx.sources.get("history")
    if history is None and ctx.run is None:
        return None
    if history is not None and hasattr(history, "records"):
        rec = history.records
        records = rec["loss"], rec["margin"], rec["correct"]
    else:
        run = ctx.run if history is None else (history if isinstance(history, RunDir) else RunDir.open(history))
        records = read_records(run)
    if records[0].shape[1] != n:
        raise DataError(f"the training history covers {records[0].shape[1]} examples but the data has {n}: "
                        "pass the history of training on this data")
    return records


def _flip_config(cfg: DetectConfig, n: int) -> FlipConfig:
    # the paper's 512 others, or the whole training set when it is smaller; detection's own counts (none typed)
    return FlipConfig(indices=tuple(range(n)), kinds=(), others=min(512, n),
                      eval_subsample=min(cfg.flip_eval_subsample, n), device=cfg.device, given=())


def _check_inputs(model: nn.Module, data: Any, cfg: DetectConfig, ctx: Context) -> None:
    """Every input is checked before any training (the cross-validation's, the flipping's)."""
    task = task_of(data)
    if not getattr(task, "class_labels", False):  # cleanlab's label quality and the margins read class probabilities
        raise ConfigError(f"detect finds mislabeled examples of a classifier; this run's task is {task.name}: for a "
                          "language model, `memloc memorization RUN` measures its canaries")
    _records(ctx, task.num_train)
    if cfg.rare_scores:
        read_vector(cfg.rare_scores, length=task.num_train, what="--rare-scores file", kind="scores")
    has_flip = ctx.run is not None and (ctx.run.path / "probes" / "flipping" / "summary.json").exists()
    if cfg.rank_by == "units_to_flip" and not (has_flip or cfg.flip_all):
        where = f"`memloc flip {ctx.run.path}`" if ctx.run is not None else "memloc.flip on the run"
        raise ConfigError(f"--rank-by units_to_flip needs the flipping probe: run {where} first, or pass --flip-all")
    has_depth = ctx.run is not None and (ctx.run.path / "probes" / "depth" / "summary.json").exists()
    if cfg.rank_by == "prediction_depth" and not has_depth:
        where = f"`memloc depth {ctx.run.path}`" if ctx.run is not None else "memloc.prediction_depth on the run"
        raise ConfigError(f"--rank-by prediction_depth needs the depth probe: run {where} first")
    if (cfg.flip_all or cfg.cv) and ctx.loaded is None:
        raise ConfigError("--flip-all and --cv work on a run directory: pass the run made by `memloc train`")
    if cfg.flip_all:
        _plan(model, data, _flip_config(cfg, task.num_train), note=lambda line: None)  # fails before the CV


def _compute(model: nn.Module, data: Any, cfg: DetectConfig, ctx: Context) -> ProbeResult:
    """Scores of every training example, their ranking, and their quality against the known memorized kind."""
    task = task_of(data)
    n, given = task.num_train, task.targets("given")
    mem, ref = task.memorized_kind, task.reference_kind
    memorized = task.kind_mask(mem)
    others = [k for k in task.kinds if k not in (mem, ref)]  # classification: rare, judged among the clean
    rare, rare_source = None, None
    if cfg.rare_scores:
        scores = read_vector(cfg.rare_scores, length=n, what="--rare-scores file", kind="scores")
        rare, rare_source = scores < cfg.rare_below, f"{cfg.rare_scores} < {cfg.rare_below:g}"
    elif others and (m := task.kind_mask(others[0])) is not None and bool(m.any()):
        rare, rare_source = m.cpu().numpy(), "the run's --rare-scores"
    out = predict(model, task.data.x_train, inputs=task.inputs)  # (N, K): the final model, eval mode
    predicted = task.predict(out).cpu().numpy()
    records = _records(ctx, n)
    extra: dict = {}
    if records is not None:
        raw = record_scores(*records)
        never = raw.pop("_never_learned")
        epochs = int(records[0].shape[0])
        extra["records"] = "training records: each example's loss, margin and correctness in each epoch's " \
                           "training pass (train-mode BatchNorm)"
    else:
        y = given.to(out.device)
        raw = {"aum": task.margin(out, y).double().cpu().numpy(),
               "final_loss": task.loss(out, y).double().cpu().numpy()}
        never, epochs = None, 1
        extra["records"] = "one eval-mode pass of the final model (no training history): final_loss and aum = " \
                           "final margin"
    if cfg.flip_all:
        from .flipping import PROBE as FLIPPING
        ctx.log(f"flipping probe on all {n} training examples")
        run_probe(FLIPPING, ctx.loaded, cfg=_flip_config(cfg, n), overwrite=ctx.overwrite, progress=ctx.progress,
                  log=ctx.log)
    if ctx.run is not None and (ctx.run.path / "probes" / "flipping" / "summary.json").exists():
        fr = ProbeResult.load(ctx.run, "flipping")
        raw["units_to_flip"] = flip_scores(fr.arrays, n)
        extra["flipping"] = {"covered": int(np.isfinite(raw["units_to_flip"]).sum()),
                             "budget_units": fr.summary.get("budget_units"), "epoch": fr.summary.get("epoch")}
    if ctx.run is not None and (ctx.run.path / "probes" / "depth" / "summary.json").exists():
        dr = ProbeResult.load(ctx.run, "depth")
        raw["prediction_depth"] = depth_scores(dr.arrays, n)
        extra["depth"] = {"k": dr.summary.get("k"), "support": dr.summary.get("support"),
                          "num_layers": dr.summary.get("num_layers"), "epoch": dr.summary.get("epoch")}
    given_np = given.cpu().numpy()
    if cfg.cv:
        cv_epochs = cfg.cv_epochs  # default: the run's; --epochs auto: as many as the run took to memorize
        if cv_epochs is None and ctx.loaded.config.train.auto:
            cv_epochs = len(ctx.loaded.run.read_metrics())
        probs = cross_validated_probs(ctx.loaded.config, data, folds=cfg.cv, epochs=cv_epochs, seed=cfg.seed,
                                      log=ctx.log)
        quality, issues = label_quality(given_np, probs)
        raw["label_quality"] = quality
        extra["cleanlab"] = {"folds": cfg.cv, "epochs": cv_epochs or ctx.loaded.config.train.epochs,
                             "label_issues": int(issues.sum()),
                             "out_of_fold_accuracy": float((probs.argmax(1) == given_np).mean())}
        if memorized is not None:
            m = memorized.cpu().numpy()
            tp = int((issues & m).sum())
            extra["cleanlab"][f"label_issues_{mem}"] = tp
            extra["cleanlab"]["label_issues_precision"] = tp / max(1, int(issues.sum()))
            extra["cleanlab"]["label_issues_recall"] = tp / max(1, int(m.sum()))
    extra["predicted_label"] = "final model, eval mode (one pass over the training set)"
    if rare_source:
        extra["rare_source"] = rare_source
    true = task.targets("true")
    result = detect_scores(raw, given=given_np, is_noisy=None if memorized is None else memorized.cpu().numpy(),
                           is_rare=rare, rank_by=cfg.rank_by, epochs=epochs, predicted=predicted,
                           true_labels=None if true is None else true.cpu().numpy(), never_learned=never,
                           extra_summary=extra)
    if cfg.cv:
        result.arrays["cleanlab_probs"] = probs.astype(np.float32)
        result.arrays["cleanlab_issue"] = issues
    top = result.arrays["ranking"][:GALLERY]
    x = task.data.x_train
    result.arrays["top_images"] = x[torch.as_tensor(top, device=x.device)].cpu().numpy()
    result.arrays["top_index"] = top
    result.files = {"suspects.csv": _rows_csv(result.rows), "quality.csv": _quality_csv(result.summary)}
    return result


def _rows_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _describe(result: ProbeResult) -> list[str]:
    s = result.summary
    lines = [format_table(s)]
    if s.get("rare_quality"):
        lines.append(format_table(s, target="rare"))
    if s.get("best"):
        lines.append(f"best score: {s['best']}")
    lines.append(f"suspects ranked by {s['rank_by']}: {Path(s['run']) / 'probes' / PROBE_NAME / 'suspects.csv'}"
                 if s.get("run") else f"suspects ranked by {s['rank_by']}")
    return lines


PROBE = Probe(PROBE_NAME, "detect", DetectConfig, _compute, check=_check_inputs, describe=_describe,
              overwrite_help="with --flip-all: replace a flipping probe made with other settings",
              help="score and rank training examples as suspected mislabeled; quality vs known noise")


def detect(target: Any, data: Any = None, cfg: DetectConfig | None = None, *, history: Any = None,
           overwrite: bool = False, save: bool = True, progress: bool = False,
           log: Callable[[str], None] | None = None, **options: Any) -> ProbeResult:
    """Score every training example as a suspected mislabel; rank them; judge the scores when noise is known.

    `target`: a run directory (``memloc detect RUN``: the training records, the flipping probe when it ran,
    `--cv` and `--flip-all`; saved into RUN/probes/detection/ with suspects.csv and quality.csv), or a
    trained model with its `data`: one eval-mode pass gives ``final_loss`` and ``aum``; with `history` (the
    :class:`History` :func:`memloc.train` returned, or the RunDir it wrote) the training records give
    ``aum``, ``final_loss``, ``mean_loss``, ``forgetting`` and ``first_learned``. `cfg` a
    :class:`DetectConfig`, or `options` its fields (e.g. ``rank_by="forgetting"``). Higher suspicion = more
    likely mislabeled. Result arrays: ``raw`` and ``scores`` (N, S), ``score_names`` (S,), ``ranking`` (N,)
    most suspicious first. `overwrite` lets --flip-all replace a flipping probe made with other settings.
    """
    return run_probe(PROBE, target, data, cfg, sources={"history": history}, overwrite=overwrite, save=save,
                     progress=progress, log=log, **options)


def _quality_csv(summary: dict) -> str:
    lines = ["target,score,n,positives,auroc,average_precision,precision_at_k,base_rate"]
    for target, rows in (("noisy", summary.get("quality")), ("rare", summary.get("rare_quality"))):
        for r in rows or []:
            vals = [r[k] for k in ("n", "positives", "auroc", "average_precision", "precision_at_k", "base_rate")]
            lines.append(",".join([target, r["score"]] + ["" if v is None else f"{v:.6g}" for v in vals]))
    return "\n".join(lines) + "\n"


def format_table(summary: dict, *, target: str = "noisy") -> str:
    """The quality table as Markdown (score, n, AUROC, AP, P@k)."""
    rows = summary.get("quality" if target == "noisy" else "rare_quality")
    if not rows:
        return summary.get("quality_note", f"no {target} quality table")

    def f(v):
        return "n/a" if v is None else f"{v:.3f}"
    out = [f"| score | n ({target}) | AUROC | AP | P@k |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['score']} | {r['n']} ({r['positives']}) | {f(r['auroc'])} | {f(r['average_precision'])} | "
                   f"{f(r['precision_at_k'])} |")
    return "\n".join(out)


def roc_figure(result: ProbeResult, *, target: str = "noisy"):
    """The ROC curve of every score (one figure), from a detection result alone."""
    from ..core.figures import pyplot
    plt = pyplot()
    rows = result.summary.get("quality" if target == "noisy" else "rare_quality")
    if not rows:
        raise RunError(f"the detection result has no {target} quality table: nothing to plot")
    prefix = "roc_" if target == "noisy" else "rare_roc_"
    fig, ax = plt.subplots(figsize=(5, 4.6))
    for r in rows:
        fpr, tpr = result.arrays.get(f"{prefix}{r['score']}_fpr"), result.arrays.get(f"{prefix}{r['score']}_tpr")
        if fpr is None or len(fpr) == 0:
            continue
        label = f"{r['score']} (AUROC {r['auroc']:.3f}" + (f", n={r['n']})" if r["n"] < result.summary["num_examples"]
                                                           else ")")
        ax.plot(fpr, tpr, label=label, lw=1.5)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("false positive rate (clean flagged)" if target == "noisy" else "false positive rate")
    ax.set_ylabel(f"true positive rate ({target} found)")
    ax.set_title(f"detecting {target} training examples")
    ax.legend(loc="lower right", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    return fig


def gallery(result: ProbeResult, *, top: int = GALLERY, columns: int = 8):
    """The top suspects' examples (arrays.npz `top_images`: images, sequences or features, drawn as their shape
    allows) titled with index, given and predicted label."""
    from ..core.figures import gallery_figure
    images = result.arrays.get("top_images")
    if images is None or len(images) == 0:
        raise RunError("the detection result holds no top-suspect images: rerun `memloc detect`")
    images = images[:top]  # (T, C, H, W), (T, C, L) or (T, F)
    idx, given = result.arrays["top_index"], result.arrays["given_label"]
    pred = result.arrays.get("predicted_label")
    noisy = result.arrays.get("is_noisy")
    titles = [f"#{int(i)} y={int(given[i])}" + (f" p={int(pred[i])}" if pred is not None else "") for i in idx[:top]]
    colors = ["red" if noisy is not None and noisy[i] else "black" for i in idx[:top]]
    return gallery_figure(images, titles, colors=colors, columns=columns,
                          suptitle=f"top suspects by {result.summary.get('rank_by')} (red: known noisy)")


def plot_roc(result: ProbeResult, path: str | Path, *, target: str = "noisy") -> Path:
    """Draw the ROC curve of every score (`roc_figure`) into a PNG at `path`."""
    return _save(roc_figure(result, target=target), path)


def plot_gallery(result: ProbeResult, path: str | Path, *, top: int = GALLERY, columns: int = 8) -> Path:
    """Draw the top suspects' images (`gallery`) into a PNG at `path`."""
    return _save(gallery(result, top=top, columns=columns), path)


def _save(fig, path: str | Path) -> Path:
    from ..core.figures import png
    from ..core.files import atomic_write
    data = png(fig)
    path = Path(path)
    atomic_write(path, lambda p: p.write_bytes(data))
    return path
