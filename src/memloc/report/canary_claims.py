"""The paper's claims asked of a language model with canaries (`LM_CLAIMS`, `lm_claims`), and the memorization
sinks claim, each with our number, its measure and threshold."""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

from ..core.runs import RunDir
from ..probes.base import probe_command
from . import verdicts
from .sections.flipping import _canary_repeats, _units_by_repeats
from .sections.generic import _load_probe
from .sections.memorization import _by_repeats
from .words import _fixed, _float, _num, _pct, _points, _times


def _holds(ok: bool | None) -> str:
    return "not measured" if ok is None else ("holds" if ok else "does not hold")


# The paper's claims asked of a language model with canaries: key -> (claim, the paper's statement). Each row's
# number says what it measures and the threshold its verdict uses.
LM_CLAIMS = {
    "repetition": ("memorization rises with repetition",
                   "memorization grows with the number of times a sequence is seen"),
    "heldout": ("held-out canaries are never extracted",
                "a secret is extracted only when it was trained on (the reference)"),
    "gradient_norm": ("canaries' gradient norm is comparable to the corpus's in every layer",
                      "comparable in every layer (images: the memorized 10% of examples)"),
    "gradient_cosine": ("canary and corpus gradients point in opposite directions",
                        "cosine below −0.75 most of the time (images)"),
    "rewinding": ("memorization is not confined to the last layers: rewinding a middle layer removes canaries",
                  "critical layers depend on dataset and architecture; not only the final ones"),
    "retraining": ("retraining one layer on corpus sequences only brings the canaries back for most layers",
                   "near 100% for most layers (exceptions: layers 4–5 on CIFAR-10)"),
    "few_units": ("a few units remove a canary", "fewer than 10 units for over 90% of memorized examples"),
    "cost": ("removing them costs little held-out accuracy", "a small drop, less than for typical examples"),
    "harder": ("more repeats make a canary harder to remove (more units)",
               "more strongly learned examples need more units (typical vs memorized images)"),
}
MIN_CANARY_EXTRACTION = 0.2  # below it, "halved" and "within 10 points" of the final extraction say nothing
# asked only of a run trained with memorization sinks and evaluated (`memloc evaluate RUN --drop-memorization`)
LM_SINKS_CLAIM = ("memorization sinks: dropping the sinks removes the repeated canaries (>= {repeated}x) — extraction "
                  "falls >= 80% and the loss gap closes >= 50% — at <= 5% held-out perplexity (drop vs eval)",
                  "dropping the sinks closes more than 50% of the loss gap between repeated and held-out sequences, "
                  "with validation loss equal to standard training (MemSinks, Ghosal et al. ICML 2025: SmolLM 360M "
                  "and 1.7B)")


def lm_claims(run: RunDir) -> list[dict]:
    """The paper's claims asked of a language model with canaries (LM_CLAIMS), each with our number, the measure
    and its threshold, from the run's files alone; a claim whose files are missing is "not measured" with the
    command that makes them; and LM_SINKS_CLAIM after the row of LM_CLAIMS when the run's memorization sinks were
    evaluated (`memloc evaluate RUN --drop-memorization`)."""
    rows: dict[str, tuple[str, str]] = {}

    def add(key: str, ours: str, ok: bool | str) -> None:
        rows[key] = (ours, ok if isinstance(ok, str) else _holds(ok))

    def missing(probe: str) -> str:
        return f"not measured (run `memloc {probe_command(probe)} {run.path}`)"

    mem, mem_arr = _load_probe(run, "memorization")
    if mem is None:
        for key in ("repetition", "heldout"):
            add(key, "—", missing("memorization"))
    else:
        _repetition_claim(mem, add)
        _heldout_claim(mem, mem_arr, add)
    if run.has("gradients.npz"):
        _gradient_claims(run.load_arrays("gradients.npz", "layer_names", "clean_norm", "noisy_norm", "cosine"), add)
    else:
        for key in ("gradient_norm", "gradient_cosine"):
            add(key, "—", "not measured (no gradients.npz: the run was trained with --no-gradient-accounting)")
    for probe, claim in (("rewinding", _rewinding_claim), ("retraining", _retraining_claim)):
        s, arr = _load_probe(run, probe)
        if s is None:
            add(probe, "—", missing(probe))
        else:
            claim(arr, add)
    flip, flip_arr = _load_probe(run, "flipping")
    if flip is None:
        for key in ("few_units", "cost", "harder"):
            add(key, "—", missing("flipping"))
    else:
        _unit_claims(flip, add)
        if mem is None:
            add("harder", "—", missing("memorization"))
        else:
            _harder_claim(flip_arr, _canary_repeats(run) or {}, add)
    out = [{"claim": claim, "paper": paper, "ours": rows[key][0], "verdict": rows[key][1]}
           for key, (claim, paper) in LM_CLAIMS.items()]
    sinks, _ = _load_probe(run, "dropout")
    if sinks is not None and "repeated_before" in sinks:  # a language model's memorization sinks (memloc.methods.sinks)
        ours, verdict = _sinks_claim(sinks)
        out.append({"claim": LM_SINKS_CLAIM[0].format(repeated=sinks.get("repeated")), "paper": LM_SINKS_CLAIM[1],
                    "ours": ours, "verdict": verdict})
    return out


