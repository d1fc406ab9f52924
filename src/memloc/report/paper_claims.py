"""The paper's claims (REFERENCE.md), each with our number and its verdict, from a run's files alone.

The classification claims are here (`claims`, decided by `memloc.report.verdicts`); a
language model's are in `canary_claims`. `claims_section` is the page's summary table.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..core.runs import RunDir
from . import verdicts
from .canary_claims import lm_claims
from .html import Section, Table
from .sections.generic import _load_probe
from .sections.training import _learning_window
from .words import _num, _pct, task_words


def _depth_claim(base: RunDir, add: Callable) -> None:
    """Stephenson et al.'s claim, on the depth probe: the first layer at which the noisy examples' given-label k-NN
    accuracy exceeds 50% lies in the last third of the layers (position >= P - ceil(P/3)); beside it, the layer
    whose rewinding hurts the noisy examples most (the paper's view)."""
    s, arr = _load_probe(base, "depth")
    if s is None or not s["depth"].get("noisy"):
        return
    names = [str(n) for n in arr["layer_names"]]
    P = len(names)
    last = P - int(np.ceil(P / 3))  # the first position of the last third
    frm = s.get("noisy_decodable_from")
    med = {k: (s["depth"].get(k) or {}).get("median") for k in ("noisy", "clean")}
    ours = ("noisy given labels never above 50% k-NN accuracy" if frm is None else
            f"noisy given-label k-NN accuracy first above 50% at {names[frm]} (layer {frm + 1} of {P}; last third: "
            f"from layer {last + 1})")
    ours += f"; median prediction depth {_num(med['noisy'])} (noisy) vs {_num(med['clean'])} (clean)"
    rs, ra = _load_probe(base, "rewinding")
    mem = task_words(base).memorized
    if rs is not None and mem in [str(v) for v in ra["subsets"]]:
        acc = ra["accuracy"][:, :, [str(v) for v in ra["subsets"]].index(mem)]
        epochs = [int(e) for e in ra["epochs"]]
        # as the rewinding claim: the saved epoch nearest to the one before noisy-train accuracy reached 25%
        noisy = [m.get(f"{mem}_acc") for m in base.read_metrics()]
        start = next((e for e, v in enumerate(noisy) if v is not None and v >= 0.25), 0)
        j = int(np.argmin([abs(e - start) for e in epochs]))
        if np.isfinite(acc[:, j]).all():
            worst = int(np.argmin(acc[:, j]))
            rnames = [str(n) for n in ra["layer_names"]]
            ours += (f"; rewinding (to epoch {epochs[j]}) hurts the noisy examples most at {rnames[worst]} "
                     f"(layer {worst + 1} of {len(rnames)}: {_pct(acc[worst, j])} noisy-train)")
    add("noisy labels become decodable only in the last layers (Stephenson et al.)",
        "Stephenson et al.: later layers; the paper (rewinding): the critical layers are not the final ones",
        ours, verdicts.rule(None if frm is None else frm >= last,
                            measure="first layer where noisy examples' given-label k-NN accuracy exceeds 50%",
                            threshold=f"in the last third of the layers (from layer {last + 1} of {P})",
                            value=None if frm is None else frm + 1, n=f"{P} layers"))


def claims(base: RunDir, drop: RunDir | None) -> list[dict]:
    """Each claim of the paper (REFERENCE.md) with our number beside it, from the files alone (a language model's
    claims: `lm_claims`). Each row states its measure, test, threshold, n and result; the verdict comes from
    `memloc.report.verdicts`."""
    if task_words(base).name == "lm":
        return lm_claims(base)
    return [row for row, _ in _decided_claims(base, drop)]


def _flip_groups(s: dict, arr: dict) -> dict[str, dict[str, np.ndarray]]:
    """Per kind (clean, noisy): the searched examples' units to flip (+inf where the budget ran out: more than any
    flipped one), flipped mask, training-accuracy drop and layer counts (E_kind, L)."""
    kinds = np.array([str(k) for k in arr["kind"]])
    searched = ~np.asarray(arr["already_wrong"], dtype=bool)
    flipped = np.asarray(arr["flipped"], dtype=bool)
    units = np.where(flipped, arr["num_units"].astype(np.float64), np.inf)
    before = (s.get("accuracy_before") or {}).get("train_acc")
    after = arr.get("train_acc_after")
    drop = (np.full(len(kinds), np.nan) if before is None or after is None
            else before - np.asarray(after, dtype=np.float64))
    out = {}
    for k in ("clean", "noisy"):
        sel = searched & (kinds == k)
        out[k] = {"units": units[sel], "flipped": flipped[sel], "drop": drop[sel], "counts": arr["layer_counts"][sel]}
    return out


def _detection_verdict(arr: dict) -> verdicts.Verdict:
    """Units to flip as a detector, from the detection probe's per-example suspicion scores and noise mask."""
    names = [str(n) for n in arr.get("score_names", [])]
    if "units_to_flip" not in names or "is_noisy" not in arr:
        return verdicts.rule(None, measure="AUROC of units to flip against the noise mask", threshold="—",
                      result="the detection probe saved no units_to_flip scores or noise mask (rerun `memloc detect`)")
    return verdicts.detects(arr["scores"][:, names.index("units_to_flip")], arr["is_noisy"],
                            measure="AUROC of units to flip (fewer = more suspicious) against the noise mask")


def _decided_claims(base: RunDir, drop: RunDir | None) -> list[tuple[dict, verdicts.Verdict]]:
    """The classification claims: (table row, its decision)."""
    out: list[tuple[dict, verdicts.Verdict]] = []
    mem = task_words(base).memorized

    metrics = base.read_metrics()
    noisy = np.array([np.nan if m.get(f"{mem}_acc") is None else m[f"{mem}_acc"] for m in metrics])
    memorized = bool(len(noisy) and np.isfinite(noisy[-1]) and noisy[-1] >= 0.5)

    def add(claim, paper, ours, v: verdicts.Verdict | bool | None, *, needs_memorization=True):
        if not isinstance(v, verdicts.Verdict):
            v = verdicts.rule(v, measure="see the claim", threshold="see the claim")
        verdict = v.verdict
        if needs_memorization and not memorized and out:  # the first claim is the memorization itself
            verdict = "not measured: the model did not memorize the noisy examples (train longer)"
        out.append(({"claim": claim, "paper": paper, "ours": ours, **v.columns(), "verdict": verdict}, v))

    def unmeasured(reason: str) -> None:  # the last row's verdict overridden (the dropout model memorized nothing)
        out[-1][0]["verdict"] = reason

    window = _learning_window(metrics, f"{mem}_acc")  # the same window the gradient section states
    if metrics and np.isfinite(noisy).any():
        add("mislabeled examples are memorized (noisy-train accuracy at the end)", "~100%", _pct(noisy[-1]),
            verdicts.rule(bool(noisy[-1] >= 0.9), measure="noisy-train accuracy at the end of training",
                   threshold=">= 90%", value=float(noisy[-1]), n=f"{len(metrics)} epochs"))
        add("mislabeled examples are learned in a middle window of training", "mostly epochs 10–30 of 50",
            (f"25% → 90% between epochs {window[0]} and {window[1]} of {len(metrics)}" if window
             else "never reached 90%"),
            verdicts.rule(None if window is None else bool(window[0] > 1),
                   measure="epochs at which noisy-train accuracy first reaches 25% and 90%",
                   threshold="25% first reached after epoch 1", value=None if window is None else window[0]))
    if base.has("gradients.npz"):
        g = base.load_arrays("gradients.npz", "layer_names", "clean_norm", "noisy_norm", "cosine")
        a, b = (window[0] - 1, window[1]) if window else (0, g["cosine"].shape[1])
        body = slice(0, max(1, len(g["layer_names"]) - 1))  # every layer but the classifier
        ratio = g["noisy_norm"][body, a:b].sum(1) / np.maximum(g["clean_norm"][body, a:b].sum(1), 1e-30)
        share = (base.config.get("data") or {}).get("noise")
        share = f"they are {100 * share:g}% of the data" if isinstance(share, (int, float)) and share > 0 \
            else "a minority of the data"
        add(f"noisy examples' gradient norm is comparable to the clean ones' in every layer ({share})",
            "comparable", f"noisy/clean {ratio.min():.2f}–{ratio.max():.2f} over layers, epochs {a + 1}–{b}",
            verdicts.comparable_norms(ratio))
        cos = g["cosine"][body, a:b]
        add("clean and noisy gradients point in opposite directions", "cosine below −0.75 most of the time",
            f"mean cosine {cos.mean():.2f}; {100 * (cos < -0.75).mean():.0f}% of cells below −0.75",
            verdicts.opposed_cosine(cos))
    s, arr = _load_probe(base, "rewinding")
    if s is not None and mem in list(arr["subsets"]):
        subsets = list(arr["subsets"])
        acc = arr["accuracy"][:, :, subsets.index(mem)]
        epochs = list(arr["epochs"])
        target = (window[0] - 1) if window else 0
        j = int(np.argmin([abs(e - target) for e in epochs]))
        col = acc[:, j]
        if np.isfinite(col).all():
            names = list(arr["layer_names"])
            worst = int(np.argmin(col))
            add("rewinding the last layers to before the noisy examples were learned barely hurts them; "
                "the critical layers are not the final ones",
                "critical layers depend on dataset and architecture",
                f"rewound to epoch {epochs[j]}: last layer keeps {_pct(col[-1])} noisy; largest drop at layer "
                f"{worst + 1} ({names[worst]}, {_pct(col[worst])})",
                verdicts.rule(bool(worst != len(col) - 1 and col[-1] >= 0.5),
                       measure="noisy-train accuracy with each layer rewound to before the learning window",
                       threshold="largest drop not at the last layer, and the last layer keeps >= 50%",
                       value=float(col[-1]), n=f"{len(col)} layers"))
    s, arr = _load_probe(base, "retraining")
    if s is not None and mem in list(arr["subsets"]):
        subsets = list(arr["subsets"])
        reset, last = arr["accuracy"][:, 0, subsets.index(mem)], arr["accuracy"][:, -1, subsets.index(mem)]
        if np.isfinite(last).all():
            erased, back, kept = verdicts.erased_and_back(reset, last)
            add("retraining one layer on clean examples only brings noisy accuracy back for most layers",
                "near 100% for most layers (exceptions: layers 4–5 on CIFAR-10)",
                f"{int(back.sum())} of the {int(erased.sum())} layers the reset erased back to >= 90% noisy-train; "
                f"{int(kept.sum())} never lost (min after retraining {_pct(last.min())})",
                verdicts.recovery(reset, last, list(arr["layer_names"])))
    s, arr = _load_probe(base, "flipping")
    if s is not None and "clean" in s["kinds"] and "noisy" in s["kinds"]:
        c, n = s["kinds"]["clean"], s["kinds"]["noisy"]
        grp = _flip_groups(s, arr)
        add("noisy examples need far fewer units zeroed to flip", "around 5 (noisy) vs more (clean)",
            f"median {_num(n['median_units'])} (noisy) vs {_num(c['median_units'])} (clean)",
            verdicts.fewer_units(grp["noisy"]["units"], grp["clean"]["units"]))
        add("over 90% of noisy examples flip with fewer than 10 units", "> 90%",
            f"{_pct(n['share_flipped_under_10'])} (noisy), {_pct(c['share_flipped_under_10'])} (clean)",
            verdicts.share_under(grp["noisy"]["units"], grp["noisy"]["flipped"]))
        add("removing a noisy example's units costs less training accuracy than a clean one's",
            "about 10 points less drop",
            ("—" if n["mean_train_acc_drop"] is None or c["mean_train_acc_drop"] is None else
             f"{100 * n['mean_train_acc_drop']:.1f} (noisy) vs {100 * c['mean_train_acc_drop']:.1f} (clean) points"),
            verdicts.smaller_drop(grp["noisy"]["drop"], grp["clean"]["drop"]))
        spread = {k: verdicts.spread_over_layers(grp[k]["counts"]) for k in ("noisy", "clean")}
        add("the critical units are spread over many layers", "many layers, clean and noisy alike",
            "; ".join(f"{k}: {v.result or v.verdict}" for k, v in spread.items()),  # the measure, not a layer count
            verdicts.all_of(spread))
    s, _ = _load_probe(drop, "dropout")
    if s is not None:
        add("example-tied dropout: dropping the memorization units removes the mislabeled examples' labels",
            "noisy-train 100% → 0.1% (MNIST), 3.1% (CIFAR-10)",
            f"{_pct(s['noisy_before'])} → {_pct(s['noisy_after'])}",
            verdicts.rule(None if s["noisy_after"] is None else s["noisy_after"] <= 0.1,
                   measure="noisy-train accuracy after dropping the memorization units",
                   threshold="<= 10% (and >= 90% before)", value=s["noisy_after"]), needs_memorization=False)
        if s["noisy_before"] is not None and s["noisy_before"] < 0.9:
            unmeasured("not measured: the dropout model did not memorize the noisy examples (train longer)")
        if s["clean_before"] is not None and s["clean_after"] is not None:
            d = 100 * (s["clean_before"] - s["clean_after"])
            add("... at a small cost to clean training accuracy", "−0.8 points (MNIST), −9.2 (CIFAR-10)",
                f"{_pct(s['clean_before'])} → {_pct(s['clean_after'])} ({-d:+.1f} points)",
                verdicts.rule(d <= 5, measure="clean-train accuracy lost by dropping the memorization units",
                       threshold="<= 5 points", value=d), needs_memorization=False)
            if s["noisy_before"] is not None and s["noisy_before"] < 0.9:
                unmeasured(out[-2][0]["verdict"])  # the same reason: nothing was memorized to remove
    s, arr = _load_probe(base, "detection")
    if s is not None and s.get("quality"):
        best = max(s["quality"], key=lambda r: r["auroc"] if r["auroc"] is not None else -1)
        flip_rows = [r for r in s["quality"] if "flip" in str(r["score"])]
        ours = f"best {best['score']} AUROC {best['auroc']:.3f}"
        if flip_rows and flip_rows[0]["auroc"] is not None:
            ours += f"; units-to-flip AUROC {flip_rows[0]['auroc']:.3f} (n = {flip_rows[0]['n']})"
        add("the number of units to flip detects mislabeled examples", "suggested, not measured", ours,
            _detection_verdict(arr))
    _depth_claim(base, add)
    return out


def claims_summary(rows: list[dict]) -> str | None:
    """One paragraph in words, from the claims' verdicts: how many hold, which do not, what was not measured."""
    if not rows:
        return None
    kinds = {"holds": [], "does not hold": [], "other": []}
    for r in rows:
        v = str(r.get("verdict", ""))
        kinds[v if v in kinds else "other"].append(str(r["claim"]))
    text = f"Of the paper's {len(rows)} claims asked of this run, {len(kinds['holds'])} hold"
    if kinds["does not hold"]:
        text += f" and {len(kinds['does not hold'])} do not: " + "; ".join(kinds["does not hold"])
    text += "."
    if kinds["other"]:
        text += (f" {len(kinds['other'])} could not be decided (not measured, or too few examples for the test): "
                 + "; ".join(kinds["other"]) + ".")
    return text + " Each verdict states its measure, test and threshold in the table below."


def claims_section(base: RunDir, drop: RunDir | None) -> Section:
    sec = Section("Summary: the paper's claims, measured")
    rows = claims(base, drop)
    words = claims_summary(rows)
    if words:
        sec.notes.append(words)
    if not rows:
        sec.missing = "no stage has finished yet"
    sec.tables.append(Table("summary_claims", "Each claim with our number; verdicts compare direction and rough size",
                            rows))
    return sec
