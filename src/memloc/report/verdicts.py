"""Decisions behind the report's claims table: each claim's measure, test, threshold and verdict.

Every function here is pure: it takes the numbers a probe saved (per-example units, accuracies, layer
counts, detection scores, gradient norms) and returns a :class:`Verdict` that states what was measured, the
test, the threshold, the sample sizes, the statistic (p-value, effect size or interval) and one of three
verdicts:

- ``"holds"``, ``"does not hold"``;
- ``"not enough data (n = ...)"`` when there are too few examples (layers, cells, seeds) for the test; such a
  claim never holds nor fails.

The statistics come from scipy and scikit-learn (`scipy.stats.mannwhitneyu`, `scipy.stats.bootstrap`,
`scipy.stats.binomtest`, `sklearn.metrics.roc_auc_score`); nothing is hand-written. `over_seeds` combines the
verdicts of several seeds. docs/verdicts.md lists every claim's rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HOLDS = "holds"
FAILS = "does not hold"
NOT_ENOUGH = "not enough data"

ALPHA = 0.05  # one-sided Mann–Whitney U: significance level
MIN_PER_GROUP = 5  # Mann–Whitney U: fewer examples in a group -> not enough data
MIN_PER_CLASS = 10  # AUROC interval: fewer positives or negatives -> not enough data
MIN_EXAMPLES = 5  # shares over examples (spread over layers, share under 10 units)
MIN_LAYERS = 2  # gradient norm ratio: "most layers" needs at least two layers
MIN_CELLS = 4  # cosine: (layer, epoch) cells in the window


@dataclass(frozen=True)
class Verdict:
    """One claim's decision. `value` is the headline number (for the mean ± sd over seeds)."""

    verdict: str  # HOLDS, FAILS or "not enough data (n = ...)"
    measure: str  # what was measured, in words
    test: str  # how it is decided
    threshold: str  # when it holds
    n: str = ""  # the sample sizes, in words
    result: str = ""  # the statistic, p-value, effect size or interval, in words
    value: float | None = None
    p: float | None = None
    effect: float | None = None
    interval: tuple[float, float] | None = None

    @property
    def measured(self) -> bool:
        return self.verdict in (HOLDS, FAILS)

    def columns(self) -> dict:
        """The claims table's columns for this decision (verdict excluded)."""
        return {"measure": self.measure, "test": self.test, "threshold": self.threshold, "n": self.n,
                "result": self.result}


def not_enough(n) -> str:
    return f"{NOT_ENOUGH} (n = {n})"