def _sinks_claim(summary: dict) -> tuple[str, str]:
    """(our numbers, verdict) of LM_SINKS_CLAIM: the canaries repeated >= summary["repeated"] times, tied -> drop.
    Any part that fails makes it "does not hold"; a part that cannot be measured (extraction before the drop
    under MIN_CANARY_EXTRACTION, no loss gap, no perplexity) makes it "not measured" when none fails."""
    b, a = (summary.get(k) if isinstance(summary.get(k), dict) else {} for k in ("repeated_before", "repeated_after"))
    k = summary.get("repeated")
    extracted, fall = _float(b.get("extracted")), _float(summary.get("extraction_fall"))
    closed, rise = _float(summary.get("gap_closed")), _float(summary.get("perplexity_rise"))
    ours = (f"canaries repeated ≥ {k}x (n = {_num(b.get('n'))}): extraction {_pct(extracted)} → "
            f"{_pct(_float(a.get('extracted')))} (fall {_pct(fall)}); loss gap {_fixed(b.get('loss_gap'), 2)} → "
            f"{_fixed(a.get('loss_gap'), 2)} nats (closed {_pct(closed)}); held-out perplexity "
            f"{_fixed(summary.get('heldout_perplexity_eval'), 3)} (eval) → "
            f"{_fixed(summary.get('heldout_perplexity_drop'), 3)} (drop), "
            + ("—" if rise is None else f"{100 * rise:+.1f}%")
            + " (holds if extraction falls ≥ 80%, the gap closes ≥ 50% and perplexity rises ≤ 5%)")
    parts: list[tuple[bool | None, str]] = [
        (None if extracted is None or extracted < MIN_CANARY_EXTRACTION or fall is None else fall >= 0.8,
         f"not measured: the model extracts {_pct(extracted)} of the canaries repeated ≥ {k}x before the drop "
         "(train longer)"),
        (None if closed is None else closed >= 0.5,
         "not measured: no loss gap before the drop (no held-out canaries of those repeat groups, or the trained "
         "ones are not predicted better)"),
        (None if rise is None else rise <= 0.05, "not measured: no held-out perplexity")]
    if any(ok is False for ok, _ in parts):
        return ours, _holds(False)
    why = [reason for ok, reason in parts if ok is None]
    return ours, why[0] if why else _holds(True)


def _repetition_claim(summary: dict, add: Callable) -> None:
    """In-context extraction at the largest repeat count minus at the smallest (holds at >= 50 points), and the
    secret canaries' exposure rising from the smallest repeat count to the largest."""
    rows = [r for r in _by_repeats(summary) if r.get("format") == "all"]
    key, measure = "in_context_extracted", "in-context extraction"
    if not any(_float(r.get(key)) is not None for r in rows):  # an older probe: from the canary's own prefix
        key, measure = "trained_extracted", "extraction from the canary's own prefix"
    pts = [(float(r["repeats"]), _float(r.get(key))) for r in rows]
    pts = [(x, y) for x, y in pts if y is not None]
    if len(pts) < 2:
        add("repetition", "—", "not measured (the memorization probe has fewer than two repeat counts)")
        return
    (r0, e0), (r1, e1) = pts[0], pts[-1]
    ours = (f"{measure} {_pct(e1)} at {_times(r1, 'repeat')} − {_pct(e0)} at {_times(r0, 'repeat')} = "
            f"{_points(e1 - e0)} (holds if ≥ +50)")
    ok = e1 - e0 >= 0.5
    secret = [r for r in _by_repeats(summary) if r.get("format") == "secret"] or rows
    exp = [(float(r["repeats"]), _float(r.get("trained_exposure"))) for r in secret]
    exp = [(x, y) for x, y in exp if y is not None]
    if len(exp) >= 2:
        steps = np.diff([y for _, y in exp])
        ours += (f"; secret canaries' exposure {exp[0][1]:.1f} bits at {_times(exp[0][0], 'repeat')} → "
                 f"{exp[-1][1]:.1f} at {_times(exp[-1][0], 'repeat')} "
                 f"({'rising at every step' if (steps > 0).all() else 'not at every step'}; "
                 "holds if it rises)")
        ok = ok and exp[-1][1] > exp[0][1]
    else:
        ours += "; no exposure measured"
    add("repetition", ours, ok)


