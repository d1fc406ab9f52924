"""Layer-wise decodability and prediction depth (`memloc depth RUN`): where in the network a label can be read.

Two views the paper argues with. Stephenson et al. (ICLR 2021) find that permuted
(noisy) labels become decodable only in the later layers; Baldock et al. (NeurIPS
2021) define an example's *prediction depth* from k-NN probes on the hidden layers
and find mislabeled and hard examples deeper. What this module computes, exactly:

* **Layers** are the layers of `memloc.layers(model)` in forward order (or those
  named in `layers`), P of them; the input itself is not probed. A layer's
  **feature** for an example is its units' activations (the output of the
  layer's norm and nonlinearity, as every probe reads them) averaged over
  every other dimension: over the spatial positions of a conv map (global
  average pooling), over the tokens or patches of a linear layer applied per
  position. The last layer of a classifier is its head: its feature is the
  logits (before any fixed output scale).
* **The model** runs in eval mode, in the arithmetic training used (bf16 autocast
  on a GPU, fp32 on a CPU: `memloc.core.precision`); its **final prediction** is the
  argmax of its output. Features are pooled in float32.
* **Support set**: `support` training examples (all when there are fewer), a
  seeded uniform choice (numpy's generator seeded with `seed`) without
  replacement. Its features are kept per layer (S x units: small); the query
  examples then stream through the model batch by batch, so no layer's features
  of the whole training set are ever held.
* **k-NN probe** of a layer: cosine similarity between the query's and each
  support example's feature (features scaled to unit norm; an all-zero feature
  has similarity 0 with everything), the `k` most similar support examples (a
  query that is itself in the support set leaves itself out), majority vote
  of their labels; a tied vote goes to the smallest class (as scikit-learn's
  `KNeighborsClassifier`). Two probes per layer: the support examples carry their
  **given** labels (what training saw, the noisy ones included), compared with
  each example's given label; or their **true** labels, compared with each
  example's true label (only when the noise is known).
* **Queries**: every training example.
* **Prediction depth** of an example (Baldock et al.'s definition, with the
  hidden layers as the probes): with g_0 .. g_{P-1} the given-label k-NN
  predictions at the probed layers and y_hat the final prediction, depth = the
  smallest d in 0..P such that g_l = y_hat for every l with d <= l < P. So depth 0:
  already the first layer's neighbours agree with the final prediction, and so
  does every later layer; depth P: the last layer's k-NN disagrees with the final
  prediction (only the output itself agrees). With every layer probed (the default)
  d is the index of a layer in `memloc.layers(model)` (`--layers 0,1`), and d
  counts the layers before it. Baldock et al. also place a probe on the input and
  call it depth 0: where the input's probe disagrees, their depth is ours + 1.
* **Decodability curves**: per layer, the share of clean, noisy, rare and all
  training examples whose given-label (true-label) k-NN prediction is their given
  (true) label; `knn_agree`: the share whose given-label k-NN prediction is the
  final prediction.
* **Linear probe** (`linear`, a second readout): per layer and label kind, a
  scikit-learn `LogisticRegression` (lbfgs, C = 1, up to 1000 iterations, on the
  unit-norm features standardized) fit on the support set's features and labels. Every example is
  read out by a probe that was not fit on it: examples outside the support set by
  the probe fit on the whole support set; support examples by the probe fit on the
  other half of the support set (two seeded halves).

Result (`RUN/probes/depth/`): arrays.npz with ``depth`` (N,), ``predicted``,
``given_label``, ``true_label`` (N,), ``is_noisy``, ``is_rare`` (N,) bool,
``support`` (S,), ``knn_given`` / ``knn_true`` (P, N) k-NN predictions,
``knn_given_acc`` / ``knn_true_acc`` / ``knn_agree`` (P, 4) and with `linear`
``linear_given_acc`` / ``linear_true_acc`` (P, 4) over ``subsets`` (clean, noisy,
rare, all; NaN where a subset is empty or the true labels are unknown),
``layer_names``, ``layer_index`` (P,); depth.csv one row per example; summary.json
with the depth medians per kind and the curves.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError, RunError
from ..core.examples import batches
from ..core.layers import Layer, select_layers
from ..core.layers import layers as find_layers
from ..core.options import INT64_MAX, check_ranges, names, option
from ..core.precision import autocast
from ..core.tasks import Task, task_of
from .base import ProbeResult
from .engine import Context, Probe, run_probe
from .sweep import progress_bar

PROBE_NAME = "depth"
SUBSETS = ("clean", "noisy", "rare", "all")  # the columns of every (P, 4) accuracy array
DECODABLE = 0.5  # noisy labels are "decodable" at a layer once their given-label k-NN accuracy exceeds this


@dataclass
class DepthConfig:
    """Settings of `memloc depth`. Defaults: Baldock et al.'s k = 30 neighbours, a support set of 1,000 examples."""

    k: int = option(30, "neighbours of the k-NN probes (as Baldock et al.)", at_least=1)
    support: int = option(1000, "support examples of the k-NN probes: a seeded choice of the training set (all when "
                          "there are fewer)", at_least=2)
    layers: tuple[str, ...] | None = option(None, "comma-separated layer names or indices to probe (default: all)",
                                            parse=names)
    linear: bool = option(False, "also a linear probe per layer (scikit-learn logistic regression on the support "
                          "set)")
    seed: int = option(0, "seed of the support set and of the linear probe's halves", at_least=0, at_most=INT64_MAX)
    batch_size: int = option(512, "examples per forward pass", result=False, at_least=1)
    epoch: int | None = option(None, "probe this saved epoch (default: the final one)", at_least=0)
    device: str = option("auto", "auto, cpu or cuda", result=False)

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.layers is not None:
            self.layers = tuple(str(n) for n in self.layers)