def _finite(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    return a[np.isfinite(a)]


def _present(x) -> np.ndarray:
    """The values without NaN; +inf (e.g. never flipped) stays, a rank test orders it last."""
    a = np.asarray(x, dtype=np.float64).ravel()
    return a[~np.isnan(a)]


def _g(v: float) -> str:
    return f"{v:.3g}"


# ----------------------------------------------------------------------------- two groups: Mann–Whitney U

def smaller(noisy, clean, *, measure: str, alpha: float = ALPHA, min_n: int = MIN_PER_GROUP) -> Verdict:
    """Are the noisy values smaller than the clean ones? One-sided Mann–Whitney U (``alternative="less"``).

    noisy: (n1,), clean: (n2,); NaN entries are dropped, +inf kept (ranked last). Holds when p < `alpha`. The
    effect size is the common-language effect size CL = P(noisy < clean) + P(tie) / 2 = 1 - U / (n1 n2) (U of
    the noisy group); the rank-biserial correlation is 2 CL - 1. A rank test, so ties (e.g. both medians 1) give
    a p-value, not a silent "no". Fewer than `min_n` values in a group: not enough data. `value` = median noisy
    - median clean.
    """
    from scipy.stats import mannwhitneyu

    x, y = _present(noisy), _present(clean)
    test = "one-sided Mann–Whitney U (noisy < clean)"
    threshold = f"p < {alpha:g}"
    n = f"{len(x)} noisy, {len(y)} clean"
    if len(x) < min_n or len(y) < min_n:
        return Verdict(not_enough(f"{len(x)} noisy, {len(y)} clean; need {min_n} each"), measure, test, threshold, n)
    res = mannwhitneyu(x, y, alternative="less")
    p = float(res.pvalue) if np.isfinite(res.pvalue) else 1.0
    cl = 1.0 - float(res.statistic) / (len(x) * len(y))
    diff = float(np.median(x) - np.median(y))
    result = (f"medians {_g(np.median(x))} vs {_g(np.median(y))}; U = {_g(res.statistic)}, p = {p:.3g}; "
              f"P(noisy < clean) = {cl:.2f} (rank-biserial {2 * cl - 1:+.2f})")
    return Verdict(HOLDS if p < alpha else FAILS, measure, test, threshold, n, result, value=diff, p=p, effect=cl)


def fewer_units(noisy_units, clean_units, **kw) -> Verdict:
    """Noisy examples need fewer units zeroed to flip than clean ones. Examples that never flipped within the
    budget should come in as +inf (more than any flipped one): a rank test handles that."""
    return smaller(noisy_units, clean_units, measure="units zeroed until the prediction flips, per example", **kw)


def smaller_drop(noisy_drop, clean_drop, **kw) -> Verdict:
    """Removing a noisy example's units costs less training accuracy than removing a clean one's (per-example
    drops, accuracy before minus after)."""
    return smaller(noisy_drop, clean_drop, measure="training-accuracy drop after removing an example's units", **kw)


# ----------------------------------------------------------------------------- shares over examples

def share_under(units, flipped, *, below: int = 10, share: float = 0.9, min_n: int = MIN_EXAMPLES) -> Verdict:
    """Over `share` of the examples flip with fewer than `below` units (the paper: "over 90% need fewer than 10").

    units: (E,) units zeroed; flipped: (E,) bool. Holds when the observed share > `share`; the exact
    (Clopper–Pearson) 95% interval of the share comes from `scipy.stats.binomtest`.
    """
    from scipy.stats import binomtest

    u, f = np.asarray(units, dtype=np.float64).ravel(), np.asarray(flipped, dtype=bool).ravel()
    measure = f"share of examples flipped with fewer than {below} units"
    test, threshold = "share with exact binomial 95% interval", f"share > {share:.0%}"
    if len(u) < min_n:
        return Verdict(not_enough(f"{len(u)} examples; need {min_n}"), measure, test, threshold, f"{len(u)} examples")
    k = int((f & (u < below)).sum())
    ci = binomtest(k, len(u)).proportion_ci(0.95)
    s = k / len(u)
    return Verdict(HOLDS if s > share else FAILS, measure, test, threshold, f"{len(u)} examples",
                   f"{k} of {len(u)} = {s:.0%} (95% CI {ci.low:.0%}–{ci.high:.0%})", value=s,
                   interval=(float(ci.low), float(ci.high)))


def spread_over_layers(layer_counts, *, span_share: float = 0.5, min_layers: int = 3, layer_share: float = 0.1,
                       min_n: int = MIN_EXAMPLES) -> Verdict:
    """The critical units are spread over many layers.

    layer_counts: (E, L) removed units of each example in each layer (the flipping probe's ``layer_counts``);
    examples with no removed unit are left out. Two measures, both must pass:

    - the share of examples whose removed units span at least two layers, >= `span_share` (0.5): "spread" is a
      property of each example's units, not of the pooled counts; a study where every example's units sit in
      one layer fails however many layers appear overall;
    - the number of layers holding >= `layer_share` (10%) of all removed units, >= `min_layers` (3): "many
      layers" read as more than a pair; a layer with under 10% of the units is not where they are.

    The paper (Fig. 6, ResNet-9) shows each example's units spread across most of the network's layers, for
    clean and noisy alike; these thresholds ask much less than that, so a failure is a clear disagreement.
    A network with fewer than `min_layers` candidate layers cannot hold it: not enough data.
    """
    c = np.asarray(layer_counts, dtype=np.int64)
    c = c.reshape(0, 0) if c.size == 0 else c
    used = c[c.sum(1) > 0] if c.ndim == 2 else c
    L = c.shape[1] if c.ndim == 2 else 0
    measure = "share of examples whose units span >= 2 layers; layers holding >= 10% of the units"
    test = "two shares"
    threshold = f"share >= {span_share:.0%} and >= {min_layers} layers hold >= {layer_share:.0%} each"
    n = f"{len(used)} examples, {L} layers"
    if len(used) < min_n or L < min_layers:
        return Verdict(not_enough(f"{len(used)} examples over {L} layers; need {min_n} examples, {min_layers} layers"),
                       measure, test, threshold, n)
    span = float(((used > 0).sum(1) >= 2).mean())
    pooled = used.sum(0) / used.sum()
    big = int((pooled >= layer_share).sum())
    ok = span >= span_share and big >= min_layers
    return Verdict(HOLDS if ok else FAILS, measure, test, threshold, n,
                   f"{span:.0%} span >= 2 layers (mean {(used > 0).sum(1).mean():.2f} layers each); {big} of {L} "
                   f"layers hold >= {layer_share:.0%}", value=span)


# ----------------------------------------------------------------------------- detection: AUROC with an interval

def _auroc_of_groups(pos, neg, axis=-1):
    """AUROC of positives over negatives = U / (n_pos n_neg) (ties 1/2), along `axis` (for the bootstrap)."""
    from scipy.stats import mannwhitneyu
    u = mannwhitneyu(pos, neg, axis=axis, method="asymptotic").statistic
    return u / (pos.shape[axis] * neg.shape[axis])


def detects(scores, is_noisy, *, measure: str = "AUROC of the score against the noise mask", lower: float = 0.7,
            resamples: int = 1000, seed: int = 0, min_per_class: int = MIN_PER_CLASS) -> Verdict:
    """A score detects the noisy examples: AUROC with a stratified bootstrap 95% percentile interval.

    scores: (N,) suspicion, higher = more suspicious (NaN = not covered, dropped); is_noisy: (N,) bool.
    AUROC by `sklearn.metrics.roc_auc_score`; the interval by `scipy.stats.bootstrap` over `resamples`
    resamples (seeded by `seed`), the noisy and the clean examples resampled separately (stratified: every
    resample keeps both classes and their counts), percentile method. Holds when the interval's lower end
    > `lower` (0.7: the usual "acceptable discrimination"; any AUROC above 0.5 is not a detector worth the
    name, and a small sample's 0.64 is within noise of chance). Fewer than `min_per_class` noisy or clean
    examples: not enough data.
    """
    from scipy.stats import bootstrap
    from sklearn.metrics import roc_auc_score

    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(is_noisy, dtype=bool).ravel()
    keep = np.isfinite(s)
    s, y = s[keep], y[keep]
    pos, neg = s[y], s[~y]
    test = f"stratified bootstrap 95% interval ({resamples} resamples, seed {seed})"
    threshold = f"interval's lower end > {lower:g}"
    n = f"{len(pos)} noisy, {len(neg)} clean"
    if len(pos) < min_per_class or len(neg) < min_per_class:
        return Verdict(not_enough(f"{len(pos)} noisy, {len(neg)} clean; need {min_per_class} each"),
                       measure, test, threshold, n)
    auc = float(roc_auc_score(y, s))
    ci = bootstrap((pos, neg), _auroc_of_groups, n_resamples=resamples, paired=False, vectorized=True,
                   method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    lo, hi = float(ci.low), float(ci.high)
    return Verdict(HOLDS if lo > lower else FAILS, measure, test, threshold, n,
                   f"AUROC {auc:.3f} (95% CI {lo:.3f}–{hi:.3f})", value=auc, interval=(lo, hi))


# ----------------------------------------------------------------------------- gradients in the learning window

def comparable_norms(ratio, *, low: float = 0.5, high: float = 2.0, most: float = 0.75,
                     min_layers: int = MIN_LAYERS) -> Verdict:
    """Noisy examples' gradient norm is comparable to the clean ones' in (most) layers.

    ratio: (L,) noisy / clean summed gradient norm per layer over the learning window. Holds when at least
    `most` (75%) of the layers have a ratio within [`low`, `high`] (a factor of two either way). The paper
    says "every layer"; 75% tolerates one odd layer in four. Fewer than `min_layers` layers: not enough data.
    """
    r = _finite(ratio)
    measure = "noisy/clean gradient-norm ratio per layer in the learning window"
    test, threshold = "share of layers", f">= {most:.0%} of layers within [{low:g}, {high:g}]"
    n = f"{len(r)} layers"
    if len(r) < min_layers:
        return Verdict(not_enough(f"{len(r)} layers; need {min_layers}"), measure, test, threshold, n)
    inside = (r >= low) & (r <= high)
    share = float(inside.mean())
    return Verdict(HOLDS if share >= most else FAILS, measure, test, threshold, n,
                   f"{int(inside.sum())} of {len(r)} layers within (ratios {r.min():.2f}–{r.max():.2f})", value=share)


def opposed_cosine(cosine, *, below: float = -0.75, share: float = 0.5, min_cells: int = MIN_CELLS) -> Verdict:
    """Clean and noisy gradients point in opposite directions "most of the time".

    cosine: (L, T) cosine similarity of the clean and the noisy gradient per layer and epoch of the learning
    window. Holds when more than `share` (half: "most of the time") of the cells lie below `below` (−0.75,
    the paper's number). Fewer than `min_cells` finite cells: not enough data.
    """
    c = _finite(cosine)
    measure = "share of (layer, epoch) cells with cosine below −0.75 in the learning window"
    test, threshold = "share of cells", f"share > {share:.0%}"
    n = f"{len(c)} cells"
    if len(c) < min_cells:
        return Verdict(not_enough(f"{len(c)} cells; need {min_cells}"), measure, test, threshold, n)
    s = float((c < below).mean())
    return Verdict(HOLDS if s > share else FAILS, measure, test, threshold, n,
                   f"{s:.0%} of cells below {below:g} (mean cosine {c.mean():.2f})", value=s)


def rule(ok: bool | None, *, measure: str, threshold: str, value: float | None = None, n: str = "",
         result: str = "", test: str = "threshold on one number") -> Verdict:
    """A claim decided by a stated threshold on one number (no sampling test applies); None: not measured."""
    verdict = "not measured" if ok is None else (HOLDS if ok else FAILS)
    return Verdict(verdict, measure, test, threshold, n, result, value=value)


# ----------------------------------------------------------------------------- retraining: erased, then back

def erased_and_back(after_reset, after_retraining, back: float = 0.9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean masks (L,) of a layer sweep: erased (the reset took the accuracy below `back`), back (erased, then
    retrained to at least `back`) and never lost (the reset left it at or above `back`); NaN layers are in none."""
    a, b = np.asarray(after_reset, dtype=np.float64), np.asarray(after_retraining, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    erased = ok & (a < back)
    return erased, erased & (b >= back), ok & (a >= back)


def recovery(after_reset, after_retraining, names=None, *, back: float = 0.9, share: float = 0.5,
             measure: str = "noisy-train accuracy of each layer after its reset and after retraining it on clean "
                            "examples", what: str = "noisy-train") -> Verdict:
    """Retraining brings the memorized examples back for most layers, counted as the claim says: of the layers whose
    reset took the accuracy `what` below `back` (the reset erased them), the share that retraining brings back to
    at least `back`. Layers the reset left at or above it ("never lost") are reported apart, never counted as
    recovered: resetting a layer that holds nothing of the labels tests nothing. Holds when more than `share` of
    the erased layers come back; no erased layer (or no value): not enough data. `value` = that share.

    after_reset, after_retraining: (L,) accuracies in [0, 1] (NaN: not measured, dropped); names: (L,) layer names
    for the result's words.
    """
    erased, came, kept = erased_and_back(after_reset, after_retraining, back)
    names = [str(n) for n in names] if names is not None else [str(i) for i in range(len(erased))]
    test = "threshold on the share of erased layers that come back"
    threshold = f"more than {share:.0%} of the layers the reset took below {back:.0%} {what} back to >= {back:.0%}"
    n = f"{int(erased.sum())} erased, {int(kept.sum())} never lost, of {int((erased | kept).sum())} layers"

    def listed(mask) -> str:
        return ", ".join(nm for nm, m in zip(names, mask) if m) or "none"

    result = (f"back: {listed(came)}; erased and not back: {listed(erased & ~came)}; never lost (not counted): "
              f"{listed(kept)}")
    if not erased.any():
        return Verdict(not_enough(f"0 layers erased by the reset, {int(kept.sum())} never lost"), measure, test,
                       threshold, n, result)
    value = float(came.sum() / erased.sum())
    return Verdict(HOLDS if value > share else FAILS, measure, test, threshold, n, result, value=value)


# ----------------------------------------------------------------------------- several seeds

SEED_LEVEL = 0.95  # the confidence of the t interval of a claim's value over seeds


@dataclass(frozen=True)
class OverSeeds:
    """One claim over seeds: the overall verdict, how many seeds agree with it, and its value over the seeds: mean,
    sd and the 95% t interval of the mean (n = `values`)."""

    verdict: str
    agree: int
    seeds: int
    mean: float | None
    sd: float | None
    counts: dict
    values: int = 0  # seeds with a value
    interval: tuple[float, float] | None = None  # (lo, hi): the mean's t interval, None for fewer than 2 values

    def summary(self) -> str:
        """E.g. "mean 0.85, 95% t interval [0.73, 0.97] (n = 3 seeds, sd 0.05); 3 of 3 seeds agree (holds 3)"."""
        if self.mean is None:
            val = "no value"
        elif self.interval is None:
            val = f"{self.mean:.3g} (one value)"
        else:
            lo, hi = self.interval
            val = (f"mean {self.mean:.3g}, {SEED_LEVEL:.0%} t interval [{lo:.3g}, {hi:.3g}] (n = {self.values} "
                   f"seeds, sd {self.sd:.2g})")
        tally = ", ".join(f"{k} {v}" for k, v in self.counts.items() if v)
        return f"{val}; {self.agree} of {self.seeds} seeds agree ({tally})"


def _kind(v: str) -> str:
    return v if v in (HOLDS, FAILS) else NOT_ENOUGH


def over_seeds(per_seed: list[Verdict]) -> OverSeeds:
    """Combine one claim's verdicts over k seeds into one.

    - holds: a strict majority of the seeds hold and no seed says "does not hold" (one failing seed of three
      means the claim is not robust);
    - does not hold: at least one seed fails and a strict majority of the seeds were measured (hold or fail);
    - otherwise not enough data (n = measured seeds of k): most seeds had too few examples (or were not
      measured), so neither can be said.

    `agree` counts the seeds whose own verdict equals the overall one (a "not enough data" seed agrees only
    with an overall "not enough data"); the value's mean, sd (sample sd, ddof 1) and the 95% t interval of the
    mean (Student's t with n - 1 degrees of freedom, `scipy.stats.t`) are over the n seeds that have one (sd and
    interval None for a single value).
    """
    from scipy.stats import t as student
    k = len(per_seed)
    kinds = [_kind(v.verdict) for v in per_seed]
    holds, fails = kinds.count(HOLDS), kinds.count(FAILS)
    if k and holds > k / 2 and fails == 0:
        verdict = HOLDS
    elif fails and holds + fails > k / 2:
        verdict = FAILS
    else:
        verdict = not_enough(f"{holds + fails} of {k} seeds measured")
    agree = sum(1 for x in kinds if x == _kind(verdict))
    vals = [v.value for v in per_seed if v.value is not None and np.isfinite(v.value)]
    mean = float(np.mean(vals)) if vals else None
    sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    interval = None
    if sd is not None:
        half = float(student.ppf(0.5 + SEED_LEVEL / 2, len(vals) - 1)) * sd / np.sqrt(len(vals))
        interval = (mean - half, mean + half)
    return OverSeeds(verdict, agree, k, mean, sd, {HOLDS: holds, FAILS: fails, NOT_ENOUGH: k - holds - fails},
                     len(vals), interval)


def all_of(parts: dict[str, Verdict], *, measure: str | None = None) -> Verdict:
    """A claim made of several groups (e.g. "clean and noisy alike"): it fails when any measured group fails,
    holds when every group holds, and otherwise (a group with too few examples) has not enough data.
    `value` is the first group's."""
    vs = list(parts.values())
    first = vs[0]
    if any(v.verdict == FAILS for v in vs):
        verdict = FAILS
    elif all(v.verdict == HOLDS for v in vs):
        verdict = HOLDS
    else:
        verdict = not_enough("; ".join(f"{k}: {v.n}" for k, v in parts.items() if not v.measured))
    return Verdict(verdict, measure or first.measure, first.test + ", each group", first.threshold,
                   "; ".join(f"{k}: {v.n}" for k, v in parts.items()),
                   "; ".join(f"{k}: {v.result or v.verdict}" for k, v in parts.items()), value=first.value)
