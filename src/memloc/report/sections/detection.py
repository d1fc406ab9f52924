"""The detection section: each per-example score's ROC against the known noise, and the top suspects."""

from __future__ import annotations

from ...core.figures import png
from ...core.runs import RunDir
from ...probes.base import ProbeResult
from ..html import Figure, Section, Table
from .generic import _probe


def detection(run: RunDir) -> Section:
    from ...probes.detection import gallery, roc_figure
    sec, summary, arrays = _probe(run, "detection", "detect", "Detecting mislabeled examples")
    if summary is None:
        return sec
    result = ProbeResult("detection", summary, arrays)
    quality = summary.get("quality") or []
    if quality:
        sec.figures.append(Figure("detection_roc", "ROC of each per-example score for finding the mislabeled examples. "
                                  "Look for curves hugging the top left (AUROC near 1); the diagonal is chance.",
                                  png(roc_figure(result))))
        sec.tables.append(Table("summary_detection", "Quality of each score against the known noise", quality))
    elif summary.get("quality_note"):
        sec.notes.append(str(summary["quality_note"]))
    if "top_images" in arrays and len(arrays["top_images"]):
        sec.figures.append(Figure("detection_suspects", f"The top suspects by {summary.get('rank_by')}: index, given "
                                  "label (y) and the final model's prediction (p).", png(gallery(result))))
    return sec
