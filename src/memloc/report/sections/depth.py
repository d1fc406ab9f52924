"""The depth section: layer-wise decodability (k-NN and linear probes per layer) and prediction depth."""

from __future__ import annotations

import numpy as np

from ...core.figures import png, pyplot
from ...core.runs import RunDir
from ..html import Figure, Section, Table
from .generic import _load_probe, _probe

DEPTH_KINDS = {"clean": "tab:blue", "noisy": "tab:red", "rare": "tab:purple", "all": "black"}


def _depth_curves_figure(arrays: dict, names: list[str], threshold: float):
    """k-NN (solid) and linear (dashed) accuracy per layer for clean / noisy / rare: given label, true label."""
    plt = pyplot()
    subsets = [str(v) for v in arrays["subsets"]]
    panels = [("given", "given label")] + ([("true", "true label")] if np.isfinite(arrays["knn_true_acc"]).any()
                                           else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.2), squeeze=False, sharey=True)
    x = np.arange(len(names))
    for ax, (label, title) in zip(axes[0], panels):
        for kind, color in list(DEPTH_KINDS.items())[:3]:
            for probe, style in (("knn", "-"), ("linear", "--")):
                acc = arrays.get(f"{probe}_{label}_acc")
                if acc is None or not np.isfinite(acc[:, subsets.index(kind)]).any():
                    continue
                ax.plot(x, 100 * acc[:, subsets.index(kind)], style, color=color, marker="o", ms=3,
                        label=f"{kind} ({'k-NN' if probe == 'knn' else 'linear'})")
        if label == "given":
            ax.plot(x, 100 * arrays["knn_agree"][:, subsets.index("all")], ":", color="black",
                    label="k-NN = final prediction (all)")
        ax.axhline(100 * threshold, color="grey", lw=0.8)
        ax.set_xticks(x, [f"{i} {n}" for i, n in enumerate(names)], rotation=60, ha="right", fontsize=7)
        ax.set_ylim(-2, 102)
        ax.set_title(f"probe predicts the {title}")
        ax.set_xlabel("layer")
    axes[0][0].set_ylabel("probe accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _depth_histogram_figure(arrays: dict, names: list[str]):
    """Share of the clean / noisy / rare examples at each prediction depth (0..P; P: only the output agrees)."""
    plt = pyplot()
    depth = np.asarray(arrays["depth"])
    noisy = np.asarray(arrays["is_noisy"], dtype=bool)
    kinds = ({"clean": ~noisy, "noisy": noisy} if noisy.any() else {"all": np.ones_like(noisy)}) | {
        "rare": np.asarray(arrays["is_rare"], dtype=bool)}
    kinds = {k: m for k, m in kinds.items() if m.any()}
    P = len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * (P + 1) + 2), 3.8))
    w = 0.8 / max(1, len(kinds))
    for i, (kind, m) in enumerate(kinds.items()):
        share = np.bincount(depth[m], minlength=P + 1)[: P + 1] / m.sum()
        ax.bar(np.arange(P + 1) + (i - (len(kinds) - 1) / 2) * w, 100 * share, w, color=DEPTH_KINDS[kind],
               label=f"{kind} (median {np.median(depth[m]):g}, n={int(m.sum())})")
    ax.set_xticks(np.arange(P + 1), [f"{d} {n}" for d, n in enumerate(names)] + [f"{P} output only"], rotation=60,
                  ha="right", fontsize=7)
    ax.set_xlabel("prediction depth (the layer from which the k-NN probes agree)")
    ax.set_ylabel("share of the kind (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _spearman(a: np.ndarray, b: np.ndarray) -> tuple[float | None, float | None]:
    """Spearman's rho and its p-value over the pairs where both are finite (None: fewer than 3, or a constant)."""
    from scipy.stats import spearmanr
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None, None
    rho, p = spearmanr(a, b)
    return float(rho), float(p)


def _depth_correlations(run: RunDir, arrays: dict) -> list[dict]:
    """Spearman correlation of prediction depth with the flipping probe's units-to-flip and with every detection
    score (as suspicion: higher = more suspicious), over all, clean and noisy examples."""
    depth = np.asarray(arrays["depth"], dtype=np.float64)
    n = len(depth)
    groups = {"all": np.ones(n, dtype=bool), "clean": ~arrays["is_noisy"], "noisy": arrays["is_noisy"]}
    others: dict[str, np.ndarray] = {}
    _, flip = _load_probe(run, "flipping")
    if flip is not None and "index" in flip and "num_units" in flip:
        units = np.full(n, np.nan)
        idx = np.asarray(flip["index"], dtype=np.int64)
        searched = ~np.asarray(flip["already_wrong"], dtype=bool) if "already_wrong" in flip else np.ones(len(idx),
                                                                                                           bool)
        if len(idx) and idx.max() < n:
            units[idx[searched]] = np.asarray(flip["num_units"], dtype=np.float64)[searched]
            others["units to flip (flipping probe)"] = units
    _, det = _load_probe(run, "detection")
    if det is not None and "scores" in det and det["scores"].shape[0] == n:
        for j, name in enumerate(str(v) for v in det["score_names"]):
            if name not in ("prediction_depth", "units_to_flip"):
                others[f"{name} (detection suspicion)"] = np.asarray(det["scores"][:, j], dtype=np.float64)
    rows = []
    for name, values in others.items():
        for group, m in groups.items():
            if not m.any() or (group != "all" and not arrays["is_noisy"].any()):
                continue
            rho, p = _spearman(depth[m], values[m])
            rows.append({"with": name, "examples": group, "n": int((m & np.isfinite(values)).sum()),
                         "spearman_rho": rho, "p_value": p})
    return rows


def depth_section(run: RunDir) -> Section:
    """Layer-wise decodability (k-NN and linear probes per layer) and prediction depth, from RUN/probes/depth/."""
    sec, summary, arrays = _probe(run, "depth", "depth", "Layer-wise decodability and prediction depth")
    if summary is None:
        return sec
    names = [str(n) for n in arrays["layer_names"]]
    subsets = [str(v) for v in arrays["subsets"]]
    sec.figures.append(Figure("depth_curves", "Decodability by layer: the share of clean, noisy and rare training "
                              f"examples whose label the k-NN probe (k = {summary['k']}, cosine, {summary['support']} "
                              "support examples; dashed: the linear probe) predicts from the layer's pooled "
                              "activations; left the given label, right the true one. Dotted: k-NN agrees with the "
                              "model's final prediction.",
                              png(_depth_curves_figure(arrays, names, summary.get("decodable_threshold", 0.5)))))
    sec.figures.append(Figure("depth_histogram", "Prediction depth (Baldock et al.) of the clean, noisy and rare "
                              "training examples: the first layer from which the k-NN probe of every later layer "
                              "agrees with the final prediction.", png(_depth_histogram_figure(arrays, names))))
    kinds = [k for k in ("clean", "noisy", "rare", "all") if summary["depth"].get(k)]
    sec.tables.append(Table("summary_depth", "Prediction depth per kind of example (0 = settled at the first layer, "
                            f"{len(names)} = only the output agrees)",
                            [{"kind": k, **summary["depth"][k]} for k in kinds]))
    rows = []
    for i, name in enumerate(names):
        row = {"layer": i, "name": name}
        for probe in ("knn", "linear"):
            for label in ("given", "true"):
                acc = arrays.get(f"{probe}_{label}_acc")
                if acc is None:
                    continue
                for kind in ("clean", "noisy", "rare"):
                    v = acc[i, subsets.index(kind)]
                    if np.isfinite(acc[:, subsets.index(kind)]).any():
                        row[f"{probe}_{label}_{kind}"] = float(v)
        rows.append(row)
    sec.tables.append(Table("depth_layers", "Probe accuracy per layer (probe_label_kind: k-NN or linear, predicting "
                            "the given or the true label, on the clean, noisy or rare examples)", rows))
    corr = _depth_correlations(run, arrays)
    if corr:
        sec.tables.append(Table("depth_correlations", "Spearman correlation of prediction depth with the units "
                                "zeroed until the prediction flips (examples the flipping probe searched) and with "
                                "the detection scores (oriented: higher = more suspicious)", corr))
    else:
        sec.notes.append(f"No flipping or detection probe to correlate with: `memloc flip {run.path}`, "
                         f"`memloc detect {run.path}`.")
    frm = summary.get("noisy_decodable_from")
    if summary["depth"].get("noisy"):
        at = "at no layer." if frm is None else f"from layer {frm} ({names[frm]}) of 0–{len(names) - 1}."
        sec.notes.append("Noisy examples' given labels are decodable (k-NN accuracy above "
                         f"{100 * summary.get('decodable_threshold', 0.5):.0f}%) {at}")
    return sec