# ----------------------------------------------------------------------------- the pieces, each a pure function

def pooled(a: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """A layer's activations (B, ...) -> its feature (B, U) float32: the mean over every dimension but the units'."""
    dim = unit_dim % a.dim()
    rest = [d for d in range(1, a.dim()) if d != dim]
    a = a.float()
    return a.mean(rest) if rest else a  # (B, U)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm (an all-zero row stays zero): cosine similarity becomes a dot product."""
    return F.normalize(x.float(), dim=1)


def knn_predict(query: torch.Tensor, support: torch.Tensor, labels: torch.Tensor, k: int, num_classes: int, *,
                exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Majority vote (B,) of the labels of the `k` support rows most cosine-similar to each query row.

    query (B, D), support (S, D) features (any norm); labels (S,) int; exclude (B,) the position in the support
    set of each query's own example (-1: not in it), left out of its neighbours. A tied vote goes to the smallest
    class; ties in similarity are broken by `torch.topk`.
    """
    sim = unit_rows(query) @ unit_rows(support).T  # (B, S)
    if exclude is not None:
        own = exclude >= 0
        if bool(own.any()):
            sim[own.nonzero()[:, 0], exclude[own]] = float("-inf")
    top = sim.topk(k, dim=1).indices  # (B, k)
    votes = F.one_hot(labels[top], num_classes).sum(1)  # (B, C)
    return votes.argmax(1)  # the first of the largest counts: the smallest class on a tie


def prediction_depths(knn: np.ndarray, final: np.ndarray) -> np.ndarray:
    """Depth (N,) from given-label k-NN predictions (P, N) and the final predictions (N,): the smallest d with every
    probe from d on equal to the final prediction (P when the last probe disagrees)."""
    agree = np.asarray(knn) == np.asarray(final)[None]  # (P, N)
    settled = np.flip(np.cumprod(np.flip(agree, 0), 0), 0)  # (P, N): this probe and every later one agree
    return (agree.shape[0] - settled.sum(0)).astype(np.int64)


def subset_masks(task: Task) -> dict[str, np.ndarray | None]:
    """(N,) bool per column of SUBSETS; None where the subset is unknown."""
    out = {}
    for kind in SUBSETS[:-1]:
        m = task.kind_mask(kind)
        out[kind] = None if m is None else m.cpu().numpy().astype(bool)
    out["all"] = np.ones(task.num_train, dtype=bool)
    return out


def subset_accuracy(hits: np.ndarray, masks: dict[str, np.ndarray | None]) -> np.ndarray:
    """(P, 4) share of hits (P, N) bool within each subset of SUBSETS; NaN where a subset is empty or unknown."""
    out = np.full((hits.shape[0], len(SUBSETS)), np.nan)
    for j, s in enumerate(SUBSETS):
        m = masks[s]
        if m is not None and m.any():
            out[:, j] = hits[:, m].mean(1)
    return out


def choose_support(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices (min(size, n),) of the support set: a seeded uniform choice without replacement."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)).astype(np.int64)


# ----------------------------------------------------------------------------- features by forward hooks

@contextlib.contextmanager
def captured(model: nn.Module, picked: Sequence[Layer]) -> Iterator[list[torch.Tensor | None]]:
    """Inside: after each forward pass, slot j holds layer j's pooled feature (B, U_j); the hooks go on exit."""
    modules = dict(model.named_modules())
    slots: list[torch.Tensor | None] = [None] * len(picked)

    def hook(j: int, unit_dim: int):
        def keep(module, inputs, output):
            slots[j] = pooled(output.detach(), unit_dim)  # a new tensor: an in-place op later cannot change it
        return keep

    handles = [modules[l.output].register_forward_hook(hook(j, l.unit_dim)) for j, l in enumerate(picked)]
    try:
        yield slots
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _passes(model: nn.Module, task: Task, picked: Sequence[Layer], idx: np.ndarray, *, batch_size: int,
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]:
    """Yield (positions (B,), final prediction (B,), features [(B, U_j)]) over the training examples at `idx`."""
    device = next(model.parameters()).device
    x = task.data.x_train
    order = torch.as_tensor(idx, device=x.device)
    dummy = torch.zeros(len(x), dtype=torch.long, device=x.device)
    modes = {m: m.training for m in model.modules()}  # restored one by one: a partly frozen model stays so
    model.eval()
    try:
        with captured(model, picked) as slots:
            for xb, _, pos in batches(x, dummy, batch_size=batch_size, order=order, device=device):
                for j in range(len(slots)):
                    slots[j] = None
                with autocast(device):
                    out = model(task.inputs(xb, device))
                missing = [l.name for l, s in zip(picked, slots) if s is None]
                if missing:
                    raise RunError(f"layer {missing[0]} did not run in the forward pass: it cannot be probed")
                yield pos, task.predict(out.float()), list(slots)
    finally:
        for m, training in modes.items():
            m.training = training


# ----------------------------------------------------------------------------- the linear readout

def _logistic():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))