def _heldout_claim(summary: dict, arrays: dict, add: Callable) -> None:
    """Held-out extraction in every row by repeat count and format (holds if 0 in all)."""
    vals = [v for v in (_float(r.get("heldout_extracted")) for r in _by_repeats(summary)) if v is not None]
    if not vals:
        add("heldout", "—", "not measured (the memorization probe measured no held-out canary)")
        return
    ours = f"held-out extraction at most {_pct(max(vals))} over {len(vals)} rows (repeat count × format)"
    if "trained" in arrays and "extracted" in arrays:
        held = ~arrays["trained"].astype(bool)
        ours += f"; {int(arrays['extracted'].astype(bool)[held].sum())} of {int(held.sum())} held-out canaries"
    add("heldout", ours + " (holds if 0 in every row)", max(vals) == 0)


def _gradient_claims(g: dict, add: Callable) -> None:
    """Per layer, the mean over the first quarter of epochs of the per-epoch canary/corpus norm ratio (holds if
    within [0.5, 2] in every layer) and of the cosine (holds if below 0 in every layer)."""
    names = [str(n) for n in g["layer_names"]]
    epochs = g["cosine"].shape[1]
    quarter = max(1, epochs // 4)
    ratio = (g["noisy_norm"] / np.maximum(g["clean_norm"], 1e-30))[:, :quarter].mean(1)  # (layers,)
    lo, hi = int(np.argmin(ratio)), int(np.argmax(ratio))
    add("gradient_norm", f"canary/corpus norm per layer, epochs 1–{quarter} of {epochs}: {ratio[lo]:.2f} "
        f"({names[lo]}) to {ratio[hi]:.2f} ({names[hi]}) over {len(names)} layers (holds if within [0.5, 2] in "
        "every layer)", bool(ratio.min() >= 0.5 and ratio.max() <= 2.0))
    cos = g["cosine"][:, :quarter].mean(1)  # (layers,)
    whole = g["cosine"].mean(1)
    add("gradient_cosine", f"mean cosine per layer, epochs 1–{quarter}: {cos.min():.2f} to {cos.max():.2f} (all "
        f"epochs: {whole.min():.2f} to {whole.max():.2f}; holds if below 0 in every layer)", bool(cos.max() < 0))


def _sweep_columns(arrays: dict) -> tuple[list[str], np.ndarray, dict[str, int], str | None]:
    """A layer sweep's layer names, accuracy (layers, epochs, subsets), subset positions, and why it cannot be
    read for the canaries (None when it can)."""
    subsets = {str(s): i for i, s in enumerate(arrays["subsets"])}
    names = [str(n) for n in arrays["layer_names"]]
    if "canary_train" not in subsets or "final" not in arrays:
        return names, arrays["accuracy"], subsets, "not measured (the probe did not measure canary-train extraction)"
    final = float(arrays["final"][subsets["canary_train"]])
    if not final >= MIN_CANARY_EXTRACTION:
        return names, arrays["accuracy"], subsets, (f"not measured: the final model extracts {_pct(final)} of the "
                                                    "trained canaries (train longer)")
    return names, arrays["accuracy"], subsets, None


def _last_block_start(names: list[str]) -> int:
    """Position of the first layer of the last numbered block (blocks.3.attn; transformer.h.11.mlp), or of the
    last layer when no name carries a block number: it and every layer after it are "the last layers"."""
    blocks = [m.group(1) if (m := re.match(r"(.*?\d+)\.", n)) else None for n in names]
    numbered = [b for b in blocks if b is not None]
    return blocks.index(numbered[-1]) if numbered else len(names) - 1


def _rewinding_claim(arrays: dict, add: Callable) -> None:
    """Of the layers whose rewinding to epoch 0 keeps held-out token accuracy within 10 points of the final model,
    how many halve canary-train extraction (holds if at least 2, not all in the last block)."""
    names, acc, subsets, why = _sweep_columns(arrays)
    if why is None and "test" not in subsets:
        why = "not measured (the probe did not measure held-out token accuracy)"
    if why is not None:
        add("rewinding", "—", why)
        return
    epochs = [int(e) for e in arrays["epochs"]]
    j = epochs.index(0) if 0 in epochs else int(np.argmin(epochs))
    canary, test = acc[:, j, subsets["canary_train"]], acc[:, j, subsets["test"]]  # (layers,)
    final_canary, final_test = (float(arrays["final"][subsets[s]]) for s in ("canary_train", "test"))
    working = np.nonzero(test >= final_test - 0.10)[0]
    halving = [int(i) for i in working if canary[i] <= final_canary / 2]
    ours = (f"rewound to epoch {epochs[j]}: {len(halving)} of {len(working)} layers that keep held-out token "
            f"accuracy within 10 points of {_pct(final_test)} cut canary-train extraction ({_pct(final_canary)}) "
            "by at least half")
    if len(working):
        most = int(working[np.argmin(canary[working])])
        ours += f"; most: {names[most]} ({_pct(canary[most])})"
    add("rewinding", ours + " (holds if at least 2 such layers, not only in the last block)",
        len(halving) >= 2 and min(halving) < _last_block_start(names))


def _retraining_claim(arrays: dict, add: Callable) -> None:
    """Of the layers whose reset took canary-train extraction more than 10 points below the final model's (the
    reset erased the canaries), how many end back within 10 points after retraining alone on the corpus (holds if
    more than half; `verdicts.recovery`). Layers the reset left within 10 points are "never lost", not counted."""
    names, acc, subsets, why = _sweep_columns(arrays)
    if why is not None:
        add("retraining", "—", why)
        return
    reset, last = acc[:, 0, subsets["canary_train"]], acc[:, -1, subsets["canary_train"]]  # (layers,)
    final = float(arrays["final"][subsets["canary_train"]])
    bar = final - 0.10
    v = verdicts.recovery(reset, last, names, back=bar, what="canary-train extraction")
    erased, back, kept = verdicts.erased_and_back(reset, last, bar)
    best = int(np.argmax(np.where(erased, last, -np.inf))) if erased.any() else int(np.argmax(last))
    add("retraining", f"{int(back.sum())} of the {int(erased.sum())} layers whose reset took canary-train extraction "
        f"more than 10 points below the final {_pct(final)} end back within 10 points; {int(kept.sum())} never lost, "
        f"not counted (best erased {names[best]}: {_pct(last[best])}; holds if more than half of the erased)",
        v.verdict == verdicts.HOLDS if v.measured else
        f"not measured: no layer's reset took canary-train extraction more than 10 points below {_pct(final)}")


def _unit_claims(summary: dict, add: Callable) -> None:
    """Median units to remove a canary (holds below 10) and the mean held-out accuracy drop (holds below 2 points)."""
    k = summary.get("kinds", {}).get("canary")
    if not k or not k.get("searched"):
        for key in ("few_units", "cost"):
            add(key, "—", "not measured (no canary sequence was searched: the model extracts none)")
        return
    median = _float(k.get("median_units"))
    add("few_units", f"median {'—' if median is None else _times(median, 'unit')} "
        f"(mean {_fixed(k.get('mean_units'), 1)}; "
        f"{_pct(_float(k.get('share_flipped_under_10')))} removed with under 10) over {k['searched']} canary "
        "sequences (holds if the median is below 10)", None if median is None else median < 10)
    drop = _float(k.get("mean_test_acc_drop"))
    if drop is None:
        add("cost", "—", "not measured (the flipping probe did not evaluate held-out accuracy)")
        return
    train = _float(k.get("mean_train_acc_drop"))
    add("cost", f"mean held-out token accuracy drop {100 * drop:.1f} points"
        + ("" if train is None else f" (extraction of the training sequences: {100 * train:.1f})")
        + " (holds if below 2 points)",
        drop < 0.02)


def _harder_claim(arrays: dict, repeats: dict[int, int], add: Callable) -> None:
    """Mean units of the removed canaries at the largest repeat count against the smallest searched one."""
    if "label" not in arrays or not repeats:
        add("harder", "—", "not measured (the flipping or memorization arrays do not say each sequence's canary)")
        return
    by = {r: units[flipped] for r, (units, flipped) in _units_by_repeats(arrays, repeats).items() if flipped.any()}
    if len(by) < 2:
        add("harder", "—", "not measured (the removed canaries have fewer than two repeat counts)")
        return
    (r0, u0), (r1, u1) = min(by.items()), max(by.items())
    add("harder", f"mean units {u0.mean():.1f} at {_times(r0, 'repeat')} (n = {len(u0)}) → {u1.mean():.1f} at "
        f"{_times(r1, 'repeat')} "
        f"(n = {len(u1)}); medians {_num(float(np.median(u0)))} → {_num(float(np.median(u1)))} (holds if the mean "
        "rises)", bool(u1.mean() > u0.mean()))