def _fit(x: np.ndarray, y: np.ndarray):
    """A fitted readout x (S, D) -> labels; a constant one where the labels hold a single class."""
    if len(np.unique(y)) < 2:
        return int(y[0])
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the readout's accuracy is what is reported
        return _logistic().fit(x, y)


def _read(readout, x: np.ndarray) -> np.ndarray:
    return np.full(len(x), readout, dtype=np.int64) if isinstance(readout, int) else readout.predict(x)


class _Linear:
    """Per layer and label kind: the readout fit on the whole support set and the two fit on each half."""

    def __init__(self, feats: list[np.ndarray], labels: dict[str, np.ndarray], seed: int):
        s = len(feats[0])
        half = np.zeros(s, dtype=bool)
        half[np.random.default_rng(seed + 1).permutation(s)[: s // 2]] = True  # (S,) True: the first half
        self.half = half
        self.full = {kind: [_fit(f, y) for f in feats] for kind, y in labels.items()}
        # support examples of one half are read by the readout fit on the other
        self.oof = {kind: [self._out_of_fold(f, y) for f in feats] for kind, y in labels.items()}

    def _out_of_fold(self, f: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = np.zeros(len(f), dtype=np.int64)
        for part in (self.half, ~self.half):  # both halves hold at least one example: S >= 2
            out[part] = _read(_fit(f[~part], y[~part]), f[part])
        return out


# ----------------------------------------------------------------------------- the probe

def _plan(model: nn.Module, data: Any, cfg: DepthConfig) -> tuple[Task, list[Layer], np.ndarray]:
    """Everything decided before any compute: the task, the probed layers, the support set. Bad input fails here."""
    task = task_of(data)
    if not getattr(task, "class_labels", False):
        raise ConfigError(f"depth probes class labels layer by layer, for a classifier; this run's task is {task.name} "
                          "(no class labels): for a language model, `memloc memorization RUN` measures its canaries")
    picked = select_layers(find_layers(model), list(cfg.layers) if cfg.layers else None)
    support = choose_support(task.num_train, cfg.support, cfg.seed)
    if cfg.k >= len(support):
        raise ConfigError(f"--k {cfg.k} is not smaller than the support set ({len(support)} examples, each query "
                          f"in it leaves itself out): pass --k {len(support) - 1} or fewer, or a larger --support")
    if cfg.linear:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            raise ConfigError("--linear needs scikit-learn: pip install scikit-learn") from None
    return task, picked, support


def measure_depth(model: nn.Module, data: Any, cfg: DepthConfig | None = None, *, progress: bool = False,
                  log: Callable[[str], None] | None = None) -> ProbeResult:
    """k-NN (and with `cfg.linear` linear) probes at every layer of `model`, each training example's prediction
    depth and the per-layer decodability of the given and true labels. The model is unchanged afterwards."""
    cfg = cfg or DepthConfig()
    log = log or (lambda s: None)
    task, picked, support = _plan(model, data, cfg)
    n, P, C = task.num_train, len(picked), int(task.data.num_classes)
    device = next(model.parameters()).device
    given = task.targets("given").to(device)
    true = task.targets("true")
    true = None if true is None else true.to(device)
    t0 = time.perf_counter()

    # the support set's features, one (S, U_j) tensor per layer, kept on the device
    feats = [[] for _ in picked]
    for _, _, slots in _passes(model, task, picked, support, batch_size=cfg.batch_size):
        for j, f in enumerate(slots):
            feats[j].append(f)
    sfeat = [unit_rows(torch.cat(f)) for f in feats]  # (S, U_j) each, unit norm
    sup = torch.as_tensor(support, device=device)
    labels = {"given": given[sup]} | ({} if true is None else {"true": true[sup]})
    where = torch.full((n,), -1, dtype=torch.long, device=device)
    where[sup] = torch.arange(len(support), device=device)  # each example's position in the support set
    linear = None
    if cfg.linear:
        log(f"depth: fitting {3 * len(labels)} logistic regressions per layer on {len(support)} "
            "support examples")
        linear = _Linear([f.cpu().numpy() for f in sfeat], {kind: y.cpu().numpy() for kind, y in labels.items()},
                         cfg.seed)

    knn = {kind: np.zeros((P, n), dtype=np.int64) for kind in labels}
    lin = {kind: np.zeros((P, n), dtype=np.int64) for kind in labels} if linear else {}
    final = np.zeros(n, dtype=np.int64)
    bar = progress_bar(n, "depth", progress)
    try:
        for pos, pred, slots in _passes(model, task, picked, np.arange(n), batch_size=cfg.batch_size):
            p = pos.cpu().numpy()
            final[p] = pred.cpu().numpy()
            for j, f in enumerate(slots):
                for kind, y in labels.items():
                    knn[kind][j, p] = knn_predict(f, sfeat[j], y, cfg.k, C, exclude=where[pos]).cpu().numpy()
                if linear is not None:
                    x = unit_rows(f).cpu().numpy()
                    for kind in labels:
                        lin[kind][j, p] = _read(linear.full[kind][j], x)
            if bar is not None:
                bar.update(len(p))
    finally:
        if bar is not None:
            bar.close()
    for kind in lin:  # support examples: the readout fit on the other half
        for j in range(P):
            lin[kind][j, support] = linear.oof[kind][j]
    seconds = time.perf_counter() - t0
    return _result(cfg, task, picked, support, knn, lin, final, seconds)


def _result(cfg: DepthConfig, task: Task, picked: list[Layer], support: np.ndarray, knn: dict, lin: dict,
            final: np.ndarray, seconds: float) -> ProbeResult:
    given = task.targets("given").cpu().numpy()
    true_t = task.targets("true")
    true = None if true_t is None else true_t.cpu().numpy()
    masks = subset_masks(task)
    P, n = len(picked), task.num_train
    depth = prediction_depths(knn["given"], final)
    nan = np.full((P, len(SUBSETS)), np.nan)
    arrays = {
        "depth": depth, "predicted": final, "given_label": given.astype(np.int64),
        "true_label": (given if true is None else true).astype(np.int64),
        "is_noisy": masks["noisy"] if masks["noisy"] is not None else np.zeros(n, dtype=bool),
        "is_rare": masks["rare"] if masks["rare"] is not None else np.zeros(n, dtype=bool),
        "support": support, "subsets": np.array(SUBSETS),
        "layer_names": np.array([l.name for l in picked]), "layer_index": np.array([l.index for l in picked]),
        "knn_given": knn["given"].astype(np.int16 if task.data.num_classes < 2 ** 15 else np.int64),
        "knn_given_acc": subset_accuracy(knn["given"] == given[None], masks),
        "knn_true_acc": nan if true is None else subset_accuracy(knn["true"] == true[None], masks),
        "knn_agree": subset_accuracy(knn["given"] == final[None], masks),
    }
    if true is not None:
        arrays["knn_true"] = knn["true"].astype(arrays["knn_given"].dtype)
    if lin:
        arrays["linear_given_acc"] = subset_accuracy(lin["given"] == given[None], masks)
        arrays["linear_true_acc"] = nan if true is None else subset_accuracy(lin["true"] == true[None], masks)

    def stats(m: np.ndarray | None) -> dict | None:
        if m is None or not m.any():
            return None
        d = depth[m]
        return {"n": int(m.sum()), "median": float(np.median(d)), "mean": float(d.mean()),
                "share_at_output": float((d == P).mean())}

    def curve(a: np.ndarray) -> dict:
        return {s: [None if np.isnan(v) else round(float(v), 6) for v in a[:, j]] for j, s in enumerate(SUBSETS)}

    names_ = [l.name for l in picked]

    def decodable_from(acc: np.ndarray) -> int | None:
        """The first layer at which the noisy examples' given-label accuracy exceeds DECODABLE (None: none)."""
        above = np.nonzero(acc[:, SUBSETS.index("noisy")] > DECODABLE)[0]
        return int(above[0]) if len(above) else None
    summary = {
        "probe": PROBE_NAME, "layers": names_, "num_layers": P, "k": cfg.k, "support": int(len(support)),
        "num_examples": n, "noise_known": true is not None, "linear": bool(lin),
        "definition": "depth = smallest d in 0..P with the given-label k-NN prediction of every probed layer from "
                      "d on equal to the final prediction (P: only the output agrees)",
        "depth": {s: stats(masks[s]) for s in SUBSETS},
        "final_accuracy": {s: (None if masks[s] is None or not masks[s].any()
                               else float((final[masks[s]] == given[masks[s]]).mean())) for s in SUBSETS},
        "curves": {"knn_given": curve(arrays["knn_given_acc"]), "knn_true": curve(arrays["knn_true_acc"]),
                   "knn_agree": curve(arrays["knn_agree"])},
        # Stephenson et al.'s question: from which layer do the noisy examples' given labels decode?
        "noisy_decodable_from": decodable_from(arrays["knn_given_acc"]),
        "decodable_threshold": DECODABLE,
        "seconds": round(seconds, 3),
    }
    if lin:
        summary["curves"]["linear_given"] = curve(arrays["linear_given_acc"])
        summary["curves"]["linear_true"] = curve(arrays["linear_true_acc"])
        summary["noisy_linear_decodable_from"] = decodable_from(arrays["linear_given_acc"])
    rows = [{"index": i, "given_label": int(given[i]), "true_label": int(arrays["true_label"][i]),
             "predicted": int(final[i]), "noisy": int(arrays["is_noisy"][i]), "rare": int(arrays["is_rare"][i]),
             "depth": int(depth[i])} for i in range(n)]
    return ProbeResult(PROBE_NAME, summary, arrays, rows)


def depth_scores(arrays: dict, n: int) -> np.ndarray:
    """Prediction depth per training example (N,) float from a depth probe's arrays (detection reads it)."""
    d = arrays.get("depth")
    if d is None:
        raise RunError("the depth probe's arrays.npz has no depth: rerun `memloc depth` with this memloc")
    d = np.asarray(d, dtype=np.float64)
    if d.shape != (n,):
        raise RunError(f"the depth probe covers {len(d)} examples, but the run has {n}: it comes from another run")
    return d


def _check(model: nn.Module, data: Any, cfg: DepthConfig, ctx: Context) -> None:
    _plan(model, data, cfg)  # every bad input fails here, before anything is written


def _compute(model: nn.Module, data: Any, cfg: DepthConfig, ctx: Context) -> ProbeResult:
    result = measure_depth(model, data, cfg, progress=ctx.progress, log=ctx.log)
    if ctx.epoch is not None:
        result.summary["epoch"] = ctx.epoch
    return result


def _describe(result: ProbeResult) -> list[str]:
    s = result.summary

    def med(kind: str) -> str:
        d = s["depth"].get(kind)
        return "-" if d is None else f"{d['median']:g} (mean {d['mean']:.2f}, n={d['n']})"
    lines = [f"prediction depth (0..{s['num_layers']}, k={s['k']}, support {s['support']}): "
             + "  ".join(f"{k} {med(k)}" for k in SUBSETS[:-1] if s["depth"].get(k))]
    curves = s["curves"]
    shown = [k for k in ("clean", "noisy") if any(v is not None for v in curves["knn_given"][k])]
    lines.append("k-NN accuracy per layer, given label" + (" (true label)" if s["noise_known"] else "") + ":")
    for i, name in enumerate(s["layers"]):
        cells = []
        for k in shown:
            g, t = curves["knn_given"][k][i], curves["knn_true"][k][i]
            cells.append(f"{k} {_pct(g)}" + (f" ({_pct(t)})" if s["noise_known"] else ""))
        lines.append(f"  {i:2d} {name:24s} " + "  ".join(cells))
    frm = s.get("noisy_decodable_from")
    if s["depth"].get("noisy"):
        readouts = [("k-NN", frm)] + ([("linear", s["noisy_linear_decodable_from"])] if s["linear"] else [])
        for probe, at in readouts:
            where = "- (never)" if at is None else f"{at} ({s['layers'][at]})"
            lines.append(f"noisy given labels decodable ({probe} > 50%) from layer {where} of 0..{s['num_layers'] - 1}")
    return lines


def _pct(v) -> str:
    return "  -  " if v is None else f"{100 * v:5.1f}"


PROBE = Probe(PROBE_NAME, "depth", DepthConfig, _compute, check=_check, describe=_describe, layers_option="layers",
              help="layer-wise decodability: k-NN probes on every layer, each example's prediction depth")


def prediction_depth(target: Any, data: Any = None, cfg: DepthConfig | None = None, *, save: bool = True,
                     progress: bool = False, log: Callable[[str], None] | None = None, **options: Any) -> ProbeResult:
    """Layer-wise decodability and prediction depth of every training example.

    `target`: a run directory (``memloc depth RUN``; saved into RUN/probes/depth/ unless `save` is False) or a
    trained classifier with its `data`. `cfg` a :class:`DepthConfig`, or `options` its fields (``k``, ``support``,
    ``layers``, ``linear``, ``seed``). Result arrays: ``depth`` (N,), ``knn_given_acc`` / ``knn_true_acc`` /
    ``knn_agree`` (layers, 4) over ``subsets`` (clean, noisy, rare, all), ``knn_given`` (layers, N) predictions.
    """
    return run_probe(PROBE, target, data, cfg, save=save, progress=progress, log=log, **options)

